"""The Instance Metadata Service (IMDS) as a token request factory.

How to ask an Azure VM's IMDS for a managed-identity token: the request
(``api-version``, ``resource``, the identity selector, ``Metadata: true``
[protocol.md A1]), which statuses are transient (404, 408, 410, 429, 5xx,
with Retry-After [protocol.md A3, A4]) and what a refusal means for the
operator (400: no such identity on this VM, worded for system- vs
user-assigned, as azure-identity does). When to ask is not decided here
(:mod:`agent.identity.tokens`), nor is anything sent (:mod:`agent.identity.request`).

IMDS is plain HTTP on a link-local address and must never go through a proxy
[protocol.md A1]: the session :func:`agent.identity.tokens.token_source` builds does
not trust the environment. It never sends an Authorization header.
"""

from __future__ import annotations

from typing import Dict, Mapping

from agent.base import transport
from agent.base.errors import IdentityUnavailableError
from agent.base.retry import parse_retry_after
from agent.identity.request import (
    Answer,
    RequestFactory,
    Retry,
    TokenRequest,
    error_description,
)
from agent.identity.selector import Identity

DEFAULT_IMDS_ENDPOINT = "http://169.254.169.254/metadata/identity/oauth2/token"
IMDS_ENDPOINT_ENV = "KV_AGENT_IMDS_ENDPOINT"
IMDS_API_VERSION = "2018-02-01"  # what every SDK pins for tokens [protocol.md A1]
RETRY_STATUSES = frozenset({404, 408, 410, 429}) | frozenset(range(500, 600))

# manifest key -> IMDS query parameter [protocol.md A1]
SELECTOR_PARAMS = {"client_id": "client_id", "object_id": "object_id",
                   "resource_id": "msi_res_id"}


def imds_endpoint(environ: Mapping[str, str]) -> str:
    """The token URL: ``KV_AGENT_IMDS_ENDPOINT`` or the link-local default."""
    return environ.get(IMDS_ENDPOINT_ENV) or DEFAULT_IMDS_ENDPOINT


def build_params(resource: str, identity: Identity) -> Dict[str, str]:
    """Query parameters for one token request (pure)."""
    return identity.token_params(IMDS_API_VERSION, resource, SELECTOR_PARAMS)


def _assign_hint(identity: Identity) -> str:
    if identity.selector is None:
        return ("enable the VM's system-assigned identity "
                "(az vm identity assign -g <group> -n <vm>)")
    return ("assign that user-assigned identity to this VM (az vm identity assign -g <group> "
            "-n <vm> --identities <resource id>) and check the id in the manifest")


class ImdsRequestFactory(RequestFactory):
    """IMDS token requests for one identity at ``endpoint``."""

    name = "IMDS"
    unusable_hint = "retry later; if it persists, check the IMDS endpoint"
    unreachable_hint = ("check that this is an Azure VM with a managed identity, "
                        f"or set {IMDS_ENDPOINT_ENV}")

    def __init__(self, endpoint: str, identity: Identity) -> None:
        self.endpoint = endpoint
        self.identity = identity

    def request(self, resource: str) -> TokenRequest:
        """A GET with the query and ``Metadata: true`` (IMDS refuses a request
        without it, an SSRF guard [protocol.md A1])."""
        return TokenRequest(self.endpoint, build_params(resource, self.identity),
                            headers={"Metadata": "true"})

    def answer(self, sent: TokenRequest, reply: transport.Reply, resource: str,
               now: float) -> Answer:
        """200: the token; 404/408/410/429/5xx: retry (honouring Retry-After);
        400: this VM has no such identity (not retried);
        anything else: an error naming the status."""
        status, body = reply.status, reply.body
        if status == 200:
            return self.token(body, resource, now)
        if status in RETRY_STATUSES:
            retry_after = parse_retry_after(reply.headers.get("Retry-After"))
            return Retry(status, error_description(body), retry_after)
        if status == 400:  # "Identity not found", "Multiple user assigned identities exist"
            raise IdentityUnavailableError(
                f"IMDS refused a token for {self.identity.describe()}: "
                f"{error_description(body)}", _assign_hint(self.identity))
        raise IdentityUnavailableError(f"IMDS answered HTTP {status}: {error_description(body)}",
                                       "check the IMDS endpoint and identity configuration")
