"""Bounded exponential backoff with jitter, honouring Retry-After.

Both IMDS and Key Vault ask clients to back off exponentially and to respect
``Retry-After`` when present [protocol.md A4, B8]. The policy is data; the
:class:`Backoff` object is one retry loop's state. Every loop is bounded in
total time, so a caller (``kv-agent once``, or the daemon's refresh) always
gets an answer.
"""

from __future__ import annotations

import email.utils
import random
import time
from typing import Callable, NamedTuple, Optional


class RetryPolicy(NamedTuple):
    """How long and how fast to retry one request.

    ``deadline_s`` bounds the whole loop (sleeps included); delays grow as
    ``base_delay_s * 2**n`` up to ``max_delay_s`` with full jitter, so a fleet
    of VMs does not retry in step. A Retry-After longer than the remaining
    budget ends the loop instead of sleeping past it.
    """

    deadline_s: float = 75.0  # IMDS 410 means "back within 70 s" [protocol.md A3]
    base_delay_s: float = 0.5
    max_delay_s: float = 10.0
    max_retry_after_s: float = 60.0


def parse_retry_after(value: Optional[str], now: Optional[float] = None) -> Optional[float]:
    """Seconds to wait from a Retry-After value (delta-seconds or HTTP date).

    Returns None when absent or unparsable; never negative.
    """
    if not value:
        return None
    text = value.strip()
    try:
        return max(0.0, float(text))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    current = time.time() if now is None else now
    return max(0.0, when.timestamp() - current)


class Backoff:
    """State of one bounded retry loop.

    Call :meth:`wait` after a retryable failure: it sleeps and returns True, or
    returns False (without sleeping) when the budget would be exceeded.
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
        self.attempts = 1

    def next_delay(self, retry_after: Optional[float]) -> float:
        """The delay before the next attempt (Retry-After wins when given)."""
        if retry_after is not None:
            return min(retry_after, self._policy.max_retry_after_s)
        ceiling = min(self._policy.max_delay_s,
                      self._policy.base_delay_s * 2 ** (self.attempts - 1))
        # "Equal jitter": at least half the step, so retries still spread out
        # but never collapse to an immediate hammering.
        return float(ceiling / 2 + self._rng() * ceiling / 2)

    def wait(self, reason: str, retry_after: Optional[float] = None) -> bool:
        """Sleep before the next attempt; False when the budget is spent."""
        delay = self.next_delay(retry_after)
        if self._clock() + delay > self._deadline:
            return False
        if self._on_retry is not None:
            self._on_retry(reason, self.attempts, delay)
        self._sleep(delay)
        self.attempts += 1
        return True
