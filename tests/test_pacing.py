"""Per-vault pacing: one Retry-After shared by all of an agent's requests to one
vault, the probe after it, and the slow start (agent.vault.pacing)."""

from __future__ import annotations

import threading
import time
from typing import List

import pytest
from fakes import FakeClock
from requests.structures import CaseInsensitiveDict

from agent.base import transport
from agent.base.retry import Backoff, RetryPolicy
from agent.vault.pacing import PAUSE_BASE_S, PROBE_POLL_S, Pacing, Pause


def test_an_unthrottled_pause_admits_everything_at_once() -> None:
    """Without a Retry-After nothing waits, and answers change nothing."""
    pause = Pause(probe_timeout_s=30)
    pause.answered(sent_at=0.0)
    assert [pause.admit(now) for now in (0.0, 0.0, 1.0)] == [0.0, 0.0, 0.0]
    assert not pause.is_paused


def test_a_retry_after_holds_every_request_then_lets_one_probe_through() -> None:
    """After Retry-After every request waits for its end; then one probe goes alone,
    the others look again every PROBE_POLL_S until the probe's answer ends the pause."""
    pause = Pause(probe_timeout_s=30)
    pause.throttled(now=10.0, retry_after=5.0)
    assert pause.admit(11.0) == 4.0 and pause.admit(14.5) == 0.5
    assert pause.admit(15.0) == 0.0  # the probe
    assert pause.admit(15.0) == pause.admit(15.1) == PROBE_POLL_S
    pause.answered(sent_at=15.0)
    assert pause.admit(15.2) == 0.0 and pause.admit(15.2) == 0.0


def test_a_throttled_probe_pauses_again_and_the_later_time_wins() -> None:
    """A probe answered with Retry-After starts a new pause and a new probe after it;
    a shorter Retry-After never shortens a pause already set."""
    pause = Pause(probe_timeout_s=30)
    pause.throttled(now=0.0, retry_after=5.0)
    pause.throttled(now=1.0, retry_after=1.0)
    assert pause.admit(2.0) == 3.0
    assert pause.admit(5.0) == 0.0  # the probe ...
    pause.throttled(now=5.1, retry_after=3.0)  # ... is throttled again
    assert pause.admit(6.0) == pytest.approx(2.1)
    assert pause.admit(8.1) == 0.0 and pause.admit(8.1) == PROBE_POLL_S


def test_an_answer_to_a_request_sent_before_the_pause_does_not_end_it() -> None:
    """A reply that was already on its way says nothing about now: the pause holds."""
    pause = Pause(probe_timeout_s=30)
    pause.throttled(now=10.0, retry_after=5.0)
    pause.answered(sent_at=9.9)
    assert pause.admit(12.0) == 3.0


def test_a_probe_that_never_answers_stops_blocking_after_its_timeout() -> None:
    """A probe whose thread never reported lets the next caller probe after probe_timeout_s."""
    pause = Pause(probe_timeout_s=30)
    pause.throttled(now=0.0, retry_after=1.0)
    assert pause.admit(1.0) == 0.0
    assert pause.admit(30.9) == pytest.approx(0.1)
    assert pause.admit(31.0) == 0.0


def test_exactly_one_of_many_threads_probes() -> None:
    """Sixteen threads asking at once after a pause: one is admitted, fifteen wait."""
    pause = Pause(probe_timeout_s=30)
    pause.throttled(now=0.0, retry_after=1.0)
    barrier = threading.Barrier(16)
    admitted: List[float] = []

    def ask() -> None:
        barrier.wait()
        admitted.append(pause.admit(2.0))

    threads = [threading.Thread(target=ask) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(admitted) == [0.0] + [PROBE_POLL_S] * 15


def test_throttles_in_a_row_lengthen_the_pause_by_the_backoff_step() -> None:
    """With a policy, one throttle pauses for the policy's first step at least; each
    further throttle in a row from PAUSE_BASE_S (a 10-s window) doubling up to the
    deadline, whatever short Retry-After the server sends; the end of the pause resets
    the streak."""
    assert PAUSE_BASE_S == 10.0
    policy = RetryPolicy(base_delay_s=0.5, deadline_s=40)
    pause = Pause(probe_timeout_s=30, policy=policy, rng=lambda: 1.0, max_in_flight=2)
    until = 0.0
    for expected in (0.5, 10.0, 20.0, 40.0, 40.0):
        pause.throttled(now=until, retry_after=0.0)
        assert pause.admit(until) == expected
        until += expected
        assert pause.admit(until) == 0.0  # the probe, throttled again
    pause.answered(sent_at=until)
    pause.throttled(now=until, retry_after=3.0)
    assert pause.admit(until) == 3.0  # one throttle: its Retry-After


def test_after_a_pause_the_requests_out_at_once_double_every_round_trip() -> None:
    """Each answer after the pause lets one more request out (1, 2, 4 ... per round
    trip); at max_in_flight the pause is over and nothing is counted any more."""
    pause = Pause(probe_timeout_s=30, max_in_flight=4)
    pause.throttled(now=0.0, retry_after=1.0)
    assert [pause.admit(1.0) for _ in range(2)] == [0.0, PROBE_POLL_S]
    pause.answered(sent_at=1.0)  # the probe's answer: two may be out
    assert [pause.admit(1.1) for _ in range(3)] == [0.0, 0.0, PROBE_POLL_S]
    pause.answered(sent_at=1.1)  # one answered, one still out: two more may go
    assert [pause.admit(1.2) for _ in range(3)] == [0.0, 0.0, PROBE_POLL_S]
    pause.answered(sent_at=1.1)
    assert not pause.is_paused and pause.admit(1.3) == 0.0


def test_a_slow_start_pause_sends_one_request_first() -> None:
    """is_slow_start: the first request goes alone, then two, four ... as after a pause."""
    pause = Pause(probe_timeout_s=30, max_in_flight=3, is_slow_start=True)
    assert [pause.admit(0.0) for _ in range(2)] == [0.0, PROBE_POLL_S]
    pause.answered(sent_at=0.0)
    assert pause.is_paused
    pause.answered(sent_at=0.0)
    assert not pause.is_paused


def test_a_waiting_request_wakes_with_the_answer_that_frees_its_slot() -> None:
    """A request held back by the slow start (another is out) is woken by that one's
    answer, not at its next PROBE_POLL_S look: a slow start of 1, 2, 4 ... otherwise
    cost a poll per step (0.38 s more to READY for 100 secrets at 20 ms)."""
    pause = Pause(probe_timeout_s=30, max_in_flight=16, is_slow_start=True)
    assert pause.admit(time.monotonic()) == 0.0  # the first request is out
    assert pause.admit(time.monotonic()) > 0  # the second waits for its answer
    woken = threading.Event()

    def second() -> None:
        pause.wait(60.0)
        woken.set()

    waiter = threading.Thread(target=second)
    waiter.start()
    time.sleep(0.05)
    assert not woken.is_set()
    pause.answered(sent_at=time.monotonic())
    assert woken.wait(5.0), "the answer did not wake the waiting request"
    waiter.join()
    assert pause.admit(time.monotonic()) == 0.0


# ---------------------------------------------------------------------------
# Pacing: what the vault client calls, one Pause per vault


def _reply(status: int, **headers: str) -> transport.Reply:
    return transport.Reply(status, CaseInsensitiveDict(headers), b"")


def _pacing(clock: FakeClock) -> Pacing:
    return Pacing(RetryPolicy(deadline_s=30), max_in_flight=16, probe_timeout_s=30,
                  clock=clock, sleep=clock.sleep)


def test_a_503_pauses_only_its_own_vault_and_a_200_says_nothing() -> None:
    """A 503 without Retry-After pauses every request to that vault for the backoff step
    and says how long this one waits; another vault, and a 200, are not held."""
    clock = FakeClock()
    pacing = _pacing(clock)
    assert pacing.heard("https://a", _reply(200), clock()) is None
    wait = pacing.heard("https://a", _reply(503), clock())
    assert wait is not None and wait > 0 and pacing.pause("https://a").remaining(clock()) == wait
    assert pacing.pause("https://b").admit(clock()) == 0.0


@pytest.mark.parametrize("is_giving_way", [False, True])
def test_a_held_back_request_gives_way_or_waits_the_pause_out(is_giving_way: bool) -> None:
    """Giving way, a request the vault's pause holds back ends at once as the answer that
    paused it, unsent; otherwise it sleeps the pause out and then takes its turn."""
    clock = FakeClock()
    pacing = _pacing(clock)
    pacing.give_way(is_giving_way)
    unavailable = _reply(503, **{"Retry-After": "5"})
    pacing.heard("https://a", unavailable, clock())
    turn = pacing.take_turn("https://a", Backoff(RetryPolicy(deadline_s=30), clock=clock,
                                                 sleep=clock.sleep))
    if is_giving_way:
        assert turn is unavailable and clock.sleeps == []
    else:
        assert turn is None and sum(clock.sleeps) >= 5.0
