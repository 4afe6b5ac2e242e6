"""systemd credentials: who may load which, as pure rules over names.

A unit that says ``LoadCredential=ID:/run/kv-agent/credentials.sock`` has
systemd connect to the agent's socket once per credential, from a client
socket bound to the abstract address ``\\0<random>/unit/<unit>/<ID>``
(systemd's ``load_credential()``, src/core/exec-credential.c; the random part
is a 64-bit number in hex). The agent serves the bytes only to a unit the
manifest grants that ID. This module holds the rules, all pure, no I/O:

* :func:`is_credential_name`: systemd's ``credential_name_valid()``: a valid
  file name (``filename_is_valid()``: 1 to 255 bytes, no ``/``, not ``.`` or
  ``..``) that is also a valid fd name (``fdname_is_valid()``: printable
  ASCII only, no ``:``). :func:`credential_id_problem` is the manifest's
  rule: systemd's, and no space either (``KV_AGENT_CHANGED`` separates names
  by spaces; a space in ``LoadCredential=`` needs quoting).
* :func:`is_unit_name`: systemd's ``unit_name_is_valid()`` for a unit that
  can run: ``name.type`` or ``name@instance.type`` (never a template
  ``name@.type``, which never runs), at most 255 bytes, of
  ``[A-Za-z0-9:_.\\-@]`` before a known unit type.
* :func:`unit_pattern_problem`: a manifest's ``units:`` item: a unit name, or
  a shell glob (``*``, ``?``, ``[...]``) over those characters that begins
  with a fixed character and ends in a fixed ``.type``, so no pattern means
  "any unit"; matched with :func:`fnmatch.fnmatchcase`.
* :class:`Grant` and :func:`grants`: a credential ID and the unit patterns
  that may load it; :func:`may_overlap`, whether two patterns can match one
  unit (conservative for two globs).
* :func:`parse_peer`: a connecting client's address, strictly: anything that
  is not exactly systemd's form is None, so it gets nothing.
* :func:`change_names`: how ``KV_AGENT_CHANGED`` names a changed credential,
  ``credential:<unit pattern>/<ID>`` (one name per pattern).
"""

from __future__ import annotations

import fnmatch
import re
from typing import NamedTuple, Optional, Tuple, Union

# systemd's unit types (unit_type_from_string()), the suffix after the last '.'.
UNIT_TYPES = ("service", "socket", "target", "device", "mount", "automount", "swap", "timer",
              "path", "slice", "scope")
MAX_UNIT_NAME = 255  # UNIT_NAME_MAX is 256 with the NUL
MAX_CREDENTIAL_NAME = 255  # CREDENTIAL_NAME_MAX = FDNAME_MAX, and NAME_MAX
SUN_PATH_MAX = 108  # sizeof(struct sockaddr_un.sun_path) on Linux
# What a peer address holds besides the unit and the ID, at most: the leading
# NUL, 16 hex digits of random, "/unit/" and the "/" before the ID, and systemd
# keeps room for a trailing NUL even in an abstract name (measured on 252 and
# 257: an ID of 72 bytes for app.service always worked, 73 failed whenever the
# random part had 16 digits). A longer unit and ID cannot be named at all: the
# unit fails before it connects, with only systemd's generic error.
MAX_UNIT_AND_ID = SUN_PATH_MAX - len("\0") - 16 - len("/unit/") - len("/") - 1  # 83 bytes
CHANGE_PREFIX = "credential:"
# The running agent's socket, in its state directory (/run/kv-agent by default):
# what a unit's LoadCredential=ID:PATH names.
SOCKET_NAME = "credentials.sock"
_UNIT_CHARS = re.compile(r"[A-Za-z0-9:_.\\@-]+\Z", re.ASCII)
_WILDCARDS = "*?["


class Grant(NamedTuple):
    """A credential's ID (what ``LoadCredential=ID:...`` asks for) and the unit
    names or globs that may load it, in the manifest's order. Never empty:
    there is no "any unit"."""

    id: str
    units: Tuple[str, ...]

    def admits(self, unit: str) -> bool:
        """Whether ``unit`` may load this credential (:func:`grants`)."""
        return grants(self, unit)

    @property
    def label(self) -> str:
        """The grant in one word, ``credential:<units, comma-separated>/<ID>``:
        how status and messages name it, and the key of an entry that writes
        no file (no unit pattern holds ',' or '/', no ID '/')."""
        return f"{CHANGE_PREFIX}{','.join(self.units)}/{self.id}"


class Peer(NamedTuple):
    """Who is asking, from a client address in systemd's form."""

    unit: str
    credential_id: str


def is_credential_name(name: str) -> bool:
    """systemd's credential_name_valid(): 1-255 characters of printable ASCII
    (space included), no '/' and no ':', and not '.' or '..'."""
    return (0 < len(name) <= MAX_CREDENTIAL_NAME and name not in (".", "..")
            and all(" " <= char <= "~" and char not in "/:" for char in name))


def credential_id_problem(name: object) -> Optional[str]:
    """Why ``name`` cannot be a manifest's credential ID (None when it can):
    systemd's rule (:func:`is_credential_name`) and no space."""
    if not isinstance(name, str) or not is_credential_name(name):
        return ("is not a systemd credential name: use 1-255 printable ASCII characters "
                "without '/' or ':', not '.' or '..'")
    if " " in name:
        return "has a space: KV_AGENT_CHANGED and LoadCredential= separate words by spaces"
    return None


def is_unit_name(name: str) -> bool:
    """systemd's unit_name_is_valid() for a unit that runs: ``name.type`` or
    ``name@instance.type``; a template (``name@.type``) is not one."""
    if not 0 < len(name) <= MAX_UNIT_NAME:
        return False
    stem, dot, kind = name.rpartition(".")
    if not dot or not stem or kind not in UNIT_TYPES or not _UNIT_CHARS.match(stem):
        return False
    prefix, at, instance = stem.partition("@")
    return bool(prefix) and (not at or bool(instance))


def is_glob(pattern: str) -> bool:
    """Whether a ``units:`` item is a glob rather than one unit's name."""
    return any(char in pattern for char in _WILDCARDS)


def unit_pattern_problem(pattern: object) -> Optional[str]:
    """Why ``pattern`` cannot be a ``units:`` item (None when it can).

    A literal must be a runnable unit's name (:func:`is_unit_name`). A glob
    may use ``*``, ``?`` and ``[...]`` (``[!...]`` negates) over the unit
    name characters, must begin with a fixed character and end in a fixed
    ``.type``: ``worker@*.service``, not ``*.service`` (every service) nor
    ``app.*`` (every kind of unit).
    """
    if not isinstance(pattern, str) or not pattern:
        return "is not a unit name"
    if len(pattern) > MAX_UNIT_NAME:
        return f"is longer than systemd's {MAX_UNIT_NAME} characters for a unit name"
    stem, dot, kind = pattern.rpartition(".")
    if not dot or kind not in UNIT_TYPES:
        return f"does not end in a unit type such as .service (known: {', '.join(UNIT_TYPES)})"
    if not is_glob(pattern):
        if stem.endswith("@"):
            return "is a template, which never runs: name its instances, e.g. " \
                   f"{stem}*.{kind}"
        if not is_unit_name(pattern):
            return "is not a unit name: use letters, digits and : _ . \\ - @ before the type"
        return None
    if pattern[0] in _WILDCARDS:
        return "begins with a wildcard, so it could match units never meant: begin " \
               "with the unit's name, e.g. app-*.service"
    if not _is_glob_stem(stem):
        return "is not a unit glob: use unit name characters with *, ? and [...]"
    return None


def _is_glob_stem(stem: str) -> bool:
    """Whether ``stem`` (the glob before its ``.type``) is unit name
    characters, ``*``, ``?`` and well-formed ``[...]`` classes."""
    rest = stem
    while rest:
        char = rest[0]
        if char == "[":
            end = rest.find("]", 2 if rest[1:2] == "!" else 1)
            inner = rest[1:end].removeprefix("!") if end > 0 else ""
            if not inner or "[" in inner or not _UNIT_CHARS.match(inner):
                return False
            rest = rest[end + 1:]
            continue
        if char not in "*?" and not _UNIT_CHARS.match(char):
            return False
        rest = rest[1:]
    return True


def grants(grant: Grant, unit: str) -> bool:
    """Whether ``grant`` lets ``unit`` (a unit's name, as systemd gives it)
    load its credential: ``unit`` is a valid unit name equal to one of its
    patterns or matched by one (case-sensitively: unit names are)."""
    return is_unit_name(unit) and any(
        fnmatch.fnmatchcase(unit, pattern) if is_glob(pattern) else unit == pattern
        for pattern in grant.units)


def may_overlap(first: str, second: str) -> bool:
    """Whether some unit could match both patterns (each a valid ``units:``
    item). Exact for a literal; for two globs conservative: they are apart
    only when their fixed beginnings (before the first wildcard) or their
    fixed endings (after the last) cannot both hold, else assumed to meet."""
    if not is_glob(first) or not is_glob(second):
        literal, other = (first, second) if not is_glob(first) else (second, first)
        return fnmatch.fnmatchcase(literal, other) if is_glob(other) else literal == other
    heads = _fixed_head(first), _fixed_head(second)
    tails = _fixed_tail(first), _fixed_tail(second)
    return (heads[0].startswith(heads[1]) or heads[1].startswith(heads[0])) and \
        (tails[0].endswith(tails[1]) or tails[1].endswith(tails[0]))


def _fixed_head(pattern: str) -> str:
    cut = min((pattern.find(char) for char in _WILDCARDS if char in pattern),
              default=len(pattern))
    return pattern[:cut]


def _fixed_tail(pattern: str) -> str:
    # ']' is no unit name character: outside a class it only ever closes one.
    cut = max(pattern.rfind(char) for char in "*?]")
    return pattern[cut + 1:]


def change_names(grant: Grant) -> Tuple[str, ...]:
    """How ``KV_AGENT_CHANGED`` names a changed credential: one
    ``credential:<unit pattern>/<ID>`` per pattern of its grant (no pattern or
    ID holds a space, so the names split on spaces like paths)."""
    return tuple(f"{CHANGE_PREFIX}{unit}/{grant.id}" for unit in grant.units)


def parse_peer(address: Union[bytes, str, None]) -> Optional[Peer]:
    """The unit and credential ID that systemd's credential loader names in
    its client address (``getpeername()`` of an accepted connection), or None
    for anything else.

    The only accepted shape is an abstract address (Python gives it as bytes
    starting with NUL) of at most SUN_PATH_MAX bytes, all ASCII with no
    other NUL: ``\\0<random>/unit/<unit>/<ID>``, where the random part is
    non-empty, the unit passes :func:`is_unit_name` and the ID
    :func:`is_credential_name`. A path socket (a str), an unbound client
    (``''`` or ``b''``), an ID with a '/' (one part too many), '.' or '..',
    bytes that are not ASCII: None, and the caller serves nothing.
    """
    if not isinstance(address, bytes) or not 1 < len(address) <= SUN_PATH_MAX \
            or address[0] != 0:
        return None
    try:
        text = address[1:].decode("ascii")
    except UnicodeDecodeError:
        return None
    parts = text.split("/")
    if "\0" in text or len(parts) != 4 or parts[1] != "unit":
        return None
    random, _, unit, credential_id = parts
    if not random.isprintable() or not random or not is_unit_name(unit) \
            or not is_credential_name(credential_id):
        return None
    return Peer(unit, credential_id)
