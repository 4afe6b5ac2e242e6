"""The machine doctor runs on: :class:`Host`, how doctor asks it (injectable
for tests), and the two links that live on it rather than on the network:

0. the environment the agent runs with: kv-agent.service's when that unit
   exists (:mod:`agent.doctor.unit_env`), not the shell's, and the first
   check says which was used (issue 17, item 27);
5. the running agent: its unit (``systemctl is-active``), its last refresh
   and failing entries (status.json).

Each question to the machine is bounded: a name lookup and ``systemctl``
each get a few seconds, so doctor ends in seconds even when they hang.
"""

from __future__ import annotations

import os
import queue
import socket
import subprocess
import threading
import time
from typing import Callable, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

from agent.base.errors import PermissionDeniedError
from agent.base.untrusted import escape
from agent.doctor.report import FAIL, OK, WARN, Check
from agent.doctor.unit_env import UNIT as AGENT_UNIT
from agent.doctor.unit_env import UnitEnvironment, unit_environment
from agent.status.render import is_running
from agent.status.snapshot import STOPPED, parse_snapshot
from agent.status.store import StateStore, state_dir

UNIT = "kv-agent.service"
DNS_TIMEOUT_S = 3.0
SYSTEMCTL_TIMEOUT_S = 3.0


class Reply(NamedTuple):
    """What one bounded ``systemctl`` or ``busctl`` run said: its standard
    output, or (``output`` None) why there is none: its first error line, or
    no answer in time (``is_timeout``: systemd hangs, so ask it nothing more)."""

    output: Optional[str]
    why: str = ""
    is_timeout: bool = False


class Host(NamedTuple):
    """The machine, as doctor asks it (injectable for tests): whether systemd
    runs, a unit's ``systemctl is-active`` word (None: no answer), a name
    lookup, the wall clock (epoch s), kv-agent.service's environment
    (None: no such unit) and any other question to systemd (an argv run
    bounded, :func:`ask_systemd`)."""

    is_systemd: Callable[[], bool] = lambda: os.path.isdir("/run/systemd/system")
    unit_state: Callable[[str], Optional[str]] = lambda unit: _systemctl_is_active(unit)
    resolve: Callable[[str], List[str]] = lambda host: _resolve(host)
    now: Callable[[], float] = time.time
    unit_environment: Callable[[], Optional[UnitEnvironment]] = lambda: unit_environment()
    systemd: Callable[[Sequence[str]], Reply] = lambda argv: ask_systemd(argv)


# -- 0. the environment -------------------------------------------------------------


def agent_environment(shell: Mapping[str, str], host: Host, use_unit_env: bool
                      ) -> Tuple[Mapping[str, str], List[Check]]:
    """The environment to check with, and the checks saying which it is: the
    unit's (what the agent sees) when the unit exists, else the shell's.
    Names only: a value may be a credential (IDENTITY_HEADER)."""
    found = host.unit_environment() if use_unit_env else None
    if found is None:
        why = "--no-unit-env" if not use_unit_env else f"no {AGENT_UNIT} here"
        return shell, [Check("environment", "source", OK, f"this shell's ({why})")]
    parts = []
    if found.from_environment:
        parts.append(f"Environment= sets {', '.join(found.from_environment)}")
    for path, names in found.from_files:
        parts.append(f"{escape(path, 200)} sets {', '.join(names) or 'nothing'}")
    detail = (f"{AGENT_UNIT}'s, as the agent runs: {'; '.join(parts) or 'no variable of its own'}"
              " (not this shell's; --no-unit-env uses it)")
    checks = [Check("environment", "source", OK, escape(detail, 600))]
    checks += [Check("environment", "file", WARN, escape(problem),
                     f"fix the unit's EnvironmentFile= (systemctl cat {AGENT_UNIT}); the "
                     "agent cannot start while it is missing")
               for problem in found.problems]
    return found.environ, checks


# -- 5. the running agent ---------------------------------------------------------------


def check_agent(environ: Mapping[str, str], host: Host = Host()) -> List[Check]:
    """The unit's state (when systemd runs) and the running agent's status
    document: its last refresh and its failing entries."""
    return [_check_unit(host)] + _check_status(environ)


def _check_unit(host: Host) -> Check:
    if not host.is_systemd():
        return Check("agent", "unit", WARN,
                     f"systemd is not running here, so {UNIT}'s state is unknown")
    state = host.unit_state(UNIT)
    if state == "active":
        return Check("agent", "unit", OK, f"{UNIT} is active")
    if state == "failed":
        return Check("agent", "unit", FAIL, f"{UNIT} has failed",
                     "read why (journalctl -u kv-agent -n 50), fix it, then "
                     "systemctl restart kv-agent")
    if state is None:
        return Check("agent", "unit", WARN, f"systemctl gave no answer about {UNIT}")
    return Check("agent", "unit", WARN, f"{UNIT} is {escape(state, 40)}",
                 "to keep the files current: systemctl enable --now kv-agent")


def _check_status(environ: Mapping[str, str]) -> List[Check]:
    store = StateStore(state_dir(environ))
    try:
        snapshot = parse_snapshot(store.load())
    except PermissionDeniedError as exc:
        return [Check("agent", "status", WARN, exc.message, "run as root: sudo kv-agent doctor")]
    if snapshot is None:
        return [Check("agent", "status", WARN,
                      f"no status in {store.path}: the agent has not run here")]
    running = snapshot.phase != STOPPED and is_running(snapshot.pid)
    refreshed = snapshot.last_refresh or "never"
    if not running:
        checks = [Check("agent", "status", WARN,
                        f"not running; its last run refreshed at {refreshed}")]
    else:
        checks = [Check("agent", "status", OK,
                        f"running (pid {snapshot.pid}, {snapshot.phase}), last refresh "
                        f"{refreshed}, next {snapshot.next_refresh or '-'}")]
    if snapshot.error:
        checks.append(Check("agent", "refresh", FAIL if running else WARN,
                            f"last refresh failed: {escape(snapshot.error)}",
                            "the checks above say why; it retries on its own"))
    for entry in snapshot.entries:
        if not entry.error:
            continue
        state = FAIL if running and not entry.is_optional else WARN
        checks.append(Check("agent", "entry", state,
                            f"{escape(entry.name, 200)} failing since "
                            f"{entry.error_since or '?'}: {escape(entry.error)}",
                            "fix what the checks above show; the agent retries at its next "
                            "refresh (or now: systemctl reload kv-agent)"))
    return checks


# -- asking the machine, bounded -------------------------------------------------------


def _resolve(host: str) -> List[str]:
    """The addresses of ``host``, within DNS_TIMEOUT_S: getaddrinfo has no
    timeout of its own, so it runs in a daemon thread left behind on timeout.
    Raises OSError (socket.gaierror, or a timeout)."""
    answers: "queue.Queue[Union[List[str], OSError]]" = queue.Queue(1)

    def lookup() -> None:
        try:
            found = socket.getaddrinfo(host, 443, proto=socket.IPPROTO_TCP)
            answers.put(list(dict.fromkeys(str(info[4][0]) for info in found)))
        except OSError as exc:
            answers.put(exc)

    threading.Thread(target=lookup, name="doctor-dns", daemon=True).start()
    try:
        answer = answers.get(timeout=DNS_TIMEOUT_S)
    except queue.Empty:
        raise OSError(f"no answer within {DNS_TIMEOUT_S:g} s") from None
    if isinstance(answer, OSError):
        raise OSError(answer.strerror or "lookup failed")
    return answer


def _systemctl_is_active(unit: str) -> Optional[str]:
    """``systemctl is-active UNIT``'s word (active, inactive, failed...),
    None when systemctl gives none in time."""
    try:
        done = subprocess.run(["systemctl", "is-active", unit], capture_output=True,
                              text=True, timeout=SYSTEMCTL_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    word = done.stdout.strip()
    return word or None


def ask_systemd(argv: Sequence[str]) -> Reply:
    """Run ``argv`` (``systemctl ...`` or ``busctl ...``) within
    SYSTEMCTL_TIMEOUT_S: its output when it exits 0, else why not (its first
    line on stderr, or the timeout; the child is killed then)."""
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, errors="replace",
                              timeout=SYSTEMCTL_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        return Reply(None, f"{argv[0]} gave no answer within {SYSTEMCTL_TIMEOUT_S:g} s",
                     is_timeout=True)
    except OSError as exc:
        return Reply(None, f"{argv[0]}: {exc.strerror or exc}")
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        return Reply(None, lines[0] if lines else f"{argv[0]} exited {done.returncode}")
    return Reply(done.stdout)
