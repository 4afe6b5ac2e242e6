"""Link 6 of the chain: systemd credentials, from the agent's socket to each
unit granted one.

A credential reaches a unit only when three things hold, and doctor checks
each (for a manifest with at least one ``credential:``):

1. the socket: ``$STATE_DIR/credentials.sock`` (default
   /run/kv-agent/credentials.sock) exists while the agent runs, is a socket,
   root's, and no one else's to connect to (mode 0600). Anyone who could
   connect could bind a client address that names any unit, so a mode that
   lets others in is a failure; a file there instead of a socket would be
   read by systemd as the credential itself, for every unit;
2. the units: each granted unit name that exists, and each loaded unit a
   granted glob matches (``systemctl list-units --all``: an instance of
   ``worker@*.service`` exists only while loaded);
3. each such unit's ``LoadCredential=`` has ``<ID>:<socket>`` for every ID
   granted to it, and the unit is ordered ``After=kv-agent.service`` (else
   at boot it may ask before the socket exists, and fail). Where it does not,
   the check gives the exact lines and the drop-in command (a drop-in's
   ``LoadCredential=`` with an ID the unit already loads replaces that one:
   measured on systemd 252 and 257).

``systemctl show -p LoadCredential`` prints ``[unprintable]`` on both 252 and
257, so the value comes from D-Bus: ``busctl --json=short get-property``
on the unit's object path (:func:`object_path`), which answers
``{"type":"a(ss)","data":[[ID, PATH], ...]}`` (:func:`parse_load_credentials`).
Asking a path loads the unit, so a unit that does not exist answers too,
with no credential: its ``LoadState`` (``not-found``) is asked first. A unit
that does not exist yet is a note, not a failure: it may be installed later.

Bounded as the rest of doctor: every ``systemctl`` and ``busctl`` run gets
a few seconds (:func:`agent.doctor.machine.ask_systemd`, injectable through
:class:`~agent.doctor.machine.Host`), at most MAX_UNITS units are asked, and
once systemd gives no answer in time it is asked nothing more. Nothing here
reads a credential's value: only IDs, unit names and paths, escaped.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shlex
import stat
import string
from typing import Callable, List, Mapping, Optional, Sequence, Tuple, TypeVar, Union

from agent.base.errors import PermissionDeniedError
from agent.base.untrusted import escape
from agent.doctor.machine import Host, Reply
from agent.doctor.report import FAIL, OK, WARN, Check
from agent.doctor.unit_env import UNIT as AGENT_UNIT
from agent.manifest import Manifest
from agent.pipeline.credentials import (
    MAX_UNIT_AND_ID,
    SOCKET_NAME,
    Grant,
    is_glob,
    is_unit_name,
)
from agent.status.render import is_running
from agent.status.snapshot import STOPPED, parse_snapshot
from agent.status.store import StateStore, state_dir

SOCKET_MODE = 0o600
MAX_UNITS = 64  # units asked about, at two or three short busctl runs each
SYSTEMD_BUS = "org.freedesktop.systemd1"
UNIT_OBJECT_PREFIX = "/org/freedesktop/systemd1/unit/"
UNIT_INTERFACE = "Unit"  # org.freedesktop.systemd1.Unit: LoadState, After
# The unit types systemd starts processes for, with an execution context and
# so LoadCredential=: the D-Bus interface that carries it
# (org.freedesktop.systemd1.Service...), and the unit file section it is
# written in. The other types (timer, target, path...) start no process.
EXEC_SECTIONS = {"service": "Service", "socket": "Socket", "mount": "Mount", "swap": "Swap"}
LIST_UNITS = ("systemctl", "list-units", "--all", "--plain", "--no-legend", "--full", "--")

Lstat = Callable[[str], os.stat_result]
T = TypeVar("T")
_LETTERS = frozenset(string.ascii_letters)


# -- the pure parts -------------------------------------------------------------------


def socket_path(environ: Mapping[str, str]) -> str:
    """Where the running agent listens: ``credentials.sock`` in its state
    directory (``$KV_AGENT_STATE_DIR``, default /run/kv-agent)."""
    return os.path.join(state_dir(environ), SOCKET_NAME)


def object_path(unit: str) -> str:
    """The unit's D-Bus object path, as systemd's ``bus_label_escape()``
    builds it: each byte outside ``[A-Za-z0-9]`` (and a digit that comes
    first) becomes ``_`` and two lower-case hex digits; ``app.service`` is
    ``/org/freedesktop/systemd1/unit/app_2eservice``."""
    label = "".join(
        chr(byte) if chr(byte) in _LETTERS or (index and chr(byte) in string.digits)
        else f"_{byte:02x}" for index, byte in enumerate(unit.encode()))
    return UNIT_OBJECT_PREFIX + (label or "_")


def busctl_property(unit: str, interface: str, name: str) -> List[str]:
    """The argv that reads one property of ``unit`` as JSON."""
    return ["busctl", "--json=short", "get-property", SYSTEMD_BUS, object_path(unit),
            f"{SYSTEMD_BUS}.{interface}", name]


def parse_property(text: str, signature: str) -> object:
    """The ``data`` of ``busctl --json=short get-property``'s answer,
    ``{"type": SIGNATURE, "data": ...}``. Raises ValueError for anything
    else (not JSON, another type)."""
    try:
        answer = json.loads(text)
    except ValueError:
        raise ValueError("not busctl's JSON") from None
    if not isinstance(answer, dict) or answer.get("type") != signature or "data" not in answer:
        raise ValueError(f"not a value of type {signature}")
    return answer["data"]


def parse_load_state(text: str) -> str:
    """A unit's ``LoadState`` (``loaded``, ``not-found``, ``masked``,
    ``bad-setting``...) from busctl's JSON answer of type ``s``."""
    data = parse_property(text, "s")
    if not isinstance(data, str):
        raise ValueError("s is not a string")
    return data


def parse_load_credentials(text: str) -> Tuple[Tuple[str, str], ...]:
    """A unit's ``LoadCredential=`` pairs, (ID, path), from busctl's JSON
    answer of type ``a(ss)``. A line without a path (``LoadCredential=ID``,
    read from the credential store) has its ID as its path. Raises
    ValueError for another shape."""
    data = parse_property(text, "a(ss)")
    if not isinstance(data, list):
        raise ValueError("a(ss) is not a list")
    pairs = []
    for item in data:
        if not (isinstance(item, list) and len(item) == 2
                and all(isinstance(part, str) for part in item)):
            raise ValueError("an a(ss) item is not two strings")
        pairs.append((item[0], item[1]))
    return tuple(pairs)


def parse_strings(text: str) -> Tuple[str, ...]:
    """A list property (``as``: After=, Wants=) from busctl's JSON."""
    data = parse_property(text, "as")
    if not isinstance(data, list) or not all(isinstance(item, str) for item in data):
        raise ValueError("as is not a list of strings")
    return tuple(data)


def parse_unit_list(text: str) -> List[Tuple[str, str]]:
    """(unit, load state) of each line of ``systemctl list-units --all
    --plain --no-legend --full``: ``UNIT LOAD ACTIVE SUB DESCRIPTION``, the
    description free text, the names never holding a space. Lines that do
    not start with a valid unit name are skipped."""
    found = []
    for line in text.splitlines():
        fields = line.split(None, 2)
        if len(fields) >= 2 and is_unit_name(fields[0]):
            found.append((fields[0], fields[1]))
    return found


def granted_ids(grants: Sequence[Grant], unit: str) -> List[str]:
    """The IDs granted to ``unit``, in manifest order, each once."""
    return list(dict.fromkeys(grant.id for grant in grants if grant.admits(unit)))


def is_same_path(first: str, second: str) -> bool:
    """Whether two socket paths name one file: equal once normalised, or once
    symlinks are resolved (/var/run is /run)."""
    return os.path.normpath(first) == os.path.normpath(second) or \
        os.path.realpath(first) == os.path.realpath(second)


def credential_lines(ids: Sequence[str], socket: str) -> List[str]:
    """The ``LoadCredential=`` line for each ID, from ``socket``."""
    return [f"LoadCredential={credential_id}:{socket}" for credential_id in ids]


def edit_target(unit: str) -> str:
    """The unit to edit so the fix lasts: an instance's template
    (``worker@.service`` for ``worker@1.service``: every instance gets it),
    else the unit."""
    stem, dot, kind = unit.rpartition(".")
    prefix, at, _ = stem.partition("@")
    return f"{prefix}@{dot}{kind}" if at else unit


def judge_unit(unit: str, ids: Sequence[str], loaded: Sequence[Tuple[str, str]],
               after: Sequence[str], socket: str) -> Check:
    """The check of one existing unit: whether it loads every ID in ``ids``
    from ``socket`` (``loaded``, its LoadCredential= pairs) and is ordered
    after kv-agent (``after``, its After= list). Pure."""
    subject = f"unit {unit}"
    from_socket = {cid for cid, path in loaded if is_same_path(path, socket)}
    elsewhere = {cid: path for cid, path in loaded if cid not in from_socket}
    missing = [cid for cid in ids if cid not in from_socket]
    is_ordered = AGENT_UNIT in after
    kind = unit.rpartition(".")[2]
    target = shlex.quote(edit_target(unit))  # an instance may hold a backslash: \x2d
    ordering = f"Wants={AGENT_UNIT} and After={AGENT_UNIT}"
    if not missing:
        detail = f"loads {', '.join(ids)} from {socket}"
        if is_ordered:
            return Check(subject, "credentials", OK, detail)
        return Check(subject, "credentials", WARN,
                     f"{detail}, but is not ordered after {AGENT_UNIT}: at boot it may ask "
                     "before the socket exists and fail to start",
                     f"systemctl edit {target}, add under [Unit]: {ordering}")
    parts = [f"{cid} (its line loads {escape(elsewhere[cid], 200)})" if cid in elsewhere
             else f"{cid} (no LoadCredential= line)" for cid in missing]
    lines = " and ".join(credential_lines(missing, socket))
    fix = f"systemctl edit {target}, add under [{EXEC_SECTIONS[kind]}]: {lines}"
    if not is_ordered:
        fix += f", and under [Unit]: {ordering}"
    return Check(subject, "credentials", FAIL,
                 f"does not load from {socket}: {', '.join(parts)}",
                 f"{fix}; then systemctl restart {shlex.quote(unit)}")


def check_socket(path: str, running: Optional[bool], lstat: Lstat = os.lstat) -> Check:
    """The socket the units load from: a socket, root's, that no one else may
    connect to. ``running`` is whether the agent runs (None: unknown): while
    it does, a missing socket fails; while it does not, the agent creates it
    at start, and a socket left behind refuses every unit until then."""
    subject = "credentials"
    try:
        found: Optional[os.stat_result] = lstat(path)
    except FileNotFoundError:
        found = None
    except OSError as exc:
        return Check(subject, "socket", WARN, f"cannot read {path}: {exc.strerror or exc}",
                     "run as root: sudo kv-agent doctor")
    if found is None:
        return _missing_socket(path, running)
    if not stat.S_ISSOCK(found.st_mode):
        return Check(subject, "socket", FAIL,
                     f"{path} is not a socket: systemd would read it as the credential "
                     "itself, for any unit that asks",
                     f"rm {path}; systemctl restart kv-agent")
    mode = stat.S_IMODE(found.st_mode)
    if mode & 0o077:
        return Check(subject, "socket", FAIL,
                     f"{path} has mode {mode:04o}: other users can connect and pose as any "
                     f"unit (it must be {SOCKET_MODE:04o})",
                     f"systemctl restart kv-agent (it creates the socket {SOCKET_MODE:04o})")
    if found.st_uid != 0:
        return Check(subject, "socket", FAIL,
                     f"{path} belongs to uid {found.st_uid}, not root: that user could "
                     "open it to anyone",
                     "run kv-agent as root, as its packaged unit does")
    if running is False:
        return Check(subject, "socket", WARN,
                     f"{path} is left from an earlier run and kv-agent is not running: a "
                     "unit that loads from it fails to start (connection refused)",
                     "systemctl start kv-agent (it replaces the socket)")
    return Check(subject, "socket", OK, f"{path}: a socket, root's, mode {mode:04o}")


def _missing_socket(path: str, running: Optional[bool]) -> Check:
    if running:
        return Check("credentials", "socket", FAIL,
                     f"kv-agent runs but {path} does not exist: every unit that loads "
                     "from it fails to start (Failed to set up credentials: Protocol error)",
                     "journalctl -u kv-agent says why; systemctl restart kv-agent creates "
                     "it when the manifest has a credential")
    if running is None:
        return Check("credentials", "socket", WARN,
                     f"{path} does not exist, and whether kv-agent runs is unknown (its "
                     "status is root's)", "run as root: sudo kv-agent doctor")
    return Check("credentials", "socket", WARN,
                 f"kv-agent is not running: it creates {path} at start; until then a unit "
                 "that loads from it fails to start", "systemctl enable --now kv-agent")


# -- asking systemd, bounded ----------------------------------------------------------


class UnitProbe:
    """The unit checks of one manifest's grants, asking systemd through
    ``ask`` (an argv run bounded; :attr:`Host.systemd`). Once systemd gives
    no answer in time, it is asked nothing more."""

    def __init__(self, ask: Callable[[Sequence[str]], Reply], socket: str) -> None:
        self.ask = ask
        self.socket = socket
        self.is_silent = False

    def check(self, grants: Sequence[Grant]) -> List[Check]:
        """One check per unit that exists (or not, for a literal name), in
        manifest order, and a note per glob that matches no loaded unit."""
        patterns = list(dict.fromkeys(unit for grant in grants for unit in grant.units))
        checks: List[Check] = []
        units = [pattern for pattern in patterns if not is_glob(pattern)]
        globs = [pattern for pattern in patterns if is_glob(pattern)]
        if globs:
            matched, glob_checks = self._expand(globs)
            checks += glob_checks
            units += [unit for unit in matched if unit not in units]
        for index, unit in enumerate(units):
            if index == MAX_UNITS:
                checks.append(Check("credentials", "units", WARN,
                                    f"{len(units) - MAX_UNITS} more granted units not checked "
                                    f"(doctor checks {MAX_UNITS})"))
                break
            if self.is_silent:
                checks.append(Check(f"unit {unit}", "credentials", WARN,
                                    "not checked: systemd gave no answer in time (above)"))
                continue
            checks.append(self._check_unit(unit, granted_ids(grants, unit),
                                           needs_load_state=unit in patterns))
        return checks

    def _run(self, argv: Sequence[str]) -> Reply:
        reply = self.ask(argv)
        self.is_silent = self.is_silent or reply.is_timeout
        return reply

    def _expand(self, globs: Sequence[str]) -> Tuple[List[str], List[Check]]:
        """The loaded units the globs match, and a note per glob matching none."""
        reply = self._run([*LIST_UNITS, *globs])
        if reply.output is None:
            return [], [Check("credentials", "units", WARN,
                              f"cannot list the units matching {', '.join(globs)}: "
                              f"{escape(reply.why, 300)}")]
        loaded = [unit for unit, load in parse_unit_list(reply.output) if load == "loaded"]
        matched: List[str] = []
        notes = []
        for pattern in globs:
            found = [unit for unit in loaded if fnmatch.fnmatchcase(unit, pattern)
                     and is_unit_name(unit)]
            if not found:
                notes.append(Check(f"units {pattern}", "credentials", OK,
                                   f"no unit matching {pattern} is loaded now; each is "
                                   "checked while it is"))
            matched += [unit for unit in found if unit not in matched]
        return matched, notes

    def _check_unit(self, unit: str, ids: Sequence[str], needs_load_state: bool) -> Check:
        subject = f"unit {unit}"
        kind = unit.rpartition(".")[2]
        if needs_load_state:
            state = self._read(unit, UNIT_INTERFACE, "LoadState", parse_load_state)
            if isinstance(state, Check):
                return state
            if state == "not-found":
                lines = " and ".join(credential_lines(ids, self.socket))
                return Check(subject, "exists", WARN,
                             f"no such unit (yet): granted {', '.join(ids)}, nothing loads it",
                             f"when you create it, give it {lines} and After={AGENT_UNIT}")
            if state == "masked":
                return Check(subject, "exists", WARN, "masked, so it cannot start",
                             f"systemctl unmask {unit}, if it should run")
            if state != "loaded":
                return Check(subject, "exists", WARN,
                             f"systemd cannot load it ({escape(state, 40)}), so it cannot start",
                             f"systemctl status {unit} says why")
        if kind not in EXEC_SECTIONS:
            return Check(subject, "credentials", WARN,
                         f"a .{kind} unit starts no process of its own, so it cannot load a "
                         "credential", "grant the service it starts instead")
        too_long = [cid for cid in ids if len(unit) + len(cid) > MAX_UNIT_AND_ID]
        if too_long:
            return Check(subject, "credentials", FAIL,
                         f"its name and the ID {too_long[0]} are {len(unit) + len(too_long[0])} "
                         "characters together: systemd cannot name both in a socket address, "
                         "so the unit always fails to start",
                         "serve it under a shorter ID (credential: id: in the manifest)")
        loaded = self._read(unit, EXEC_SECTIONS[kind], "LoadCredential", parse_load_credentials)
        if isinstance(loaded, Check):
            return loaded
        after = self._read(unit, UNIT_INTERFACE, "After", parse_strings)
        if isinstance(after, Check):
            return after
        return judge_unit(unit, ids, loaded, after, self.socket)

    def _read(self, unit: str, interface: str, name: str,
              parse: Callable[[str], T]) -> Union[T, Check]:
        """One property of ``unit``, parsed, or the WARN saying why it could not be read."""
        reply = self._run(busctl_property(unit, interface, name))
        if reply.output is None:
            return Check(f"unit {unit}", "credentials", WARN,
                         f"cannot read its {name}=: {escape(reply.why, 300)}")
        try:
            return parse(reply.output)
        except ValueError as exc:
            return Check(f"unit {unit}", "credentials", WARN,
                         f"busctl's answer for its {name}= is unexpected: {exc}")


# -- the link -------------------------------------------------------------------------


def check_credentials(manifest: Manifest, environ: Mapping[str, str],
                      host: Host = Host()) -> List[Check]:
    """The socket and each granted unit's ``LoadCredential=``; nothing for a
    manifest without credentials."""
    grants = [grant for entry in manifest.secrets for grant in entry.grants]
    if not grants:
        return []
    socket = socket_path(environ)
    checks = [check_socket(socket, is_agent_running(environ))]
    if not host.is_systemd():
        return checks + [Check("credentials", "units", WARN,
                               "systemd is not running here, so no unit's LoadCredential= "
                               "can be read")]
    return checks + UnitProbe(host.systemd, socket).check(grants)


def is_agent_running(environ: Mapping[str, str]) -> Optional[bool]:
    """Whether the agent runs, by its status document, as the agent checks
    judge it: False when there is none, None when it is root's to read."""
    try:
        snapshot = parse_snapshot(StateStore(state_dir(environ)).load())
    except PermissionDeniedError:
        return None
    return snapshot is not None and snapshot.phase != STOPPED and is_running(snapshot.pid)
