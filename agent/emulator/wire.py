"""The emulator's wire: constants, exact messages, and the request and response values.

What a client sees byte for byte lives here, so the handlers (:mod:`.imds`,
:mod:`.keyvault`) and the fault queue (:mod:`.faults`) answer with one voice.
Wording copied from the real services cites ``docs/protocol.md``; a choice no
recording shows is marked "[unverified]". These are the emulator's own
copies: it is an oracle for the agent, so it imports nothing of the agent's.
"""

from __future__ import annotations

import base64
import binascii
import http
import http.server
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass

IMDS = "imds"
VAULT = "vault"
SERVICES = (IMDS, VAULT)

IMDS_TOKEN_PATH = "/metadata/identity/oauth2/token"
# Build number from the 2021 recording (protocol.md A2); it varies in the field.
IMDS_SERVER_HEADER = "IMDS/150.870.65.492"
# The identity category exists since 2018-02-01 (protocol.md A1); every SDK pins it.
IMDS_MIN_API_VERSION = "2018-02-01"
IMDS_SELECTORS = ("client_id", "object_id", "msi_res_id")

KEYVAULT_RESOURCE = "https://vault.azure.net"
KEYVAULT_API_VERSIONS = frozenset(
    {
        "2016-10-01",
        "7.0",
        "7.1",
        "7.2",
        "7.3",
        "7.4",
        "7.5",
        "7.6",
        "2025-07-01",
        "2026-04-01",
    }
)
KEYVAULT_LATEST_API_VERSION = "2026-04-01"
# Previews seen in real traffic, e.g. "7.4-preview.1" (protocol.md B2).
KEYVAULT_PREVIEW_API_VERSION_RE = re.compile(
    r"^(7\.[0-6]|\d{4}-\d{2}-\d{2})-preview(\.\d+)?$"
)
# outContentType on GET secret: "params_added_on 2025-06-01-preview" (the Python
# SDK's generated client; protocol.md B3); older versions ignore it [unverified].
KEYVAULT_OUT_CONTENT_TYPE_SINCE = "2025-06-01"
KEYVAULT_REGION = "westus"
KEYVAULT_SERVICE_VERSION = "1.9.576.1"
KEYVAULT_RECOVERY_LEVEL = "Recoverable+Purgeable"
KEYVAULT_RECOVERABLE_DAYS = 90
KEYVAULT_MAX_PAGE_SIZE = 25  # protocol.md B4: maxresults 1-25, default 25
# The list-by-page recording opens with two empty pages that carry a nextLink (B4).
EMPTY_PAGES_BEFORE_FIRST = 2
KEYVAULT_RECOVERABLE_S = KEYVAULT_RECOVERABLE_DAYS * 86400  # scheduledPurgeDate - deletedDate
# Write bodies: "maximum size of 25k bytes" per value (B7); the body cap leaves room
# for attributes and tags without letting a client make the emulator buffer megabytes.
KEYVAULT_MAX_VALUE_BYTES = 25 * 1024
MAX_REQUEST_BODY_BYTES = 64 * 1024
# A larger body is read and dropped up to this size, so the client sees the 413
# rather than a reset; beyond it the connection is closed unread.
MAX_DISCARDED_BODY_BYTES = 1024 * 1024
MAX_CONTENT_TYPE_CHARS = 255
MAX_TAGS = 15
MAX_TAG_CHARS = 256
MAX_EPOCH_S = 253402300799  # 9999-12-31T23:59:59Z: the largest IntDate a client can mean
SECRET_NAME_RE = re.compile(r"^[0-9a-zA-Z-]+$")  # spec pattern, protocol.md B7 and E11
SECRET_VERSION_RE = re.compile(r"^[0-9a-fA-F]{32}$")

JSON_CONTENT_TYPE = "application/json; charset=utf-8"
HSTS_VALUE = "max-age=31536000;includeSubDomains"

DEFAULT_TENANT_ID = "00000000-0000-0000-0000-000000000000"
DEFAULT_SYSTEM_CLIENT_ID = "5a3c1f6e-0000-4000-8000-00000000c11d"
DEFAULT_SYSTEM_OBJECT_ID = "5a3c1f6e-0000-4000-8000-0000000000b1"
DEFAULT_VM_RESOURCE_ID = (
    "/subscriptions/00000000-0000-0000-0000-000000000000/resourcegroups/kv-emulator"
    "/providers/Microsoft.Compute/virtualMachines/kv-emulator-vm"
)

# Real MI tokens: exp - iat = 86700 s and a fresh expires_in of 86399 (protocol.md A2).
TOKEN_LIFETIME_S = 86399
TOKEN_ISSUED_BEFORE_S = 301
# A cached token is re-minted once it has less than this left, so a client whose
# own cache treats "< 5 min" as expired (MSAL, protocol.md A5) never loops.
TOKEN_REISSUE_MARGIN_S = 300
TOKEN_CLOCK_SKEW_S = 300

REQUEST_QUEUE_SIZE = 128
HANDSHAKE_TIMEOUT_S = 10.0
IDLE_TIMEOUT_S = 120.0
STOP_JOIN_TIMEOUT_S = 5.0


IMDS_MISSING_METADATA = "Required metadata header not specified"
IMDS_MISSING_RESOURCE = "Required query variable 'resource' is missing"
IMDS_IDENTITY_NOT_FOUND = "Identity not found"
IMDS_MULTIPLE_IDENTITIES = (
    "Multiple user assigned identities exist, please specify the clientId / resourceId "
    "of the identity in the token request"
)
KV_MISSING_TOKEN = "AKV10000: Request is missing a Bearer or PoP token."
KV_WRONG_AUDIENCE = (
    "AKV10022: Invalid audience. Expected https://vault.azure.net, found: {aud}."
)
KV_BAD_SIGNATURE = "AKV10046: Unable to resolve the key used for signature validation"
KV_TOKEN_EXPIRED = "[TokenExpired] Error validating token: 'S2S12086'."
KV_NOT_FOUND = (
    "A secret with (name/id) {name} was not found in this key vault. If you recently deleted "
    "this secret you may be able to recover it using the correct recovery command. For help "
    "resolving this issue, please see https://go.microsoft.com/fwlink/?linkid=2125182"
)
KV_DISABLED = "Operation get is not allowed on a disabled secret."
# Deleted-secret wording quoted from real responses in public issues (protocol.md B5;
# Azure/azure-sdk-for-net#26027, external-secrets/external-secrets#3519).
KV_DELETED_NOT_FOUND = "Deleted Secret not found: {name}"
KV_DELETED_CONFLICT = (
    "Secret {name} is currently in a deleted but recoverable state, and its name cannot "
    "be reused; in this state, the secret can only be recovered or purged."
)
KV_INVALID_NAME = "The request URI contains an invalid name: {name}"
KV_BAD_API_VERSION = (
    "The specified version ({version}) is not recognized. Consider using the latest "
    "supported version ({latest})."
)
KV_THROTTLED = (
    "Request was not processed because too many requests were received. "
    "Reason: VaultRequestTypeLimitReached"
)

# The fault-injection error bodies. IMDS 404/410/429/5xx bodies were never recorded
# (protocol.md A3): the OAuth shape with the documented reason is used [unverified].
IMDS_FAULT_ERRORS: Mapping[int, tuple[str, str]] = {
    400: ("invalid_request", "Bad request"),
    404: ("not_found", "IMDS endpoint is updating"),
    410: ("gone", "IMDS is going through updates"),
    429: ("too_many_requests", "IMDS throttle limit reached"),
    500: ("unknown", "Failed to retrieve token from the Active directory."),
    503: ("service_unavailable", "IMDS is temporarily unavailable"),
}
KV_FAULT_ERRORS: Mapping[int, tuple[str, str]] = {
    400: ("BadParameter", "The request is invalid."),
    401: ("Unauthorized", KV_MISSING_TOKEN),
    403: ("Forbidden", "Access denied."),
    404: ("NotFound", "The requested resource was not found."),
    408: ("RequestTimeout", "The request timed out."),
    429: ("Throttled", KV_THROTTLED),
    500: ("InternalServerError", "An unexpected error occurred."),
    502: ("BadGateway", "Bad gateway."),
    503: ("ServiceUnavailable", "The service is temporarily unavailable."),
    504: ("GatewayTimeout", "The gateway timed out."),
}
# Inner codes accepted by forbid_secret (protocol.md B5, E10).
FORBIDDEN_INNER_CODES = (
    "AccessDenied",
    "ForbiddenByRbac",
    "ForbiddenByFirewall",
    "ForbiddenByPolicy",
)
# Certificate-backed secrets carry the certificate policy's content type (B9).
CERTIFICATE_CONTENT_TYPES = ("application/x-pkcs12", "application/x-pem-file")
GUID_RE = re.compile(
    r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
)
DEFAULT_UAMI_RESOURCE_PREFIX = (
    "/subscriptions/00000000-0000-0000-0000-000000000000/resourcegroups/kv-emulator"
    "/providers/Microsoft.ManagedIdentity/userAssignedIdentities/"
)


@dataclass(frozen=True)
class Request:
    """What a service handler needs from an HTTP request."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    client_ip: str
    # None when the body was not read: over MAX_REQUEST_BODY_BYTES, or chunked.
    body: bytes | None = b""


@dataclass(frozen=True)
class Response:
    """A complete answer; service-wide headers are added by the caller."""

    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()




def json_bytes(value: object) -> bytes:
    """Compact JSON as the real services send it, so Content-Length matches the recordings."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Decode unpadded base64url; raises ValueError on garbage."""
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise ValueError("invalid base64url") from exc


def imds_error(status: int, error: str, description: str) -> Response:
    """IMDS's OAuth-style error (protocol.md A3)."""
    return Response(
        status, json_bytes({"error": error, "error_description": description})
    )


def invalid_request(description: str) -> Response:
    return imds_error(400, "invalid_request", description)


def keyvault_error_body(
    code: str, message: str, inner_code: str | None = None
) -> bytes:
    """KeyVaultError (protocol.md B5); ``innererror`` only when there is one, as on the wire."""
    error: dict[str, object] = {"code": code, "message": message}
    if inner_code is not None:
        error["innererror"] = {"code": inner_code}
    return json_bytes({"error": error})


def challenge_header(tenant_id: str) -> tuple[str, str]:
    """Build the 401 challenge exactly as real vaults send it (protocol.md B6)."""
    return (
        "WWW-Authenticate",
        (
            f'Bearer authorization="https://login.windows.net/{tenant_id}", '
            f'resource="{KEYVAULT_RESOURCE}"'
        ),
    )


def has_out_content_type(version: str) -> bool:
    """Whether api-version ``version`` (already accepted) knows ``outContentType``:
    a dated version (or preview) from KEYVAULT_OUT_CONTENT_TYPE_SINCE on."""
    return bool(re.match(r"\d{4}-\d{2}-\d{2}", version)) and (
        version[:10] >= KEYVAULT_OUT_CONTENT_TYPE_SINCE
    )


def is_keyvault_api_version(version: str) -> bool:
    return version in KEYVAULT_API_VERSIONS or bool(
        KEYVAULT_PREVIEW_API_VERSION_RE.match(version)
    )


def is_imds_api_version(version: str) -> bool:
    """Any YYYY-MM-DD from 2018-02-01 on: IMDS keeps old versions working."""
    return (
        bool(re.fullmatch(r"\d{4}-\d{2}-\d{2}", version))
        and version >= IMDS_MIN_API_VERSION
    )


def status_phrase(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Error"
