"""App Service / Functions / Container Apps identity as a token request
factory [protocol.md A8].

The platform sets ``IDENTITY_ENDPOINT`` (a local URL) and ``IDENTITY_HEADER``
(a secret it rotates); a token is one GET with ``api-version=2019-08-01`` and
the header ``X-IDENTITY-HEADER``. Selectors are spelt ``client_id``,
``principal_id`` (the object id) and ``mi_res_id``. The answer has
``expires_on`` (epoch seconds, or a date on older hosts) and no
``expires_in``; a refusal is ``{"statusCode": ..., "message": ...}``, not
IMDS's OAuth shape. The header's value is a credential: it never reaches a
message (:class:`~agent.identity.request.TokenRequest` hides header values).

The platform's endpoint is local, but nothing checks that ``IDENTITY_ENDPOINT``
is: pointed at another host over plain HTTP, the header crosses the network
unencrypted (azure-identity sends it without a word). The agent warns at start
and ``doctor`` says it (:func:`exposure_warning`); it does not refuse, since the
platform, not the agent, owns the variable.
"""

from __future__ import annotations

from typing import Dict, Mapping, NamedTuple, Optional
from urllib.parse import urlsplit

from agent.base import transport
from agent.base.errors import IdentityUnavailableError
from agent.base.hosts import is_loopback_host
from agent.base.retry import parse_retry_after
from agent.base.untrusted import escape, load_json
from agent.identity.request import (
    Answer,
    RequestFactory,
    Retry,
    TokenRequest,
    error_description,
)
from agent.identity.selector import Identity

APP_SERVICE_API_VERSION = "2019-08-01"
ENDPOINT_ENV = "IDENTITY_ENDPOINT"
HEADER_ENV = "IDENTITY_HEADER"
# manifest key -> App Service query parameter [protocol.md A8]
SELECTOR_PARAMS = {"client_id": "client_id", "object_id": "principal_id",
                   "resource_id": "mi_res_id"}
RETRY_STATUSES = frozenset({408, 429}) | frozenset(range(500, 600))
SOURCE = "app-service"  # identity.source's name for it


class Exposure(NamedTuple):
    """Why the identity header would cross the network in clear, and the fix."""

    message: str
    fix: str


def build_params(resource: str, identity: Identity) -> Dict[str, str]:
    """Query parameters for one token request (pure)."""
    return identity.token_params(APP_SERVICE_API_VERSION, resource, SELECTOR_PARAMS)


def app_service_message(body: bytes) -> str:
    """The platform's words for a refusal (``message``), escaped; IMDS's
    shape as a fallback."""
    try:
        content = load_json(body)
    except ValueError:
        content = None
    if isinstance(content, dict) and isinstance(content.get("message"), str):
        return escape(" ".join(content["message"].split()))
    return error_description(body)


class AppServiceRequestFactory(RequestFactory):
    """App Service token requests for one identity at ``endpoint``,
    authenticated by ``header`` (IDENTITY_HEADER, read once when built)."""

    name = "App Service identity"
    unusable_hint = "retry later; if it persists, restart the app"
    unreachable_hint = (f"check {ENDPOINT_ENV}; the platform sets it when the app's "
                        "managed identity is on")

    def __init__(self, endpoint: str, header: str, identity: Identity) -> None:
        self.endpoint = endpoint
        self.identity = identity
        self._header = header

    def __repr__(self) -> str:
        return f"AppServiceRequestFactory(endpoint={self.endpoint!r}, header=****)"

    def request(self, resource: str) -> TokenRequest:
        """A GET with ``X-IDENTITY-HEADER``; ``Metadata: true`` too, as MSAL
        sends it (harmless here, needed by Azure Automation)."""
        return TokenRequest(self.endpoint, build_params(resource, self.identity),
                            headers={"X-IDENTITY-HEADER": self._header, "Metadata": "true"})

    def answer(self, sent: TokenRequest, reply: transport.Reply, resource: str,
               now: float) -> Answer:
        """200: the token (``expires_on`` only); 408/429/5xx: retry; any other
        status: an error with the platform's message and the fix."""
        status, body = reply.status, reply.body
        if status == 200:
            return self.token(body, resource, now)
        if status in RETRY_STATUSES:
            return Retry(status, app_service_message(body),
                         parse_retry_after(reply.headers.get("Retry-After")))
        raise IdentityUnavailableError(
            f"{self.name} at {self.endpoint} refused a token for "
            f"{self.identity.describe()}: HTTP {status} {app_service_message(body)}",
            _hint(status, self.identity))


def _hint(status: int, identity: Identity) -> str:
    if status in (401, 403):
        return (f"{HEADER_ENV} is missing or stale: restart the app so the platform "
                "sets it again")
    if identity.selector is None:
        return "turn on the app's system-assigned identity (az webapp identity assign)"
    return ("assign that user-assigned identity to the app (az webapp identity assign "
            "--identities <resource id>) and check the id in the manifest")


def exposure_warning(source: str, endpoint: str) -> Optional[Exposure]:
    """The warning for an App Service ``endpoint`` reached over plain HTTP on
    a host that is not this machine (not ``localhost`` nor a loopback
    address); None for any other source, for HTTPS, or for loopback (pure:
    it looks at the URL, never resolves or connects). An endpoint that cannot
    be parsed is judged by its text: not provably loopback, so warned."""
    if source != SOURCE:
        return None
    try:
        parts = urlsplit(endpoint)
        scheme, host = parts.scheme.lower(), parts.hostname or ""
    except ValueError:  # "http://[::1" and the like: judged by its text
        scheme, host = endpoint.partition(":")[0].lower(), ""
    if scheme != "http" or is_loopback_host(host):
        return None
    return Exposure(
        f"{ENDPOINT_ENV} {escape(endpoint)} is plain HTTP to {escape(host or '?')}, not "
        f"this machine: the identity header ({HEADER_ENV}, a credential) crosses the "
        "network unencrypted",
        f"check that {ENDPOINT_ENV} is the platform's own endpoint (App Service sets a "
        "local one); if it is, this warning can be ignored")


def app_service_settings(environ: Mapping[str, str]) -> "tuple[str, str]":
    """(endpoint, header) from the platform's environment; empty when unset."""
    return environ.get(ENDPOINT_ENV, ""), environ.get(HEADER_ENV, "")
