"""The emulator's secrets: the YAML secrets file and the ``secrets`` argument, validated.

The emulator checks names and values itself (``SECRET_NAME_RE`` in :mod:`.wire`),
independently of the agent's manifest parser: it stands in for Key Vault, so it
refuses what Key Vault refuses, whatever the agent believes. Every problem is a
``ValueError`` with one line naming the file (or argument) and the key.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from agent.emulator.certificates import KEY_TYPES, PEM_ORDERS, CertificateSpec
from agent.emulator.wire import (
    CERTIFICATE_CONTENT_TYPES,
    DEFAULT_SYSTEM_CLIENT_ID,
    DEFAULT_SYSTEM_OBJECT_ID,
    DEFAULT_UAMI_RESOURCE_PREFIX,
    GUID_RE,
    SECRET_NAME_RE,
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
        "value_base64",
        "not_before_in_days",
        "expires_in_days",
    }
)
_VERSION_KEYS = _SECRET_KEYS - {"versions"}
# A certificate-backed secret is declared by its policy, not by a value (see load_emulator_file).
_CERTIFICATE_KEYS = frozenset(
    {
        "key_type",
        "content_type",
        "pem_order",
        "exportable",
        "include_root",
        "sans",
        "validity_days",
        "valid_from_days",
    }
)
# Secret-level keys that may sit beside ``certificate:`` (the rest come from the certificate).
_WITH_CERTIFICATE_KEYS = frozenset({"certificate", "enabled", "tags"})
_SECONDS_PER_DAY = 86400
_MAX_DAYS = 36500
# The structured secrets file: its top level holds only these keys (see load_emulator_file).
_FILE_KEYS = frozenset({"secrets", "identities"})
_IDENTITIES_KEYS = frozenset({"system_assigned", "user_assigned"})
_USER_ASSIGNED_KEYS = frozenset({"client_id", "object_id", "msi_res_id"})




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
class VersionSpec:
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
    # Declared certificates: the emulator issues the value (and nbf/exp) when it stores it.
    certificate: CertificateSpec | None = None
    # An issued certificate's leaf (DER), for the certificates views (GET /certificates).
    cer: bytes | None = None




def _type_name(value: object) -> str:
    return "null" if value is None else type(value).__name__


def check_name(name: object, where: str) -> str:
    if not isinstance(name, str) or not SECRET_NAME_RE.match(name):
        raise ValueError(
            f"{where}: invalid secret name {name!r} (use only 0-9, a-z, A-Z and -)"
        )
    return name


def check_value(value: object, where: str) -> str:
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


def _check_days(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(  # noqa: TRY004 - bad input, not a caller bug
            f"{where}: must be a whole number of days, got {_type_name(value)}"
        )
    if abs(value) > _MAX_DAYS:
        # Dates past year 9999 fit neither X.509 nor Python's datetime.
        raise ValueError(f"{where}: must be within {_MAX_DAYS} days of now")
    return value


def _entry_value(entry: Mapping[Any, Any], where: str) -> str | None:
    """``value``, or ``value_base64`` checked as standard base64 and kept as that text.

    Key Vault stores text only; binary content (a licence file, a keytab) is
    uploaded as its base64 text, so the emulator serves exactly that text
    (whitespace from YAML line folding removed). ``content_type`` is left to the
    file: Key Vault attaches no meaning to it.
    """
    if "value" in entry and "value_base64" in entry:
        raise ValueError(f"{where}: give value or value_base64, not both")
    if "value_base64" not in entry:
        return check_value(entry["value"], where) if "value" in entry else None
    text = "".join(check_value(entry["value_base64"], f"{where}: value_base64").split())
    try:
        base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(
            f"{where}: value_base64 is not standard base64 (A-Z a-z 0-9 + / with = padding)"
        ) from None
    return text


def _check_tags(value: object, where: str) -> dict[str, str]:
    if not isinstance(value, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ValueError(f"{where}: tags must be a mapping of strings to strings")
    return dict(value)


def _parse_attributes(
    data: Mapping[Any, Any], base: VersionSpec, where: str, now: float
) -> VersionSpec:
    """Overlay the attributes present in ``data`` on ``base`` (value untouched).

    ``not_before_in_days``/``expires_in_days`` are days from ``now`` (negative: in
    the past), so a file can say "expired yesterday" without a stale epoch.
    """
    changes: dict[str, Any] = {}
    for relative, absolute in (
        ("not_before_in_days", "not_before"),
        ("expires_in_days", "expires_on"),
    ):
        if relative in data:
            if absolute in data:
                raise ValueError(f"{where}: give {absolute} or {relative}, not both")
            days = _check_days(data[relative], f"{where}: {relative}")
            changes[absolute] = int(now) + days * _SECONDS_PER_DAY
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


def _check_certificate(spec: VersionSpec, where: str) -> VersionSpec:
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


def _parse_version(
    entry: object, defaults: VersionSpec, where: str, now: float
) -> VersionSpec:
    if isinstance(entry, str):
        return dataclasses.replace(defaults, value=entry)
    if _is_unquoted_scalar(entry):
        check_value(entry, where)  # raises, with the "quote it" hint
    if not isinstance(entry, Mapping):
        raise ValueError(  # noqa: TRY004 - bad input, not a caller bug
            f"{where}: must be a string or a mapping, got {_type_name(entry)}"
        )
    _check_keys(entry, _VERSION_KEYS, where)
    value = _entry_value(entry, where)
    if value is None:
        raise ValueError(f"{where}: missing 'value'")
    spec = _parse_attributes(entry, defaults, where, now)
    return _check_certificate(dataclasses.replace(spec, value=value), where)


def _parse_secret(spec: object, where: str, now: float) -> list[VersionSpec]:
    """One secret's versions, oldest first.

    Secret-level attributes are defaults for every version; ``versions`` lists
    older values and ``value``, when present, becomes the latest.
    """
    if isinstance(spec, str):
        return [VersionSpec(spec)]
    if _is_unquoted_scalar(spec):
        check_value(spec, where)  # raises, with the "quote it" hint
    if not isinstance(spec, Mapping):
        raise ValueError(  # noqa: TRY004 - bad input, not a caller bug
            f"{where}: must be a string or a mapping, got {_type_name(spec)}"
        )
    if "certificate" in spec:
        return [_parse_certificate_secret(spec, where)]
    _check_keys(spec, _SECRET_KEYS | {"certificate"}, where)
    defaults = _parse_attributes(spec, VersionSpec(""), where, now)
    versions = spec.get("versions", [])
    if not isinstance(versions, list):
        raise ValueError(  # noqa: TRY004 - bad input, not a caller bug
            f"{where}: versions must be a list, got {_type_name(versions)}"
        )
    result = [
        _parse_version(entry, defaults, f"{where}: versions[{index}]", now)
        for index, entry in enumerate(versions)
    ]
    value = _entry_value(spec, where)
    if value is not None:
        latest = dataclasses.replace(defaults, value=value)
        result.append(_check_certificate(latest, where))
    if not result:
        raise ValueError(f"{where}: needs a 'value' or a non-empty 'versions' list")
    return result


def _parse_certificate_secret(spec: Mapping[Any, Any], where: str) -> VersionSpec:
    """A secret declared by its certificate policy; the emulator issues its value."""
    _check_keys(spec, _WITH_CERTIFICATE_KEYS, f"{where} (with certificate)")
    base = _parse_attributes(spec, VersionSpec(""), where, 0.0)
    certificate = parse_certificate(spec["certificate"], f"{where}: certificate")
    return dataclasses.replace(
        base, content_type=certificate.content_type, managed=True, certificate=certificate
    )


def parse_certificate(data: object, where: str) -> CertificateSpec:
    """A ``certificate:`` mapping (see load_emulator_file); empty or null takes every default."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ValueError(f"{where}: expected a mapping, got {_type_name(data)}")  # noqa: TRY004
    _check_keys(data, _CERTIFICATE_KEYS, where)
    changes: dict[str, Any] = {}
    for key, choices in (
        ("key_type", KEY_TYPES),
        ("content_type", CERTIFICATE_CONTENT_TYPES),
        ("pem_order", PEM_ORDERS),
    ):
        if key in data:
            if data[key] not in choices:
                raise ValueError(f"{where}: {key} must be one of {', '.join(choices)}")
            changes[key] = data[key]
    for key in ("exportable", "include_root"):
        if key in data:
            if not isinstance(data[key], bool):
                raise ValueError(f"{where}: {key} must be true or false")
            changes[key] = data[key]
    for key in ("validity_days", "valid_from_days"):
        if key in data:
            changes[key] = _check_days(data[key], f"{where}: {key}")
    if changes.get("validity_days", 1) < 1:
        raise ValueError(f"{where}: validity_days must be at least 1")
    if "sans" in data:
        changes["sans"] = _check_sans(data["sans"], f"{where}: sans")
    return dataclasses.replace(CertificateSpec(), **changes)


def _check_sans(value: object, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(
        isinstance(name, str) and name and name.isascii() and " " not in name
        for name in value
    ):
        raise ValueError(f"{where}: must be a non-empty list of DNS names")
    return tuple(value)


def parse_secrets(
    data: object, source: str, now: float | None = None
) -> dict[str, list[VersionSpec]]:
    """Validate a secrets mapping; raises ValueError naming ``source`` and the problem.

    ``now`` (epoch seconds, default the current time) anchors the relative
    ``*_in_days`` attributes.
    """
    now = time.time() if now is None else now
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ValueError(  # noqa: TRY004 - bad input, not a caller bug
            f"{source}: expected a mapping of secret name to value, got {_type_name(data)}"
        )
    result: dict[str, list[VersionSpec]] = {}
    seen: dict[str, str] = {}
    for name, spec in data.items():
        checked = check_name(name, source)
        if checked.lower() in seen:
            raise ValueError(
                f"{source}: secret {checked!r} duplicates {seen[checked.lower()]!r} "
                "(names are case-insensitive)"
            )
        seen[checked.lower()] = checked
        result[checked] = _parse_secret(spec, f"{source}: secret {checked!r}", now)
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

    Also per secret or version: ``value_base64`` instead of ``value`` (binary
    content as Key Vault holds it: the base64 text, checked and served as is),
    and ``not_before_in_days``/``expires_in_days`` instead of the epoch forms
    (days from now, negative in the past: expired or not-yet-valid secrets).

    A secret may instead be declared by its certificate: ``certificate:`` maps
    ``key_type`` (rsa | ec), ``content_type`` (application/x-pkcs12 |
    application/x-pem-file), ``pem_order`` (key-first | chain-first |
    shuffled), ``exportable``, ``include_root``, ``sans`` (DNS names),
    ``validity_days`` and ``valid_from_days``; only ``enabled`` and ``tags`` may
    sit beside it. The emulator issues the value (:mod:`.certificates`).

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
    parse_secrets(secrets, path)
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
