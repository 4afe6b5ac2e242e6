"""Which token resource (audience) a vault's requests carry, settled once per vault.

Only a token for a known Key Vault audience is ever sent [protocol.md B6]:

* for a vault host under a known cloud's DNS suffix, that cloud's resource
  (:func:`audience_for_host`);
* for any other host, the resource its 401 challenge asks for, and then only
  if that is a known Key Vault audience and the host lies under its domain
  (:func:`audience_from_challenge`), so a server can never make the agent
  fetch a token for something else. A vault on a loopback address (the local
  emulator) is exempt from the domain check only.

:class:`Audiences` keeps each vault's, found once: the challenge costs one
unauthenticated request per vault and run.
"""

from __future__ import annotations

import threading
from typing import Callable, Dict, Optional
from urllib.parse import urlsplit

from agent.base import transport
from agent.base.errors import VaultError
from agent.base.hosts import is_loopback_host
from agent.base.untrusted import escape
from agent.vault.failures import challenge_failed
from agent.vault.pacing import RETRY_STATUSES
from agent.vault.url import normalize_vault_url

# Vault DNS suffix -> token resource, per cloud [protocol.md B1].
KNOWN_AUDIENCES: Dict[str, str] = {
    "vault.azure.net": "https://vault.azure.net",
    "vault.usgovcloudapi.net": "https://vault.usgovcloudapi.net",
    "vault.azure.cn": "https://vault.azure.cn",
    "vault.microsoftazure.de": "https://vault.microsoftazure.de",
}


def audience_for_host(host: str) -> Optional[str]:
    """The token resource for a vault host under a known cloud suffix."""
    host = host.lower().rstrip(".")
    for suffix, resource in KNOWN_AUDIENCES.items():
        if host.endswith("." + suffix):
            return resource
    return None


def parse_challenge(header: str) -> Dict[str, str]:
    """Parameters of a ``WWW-Authenticate: Bearer k="v", ...`` header (lower-
    cased keys); empty when it is not a Bearer challenge [protocol.md B6]."""
    scheme, _, rest = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return {}
    params: Dict[str, str] = {}
    for item in rest.split(","):
        key, sep, value = item.strip().partition("=")
        if sep:
            params[key.strip().lower()] = value.strip().strip('"')
    return params


def audience_from_challenge(host: str, header: str) -> str:
    """Choose the token resource a 401 challenge asks for, if it is safe.

    The resource must be a known Key Vault audience, and (except on loopback)
    the vault host must lie under it, so a server can never make the agent
    fetch a token for something else. Raises VaultError otherwise.
    """
    params = parse_challenge(header)
    resource = params.get("resource") or params.get("scope", "").removesuffix("/.default")
    resource = resource.rstrip("/")
    if resource not in KNOWN_AUDIENCES.values():
        raise VaultError(
            f"vault {host} asked for a token for '{escape(resource, 100) or '?'}', "
            "which is not a Key Vault audience; no token was sent",
            "check the vault URL in the manifest")
    if not is_loopback_host(host) and not host.lower().endswith(
        "." + urlsplit(resource).hostname  # type: ignore[operator]
    ):
        raise VaultError(
            f"vault {host} is not under {urlsplit(resource).hostname}, the domain of the "
            "token it asked for; no token was sent",
            "use the vault's own https://<name>.vault.azure.net URL")
    return resource


def check_vault_url(vault: str) -> None:
    """Refuse a vault URL that is not strict and normalised (one built
    outside the manifest, say); raises VaultError, nothing is sent."""
    try:
        normalized = normalize_vault_url(vault)
    except ValueError as exc:
        raise VaultError(f"vault URL refused, no request sent: {exc}") from None
    if normalized != vault:
        raise VaultError(f"vault URL {vault!r} is not in its normal form {normalized}; "
                         "no request sent", "write the vault URL as the manifest does")


class Audiences:
    """The token resource of each vault, discovered once per vault under a
    lock (thread-safe). ``ask`` sends an unauthenticated GET of a URL on a
    vault, retried as every request is, and returns the last reply."""

    def __init__(self, ask: Callable[[str, str], transport.Reply]) -> None:
        self._ask = ask
        self._known: Dict[str, str] = {}
        self._lock = threading.Lock()

    def __contains__(self, vault: object) -> bool:
        """Whether ``vault``'s audience is already settled (nothing to send)."""
        return vault in self._known

    def get(self, vault: str, probe_url: str) -> str:
        """The token resource for ``vault``; discovered once per vault (from
        the 401 to an unauthenticated GET of ``probe_url`` when the host is
        not under a known cloud), after checking that the vault URL is a
        strict, normalised one."""
        with self._lock:
            known = self._known.get(vault)
            if known is not None:
                return known
            check_vault_url(vault)
            host = urlsplit(vault).hostname or ""
            audience = audience_for_host(host) or self._challenge(vault, host, probe_url)
            self._known[vault] = audience
            return audience

    def _challenge(self, vault: str, host: str, probe_url: str) -> str:
        """Elicit the 401 challenge with an unauthenticated request. Retry-After
        is honoured here too: this is the run's first vault request, so a
        throttled vault usually answers it first [protocol.md B8]."""
        reply = self._ask(vault, probe_url)
        if reply.status in RETRY_STATUSES:
            raise challenge_failed(vault, reply.status, reply.body)
        challenge = reply.headers.get("WWW-Authenticate", "")
        if reply.status != 401 or not challenge:
            raise VaultError(
                f"vault {vault} did not send a Key Vault authentication challenge "
                f"(HTTP {reply.status})", "check that the manifest's vault URL is a Key Vault")
        return audience_from_challenge(host, challenge)
