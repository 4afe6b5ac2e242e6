"""Bounded exponential backoff with equal jitter, honouring Retry-After.

Both IMDS and Key Vault ask clients to back off exponentially and to respect
``Retry-After`` when present [protocol.md A4, B8]. The policy is data; the
:class:`Backoff` object is one retry loop's state. Every loop is bounded in
total time, so a caller (``kv-agent once``, or the daemon's refresh) always
gets an answer.

How fast and how many requests go to one vault at once (one Retry-After
shared by all of an agent's requests, the slow start) is the vault's own
pacing, :mod:`agent.vault.pacing`; this module is only the backoff policy.
"""

from __future__ import annotations

import email.utils
import math
import random
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
    :class:`agent.vault.pacing.Pause`) longer than the time left does. True (``kv-agent once``,
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


def refresh_retry(budget_s: Optional[float] = None) -> RetryPolicy:
    """One refresh's policy: REFRESH_RETRY, or a shorter deadline when the
    caller must know sooner why a refresh fails (the sealed cache's ``after``)."""
    if budget_s is None or budget_s >= REFRESH_RETRY.deadline_s:
        return REFRESH_RETRY
    return REFRESH_RETRY._replace(deadline_s=budget_s)

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

