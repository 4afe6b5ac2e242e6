"""The manifest's entries of one of three shapes, each problem reported.

``path:`` (one secret to one file, ``raw``, optionally decoded with
``encoding:``), ``certificate:`` (one certificate's secret to up to five
files) or ``template:`` (several secrets to one file). Owner, group and
mode are an entry's, and an output's mapping may override them. Each
output may be a systemd credential (``credential:``,
:mod:`agent.manifest.credentials`) instead of a file, or as well.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping, Optional, Tuple

from agent.manifest.credentials import check_fileless, parse_credential
from agent.manifest.document import YamlMap
from agent.manifest.model import DEFAULT_MODE, Accounts, Entry
from agent.manifest.paths import Paths
from agent.manifest.problems import Problems, Scope, suggest, unknown_keys
from agent.manifest.quoting import echo
from agent.manifest.values import parse_account, parse_command, parse_mode, parse_vault_value
from agent.pipeline.credentials import Grant
from agent.pipeline.outputs import Output, OutputSet
from agent.pipeline.sources import Source
from agent.pipeline.transforms import (
    CERTIFICATE_KINDS,
    DEFAULT_TRANSFORM,
    ENCODINGS,
    TEMPLATE_FORMATS,
    TransformParams,
)

SECRET_KEYS = ("name", "path", "owner", "group", "mode", "version", "optional", "vault",
               "on_change", "encoding", "certificate", "template", "set", "credential")
OUTPUT_KEYS = ("path", "owner", "group", "mode")
CERTIFICATE_OUTPUT_KEYS = OUTPUT_KEYS + ("credential",)
TEMPLATE_KEYS = ("path", "format", "values")
TEMPLATE_VALUE_KEYS = ("name", "version", "vault", "encoding")
SET_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", re.ASCII)
ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$", re.ASCII)

# Key Vault object names [protocol.md B7]; versions are 32 hex characters.
SECRET_NAME_RE = re.compile(r"^[0-9A-Za-z-]{1,127}$")
VERSION_RE = re.compile(r"^[0-9A-Fa-f]{32}$")


def resolve_vault(fail: Callable[..., None], entry: YamlMap,
                  default: Optional[str]) -> Optional[str]:
    """An entry's own ``vault:`` (reported through ``fail`` when invalid), else
    the top-level one; one rule for secrets, select entries and template values."""
    if "vault" not in entry:
        return default
    try:
        return parse_vault_value(entry["vault"])
    except ValueError as exc:
        fail("vault", str(exc))
        return default


def parse_entry(
    problems: Problems, entry: Any, index: int, list_line: int, vault: Optional[str],
    directory: str, accounts: Accounts, check_filesystem: bool,
) -> Optional[Entry]:
    """The ``index``-th entry of ``secrets:`` (not a ``select:``), or None after
    reporting each of its problems."""
    prefix = f"secrets[{index}]"
    if not isinstance(entry, YamlMap):
        problems.add(prefix, "must be a mapping with name, path, owner, group, mode",
                     list_line)
        return None
    before = len(problems.lines)
    unknown_keys(problems, entry, SECRET_KEYS, f"{prefix}.")

    def fail(key: str, message: str, hint: str = "") -> None:
        problems.add(f"{prefix}.{key}", message, entry.key_lines.get(key, entry.line), hint)

    name = _secret_name(fail, entry, "name")
    entry_vault = resolve_vault(fail, entry, vault)

    defaults = ownership(fail, entry, accounts)

    version = _version(fail, entry, "version")
    encoding = _encoding(fail, entry, "encoding")

    optional = entry.get("optional", False)
    if not isinstance(optional, bool):
        fail("optional", f"'{echo(optional)}' is not true or false", "write optional: true")

    on_change: Tuple[str, ...] = ()
    if "on_change" in entry:
        try:
            on_change = parse_command(entry["on_change"])
        except ValueError as exc:
            fail("on_change", str(exc), 'e.g. on_change: ["systemctl", "reload", "app.service"]')

    set_name = None
    if "set" in entry:
        set_name = entry["set"] if isinstance(entry["set"], str) else None
        if set_name is None or not SET_NAME_RE.match(set_name):
            fail("set", f"'{echo(entry['set'])}' is not a set name",
                 "use 1-64 letters, digits and . _ - (not first)")

    shapes = [key for key in ("path", "certificate", "template") if key in entry]
    if len(shapes) > 1:
        fail(shapes[1], f"an entry has one of path, certificate or template, not "
             f"{' and '.join(shapes)}", "split it into entries of one kind each")
        return None
    paths = Paths(directory, check_filesystem)
    shape = shapes[0] if shapes else "path"
    grant = _entry_credential(fail, entry, shape, name)
    transform, params = DEFAULT_TRANSFORM, TransformParams((encoding,))
    sources: Tuple[Source, ...] = ()
    outputs: Tuple[Output, ...] = ()
    if shape == "certificate":
        if encoding is not None:
            fail("encoding", "a certificate is decoded by its content type",
                 "remove encoding from a certificate entry")
        transform = "certificate"
        kinds, outputs = _certificate_outputs(fail, entry, paths, defaults, accounts)
        params = TransformParams(kinds=kinds)
    elif shape == "template":
        for key in ("encoding", "version"):
            if key in entry:
                fail(key, f"a template takes {key} per value",
                     f"write it in the value's mapping: {{name: ..., {key}: ...}}")
        transform = "template"
        template = _template(fail, entry, paths, defaults, accounts, entry_vault,
                             has_credential="credential" in entry)
        if template is not None:
            params, sources, outputs = template
    elif "credential" in entry and "path" not in entry:  # a credential alone: no file
        check_fileless(fail, entry, "the entry")
        outputs = (ROOT_OWNED,)
    else:
        given = entry.raw.get("name", entry.get("name"))  # a default path even if invalid
        path = paths.resolve(fail, "path", entry.get("path", given))
        outputs = (defaults._replace(path=path),) if path is not None else ()
    if shape != "template" and isinstance(name, str):
        sources = (Source(entry_vault or "", name, version),)
    if grant is not None:
        outputs = tuple(output._replace(credential=grant) for output in outputs)
    if set_name is not None and outputs and not any(output.is_file for output in outputs):
        fail("set", "a set is files that change together, and this entry writes none",
             "remove set:, or give the entry a path:")

    if len(problems.lines) > before or not outputs or not sources or not isinstance(name, str):
        return None
    return Entry(
        name=name, sources=sources, outputs=OutputSet(outputs), transform=transform,
        params=params, set_name=set_name, is_optional=bool(optional), on_change=on_change,
        line=entry.line,
    )


def _entry_credential(fail: Callable[..., None], entry: YamlMap, shape: str,
                      name: Optional[str]) -> Optional[Grant]:
    """The grant of an entry's own ``credential:`` (plain or template), or None:
    absent, refused on a certificate (whose outputs each say theirs), or
    reported invalid."""
    if "credential" not in entry:
        return None
    if shape == "certificate":
        fail("credential", "a certificate serves each output as its own credential",
             "write it in the output: key: {credential: {id: tls.key, units: [app.service]}}")
        return None
    # An invalid name is reported already; the entry is dropped whatever the ID.
    return parse_credential(fail, entry["credential"], name if name is not None else "-")


def _secret_name(fail: Callable[..., None], data: YamlMap, key: str) -> Optional[str]:
    name = data.get(key)
    raw = getattr(data, "raw", {})
    if name is not None and not isinstance(name, str) and key in raw:
        name = raw[key]  # "2024" or "0755" is a YAML number: take it as written
    if name is None:
        fail(key, "missing", "add the Key Vault secret name")
        return None
    if not isinstance(name, str) or not SECRET_NAME_RE.match(name):
        fail(key, f"'{echo(name)}' is not a Key Vault secret name",
             "use 1-127 characters of 0-9, a-z, A-Z and '-'")
        return None
    return name


def _version(fail: Callable[..., None], data: YamlMap, key: str) -> Optional[str]:
    version = data.get(key)
    if version is None:
        return None
    raw = getattr(data, "raw", {})
    if not isinstance(version, str) and key in raw:
        version = raw[key]  # an all-digit version is a YAML number: as written
    if not isinstance(version, str) or not VERSION_RE.match(version):
        fail(key, f"'{echo(version)}' is not a secret version",
             "use the 32-character hex version id, or remove it for the current one")
        return None
    return version.lower()


def _encoding(fail: Callable[..., None], data: YamlMap, key: str) -> Optional[str]:
    if key not in data:
        return None
    value = data[key]
    if isinstance(value, str) and value.lower() in ENCODINGS:
        return value.lower()
    fail(key, f"'{echo(value)}' is not an encoding", f"use one of {', '.join(ENCODINGS)}")
    return None


def _output(
    fail: Callable[..., None], key: str, value: Any, paths: Paths, defaults: Output,
    accounts: Accounts, known: Tuple[str, ...] = OUTPUT_KEYS,
) -> Optional[Output]:
    """One output: a path, or a mapping {path, owner, group, mode} whose
    missing keys take the entry's values. A certificate's output (``known``
    holds ``credential``) may also be a credential, with or without a path."""
    if not isinstance(value, YamlMap):
        path = paths.resolve(fail, key, value)
        return defaults._replace(path=path) if path is not None else None
    inner = Scope(fail, key)

    for unknown in value:
        if unknown == "credential" and unknown not in known:
            inner(unknown, "a template's credential is its entry's",
                  "write credential: beside template:")
        elif unknown not in known:
            inner(echo(unknown), "unknown key", suggest(unknown, known))
    grant = None
    if "credential" in value and "credential" in known:
        grant = parse_credential(inner, value["credential"], None)
        if "path" not in value:
            check_fileless(inner, value, "this output")
            return ROOT_OWNED._replace(credential=grant) if not inner.count else None
    if "path" not in value:
        inner("path", "missing", "add path: <file name>")
        return None
    path = paths.resolve(inner, "path", value["path"])
    owned = ownership(inner, value, accounts, defaults)
    if path is None or inner.count:
        return None
    return owned._replace(path=path, credential=grant)


def _certificate_outputs(
    fail: Callable[..., None], entry: YamlMap, paths: Paths, defaults: Output, accounts: Accounts,
) -> Tuple[Tuple[str, ...], Tuple[Output, ...]]:
    value = entry["certificate"]
    if not isinstance(value, YamlMap) or not value:
        fail("certificate", "must be a mapping of at least one of "
             f"{', '.join(CERTIFICATE_KINDS)} to a path", "e.g. certificate: {key: tls.key}")
        return (), ()
    inner = Scope(fail, "certificate")

    kinds, outputs = [], []
    for kind, target in value.items():
        if kind not in CERTIFICATE_KINDS:
            inner(echo(kind), "unknown output kind", suggest(kind, CERTIFICATE_KINDS, "kinds"))
            continue
        output = _output(inner, kind, target, paths, defaults, accounts,
                         CERTIFICATE_OUTPUT_KEYS)
        if output is not None:
            kinds.append(kind)
            outputs.append(output)
    return tuple(kinds), tuple(outputs)


def _template(
    fail: Callable[..., None], entry: YamlMap, paths: Paths, defaults: Output, accounts: Accounts,
    vault: Optional[str], has_credential: bool = False,
) -> Optional[Tuple[TransformParams, Tuple[Source, ...], Tuple[Output, ...]]]:
    """A template's values and its one output: its ``path:``, or, for an
    entry with ``credential:`` and no ``path:``, no file at all."""
    value = entry["template"]
    if not isinstance(value, YamlMap):
        fail("template", "must be a mapping with path, format and values",
             "e.g. template: {path: app.env, format: env, values: {DB_PASSWORD: db-password}}")
        return None
    inner = Scope(fail, "template")

    for unknown in value:
        if unknown not in TEMPLATE_KEYS:
            inner(echo(unknown), "unknown key", suggest(unknown, TEMPLATE_KEYS))
    form = value.get("format", "env")
    if form not in TEMPLATE_FORMATS:
        inner("format", f"'{echo(form)}' is not a template format",
              f"use one of {', '.join(TEMPLATE_FORMATS)}")
    output = None
    if "path" in value:
        output = _output(inner, "path", value["path"], paths, defaults, accounts)
    elif has_credential:  # a credential alone: no file
        check_fileless(fail, entry, "the entry")
        output = ROOT_OWNED
    else:
        inner("path", "missing", "add path: <file name>")
    values = value.get("values")
    if not isinstance(values, YamlMap) or not values:
        inner("values", "must be a mapping of at least one output name to a secret",
              "e.g. values: {DB_PASSWORD: db-password}")
        return None
    keys, sources, encodings = [], [], []
    for key, item in values.items():
        where = f"values.{echo(key)}"
        if form == "env" and not (isinstance(key, str) and ENV_KEY_RE.match(key)):
            inner(where, f"'{echo(key)}' is not a variable name for an env file",
                  "use letters, digits and '_', not starting with a digit")
        elif not isinstance(key, str) or not key:
            inner(where, "an output name must be a non-empty string")
        source = _template_source(inner, where, item, vault)
        if source is not None:
            keys.append(str(key))
            sources.append(source[0])
            encodings.append(source[1])
    if inner.count or output is None:
        return None
    return (TransformParams(tuple(encodings), format=str(form), keys=tuple(keys)),
            tuple(sources), (output,))


def _template_source(
    fail: Callable[..., None], where: str, item: Any, vault: Optional[str],
) -> Optional[Tuple[Source, Optional[str]]]:
    """A template value: a secret name, or {name, version, vault, encoding}."""
    inner = Scope(fail, where)

    if not isinstance(item, YamlMap):
        if not isinstance(item, str) or not SECRET_NAME_RE.match(item):
            inner("", f"'{echo(item)}' is not a Key Vault secret name",
                  "use 1-127 characters of 0-9, a-z, A-Z and '-', or {name: ..., version: ...}")
            return None
        item = {"name": item}
    for unknown in item:
        if unknown not in TEMPLATE_VALUE_KEYS:
            inner(echo(unknown), "unknown key", suggest(unknown, TEMPLATE_VALUE_KEYS))
    name = _secret_name(inner, item, "name")
    version = _version(inner, item, "version")
    encoding = _encoding(inner, item, "encoding")
    item_vault = resolve_vault(inner, item, vault)
    if inner.count or name is None:
        return None
    if not item_vault:
        inner("vault", "missing", "add vault: at the top or in this value")
        return None
    return Source(item_vault, name, version), encoding


def _account(
    fail: Callable[[str, str, str], None], entry: Mapping[str, Any], key: str,
    lookup: Callable[[str], Optional[int]], kind: str,
) -> Tuple[int, str]:
    if key not in entry:
        return 0, "root"
    try:
        return parse_account(entry[key], lookup, kind)
    except ValueError as exc:
        fail(key, str(exc), "")
        return 0, "root"


ROOT_OWNED = Output("", 0, 0, DEFAULT_MODE)  # owner and group root, mode 0400


def ownership(fail: Callable[..., None], value: YamlMap, accounts: Accounts,
              defaults: Output = ROOT_OWNED) -> Output:
    """``owner``, ``group`` and ``mode`` of an entry or of one output's mapping
    (path left as in ``defaults``); a key that is absent keeps its default."""
    uid, owner = (_account(fail, value, "owner", accounts.user, "user") if "owner" in value
                  else (defaults.uid, defaults.owner))
    gid, group = (_account(fail, value, "group", accounts.group, "group") if "group" in value
                  else (defaults.gid, defaults.group))
    mode = defaults.mode
    if "mode" in value:
        try:
            mode = parse_mode(value["mode"], value.raw.get("mode"))
        except ValueError as exc:
            fail("mode", str(exc))
    return defaults._replace(uid=uid, gid=gid, mode=mode, owner=owner, group=group)
