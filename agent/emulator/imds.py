"""IMDS's token endpoint: its rules in the order a request meets them (protocol.md A1-A5, A9)."""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import parse_qsl

from agent.emulator.tokens import TokenIssuer
from agent.emulator.wire import (
    IMDS_MISSING_METADATA,
    IMDS_MISSING_RESOURCE,
    IMDS_SELECTORS,
    IMDS_SERVER_HEADER,
    IMDS_TOKEN_PATH,
    JSON_CONTENT_TYPE,
    Request,
    Response,
    imds_error,
    invalid_request,
    is_imds_api_version,
    json_bytes,
)


class ImdsApi:
    """The token endpoint's rules, in the order a request meets them (protocol.md A1, A9)."""

    def __init__(self, issuer: TokenIssuer) -> None:
        self._issuer = issuer
        # A fault: tokens for this audience whatever ``resource`` asks for, as
        # an endpoint that is not IMDS (a stub, a proxy) may hand out.
        self.audience: str | None = None

    def handle(self, request: Request) -> Response:
        # msal-node (under @azure/identity 4.x) canonicalises an overridden IMDS
        # endpoint (AZURE_POD_IDENTITY_AUTHORITY_HOST) into ".../token/": accept it.
        if request.path not in (IMDS_TOKEN_PATH, IMDS_TOKEN_PATH + "/"):
            return imds_error(404, "not_found", "The requested resource was not found")
        if request.method != "GET":
            return imds_error(405, "method_not_allowed", "Only GET is supported")
        rejection = self._check_headers(request.headers)
        if rejection is not None:
            return rejection
        pairs = parse_qsl(request.query, keep_blank_values=True)
        names = [name for name, _ in pairs]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            # IMDS rejects repeated query parameter names (protocol.md A1, DOC-IMDS).
            return invalid_request(f"Duplicate query parameter '{duplicates[0]}'")
        query = dict(pairs)
        return self._token_response(query)

    @staticmethod
    def _check_headers(headers: Mapping[str, str]) -> Response | None:
        if "x-forwarded-for" in headers:
            # IMDS refuses anything that went through a proxy (SSRF guard) [body unverified].
            return invalid_request(
                "Request was forwarded; X-Forwarded-For is not allowed"
            )
        if headers.get("metadata") != "true":
            return invalid_request(IMDS_MISSING_METADATA)
        if "authorization" in headers:
            # Stricter than IMDS: kv-agent must never hand a credential to this endpoint.
            return invalid_request("Authorization header is not allowed")
        return None

    def _token_response(self, query: Mapping[str, str]) -> Response:
        api_version = query.get("api-version")
        if not api_version:
            return invalid_request("Required query variable 'api-version' is missing")
        if not is_imds_api_version(api_version):
            return invalid_request(f"Invalid api-version '{api_version}'")
        resource = query.get("resource")
        if not resource:
            return invalid_request(IMDS_MISSING_RESOURCE)
        selectors = {name: query[name] for name in IMDS_SELECTORS if name in query}
        if len(selectors) > 1:
            return invalid_request(
                "Only one of client_id, object_id, msi_res_id may be specified"
            )
        try:
            identity = self._issuer.resolve(selectors)
        except LookupError as exc:
            return invalid_request(str(exc.args[0]))
        now = int(self._issuer.clock())
        token = self._issuer.issue(identity, self.audience or resource, now)
        # All numbers are strings on the wire; key order as recorded (protocol.md A2).
        body = {
            "access_token": token.access_token,
            "client_id": identity.client_id,
            "expires_in": str(token.expires_on - now),
            "expires_on": str(token.expires_on),
            "ext_expires_in": str(self._issuer.lifetime_s),
            "not_before": str(token.not_before),
            "resource": resource,
            "token_type": "Bearer",
        }
        return Response(200, json_bytes(body))


def imds_headers(response: Response) -> list[tuple[str, str]]:
    return [
        ("Content-Type", JSON_CONTENT_TYPE),
        ("Server", IMDS_SERVER_HEADER),
        *response.headers,
    ]
