"""The Key Vault secrets data plane (protocol.md B1-B10): authentication first, then routing.

Get, list (with paging and optional opening empty pages, B4), and the writes
the official SDKs make (SetSecret, UpdateSecret, DeleteSecret with soft delete,
deleted-secret get/list/recover/purge), shaped like the recorded exchanges.
Write bodies are bounded and validated as the service does (B7).

Certificates (B9): an issued certificate's secret is also served as a
certificate (get, versions, list, policy) and can be created again through
``POST /certificates/<name>/create``, answered the way the SDKs' pollers
expect: 202 ``inProgress``, then ``GET .../pending`` says ``completed``.
"""

from __future__ import annotations

import dataclasses
import json
import re
import threading
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, quote, unquote

from agent.emulator.certificate_wire import (
    CERTIFICATE_NOT_FOUND,
    CREATE_RETRY_AFTER_S,
    PENDING_NOT_FOUND,
    CreateRequest,
    certificate_bundle,
    certificate_item,
    operation_body,
    policy_body,
    policy_fields,
)
from agent.emulator.certificates import PEM, PKCS12, CertificateSpec, pkcs12_to_pem
from agent.emulator.secrets_file import VersionSpec
from agent.emulator.store import DeletedConflictError, DeletedSecret, SecretStore, Version
from agent.emulator.tokens import TokenIssuer, TokenRejectedError
from agent.emulator.wire import (
    EMPTY_PAGES_BEFORE_FIRST,
    HSTS_VALUE,
    JSON_CONTENT_TYPE,
    KEYVAULT_LATEST_API_VERSION,
    KEYVAULT_MAX_PAGE_SIZE,
    KEYVAULT_MAX_VALUE_BYTES,
    KEYVAULT_RECOVERABLE_DAYS,
    KEYVAULT_RECOVERY_LEVEL,
    KEYVAULT_REGION,
    KEYVAULT_SERVICE_VERSION,
    KV_BAD_API_VERSION,
    KV_DELETED_CONFLICT,
    KV_DELETED_NOT_FOUND,
    KV_DISABLED,
    KV_INVALID_NAME,
    KV_MISSING_TOKEN,
    KV_NOT_FOUND,
    MAX_CONTENT_TYPE_CHARS,
    MAX_EPOCH_S,
    MAX_REQUEST_BODY_BYTES,
    MAX_TAG_CHARS,
    MAX_TAGS,
    SECRET_NAME_RE,
    SECRET_VERSION_RE,
    Request,
    Response,
    b64url,
    b64url_decode,
    challenge_header,
    has_out_content_type,
    is_keyvault_api_version,
    json_bytes,
    keyvault_error_body,
)


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




class VaultApi:
    """The secrets data plane (protocol.md B1-B6, B10): auth first, then routing."""

    def __init__(
        self,
        store: SecretStore,
        issuer: TokenIssuer,
        vault_url: str,
        link_base: str,
        vault_name: str,
        empty_pages: bool,
        *,
        create_certificate: Callable[[str, CreateRequest], str | None] = (
            lambda name, request: None),
        certificate_policy: Callable[[str], CertificateSpec | None] = lambda name: None,
    ) -> None:
        self.empty_pages = empty_pages
        # Issues a certificate (new key) and returns the new version; None when
        # no certificate has that name and the request names no policy.
        self._create_certificate_version = create_certificate
        self._certificate_policy = certificate_policy
        # The last create of each certificate (lower-case name -> request id),
        # for GET .../pending; the emulator has finished it by the time it answers.
        self._operations: dict[str, str] = {}
        self._operations_lock = threading.Lock()
        self._store = store
        self._issuer = issuer
        self._vault_url = vault_url
        self.link_base = link_base  # nextLink always carries the port, even :443 (B4)
        self._vault_name = vault_name

    def handle(self, request: Request) -> Response:
        try:
            claims = self._authenticate(request.headers.get("authorization", ""))
            return self._route(request, claims)
        except _VaultError as exc:
            body = keyvault_error_body(exc.code, exc.message, exc.inner_code)
            return Response(exc.status, body, exc.headers)

    def _authenticate(self, authorization: str) -> dict[str, Any]:
        scheme, _, token = authorization.strip().partition(" ")
        try:
            if scheme.lower() != "bearer" or not token.strip():
                raise TokenRejectedError(KV_MISSING_TOKEN)
            return self._issuer.verify(token.strip(), self._issuer.clock())
        except TokenRejectedError as exc:
            challenge = (challenge_header(self._issuer.tenant_id),)
            raise _VaultError(401, "Unauthorized", str(exc), headers=challenge) from exc

    def _route(self, request: Request, claims: Mapping[str, Any]) -> Response:
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
    ) -> Callable[[_Call], Response]:
        """The handler for a path and method: 404 for an unknown path, 405 for a method."""
        collection = parts[0] if parts else ""
        if collection == "secrets" and len(parts) == 3 and parts[2] == "versions":
            shape = "versions"
        elif collection == "deletedsecrets" and len(parts) == 3 and parts[2] == "recover":
            shape = "recover"
        elif collection == "certificates" and len(parts) == 3 and parts[2] in (
                "create", "pending", "policy", "versions"):
            shape = parts[2]
        else:
            shape = f"{len(parts)}"
        methods: Mapping[str, Callable[[_Call], Response]] = {
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
            ("certificates", "create"): {"POST": self._create_certificate},
            ("certificates", "pending"): {"GET": self._get_certificate_operation},
            ("certificates", "policy"): {"GET": self._get_certificate_policy},
            ("certificates", "versions"): {"GET": self._list_certificate_versions},
            ("certificates", "1"): {"GET": self._list_certificates},
            ("certificates", "2"): {"GET": self._get_certificate},
            ("certificates", "3"): {"GET": self._get_certificate},
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

    def _get(self, call: _Call) -> Response:
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
        wanted = call.query.get("outContentType")
        if wanted is not None and has_out_content_type(call.api_version):
            stored = _converted(stored, wanted)
        return _ok(self._bundle(stored_name, stored, with_value=True))

    def _find(self, name: str, version: str | None) -> tuple[str, Version]:
        """A live version, or the recorded 404 SecretNotFound (B5)."""
        found = None
        if version is None or SECRET_VERSION_RE.match(version):
            found = self._store.get(name, version)
        if found is None:
            label = name if version is None else f"{name}/{version}"
            raise _VaultError(404, "SecretNotFound", KV_NOT_FOUND.format(name=label))
        return found

    def _list_secrets(self, call: _Call) -> Response:
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

    def _list_versions(self, call: _Call) -> Response:
        name = call.parts[1]
        entries = [
            (
                f"{version.seq:012d}",
                self._bundle(stored, version, with_value=False, is_item=True),
            )
            for stored, version in self._store.versions(name)
        ]
        return self._page(call, f"/secrets/{quote(name)}/versions", entries)

    def _list_deleted(self, call: _Call) -> Response:
        entries = [
            (found.secret.name.upper(), self._deleted_bundle(found, is_item=True))
            for found in self._store.all_deleted()
        ]
        return self._page(call, "/deletedsecrets", sorted(entries, key=lambda e: e[0]))

    def _get_deleted(self, call: _Call) -> Response:
        return _ok(self._deleted_bundle(self._deleted(call.parts[1])))

    def _deleted(self, name: str) -> DeletedSecret:
        found = self._store.deleted(name)
        if found is None:
            message = KV_DELETED_NOT_FOUND.format(name=name)
            raise _VaultError(404, "SecretNotFound", message)
        return found

    # -- writes (SetSecret, UpdateSecret, DeleteSecret, Recover, Purge: REST 7.x)

    def _set(self, call: _Call) -> Response:
        """PUT /secrets/<name>: a new version; 409 while the name is soft-deleted."""
        body = _json_body(call.request.body, allowed=_SET_KEYS)
        if "value" not in body:
            raise _VaultError(400, "BadParameter", "The secret value is missing.")
        spec = _apply_body(VersionSpec(_body_value(body["value"])), body)
        name = call.parts[1]
        try:
            version = self._store.add(name, spec)
        except DeletedConflictError:
            message = KV_DELETED_CONFLICT.format(name=name)
            raise _VaultError(
                409, "Conflict", message, "ObjectIsDeletedButRecoverable"
            ) from None
        stored_name, stored = self._find(name, version)
        return _ok(self._bundle(stored_name, stored, with_value=True))

    def _update(self, call: _Call) -> Response:
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

    def _delete(self, call: _Call) -> Response:
        """DELETE /secrets/<name>: soft delete, answered with the DeletedSecretBundle (B5)."""
        name = call.parts[1]
        found = self._store.soft_delete(name)
        if found is None:
            self._find(name, None)  # raises the 404
        assert found is not None
        return _ok(self._deleted_bundle(found))

    def _recover(self, call: _Call) -> Response:
        """POST /deletedsecrets/<name>/recover: every version back, the latest's bundle."""
        name = call.parts[1]
        found = self._store.recover(name)
        if found is None:
            self._deleted(name)  # raises the 404
        assert found is not None
        return _ok(self._bundle(*found, with_value=False))  # [unverified: no value]

    def _purge(self, call: _Call) -> Response:
        """DELETE /deletedsecrets/<name>: gone for good, 204 with no body."""
        name = call.parts[1]
        if not self._store.purge(name):
            self._deleted(name)  # raises the 404
        return Response(204, b"")

    # -- certificates (B9): the SDKs' CertificateClient reads and create

    def _create_certificate(self, call: _Call) -> Response:
        """POST /certificates/<name>/create: issue a new version (new key).

        With a ``policy`` the certificate is issued under it (a new name becomes
        a certificate; an existing one takes the new policy); without one an
        existing certificate is issued again under its own. Key Vault answers
        202 with an ``inProgress`` operation and issues in the background; the
        emulator issues before it answers, but says ``inProgress`` all the
        same, so the SDKs' pollers ask ``GET .../pending`` (now ``completed``)
        and then get the certificate, as they do against Azure (a ``completed``
        202 made azure-keyvault-certificates' ``result()`` return None).
        """
        name = call.parts[1]
        request = _create_request(call.request.body)
        if request.fields is not None and self._certificate_policy(name) is None and (
                self._store.get(name, None) is not None):
            raise _VaultError(409, "Conflict", f"A secret named {name} exists and is "
                              "not a certificate.")  # [unverified]
        try:
            version = self._create_certificate_version(name, request)
        except DeletedConflictError:
            raise _VaultError(409, "Conflict", KV_DELETED_CONFLICT.format(name=name),
                              "ObjectIsDeletedButRecoverable") from None
        except ValueError as exc:
            raise _bad_body(str(exc)) from None
        if version is None:
            raise _VaultError(404, "CertificateNotFound", CERTIFICATE_NOT_FOUND.format(name=name))
        request_id = uuid.uuid4().hex
        with self._operations_lock:
            self._operations[name.lower()] = request_id
        stored_name = self._certificate(name, None)[0]
        pending = (f"{self._vault_url}/certificates/{quote(stored_name)}/pending?api-version="
                   f"{quote(call.api_version, safe='.-')}&request_id={request_id}")
        body = operation_body(self._vault_url, stored_name, request_id, is_done=False)
        return Response(202, json_bytes(body), (("Location", pending),
                                                ("Retry-After", CREATE_RETRY_AFTER_S)))

    def _get_certificate_operation(self, call: _Call) -> Response:
        """GET /certificates/<name>/pending: the last create, ``completed``; a
        ``request_id`` that is not that create's filters it out (404, B9 doc)."""
        name = call.parts[1]
        with self._operations_lock:
            request_id = self._operations.get(name.lower())
        wanted = call.query.get("request_id")
        if request_id is None or (wanted is not None and wanted != request_id):
            raise _VaultError(404, "PendingCertificateNotFound",
                              PENDING_NOT_FOUND.format(name=name))
        stored_name = self._certificate(name, None)[0]
        return _ok(operation_body(self._vault_url, stored_name, request_id, is_done=True))

    def _get_certificate(self, call: _Call) -> Response:
        """GET /certificates/<name>[/<version>]: a CertificateBundle with the
        policy. A disabled certificate is still read (its attributes say so)."""
        name = call.parts[1]
        version = call.parts[2] if len(call.parts) == 3 else None
        stored_name, stored = self._certificate(name, version)
        assert stored.spec.cer is not None
        with self._operations_lock:
            has_pending = name.lower() in self._operations
        return _ok(certificate_bundle(
            self._vault_url, stored_name, stored.version, stored.spec.cer,
            _attributes(stored), stored.spec.tags, self._policy_body(stored_name),
            has_pending))

    def _get_certificate_policy(self, call: _Call) -> Response:
        name = self._certificate(call.parts[1], None)[0]
        policy = self._policy_body(name)
        if policy is None:  # issued outside the emulator's own policies
            raise _VaultError(404, "CertificateNotFound", CERTIFICATE_NOT_FOUND.format(name=name))
        return _ok(policy)

    def _list_certificates(self, call: _Call) -> Response:
        entries = [
            (name.upper(), certificate_item(self._vault_url, name, None, version.spec.cer,
                                            _attributes(version), version.spec.tags))
            for name, version in self._store.latest_of_all() if version.spec.cer is not None
        ]
        return self._page(call, "/certificates", entries)

    def _list_certificate_versions(self, call: _Call) -> Response:
        name = call.parts[1]
        entries = [
            (f"{version.seq:012d}",
             certificate_item(self._vault_url, stored, version.version, version.spec.cer,
                              _attributes(version), version.spec.tags))
            for stored, version in self._store.versions(name) if version.spec.cer is not None
        ]
        return self._page(call, f"/certificates/{quote(name)}/versions", entries)

    def _certificate(self, name: str, version: str | None) -> tuple[str, Version]:
        """A version that holds a certificate, or 404 CertificateNotFound."""
        found = None
        if version is None or SECRET_VERSION_RE.match(version):
            found = self._store.get(name, version)
        if found is None or found[1].spec.cer is None:
            label = name if version is None else f"{name}/{version}"
            raise _VaultError(404, "CertificateNotFound", CERTIFICATE_NOT_FOUND.format(name=label))
        return found

    def _policy_body(self, name: str) -> dict[str, object] | None:
        """The policy ``name`` is issued under, dated by its first and last issue."""
        spec = self._certificate_policy(name)
        issued = [version for _, version in self._store.versions(name) if version.spec.cer]
        if spec is None or not issued:
            return None
        return policy_body(name, spec, f"{self._vault_url}/certificates/{name}/policy",
                           issued[0].created, issued[-1].created)

    # -- paging and bodies

    def _page(
        self, call: _Call, path: str, entries: list[tuple[str, dict[str, object]]]
    ) -> Response:
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
                f"{self.link_base}{path}?api-version={quote(call.api_version, safe='.-')}"
                f"&$skiptoken={_encode_skiptoken(*link_state)}"
            )
            if max_results is not None:
                next_link += f"&maxresults={max_results}"
        return _ok({"value": values, "nextLink": next_link})

    def _bundle(
        self,
        name: str,
        version: Version,
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
        bundle["attributes"] = _attributes(version)
        if spec.managed and not is_item:
            # A certificate's key, secret and certificate share name and version (B9).
            bundle["kid"] = spec.kid or f"{self._vault_url}/keys/{name}/{version.version}"
        if spec.tags is not None:
            bundle["tags"] = dict(spec.tags)
        return bundle

    def _deleted_bundle(
        self, found: DeletedSecret, *, is_item: bool = False
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
    request: Request


def _attributes(version: Version) -> dict[str, object]:
    """A version's attributes in the wire's key order (B3); a certificate's too."""
    spec = version.spec
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
    return attributes


def _create_request(body: bytes | None) -> CreateRequest:
    """A create's body (it may be empty: issue again under the current policy)."""
    if body is not None and not body.strip():
        return CreateRequest()
    data = _json_body(body, allowed=_CREATE_CERTIFICATE_KEYS)
    try:
        fields = policy_fields(data["policy"]) if "policy" in data else None
    except ValueError as exc:
        raise _bad_body(str(exc)) from None
    changes = _apply_body(VersionSpec(""), {key: data[key] for key in ("attributes", "tags")
                                             if key in data})
    enabled = data.get("attributes", {}).get("enabled") if isinstance(
        data.get("attributes"), dict) else None
    return CreateRequest(fields, enabled, changes.tags)


def _converted(stored: Version, wanted: str) -> Version:
    """``stored`` as ``outContentType=wanted`` asks (protocol.md B3, B9).

    A certificate's PKCS#12 is converted to PEM (key, leaf, chain); a value
    already in the wanted form is served as stored. "Currently, only PFX to
    PEM conversion is supported. If an unsupported format is specified, the
    request is rejected" (the SDKs' generated docs): another type, or PEM to
    PKCS#12, is a 400 [unverified body]. A secret that is no certificate is
    served as stored [unverified].
    """
    if wanted not in (PEM, PKCS12):
        raise _bad_body(f"The outContentType '{wanted}' is not supported; use {PEM}.")
    spec = stored.spec
    if not spec.managed or spec.content_type == wanted:
        return stored
    if spec.content_type != PKCS12:
        raise _bad_body(f"Conversion from {spec.content_type} to {wanted} is not supported.")
    try:
        value = pkcs12_to_pem(spec.value)
    except ValueError as exc:
        raise _bad_body(f"The certificate cannot be converted to {wanted}.") from exc
    return dataclasses.replace(
        stored, spec=dataclasses.replace(spec, value=value, content_type=PEM)
    )


def _ok(value: object) -> Response:
    return Response(200, json_bytes(value))



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


# CreateCertificate's body (REST 7.x); preserveCertOrder is accepted and has no effect.
_CREATE_CERTIFICATE_KEYS = frozenset({"policy", "attributes", "tags", "preserveCertOrder"})


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


def _apply_body(spec: VersionSpec, body: Mapping[str, Any]) -> VersionSpec:
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
    if not is_keyvault_api_version(api_version):
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
    marker = b64url(f"emulator!{gaps}!{cursor}".encode())
    return b64url(json_bytes({"NextMarker": marker, "TargetLocation": 0}))


def _decode_skiptoken(token: str | None, opening_gaps: int) -> tuple[str, int]:
    """(cursor, empty pages to serve first); no token means the start of the list."""
    if token is None:
        return "", opening_gaps
    try:
        outer = json.loads(b64url_decode(token))
        marker = b64url_decode(str(outer["NextMarker"])).decode("utf-8")
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


def vault_headers(request: Request, response: Response) -> list[tuple[str, str]]:
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
