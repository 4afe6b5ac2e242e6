"""Backoff: bounded, jittered, and Retry-After first."""

from __future__ import annotations

import email.utils

import pytest
from fakes import FakeClock

from agent.retry import Backoff, RetryPolicy, parse_retry_after


@pytest.mark.parametrize("value, expected", [
    ("7", 7.0), (" 2.5 ", 2.5), ("-3", 0.0), (None, None), ("", None), ("soon", None),
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
    assert clock.sleeps == [1, 2, 4, 4, 4, 4]
    assert sum(clock.sleeps) <= 20


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


def test_retry_after_beyond_budget_ends_the_loop() -> None:
    """A Retry-After longer than the remaining budget ends without sleeping."""
    clock = FakeClock()
    backoff = Backoff(RetryPolicy(deadline_s=5), clock=clock, sleep=clock.sleep)
    assert backoff.wait("x", retry_after=10) is False
    assert clock.sleeps == []


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
