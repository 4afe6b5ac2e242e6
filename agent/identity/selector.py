"""Which managed identity to ask for: the manifest's ``identity:`` selector.

A plain value with no I/O and no imports of ours, so the manifest parser can
produce it without importing anything that talks to an identity endpoint
(``manifest`` imports neither ``identity`` nor ``vault``; an import contract
checks it). Each identity endpoint maps the selector to its own query
parameter (IMDS: :data:`agent.identity.imds.SELECTOR_PARAMS`).
"""

from __future__ import annotations

from typing import Dict, Mapping, NamedTuple, Optional

# The manifest's ``identity.source``: which endpoint to ask [protocol.md A1, A7, A8].
SOURCES = ("auto", "imds", "arc", "app-service")

class Identity(NamedTuple):
    """Which managed identity to ask for.

    ``selector`` is the manifest's key (``client_id``, ``object_id`` or
    ``resource_id``) and ``value`` its value; both are None for the
    system-assigned identity. ``source`` is one of :data:`SOURCES`: the
    endpoint to ask, ``auto`` to decide from the machine
    (:func:`agent.identity.tokens.choose_source`).
    """

    selector: Optional[str] = None
    value: Optional[str] = None
    source: str = "auto"

    def token_params(self, api_version: str, resource: str,
                     names: Mapping[str, str]) -> Dict[str, str]:
        """Query parameters of a token request: the endpoint's api-version, the
        resource and, for a user-assigned identity, the selector under the
        endpoint's own name for it (``names``: manifest key -> parameter)."""
        params = {"api-version": api_version, "resource": resource}
        if self.selector is not None and self.value is not None:
            params[names[self.selector]] = self.value
        return params

    def describe(self) -> str:
        """A short operator-facing name, e.g. ``user-assigned client_id=...``."""
        if self.selector is None:
            return "the system-assigned identity"
        return f"the user-assigned identity {self.selector}={self.value}"
