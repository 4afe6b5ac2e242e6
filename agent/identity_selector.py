"""Which managed identity to ask for: the manifest's ``identity:`` selector.

A plain value with no I/O and no imports of ours, so the manifest parser can
produce it without importing anything that talks to an identity endpoint
(``manifest`` imports neither ``identity`` nor ``vault``; an import contract
checks it). Each identity endpoint maps the selector to its own query
parameter (IMDS: :data:`agent.imds.SELECTOR_PARAMS`).
"""

from __future__ import annotations

from typing import NamedTuple, Optional


class Identity(NamedTuple):
    """Which managed identity to ask for.

    ``selector`` is the manifest's key (``client_id``, ``object_id`` or
    ``resource_id``) and ``value`` its value; both are None for the
    system-assigned identity.
    """

    selector: Optional[str] = None
    value: Optional[str] = None

    def describe(self) -> str:
        """A short operator-facing name, e.g. ``user-assigned client_id=...``."""
        if self.selector is None:
            return "the system-assigned identity"
        return f"the user-assigned identity {self.selector}={self.value}"
