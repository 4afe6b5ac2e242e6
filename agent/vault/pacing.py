"""Per-vault pacing: how fast, and how many at once, one agent's requests go to one vault.

Everything here is about one agent sharing one vault with a fleet (issue 12,
fleet scale-out; docs/design/fleet-scale.md): a :class:`Pause` per vault holds
its Retry-After, shared by every request the agent sends there, so a
throttled vault hears one probe from this agent, not one retry per thread;
after a pause (and, with a slow start, at first) the requests out at once
double every round trip up to the client's concurrency. :class:`Pacing` is
what the vault client calls: one Pause per vault, the answer that paused it,
and whether a held-back request gives way (ends unsent) or waits.

How each single request is retried (the backoff, its budget) is
:mod:`agent.base.retry`'s; which answers pause and which are retried is here.
"""

from __future__ import annotations

import random
import threading
import time
from typing import Callable, Dict, Optional, Union

from agent.base import transport
from agent.base.retry import Backoff, RetryPolicy, parse_retry_after
from agent.vault.url import vault_label

RETRY_STATUSES = frozenset({408, 429}) | frozenset(range(500, 600))
# Answers that pause every request of the agent to that vault (Pause), with
# or without Retry-After: throttled, or unavailable as a whole.
PAUSE_STATUSES = frozenset({429, 503})

# While a Pause's probe is out, the other requests look again this often.
PROBE_POLL_S = 0.25
# A Pause's step once a probe was throttled too: Key Vault counts per 10 s
# [protocol.md B8], and a vault still full after a first pause is full for
# its window; a probe sooner meets the same full window (issue 12, fleet).
PAUSE_BASE_S = 10.0


def waiting_reason(vault: str, failure: Union[int, Exception]) -> str:
    """``waiting for vault contoso-kv: connection refused`` (or ``HTTP 503``):
    the reason a retry sleep reports, for STATUS=."""
    cause = (f"HTTP {failure}" if isinstance(failure, int)
             else transport.describe_failure(failure))
    return f"waiting for vault {vault_label(vault)}: {cause}"


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
       waiting request unsent), with equal jitter (see
       :class:`agent.base.retry.RetryPolicy`). A single 429 costs its
       Retry-After; agents that a saturated vault keeps answering with the
       same short Retry-After (or none) spread out over its windows instead
       of coming back together.

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


class Pacing:
    """One vault client's pacing: a :class:`Pause` per vault (made on first
    use), the answer that last paused each, and whether requests give way.

    The client asks :meth:`take_turn` before each request, and reports each
    one's outcome: :meth:`heard` for a reply, :meth:`answered` for a request
    that got none. ``is_slow_start`` (the daemon): the first request to each
    vault goes alone, then 2, 4 ... at once, so a fleet booting into a
    saturated vault does not send it 16 requests per VM before hearing its
    first 429. :meth:`give_way` (the daemon, once it is ready): a request that
    the vault's pause holds back (a 429 or 503 said wait) ends at once,
    unsent, as that answer, instead of waiting the pause out: its file is
    kept, the refresh fails and the lifecycle retries it later
    (agent.daemon.lifecycle). An agent holding every file loses nothing by
    waiting, and a fleet of them that found the vault unavailable then waits
    outside the refresh, spread by the lifecycle, instead of every agent
    inside it sending its secrets the moment the vault answers again (issue
    12, fleet: per-secret refresh after an outage, 53 windows over the limit
    before). Thread-safe.
    """

    def __init__(
        self,
        policy: RetryPolicy,
        *,
        max_in_flight: int,
        probe_timeout_s: float,
        is_slow_start: bool = False,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._policy = policy
        self._max_in_flight = max_in_flight
        self._probe_timeout_s = probe_timeout_s
        self._is_slow_start = is_slow_start
        self._clock = clock
        self._sleep = sleep
        # Per vault: its Retry-After pause, and the throttled reply that set it.
        self._pauses: Dict[str, Pause] = {}
        self._paused_by: Dict[str, transport.Reply] = {}
        self._lock = threading.Lock()  # not the audiences': a challenge sent under theirs takes it
        self.is_giving_way = False  # see give_way

    def give_way(self, is_giving_way: bool) -> None:
        """From now on, end requests a vault's pause holds back at once,
        unsent (True: the daemon once ready), or wait the pause out (False)."""
        self.is_giving_way = is_giving_way

    def pause(self, vault: str) -> Pause:
        """The vault's shared Retry-After pause (made on first use)."""
        pause = self._pauses.get(vault)
        if pause is None:
            with self._lock:
                pause = self._pauses.setdefault(vault, Pause(
                    self._probe_timeout_s, self._policy, max_in_flight=self._max_in_flight,
                    is_slow_start=self._is_slow_start))
        return pause

    def take_turn(self, vault: str, backoff: Backoff) -> Optional[transport.Reply]:
        """Wait until a request to ``vault`` may be sent: None, send it now;
        else the vault's answer that paused it, and the request ends as that
        answer, unsent (it gives way, or is paused past its budget)."""
        if self._wait_for(vault, self.pause(vault), backoff):
            return None
        return self._paused_by.get(vault)

    def _wait_for(self, vault: str, pause: Pause, backoff: Backoff) -> bool:
        """Sleep while the vault's pause holds this request back (another
        thread's probe is out, or Retry-After has not passed). False when the
        vault said wait and this client gives way, or when the wait would
        outlast the request's budget and its policy does not keep the final
        attempt (the running agent): it ends as throttled, unsent (or, held
        back only by the slow start, is sent at once). With the final attempt
        kept (``kv-agent once``) a pause past the budget is slept up to the
        deadline and the request is sent then, as the final attempt."""
        while True:
            delay = pause.admit(self._clock())
            if delay <= 0:
                return True
            if self.is_giving_way and pause.remaining(self._clock()) > 0:
                return False
            if delay > backoff.time_left():
                return backoff.wait_to_deadline(self._paused_reason(vault))
            if pause.remaining(self._clock()) > 0:
                self._sleep(delay)  # the vault said wait: a sleep a stop cuts short
            else:
                pause.wait(delay)  # another request is out: its answer wakes this one
                self._sleep(0)  # (and a stop is still noticed)

    def _paused_reason(self, vault: str) -> str:
        """``waiting for vault contoso-kv: HTTP 503`` for the answer that paused it."""
        paused_by = self._paused_by.get(vault)
        return waiting_reason(vault, paused_by.status if paused_by is not None else 429)

    def answered(self, vault: str, sent_at: float) -> None:
        """A request to ``vault`` sent at ``sent_at`` got no answer (a failure
        to connect, or an error of ours): it never holds the others back."""
        self.pause(vault).answered(sent_at)

    def heard(self, vault: str, reply: transport.Reply, sent_at: float) -> Optional[float]:
        """Tell the vault's pause about ``reply`` to a request sent at
        ``sent_at``: a 429 or 503 (or any Retry-After) pauses every thread of
        this agent, not only this one. Returns the seconds this request waits
        before it is sent again (at least the pause), None when nothing said."""
        pause = self.pause(vault)
        retry_after = (parse_retry_after(reply.headers.get("Retry-After"))
                       if reply.status in RETRY_STATUSES else None)
        if retry_after is None and reply.status not in PAUSE_STATUSES:
            pause.answered(sent_at)
            return None
        self._paused_by[vault] = reply
        now = self._clock()
        pause.throttled(now, min(retry_after or 0.0, self._policy.max_retry_after_s))
        return max(retry_after or 0.0, pause.remaining(now))
