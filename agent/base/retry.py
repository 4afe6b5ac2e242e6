"""Bounded exponential backoff with equal jitter, honouring Retry-After.

Both IMDS and Key Vault ask clients to back off exponentially and to respect
``Retry-After`` when present [protocol.md A4, B8]. The policy is data; the
:class:`Backoff` object is one retry loop's state. Every loop is bounded in
total time, so a caller (``kv-agent once``, or the daemon's refresh) always
gets an answer.

A :class:`Pause` is the other half: one server's Retry-After, shared by every
request one agent sends to that server, so a throttled vault hears one probe
from this agent, not one retry per thread.
"""

from __future__ import annotations

import email.utils
import math
import random
import threading
import time
from typing import Callable, NamedTuple, Optional


class RetryPolicy(NamedTuple):
    """How long and how fast to retry one request.

    ``deadline_s`` bounds the whole loop, sleeps *and* requests: a caller
    gives each request at most :meth:`Backoff.time_left` (see
    :func:`Backoff.request_budget`). The n-th delay is drawn with *equal
    jitter*: uniformly from ``[step/2, step]`` where ``step = base_delay_s *
    2**n`` capped at ``max_delay_s``, so a fleet of VMs does not retry in
    step, yet no delay collapses towards zero as full jitter's ``[0, step]``
    would allow.
    When the next delay would pass the deadline, the loop sleeps only up to
    the deadline and makes one final attempt. A Retry-After counts as at
    least the normal step (``Retry-After: 0`` must not turn a 429 storm into a
    hot loop, issue 9 item 5) and at most ``max_retry_after_s``.

    ``is_final_attempt_kept``: what a Retry-After (or a vault's pause, see
    :class:`Pause`) longer than the time left does. True (``kv-agent once``,
    docs/design/limits.md): it is slept only up to the deadline and the final
    attempt is made, so ``--retry-for 15`` retries for 15 s, as promised
    (issue 17 item 9: it used to give up after 6 s). False (a refresh of the
    running agent, REFRESH_RETRY): the loop ends at once, unsent; the
    lifecycle retries the whole refresh later, spread out, so a fleet that a
    vault paused never sends its final attempts together at its deadlines.
    """

    deadline_s: float = 75.0  # ONCE_RETRY_S; IMDS 410 means "back within 70 s" [protocol.md A3]
    base_delay_s: float = 0.5
    max_delay_s: float = 10.0
    max_retry_after_s: float = 60.0
    is_final_attempt_kept: bool = True


# Every retry budget of the agent, in this one place:
# - `kv-agent once` (and any caller that names none) retries IMDS and the vault
#   this long; `--retry-for` overrides it. Above IMDS's 70 s [protocol.md A3].
ONCE_RETRY_S = 75.0
# - one refresh of `kv-agent run`; the lifecycle's backoff then spaces the
#   refreshes themselves (agent/daemon/lifecycle.py), so a refresh gives up sooner.
REFRESH_RETRY_S = 30.0
REFRESH_RETRY = RetryPolicy(deadline_s=REFRESH_RETRY_S, is_final_attempt_kept=False)

# While a Pause's probe is out, the other requests look again this often.
PROBE_POLL_S = 0.25
# A Pause's step once a probe was throttled too: Key Vault counts per 10 s
# [protocol.md B8], and a vault still full after a first pause is full for
# its window; a probe sooner meets the same full window (issue 12, fleet).
PAUSE_BASE_S = 10.0

# Every attempt, the final one included, may take at least this long even
# when the budget is (nearly) spent: a request needs a few seconds to succeed.
MIN_REQUEST_S = 5.0


def parse_retry_after(value: Optional[str], now: Optional[float] = None) -> Optional[float]:
    """Seconds to wait from a Retry-After value (delta-seconds or HTTP date).

    Returns None when absent or unparsable; never negative, never NaN or
    infinite (a date in the past is 0).
    """
    if not value:
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        return max(0.0, seconds) if math.isfinite(seconds) else None
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, OverflowError, IndexError):
        return None
    if when is None:
        return None
    current = time.time() if now is None else now
    try:
        return max(0.0, when.timestamp() - current)
    except (OverflowError, OSError, ValueError):
        return None


class Backoff:
    """State of one bounded retry loop.

    Call :meth:`wait` after a retryable failure: it sleeps and returns True, or
    returns False (without sleeping) when the budget is spent. Call
    :meth:`wait_to_deadline` when something else (a server's pause) holds the
    next attempt past the deadline. Give each request :meth:`request_budget`
    seconds in total.
    """

    def __init__(
        self,
        policy: RetryPolicy,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        rng: Callable[[], float] = random.random,
        on_retry: Optional[Callable[[str, int, float], None]] = None,
    ) -> None:
        self._policy = policy
        self._clock = clock
        self._sleep = sleep
        self._rng = rng
        self._on_retry = on_retry
        self._deadline = clock() + policy.deadline_s
        self._is_final = False
        self.attempts = 1

    def time_left(self) -> float:
        """Seconds until the loop's deadline (0 when past it)."""
        return max(0.0, self._deadline - self._clock())

    def request_budget(self, per_request_s: float) -> float:
        """Total seconds the next request may take: its own bound, within the
        loop's deadline, but never less than MIN_REQUEST_S."""
        return min(per_request_s, max(self.time_left(), MIN_REQUEST_S))

    def step(self) -> float:
        """The backoff delay for the current attempt: equal jitter, uniformly
        in ``[step/2, step]`` (see :class:`RetryPolicy`)."""
        ceiling = min(self._policy.max_delay_s,
                      self._policy.base_delay_s * 2 ** min(self.attempts - 1, 64))
        # At least half the step, so retries still spread out but never
        # collapse to an immediate hammering.
        return float(ceiling / 2 + self._rng() * ceiling / 2)

    def next_delay(self, retry_after: Optional[float]) -> float:
        """The delay before the next attempt: the step, or Retry-After when
        longer (capped at max_retry_after_s)."""
        step = self.step()
        if retry_after is None:
            return step
        return max(step, min(retry_after, self._policy.max_retry_after_s))

    def wait(self, reason: str, retry_after: Optional[float] = None) -> bool:
        """Sleep before the next attempt; False when the budget is spent."""
        if self._is_final:
            return False
        delay = self.next_delay(retry_after)
        left = self.time_left()
        if delay > left:
            if left <= 0 or (retry_after is not None and retry_after > left
                             and not self._policy.is_final_attempt_kept):
                return False
            delay, self._is_final = left, True  # sleep to the deadline, try once more
        if self._on_retry is not None:
            self._on_retry(reason, self.attempts, delay)
        self._sleep(delay)
        self.attempts += 1
        return True

    def wait_to_deadline(self, reason: str) -> bool:
        """The next attempt is held back past the deadline (a server's pause
        outlasts the budget). With ``is_final_attempt_kept``: sleep what is
        left of the budget and return True, the caller then makes the final
        attempt (at once when the deadline has already come). Without: False,
        and the loop ends unsent."""
        if not self._policy.is_final_attempt_kept:
            return False
        if self._is_final:
            return True  # slept to the deadline already: this is the final attempt
        self._is_final = True
        left = self.time_left()
        if left > 0:
            if self._on_retry is not None:
                self._on_retry(reason, self.attempts, left)
            self._sleep(left)
        return True


class Pause:
    """One server's Retry-After, shared by all of one agent's requests to it.

    Without it, each of an agent's concurrent requests (16 for the vault) runs
    its own retry loop against a server that has said "not before T", and a
    throttled vault hears 16 requests from every agent each time the pause
    ends. With it (issue 12, fleet scale-out):

    1. A reply that says the server cannot take requests now (the vault's
       429 or 503, with or without Retry-After: Key Vault's own 429 may have
       none [protocol.md B8]) pauses every request: none is sent before
       ``now + retry_after`` (:meth:`throttled`; the later time wins).
    2. When the pause is over, the first request to ask is the *probe*
       (:meth:`admit` returns 0 to it alone); the others wait for its answer,
       looking again every PROBE_POLL_S, so a still-throttled server hears one
       request from this agent, not all of them.
    3. Each answer without Retry-After (or failure to connect) to a request
       sent after the pause lets one more be out at once, so their number
       doubles every round trip: 1, 2, 4 ... up to ``max_in_flight``, where
       the pause is over (:meth:`answered`; TCP's slow start).
       A server with little room hears a few requests, not a burst of all of
       them. A reply to a request sent before the pause says nothing about
       now and changes nothing.
    4. Requests that never report (their thread died) stop blocking the
       others after ``probe_timeout_s``.
    5. With a ``policy``, a pause lasts at least a backoff step for the
       number of throttles since the pause last ended: the policy's first
       step after one, then PAUSE_BASE_S (the vault's 10-s window), doubling,
       up to the policy's ``deadline_s`` (a longer pause would only end every
       waiting request unsent), with equal jitter (see :class:`RetryPolicy`).
       A single 429 costs its Retry-After; agents that a saturated vault
       keeps answering with the same short Retry-After (or none) spread out
       over its windows instead of coming back together.

    Unthrottled, :meth:`admit` and :meth:`answered` read one attribute and
    take no lock. Times are the caller's monotonic clock; thread-safe.
    """

    def __init__(self, probe_timeout_s: float, policy: Optional[RetryPolicy] = None,
                 rng: Callable[[], float] = random.random, max_in_flight: int = 16,
                 is_slow_start: bool = False) -> None:
        self._lock = threading.Lock()
        # Signalled when an answer frees a slot or a throttle moves the pause:
        # waiting threads wake then, not at their next PROBE_POLL_S look (a
        # slow start of 1, 2, 4 ... would otherwise cost a poll per step).
        self._changed = threading.Condition(self._lock)
        self._probe_timeout_s = probe_timeout_s
        self._policy = policy
        self._rng = rng
        self._max_in_flight = max_in_flight
        self.is_paused = is_slow_start  # read without the lock: the fast path
        self._until = float("-inf")  # no request before this time
        self._allowed = 1  # requests that may be out at once after the pause
        self._out = 0  # of those, admitted and not answered
        self._out_until = 0.0  # when the ones out stop counting (never answered)
        self._streak = 0  # throttles since the last answer without Retry-After

    def admit(self, now: float) -> float:
        """Seconds to wait before sending a request (ask again after them);
        0.0: send it now."""
        if not self.is_paused:
            return 0.0
        with self._lock:
            if not self.is_paused:
                return 0.0
            if now < self._until:
                return self._until - now
            if self._out >= self._allowed:
                if now < self._out_until:
                    return min(PROBE_POLL_S, self._out_until - now)
                self._out = 0  # never answered: stop waiting for them
            self._out += 1
            self._out_until = now + self._probe_timeout_s
            return 0.0

    def remaining(self, now: float) -> float:
        """Seconds until the pause ends (0 when not paused or past it)."""
        return max(0.0, self._until - now) if self.is_paused else 0.0

    def wait(self, delay: float) -> None:
        """Block for up to ``delay`` seconds of real time, or until an answer
        frees a slot or a throttle moves the pause: then ask :meth:`admit`
        again. (Code on a simulated clock sleeps ``delay`` instead.)"""
        with self._changed:
            self._changed.wait(delay)

    def throttled(self, now: float, retry_after: float) -> None:
        """A reply said Retry-After: pause every request until ``now +
        retry_after`` (at least the backoff step, rule 5), then probe again."""
        with self._lock:
            self._streak += 1
            pause = max(0.0, retry_after)
            if self._policy is not None:
                pause = max(pause, self._step())
            self._until = max(self._until, now + pause)
            self._allowed, self._out = 1, 0
            self.is_paused = True
            self._changed.notify_all()

    def _step(self) -> float:
        """The backoff step for this many throttles in a row (rule 5): the
        policy's first step, then from PAUSE_BASE_S doubling up to the whole
        budget of a request; equal jitter."""
        assert self._policy is not None
        first = self._streak == 1
        policy = self._policy._replace(
            base_delay_s=self._policy.base_delay_s if first else PAUSE_BASE_S,
            max_delay_s=self._policy.max_delay_s if first else self._policy.deadline_s)
        step = Backoff(policy, rng=self._rng)
        step.attempts = 1 if first else self._streak - 1
        return step.step()

    def answered(self, sent_at: float) -> None:
        """A request sent at ``sent_at`` got an answer without Retry-After (or
        none at all): if it was sent after the pause, one more may be out."""
        if not self.is_paused:
            return
        with self._lock:
            if self.is_paused and sent_at >= self._until:
                self._out = max(0, self._out - 1)
                self._allowed += 1
                if self._allowed >= self._max_in_flight:
                    self.is_paused, self._streak = False, 0
                self._changed.notify_all()
