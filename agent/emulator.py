"""Loopback emulator of the IMDS managed-identity endpoint and the Key Vault secrets API.

kv-agent's tests (and anyone trying the agent without Azure) run this instead of
``169.254.169.254`` and ``https://<vault>.vault.azure.net``. It is built from
``docs/protocol.md`` (sections A1-A5, A9, B1-B6, B10) and the real exchanges in
``docs/recordings/``; where the real service's wording is known it is copied byte
for byte, and where it is not the choice is marked "[unverified]".

It is deliberately *stricter* than the stubs other projects use (protocol.md D1,
D2): no ``Metadata: true`` header, numbers instead of strings, a token for the
wrong audience or a forgotten bearer token all fail here the way they fail in
Azure, so a client that passes against the emulator has a good chance against
the real thing.

Two servers are started, both on ``host`` (127.0.0.1 by default):

* IMDS, plain HTTP: ``GET /metadata/identity/oauth2/token``; tokens are HS256
  JWTs signed with a random per-instance key (real ones are RS256; nobody but
  this emulator's own vault checks the signature).
* Key Vault, HTTPS with a throw-away CA generated at start (``cryptography`` is
  imported only there, so pre-made certificate files work without it): get and
  list (B3, B4), and the writes the official SDKs make (SetSecret, UpdateSecret,
  DeleteSecret with soft delete, deleted-secret get/list/recover/purge), shaped
  like the recorded CRUD exchange. ``empty_pages`` makes lists open with empty
  pages carrying a nextLink, as real lists may (B4).

Server design, each point learnt from a benchmark stall: a thread per
connection with HTTP/1.1 keep-alive; a listen backlog of 128 (socketserver's 5
drops SYNs when 16 clients connect at once, costing a 1 s SYN retransmit);
``TCP_NODELAY`` (headers and body are two writes, and Nagle plus delayed ACK
turns that into a 40 ms stall); and the TLS handshake is done in the
connection's own thread, not in the accept loop, so one slow handshake never
serialises the others.

Nothing happens at import: servers, keys and temporary directories exist only
between :meth:`Emulator.start` and :meth:`Emulator.stop`.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import hashlib
import hmac
import http
import http.server
import ipaddress
import json
import logging
import os
import re
import shutil
import socket
import ssl
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional
from urllib.parse import parse_qsl, quote, unquote, urlsplit

import yaml

if TYPE_CHECKING:  # never imported at run time
    from cryptography import x509  # optional: the ``emulator`` extra
    from typing_extensions import Self  # typing.Self is 3.11+

logger = logging.getLogger(__name__)

# --- services and wire constants -------------------------------------------------------

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

# --- exact messages (protocol.md A3, B5) ------------------------------------------------

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

_SECRET_KEYS = frozenset(
    {
        "value",
        "versions",
        "enabled",
        "content_type",
        "tags",
        "not_before",
        "expires_on",
        "managed",
        "kid",
    }
)
_VERSION_KEYS = _SECRET_KEYS - {"versions"}
# The structured secrets file: its top level holds only these keys (see load_emulator_file).
_FILE_KEYS = frozenset({"secrets", "identities"})
_IDENTITIES_KEYS = frozenset({"system_assigned", "user_assigned"})
_USER_ASSIGNED_KEYS = frozenset({"client_id", "object_id", "msi_res_id"})
# Certificate-backed secrets carry the certificate policy's content type (B9).
CERTIFICATE_CONTENT_TYPES = ("application/x-pkcs12", "application/x-pem-file")
GUID_RE = re.compile(
    r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
)
DEFAULT_UAMI_RESOURCE_PREFIX = (
    "/subscriptions/00000000-0000-0000-0000-000000000000/resourcegroups/kv-emulator"
    "/providers/Microsoft.ManagedIdentity/userAssignedIdentities/"
)


# --- public value types -----------------------------------------------------------------


@dataclass(frozen=True)
class UserAssignedIdentity:
    """A user-assigned managed identity as IMDS knows it (protocol.md A1 selectors)."""

    client_id: str
    object_id: str
    msi_res_id: str


@dataclass(frozen=True)
class IdentityConfig:
    """Which managed identities the emulated VM has.

    The default, a system-assigned identity only, is the common VM set-up.
    ``system_assigned=False`` with no user-assigned identity emulates a VM
    without any identity ("Identity not found").
    """

    system_assigned: bool = True
    user_assigned: tuple[UserAssignedIdentity, ...] = ()
    system_client_id: str = DEFAULT_SYSTEM_CLIENT_ID
    system_object_id: str = DEFAULT_SYSTEM_OBJECT_ID


@dataclass(frozen=True)
class EmulatorFile:
    """A secrets file: ``secrets`` for ``Emulator(secrets=...)``, and the VM's identities."""

    secrets: dict[str, Any]
    identities: IdentityConfig


@dataclass(frozen=True)
class RequestRecord:
    """One request as a service saw it, for tests to assert on.

    ``headers`` has lower-case names; ``query`` keeps the last value of a
    repeated parameter; ``status`` is 0 when a fault dropped the connection.
    """

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    status: int


@dataclass(frozen=True)
class CertificatePaths:
    """PEM files written by :func:`generate_certificates`."""

    ca_cert: str
    server_cert: str
    server_key: str


# --- internal value types ---------------------------------------------------------------


@dataclass(frozen=True)
class _VersionSpec:
    """One secret version as given by a caller, before it gets an id and dates."""

    value: str
    enabled: bool = True
    content_type: str | None = None
    tags: dict[str, str] | None = None
    not_before: int | None = None
    expires_on: int | None = None
    # Certificate-backed secrets (protocol.md B9): read-only, never set through the API.
    managed: bool = False
    kid: str | None = None


@dataclass
class _Version:
    """A stored secret version; ``seq`` orders versions across the whole vault."""

    version: str
    spec: _VersionSpec
    created: int
    updated: int
    seq: int


@dataclass
class _Secret:
    """A stored secret: its name as first created, and versions oldest first."""

    name: str
    versions: list[_Version] = field(default_factory=list)


@dataclass(frozen=True)
class _DeletedSecret:
    """A soft-deleted secret with every version, as recover brings it back (B5)."""

    secret: _Secret
    deleted: int
    purge_at: int


class _DeletedConflictError(LookupError):
    """The name belongs to a deleted secret that was neither recovered nor purged."""


@dataclass
class _Fault:
    """A queued fault; ``remaining`` counts the matching requests it still hits."""

    service: str
    status: int | None
    remaining: int
    retry_after: str | None
    drop: bool
    delay_s: float
    path_contains: str | None
    body: bytes | None


@dataclass(frozen=True)
class _Identity:
    """The identity a token is issued for."""

    client_id: str
    object_id: str
    resource_id: str


@dataclass(frozen=True)
class _CachedToken:
    """IMDS's server-side cache entry, so ``expires_in`` counts down (protocol.md A2)."""

    access_token: str
    not_before: int
    expires_on: int


@dataclass(frozen=True)
class _Request:
    """What a service handler needs from an HTTP request."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    client_ip: str
    # None when the body was not read: over MAX_REQUEST_BODY_BYTES, or chunked.
    body: bytes | None = b""


@dataclass(frozen=True)
class _Response:
    """A complete answer; service-wide headers are added by the caller."""

    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()


class _VaultError(Exception):
    """Raised inside the vault handler to answer with a KeyVaultError body."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        inner_code: str | None = None,
        headers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.inner_code = inner_code
        self.headers = headers


class _TokenRejectedError(Exception):
    """A bearer token the vault does not accept; the message is the 401 message."""


# --- small pure helpers -----------------------------------------------------------------


def _json_bytes(value: object) -> bytes:
    """Compact JSON as the real services send it, so Content-Length matches the recordings."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_decode(text: str) -> bytes:
    """Decode unpadded base64url; raises ValueError on garbage."""
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise ValueError("invalid base64url") from exc


def _imds_error(status: int, error: str, description: str) -> _Response:
    """IMDS's OAuth-style error (protocol.md A3)."""
    return _Response(
        status, _json_bytes({"error": error, "error_description": description})
    )


def _invalid_request(description: str) -> _Response:
    return _imds_error(400, "invalid_request", description)


def _keyvault_error_body(
    code: str, message: str, inner_code: str | None = None
) -> bytes:
    """KeyVaultError (protocol.md B5); ``innererror`` only when there is one, as on the wire."""
    error: dict[str, object] = {"code": code, "message": message}
    if inner_code is not None:
        error["innererror"] = {"code": inner_code}
    return _json_bytes({"error": error})


def _challenge_header(tenant_id: str) -> tuple[str, str]:
    """Build the 401 challenge exactly as real vaults send it (protocol.md B6)."""
    return (
        "WWW-Authenticate",
        (
            f'Bearer authorization="https://login.windows.net/{tenant_id}", '
            f'resource="{KEYVAULT_RESOURCE}"'
        ),
    )


def _is_keyvault_api_version(version: str) -> bool:
    return version in KEYVAULT_API_VERSIONS or bool(
        KEYVAULT_PREVIEW_API_VERSION_RE.match(version)
    )


def _is_imds_api_version(version: str) -> bool:
    """Any YYYY-MM-DD from 2018-02-01 on: IMDS keeps old versions working."""
    return (
        bool(re.fullmatch(r"\d{4}-\d{2}-\d{2}", version))
        and version >= IMDS_MIN_API_VERSION
    )


def _fault_response(service: str, fault: _Fault, tenant_id: str) -> _Response:
    """Answer for an injected ``status`` fault: realistic, unless ``body`` overrides it."""
    assert fault.status is not None
    status = fault.status
    headers: list[tuple[str, str]] = []
    if fault.retry_after is not None:
        headers.append(("Retry-After", fault.retry_after))
    phrase = _status_phrase(status)
    if fault.body is not None:
        body = fault.body
    elif service == IMDS:
        error, description = IMDS_FAULT_ERRORS.get(status, ("unknown", phrase))
        body = _imds_error(status, error, description).body
    else:
        code, message = KV_FAULT_ERRORS.get(
            status, (phrase.replace(" ", ""), phrase + ".")
        )
        body = _keyvault_error_body(code, message)
        if status == 401:
            headers.append(_challenge_header(tenant_id))
    return _Response(status, body, tuple(headers))


def _status_phrase(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Error"


# --- secrets input validation -----------------------------------------------------------


def _type_name(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _check_name(name: object, where: str) -> str:
    if not isinstance(name, str) or not SECRET_NAME_RE.match(name):
        raise ValueError(
            f"{where}: invalid secret name {name!r} (use only 0-9, a-z, A-Z and -)"
        )
    return name


def _check_value(value: object, where: str) -> str:
    # Key Vault values are strings; YAML turns `yes` into True and `0123` into 83,
    # so a non-string is more likely a quoting mistake than a wish.
    if not isinstance(value, str):
        raise ValueError(  # noqa: TRY004 - bad input, not a caller bug
            f"{where}: value must be a string, got {_type_name(value)} (quote it)"
        )
    return value


def _is_unquoted_scalar(value: object) -> bool:
    """A YAML scalar that is not a string: ``yes``, ``8080``, ``1.5``, ``2024-01-01``."""
    return not isinstance(value, (str, Mapping, list)) and value is not None


def _check_int(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(  # noqa: TRY004 - bad input, not a caller bug
            f"{where}: must be an integer (epoch seconds), got {_type_name(value)}"
        )
    return value


def _check_tags(value: object, where: str) -> dict[str, str]:
    if not isinstance(value, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ValueError(f"{where}: tags must be a mapping of strings to strings")
    return dict(value)


def _parse_attributes(
    data: Mapping[Any, Any], base: _VersionSpec, where: str
) -> _VersionSpec:
    """Overlay the attributes present in ``data`` on ``base`` (value untouched)."""
    changes: dict[str, Any] = {}
    if "enabled" in data:
        if not isinstance(data["enabled"], bool):
            raise ValueError(f"{where}: enabled must be true or false")
        changes["enabled"] = data["enabled"]
    if "content_type" in data:
        if not isinstance(data["content_type"], str):
            raise ValueError(f"{where}: content_type must be a string")
        changes["content_type"] = data["content_type"]
    if "tags" in data:
        changes["tags"] = _check_tags(data["tags"], f"{where}: tags")
    for key in ("not_before", "expires_on"):
        if key in data:
            changes[key] = _check_int(data[key], f"{where}: {key}")
    if "managed" in data:
        if not isinstance(data["managed"], bool):
            raise ValueError(f"{where}: managed must be true or false")
        changes["managed"] = data["managed"]
    if "kid" in data:
        if not isinstance(data["kid"], str) or not data["kid"].startswith("https://"):
            raise ValueError(f"{where}: kid must be a key URL (https://<vault>/keys/<name>/<version>)")
        changes["kid"] = data["kid"]
    return dataclasses.replace(base, **changes)


def _check_certificate(spec: _VersionSpec, where: str) -> _VersionSpec:
    """A certificate-backed secret is ``managed`` and has a certificate content type (B9)."""
    if spec.kid is not None and not spec.managed:
        raise ValueError(f"{where}: kid is only for certificate-backed secrets (add managed: true)")
    if spec.managed and spec.content_type not in CERTIFICATE_CONTENT_TYPES:
        raise ValueError(
            f"{where}: a managed (certificate-backed) secret needs content_type "
            f"{' or '.join(CERTIFICATE_CONTENT_TYPES)}"
        )
    return spec


def _check_keys(data: Mapping[Any, Any], allowed: frozenset[str], where: str) -> None:
    unknown = sorted(str(key) for key in data if key not in allowed)
    if unknown:
        raise ValueError(
            f"{where}: unknown key {unknown[0]!r} (allowed: {', '.join(sorted(allowed))})"
        )


def _parse_version(entry: object, defaults: _VersionSpec, where: str) -> _VersionSpec:
    if isinstance(entry, str):
        return dataclasses.replace(defaults, value=entry)
    if _is_unquoted_scalar(entry):
        _check_value(entry, where)  # raises, with the "quote it" hint
    if not isinstance(entry, Mapping):
        raise ValueError(  # noqa: TRY004 - bad input, not a caller bug
            f"{where}: must be a string or a mapping, got {_type_name(entry)}"
        )
    _check_keys(entry, _VERSION_KEYS, where)
    if "value" not in entry:
        raise ValueError(f"{where}: missing 'value'")
    spec = _parse_attributes(entry, defaults, where)
    spec = dataclasses.replace(spec, value=_check_value(entry["value"], where))
    return _check_certificate(spec, where)


def _parse_secret(spec: object, where: str) -> list[_VersionSpec]:
    """One secret's versions, oldest first.

    Secret-level attributes are defaults for every version; ``versions`` lists
    older values and ``value``, when present, becomes the latest.
    """
    if isinstance(spec, str):
        return [_VersionSpec(spec)]
    if _is_unquoted_scalar(spec):
        _check_value(spec, where)  # raises, with the "quote it" hint
    if not isinstance(spec, Mapping):
        raise ValueError(  # noqa: TRY004 - bad input, not a caller bug
            f"{where}: must be a string or a mapping, got {_type_name(spec)}"
        )
    _check_keys(spec, _SECRET_KEYS, where)
    defaults = _parse_attributes(spec, _VersionSpec(""), where)
    versions = spec.get("versions", [])
    if not isinstance(versions, list):
        raise ValueError(  # noqa: TRY004 - bad input, not a caller bug
            f"{where}: versions must be a list, got {_type_name(versions)}"
        )
    result = [
        _parse_version(entry, defaults, f"{where}: versions[{index}]")
        for index, entry in enumerate(versions)
    ]
    if "value" in spec:
        latest = dataclasses.replace(defaults, value=_check_value(spec["value"], where))
        result.append(_check_certificate(latest, where))
    if not result:
        raise ValueError(f"{where}: needs a 'value' or a non-empty 'versions' list")
    return result


def _parse_secrets(data: object, source: str) -> dict[str, list[_VersionSpec]]:
    """Validate a secrets mapping; raises ValueError naming ``source`` and the problem."""
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ValueError(  # noqa: TRY004 - bad input, not a caller bug
            f"{source}: expected a mapping of secret name to value, got {_type_name(data)}"
        )
    result: dict[str, list[_VersionSpec]] = {}
    seen: dict[str, str] = {}
    for name, spec in data.items():
        checked = _check_name(name, source)
        if checked.lower() in seen:
            raise ValueError(
                f"{source}: secret {checked!r} duplicates {seen[checked.lower()]!r} "
                "(names are case-insensitive)"
            )
        seen[checked.lower()] = checked
        result[checked] = _parse_secret(spec, f"{source}: secret {checked!r}")
    return result


def load_secrets_file(path: str) -> dict[str, Any]:
    """The secrets of a YAML secrets file, ready for ``Emulator(secrets=...)``.

    Both forms of :func:`load_emulator_file` are read; the identities, if any,
    are validated and left out. Raises ValueError with a one-line message
    naming the file and the problem.
    """
    return load_emulator_file(path).secrets


def load_emulator_file(path: str) -> EmulatorFile:
    """Read and validate a YAML secrets file for the emulator.

    Plain form: the file maps each secret name to either its value (a string)
    or a mapping with ``value`` and/or ``versions`` (older values, oldest first;
    each a string or a mapping with its own attributes) plus optional
    ``enabled``, ``content_type``, ``tags``, ``not_before`` and ``expires_on``
    (epoch seconds), and for a certificate-backed secret ``managed: true`` (with
    content_type application/x-pkcs12 or application/x-pem-file) and optionally
    ``kid`` (default ``<vault>/keys/<name>/<version>``).

    Structured form: a top level with only ``secrets:`` (the plain form's
    mapping) and ``identities:``, which holds ``system_assigned`` (true by
    default) and ``user_assigned``, a list of identities each with a
    ``client_id`` and optionally ``object_id`` and ``msi_res_id``. (So a plain
    file cannot name a secret ``secrets`` or ``identities`` whose spec is a
    mapping: write it in the structured form.)

    Raises ValueError with a one-line message naming the file and the problem.
    """
    data = _read_yaml(path)
    if isinstance(data, Mapping) and data and set(data) <= _FILE_KEYS and all(
        value is None or isinstance(value, Mapping) for value in data.values()
    ):
        secrets = data.get("secrets")
        identities = _parse_identities(data.get("identities"), f"{path}: identities")
    else:
        secrets, identities = data, IdentityConfig()
    _parse_secrets(secrets, path)
    return EmulatorFile(dict(secrets) if secrets is not None else {}, identities)


def _parse_identities(data: object, where: str) -> IdentityConfig:
    """``identities:`` of a structured secrets file (see load_emulator_file)."""
    if data is None:
        return IdentityConfig()
    if not isinstance(data, Mapping):
        raise ValueError(f"{where}: expected a mapping, got {_type_name(data)}")  # noqa: TRY004
    _check_keys(data, _IDENTITIES_KEYS, where)
    system = data.get("system_assigned", True)
    if not isinstance(system, bool):
        raise ValueError(f"{where}: system_assigned must be true or false")
    listed = data.get("user_assigned") or []
    if not isinstance(listed, list):
        raise ValueError(f"{where}: user_assigned must be a list, got {_type_name(listed)}")  # noqa: TRY004
    user_assigned = tuple(
        _parse_user_assigned(item, index, f"{where}: user_assigned[{index}]")
        for index, item in enumerate(listed)
    )
    client_ids = [identity.client_id.lower() for identity in user_assigned]
    if len(set(client_ids)) != len(client_ids):
        raise ValueError(f"{where}: two user-assigned identities share a client_id")
    return IdentityConfig(system_assigned=system, user_assigned=user_assigned)


def _parse_user_assigned(item: object, index: int, where: str) -> UserAssignedIdentity:
    if not isinstance(item, Mapping):
        raise ValueError(  # noqa: TRY004 - bad input, not a caller bug
            f"{where}: expected a mapping with client_id, got {_type_name(item)}"
        )
    _check_keys(item, _USER_ASSIGNED_KEYS, where)
    client_id = item.get("client_id")
    if not isinstance(client_id, str) or not GUID_RE.match(client_id):
        raise ValueError(f"{where}: client_id must be a GUID (the identity's client id)")
    # Stable defaults, so a test that selects by client_id need not invent the others.
    object_id = item.get("object_id", str(uuid.uuid5(uuid.NAMESPACE_URL, client_id.lower())))
    if not isinstance(object_id, str) or not GUID_RE.match(object_id):
        raise ValueError(f"{where}: object_id must be a GUID (the identity's principal id)")
    msi_res_id = item.get("msi_res_id", f"{DEFAULT_UAMI_RESOURCE_PREFIX}uami-{index}")
    if not isinstance(msi_res_id, str) or not msi_res_id.startswith("/subscriptions/"):
        raise ValueError(f"{where}: msi_res_id must be an ARM id (/subscriptions/...)")
    return UserAssignedIdentity(client_id, object_id, msi_res_id)


def _read_yaml(path: str) -> object:
    """The YAML document in ``path``; ValueError naming the file on any problem."""
    try:
        with open(path, encoding="utf-8") as stream:
            data: object = yaml.safe_load(stream)
    except OSError as exc:
        raise ValueError(
            f"{path}: cannot read secrets file: {exc.strerror or exc}"
        ) from exc
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text") from exc
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: invalid YAML: {_yaml_problem(exc)}") from exc
    return data


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """One line from PyYAML's multi-line message."""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    mark = getattr(exc, "problem_mark", None)
    if mark is not None:
        return f"{problem} (line {mark.line + 1}, column {mark.column + 1})"
    return str(problem)


# --- certificates -----------------------------------------------------------------------


def generate_certificates(
    directory: str, *, hostnames: Sequence[str] = (), valid_days: int = 7
) -> CertificatePaths:
    """Create a throw-away CA and a server certificate it signs, as PEM files.

    Writes ``ca.pem``, ``server.pem`` and ``server.key`` (mode 0600) into
    ``directory``. The server certificate names IP 127.0.0.1 and DNS localhost,
    plus ``hostnames`` (IP literals become IP SANs). The CA key is never written:
    nothing can be signed with this CA afterwards. EC P-256 keeps generation in
    the millisecond range. Needs ``cryptography`` (the ``emulator`` extra),
    imported here only so loading pre-made files works without it.
    """
    import datetime

    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    except ImportError:
        from agent.errors import MissingDependencyError

        raise MissingDependencyError(
            "the emulator needs the Python package 'cryptography' to make its test CA",
            "install python3-cryptography (Debian, Ubuntu, RHEL, Azure Linux) or run "
            "pip install 'kv-agent[emulator]', or pass --tls-cert/--tls-key",
        ) from None

    now = datetime.datetime.now(datetime.timezone.utc)
    not_before = now - datetime.timedelta(hours=1)  # tolerate clock skew
    not_after = now + datetime.timedelta(days=valid_days)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, "kv-agent emulator test CA")]
    )
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    sans: list[x509.GeneralName] = [
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.DNSName("localhost"),
    ]
    for name in hostnames:
        san = _san_for(name)
        if san not in sans:
            sans.append(san)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kv-agent emulator")])
        )
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )

    os.makedirs(directory, mode=0o700, exist_ok=True)
    paths = CertificatePaths(
        ca_cert=os.path.join(directory, "ca.pem"),
        server_cert=os.path.join(directory, "server.pem"),
        server_key=os.path.join(directory, "server.key"),
    )
    pem = serialization.Encoding.PEM
    _write_file(paths.ca_cert, ca_cert.public_bytes(pem), 0o644)
    _write_file(paths.server_cert, server_cert.public_bytes(pem), 0o644)
    key_pem = server_key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    _write_file(paths.server_key, key_pem, 0o600)
    return paths


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    """KeyUsage for a CA (sign certificates) or an ECDSA TLS server (sign handshakes)."""
    from cryptography import x509

    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _san_for(name: str) -> x509.GeneralName:
    from cryptography import x509

    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _write_file(path: str, data: bytes, mode: int) -> None:
    """Write with ``mode`` from the start, so a private key is never briefly world-readable."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as stream:
        stream.write(data)
    os.chmod(path, mode)  # O_CREAT's mode is filtered by the umask


# --- tokens -----------------------------------------------------------------------------


class _TokenIssuer:
    """Mints and checks the emulator's managed-identity tokens.

    IMDS keeps a cache per (identity, resource) for about a day (protocol.md A5),
    so a repeated request returns the same token with a smaller ``expires_in``.
    """

    def __init__(
        self, tenant_id: str, identities: IdentityConfig, clock: Callable[[], float]
    ) -> None:
        self.tenant_id = tenant_id
        self.clock = clock
        self.identities = identities
        self.lifetime_s = TOKEN_LIFETIME_S
        self._key = os.urandom(32)
        self._lock = threading.Lock()
        self._cache: dict[tuple[str, str], _CachedToken] = {}

    @property
    def issuer(self) -> str:
        return f"https://sts.windows.net/{self.tenant_id}/"

    def resolve(self, selectors: Mapping[str, str]) -> _Identity:
        """Pick the identity a token request means (protocol.md A9 item 4).

        Raises ``LookupError`` with the IMDS error description.
        """
        config = self.identities
        if selectors:
            ((kind, wanted),) = selectors.items()
            for uami in config.user_assigned:
                if getattr(uami, kind).lower() == wanted.lower():
                    return _Identity(uami.client_id, uami.object_id, uami.msi_res_id)
            raise LookupError(IMDS_IDENTITY_NOT_FOUND)
        if config.system_assigned:
            return _Identity(
                config.system_client_id, config.system_object_id, DEFAULT_VM_RESOURCE_ID
            )
        if len(config.user_assigned) == 1:
            # A VM with one user-assigned identity answers with it (MSAL docstring, A9).
            uami = config.user_assigned[0]
            return _Identity(uami.client_id, uami.object_id, uami.msi_res_id)
        if config.user_assigned:
            raise LookupError(IMDS_MULTIPLE_IDENTITIES)
        raise LookupError(IMDS_IDENTITY_NOT_FOUND)

    def issue(self, identity: _Identity, resource: str, now: int) -> _CachedToken:
        """Return the cached token for (identity, resource), minting one when none is fresh."""
        key = (identity.client_id.lower(), resource)
        margin = min(TOKEN_REISSUE_MARGIN_S, self.lifetime_s // 2)
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None and cached.expires_on - now > margin:
                return cached
            token = self._mint(identity, resource, now)
            self._cache[key] = token
            return token

    def clear_cache(self) -> None:
        with self._lock:
            self._cache.clear()

    def _mint(self, identity: _Identity, resource: str, now: int) -> _CachedToken:
        expires_on = now + self.lifetime_s
        issued_at = now - TOKEN_ISSUED_BEFORE_S
        claims = {
            "aud": resource,
            "iss": self.issuer,
            "iat": issued_at,
            "nbf": issued_at,
            "exp": expires_on,
            "appid": identity.client_id,
            "appidacr": "2",
            "idp": self.issuer,
            "idtyp": "app",
            "oid": identity.object_id,
            "sub": identity.object_id,
            "tid": self.tenant_id,
            "uti": _b64url(os.urandom(16)),
            "ver": "1.0",
            "xms_mirid": identity.resource_id,
        }
        return _CachedToken(self._sign(claims), issued_at, expires_on)

    def _sign(self, claims: Mapping[str, object]) -> str:
        header = _b64url(
            _json_bytes({"typ": "JWT", "alg": "HS256", "kid": "kv-agent-emulator"})
        )
        payload = _b64url(_json_bytes(claims))
        signing_input = f"{header}.{payload}".encode("ascii")
        signature = hmac.new(self._key, signing_input, hashlib.sha256).digest()
        return f"{header}.{payload}.{_b64url(signature)}"

    def verify(self, token: str, now: float) -> dict[str, Any]:
        """Claims of a valid Key Vault token; raises _TokenRejectedError with the 401 message."""
        parts = token.split(".")
        if len(parts) != 3:
            raise _TokenRejectedError(KV_BAD_SIGNATURE)
        signing_input = f"{parts[0]}.{parts[1]}".encode("ascii", "replace")
        expected = hmac.new(self._key, signing_input, hashlib.sha256).digest()
        try:
            signature = _b64url_decode(parts[2])
            claims = json.loads(_b64url_decode(parts[1]))
        # json.JSONDecodeError and UnicodeDecodeError are ValueErrors too.
        except ValueError as exc:
            raise _TokenRejectedError(KV_BAD_SIGNATURE) from exc
        if not hmac.compare_digest(signature, expected) or not isinstance(claims, dict):
            raise _TokenRejectedError(KV_BAD_SIGNATURE)
        if not _number_at_least(claims.get("exp"), now):
            raise _TokenRejectedError(KV_TOKEN_EXPIRED)
        if not _number_at_least(now + TOKEN_CLOCK_SKEW_S, claims.get("nbf", 0)):
            # Managed HSM's wording (protocol.md B5 issue list) [unverified for vaults].
            raise _TokenRejectedError("Token not yet valid")
        if claims.get("aud") != KEYVAULT_RESOURCE:
            raise _TokenRejectedError(KV_WRONG_AUDIENCE.format(aud=claims.get("aud")))
        return claims


def _number_at_least(value: object, floor: object) -> bool:
    numbers = (int, float)
    return (
        isinstance(value, numbers)
        and isinstance(floor, numbers)
        and not isinstance(value, bool)
        and value >= floor
    )


# --- secret store -----------------------------------------------------------------------


class _SecretStore:
    """The vault's contents; every method takes the lock, so tests may change it mid-run."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        # Keyed by lower-case name: Key Vault names are case-insensitive (B7).
        self._secrets: dict[str, _Secret] = {}
        self._forbidden: dict[str, str] = {}
        self._deleted: dict[str, _DeletedSecret] = {}
        self._seq = 0

    def add(self, name: str, spec: _VersionSpec) -> str:
        """Append a version (creating the secret); raises _DeletedConflictError (B5 409)."""
        now = int(self._clock())
        version = uuid.uuid4().hex
        with self._lock:
            if name.lower() in self._deleted:
                raise _DeletedConflictError(
                    f"secret {name!r} is soft-deleted in the emulator: recover or purge it first"
                )
            self._seq += 1
            secret = self._secrets.setdefault(name.lower(), _Secret(name))
            secret.versions.append(_Version(version, spec, now, now, self._seq))
        return version

    def set_enabled(self, name: str, version: str | None, enabled: bool) -> None:
        with self._lock:
            target = self._find(name, version)
            if target is None:
                label = name if version is None else f"{name}/{version}"
                raise KeyError(f"no secret {label!r} in the emulator")
            target.spec = dataclasses.replace(target.spec, enabled=enabled)
            target.updated = int(self._clock())

    def delete(self, name: str) -> None:
        """Remove a live secret at once, as a delete followed by a purge would."""
        with self._lock:
            if self._secrets.pop(name.lower(), None) is None:
                raise KeyError(f"no secret {name!r} in the emulator")

    def update(
        self,
        name: str,
        version: str | None,
        change: Callable[[_VersionSpec], _VersionSpec],
    ) -> tuple[str, _Version] | None:
        """Apply ``change`` to one version's attributes; None when there is no such version."""
        with self._lock:
            target = self._find(name, version)
            if target is None:
                return None
            target.spec = change(target.spec)
            target.updated = int(self._clock())
            return self._secrets[name.lower()].name, dataclasses.replace(target)

    def soft_delete(self, name: str) -> _DeletedSecret | None:
        """Move a secret with all its versions to the deleted state; None when missing."""
        now = int(self._clock())
        with self._lock:
            secret = self._secrets.pop(name.lower(), None)
            if secret is None:
                return None
            deleted = _DeletedSecret(secret, now, now + KEYVAULT_RECOVERABLE_S)
            self._deleted[name.lower()] = deleted
            return _copy_deleted(deleted)

    def deleted(self, name: str) -> _DeletedSecret | None:
        with self._lock:
            found = self._deleted.get(name.lower())
            return None if found is None else _copy_deleted(found)

    def all_deleted(self) -> list[_DeletedSecret]:
        with self._lock:
            return [_copy_deleted(found) for found in self._deleted.values()]

    def recover(self, name: str) -> tuple[str, _Version] | None:
        """Bring a deleted secret back with every version; None when it is not deleted."""
        with self._lock:
            found = self._deleted.pop(name.lower(), None)
            if found is None:
                return None
            self._secrets[name.lower()] = found.secret
            return found.secret.name, dataclasses.replace(found.secret.versions[-1])

    def purge(self, name: str) -> bool:
        """Forget a deleted secret for good; False when it is not deleted."""
        with self._lock:
            return self._deleted.pop(name.lower(), None) is not None

    def forbid(self, name: str, inner_code: str | None) -> None:
        with self._lock:
            if inner_code is None:
                self._forbidden.pop(name.lower(), None)
            else:
                self._forbidden[name.lower()] = inner_code

    def forbidden(self, name: str) -> str | None:
        with self._lock:
            return self._forbidden.get(name.lower())

    def get(self, name: str, version: str | None) -> tuple[str, _Version] | None:
        """Return (stored name, version), or None; ``version=None`` means the latest."""
        with self._lock:
            target = self._find(name, version)
            if target is None:
                return None
            return self._secrets[name.lower()].name, dataclasses.replace(target)

    def latest_of_all(self) -> list[tuple[str, _Version]]:
        """Every secret's latest version, ordered by upper-cased name like the real cursor."""
        with self._lock:
            items = [
                (s.name, dataclasses.replace(s.versions[-1]))
                for s in self._secrets.values()
            ]
        return sorted(items, key=lambda item: item[0].upper())

    def versions(self, name: str) -> list[tuple[str, _Version]]:
        with self._lock:
            secret = self._secrets.get(name.lower())
            if secret is None:
                return []
            return [(secret.name, dataclasses.replace(v)) for v in secret.versions]

    def _find(self, name: str, version: str | None) -> _Version | None:
        secret = self._secrets.get(name.lower())
        if secret is None or not secret.versions:
            return None
        if version is None:
            return secret.versions[-1]
        return next((v for v in secret.versions if v.version == version.lower()), None)


def _copy_deleted(found: _DeletedSecret) -> _DeletedSecret:
    """A snapshot callers may read without the store's lock."""
    versions = [dataclasses.replace(version) for version in found.secret.versions]
    return dataclasses.replace(found, secret=_Secret(found.secret.name, versions))


# --- fault queue ------------------------------------------------------------------------


class _FaultQueue:
    """FIFO of injected faults; the first one matching a request is used."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._faults: list[_Fault] = []

    def add(self, fault: _Fault) -> None:
        with self._lock:
            self._faults.append(fault)

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()

    def take(self, service: str, path: str) -> _Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.service != service:
                    continue
                if fault.path_contains is not None and fault.path_contains not in path:
                    continue
                fault.remaining -= 1
                if fault.remaining <= 0:
                    self._faults.remove(fault)
                return fault
        return None


# --- IMDS -------------------------------------------------------------------------------


class _ImdsApi:
    """The token endpoint's rules, in the order a request meets them (protocol.md A1, A9)."""

    def __init__(self, issuer: _TokenIssuer) -> None:
        self._issuer = issuer

    def handle(self, request: _Request) -> _Response:
        # msal-node (under @azure/identity 4.x) canonicalises an overridden IMDS
        # endpoint (AZURE_POD_IDENTITY_AUTHORITY_HOST) into ".../token/": accept it.
        if request.path not in (IMDS_TOKEN_PATH, IMDS_TOKEN_PATH + "/"):
            return _imds_error(404, "not_found", "The requested resource was not found")
        if request.method != "GET":
            return _imds_error(405, "method_not_allowed", "Only GET is supported")
        rejection = self._check_headers(request.headers)
        if rejection is not None:
            return rejection
        pairs = parse_qsl(request.query, keep_blank_values=True)
        names = [name for name, _ in pairs]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            # IMDS rejects repeated query parameter names (protocol.md A1, DOC-IMDS).
            return _invalid_request(f"Duplicate query parameter '{duplicates[0]}'")
        query = dict(pairs)
        return self._token_response(query)

    @staticmethod
    def _check_headers(headers: Mapping[str, str]) -> _Response | None:
        if "x-forwarded-for" in headers:
            # IMDS refuses anything that went through a proxy (SSRF guard) [body unverified].
            return _invalid_request(
                "Request was forwarded; X-Forwarded-For is not allowed"
            )
        if headers.get("metadata") != "true":
            return _invalid_request(IMDS_MISSING_METADATA)
        if "authorization" in headers:
            # Stricter than IMDS: kv-agent must never hand a credential to this endpoint.
            return _invalid_request("Authorization header is not allowed")
        return None

    def _token_response(self, query: Mapping[str, str]) -> _Response:
        api_version = query.get("api-version")
        if not api_version:
            return _invalid_request("Required query variable 'api-version' is missing")
        if not _is_imds_api_version(api_version):
            return _invalid_request(f"Invalid api-version '{api_version}'")
        resource = query.get("resource")
        if not resource:
            return _invalid_request(IMDS_MISSING_RESOURCE)
        selectors = {name: query[name] for name in IMDS_SELECTORS if name in query}
        if len(selectors) > 1:
            return _invalid_request(
                "Only one of client_id, object_id, msi_res_id may be specified"
            )
        try:
            identity = self._issuer.resolve(selectors)
        except LookupError as exc:
            return _invalid_request(str(exc.args[0]))
        now = int(self._issuer.clock())
        token = self._issuer.issue(identity, resource, now)
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
        return _Response(200, _json_bytes(body))


def _imds_headers(response: _Response) -> list[tuple[str, str]]:
    return [
        ("Content-Type", JSON_CONTENT_TYPE),
        ("Server", IMDS_SERVER_HEADER),
        *response.headers,
    ]


# --- Key Vault --------------------------------------------------------------------------


class _VaultApi:
    """The secrets data plane (protocol.md B1-B6, B10): auth first, then routing."""

    def __init__(
        self,
        store: _SecretStore,
        issuer: _TokenIssuer,
        vault_url: str,
        link_base: str,
        vault_name: str,
        empty_pages: bool,
    ) -> None:
        self.empty_pages = empty_pages
        self._store = store
        self._issuer = issuer
        self._vault_url = vault_url
        self._link_base = link_base  # nextLink always carries the port, even :443 (B4)
        self._vault_name = vault_name

    def handle(self, request: _Request) -> _Response:
        try:
            claims = self._authenticate(request.headers.get("authorization", ""))
            return self._route(request, claims)
        except _VaultError as exc:
            body = _keyvault_error_body(exc.code, exc.message, exc.inner_code)
            return _Response(exc.status, body, exc.headers)

    def _authenticate(self, authorization: str) -> dict[str, Any]:
        scheme, _, token = authorization.strip().partition(" ")
        try:
            if scheme.lower() != "bearer" or not token.strip():
                raise _TokenRejectedError(KV_MISSING_TOKEN)
            return self._issuer.verify(token.strip(), self._issuer.clock())
        except _TokenRejectedError as exc:
            challenge = (_challenge_header(self._issuer.tenant_id),)
            raise _VaultError(401, "Unauthorized", str(exc), headers=challenge) from exc

    def _route(self, request: _Request, claims: Mapping[str, Any]) -> _Response:
        """Dispatch on (collection, shape of the path, method), then check the api-version."""
        path = request.path
        if path.endswith("/") and len(path) > 1:
            # "/secrets/<name>/" is what the SDKs send for "latest" (B3).
            path = path[:-1]
        parts = [unquote(part) for part in path.split("/")[1:]]
        operation = self._operation(parts, request.method)
        query = dict(parse_qsl(request.query, keep_blank_values=True))
        api_version = _check_api_version(query.get("api-version"))
        if len(parts) > 1 and not SECRET_NAME_RE.match(parts[1]):
            raise _VaultError(400, "BadParameter", KV_INVALID_NAME.format(name=parts[1]))
        return operation(_Call(parts, query, api_version, claims, request))

    def _operation(
        self, parts: list[str], method: str
    ) -> Callable[[_Call], _Response]:
        """The handler for a path and method: 404 for an unknown path, 405 for a method."""
        collection = parts[0] if parts else ""
        if collection == "secrets" and len(parts) == 3 and parts[2] == "versions":
            shape = "versions"
        elif collection == "deletedsecrets" and len(parts) == 3 and parts[2] == "recover":
            shape = "recover"
        else:
            shape = f"{len(parts)}"
        methods: Mapping[str, Callable[[_Call], _Response]] = {
            ("secrets", "1"): {"GET": self._list_secrets},
            ("secrets", "2"): {
                "GET": self._get,
                "PUT": self._set,
                "PATCH": self._update,
                "DELETE": self._delete,
            },
            ("secrets", "3"): {"GET": self._get, "PATCH": self._update},
            ("secrets", "versions"): {"GET": self._list_versions},
            ("deletedsecrets", "1"): {"GET": self._list_deleted},
            ("deletedsecrets", "2"): {"GET": self._get_deleted, "DELETE": self._purge},
            ("deletedsecrets", "recover"): {"POST": self._recover},
        }.get((collection, shape), {})
        if not methods:
            # The real body for an unknown path is not recorded [unverified].
            raise _VaultError(404, "NotFound", "The requested resource was not found.")
        if method not in methods:
            raise _VaultError(
                405,
                "MethodNotAllowed",
                f"The requested resource does not support http method '{method}'.",
            )  # [body unverified]
        return methods[method]

    # -- reads

    def _get(self, call: _Call) -> _Response:
        name = call.parts[1]
        version = call.parts[2] if len(call.parts) == 3 else None
        inner_code = self._store.forbidden(name)
        if inner_code is not None:
            message = _forbidden_message(
                inner_code,
                claims=call.claims,
                vault_name=self._vault_name,
                secret_name=name,
                client_ip=call.request.client_ip,
                issuer=self._issuer.issuer,
            )
            raise _VaultError(403, "Forbidden", message, inner_code)
        stored_name, stored = self._find(name, version)
        if not stored.spec.enabled:
            raise _VaultError(403, "Forbidden", KV_DISABLED, "SecretDisabled")
        return _ok(self._bundle(stored_name, stored, with_value=True))

    def _find(self, name: str, version: str | None) -> tuple[str, _Version]:
        """A live version, or the recorded 404 SecretNotFound (B5)."""
        found = None
        if version is None or SECRET_VERSION_RE.match(version):
            found = self._store.get(name, version)
        if found is None:
            label = name if version is None else f"{name}/{version}"
            raise _VaultError(404, "SecretNotFound", KV_NOT_FOUND.format(name=label))
        return found

    def _list_secrets(self, call: _Call) -> _Response:
        entries = [
            (
                name.upper(),
                self._bundle(
                    name, version, with_value=False, versioned_id=False, is_item=True
                ),
            )
            for name, version in self._store.latest_of_all()
        ]
        return self._page(call, "/secrets", entries)

    def _list_versions(self, call: _Call) -> _Response:
        name = call.parts[1]
        entries = [
            (
                f"{version.seq:012d}",
                self._bundle(stored, version, with_value=False, is_item=True),
            )
            for stored, version in self._store.versions(name)
        ]
        return self._page(call, f"/secrets/{quote(name)}/versions", entries)

    def _list_deleted(self, call: _Call) -> _Response:
        entries = [
            (found.secret.name.upper(), self._deleted_bundle(found, is_item=True))
            for found in self._store.all_deleted()
        ]
        return self._page(call, "/deletedsecrets", sorted(entries, key=lambda e: e[0]))

    def _get_deleted(self, call: _Call) -> _Response:
        return _ok(self._deleted_bundle(self._deleted(call.parts[1])))

    def _deleted(self, name: str) -> _DeletedSecret:
        found = self._store.deleted(name)
        if found is None:
            message = KV_DELETED_NOT_FOUND.format(name=name)
            raise _VaultError(404, "SecretNotFound", message)
        return found

    # -- writes (SetSecret, UpdateSecret, DeleteSecret, Recover, Purge: REST 7.x)

    def _set(self, call: _Call) -> _Response:
        """PUT /secrets/<name>: a new version; 409 while the name is soft-deleted."""
        body = _json_body(call.request.body, allowed=_SET_KEYS)
        if "value" not in body:
            raise _VaultError(400, "BadParameter", "The secret value is missing.")
        spec = _apply_body(_VersionSpec(_body_value(body["value"])), body)
        name = call.parts[1]
        try:
            version = self._store.add(name, spec)
        except _DeletedConflictError:
            message = KV_DELETED_CONFLICT.format(name=name)
            raise _VaultError(
                409, "Conflict", message, "ObjectIsDeletedButRecoverable"
            ) from None
        stored_name, stored = self._find(name, version)
        return _ok(self._bundle(stored_name, stored, with_value=True))

    def _update(self, call: _Call) -> _Response:
        """PATCH /secrets/<name>[/<version>]: attributes, content type, tags; no value."""
        body = _json_body(call.request.body, allowed=_UPDATE_KEYS)
        name = call.parts[1]
        version = call.parts[2] if len(call.parts) == 3 else None
        self._find(name, version)  # 404 before any change
        found = self._store.update(name, version, lambda spec: _apply_body(spec, body))
        if found is None:  # deleted meanwhile
            self._find(name, version)
        assert found is not None
        return _ok(self._bundle(*found, with_value=False))

    def _delete(self, call: _Call) -> _Response:
        """DELETE /secrets/<name>: soft delete, answered with the DeletedSecretBundle (B5)."""
        name = call.parts[1]
        found = self._store.soft_delete(name)
        if found is None:
            self._find(name, None)  # raises the 404
        assert found is not None
        return _ok(self._deleted_bundle(found))

    def _recover(self, call: _Call) -> _Response:
        """POST /deletedsecrets/<name>/recover: every version back, the latest's bundle."""
        name = call.parts[1]
        found = self._store.recover(name)
        if found is None:
            self._deleted(name)  # raises the 404
        assert found is not None
        return _ok(self._bundle(*found, with_value=False))  # [unverified: no value]

    def _purge(self, call: _Call) -> _Response:
        """DELETE /deletedsecrets/<name>: gone for good, 204 with no body."""
        name = call.parts[1]
        if not self._store.purge(name):
            self._deleted(name)  # raises the 404
        return _Response(204, b"")

    # -- paging and bodies

    def _page(
        self, call: _Call, path: str, entries: list[tuple[str, dict[str, object]]]
    ) -> _Response:
        """One page of a list (protocol.md B4); ``entries`` are (sort key, item), sorted.

        The cursor is the sort key of the last item returned, so a page boundary
        survives secrets being added or deleted between pages, as in the real
        service whose skiptoken holds the last upper-cased name. With
        ``empty_pages`` the list opens with EMPTY_PAGES_BEFORE_FIRST empty pages
        and ends with ``{"value":[],"nextLink":null}``, as the recording does.
        """
        max_results = _check_max_results(call.query.get("maxresults"))
        opening_gaps = EMPTY_PAGES_BEFORE_FIRST if self.empty_pages else 0
        cursor, gaps = _decode_skiptoken(call.query.get("$skiptoken"), opening_gaps)
        remaining = [entry for entry in entries if entry[0] > cursor]
        values: list[dict[str, object]] = []
        link_state: tuple[str, int] | None = None
        if remaining and gaps > 0:
            link_state = (cursor, gaps - 1)
        else:
            chosen = remaining[: max_results or KEYVAULT_MAX_PAGE_SIZE]
            values = [item for _, item in chosen]
            if len(remaining) > len(chosen) or (self.empty_pages and chosen):
                link_state = (chosen[-1][0], 0)
        next_link = None
        if link_state is not None:
            next_link = (
                f"{self._link_base}{path}?api-version={quote(call.api_version, safe='.-')}"
                f"&$skiptoken={_encode_skiptoken(*link_state)}"
            )
            if max_results is not None:
                next_link += f"&maxresults={max_results}"
        return _ok({"value": values, "nextLink": next_link})

    def _bundle(
        self,
        name: str,
        version: _Version,
        *,
        with_value: bool,
        versioned_id: bool = True,
        is_item: bool = False,
    ) -> dict[str, object]:
        """SecretBundle, or a list's SecretItem (no kid), with the wire's key order (B3)."""
        spec = version.spec
        bundle: dict[str, object] = {}
        if with_value:
            bundle["value"] = spec.value
        if spec.content_type is not None:
            bundle["contentType"] = spec.content_type
        secret_id = f"{self._vault_url}/secrets/{name}"
        bundle["id"] = f"{secret_id}/{version.version}" if versioned_id else secret_id
        if spec.managed:
            bundle["managed"] = True
        attributes: dict[str, object] = {"enabled": spec.enabled}
        if spec.not_before is not None:
            attributes["nbf"] = spec.not_before
        if spec.expires_on is not None:
            attributes["exp"] = spec.expires_on
        attributes.update(
            created=version.created,
            updated=version.updated,
            recoveryLevel=KEYVAULT_RECOVERY_LEVEL,
            recoverableDays=KEYVAULT_RECOVERABLE_DAYS,
        )
        bundle["attributes"] = attributes
        if spec.managed and not is_item:
            # A certificate's key, secret and certificate share name and version (B9).
            bundle["kid"] = spec.kid or f"{self._vault_url}/keys/{name}/{version.version}"
        if spec.tags is not None:
            bundle["tags"] = dict(spec.tags)
        return bundle

    def _deleted_bundle(
        self, found: _DeletedSecret, *, is_item: bool = False
    ) -> dict[str, object]:
        """DeletedSecretBundle / DeletedSecretItem: the recorded DELETE answer's order (B5)."""
        name = found.secret.name
        return {
            "recoveryId": f"{self._vault_url}/deletedsecrets/{name}",
            "deletedDate": found.deleted,
            "scheduledPurgeDate": found.purge_at,
            **self._bundle(
                name,
                found.secret.versions[-1],
                with_value=False,
                versioned_id=not is_item,
                is_item=is_item,
            ),
        }


@dataclass(frozen=True)
class _Call:
    """A routed vault request: path parts (unquoted), query, api-version, token claims."""

    parts: list[str]
    query: dict[str, str]
    api_version: str
    claims: Mapping[str, Any]
    request: _Request


def _ok(value: object) -> _Response:
    return _Response(200, _json_bytes(value))


# --- write bodies (SecretSetParameters, SecretUpdateParameters: REST 7.x) -----------------

_SET_KEYS = frozenset({"value", "contentType", "tags", "attributes"})
_UPDATE_KEYS = _SET_KEYS - {"value"}
_WRITABLE_ATTRIBUTES = frozenset({"enabled", "nbf", "exp"})
# Read-only attributes a client may echo back from a GET; ignored like the service does.
_READ_ONLY_ATTRIBUTES = frozenset(
    {"created", "updated", "recoveryLevel", "recoverableDays"}
)


def _bad_body(message: str) -> _VaultError:
    # The service's wording for malformed bodies is not recorded [unverified].
    return _VaultError(400, "BadParameter", message)


def _json_body(body: bytes | None, *, allowed: frozenset[str]) -> dict[str, Any]:
    """The request's JSON object, checked strictly; raises _VaultError 400/413.

    Rejected: no body, over MAX_REQUEST_BODY_BYTES (413), not UTF-8, not JSON,
    NaN/Infinity, duplicate keys, nesting deep enough to exhaust the parser, a
    top-level value that is not an object, and keys outside ``allowed``. A key
    whose value is null counts as absent.
    """
    if body is None:
        raise _VaultError(
            413,
            "RequestEntityTooLarge",
            f"The request body must be sent with a Content-Length of at most "
            f"{MAX_REQUEST_BODY_BYTES} bytes.",
        )  # [unverified]
    if not body.strip():
        raise _bad_body("The request body is missing.")
    try:
        data = json.loads(
            body.decode("utf-8"),
            object_pairs_hook=_unique_keys,
            parse_constant=_no_constant,
        )
    except (ValueError, RecursionError) as exc:  # JSON and UTF-8 errors are ValueErrors
        raise _bad_body("The request body is not valid JSON.") from exc
    if not isinstance(data, dict):
        raise _bad_body("The request body must be a JSON object.")
    unknown = sorted(key for key in data if key not in allowed)
    if unknown:
        raise _bad_body(f"The request body has an unknown property '{unknown[0]}'.")
    return {key: value for key, value in data.items() if value is not None}


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError("duplicate key")
    return dict(pairs)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _body_text(value: object, what: str, max_chars: int) -> str:
    """A string that can be stored and echoed as UTF-8 (no lone surrogates), bounded."""
    if not isinstance(value, str):
        raise _bad_body(f"The {what} must be a string.")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _bad_body(f"The {what} is not valid Unicode text.") from None
    if len(value) > max_chars:
        raise _bad_body(f"The {what} is longer than {max_chars} characters.")
    return value


def _body_value(value: object) -> str:
    text = _body_text(value, "secret value", KEYVAULT_MAX_VALUE_BYTES)
    if len(text.encode("utf-8")) > KEYVAULT_MAX_VALUE_BYTES:
        raise _bad_body(
            f"The secret value is larger than {KEYVAULT_MAX_VALUE_BYTES} bytes."
        )
    return text


def _apply_body(spec: _VersionSpec, body: Mapping[str, Any]) -> _VersionSpec:
    """Overlay contentType, tags and attributes from a checked body on ``spec``."""
    changes: dict[str, Any] = {}
    if "contentType" in body:
        changes["content_type"] = _body_text(
            body["contentType"], "contentType", MAX_CONTENT_TYPE_CHARS
        )
    if "tags" in body:
        changes["tags"] = _body_tags(body["tags"])
    attributes = body.get("attributes", {})
    if not isinstance(attributes, dict):
        raise _bad_body("The attributes must be a JSON object.")
    unknown = sorted(
        key
        for key in attributes
        if key not in _WRITABLE_ATTRIBUTES | _READ_ONLY_ATTRIBUTES
    )
    if unknown:
        raise _bad_body(f"The attributes have an unknown property '{unknown[0]}'.")
    if attributes.get("enabled") is not None:
        if not isinstance(attributes["enabled"], bool):
            raise _bad_body("The attribute 'enabled' must be true or false.")
        changes["enabled"] = attributes["enabled"]
    for wire, field_name in (("nbf", "not_before"), ("exp", "expires_on")):
        if attributes.get(wire) is not None:
            changes[field_name] = _body_epoch(attributes[wire], wire)
    return dataclasses.replace(spec, **changes)


def _body_tags(value: object) -> dict[str, str]:
    if not isinstance(value, dict):
        raise _bad_body("The tags must be a JSON object of strings.")
    if len(value) > MAX_TAGS:
        raise _bad_body(f"A secret can have at most {MAX_TAGS} tags.")
    return {
        _body_text(key, "tag name", MAX_TAG_CHARS): _body_text(
            item, "tag value", MAX_TAG_CHARS
        )
        for key, item in value.items()
    }


def _body_epoch(value: object, name: str) -> int:
    # Negative dates are accepted: @azure/keyvault-secrets 4.12 sends `(ms / 1000) | 0`,
    # which wraps dates after 2038-01-19 to negative numbers, and the service's answer
    # to them is not recorded [unverified].
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or not -MAX_EPOCH_S <= value <= MAX_EPOCH_S
    ):
        raise _bad_body(f"The attribute '{name}' must be an integer date (epoch seconds).")
    return value


def _check_api_version(api_version: str | None) -> str:
    if not api_version:
        # Real wording unknown (protocol.md B2) [unverified].
        raise _VaultError(
            400, "BadParameter", "The api-version query parameter is missing."
        )
    if not _is_keyvault_api_version(api_version):
        message = KV_BAD_API_VERSION.format(
            version=api_version, latest=KEYVAULT_LATEST_API_VERSION
        )
        raise _VaultError(400, "BadParameter", message)
    return api_version


def _check_max_results(raw: str | None) -> int | None:
    if raw is None:
        return None
    if (
        not re.fullmatch(r"[0-9]{1,9}", raw)
        or not 1 <= int(raw) <= KEYVAULT_MAX_PAGE_SIZE
    ):
        message = f"Invalid maxresults '{raw}'. It must be between 1 and {KEYVAULT_MAX_PAGE_SIZE}."
        raise _VaultError(400, "BadParameter", message)  # [unverified] wording
    return int(raw)


def _encode_skiptoken(cursor: str, gaps: int) -> str:
    """Opaque like the real one: base64 of {"NextMarker": ..., "TargetLocation": 0}.

    ``gaps`` counts the empty pages still to serve before the next items.
    """
    marker = _b64url(f"emulator!{gaps}!{cursor}".encode())
    return _b64url(_json_bytes({"NextMarker": marker, "TargetLocation": 0}))


def _decode_skiptoken(token: str | None, opening_gaps: int) -> tuple[str, int]:
    """(cursor, empty pages to serve first); no token means the start of the list."""
    if token is None:
        return "", opening_gaps
    try:
        outer = json.loads(_b64url_decode(token))
        marker = _b64url_decode(str(outer["NextMarker"])).decode("utf-8")
    except (ValueError, KeyError, TypeError) as exc:
        raise _VaultError(400, "BadParameter", "The skip token is invalid.") from exc
    prefix, _, rest = marker.partition("!")
    gaps, _, cursor = rest.partition("!")
    if prefix != "emulator" or gaps not in {str(n) for n in range(EMPTY_PAGES_BEFORE_FIRST + 1)}:
        raise _VaultError(400, "BadParameter", "The skip token is invalid.")
    return cursor, int(gaps)


def _forbidden_message(
    inner_code: str,
    *,
    claims: Mapping[str, Any],
    vault_name: str,
    secret_name: str,
    client_ip: str,
    issuer: str,
) -> str:
    """Word a 403 as in protocol.md B5, filled in with the caller's token."""
    caller = f"appid={claims.get('appid')};oid={claims.get('oid')};iss={issuer}"
    vault = f"{vault_name};location={KEYVAULT_REGION}"
    if inner_code == "AccessDenied":
        return (
            f"The user, group or application '{caller}' does not have secrets get permission "
            f"on key vault '{vault}'. For help resolving this issue, please see "
            "https://go.microsoft.com/fwlink/?linkid=2125287"
        )
    if inner_code == "ForbiddenByRbac":
        resource = (
            "/subscriptions/00000000-0000-0000-0000-000000000000/resourcegroups/kv-emulator"
            f"/providers/microsoft.keyvault/vaults/{vault_name}/secrets/{secret_name}"
        )
        # The propagation-time line is from memory of real logs [unverified] (B5).
        return (
            "Caller is not authorized to perform action on resource.\r\n"
            "If role assignments, deny assignments or role definitions were changed recently, "
            "please observe propagation time.\r\n"
            f"Caller: {caller}\r\n"
            "Action: 'Microsoft.KeyVault/vaults/secrets/getSecret/action'\r\n"
            f"Resource: '{resource}'\r\n"
            "Assignment: (not found)\r\n"
            "DenyAssignmentId: null\r\n"
            "DecisionReason: 'DeniedWithNoValidRBAC' \r\n"
            f"Vault: {vault}\r\n"
        )
    if inner_code == "ForbiddenByFirewall":
        return (
            "Client address is not authorized and caller is not a trusted service.\r\n"
            f"Client address: {client_ip}\r\nCaller: {caller}\r\nVault: {vault}"
        )
    return f'Operation is not allowed.\r\nOperation: "get"\r\nCaller: {caller}\r\nVault: {vault}'


def _vault_headers(request: _Request, response: _Response) -> list[tuple[str, str]]:
    """Headers every Key Vault response carries (protocol.md B3)."""
    headers = [
        ("Cache-Control", "no-cache"),
        ("Pragma", "no-cache"),
        ("Content-Type", JSON_CONTENT_TYPE),
        ("Expires", "-1"),
        *response.headers,
        ("Strict-Transport-Security", HSTS_VALUE),
        ("X-Content-Type-Options", "nosniff"),
    ]
    client_request_id = request.headers.get("x-ms-client-request-id")
    if client_request_id is not None:
        headers.append(("x-ms-client-request-id", client_request_id))
    headers += [
        (
            "x-ms-keyvault-network-info",
            f"conn_type=Ipv4;addr={request.client_ip};act_addr_fam=InterNetwork;",
        ),
        ("x-ms-keyvault-region", KEYVAULT_REGION),
        ("x-ms-keyvault-service-version", KEYVAULT_SERVICE_VERSION),
        ("x-ms-request-id", str(uuid.uuid4())),
    ]
    return headers


# --- HTTP plumbing ----------------------------------------------------------------------

# (status, headers, body), or None to drop the connection without answering.
_Answer = Optional[tuple[int, list[tuple[str, str]], bytes]]
_Dispatch = Callable[[_Request], _Answer]


class _Handler(http.server.BaseHTTPRequestHandler):
    """Turns HTTP into :class:`_Request` and writes what the dispatcher answers."""

    # Keep-alive: clients reuse connections as they do against Azure.
    protocol_version = "HTTP/1.1"
    timeout = IDLE_TIMEOUT_S
    server: _LoopbackServer

    def _serve(self) -> None:
        body = self._read_body()
        split = urlsplit(self.path)
        request = _Request(
            method=self.command,
            path=split.path,
            query=split.query,
            headers={name.lower(): value for name, value in self.headers.items()},
            client_ip=str(self.client_address[0]),
            body=body,
        )
        answer = self.server.dispatch(request)
        if answer is None:  # injected drop: close without a byte of response
            self.close_connection = True
            return
        status, headers, body = answer
        self.send_response_only(status)
        self.send_header("Date", self.date_time_string())
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _read_body(self) -> bytes | None:
        """The request body, or None when it is chunked, malformed or over the cap.

        Whatever is not read makes the connection close after the answer, or its
        bytes would be parsed as the next request on this keep-alive connection.
        """
        length = self.headers.get("Content-Length", "0")
        if "Transfer-Encoding" in self.headers or not length.isdigit():
            self.close_connection = True
            return None
        size = int(length)
        if size > MAX_REQUEST_BODY_BYTES:
            self.close_connection = True
            if size <= MAX_DISCARDED_BODY_BYTES:
                while size > 0:
                    chunk = self.rfile.read(min(size, 65536))
                    if not chunk:
                        break
                    size -= len(chunk)
            return None
        return self.rfile.read(size) if size > 0 else b""

    do_GET = _serve
    do_HEAD = _serve
    do_POST = _serve
    do_PUT = _serve
    do_PATCH = _serve
    do_DELETE = _serve
    do_OPTIONS = _serve

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s %s", self.address_string(), format % args)


class _LoopbackServer(http.server.ThreadingHTTPServer):
    """A thread-per-connection HTTP(S) server tuned for bursts of keep-alive clients."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = REQUEST_QUEUE_SIZE  # socketserver's 5 loses SYNs under a burst

    def __init__(
        self,
        address: tuple[str, int],
        dispatch: _Dispatch,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.dispatch = dispatch
        self.ssl_context = ssl_context
        self._connections: dict[threading.Thread, socket.socket] = {}
        self._connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls getfqdn(), a reverse DNS lookup; skip it.
        socketserver_bind = super(http.server.HTTPServer, self).server_bind
        socketserver_bind()
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, address = self.socket.accept()
        # Headers and body go out as two writes; without this, Nagle + delayed ACK = 40 ms.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock, address

    def finish_request(
        self,
        request: socket.socket | tuple[bytes, socket.socket],
        client_address: object,
    ) -> None:
        # Runs in the connection's own thread: the TLS handshake happens here, not in
        # the accept loop, so a slow or failed handshake holds up nobody else.
        assert isinstance(request, socket.socket)  # TCP, never a datagram tuple
        connection = request
        if self.ssl_context is not None:
            request.settimeout(HANDSHAKE_TIMEOUT_S)
            connection = self.ssl_context.wrap_socket(request, server_side=True)
        current = threading.current_thread()
        with self._connections_lock:
            self._connections[current] = connection
        try:
            _Handler(connection, client_address, self)
        finally:
            with self._connections_lock:
                self._connections.pop(current, None)
            if connection is not request:
                _close_quietly(connection)

    def handle_error(
        self,
        request: socket.socket | tuple[bytes, socket.socket],
        client_address: object,
    ) -> None:
        # Failed handshakes, resets and dropped clients are normal in fault tests:
        # no traceback on stderr, and the server keeps serving.
        logger.debug(
            "connection from %s ended with an error",
            client_address,
            exc_info=sys.exc_info(),
        )

    def close_connections(self) -> list[threading.Thread]:
        """Cut every open keep-alive connection; returns the threads serving them."""
        with self._connections_lock:
            connections = dict(self._connections)
        for connection in connections.values():
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        return list(connections)


def _close_quietly(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.close()


# --- the emulator -----------------------------------------------------------------------


class Emulator:
    """IMDS and a Key Vault on loopback, with state and faults under test control.

    Use as a context manager or call :meth:`start` / :meth:`stop`. All state
    methods are thread-safe and may be called while requests are in flight.
    ``latency_s`` (seconds added to every request of both services) and
    ``token_lifetime_s`` may be changed at any time. ``clock`` (epoch seconds)
    dates tokens and secrets, so tests can age them without sleeping.
    """

    def __init__(
        self,
        secrets: Mapping[str, Any] | None = None,
        *,
        host: str = "127.0.0.1",
        imds_port: int = 0,
        vault_port: int = 0,
        vault_hostname: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        ca_cert: str | None = None,
        cert_dir: str | None = None,
        latency_s: float = 0.0,
        tenant_id: str = DEFAULT_TENANT_ID,
        identities: IdentityConfig | None = None,
        clock: Callable[[], float] = time.time,
        empty_pages: bool = False,
    ) -> None:
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("tls_cert and tls_key must be given together")
        self.host = host
        self.latency_s = latency_s
        self._empty_pages = empty_pages
        self._imds_port = imds_port
        self._vault_port = vault_port
        self._vault_hostname = vault_hostname
        self._tls_cert = tls_cert
        self._tls_key = tls_key
        self._ca_cert = ca_cert
        self._cert_dir = cert_dir
        self._issuer = _TokenIssuer(tenant_id, identities or IdentityConfig(), clock)
        self._store = _SecretStore(clock)
        self._faults = _FaultQueue()
        self._log_lock = threading.Lock()
        self._logs: dict[str, list[RequestRecord]] = {IMDS: [], VAULT: []}
        self._servers: list[_LoopbackServer] = []
        self._threads: list[threading.Thread] = []
        self._temp_dir: str | None = None
        self._urls: tuple[str, str, str] | None = None  # imds_base, vault_url, ca_path
        self._vault_api: _VaultApi | None = None
        self._imds_api = _ImdsApi(self._issuer)
        for name, versions in _parse_secrets(secrets, "secrets argument").items():
            for spec in versions:
                self._store.add(name, spec)

    # -- lifecycle

    def start(self) -> Self:
        """Bind both servers and serve them from background threads; returns self."""
        if self._servers:
            raise RuntimeError("emulator already started")
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        cert, key, ca_path = self._certificates()
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(cert, key)
        imds = _LoopbackServer((self.host, self._imds_port), self._dispatcher(IMDS))
        self._servers.append(imds)
        vault = _LoopbackServer(
            (self.host, self._vault_port), self._dispatcher(VAULT), context
        )
        self._servers.append(vault)
        vault_host = self._vault_hostname or self.host
        vault_port = vault.server_port
        vault_url = f"https://{vault_host}" + (
            "" if vault_port == 443 else f":{vault_port}"
        )
        self._vault_api = _VaultApi(
            self._store,
            self._issuer,
            vault_url,
            f"https://{vault_host}:{vault_port}",
            vault_host.split(".")[0] if self._vault_hostname else "kv-emulator",
            self._empty_pages,
        )
        self._urls = (f"http://{self.host}:{imds.server_port}", vault_url, ca_path)
        for server, name in ((imds, "imds"), (vault, "vault")):
            thread = threading.Thread(
                target=server.serve_forever,
                kwargs={"poll_interval": 0.05},
                name=f"kv-emulator-{name}",
                daemon=True,
            )
            thread.start()
            self._threads.append(thread)
        logger.debug("emulator serving IMDS at %s and the vault at %s", *self._urls[:2])

    def _certificates(self) -> tuple[str, str, str]:
        """(server cert, server key, CA path): the given files, or freshly generated ones."""
        if self._tls_cert is not None and self._tls_key is not None:
            return self._tls_cert, self._tls_key, self._ca_cert or self._tls_cert
        directory = self._cert_dir
        if directory is None:
            directory = self._temp_dir = tempfile.mkdtemp(prefix="kv-agent-emulator-")
        hostnames = [name for name in (self._vault_hostname, self.host) if name]
        paths = generate_certificates(directory, hostnames=hostnames)
        return paths.server_cert, paths.server_key, paths.ca_cert

    def stop(self) -> None:
        """Stop serving, cut open connections and remove generated certificates. Idempotent."""
        for server, thread in zip(self._servers, self._threads):
            server.shutdown()  # only valid while serve_forever runs, hence the zip
            thread.join(STOP_JOIN_TIMEOUT_S)
        handlers: list[threading.Thread] = []
        for server in self._servers:
            server.server_close()
            handlers += server.close_connections()
        deadline = time.monotonic() + STOP_JOIN_TIMEOUT_S
        for handler in handlers:
            handler.join(max(0.0, deadline - time.monotonic()))
        self._servers = []
        self._threads = []
        self._urls = None
        self._vault_api = None
        if self._temp_dir is not None:
            shutil.rmtree(self._temp_dir, ignore_errors=True)
            self._temp_dir = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- addresses

    def _started_urls(self) -> tuple[str, str, str]:
        if self._urls is None:
            raise RuntimeError("emulator not started")
        return self._urls

    @property
    def imds_base(self) -> str:
        """``http://host:port``, the form AZURE_POD_IDENTITY_AUTHORITY_HOST takes."""
        return self._started_urls()[0]

    @property
    def imds_endpoint(self) -> str:
        """The full token URL, the form KV_AGENT_IMDS_ENDPOINT takes."""
        return self.imds_base + IMDS_TOKEN_PATH

    @property
    def vault_url(self) -> str:
        """``https://host:port`` (no port when 443), as used in secret ids."""
        return self._started_urls()[1]

    @property
    def ca_path(self) -> str:
        """PEM of the CA that signed the vault's certificate (for REQUESTS_CA_BUNDLE)."""
        return self._started_urls()[2]

    @property
    def empty_pages(self) -> bool:
        """Whether lists open with empty pages that carry a nextLink, as Azure's may (B4).

        Off by default; on, every list starts with EMPTY_PAGES_BEFORE_FIRST pages
        ``{"value":[],"nextLink":"..."}``, every page with items has a nextLink and
        the last page is ``{"value":[],"nextLink":null}``, as in the recording
        ``keyvault__js__recording_can_list_secrets_by_page.json``. A client that
        stops at the first empty page then fails here rather than in Azure.
        """
        return self._empty_pages

    @empty_pages.setter
    def empty_pages(self, enabled: bool) -> None:
        self._empty_pages = enabled
        if self._vault_api is not None:
            self._vault_api.empty_pages = enabled

    @property
    def tenant_id(self) -> str:
        """Tenant in token claims and in the vault's 401 challenge."""
        return self._issuer.tenant_id

    @property
    def token_lifetime_s(self) -> int:
        """Lifetime of newly minted tokens; real managed-identity tokens live about 24 h."""
        return self._issuer.lifetime_s

    @token_lifetime_s.setter
    def token_lifetime_s(self, seconds: int) -> None:
        self._issuer.lifetime_s = seconds

    # -- state

    def set_secret(
        self,
        name: str,
        value: str,
        *,
        enabled: bool = True,
        content_type: str | None = None,
        tags: dict[str, str] | None = None,
        not_before: int | None = None,
        expires_on: int | None = None,
    ) -> str:
        """Add a new version of ``name`` (created if missing); returns its 32-hex version id.

        Raises LookupError while ``name`` is soft-deleted (through the REST API),
        as the service answers 409 then.
        """
        _check_name(name, "set_secret")
        spec = _VersionSpec(
            _check_value(value, f"set_secret {name!r}"),
            enabled,
            content_type,
            dict(tags) if tags is not None else None,
            not_before,
            expires_on,
        )
        return self._store.add(name, spec)

    def disable_secret(self, name: str, version: str | None = None) -> None:
        """Disable a version (the latest when None); GET then answers 403 SecretDisabled."""
        self._store.set_enabled(name, version, False)

    def enable_secret(self, name: str, version: str | None = None) -> None:
        """Undo :meth:`disable_secret`."""
        self._store.set_enabled(name, version, True)

    def delete_secret(self, name: str) -> None:
        """Remove a secret and all its versions at once (a delete plus a purge, no soft-deleted
        copy); raises KeyError when there is none. ``DELETE /secrets/<name>`` soft-deletes."""
        self._store.delete(name)

    def forbid_secret(self, name: str, inner_code: str = "AccessDenied") -> None:
        """Make GET of ``name`` (existing or not) answer 403 with that innererror code.

        ``inner_code`` is one of AccessDenied (access-policy vault), ForbiddenByRbac,
        ForbiddenByFirewall or ForbiddenByPolicy; messages follow protocol.md B5.
        """
        if inner_code not in FORBIDDEN_INNER_CODES:
            raise ValueError(
                f"inner_code must be one of {', '.join(FORBIDDEN_INNER_CODES)}"
            )
        self._store.forbid(name, inner_code)

    def allow_secret(self, name: str) -> None:
        """Undo :meth:`forbid_secret`."""
        self._store.forbid(name, None)

    def clear_token_cache(self) -> None:
        """Forget IMDS's cached tokens, so the next request mints a new one."""
        self._issuer.clear_cache()

    # -- faults

    def inject_fault(
        self,
        service: str,
        status: int | None = None,
        *,
        count: int = 1,
        retry_after: str | None = None,
        drop: bool = False,
        delay_s: float = 0.0,
        path_contains: str | None = None,
        body: bytes | None = None,
    ) -> None:
        """Queue a fault for the next ``count`` requests to ``service`` ("imds" or "vault").

        A matching request first waits ``delay_s``; then ``drop=True`` closes the
        connection without a response, a ``status`` answers with that status and
        the service's realistic error body (or ``body``), plus ``Retry-After``
        when given; with neither it is answered normally (a slow response).
        ``path_contains`` restricts the fault to request paths containing it.
        Faults are used first-in first-out and apply before authentication.
        """
        if service not in SERVICES:
            raise ValueError(f"service must be 'imds' or 'vault', not {service!r}")
        if count < 1:
            raise ValueError("count must be at least 1")
        if status is not None and status < 400 and body is None:
            raise ValueError("a non-error status needs an explicit body")
        if status is None and not drop and delay_s <= 0:
            raise ValueError("a fault needs a status, drop=True or a delay_s")
        self._faults.add(
            _Fault(
                service, status, count, retry_after, drop, delay_s, path_contains, body
            )
        )

    def clear_faults(self) -> None:
        """Forget every queued fault."""
        self._faults.clear()

    # -- stats

    @property
    def imds_requests(self) -> int:
        """Requests IMDS answered or dropped since start or :meth:`reset_stats`."""
        with self._log_lock:
            return len(self._logs[IMDS])

    @property
    def vault_requests(self) -> int:
        """Requests the vault answered or dropped since start or :meth:`reset_stats`."""
        with self._log_lock:
            return len(self._logs[VAULT])

    @property
    def imds_log(self) -> list[RequestRecord]:
        """A copy of IMDS's request log, oldest first."""
        with self._log_lock:
            return list(self._logs[IMDS])

    @property
    def vault_log(self) -> list[RequestRecord]:
        """A copy of the vault's request log, oldest first."""
        with self._log_lock:
            return list(self._logs[VAULT])

    def reset_stats(self) -> None:
        """Empty both request logs (and so the request counters)."""
        with self._log_lock:
            for log in self._logs.values():
                log.clear()

    # -- request processing

    def _dispatcher(self, service: str) -> _Dispatch:
        def dispatch(request: _Request) -> _Answer:
            return self._process(service, request)

        return dispatch

    def _process(self, service: str, request: _Request) -> _Answer:
        """Latency, then a queued fault or the service's answer; records the outcome."""
        latency = self.latency_s
        if latency > 0:
            # Slept in this connection's thread: concurrent requests overlap.
            time.sleep(latency)
        fault = self._faults.take(service, request.path)
        if fault is not None and fault.delay_s > 0:
            time.sleep(fault.delay_s)
        if fault is not None and fault.drop:
            self._record(service, request, 0)
            return None
        if fault is not None and fault.status is not None:
            response = _fault_response(service, fault, self._issuer.tenant_id)
        else:
            response = self._answer(service, request)
        is_imds = service == IMDS
        headers = (
            _imds_headers(response) if is_imds else _vault_headers(request, response)
        )
        self._record(service, request, response.status)
        return response.status, headers, response.body

    def _answer(self, service: str, request: _Request) -> _Response:
        try:
            if service == IMDS:
                return self._imds_api.handle(request)
            assert self._vault_api is not None
            return self._vault_api.handle(request)
        except Exception:  # an emulator bug must not look like a network failure
            logger.debug(
                "error answering %s %s", request.method, request.path, exc_info=True
            )
            if service == IMDS:
                return _imds_error(500, "unknown", "Emulator internal error")
            body = _keyvault_error_body(
                "InternalServerError", "Emulator internal error"
            )
            return _Response(500, body)

    def _record(self, service: str, request: _Request, status: int) -> None:
        record = RequestRecord(
            method=request.method,
            path=request.path,
            query=dict(parse_qsl(request.query, keep_blank_values=True)),
            headers=dict(request.headers),
            status=status,
        )
        with self._log_lock:
            self._logs[service].append(record)
