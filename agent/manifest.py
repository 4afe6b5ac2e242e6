"""Load and validate the YAML manifest into a frozen :class:`Manifest`.

The manifest decides which secrets land where, owned by whom: whoever can edit
it can direct any secret to any user. So it is refused unless only root (or the
agent's own user) can write it, as sudo does with sudoers; and it is validated
fully before anything is fetched, with every problem reported at once, each on
one line naming the file, the line, the key and the fix.

Nothing here touches the network. Users and groups are resolved through
injectable lookups so tests (and ``kv-agent check`` on a build host) can run
without the real passwd database.
"""

from __future__ import annotations

import grp
import os
import posixpath
import pwd
import re
import stat
from typing import Any, Callable, Dict, Iterator, List, Mapping, NamedTuple, Optional, Tuple

import yaml

from agent.errors import ManifestError
from agent.identity import Identity
from agent.vault_url import normalize_vault_url
from agent.writer import RESERVED_PREFIX

DEFAULT_MANIFEST = "/etc/kv-agent/manifest.yaml"
DEFAULT_DIRECTORY = "/run/secrets"
DEFAULT_REFRESH_S = 15 * 60.0
DEFAULT_MODE = 0o400
MIN_REFRESH_S = 1.0

TOP_KEYS = ("vault", "directory", "refresh", "refresh_jitter", "identity", "secrets")
SECRET_KEYS = ("name", "path", "owner", "group", "mode", "version", "optional", "vault",
               "on_change")
DEFAULT_JITTER = 0.10  # +-10% of the interval, so a fleet does not refresh in step
MAX_JITTER = 0.5
IDENTITY_KEYS = ("client_id", "object_id", "resource_id")

# Key Vault object names [protocol.md B7]; versions are 32 hex characters.
SECRET_NAME_RE = re.compile(r"^[0-9A-Za-z-]{1,127}$")
VERSION_RE = re.compile(r"^[0-9A-Fa-f]{32}$")
GUID_RE = re.compile(r"^[0-9A-Fa-f]{8}-(?:[0-9A-Fa-f]{4}-){3}[0-9A-Fa-f]{12}$")
RESOURCE_ID_RE = re.compile(
    r"^/subscriptions/[^/]+/resourcegroups/[^/]+/providers/"
    r"microsoft\.managedidentity/userassignedidentities/[^/]+$",
    re.IGNORECASE,
)
DURATION_RE = re.compile(r"^(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")
MODE_RE = re.compile(r"^[0-7]{3,4}$")
MAX_ID = 2**32 - 2  # (uid_t)-1 means "unchanged" to chown(2)


class SecretFile(NamedTuple):
    """One manifest entry: a Key Vault secret and the file it becomes.

    ``path`` is absolute and normalised, inside the manifest's directory.
    ``owner``/``group`` keep the manifest's spelling for messages; ``uid`` and
    ``gid`` are what the writer applies.
    """

    name: str
    path: str
    vault: str
    uid: int
    gid: int
    mode: int
    owner: str = "root"
    group: str = "root"
    version: Optional[str] = None
    is_optional: bool = False
    line: Optional[int] = None
    on_change: Tuple[str, ...] = ()  # argv run (no shell) after the file changes


class Manifest(NamedTuple):
    """A validated manifest. ``source`` is the file it came from."""

    source: str
    vault: str
    directory: str
    refresh_interval_s: float
    identity: Identity
    secrets: Tuple[SecretFile, ...]
    refresh_jitter: float = DEFAULT_JITTER  # fraction of the interval, either way


class Accounts(NamedTuple):
    """Resolves user and group names; replaceable in tests.

    Each lookup returns the numeric id, or None when the name is unknown.
    """

    user: Callable[[str], Optional[int]]
    group: Callable[[str], Optional[int]]

    @classmethod
    def system(cls) -> "Accounts":
        """Lookups through NSS (``getpwnam``/``getgrnam``)."""
        return cls(user=_getpwnam_uid, group=_getgrnam_gid)


def _getpwnam_uid(name: str) -> Optional[int]:
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        return None


def _getgrnam_gid(name: str) -> Optional[int]:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


# ---------------------------------------------------------------------------
# YAML with line numbers


class _Map(Dict[Any, Any]):
    """A YAML mapping that remembers where it and each of its keys stood."""

    line: int = 0
    key_lines: Dict[Any, int]
    raw: Dict[Any, str]  # the scalar text as written, e.g. ``0440`` unquoted
    duplicates: List[Tuple[Any, int]]


# libyaml's parser when PyYAML was built with it (Debian's and PyPI's wheels
# are): the same safe constructors, a seventh of the parse time.
_SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _LineLoader(_SafeLoader):  # type: ignore[valid-type,misc]
    """SafeLoader whose mappings carry line numbers and raw scalar text."""


def _construct_map(loader: _LineLoader, node: yaml.MappingNode) -> Iterator[_Map]:
    data = _Map()
    data.line = node.start_mark.line + 1
    data.key_lines, data.raw, data.duplicates = {}, {}, []
    yield data
    loader.flatten_mapping(node)
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, str):
            key = str(key)
        if key in data:
            data.duplicates.append((key, key_node.start_mark.line + 1))
        data[key] = loader.construct_object(value_node, deep=True)
        data.key_lines[key] = key_node.start_mark.line + 1
        if isinstance(value_node, yaml.ScalarNode):
            data.raw[key] = value_node.value


_LineLoader.add_constructor("tag:yaml.org,2002:map", _construct_map)


# ---------------------------------------------------------------------------
# Problems


class _Problems:
    """Collects one line per problem: ``FILE:LINE: KEY: what; fix``."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.lines: List[str] = []

    def add(self, key: str, message: str, line: Optional[int], hint: str = "") -> None:
        where = f"{self.source}:{line}" if line else self.source
        text = f"{where}: {key}: {message}" if key else f"{where}: {message}"
        self.lines.append(f"{text}; {hint}" if hint else text)

    def raise_if_any(self) -> None:
        if self.lines:
            count = len(self.lines)
            raise ManifestError(
                f"{self.source}: {count} problem{'s' if count > 1 else ''}",
                problems=self.lines,
            )


def _unknown_keys(
    problems: _Problems, data: _Map, known: Tuple[str, ...], prefix: str
) -> None:
    for key in data:
        if key in known:
            continue
        import difflib  # only on this error path: keeps start-up lean

        close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
        hint = f"did you mean '{close[0]}'?" if close else f"known keys: {', '.join(known)}"
        problems.add(f"{prefix}{key}", "unknown key", data.key_lines.get(key), hint)
    for key, line in data.duplicates:
        problems.add(f"{prefix}{key}", "key given twice", line, "keep one")


# ---------------------------------------------------------------------------
# Scalar parsers: each returns a value or raises ValueError(message; fix)


def parse_duration(value: Any) -> float:
    """Parse ``90``, ``"90s"``, ``"15m"``, ``"1h"`` or ``"1h30m"`` to seconds.

    Raises ValueError unless the result is a whole number of seconds >= 1.
    """
    if isinstance(value, bool):
        raise ValueError("not a duration")
    if isinstance(value, int):
        seconds = value
    elif isinstance(value, str) and value.strip().isdigit():
        seconds = int(value.strip())
    else:
        match = DURATION_RE.match(str(value).strip()) if isinstance(value, str) else None
        if not match or not any(match.groups()):
            raise ValueError("not a duration")
        hours, minutes, secs = (int(g) if g else 0 for g in match.groups())
        seconds = hours * 3600 + minutes * 60 + secs
    if seconds < MIN_REFRESH_S:
        raise ValueError("must be at least 1 second")
    return float(seconds)


def parse_mode(value: Any, raw: Optional[str]) -> int:
    """Parse a quoted octal string such as ``"0440"`` into an int.

    An unquoted YAML ``0440`` is an integer (octal, 288) and ``440`` a decimal
    one; both are refused with the quoted spelling in the message because the
    number YAML produced is not what the operator meant.
    """
    if not isinstance(value, str):
        text = (raw or str(value)).strip()
        suggestion = text.zfill(4) if MODE_RE.match(text) else "0440"
        raise ValueError(f"{text} must be a quoted octal string; write mode: \"{suggestion}\"")
    text = value.strip()
    if not MODE_RE.match(text):
        raise ValueError(f"'{value}' is not an octal mode; write e.g. mode: \"0440\"")
    mode = int(text, 8)
    if mode > 0o777:
        raise ValueError(
            f"'{value}' sets setuid, setgid or sticky bits; "
            f"use permission bits only, e.g. \"{mode & 0o777:04o}\""
        )
    return mode


def parse_vault_url(value: Any) -> str:
    """Normalise a vault URL to ``https://host[:port]``; refuse anything else.

    Tokens go only to this host, so it must be exact: https, a host of DNS
    letters, digits, '-' and '.' (or an IP literal), no path, query, fragment
    or credentials, and the host urllib3 will connect to must be this very
    host (see :mod:`agent.vault_url`, issue 9 item 1).
    """
    if not isinstance(value, str) or not value.strip():
        raise ValueError("must be a URL such as https://contoso-kv.vault.azure.net")
    return normalize_vault_url(value)


def _parse_account(
    value: Any, lookup: Callable[[str], Optional[int]], kind: str
) -> Tuple[int, str]:
    """A numeric id is taken as given (``DynamicUser=`` ids need not be in
    passwd); a name must resolve."""
    if isinstance(value, bool) or value is None:
        raise ValueError(f"must be a {kind} name or numeric id")
    text = str(value).strip()
    if text.isdigit():
        number = int(text)
        if number > MAX_ID:
            raise ValueError(f"{text} is out of range")
        return number, text
    resolved = lookup(text)
    if resolved is None:
        fix = "useradd" if kind == "user" else "groupadd"
        raise ValueError(f"unknown {kind} '{text}'; create it ({fix}) or use a numeric id")
    return resolved, text


# ---------------------------------------------------------------------------
# Paths


def resolve_path(directory: str, value: Any) -> str:
    """Return the absolute target for ``path`` inside ``directory``.

    Rejects, each with a reason: empty paths, NUL bytes, ``..`` elements,
    absolute paths outside ``directory``, the directory itself, a trailing
    slash and names starting with the writer's reserved prefix. Pure: it does
    not look at the file system (see :func:`check_no_symlinked_parents`).
    """
    if not isinstance(value, str) or not value.strip():
        raise ValueError("must be a file name relative to directory")
    if "\0" in value:
        raise ValueError("contains a NUL byte")
    if value.endswith("/"):
        raise ValueError(f"'{value}' ends with '/'; name a file, not a directory")
    if ".." in value.split("/"):
        raise ValueError(f"'{value}' contains '..'; paths must stay inside {directory}")
    joined = posixpath.normpath(posixpath.join(directory, value))
    if not joined.startswith(directory.rstrip("/") + "/"):
        raise ValueError(f"'{value}' is outside {directory}; use a path inside it")
    if posixpath.basename(joined).startswith(RESERVED_PREFIX):
        raise ValueError(f"names starting with '{RESERVED_PREFIX}' are reserved for kv-agent")
    return joined


def check_no_symlinked_parents(directory: str, path: str) -> None:
    """Raise ValueError if an existing directory between ``directory`` and
    ``path`` is a symlink (which could point the write anywhere)."""
    relative = posixpath.relpath(posixpath.dirname(path), directory)
    current = directory
    for part in [] if relative == "." else relative.split("/"):
        current = posixpath.join(current, part)
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            return  # the writer creates the rest, never through a symlink
        if stat.S_ISLNK(st.st_mode):
            raise ValueError(f"parent {current} is a symlink; replace it with a directory")
        if not stat.S_ISDIR(st.st_mode):
            raise ValueError(f"parent {current} is not a directory")


# ---------------------------------------------------------------------------
# Loading


def check_file_safety(source: str, st: os.stat_result, euid: int) -> None:
    """Refuse a manifest others could have edited: it directs secrets anywhere.

    Raises ManifestError if the file is writable by group or others, or owned
    by someone other than root or the agent's own user.
    """
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ManifestError(
            f"{source}: writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})",
            f"it decides where secrets go: chmod go-w {source}",
        )
    if st.st_uid not in (0, euid):
        raise ManifestError(
            f"{source}: owned by uid {st.st_uid}, not root or the agent's user",
            f"chown root {source}",
        )


def read_manifest_text(source: str, euid: Optional[int] = None) -> str:
    """Read the manifest after checking its owner and mode (following a
    symlink, since a symlink swap is a legitimate way to publish it)."""
    try:
        with open(source, "rb") as handle:
            st = os.fstat(handle.fileno())
            check_file_safety(source, st, os.geteuid() if euid is None else euid)
            data = handle.read()
    except FileNotFoundError:
        raise ManifestError(
            f"{source}: no such file", "write one (see README) or pass --manifest"
        ) from None
    except IsADirectoryError:
        raise ManifestError(f"{source}: is a directory", "pass the manifest file") from None
    except PermissionError:
        raise ManifestError(f"{source}: permission denied", "run as root") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ManifestError(f"{source}: not UTF-8 text", "save it as UTF-8") from None


def load_manifest(
    source: str, *, accounts: Optional[Accounts] = None, euid: Optional[int] = None,
    check_filesystem: bool = True,
) -> Manifest:
    """Read, check and validate ``source``; raise ManifestError listing every
    problem. ``check_filesystem`` also rejects symlinked parents on disk."""
    text = read_manifest_text(source, euid)
    return parse_manifest(text, source, accounts=accounts, check_filesystem=check_filesystem)


def parse_manifest(
    text: str, source: str = "<manifest>", *, accounts: Optional[Accounts] = None,
    check_filesystem: bool = True,
) -> Manifest:
    """Validate manifest text; pure apart from account lookups and, when
    ``check_filesystem``, lstat() of existing parents."""
    accounts = accounts or Accounts.system()
    problems = _Problems(source)
    try:
        data = yaml.load(text, Loader=_LineLoader)  # noqa: S506 - SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        reason = getattr(exc, "problem", None) or "invalid YAML"
        problems.add("", f"not valid YAML: {reason}", mark.line + 1 if mark else None,
                     "fix the syntax (indentation, quotes, colons)")
        problems.raise_if_any()
    if not isinstance(data, _Map):
        problems.add("", "the top level must be a mapping with vault, directory and secrets",
                     None, "see the README for an example")
        problems.raise_if_any()
    _unknown_keys(problems, data, TOP_KEYS, "")

    vault = _top_vault(problems, data)
    directory = _top_directory(problems, data)
    refresh = _top_number(problems, data, "refresh", parse_duration, DEFAULT_REFRESH_S,
                          "write a positive duration such as 90, 90s, 15m, 1h or 1h30m")
    jitter = _top_number(problems, data, "refresh_jitter", parse_jitter, DEFAULT_JITTER,
                         f"write a percentage from 0% to {MAX_JITTER:.0%}, "
                         "e.g. refresh_jitter: 10%")
    identity = _parse_identity(problems, data.get("identity"), data.key_lines.get("identity"))
    secrets = _parse_secrets(problems, data, vault, directory, accounts, check_filesystem)
    problems.raise_if_any()
    return Manifest(source, vault or "", directory, refresh, identity, secrets, jitter)


def _top_vault(problems: _Problems, data: _Map) -> Optional[str]:
    if "vault" not in data:
        entries = data.get("secrets")
        if not isinstance(entries, list) or not entries or not all(
            isinstance(entry, dict) and "vault" in entry for entry in entries
        ):
            problems.add("vault", "missing", data.line,
                         "add vault: https://<name>.vault.azure.net")
        return None
    try:
        return parse_vault_url(data["vault"])
    except ValueError as exc:
        problems.add("vault", str(exc), data.key_lines.get("vault"))
        return None


def _top_directory(problems: _Problems, data: _Map) -> str:
    value = data.get("directory", DEFAULT_DIRECTORY)
    line = data.key_lines.get("directory")
    if not isinstance(value, str) or not value.startswith("/"):
        problems.add("directory", f"'{value}' must be an absolute path", line,
                     f"e.g. directory: {DEFAULT_DIRECTORY}")
        return DEFAULT_DIRECTORY
    if ".." in value.split("/") or "\0" in value:
        problems.add("directory", f"'{value}' must not contain '..'", line)
        return DEFAULT_DIRECTORY
    normal = posixpath.normpath(value)
    if normal == "/":
        problems.add("directory", "'/' is not a secrets directory", line,
                     f"e.g. directory: {DEFAULT_DIRECTORY}")
    return normal


def _top_number(problems: _Problems, data: _Map, key: str, parse: Callable[[Any], float],
                default: float, hint: str) -> float:
    """An optional top-level number: parsed, or the default plus a problem."""
    if key not in data:
        return default
    try:
        return parse(data[key])
    except ValueError as exc:
        problems.add(key, f"'{data[key]}': {exc}", data.key_lines.get(key), hint)
        return default


def parse_jitter(value: Any) -> float:
    """Parse ``10%`` or ``0.1`` into a fraction in [0, MAX_JITTER]."""
    if isinstance(value, bool):
        raise ValueError("not a percentage")
    text = str(value).strip()
    try:
        fraction = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise ValueError("not a percentage") from None
    if not 0 <= fraction <= MAX_JITTER:
        raise ValueError(f"must be between 0% and {MAX_JITTER:.0%}")
    return fraction


def parse_command(value: Any) -> Tuple[str, ...]:
    """Parse ``on_change``: a non-empty list of strings, run without a shell.

    A plain string is refused rather than split: splitting would need shell
    quoting rules, and running it through a shell would invite injection.
    """
    if isinstance(value, str):
        raise ValueError(f"'{value}' must be a list of arguments, not a string; "
                         f"write on_change: {value.split()!r}")
    if not isinstance(value, list) or not value or not all(
            isinstance(arg, str) and arg and "\0" not in arg for arg in value):
        raise ValueError("must be a non-empty list of non-empty strings")
    return tuple(value)


def _parse_identity(problems: _Problems, value: Any, line: Optional[int]) -> Identity:
    if value is None:
        return Identity()
    if not isinstance(value, _Map):
        problems.add("identity", "must be a mapping with one of client_id, object_id, "
                     "resource_id", line, "or remove it for the system-assigned identity")
        return Identity()
    _unknown_keys(problems, value, IDENTITY_KEYS, "identity.")
    given = [key for key in IDENTITY_KEYS if key in value]
    if len(given) > 1:
        problems.add("identity", f"{' and '.join(given)} given; IMDS takes one", value.line,
                     "keep one selector")
        return Identity()
    if not given:
        return Identity()
    key = given[0]
    text = str(value[key]).strip()
    pattern = RESOURCE_ID_RE if key == "resource_id" else GUID_RE
    if not pattern.match(text):
        example = ("/subscriptions/<sub>/resourceGroups/<rg>/providers/"
                   "Microsoft.ManagedIdentity/userAssignedIdentities/<name>"
                   if key == "resource_id" else "a GUID like 00000000-0000-0000-0000-000000000000")
        problems.add(f"identity.{key}", f"'{text}' is not valid", value.key_lines.get(key),
                     f"expected {example}")
        return Identity()
    return Identity(key, text)


def _parse_secrets(
    problems: _Problems, data: _Map, vault: Optional[str], directory: str,
    accounts: Accounts, check_filesystem: bool,
) -> Tuple[SecretFile, ...]:
    entries = data.get("secrets")
    line = data.key_lines.get("secrets", data.line)
    if entries is None:
        problems.add("secrets", "missing", line, "add a list of secrets (see README)")
        return ()
    if not isinstance(entries, list):
        problems.add("secrets", "must be a list of entries, each starting with '- name:'", line)
        return ()
    parsed: List[SecretFile] = []
    for index, entry in enumerate(entries):
        secret = _parse_entry(problems, entry, index, line, vault, directory, accounts,
                              check_filesystem)
        if secret is not None:
            parsed.append(secret)
    _check_path_conflicts(problems, parsed)
    return tuple(parsed)


def _parse_entry(
    problems: _Problems, entry: Any, index: int, list_line: int, vault: Optional[str],
    directory: str, accounts: Accounts, check_filesystem: bool,
) -> Optional[SecretFile]:
    prefix = f"secrets[{index}]"
    if not isinstance(entry, _Map):
        problems.add(prefix, "must be a mapping with name, path, owner, group, mode",
                     list_line)
        return None
    before = len(problems.lines)
    _unknown_keys(problems, entry, SECRET_KEYS, f"{prefix}.")

    def fail(key: str, message: str, hint: str = "") -> None:
        problems.add(f"{prefix}.{key}", message, entry.key_lines.get(key, entry.line), hint)

    name = entry.get("name")
    if name is None:
        fail("name", "missing", "add the Key Vault secret name")
    elif not isinstance(name, str) or not SECRET_NAME_RE.match(name):
        fail("name", f"'{name}' is not a Key Vault secret name",
             "use 1-127 characters of 0-9, a-z, A-Z and '-'")

    entry_vault = vault
    if "vault" in entry:
        try:
            entry_vault = parse_vault_url(entry["vault"])
        except ValueError as exc:
            fail("vault", str(exc))

    path = None
    try:
        path = resolve_path(directory, entry.get("path", name))
        if check_filesystem:
            check_no_symlinked_parents(directory, path)
    except ValueError as exc:
        fail("path", str(exc))

    uid, owner = _account(fail, entry, "owner", accounts.user, "user")
    gid, group = _account(fail, entry, "group", accounts.group, "group")

    mode = DEFAULT_MODE
    if "mode" in entry:
        try:
            mode = parse_mode(entry["mode"], entry.raw.get("mode"))
        except ValueError as exc:
            fail("mode", str(exc))

    version = entry.get("version")
    if version is not None:
        version = str(version)
        if not VERSION_RE.match(version):
            fail("version", f"'{version}' is not a secret version",
                 "use the 32-character hex version id, or remove it for the current one")

    optional = entry.get("optional", False)
    if not isinstance(optional, bool):
        fail("optional", f"'{optional}' is not true or false", "write optional: true")

    on_change: Tuple[str, ...] = ()
    if "on_change" in entry:
        try:
            on_change = parse_command(entry["on_change"])
        except ValueError as exc:
            fail("on_change", str(exc), 'e.g. on_change: ["systemctl", "reload", "app.service"]')

    if len(problems.lines) > before or path is None or not isinstance(name, str):
        return None
    return SecretFile(
        name=name, path=path, vault=entry_vault or "", uid=uid, gid=gid, mode=mode,
        owner=owner, group=group, version=version.lower() if version else None,
        is_optional=bool(optional), line=entry.line, on_change=on_change,
    )


def _account(
    fail: Callable[[str, str, str], None], entry: Mapping[str, Any], key: str,
    lookup: Callable[[str], Optional[int]], kind: str,
) -> Tuple[int, str]:
    if key not in entry:
        return 0, "root"
    try:
        return _parse_account(entry[key], lookup, kind)
    except ValueError as exc:
        fail(key, str(exc), "")
        return 0, "root"


def _check_path_conflicts(problems: _Problems, secrets: List[SecretFile]) -> None:
    """Two entries may not write one path, nor one write inside another's file."""
    seen: Dict[str, SecretFile] = {}
    for secret in secrets:
        other = seen.get(secret.path)
        if other is not None:
            problems.add("path", f"{secret.path} is written by both '{other.name}' "
                         f"(line {other.line}) and '{secret.name}'", secret.line,
                         "give each entry its own path")
            continue
        seen[secret.path] = secret
    for secret in secrets:
        parent = posixpath.dirname(secret.path)
        while parent != "/" and parent:
            if parent in seen:
                problems.add("path", f"{secret.path} would be inside {parent}, which "
                             f"'{seen[parent].name}' writes as a file", secret.line,
                             "choose paths that do not nest")
                break
            parent = posixpath.dirname(parent)
