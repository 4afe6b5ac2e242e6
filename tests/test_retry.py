"""Backoff: bounded, jittered, and Retry-After first."""

from __future__ import annotations

import email.utils
from typing import List

import pytest
from fakes import FakeClock

from agent.base.retry import (
    MIN_REQUEST_S,
    REFRESH_RETRY,
    Backoff,
    RetryPolicy,
    parse_retry_after,
)


@pytest.mark.parametrize("value, expected", [
    ("7", 7.0), (" 2.5 ", 2.5), ("-3", 0.0), (None, None), ("", None), ("soon", None),
    ("nan", None), ("inf", None), ("-inf", None), ("1e400", None),
    ("Fri, 31 Dec 99999 23:59:59 GMT", None),
])
def test_parse_retry_after_seconds(value: object, expected: object) -> None:
    """Delta-seconds parse; junk and absence give None; never negative."""
    assert parse_retry_after(value) == expected  # type: ignore[arg-type]


def test_parse_retry_after_http_date() -> None:
    """An HTTP date becomes the seconds until then."""
    header = email.utils.formatdate(1_000_030, usegmt=True)
    assert parse_retry_after(header, now=1_000_000) == pytest.approx(30)


def test_backoff_grows_with_jitter_and_stops_at_deadline() -> None:
    """Delays double within [step/2, step], capped, until the budget is spent."""
    clock = FakeClock()
    policy = RetryPolicy(deadline_s=20, base_delay_s=1, max_delay_s=4)
    backoff = Backoff(policy, clock=clock, sleep=clock.sleep, rng=lambda: 1.0)
    while backoff.wait("x"):
        pass
    assert clock.sleeps == [1, 2, 4, 4, 4, 4, 1]  # the last sleep ends at the deadline
    assert sum(clock.sleeps) == 20


def test_backoff_lower_jitter_bound() -> None:
    """With the lowest jitter the delay is half the step, never zero."""
    clock = FakeClock()
    backoff = Backoff(RetryPolicy(base_delay_s=1), clock=clock, sleep=clock.sleep,
                      rng=lambda: 0.0)
    backoff.wait("x")
    backoff.wait("x")
    assert clock.sleeps == [0.5, 1.0]


def test_retry_after_wins_and_is_capped() -> None:
    """Retry-After replaces the computed delay, capped by max_retry_after_s."""
    clock = FakeClock()
    backoff = Backoff(RetryPolicy(deadline_s=500, max_retry_after_s=60), clock=clock,
                      sleep=clock.sleep)
    backoff.wait("x", retry_after=3)
    backoff.wait("x", retry_after=3600)
    assert clock.sleeps == [3, 60]


def test_retry_after_beyond_budget_ends_a_refresh_loop() -> None:
    """Without the final attempt kept (the running agent's refresh), a Retry-After
    longer than the remaining budget ends the loop without sleeping."""
    clock = FakeClock()
    backoff = Backoff(REFRESH_RETRY._replace(deadline_s=5), clock=clock, sleep=clock.sleep)
    assert backoff.wait("x", retry_after=10) is False
    assert clock.sleeps == []


def test_retry_after_beyond_budget_sleeps_to_the_deadline_then_one_final_attempt() -> None:
    """By default (kv-agent once) a Retry-After longer than what is left is slept
    up to the deadline and one final attempt is allowed, as docs/design/limits.md says."""
    clock = FakeClock()
    backoff = Backoff(RetryPolicy(deadline_s=5), clock=clock, sleep=clock.sleep)
    assert backoff.wait("x", retry_after=10) is True
    assert clock.sleeps == [5.0]
    assert backoff.wait("x", retry_after=10) is False


@pytest.mark.parametrize("is_kept, expected", [(True, [True, True]), (False, [False, False])])
def test_a_wait_held_past_the_deadline_keeps_the_final_attempt_only_when_asked(
        is_kept: bool, expected: List[bool]) -> None:
    """Held back past its deadline by a pause, a loop that keeps its final attempt
    sleeps what is left and may send once more; a refresh loop ends unsent at once."""
    clock = FakeClock()
    backoff = Backoff(RetryPolicy(deadline_s=4, is_final_attempt_kept=is_kept), clock=clock,
                      sleep=clock.sleep)
    assert [backoff.wait_to_deadline("paused"), backoff.wait_to_deadline("paused")] == expected
    assert clock.sleeps == ([4.0] if is_kept else [])
    assert backoff.wait("x") is False if is_kept else True


def test_on_retry_reports_reason_and_attempt() -> None:
    """The observer hears each retry's reason, attempt number and delay."""
    clock = FakeClock()
    heard = []
    backoff = Backoff(RetryPolicy(), clock=clock, sleep=clock.sleep, rng=lambda: 1.0,
                      on_retry=lambda reason, attempt, delay: heard.append((reason, attempt)))
    backoff.wait("waiting for IMDS: connection refused")
    backoff.wait("waiting for IMDS: connection refused")
    assert heard == [("waiting for IMDS: connection refused", 1),
                     ("waiting for IMDS: connection refused", 2)]


# --- issue 9: no hot loops, a final attempt, bounded requests


@pytest.mark.parametrize("retry_after", [0.0, 0.001])
def test_retry_after_zero_waits_at_least_the_backoff_step(retry_after: float) -> None:
    """Retry-After: 0 (or a past date) never shortens the normal backoff step."""
    clock = FakeClock()
    backoff = Backoff(RetryPolicy(deadline_s=60, base_delay_s=1), clock=clock,
                      sleep=clock.sleep, rng=lambda: 0.0)
    for _ in range(4):
        assert backoff.wait("x", retry_after=retry_after)
    assert clock.sleeps == [0.5, 1.0, 2.0, 4.0]


def test_past_http_date_counts_as_zero() -> None:
    """An HTTP date in the past parses to 0 (and the step then applies)."""
    header = email.utils.formatdate(1_000_000, usegmt=True)
    assert parse_retry_after(header, now=2_000_000) == 0.0


def test_final_attempt_when_the_next_sleep_would_pass_the_deadline() -> None:
    """The loop sleeps only up to the deadline and allows exactly one more attempt."""
    clock = FakeClock()
    backoff = Backoff(RetryPolicy(deadline_s=3, base_delay_s=2, max_delay_s=8), clock=clock,
                      sleep=clock.sleep, rng=lambda: 1.0)
    assert backoff.wait("x")  # 2 s
    assert backoff.wait("x")  # would be 4 s: sleeps the 1 s left instead
    assert not backoff.wait("x")
    assert clock.sleeps == [2.0, 1.0]
    assert backoff.attempts == 3


def test_request_budget_stays_within_the_deadline_with_a_floor() -> None:
    """A request gets its own bound, cut to the time left, but never below MIN_REQUEST_S."""
    clock = FakeClock()
    backoff = Backoff(RetryPolicy(deadline_s=20), clock=clock, sleep=clock.sleep)
    assert backoff.request_budget(30) == 20
    clock.now += 18
    assert backoff.request_budget(30) == MIN_REQUEST_S
    assert backoff.request_budget(1) == 1


def test_jitter_is_equal_jitter_as_documented() -> None:
    """Issue 10: the docs name the jitter the code draws: equal jitter, in [step/2, step]."""
    import agent.base.retry

    for doc in (agent.base.retry.__doc__, RetryPolicy.__doc__, Backoff.step.__doc__):
        assert doc and "equal jitter" in " ".join(doc.split())
    assert "[step/2, step]" in " ".join((RetryPolicy.__doc__ or "").split())
    policy = RetryPolicy(base_delay_s=2, max_delay_s=100)
    for draw, expected in ((0.0, 1.0), (0.5, 1.5), (0.999999, 2.0)):
        step = Backoff(policy, rng=lambda value=draw: value).step()
        assert step == pytest.approx(expected, abs=1e-5)


def test_a_refresh_retries_at_most_the_budget_it_is_given() -> None:
    """A sealed cache's ``after`` shortens a refresh's retries (its cause must be
    known by then); a budget at or over the refresh's own changes nothing."""
    from agent.base.retry import refresh_retry
    assert refresh_retry() is REFRESH_RETRY
    assert refresh_retry(REFRESH_RETRY.deadline_s + 1) is REFRESH_RETRY
    short = refresh_retry(5.0)
    assert short.deadline_s == 5.0
    assert short._replace(deadline_s=REFRESH_RETRY.deadline_s) == REFRESH_RETRY
