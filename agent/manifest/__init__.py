"""Load and validate the YAML manifest into a frozen :class:`Manifest`.

The manifest is where the pipeline starts: each entry becomes an
:class:`Entry` made of a :class:`~agent.pipeline.sources.Source` (what to fetch), a
transform name with its parameters (:mod:`agent.pipeline.transforms`) and an
:class:`~agent.pipeline.outputs.OutputSet` (the files). An entry has one of three
shapes: ``path:`` (one secret to one file, ``raw``, optionally decoded with
``encoding:``), ``certificate:`` (one certificate's secret to up to five
files) or ``template:`` (several secrets to one file). Entries that change
together (``set:``, and each certificate) become :class:`~agent.pipeline.outputs.EntrySet`
values in :attr:`Manifest.sets`.

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
from typing import (
    Any,
    Callable,
    Dict,
    Iterator,
    List,
    Mapping,
    NamedTuple,
    Optional,
    Sequence,
    Tuple,
)

import yaml

from agent.base.errors import ManifestError
from agent.base.landing import RESERVED_PREFIX, system_directory_problem
from agent.identity.selector import SOURCES, Identity
from agent.pipeline.outputs import EntrySet, Output, OutputSet
from agent.pipeline.sources import Source
from agent.pipeline.transforms import (
    CERTIFICATE_KINDS,
    DEFAULT_TRANSFORM,
    ENCODINGS,
    TEMPLATE_FORMATS,
    TransformParams,
)
from agent.vault.url import normalize_vault_url

DEFAULT_DIRECTORY = "/run/secrets"
# `metrics: true`: node_exporter's --collector.textfile.directory=/run/kv-agent/metrics
DEFAULT_METRICS_PATH = "/run/kv-agent/metrics/kv-agent.prom"
METRICS_SUFFIX = ".prom"  # the textfile collector reads only these
DEFAULT_REFRESH_S = 15 * 60.0
DEFAULT_MODE = 0o400
MIN_REFRESH_S = 1.0
MAX_REFRESH_S = 31 * 24 * 3600.0  # a month; longer waits overflow nothing but help no one

TOP_KEYS = ("vault", "directory", "refresh", "refresh_jitter", "identity", "secrets",
            "warn_before_expiry", "metrics")
SECRET_KEYS = ("name", "path", "owner", "group", "mode", "version", "optional", "vault",
               "on_change", "encoding", "certificate", "template", "set")
OUTPUT_KEYS = ("path", "owner", "group", "mode")
SELECT_KEYS = ("select", "directory", "owner", "group", "mode", "optional", "on_change",
               "vault", "strip_prefix", "include_certificates")
SELECT_FILTER_KEYS = ("prefix", "tags")
SELECT_PREFIX_RE = re.compile(r"^[0-9A-Za-z-]{0,126}$")  # a name's start [protocol.md B7]
MAX_SELECT_TAGS = 15  # Key Vault's own limit on a secret's tags
MAX_TAG_CHARS = 256
SELECTED_NAME_CHARS = 128  # room under a select directory for a name (127) and its slash
TEMPLATE_KEYS = ("path", "format", "values")
TEMPLATE_VALUE_KEYS = ("name", "version", "vault", "encoding")
DEFAULT_WARN_BEFORE_EXPIRY_S = 14 * 86400.0
MAX_WARN_BEFORE_EXPIRY_S = 366 * 86400.0
EXPIRY_WINDOW_RE = re.compile(r"^(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$", re.ASCII)
SET_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", re.ASCII)
ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$", re.ASCII)
CERTIFICATE_SET_PREFIX = "certificate:"
DEFAULT_JITTER = 0.10  # +-10% of the interval, so a fleet does not refresh in step
MAX_JITTER = 0.5
IDENTITY_KEYS = ("client_id", "object_id", "resource_id")
IDENTITY_SOURCE_KEY = "source"

# Key Vault object names [protocol.md B7]; versions are 32 hex characters.
SECRET_NAME_RE = re.compile(r"^[0-9A-Za-z-]{1,127}$")
VERSION_RE = re.compile(r"^[0-9A-Fa-f]{32}$")
GUID_RE = re.compile(r"^[0-9A-Fa-f]{8}-(?:[0-9A-Fa-f]{4}-){3}[0-9A-Fa-f]{12}$")
RESOURCE_ID_RE = re.compile(
    r"^/subscriptions/[^/]+/resourcegroups/[^/]+/providers/"
    r"microsoft\.managedidentity/userassignedidentities/[^/]+$",
    re.IGNORECASE,
)
DURATION_RE = re.compile(r"^(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$", re.ASCII)
MAX_DURATION_CHARS = 20
MODE_RE = re.compile(r"^[0-7]{3,4}$")
MAX_ID = 2**32 - 2  # (uid_t)-1 means "unchanged" to chown(2)

# User and group names are bounded and plain BEFORE any lookup: NSS modules
# are C code that trusts its input (a 50 MB name aborted the process inside
# nss-systemd). 256 is LOGIN_NAME_MAX; the characters are what useradd,
# systemd and directory services (user@domain, MACHINE$) produce.
MAX_ACCOUNT_NAME_CHARS = 256
ACCOUNT_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.@\\-]*\$?", re.ASCII)

# Bounds on the text itself, checked before any value is built, so no input
# can cost more than a bounded amount of time or memory (a "billion laughs"
# alias bomb is a few hundred bytes that expand to billions of values).
MAX_MANIFEST_BYTES = 1 << 20  # 1 MiB; a thousand entries take about 150 KiB
MAX_SCALAR_CHARS = 4096  # PATH_MAX: no valid value is longer
MAX_DEPTH = 20  # the schema nests 4 deep (secrets, entry, on_change)
MAX_NODES = 100_000  # values with every alias expanded
MAX_VAULT_CHARS = 256  # https:// + a 24-character name + the longest cloud suffix
NAME_MAX = 255  # bytes in one path component (Linux)
PATH_MAX = 4095  # bytes in a path, without the terminating NUL
MAX_PROBLEMS = 50  # lines reported; the rest are counted
MAX_PROBLEM_CHARS = 320  # a problem's text after FILE:LINE:, escaped and capped
ECHO_CHARS = 60  # of a value quoted in a problem


class Entry(NamedTuple):
    """One manifest entry: the :class:`~agent.pipeline.sources.Source` values to fetch
    (one, or a template's one per value, in order), the transform that turns
    them into bytes with its parameters, and the
    :class:`~agent.pipeline.outputs.OutputSet` those bytes become, in order.

    ``name`` is the entry's ``name:`` as the manifest gives it, for messages
    (for a template, a label; for the others, the secret). ``set_name`` is
    the :class:`~agent.pipeline.outputs.EntrySet` the entry belongs to, if any.
    ``line`` (where the entry starts) serves messages only and is left out
    of equality: a manifest that only gained a comment is the same manifest,
    and a reload keeps its sessions and token.
    """

    name: str
    sources: Tuple[Source, ...]
    outputs: OutputSet
    transform: str = DEFAULT_TRANSFORM
    params: TransformParams = TransformParams()
    set_name: Optional[str] = None
    is_optional: bool = False
    on_change: Tuple[str, ...] = ()  # argv run (no shell) after a file changes
    line: Optional[int] = None  # last: equality compares the fields before it

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Entry):
            return NotImplemented
        return self[:-1] == other[:-1]

    def __ne__(self, other: object) -> bool:  # tuple's own would compare ``line``
        return not self == other

    def __hash__(self) -> int:
        return hash(self[:-1])

    @property
    def source(self) -> Source:
        """The first source: the entry's own secret (a template's first value)."""
        return self.sources[0]

    @property
    def primary(self) -> Output:
        """The first output: the entry is known by its path (``key``)."""
        return self.outputs.outputs[0]

    @property
    def key(self) -> str:
        """What the daemon's state, ledger and status.json know the entry by:
        its first output's path, unique in a manifest (two entries may not
        share a path) and stable across edits that do not move that file."""
        return self.outputs.outputs[0].path

    @property
    def paths(self) -> Tuple[str, ...]:
        return self.outputs.paths


class Selection(NamedTuple):
    """A ``select:`` entry: every enabled secret of ``vault`` whose name
    starts with ``prefix`` (case-insensitively, as Key Vault compares names
    [protocol.md B7]) and that carries every tag of ``tags``, written to
    ``directory``/<name> (minus the prefix with ``strip_prefix``) as
    ``defaults`` says (owner, group, mode; its path is unused).

    Which secrets these are is known only after listing the vault: the
    agent expands a selection into plain :class:`Entry` values at each sync
    (:mod:`agent.sync.selection`). ``line`` is left out of equality, as for Entry.
    """

    prefix: str
    tags: Tuple[Tuple[str, str], ...]
    vault: str
    directory: str
    defaults: Output
    strip_prefix: bool = False
    include_certificates: bool = False
    is_optional: bool = False
    on_change: Tuple[str, ...] = ()
    line: Optional[int] = None  # last: equality compares the fields before it

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Selection):
            return NotImplemented
        return self[:-1] == other[:-1]

    def __ne__(self, other: object) -> bool:
        return not self == other

    def __hash__(self) -> int:
        return hash(self[:-1])

    @property
    def label(self) -> str:
        """How messages and status name the selection."""
        tags = ",".join(f"{name}={value}" for name, value in self.tags)
        return f"select prefix '{self.prefix}'" + (f" tags {tags}" if tags else "")

    @property
    def entry(self) -> Entry:
        """The selection as one pseudo-entry, known by its directory: what
        a sync reports about its listing (listed, or why not), so that
        ``once``, STATUS= and status.json show it like any entry."""
        return Entry(name=self.label, sources=(Source(self.vault, self.label),),
                     outputs=OutputSet((self.defaults._replace(path=self.directory),)),
                     transform="select", is_optional=self.is_optional, line=self.line)


class Manifest(NamedTuple):
    """A validated manifest. ``source`` is the file it came from."""

    source: str
    vault: str
    directory: str
    refresh_interval_s: float
    identity: Identity
    secrets: Tuple[Entry, ...]
    refresh_jitter: float = DEFAULT_JITTER  # fraction of the interval, either way
    # Entries whose files change together, each in a directory of its own.
    sets: Tuple[EntrySet, ...] = ()
    warn_before_expiry_s: float = DEFAULT_WARN_BEFORE_EXPIRY_S
    # ``select:`` entries, expanded after each listing (agent.sync.selection).
    selections: Tuple[Selection, ...] = ()
    # Where the running agent writes Prometheus metrics (agent.daemon.metrics); None: off.
    metrics_path: Optional[str] = None


def landing_directories(manifest: Manifest) -> Tuple[str, ...]:
    """Every directory a file of ``manifest`` is written into, as the writer
    opens them: an explicit file's directory, a select entry's directory,
    and for a set the parent of its directory (the set's own directory is
    swapped whole, never written into). Sorted, each once. Pure: ``check``
    and ``doctor`` judge each with :meth:`agent.writer.Writer.check_directory`."""
    in_sets = {key for group in manifest.sets for key in group.keys}
    found = {posixpath.dirname(group.directory) for group in manifest.sets}
    found.update(posixpath.dirname(path) for entry in manifest.secrets
                 if entry.key not in in_sets for path in entry.paths)
    found.update(selection.directory for selection in manifest.selections)
    return tuple(sorted(found))


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
    own = sum(1 for key_node, _ in node.value if key_node.tag != "tag:yaml.org,2002:merge")
    loader.flatten_mapping(node)
    # flatten_mapping puts merged pairs (``<<: *base``) first: keys given
    # here override them, as YAML says, and only a key given twice here is
    # a mistake.
    merged = len(node.value) - own
    explicit = set()
    for index, (key_node, value_node) in enumerate(node.value):
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, str):
            key = echo(key)  # a list or number as a key: named, never formatted whole
        if index >= merged:
            if key in explicit:
                data.duplicates.append((key, key_node.start_mark.line + 1))
            explicit.add(key)
        data[key] = loader.construct_object(value_node, deep=True)
        data.key_lines[key] = key_node.start_mark.line + 1
        if isinstance(value_node, yaml.ScalarNode):
            data.raw[key] = value_node.value


_LineLoader.add_constructor("tag:yaml.org,2002:map", _construct_map)


class _Open:
    """A collection being parsed in check_shape: what it expands to so far,
    and where in it the parser is (for the key path of a problem)."""

    def __init__(self, anchor: Optional[str], is_map: bool) -> None:
        self.anchor = anchor
        self.is_map = is_map
        self.values = 1
        self.depth_below = 0
        self.children = 0  # events seen directly inside: keys and values alternate in a map
        self.key = ""

    def add(self, values: int, depth: int, key_text: Optional[str]) -> None:
        if self.is_map and self.children % 2 == 0:
            self.key = key_text if key_text is not None else "?"
        self.children += 1
        self.values += values
        self.depth_below = max(self.depth_below, depth)

    def where(self) -> str:
        if self.is_map:  # after a key, its value is being parsed
            return f".{echo(self.key)}" if self.children % 2 == 1 else ""
        return f"[{self.children}]"


def check_shape(text: str) -> Optional[Tuple[str, Optional[int]]]:
    """The first reason ``text`` is too costly to build, with its line, or None.

    Runs on libyaml's event stream (a state machine: no recursion, no values
    built) before anything is constructed, and refuses a scalar longer than
    MAX_SCALAR_CHARS or holding a NUL or an unpaired surrogate (which no
    system call accepts), nesting deeper than MAX_DEPTH, and more than
    MAX_NODES values once aliases are expanded: anchors and merge keys stay
    usable, a "billion laughs" does not. Syntax errors are left to the
    loader, which reports them with their line.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        # libyaml's parser takes UTF-8 and raises on an unpaired surrogate
        # before any event: find it here, with its line, as a problem.
        return ("an unpaired surrogate (not text); remove it",
                text.count("\n", 0, exc.start) + 1)
    expanded: Dict[str, Tuple[int, int]] = {}  # anchor -> (values, depth) it stands for
    stack: List[_Open] = []
    total = 0

    def where() -> str:
        path = "".join(node.where() for node in stack).lstrip(".")
        return f"{path}: " if path else ""

    try:
        for event in yaml.parse(text, Loader=_SafeLoader):
            line = event.start_mark.line + 1 if event.start_mark else None
            key_text = None
            if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                stack.append(_Open(event.anchor, isinstance(event, yaml.MappingStartEvent)))
                total += 1
                if len(stack) > MAX_DEPTH:
                    return f"{where()}nested deeper than {MAX_DEPTH} levels; flatten it", line
                continue
            if isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                node = stack.pop()
                values, depth = node.values, node.depth_below + 1
                if node.anchor is not None:
                    expanded[node.anchor] = (values, depth)
            elif isinstance(event, yaml.AliasEvent):
                if event.anchor not in expanded:
                    return (f"{where()}alias *{echo(event.anchor)} refers to an anchor "
                            "that is not complete before it; define the anchor first", line)
                values, depth = expanded[event.anchor]
                total += values
            elif isinstance(event, yaml.ScalarEvent):
                problem = _scalar_problem(event.value)
                if problem:
                    return f"{where()}{problem}", line
                values, depth, key_text = 1, 0, event.value
                if event.anchor is not None:
                    expanded[event.anchor] = (values, depth)
                total += 1
            else:
                continue  # stream and document events
            if total > MAX_NODES:
                return (f"more than {MAX_NODES} values (aliases expanded); "
                        "a manifest needs far fewer: split it or remove repetition", line)
            if len(stack) + depth > MAX_DEPTH:
                return (f"{where()}nested deeper than {MAX_DEPTH} levels "
                        "(aliases expanded); flatten it", line)
            if stack:
                stack[-1].add(values, depth, key_text)
    except yaml.YAMLError:
        return None  # the loader reports the syntax error with its line
    return None


def _scalar_problem(value: str) -> Optional[str]:
    if len(value) > MAX_SCALAR_CHARS:
        return (f"a value of {len(value)} characters; values are at most "
                f"{MAX_SCALAR_CHARS} characters: shorten it")
    if "\0" in value:
        return f"'{echo(value)}' contains a NUL character; remove it"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return f"'{echo(value)}' contains an unpaired surrogate (not text); remove it"
    return None


# ---------------------------------------------------------------------------
# Echoing values into messages


def echo(value: Any) -> str:
    """``value`` as at most ECHO_CHARS printable characters on one line.

    Whatever the manifest holds is quoted into problems through this: a
    value may be huge (a 1 MiB string, a number of 4,000 digits, an alias
    bomb that would take gigabytes to format), hold a newline that forges a
    log line, or an escape sequence. Only a bounded prefix is ever formatted.
    """
    text = "".join(char if char.isprintable() else _escape(char)
                   for char in _sketch(value, ECHO_CHARS + 1, 2))
    return text if len(text) <= ECHO_CHARS else text[:ECHO_CHARS - 3] + "..."


def _escape(char: str) -> str:
    return repr(char)[1:-1]  # \n, \x1b, \ud800: visible, never acted upon


def _sketch(value: Any, budget: int, levels: int) -> str:
    """At most about ``budget`` characters of ``value``, formatting no more."""
    if isinstance(value, str):
        return value[:budget]
    if isinstance(value, bool) or value is None or isinstance(value, float):
        return repr(value)
    if isinstance(value, int):
        if value.bit_length() > 128:
            return f"a number of about {int(value.bit_length() * 0.30103)} digits"
        return str(value)
    if isinstance(value, dict):
        pairs = (f"{_sketch_item(key, budget, levels - 1)}: "
                 f"{_sketch_item(item, budget, levels - 1)}" for key, item in value.items())
        return _sketch_items(pairs, "{", "}", budget, levels)
    if isinstance(value, (list, tuple)):
        items = (_sketch_item(item, budget, levels - 1) for item in value)
        return _sketch_items(items, "[", "]", budget, levels)
    if isinstance(value, (set, frozenset)):
        items = (_sketch_item(item, budget, levels - 1) for item in value)
        return _sketch_items(items, "{", "}", budget, levels)
    if isinstance(value, bytes):
        return repr(value[:budget])
    return f"<{type(value).__name__}>"[:budget]


def _sketch_items(items: Iterator[str], opening: str, closing: str, budget: int,
                  levels: int) -> str:
    """The first few of ``items`` (sketched lazily: the rest are never made)."""
    if levels == 0:
        return f"{opening}...{closing}"
    parts: List[str] = []
    used = 0
    for index, part in enumerate(items):
        if index == 4 or used > budget:
            parts.append("...")
            break
        parts.append(part)
        used += len(part) + 2
    return opening + ", ".join(parts) + closing


def _sketch_item(value: Any, budget: int, levels: int) -> str:
    """Items inside a collection are quoted the way Python's repr quotes them."""
    if isinstance(value, str):
        return repr(value[:max(budget, 0)])
    return _sketch(value, max(budget, 0), levels)


def _one_line(text: str, limit: int) -> str:
    """``text`` with control characters escaped, capped at ``limit`` characters."""
    printable = "".join(char if char.isprintable() else _escape(char) for char in text[:limit])
    return printable if len(printable) <= limit else printable[:limit - 3] + "..."


# ---------------------------------------------------------------------------
# Problems


class _Problems:
    """Collects one line per problem: ``FILE:LINE: KEY: what; fix``."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.lines: List[str] = []

    def add(self, key: str, message: str, line: Optional[int], hint: str = "") -> None:
        """Record one problem. Whatever the parts hold, the line is printable
        and at most MAX_PROBLEM_CHARS after ``FILE:LINE:`` (values are echoed
        short already; this is the net under every message)."""
        where = f"{self.source}:{line}" if line else self.source
        text = f"{key}: {message}" if key else message
        body = _one_line(f"{text}; {hint}" if hint else text, MAX_PROBLEM_CHARS)
        self.lines.append(f"{where}: {body}")

    def raise_if_any(self) -> None:
        if self.lines:
            count = len(self.lines)
            shown = self.lines[:MAX_PROBLEMS]
            if count > MAX_PROBLEMS:
                shown.append(f"{self.source}: and {count - MAX_PROBLEMS} more problems; "
                             "fix these first")
            raise ManifestError(
                f"{self.source}: {count} problem{'s' if count > 1 else ''}",
                problems=shown,
            )


class _Scope:
    """Reports problems under one key of an entry (``template.format``...)
    through the entry's ``fail``, and counts them, so the parser of that part
    knows whether it came out clean."""

    def __init__(self, fail: Callable[..., None], key: str) -> None:
        self._fail = fail
        self._key = key
        self.count = 0

    def __call__(self, sub: str, message: str, hint: str = "") -> None:
        self.count += 1
        self._fail(f"{self._key}.{sub}" if sub else self._key, message, hint)


def suggest(key: Any, known: Sequence[str], what: str = "keys") -> str:
    """The fix for an unknown key: the closest known one, else the list."""
    import difflib  # only on this error path: keeps start-up lean

    close = difflib.get_close_matches(str(key)[:64], known, n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'?" if close else f"known {what}: {', '.join(known)}"


def _unknown_keys(
    problems: _Problems, data: _Map, known: Tuple[str, ...], prefix: str
) -> None:
    for key in data:
        if key in known:
            continue
        # Suggestions only for lines that will be shown: difflib costs ~50 us
        # a key, and a 1 MiB manifest can hold 50,000 unknown ones.
        hint = (suggest(key, known) if len(problems.lines) < MAX_PROBLEMS
                else f"known keys: {', '.join(known)}")
        problems.add(f"{prefix}{echo(key)}", "unknown key", data.key_lines.get(key), hint)
    for key, line in data.duplicates:
        problems.add(f"{prefix}{echo(key)}", "key given twice", line, "keep one")


# ---------------------------------------------------------------------------
# Scalar parsers: each returns a value or raises ValueError(message; fix)


def parse_duration(value: Any) -> float:
    """Parse ``90``, ``"90s"``, ``"15m"``, ``"1h"`` or ``"1h30m"`` to seconds.

    Raises ValueError unless the result is a whole number of seconds from 1
    to MAX_REFRESH_S. Integers are compared before any float conversion and
    text is bounded before int(): a 400-digit number overflows a float and a
    5,000-digit one exceeds Python's int-from-text limit.
    """
    if isinstance(value, bool):
        raise ValueError("not a duration")
    if isinstance(value, int):
        seconds = value
    elif isinstance(value, str) and len(value.strip()) <= MAX_DURATION_CHARS:
        match = DURATION_RE.match(value.strip())
        if value.strip().isascii() and value.strip().isdigit():
            seconds = int(value.strip())
        elif match and any(match.groups()):
            hours, minutes, secs = (int(g) if g else 0 for g in match.groups())
            seconds = hours * 3600 + minutes * 60 + secs
        else:
            raise ValueError("not a duration")
    else:
        raise ValueError("not a duration")
    if seconds < MIN_REFRESH_S:
        raise ValueError("must be at least 1 second")
    if seconds > MAX_REFRESH_S:
        raise ValueError(f"must be at most 31 days ({int(MAX_REFRESH_S) // 3600}h)")
    return float(seconds)


def parse_expiry_window(value: Any) -> float:
    """Parse ``warn_before_expiry``: ``14d``, ``36h``, ``90m``, ``1d12h``
    (or a number of seconds) to seconds, from 0 to MAX_WARN_BEFORE_EXPIRY_S.
    Text is bounded before int(), as in :func:`parse_duration`."""
    if isinstance(value, bool):
        raise ValueError("not a duration")
    if isinstance(value, int):
        seconds = value
    elif isinstance(value, str) and len(value.strip()) <= MAX_DURATION_CHARS:
        text = value.strip()
        match = EXPIRY_WINDOW_RE.match(text)
        if text.isascii() and text.isdigit():
            seconds = int(text)
        elif match and any(match.groups()):
            days, hours, minutes, secs = (int(g) if g else 0 for g in match.groups())
            seconds = ((days * 24 + hours) * 60 + minutes) * 60 + secs
        else:
            raise ValueError("not a duration")
    else:
        raise ValueError("not a duration")
    if not 0 <= seconds <= MAX_WARN_BEFORE_EXPIRY_S:
        raise ValueError("must be from 0 to 366d")
    return float(seconds)


def parse_mode(value: Any, raw: Optional[str]) -> int:
    """Parse a quoted octal string such as ``"0440"`` into an int.

    An unquoted YAML ``0440`` is an integer (octal, 288) and ``440`` a decimal
    one; both are refused with the quoted spelling in the message because the
    number YAML produced is not what the operator meant.
    """
    if not isinstance(value, str):
        text = (raw if raw is not None else echo(value)).strip()
        suggestion = text.zfill(4) if MODE_RE.match(text) else "0440"
        raise ValueError(f"{echo(text)} must be a quoted octal string; "
                         f"write mode: \"{suggestion}\"")
    text = value.strip()
    if not MODE_RE.match(text):
        raise ValueError(f"'{echo(value)}' is not an octal mode; write e.g. mode: \"0440\"")
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
    host (see :mod:`agent.vault.url`, issue 9 item 1).
    """
    if not isinstance(value, str) or not value.strip():
        raise ValueError("must be a URL such as https://contoso-kv.vault.azure.net")
    return normalize_vault_url(value)


def _parse_account(
    value: Any, lookup: Callable[[str], Optional[int]], kind: str
) -> Tuple[int, str]:
    """A numeric id is taken as given (``DynamicUser=`` ids need not be in
    passwd); a name must be plain and at most MAX_ACCOUNT_NAME_CHARS (checked
    before the lookup, which is C code that trusts its input) and resolve."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(f"must be a {kind} name or numeric id, not '{echo(value)}'")
    if isinstance(value, int):
        if not 0 <= value <= MAX_ID:
            raise ValueError(f"{echo(value)} is out of range (0 to {MAX_ID})")
        return value, str(value)
    text = value.strip()
    if text.isascii() and text.isdigit():
        number = int(text) if len(text) <= 10 else MAX_ID + 1
        if number > MAX_ID:
            raise ValueError(f"{echo(text)} is out of range (0 to {MAX_ID})")
        return number, text
    if len(text) > MAX_ACCOUNT_NAME_CHARS or not ACCOUNT_NAME_RE.fullmatch(text):
        raise ValueError(
            f"'{echo(text)}' is not a valid {kind} name: at most {MAX_ACCOUNT_NAME_CHARS} "
            "letters, digits and . _ - @ (not first), or a numeric id")
    resolved = lookup(text)
    if resolved is None:
        fix = "useradd" if kind == "user" else "groupadd"
        raise ValueError(f"unknown {kind} '{echo(text)}'; create it ({fix}) or use a numeric id")
    return resolved, text


# ---------------------------------------------------------------------------
# Paths


def resolve_path(directory: str, value: Any) -> str:
    """Return the absolute target for ``path`` inside ``directory``.

    Rejects, each with a reason: empty paths, NUL bytes, ``..`` elements,
    absolute paths outside ``directory``, the directory itself, a trailing
    slash, a component over NAME_MAX or a path over PATH_MAX bytes (the
    kernel's ENAMETOOLONG, found here rather than at the first write) and
    names starting with the writer's reserved prefix. Pure: it does not look
    at the file system (see :func:`check_no_symlinked_parents`).
    """
    if not isinstance(value, str) or not value.strip():
        raise ValueError("must be a file name relative to directory")
    if "\0" in value:
        raise ValueError("contains a NUL byte")
    if value.endswith("/"):
        raise ValueError(f"'{echo(value)}' ends with '/'; name a file, not a directory")
    if ".." in value.split("/"):
        raise ValueError(f"'{echo(value)}' contains '..'; paths must stay inside {directory}")
    joined = normalise_path(posixpath.join(directory, value))
    if not joined.startswith(directory.rstrip("/") + "/"):
        raise ValueError(f"'{echo(value)}' is outside {directory}; use a path inside it")
    check_path_length(joined)
    if posixpath.basename(joined).startswith(RESERVED_PREFIX):
        raise ValueError(f"names starting with '{RESERVED_PREFIX}' are reserved for kv-agent")
    return joined


def normalise_path(path: str) -> str:
    """``posixpath.normpath``, but with one leading slash: POSIX keeps exactly
    two (``//dev/shm``) as implementation-defined, and ``//`` is its own
    dirname, so walking up from such a path never reached ``/`` (issue 9:
    ``directory: //dev/shm/x`` looped forever). Linux reads ``//`` as ``/``."""
    normal = posixpath.normpath(path)
    return "/" + normal.lstrip("/") if normal.startswith("//") else normal


def check_path_length(path: str) -> None:
    """Raise ValueError if a component of ``path`` is over NAME_MAX bytes or
    the whole over PATH_MAX, as the kernel would with ENAMETOOLONG."""
    for part in path.split("/"):
        if len(part.encode("utf-8", "surrogatepass")) > NAME_MAX:
            raise ValueError(f"component '{echo(part)}' is longer than {NAME_MAX} bytes; "
                             "shorten it")
    if len(path.encode("utf-8", "surrogatepass")) > PATH_MAX:
        raise ValueError(f"longer than {PATH_MAX} bytes; choose a shorter path")


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
        except OSError as exc:  # e.g. EACCES, ENOTDIR: a problem to report, not a crash
            raise ValueError(f"parent {current}: {exc.strerror}") from None
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
    symlink, since a symlink swap is a legitimate way to publish it).

    Only a regular file of at most MAX_MANIFEST_BYTES is read: the open is
    non-blocking so a FIFO cannot stall the agent, and the size is checked
    before and during the read. Raises ManifestError.
    """
    try:
        fd = os.open(source, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ManifestError(
            f"{source}: no such file", "write one (see README) or pass --manifest"
        ) from None
    except PermissionError:
        raise ManifestError(f"{source}: permission denied", "run as root") from None
    except OSError as exc:
        raise ManifestError(f"{source}: {exc.strerror}", "pass the manifest file") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise ManifestError(f"{source}: is a directory", "pass the manifest file")
        if not stat.S_ISREG(st.st_mode):
            raise ManifestError(f"{source}: not a regular file", "pass the manifest file")
        check_file_safety(source, st, os.geteuid() if euid is None else euid)
        data = _read_at_most(fd, MAX_MANIFEST_BYTES + 1) \
            if st.st_size <= MAX_MANIFEST_BYTES else b""
    except OSError as exc:
        raise ManifestError(f"{source}: {exc.strerror}", "pass the manifest file") from None
    finally:
        os.close(fd)
    if st.st_size > MAX_MANIFEST_BYTES or len(data) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"{source}: larger than {MAX_MANIFEST_BYTES >> 20} MiB",
                            "a manifest needs far less; is this the right file?")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ManifestError(f"{source}: not UTF-8 text", "save it as UTF-8") from None


def read_manifest_bytes(source: str) -> Optional[bytes]:
    """The manifest's bytes for change detection, or None when it is not a
    readable regular file of at most MAX_MANIFEST_BYTES (never blocks)."""
    try:
        fd = os.open(source, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        data = _read_at_most(fd, MAX_MANIFEST_BYTES + 1)
    except OSError:
        return None
    finally:
        os.close(fd)
    return data if len(data) <= MAX_MANIFEST_BYTES else None


def _read_at_most(fd: int, limit: int) -> bytes:
    chunks: List[bytes] = []
    size = 0
    while size < limit:
        chunk = os.read(fd, min(65536, limit - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


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
    ``check_filesystem``, lstat() of existing parents.

    Whatever ``text`` holds, this returns a Manifest or raises ManifestError
    whose problems are single printable lines of bounded length, in bounded
    time and memory (tests/test_manifest_fuzz.py checks it).
    """
    accounts = accounts or Accounts.system()
    problems = _Problems(source)
    if len(text) > MAX_MANIFEST_BYTES:
        problems.add("", f"larger than {MAX_MANIFEST_BYTES >> 20} MiB", None,
                     "a manifest needs far less; is this the right file?")
        problems.raise_if_any()
    too_costly = check_shape(text)
    if too_costly is not None:
        problems.add("", too_costly[0], too_costly[1])
        problems.raise_if_any()
    try:
        data = yaml.load(text, Loader=_LineLoader)  # noqa: S506 - SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        reason = getattr(exc, "problem", None) or "invalid YAML"
        problems.add("", f"not valid YAML: {reason}", mark.line + 1 if mark else None,
                     "fix the syntax (indentation, quotes, colons)")
        problems.raise_if_any()
    except (ValueError, OverflowError, TypeError, RecursionError) as exc:
        # SafeLoader's own constructors, e.g. the date 2001-02-30 (ValueError).
        problems.add("", f"a value YAML cannot build: {echo(str(exc))}", None,
                     "quote the value to make it a string")
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
    warn = _top_number(problems, data, "warn_before_expiry", parse_expiry_window,
                       DEFAULT_WARN_BEFORE_EXPIRY_S,
                       "write a duration up to 366d such as 14d, 36h or 90m")
    identity = _parse_identity(problems, data.get("identity"), data.key_lines.get("identity"))
    secrets, selections = _parse_secrets(problems, data, vault, directory, accounts,
                                         check_filesystem)
    sets = _collect_sets(problems, secrets, selections, directory)
    metrics = _top_metrics(problems, data, directory)
    problems.raise_if_any()
    return Manifest(source, vault or "", directory, refresh, identity, secrets, jitter,
                    sets, warn, selections, metrics)


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
        return _vault_url(data["vault"])
    except ValueError as exc:
        problems.add("vault", str(exc), data.key_lines.get("vault"))
        return None


def _vault_url(value: Any) -> str:
    """parse_vault_url, given only a string of a vault URL's length at most."""
    if isinstance(value, str) and len(value) > MAX_VAULT_CHARS:
        raise ValueError(f"'{echo(value)}' is longer than {MAX_VAULT_CHARS} characters; "
                         "write https://<name>.vault.azure.net")
    if not isinstance(value, str):
        raise ValueError(f"'{echo(value)}' is not a URL such as "
                         "https://contoso-kv.vault.azure.net")
    return parse_vault_url(value)


def _entry_vault(fail: Callable[..., None], entry: _Map,
                 default: Optional[str]) -> Optional[str]:
    """An entry's own ``vault:`` (reported through ``fail`` when invalid), else
    the top-level one; one rule for secrets, select entries and template values."""
    if "vault" not in entry:
        return default
    try:
        return _vault_url(entry["vault"])
    except ValueError as exc:
        fail("vault", str(exc))
        return default


def _top_directory(problems: _Problems, data: _Map) -> str:
    value = data.get("directory", DEFAULT_DIRECTORY)
    line = data.key_lines.get("directory")
    if not isinstance(value, str) or not value.startswith("/"):
        problems.add("directory", f"'{echo(value)}' must be an absolute path", line,
                     f"e.g. directory: {DEFAULT_DIRECTORY}")
        return DEFAULT_DIRECTORY
    if ".." in value.split("/") or "\0" in value:
        problems.add("directory", f"'{echo(value)}' must not contain '..'", line)
        return DEFAULT_DIRECTORY
    normal = normalise_path(value)
    if normal == "/":
        problems.add("directory", "'/' is not a secrets directory", line,
                     f"e.g. directory: {DEFAULT_DIRECTORY}")
        return DEFAULT_DIRECTORY
    try:
        check_path_length(normal)
    except ValueError as exc:
        problems.add("directory", str(exc), line)
        return DEFAULT_DIRECTORY
    shared = system_directory_problem(normal)  # the writer refuses it too, but with no line
    if shared:
        problems.add("directory", shared, line)
    return normal


def _top_metrics(problems: _Problems, data: _Map, directory: str) -> Optional[str]:
    """``metrics``: absent or false (off), true (DEFAULT_METRICS_PATH) or an
    absolute path of a ``.prom`` file, outside the secrets directory (which
    holds only the manifest's files)."""
    value = data.get("metrics", False)
    if value is False or value is None:
        return None
    if value is True:
        return DEFAULT_METRICS_PATH
    line = data.key_lines.get("metrics")
    hint = f"write metrics: true (for {DEFAULT_METRICS_PATH}) or an absolute path"
    if not isinstance(value, str) or not value.startswith("/"):
        problems.add("metrics", f"'{echo(value)}' is neither true, false nor an absolute path",
                     line, hint)
        return None
    if ".." in value.split("/") or "\0" in value or value.endswith("/"):
        problems.add("metrics", f"'{echo(value)}' must be a file's path without '..'", line,
                     hint)
        return None
    path = normalise_path(value)
    try:
        check_path_length(path)
    except ValueError as exc:
        problems.add("metrics", str(exc), line)
        return None
    if not path.endswith(METRICS_SUFFIX) or path.endswith("/" + METRICS_SUFFIX):
        problems.add("metrics", f"'{echo(value)}' must end in {METRICS_SUFFIX}: "
                     "node_exporter's textfile collector reads only those", line,
                     f"e.g. metrics: {DEFAULT_METRICS_PATH}")
        return None
    if path.startswith(directory.rstrip("/") + "/"):
        problems.add("metrics", f"'{echo(value)}' is inside directory {directory}, which "
                     "holds only the secrets' files", line, f"e.g. metrics: {DEFAULT_METRICS_PATH}")
        return None
    return path


def _top_number(problems: _Problems, data: _Map, key: str, parse: Callable[[Any], float],
                default: float, hint: str) -> float:
    """An optional top-level number: parsed, or the default plus a problem."""
    if key not in data:
        return default
    try:
        return parse(data[key])
    except ValueError as exc:
        problems.add(key, f"'{echo(data[key])}': {exc}", data.key_lines.get(key), hint)
        return default


def parse_jitter(value: Any) -> float:
    """Parse ``10%`` or ``0.1`` into a fraction in [0, MAX_JITTER]."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError("not a percentage")
    if isinstance(value, int) and not -100 <= value <= 100:  # str() of a huge int may fail
        raise ValueError(f"must be between 0% and {MAX_JITTER:.0%}")
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
        raise ValueError(f"'{echo(value)}' must be a list of arguments, not a string; "
                         f"write on_change: {echo(value.split())}")
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
    _unknown_keys(problems, value, IDENTITY_KEYS + (IDENTITY_SOURCE_KEY,), "identity.")
    source = _identity_source(problems, value)
    given = [key for key in IDENTITY_KEYS if key in value]
    if len(given) > 1:
        problems.add("identity", f"{' and '.join(given)} given; IMDS takes one", value.line,
                     "keep one selector")
        return Identity(source=source)
    if not given:
        return Identity(source=source)
    key = given[0]
    text = value[key].strip() if isinstance(value[key], str) else echo(value[key])
    pattern = RESOURCE_ID_RE if key == "resource_id" else GUID_RE
    if not pattern.match(text):
        example = ("/subscriptions/<sub>/resourceGroups/<rg>/providers/"
                   "Microsoft.ManagedIdentity/userAssignedIdentities/<name>"
                   if key == "resource_id" else "a GUID like 00000000-0000-0000-0000-000000000000")
        problems.add(f"identity.{key}", f"'{echo(text)}' is not valid", value.key_lines.get(key),
                     f"expected {example}")
        return Identity(source=source)
    return Identity(key, text, source)


def _identity_source(problems: _Problems, value: "_Map") -> str:
    """``identity.source``: auto (the default), imds, arc or app-service."""
    raw = value.get(IDENTITY_SOURCE_KEY, "auto")
    if raw in SOURCES:
        return str(raw)
    problems.add(f"identity.{IDENTITY_SOURCE_KEY}", f"'{echo(raw)}' is not a source",
                 value.key_lines.get(IDENTITY_SOURCE_KEY), f"use one of {', '.join(SOURCES)}")
    return "auto"


def _parse_secrets(
    problems: _Problems, data: _Map, vault: Optional[str], directory: str,
    accounts: Accounts, check_filesystem: bool,
) -> Tuple[Tuple[Entry, ...], Tuple[Selection, ...]]:
    entries = data.get("secrets")
    line = data.key_lines.get("secrets", data.line)
    if entries is None:
        problems.add("secrets", "missing", line, "add a list of secrets (see README)")
        return (), ()
    if not isinstance(entries, list):
        problems.add("secrets", "must be a list of entries, each starting with '- name:'", line)
        return (), ()
    parsed: List[Entry] = []
    selections: List[Selection] = []
    for index, entry in enumerate(entries):
        if isinstance(entry, _Map) and "select" in entry:
            selection = _parse_selection(problems, entry, index, vault, directory, accounts,
                                         check_filesystem)
            if selection is not None:
                selections.append(selection)
            continue
        secret = _parse_entry(problems, entry, index, line, vault, directory, accounts,
                              check_filesystem)
        if secret is not None:
            parsed.append(secret)
    _check_path_conflicts(problems, parsed)
    _check_selection_conflicts(problems, parsed, selections)
    return tuple(parsed), tuple(selections)


def _parse_selection(
    problems: _Problems, entry: _Map, index: int, vault: Optional[str], directory: str,
    accounts: Accounts, check_filesystem: bool,
) -> Optional[Selection]:
    """A ``select:`` entry, every problem reported (see :class:`Selection`)."""
    prefix_key = f"secrets[{index}]"
    before = len(problems.lines)
    _unknown_keys(problems, entry, SELECT_KEYS, f"{prefix_key}.")

    def fail(key: str, message: str, hint: str = "") -> None:
        problems.add(f"{prefix_key}.{key}", message, entry.key_lines.get(key, entry.line), hint)

    prefix, tags = _select_filter(fail, entry["select"])
    entry_vault = _entry_vault(fail, entry, vault)
    if "vault" not in entry and not vault:
        fail("vault", "missing", "add vault: at the top or in this entry")
    folder = None
    if "directory" not in entry:
        fail("directory", "missing", "add directory: <folder for the selected secrets' files>")
    else:
        folder = Paths(directory, check_filesystem).resolve(fail, "directory", entry["directory"])
        if folder is not None and len(folder.encode()) > PATH_MAX - SELECTED_NAME_CHARS:
            fail("directory", "too long to hold a secret's name", "shorten it")
    owned = _ownership(fail, entry, accounts)
    flags = {}
    for key in ("optional", "strip_prefix", "include_certificates"):
        flags[key] = entry.get(key, False)
        if not isinstance(flags[key], bool):
            fail(key, f"'{echo(flags[key])}' is not true or false", f"write {key}: true")
    on_change: Tuple[str, ...] = ()
    if "on_change" in entry:
        try:
            on_change = parse_command(entry["on_change"])
        except ValueError as exc:
            fail("on_change", str(exc), 'e.g. on_change: ["systemctl", "reload", "app.service"]')
    if len(problems.lines) > before or prefix is None or folder is None or not entry_vault:
        return None
    return Selection(prefix, tags, entry_vault, folder, owned,
                     strip_prefix=flags["strip_prefix"] is True,
                     include_certificates=flags["include_certificates"] is True,
                     is_optional=flags["optional"] is True, on_change=on_change,
                     line=entry.line)


def _select_filter(
    fail: Callable[..., None], value: Any,
) -> Tuple[Optional[str], Tuple[Tuple[str, str], ...]]:
    """``select: {prefix, tags}``: the prefix ('' when absent) and the tags
    as sorted pairs; (None, ()) after a problem."""
    hint = 'e.g. select: {prefix: "app1-", tags: {env: prod}}'
    if not isinstance(value, _Map) or not value:
        fail("select", "must be a mapping with prefix, tags or both", hint)
        return None, ()
    inner = _Scope(fail, "select")

    for unknown in value:
        if unknown not in SELECT_FILTER_KEYS:
            inner(echo(unknown), "unknown key", suggest(unknown, SELECT_FILTER_KEYS))
    prefix = value.get("prefix", "")
    if isinstance(prefix, (int, float)) and not isinstance(prefix, bool) \
            and "prefix" in value.raw:
        prefix = value.raw["prefix"]  # "2024-" is text, but "2024" a YAML number
    if not isinstance(prefix, str) or not SELECT_PREFIX_RE.match(prefix):
        inner("prefix", f"'{echo(prefix)}' is not the start of a Key Vault secret name",
              "use up to 126 characters of 0-9, a-z, A-Z and '-'")
    tags = value.get("tags")
    pairs: List[Tuple[str, str]] = []
    if "tags" not in value:
        pass
    elif not isinstance(tags, _Map) or not tags:
        inner("tags", "must be a mapping of at least one tag name to its value",
              "e.g. tags: {env: prod}")
    else:
        if len(tags) > MAX_SELECT_TAGS:
            inner("tags", f"more than {MAX_SELECT_TAGS} tags (Key Vault's limit)",
                  "match on fewer tags")
        for name, text in tags.items():
            text = tags.raw.get(name, text) if not isinstance(text, str) else text
            if not isinstance(name, str) or not name or len(name) > MAX_TAG_CHARS:
                inner(f"tags.{echo(name)}", "is not a tag name", "use 1-256 characters")
            elif not isinstance(text, str) or len(text) > MAX_TAG_CHARS:
                inner(f"tags.{echo(name)}", f"'{echo(text)}' is not a tag value",
                      "write the value as text, at most 256 characters")
            else:
                pairs.append((name, text))
    if inner.count:
        return None, ()
    return str(prefix), tuple(sorted(pairs))


def _check_selection_conflicts(problems: _Problems, entries: List[Entry],
                               selections: List[Selection]) -> None:
    """A select directory belongs to its selection alone: no explicit
    entry's file in it or below it (its files would collide, by name or by
    case, with a selected secret's), none of its parents an entry's file,
    and no other selection's directory in, above or at it."""
    for index, selection in enumerate(selections):
        folder = selection.directory
        inside = folder.lower() + "/"
        for entry in entries:
            for path in entry.paths:
                if path.lower().startswith(inside) or path.lower() == folder.lower():
                    problems.add("directory", f"{path} of '{entry.name}' (line {entry.line}) "
                                 f"is inside {folder}, which the {selection.label} fills",
                                 selection.line, "give the selection a directory of its own")
                elif folder.startswith(path + "/"):
                    problems.add("directory", f"{folder} would be inside {path}, which "
                                 f"'{entry.name}' writes as a file", selection.line,
                                 "choose paths that do not nest")
        for other in selections[:index]:
            a, b = folder.lower() + "/", other.directory.lower() + "/"
            if a.startswith(b) or b.startswith(a):
                problems.add("directory", f"{folder} overlaps {other.directory} of the "
                             f"{other.label} (line {other.line})", selection.line,
                             "give each selection a directory of its own")


def _collect_sets(
    problems: _Problems, entries: Tuple[Entry, ...], selections: Tuple[Selection, ...],
    directory: str,
) -> Tuple[EntrySet, ...]:
    """The manifest's sets, after checking each lives alone in one directory.

    A set is the entries sharing a ``set:`` name, or a certificate entry on
    its own. Its files must all be in one directory, not the manifest's
    top directory, and no other entry may write into it or below it, nor a
    ``select:`` entry fill a directory below it: the writer swaps that
    directory whole and refuses one holding a subdirectory, so the set would
    never change again. (A select directory at or above a set's is refused
    by the selection rules: the set's files would be inside it.)
    """
    members: Dict[str, List[Entry]] = {}
    for entry in entries:
        if entry.set_name is not None:
            members.setdefault(entry.set_name, []).append(entry)
        elif entry.transform == "certificate":
            members[CERTIFICATE_SET_PREFIX + entry.key] = [entry]
    sets = []
    for name, group in members.items():
        label = f"certificate of '{group[0].name}'" if name.startswith(
            CERTIFICATE_SET_PREFIX) else f"set '{name}'"
        folders = sorted({posixpath.dirname(path) for entry in group for path in entry.paths})
        if len(folders) > 1:
            problems.add("set", f"the {label} has files in {len(folders)} directories "
                         f"({', '.join(folders[:3])}); its files change together",
                         group[0].line, "put all of them in one directory")
            continue
        folder = folders[0]
        if folder == directory:
            problems.add("set", f"the {label} is in the top directory {directory}, which "
                         "holds other files", group[0].line,
                         f"put its files in a directory of their own, e.g. {directory}/"
                         f"{name.rsplit('/', 1)[-1].replace(':', '-') or 'set'}/")
            continue
        keys = {entry.key for entry in group}
        intruder = next((entry for entry in entries if entry.key not in keys and any(
            path.startswith(folder + "/") for path in entry.paths)), None)
        if intruder is not None:
            problems.add("set", f"the {label} needs {folder} to itself, but '{intruder.name}' "
                         f"(line {intruder.line}) writes there", group[0].line,
                         "move one of them to another directory, or give both the same set")
            continue
        selection = next((one for one in selections
                          if one.directory.startswith(folder + "/")), None)
        if selection is not None:
            problems.add("directory", f"{selection.directory} of the {selection.label} is "
                         f"inside {folder}, which the {label} (line {group[0].line}) needs to "
                         "itself: the set would never be rotated again", selection.line,
                         f"give the selection a directory outside {folder}")
            continue
        sets.append(EntrySet(name, folder, tuple(entry.key for entry in group)))
    return tuple(sets)


def _parse_entry(
    problems: _Problems, entry: Any, index: int, list_line: int, vault: Optional[str],
    directory: str, accounts: Accounts, check_filesystem: bool,
) -> Optional[Entry]:
    prefix = f"secrets[{index}]"
    if not isinstance(entry, _Map):
        problems.add(prefix, "must be a mapping with name, path, owner, group, mode",
                     list_line)
        return None
    before = len(problems.lines)
    _unknown_keys(problems, entry, SECRET_KEYS, f"{prefix}.")

    def fail(key: str, message: str, hint: str = "") -> None:
        problems.add(f"{prefix}.{key}", message, entry.key_lines.get(key, entry.line), hint)

    name = _secret_name(fail, entry, "name")
    entry_vault = _entry_vault(fail, entry, vault)

    defaults = _ownership(fail, entry, accounts)

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
        template = _template(fail, entry, paths, defaults, accounts, entry_vault)
        if template is not None:
            params, sources, outputs = template
    else:
        given = entry.raw.get("name", entry.get("name"))  # a default path even if invalid
        path = paths.resolve(fail, "path", entry.get("path", given))
        outputs = (defaults._replace(path=path),) if path is not None else ()
    if shape != "template" and isinstance(name, str):
        sources = (Source(entry_vault or "", name, version),)

    if len(problems.lines) > before or not outputs or not sources or not isinstance(name, str):
        return None
    return Entry(
        name=name, sources=sources, outputs=OutputSet(outputs), transform=transform,
        params=params, set_name=set_name, is_optional=bool(optional), on_change=on_change,
        line=entry.line,
    )


class Paths(NamedTuple):
    """Resolves an output path inside the manifest's directory, or reports why not."""

    directory: str
    check_filesystem: bool

    def resolve(self, fail: Callable[..., None], key: str, value: Any) -> Optional[str]:
        try:
            path = resolve_path(self.directory, value)
            if self.check_filesystem:
                check_no_symlinked_parents(self.directory, path)
        except ValueError as exc:
            fail(key, str(exc))
            return None
        return path


def _secret_name(fail: Callable[..., None], data: _Map, key: str) -> Optional[str]:
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


def _version(fail: Callable[..., None], data: _Map, key: str) -> Optional[str]:
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


def _encoding(fail: Callable[..., None], data: _Map, key: str) -> Optional[str]:
    if key not in data:
        return None
    value = data[key]
    if isinstance(value, str) and value.lower() in ENCODINGS:
        return value.lower()
    fail(key, f"'{echo(value)}' is not an encoding", f"use one of {', '.join(ENCODINGS)}")
    return None


def _output(
    fail: Callable[..., None], key: str, value: Any, paths: Paths, defaults: Output,
    accounts: Accounts,
) -> Optional[Output]:
    """One output: a path, or a mapping {path, owner, group, mode} whose
    missing keys take the entry's values."""
    if not isinstance(value, _Map):
        path = paths.resolve(fail, key, value)
        return defaults._replace(path=path) if path is not None else None
    inner = _Scope(fail, key)

    for unknown in value:
        if unknown not in OUTPUT_KEYS:
            inner(echo(unknown), "unknown key", suggest(unknown, OUTPUT_KEYS))
    if "path" not in value:
        inner("path", "missing", "add path: <file name>")
        return None
    path = paths.resolve(inner, "path", value["path"])
    owned = _ownership(inner, value, accounts, defaults)
    if path is None or inner.count:
        return None
    return owned._replace(path=path)


def _certificate_outputs(
    fail: Callable[..., None], entry: _Map, paths: Paths, defaults: Output, accounts: Accounts,
) -> Tuple[Tuple[str, ...], Tuple[Output, ...]]:
    value = entry["certificate"]
    if not isinstance(value, _Map) or not value:
        fail("certificate", "must be a mapping of at least one of "
             f"{', '.join(CERTIFICATE_KINDS)} to a path", "e.g. certificate: {key: tls.key}")
        return (), ()
    inner = _Scope(fail, "certificate")

    kinds, outputs = [], []
    for kind, target in value.items():
        if kind not in CERTIFICATE_KINDS:
            inner(echo(kind), "unknown output kind", suggest(kind, CERTIFICATE_KINDS, "kinds"))
            continue
        output = _output(inner, kind, target, paths, defaults, accounts)
        if output is not None:
            kinds.append(kind)
            outputs.append(output)
    return tuple(kinds), tuple(outputs)


def _template(
    fail: Callable[..., None], entry: _Map, paths: Paths, defaults: Output, accounts: Accounts,
    vault: Optional[str],
) -> Optional[Tuple[TransformParams, Tuple[Source, ...], Tuple[Output, ...]]]:
    value = entry["template"]
    if not isinstance(value, _Map):
        fail("template", "must be a mapping with path, format and values",
             "e.g. template: {path: app.env, format: env, values: {DB_PASSWORD: db-password}}")
        return None
    inner = _Scope(fail, "template")

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
    else:
        inner("path", "missing", "add path: <file name>")
    values = value.get("values")
    if not isinstance(values, _Map) or not values:
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
    inner = _Scope(fail, where)

    if not isinstance(item, _Map):
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
    item_vault = _entry_vault(inner, item, vault)
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
        return _parse_account(entry[key], lookup, kind)
    except ValueError as exc:
        fail(key, str(exc), "")
        return 0, "root"


ROOT_OWNED = Output("", 0, 0, DEFAULT_MODE)  # owner and group root, mode 0400


def _ownership(fail: Callable[..., None], value: _Map, accounts: Accounts,
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


def _check_path_conflicts(problems: _Problems, entries: List[Entry]) -> None:
    """No two outputs may be one path, nor one lie inside another's file."""
    seen: Dict[str, Entry] = {}
    for entry in entries:
        for path in entry.paths:
            other = seen.get(path)
            if other is not None:
                problems.add("path", f"{path} is written by both '{other.name}' "
                             f"(line {other.line}) and '{entry.name}'", entry.line,
                             "give each entry its own path")
                continue
            seen[path] = entry
    for entry in entries:
        for path in entry.paths:
            parent = posixpath.dirname(path)
            # Up to the top, which is its own dirname ("/"; "//" before paths
            # were normalised, and this loop never ended).
            while parent != posixpath.dirname(parent):
                if parent in seen:
                    problems.add("path", f"{path} would be inside {parent}, which "
                                 f"'{seen[parent].name}' writes as a file", entry.line,
                                 "choose paths that do not nest")
                    break
                parent = posixpath.dirname(parent)
