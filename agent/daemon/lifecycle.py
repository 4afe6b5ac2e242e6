"""The daemon's lifecycle as a small state machine: pure decisions of
(state, event, clock).

Phases: ``starting`` -> ``ready`` <-> ``reloading`` (and ``stopped`` at the
end; names in :mod:`agent.status.snapshot`). Each function here takes the current
:class:`Lifecycle`, one event and the monotonic time, and returns the next
state plus what the daemon must do about it (announce READY=1, start a
refresh, run hooks). The state holds the :class:`Schedule` (the manifest's
interval and jitter), set when a manifest is installed, so no decision is
handed them again. Nothing here reads a clock, a file or a socket, so
every rule is unit-tested with plain numbers (tests/test_lifecycle.py); the
daemon (:mod:`agent.daemon.service`) performs the actions.

The rules:

* READY=1 is sent once, after the first refresh that leaves every required
  file on disk, checked file by file by the caller (``has_every_required_file``),
  never inferred from an absence of errors (issue 9). A reload ends with
  READY=1 again, only when the agent was ready before, as soon as the new
  manifest is in use or refused: never after its refresh, which may wait on
  the network for a minute while systemd >= 253 holds the unit (and
  `systemctl reload`) in "reloading" from RELOADING=1 to READY=1 (issue 17).
* Refreshes never overlap: one asked for during a refresh runs right after
  it. The next refresh is the interval with jitter; after a failure, sooner,
  backing off: 1, 2, 4 ... s (up to 30 s) while starting; once ready, the
  first retry anywhere in FIRST_FAILURE_RETRY_S (5 to 60 s, uniform), then 10,
  20, 40 ... s (up to the interval). A ready agent holds every file and loses
  nothing by waiting a little; a fleet whose refreshes failed together (the
  end of a vault outage) must not retry in the same few seconds: with 5 s
  (+-10 %) for everyone, the agents that failed in the outage's last minute
  came back within one 10-s window of each other, over the vault's limit
  (issue 12, fleet: per-secret refresh, 20 GETs an agent). After the first
  good refresh, the interval again: the fleet comes back spread over the
  minutes the vault takes to serve it, and keeps that spread (placing the
  next refresh in the interval's second half instead squeezed a recovery of
  several minutes into half an interval, over the limit again).
* While sealed copies stand in for the vault (``is_serving``, the daemon's
  cache says so), a failing refresh retries as a starting agent's does (1, 2,
  4 ... s, up to 30 s): the vault must take over as soon as it answers, not
  an interval later. Once every served entry is fetched again, the ready
  agent's rules apply (an optional entry that keeps failing does not hold the
  agent at the fast pace).
* ``on_change`` hooks run only for changes after READY, and only for a
  refresh of the current manifest.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Tuple

from agent.manifest import DEFAULT_JITTER, DEFAULT_REFRESH_S
from agent.status.snapshot import READY, RELOADING, STARTING, STOPPED

START_RETRY_S = (1.0, 30.0)  # first and largest delay while waiting to be ready
FAILURE_RETRY_S = 5.0  # a failing refresh retries after 5, 10, 20 ... s, up to the interval
FIRST_FAILURE_RETRY_S = (5.0, 60.0)  # once ready, the first retry: uniform in this span
MIN_DELAY_S = 0.5  # jitter never brings two refreshes closer than this
STUCK_AFTER_S = 600.0  # a refresh running longer than this stops the watchdog


class Schedule(NamedTuple):
    """When refreshes come: the manifest's ``refresh`` and ``refresh_jitter``
    (a fraction of the interval, either way). Until the daemon installs a
    manifest (:func:`rescheduled`), the manifest's defaults."""

    interval_s: float = DEFAULT_REFRESH_S
    jitter: float = DEFAULT_JITTER


class Lifecycle(NamedTuple):
    """Where the daemon stands. Times are monotonic seconds."""

    phase: str = STARTING
    is_ready: bool = False
    is_syncing: bool = False
    sync_started: float = 0.0
    sync_again: bool = False  # a refresh was asked for during the running one
    failing_streak: int = 0
    next_refresh: Optional[float] = None
    schedule: Schedule = Schedule()  # the manifest in use's interval and jitter


class Finished(NamedTuple):
    """What to do once a refresh has finished."""

    state: Lifecycle
    start_sync: bool  # start another refresh now
    announce_ready: bool  # READY=1 (else STATUS= only)
    became_ready: bool  # the first READY=1 of this run
    run_hooks: bool


def rescheduled(state: Lifecycle, schedule: Schedule) -> Lifecycle:
    """A manifest is installed (at start, or by a reload): its schedule
    places the refreshes from the next one's end on (a refresh already
    planned keeps its time)."""
    return state._replace(schedule=schedule)


def start_sync(state: Lifecycle, now: float) -> Tuple[Lifecycle, bool]:
    """A refresh is wanted: start it (True), or queue it after the running one."""
    if state.is_syncing:
        return state._replace(sync_again=True), False
    return state._replace(is_syncing=True, sync_started=now, next_refresh=None), True


def is_refresh_due(state: Lifecycle, now: float) -> bool:
    """The timer's refresh is due and none is running."""
    return (not state.is_syncing and state.next_refresh is not None
            and now >= state.next_refresh)


def is_healthy(state: Lifecycle, now: float) -> bool:
    """The loop runs and no refresh is stuck: worth a WATCHDOG=1."""
    return not state.is_syncing or now - state.sync_started < STUCK_AFTER_S


def sync_abandoned(state: Lifecycle) -> Lifecycle:
    """A refresh was interrupted by a stop: nothing else changes."""
    return state._replace(is_syncing=False)


def sync_finished(
    state: Lifecycle, *, is_failing: bool, is_current: bool,
    has_every_required_file: Callable[[], bool], now: float, rng: float,
    is_serving: bool = False,
) -> Finished:
    """The decisions after a refresh. ``is_current``: it ran for the manifest
    still in use (not one a reload replaced meanwhile). ``rng`` in [0, 1)
    places the jitter. ``has_every_required_file`` is called only while not
    ready: it looks at the files, which costs a stat per entry."""
    run_hooks = state.is_ready and is_current
    state = state._replace(is_syncing=False)
    again = state.sync_again or not is_current
    if again:
        state = state._replace(sync_again=False, is_syncing=True, sync_started=now,
                        next_refresh=None)
    else:
        delay = refresh_delay(state, is_failing, rng, is_serving)
        state = state._replace(next_refresh=now + delay,
                        failing_streak=state.failing_streak + 1 if is_failing else 0)
    if not state.is_ready and has_every_required_file():
        state = state._replace(is_ready=True, phase=READY)
        return Finished(state, again, True, True, run_hooks)
    return Finished(state, again, False, False, run_hooks)


def served_from_cache(state: Lifecycle) -> Lifecycle:
    """The sealed cache stood in for an unreachable vault at start and every
    required file is on disk: ready (READY=1); while copies are served, the
    caller passes ``is_serving`` to :func:`sync_finished` (agent.daemon.cache)."""
    return state._replace(is_ready=True, phase=READY)


def refresh_delay(state: Lifecycle, is_failing: bool, rng: float,
                  is_serving: bool = False) -> float:
    """Seconds to the next refresh: the schedule's interval with its jitter,
    sooner (backing off) after failures, a ready agent's first retry spread
    over a minute (see the module's rules); never below MIN_DELAY_S."""
    interval_s, jitter = state.schedule
    streak = state.failing_streak
    if (not state.is_ready or is_serving) and is_failing:
        first, largest = START_RETRY_S
        delay = min(largest, first * 2.0 ** streak, interval_s)
    elif is_failing and not streak:
        shortest, longest = FIRST_FAILURE_RETRY_S
        return max(min(interval_s, shortest + rng * (longest - shortest)), MIN_DELAY_S)
    elif is_failing:
        delay = min(interval_s, FAILURE_RETRY_S * 2.0 ** streak)
    else:
        delay = interval_s
    delay *= 1 + jitter * (2 * rng - 1)
    return max(delay, MIN_DELAY_S)


def reload_started(state: Lifecycle) -> Lifecycle:
    """RELOADING=1 was sent; the manifest is being re-read."""
    return state._replace(phase=RELOADING)


def reload_accepted(state: Lifecycle) -> Tuple[Lifecycle, bool]:
    """The new manifest is in use (its refresh starts next); True: announce
    READY=1 now, before that refresh (see the rules above)."""
    return _reload_ended(state)


def reload_rejected(state: Lifecycle) -> Tuple[Lifecycle, bool]:
    """The edit was refused and the old manifest kept; True: announce READY=1
    again."""
    return _reload_ended(state)


def _reload_ended(state: Lifecycle) -> Tuple[Lifecycle, bool]:
    """Back to ready, with READY=1. Not when the agent never was ready: a
    READY=1 now would announce files that may not exist (the first real
    READY=1 ends the reload)."""
    if state.is_ready:
        return state._replace(phase=READY), True
    return state._replace(phase=STARTING), False


def stopped(state: Lifecycle) -> Lifecycle:
    """STOPPING=1 was sent: no refresh will come."""
    return state._replace(phase=STOPPED, next_refresh=None)
