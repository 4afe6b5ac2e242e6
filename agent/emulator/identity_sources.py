"""Azure Arc's HIMDS and App Service's identity endpoint (protocol.md A7, A8).

HIMDS serves IMDS's path with a key-file challenge: a request without
``Authorization`` gets 401 and ``WWW-Authenticate: Basic realm=<path>``, the
path of a fresh ``<guid>.key`` written into ``tokens_dir`` (injectable: the
real ``/var/opt/azcmagent/tokens`` is root's); the same request carrying
``Authorization: Basic <that file's contents>`` gets the token, echoing the
selector asked for. App Service checks ``X-IDENTITY-HEADER`` and
``api-version=2019-08-01`` and answers ``expires_on`` without ``expires_in``;
its refusals are ``{"statusCode", "message"}``. Bodies no recording shows
are marked [unverified].
"""

from __future__ import annotations

import os
import secrets
import threading
import uuid
from collections.abc import Mapping
from urllib.parse import parse_qsl

from agent.emulator.tokens import TokenIssuer
from agent.emulator.wire import (
    IMDS_MISSING_METADATA,
    IMDS_SELECTORS,
    IMDS_TOKEN_PATH,
    Request,
    Response,
    imds_error,
    invalid_request,
    json_bytes,
)

ARC_API_VERSIONS = frozenset({"2019-11-01", "2020-06-01"})  # DOC-ARC's samples (A7)
APP_SERVICE_TOKEN_PATH = "/MSI/token"
APP_SERVICE_API_VERSION = "2019-08-01"
# App Service's spelling -> the issuer's (IMDS's) selector (protocol.md A8).
# ``object_id`` is the documented alias of ``principal_id``, and the one both
# official SDKs send (MSAL's and msal-node's App Service sources): without it
# a user-assigned request silently got the system-assigned identity's token.
APP_SERVICE_SELECTORS = {"client_id": "client_id", "principal_id": "object_id",
                         "object_id": "object_id", "mi_res_id": "msi_res_id"}
KEY_FILE_MODE = 0o640  # HIMDS's user and the himds group (before the umask)
APP_SERVICE_NOT_FOUND = "No Managed Identity found for specified ClientId/ResourceId/PrincipalId."


class ArcApi:
    """HIMDS's token endpoint with its key-file challenge (protocol.md A7).

    ``realm`` (a test hook), when set, is the path the next challenges name
    instead of the file written: tests point it at a symlink, a directory or
    a file elsewhere to see the agent refuse it.
    """

    def __init__(self, issuer: TokenIssuer, tokens_dir: str) -> None:
        self._issuer = issuer
        self.tokens_dir = tokens_dir
        self.realm: str | None = None
        self._lock = threading.Lock()
        self._keys: set[str] = set()

    def handle(self, request: Request) -> Response:
        if request.path != IMDS_TOKEN_PATH:
            return imds_error(404, "not_found", "The requested resource was not found")
        if request.method != "GET":
            return imds_error(405, "method_not_allowed", "Only GET is supported")
        if request.headers.get("metadata", "").lower() != "true":
            return invalid_request(IMDS_MISSING_METADATA)
        query = dict(parse_qsl(request.query, keep_blank_values=True))
        if query.get("api-version") not in ARC_API_VERSIONS:
            return invalid_request(f"Invalid api-version '{query.get('api-version', '')}'")
        authorization = request.headers.get("authorization")
        if authorization is None:
            return self._challenge()
        with self._lock:
            accepted = authorization.startswith("Basic ") and \
                authorization[len("Basic "):] in self._keys
        if not accepted:
            # [unverified] body: HIMDS's wording for a wrong key is not recorded.
            return imds_error(401, "unauthorized_client", "Invalid or expired key")
        if not query.get("resource"):
            return invalid_request("Required query variable 'resource' is missing")
        if "mi_res_id" in query:
            # Arc ignores App Service's spelling and answers for the
            # system-assigned identity (protocol.md A7, MSAL comment).
            del query["mi_res_id"]
        selectors = {name: query[name] for name in IMDS_SELECTORS if name in query}
        if len(selectors) > 1:
            return invalid_request("Only one of client_id, object_id, msi_res_id may be specified")
        return _token(self._issuer, selectors, query["resource"], expires_in=True)

    def _challenge(self) -> Response:
        path = os.path.join(self.tokens_dir, f"{uuid.uuid4()}.key")
        key = secrets.token_hex(32)
        os.makedirs(self.tokens_dir, exist_ok=True)
        # Owner and group may read it: on an Arc server the owner is HIMDS's
        # user and the group himds, whose members (kv-agent's unit, through
        # the packages' drop-in) are the clients allowed to answer (A7).
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, KEY_FILE_MODE)
        with os.fdopen(fd, "w") as handle:
            handle.write(key)
        with self._lock:
            self._keys.add(key)
        realm = self.realm or path
        # [unverified] body; the header is what clients act on (A7 step 2).
        return Response(
            401,
            json_bytes({"error": "unauthorized_client",
                        "error_description": "Authentication required"}),
            (("WWW-Authenticate", f"Basic realm={realm}"),),
        )


class AppServiceApi:
    """App Service's local identity endpoint (protocol.md A8), guarded by ``header``."""

    def __init__(self, issuer: TokenIssuer, header: str) -> None:
        self._issuer = issuer
        self.header = header

    def handle(self, request: Request) -> Response:
        if request.path != APP_SERVICE_TOKEN_PATH:
            # [unverified] status and wording (only reachable on its own port).
            return _app_error(404, "The requested resource was not found")
        if request.method != "GET":
            return _app_error(405, "Only GET is supported")
        if request.headers.get("x-identity-header") != self.header:
            # [unverified] status and wording.
            return _app_error(401, "X-IDENTITY-HEADER is missing or invalid")
        query = dict(parse_qsl(request.query, keep_blank_values=True))
        if query.get("api-version") != APP_SERVICE_API_VERSION:
            return _app_error(400, f"Invalid api-version '{query.get('api-version', '')}'")
        resource = query.get("resource")
        if not resource:
            return _app_error(400, "Required query variable 'resource' is missing")
        given = [name for name in APP_SERVICE_SELECTORS if name in query]
        if len(given) > 1:
            # [unverified] wording; the selectors are mutually exclusive (A8).
            return _app_error(400, "Only one of client_id, principal_id (object_id), "
                                   "mi_res_id may be given")
        selectors = {APP_SERVICE_SELECTORS[name]: query[name] for name in given}
        try:
            identity = self._issuer.resolve(selectors)
        except LookupError:
            return _app_error(400, APP_SERVICE_NOT_FOUND)
        now = int(self._issuer.clock())
        token = self._issuer.issue(identity, resource, now)
        # No expires_in: App Service sends expires_on only (A8 sample).
        return Response(200, json_bytes({
            "access_token": token.access_token,
            "expires_on": str(token.expires_on),
            "resource": resource,
            "token_type": "Bearer",
            "client_id": identity.client_id,
        }))


def _app_error(status: int, message: str) -> Response:
    """App Service's refusal shape (protocol.md A8, MSAL)."""
    return Response(status, json_bytes({"statusCode": status, "message": message}))


def _token(issuer: TokenIssuer, selectors: Mapping[str, str], resource: str,
           *, expires_in: bool) -> Response:
    try:
        identity = issuer.resolve(selectors)
    except LookupError as exc:
        return invalid_request(str(exc.args[0]))
    now = int(issuer.clock())
    token = issuer.issue(identity, resource, now)
    body: dict[str, str] = {
        "access_token": token.access_token,
        "client_id": identity.client_id,
        "object_id": identity.object_id,
        "msi_res_id": identity.resource_id,
        "expires_on": str(token.expires_on),
        "resource": resource,
        "token_type": "Bearer",
    }
    if expires_in:
        body["expires_in"] = str(token.expires_on - now)
    return Response(200, json_bytes(body))
