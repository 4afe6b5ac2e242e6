"""The daemon's lifecycle decisions, as pure functions of (state, event, clock).

Every test drives :mod:`agent.daemon.lifecycle` with plain numbers for the monotonic
clock and the jitter draw: no process, no thread, no sleep."""

from __future__ import annotations

import pytest

from agent.daemon import lifecycle
from agent.daemon.lifecycle import (
    FAILURE_RETRY_S,
    FIRST_FAILURE_RETRY_S,
    MIN_DELAY_S,
    START_RETRY_S,
    STUCK_AFTER_S,
    Lifecycle,
    Schedule,
)
from agent.manifest import DEFAULT_JITTER, DEFAULT_REFRESH_S
from agent.status.snapshot import READY, RELOADING, STARTING, STOPPED

INTERVAL_S = 900.0


def scheduled(state: Lifecycle, interval_s: float = INTERVAL_S,
              jitter: float = 0.0) -> Lifecycle:
    return lifecycle.rescheduled(state, Schedule(interval_s, jitter))


def finish(state: Lifecycle, now: float, *, is_failing: bool = False, is_current: bool = True,
           has_files: bool = True, rng: float = 0.5, jitter: float = 0.0) -> lifecycle.Finished:
    """The refresh ends at ``now``, under the schedule (INTERVAL_S, ``jitter``)."""
    return lifecycle.sync_finished(scheduled(state, jitter=jitter), is_failing=is_failing,
                                   is_current=is_current,
                                   has_every_required_file=lambda: has_files, now=now, rng=rng)


def started(state: Lifecycle, now: float) -> Lifecycle:
    state, start = lifecycle.start_sync(state, now)
    assert start
    return state


def test_first_refresh_with_every_file_makes_ready() -> None:
    """A refresh that leaves every required file on disk says READY=1 once and
    schedules the next at the interval."""
    state = started(Lifecycle(), now=10.0)
    assert (state.phase, state.is_syncing, state.next_refresh) == (STARTING, True, None)
    done = finish(state, now=11.0)
    assert done.announce_ready and done.became_ready and not done.start_sync
    assert done.state.phase == READY and done.state.is_ready
    assert done.state.next_refresh == 11.0 + INTERVAL_S
    again = finish(started(done.state, now=911.0), now=912.0)
    assert not again.announce_ready and not again.became_ready


def test_no_ready_while_a_required_file_is_missing() -> None:
    """Without every required file (IMDS down: no per-secret error at all) there is
    no READY=1, however the refresh went."""
    for is_failing in (True, False):
        done = finish(started(Lifecycle(), 0.0), now=1.0, is_failing=is_failing,
                      has_files=False)
        assert not done.announce_ready and not done.state.is_ready
        assert done.state.phase == STARTING


def test_files_are_looked_at_only_until_ready() -> None:
    """Once ready, no refresh stats the files again (the hot path stays cheap)."""
    ready = finish(started(Lifecycle(), 0.0), now=1.0).state

    def never() -> bool:
        raise AssertionError("looked at the files after READY")

    lifecycle.sync_finished(started(ready, 2.0), is_failing=False, is_current=True,
                            has_every_required_file=never, now=3.0, rng=0.5)


def test_start_up_failures_back_off_from_one_to_thirty_seconds() -> None:
    """While starting, failing refreshes retry after 1, 2, 4 ... s, at most 30 s."""
    state, now, delays = Lifecycle(), 0.0, []
    for _ in range(7):
        done = finish(started(state, now), now, is_failing=True, has_files=False)
        assert done.state.next_refresh is not None
        delays.append(done.state.next_refresh - now)
        state, now = done.state, done.state.next_refresh
    first, largest = START_RETRY_S
    assert delays == [first, 2 * first, 4 * first, 8 * first, 16 * first, largest, largest]


def test_failures_once_ready_back_off_up_to_the_interval_and_reset() -> None:
    """Once ready, failures retry after 5 to 60 s (the first), then 10, 20 ... s up to
    the interval; a good refresh goes back to the interval."""
    state = finish(started(Lifecycle(), 0.0), 0.0).state
    delays = []
    now = 0.0
    for _ in range(10):
        state = finish(started(state, now), now, is_failing=True, rng=0.0).state
        assert state.next_refresh is not None
        delays.append(state.next_refresh - now)
    assert delays[:3] == [FIRST_FAILURE_RETRY_S[0], 2 * FAILURE_RETRY_S, 4 * FAILURE_RETRY_S]
    assert max(delays) == INTERVAL_S
    state = finish(started(state, now), now, rng=0.5).state
    assert state.failing_streak == 0 and state.next_refresh == now + INTERVAL_S
    state = finish(started(state, now), now).state
    assert state.next_refresh == now + INTERVAL_S


@pytest.mark.parametrize("rng, delay", [(0.0, 5.0), (0.5, 32.5), (0.999999, 60.0)])
def test_a_ready_agents_first_failure_retries_anywhere_in_a_minute(rng: float,
                                                                   delay: float) -> None:
    """A ready agent's first failed refresh retries uniformly within 5 to 60 s, not at
    5 s +- 10 %: a fleet whose refreshes all failed at the end of a vault outage must
    not come back in the same 10-s window (issue 12, fleet: per-secret refresh was over
    the vault's limit after an outage). Never later than the interval."""
    ready = finish(started(Lifecycle(), 0.0), 0.0).state
    state = finish(started(ready, 10.0), 10.0, is_failing=True, rng=rng, jitter=0.10).state
    assert state.next_refresh == pytest.approx(10.0 + delay, rel=1e-5)
    assert lifecycle.refresh_delay(scheduled(ready, 20.0, 0.1), True, 0.999) == 20.0


@pytest.mark.parametrize("rng, factor", [(0.0, 0.9), (0.5, 1.0), (0.999999, 1.1)])
def test_the_first_good_refresh_after_failures_keeps_the_interval(rng: float,
                                                                  factor: float) -> None:
    """After failures, the first good refresh places the next one at the interval +-
    jitter, like any other: a fleet that came back spread over the minutes its vault
    took to serve it keeps that spread. (Placing it in the interval's second half
    squeezed a per-secret fleet's recovery into half an interval, over the vault's
    limit again: issue 12, fleet.)"""
    ready = finish(started(Lifecycle(), 0.0), 0.0).state
    failed = finish(started(ready, 10.0), 10.0, is_failing=True).state
    state = finish(started(failed, 20.0), 20.0, rng=rng, jitter=0.10).state
    assert state.next_refresh == pytest.approx(20.0 + INTERVAL_S * factor, rel=1e-5)
    assert lifecycle.refresh_delay(scheduled(failed, 0.1, 0.1), False, 0.999) == MIN_DELAY_S


@pytest.mark.parametrize("rng,factor", [(0.0, 0.9), (0.5, 1.0), (0.999999, 1.1)])
def test_jitter_spreads_the_interval_either_way(rng: float, factor: float) -> None:
    """A 10% jitter places the next refresh within +-10% of the interval."""
    state = finish(started(Lifecycle(), 0.0), 0.0, rng=rng, jitter=0.10).state
    assert state.next_refresh == pytest.approx(INTERVAL_S * factor, rel=1e-5)


def test_delay_never_below_half_a_second() -> None:
    """Whatever the interval and jitter, refreshes are at least 0.5 s apart."""
    assert lifecycle.refresh_delay(scheduled(Lifecycle(is_ready=True), 0.1, 0.5), False,
                                   0.0) == 0.5


def test_the_lifecycle_holds_the_manifests_schedule() -> None:
    """The state holds the schedule (the manifest's defaults until one is installed); a
    new one places the refreshes from the next one's end, a refresh already planned
    keeps its time, and other state is kept."""
    assert Lifecycle().schedule == Schedule(DEFAULT_REFRESH_S, DEFAULT_JITTER)
    ready = lifecycle.sync_finished(
        started(scheduled(Lifecycle(), 60.0), 0.0), is_failing=False, is_current=True,
        has_every_required_file=lambda: True, now=1.0, rng=0.5).state
    assert ready.next_refresh == 61.0
    rescheduled = scheduled(ready, 600.0, 0.5)
    assert rescheduled == ready._replace(schedule=Schedule(600.0, 0.5))
    assert rescheduled.next_refresh == 61.0
    done = lifecycle.sync_finished(started(rescheduled, 61.0), is_failing=False,
                                   is_current=True, has_every_required_file=lambda: True,
                                   now=62.0, rng=0.75)
    assert done.state.next_refresh == pytest.approx(62.0 + 600.0 * 1.25)


def test_refreshes_never_overlap_one_asked_for_meanwhile_follows() -> None:
    """A refresh asked for while one runs is queued, then started when it finishes,
    with no timer set meanwhile."""
    state = started(Lifecycle(), 0.0)
    state, start = lifecycle.start_sync(state, 0.5)
    assert not start and state.sync_again
    done = finish(state, 1.0)
    assert done.start_sync and done.state.is_syncing and not done.state.sync_again
    assert done.state.next_refresh is None and done.state.sync_started == 1.0


def test_refresh_for_a_replaced_manifest_is_redone_and_runs_no_hooks() -> None:
    """A refresh that finished for a manifest a reload replaced starts another,
    and its changes trigger no hook."""
    ready = finish(started(Lifecycle(), 0.0), 0.0).state
    done = finish(started(ready, 1.0), 2.0, is_current=False)
    assert done.start_sync and not done.run_hooks


def test_hooks_run_only_once_ready_and_for_the_current_manifest() -> None:
    """The first refresh (before READY) runs no hook; later ones do."""
    first = finish(started(Lifecycle(), 0.0), 0.0)
    assert not first.run_hooks
    assert finish(started(first.state, 1.0), 1.0).run_hooks


def test_reload_says_ready_again_once_the_manifest_is_in_use() -> None:
    """An accepted reload announces READY=1 at once, not after its refresh (which may
    wait on the network), and that refresh's end announces nothing more."""
    ready = finish(started(Lifecycle(), 0.0), 0.0).state
    reloading = lifecycle.reload_started(ready)
    assert reloading.phase == RELOADING
    accepted, announce = lifecycle.reload_accepted(reloading)
    assert announce and accepted.phase == READY
    done = finish(started(accepted, 5.0), 6.0)
    assert not done.announce_ready and not done.became_ready and done.state.phase == READY
    starting, announce = lifecycle.reload_accepted(lifecycle.reload_started(Lifecycle()))
    assert not announce and starting.phase == STARTING


def test_rejected_reload_announces_ready_only_when_it_was_ready() -> None:
    """A rejected edit ends the reload: READY=1 if the agent was ready, else it
    stays starting (a READY=1 then would announce files that may not exist)."""
    ready = finish(started(Lifecycle(), 0.0), 0.0).state
    state, announce = lifecycle.reload_rejected(lifecycle.reload_started(ready))
    assert announce and state.phase == READY
    state, announce = lifecycle.reload_rejected(lifecycle.reload_started(Lifecycle()))
    assert not announce and state.phase == STARTING


def test_timer_is_due_only_when_idle_and_past_the_deadline() -> None:
    """The timer fires at next_refresh, never while a refresh runs."""
    state = finish(started(Lifecycle(), 0.0), 0.0).state
    assert not lifecycle.is_refresh_due(state, INTERVAL_S - 0.001)
    assert lifecycle.is_refresh_due(state, INTERVAL_S)
    assert not lifecycle.is_refresh_due(started(state, INTERVAL_S), INTERVAL_S + 1)


def test_watchdog_is_withheld_for_a_stuck_refresh() -> None:
    """WATCHDOG=1 stops once one refresh has run for STUCK_AFTER_S."""
    state = started(Lifecycle(), 100.0)
    assert lifecycle.is_healthy(state, 100.0 + STUCK_AFTER_S - 1)
    assert not lifecycle.is_healthy(state, 100.0 + STUCK_AFTER_S)
    assert lifecycle.is_healthy(lifecycle.sync_abandoned(state), 1e9)


def test_stop_clears_the_next_refresh() -> None:
    """After STOPPING=1 the phase is stopped and no refresh is announced."""
    state = lifecycle.stopped(finish(started(Lifecycle(), 0.0), 0.0).state)
    assert (state.phase, state.next_refresh) == (STOPPED, None)


def test_states_are_immutable() -> None:
    """A Lifecycle is a value: decisions return new states."""
    state = Lifecycle()
    with pytest.raises(AttributeError):
        state.phase = READY  # type: ignore[misc]


def test_while_sealed_copies_are_served_failures_retry_at_the_starting_pace() -> None:
    """Served from the cache, the agent is ready but its files stand in for an
    outage: failures retry after 1, 2, 4 ... s up to 30 s (not the ready agent's
    minute and the interval), so the vault takes over within seconds of
    answering. Once nothing is served, the ready agent's pace, even if a refresh
    still fails (an optional secret's 403 must not keep the vault asked every 30 s)."""
    state, now = Lifecycle(), 0.0
    for _ in range(3):  # starting, failing: 1, 2, 4 s
        state = finish(started(state, now), now, is_failing=True, has_files=False).state
        assert state.next_refresh is not None
        now = state.next_refresh
    state = lifecycle.served_from_cache(state)
    assert state.is_ready and state.phase == READY
    delays = []
    for _ in range(4):
        state = lifecycle.sync_finished(
            scheduled(started(state, now)), is_failing=True, is_current=True,
            has_every_required_file=lambda: True, now=now, rng=0.0, is_serving=True).state
        assert state.next_refresh is not None
        delays.append(state.next_refresh - now)
        now = state.next_refresh
    first, largest = START_RETRY_S
    assert delays == [8 * first, 16 * first, largest, largest]
    state = finish(started(state, now), now, is_failing=True, rng=0.0).state
    assert state.next_refresh is not None and state.next_refresh - now >= 2 * FAILURE_RETRY_S
