"""A fleet of kv-agents against one Key Vault, in simulated time.

A discrete-event simulation (one heap of timed events) of N agents, each
with S secrets, against a model of one vault that enforces its request limit
with 429 + Retry-After. What each agent decides is the agent's **real** code,
imported, never re-implemented:

* when to refresh, and how to back off after a failed refresh:
  :func:`agent.daemon.lifecycle.start_sync`, :func:`~agent.daemon.lifecycle.sync_finished`
  (which calls :func:`~agent.daemon.lifecycle.refresh_delay` with the agent's
  :class:`~agent.daemon.lifecycle.Schedule`: by default the manifest's default
  jitter, :data:`agent.manifest.DEFAULT_JITTER`) and
  :func:`~agent.daemon.lifecycle.is_refresh_due`, on a real
  :class:`~agent.daemon.lifecycle.Lifecycle` per agent;
* how one request is retried: a real :class:`agent.base.retry.Backoff` per request
  with the daemon's policy (:data:`agent.base.retry.REFRESH_RETRY`), driven by a
  simulated clock and a ``sleep`` that advances that clock, the reply's
  ``Retry-After`` read by :func:`agent.base.retry.parse_retry_after`, the retried
  statuses :data:`agent.vault.pacing.RETRY_STATUSES`;
* when a request may be sent at all: one real :class:`agent.vault.pacing.Pause` per
  agent (the vault client's pacing, with the daemon's slow start): every request is
  first admitted by it, every answer reported to it, so after a 429 the agent
  waits, probes with one request, and ramps up 1, 2, 4 ... as the daemon does;
* what a refresh fetches: :func:`agent.sync.freshness.list_budget` decides whether
  the vault is listed (list-based mode: the vault's size is known; per-secret
  mode: the agent's fallback for a vault whose list is forbidden), and while
  starting, :func:`agent.sync.freshness.is_fetched_since` (rule 5) keeps an earlier
  attempt's files from being fetched again;
* how many requests run at once: :data:`agent.vault.client.MAX_CONCURRENCY` per agent;
  pages of :data:`agent.vault.listing.PAGE_SIZE`, a listing bounded by
  :class:`agent.vault.listing.ListLimits`.

Modelled, not imported (the loop around those decisions):

* a refresh is :meth:`agent.vault.client.VaultClient.fetch_many`'s shape: up to
  MAX_CONCURRENCY requests started, each admitted by the Pause, retried until
  it succeeds or its Backoff gives up (or, held back by the Pause past its
  budget, ends unsent; at once when the agent is ready and the vault said
  wait, as the daemon's ``Sync.give_way``); a secret that gives up
  fails the refresh (its file is kept), which the lifecycle then spaces out;
* the agent is READY once every secret's file exists (from any refresh);
* one token per agent: IMDS costs nothing here (not modelled beyond that);
  the vault is in the public cloud, so no challenge request is sent;
* a listing's result: the secrets whose version differs from the one on disk
  (what :func:`agent.sync.freshness.is_source_current` decides from ``updated``);
  a listing that fails (after its retries) fails the refresh;
* a Pause's state changes at the moment a request is sent (the agent's, one
  round trip later: 50 ms), and the threads it holds back look again together
  (one event per refresh, not one per thread).

Speed: a refresh the vault serves whole (the unthrottled, usual case) is done
in one step (:meth:`Fleet._served_at_once`), with the same charges and times
as the request-by-request path, which throttled refreshes take.

The vault: ``limit`` counted transactions per ``window_s`` (4,000 per 10 s,
protocol.md B8). Key Vault documents the limit only as "per 10 seconds" per
vault and region, not the kind of window; the default here is a **sliding**
window (no 10-s span ever serves more than the limit), the stricter reading;
``sliding=False`` gives aligned fixed windows. A request over the limit gets
429 with ``Retry-After`` = whole seconds until the window has room again.
429s do not count towards the limit [DOC-KV-THROTTLE]. During an outage every
request gets 503 (no Retry-After) and counts nowhere. Every reply takes
``latency_s``. An unthrottled refresh is charged to the vault at its start
(its second wave of requests is 50 ms later in the agent: no 10-s window
notices).

Nothing here touches the network, a file or the real clock.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from typing import Callable, Deque, Dict, FrozenSet, List, NamedTuple, Optional, Tuple

from agent.base.retry import REFRESH_RETRY, Backoff, RetryPolicy, parse_retry_after
from agent.daemon import lifecycle
from agent.daemon.lifecycle import Lifecycle, Schedule
from agent.manifest import DEFAULT_JITTER, DEFAULT_REFRESH_S
from agent.status.snapshot import READY
from agent.sync.freshness import SourceSeen, VaultSeen, is_fetched_since, list_budget
from agent.vault.client import MAX_CONCURRENCY, REQUEST_TOTAL_S
from agent.vault.listing import PAGE_SIZE, ListLimits
from agent.vault.pacing import PAUSE_STATUSES, RETRY_STATUSES, Pause

LIMIT = 4000  # counted transactions per window [protocol.md B8]
WINDOW_S = 10.0
LATENCY_S = 0.05  # one request's round trip
THROTTLED = 429
UNAVAILABLE = 503
assert THROTTLED in RETRY_STATUSES and UNAVAILABLE in RETRY_STATUSES


class Vault:
    """One vault: its secrets' versions, its limit, an optional outage, and
    per-second counts of what it served, throttled and failed."""

    def __init__(self, secrets: int, horizon_s: float, *, limit: int = LIMIT,
                 window_s: float = WINDOW_S, sliding: bool = True,
                 outage: Optional[Tuple[float, float]] = None) -> None:
        self.versions = [1] * secrets
        self.limit = limit
        self.window_s = window_s
        self.sliding = sliding
        self.outage = outage
        self._batches: Deque[Tuple[float, int]] = deque()  # sliding: (time, count)
        self._count = 0  # counted transactions in the current window
        self._bucket = -1  # fixed: the current window's index
        bins = int(horizon_s) + 1
        self.served = [0] * bins
        self.throttled = [0] * bins
        self.failed = [0] * bins

    @property
    def pages(self) -> int:
        """Requests one listing costs."""
        return max(1, math.ceil(len(self.versions) / PAGE_SIZE))

    def is_down(self, t: float) -> bool:
        return self.outage is not None and self.outage[0] <= t < self.outage[1]

    def _bin(self, t: float) -> int:
        return min(int(t), len(self.served) - 1)

    def offer(self, t: float, count: int) -> Tuple[int, int, Optional[str]]:
        """``count`` requests arrive at ``t``: (how many are served, the
        status of the others, their Retry-After header value)."""
        if self.is_down(t):
            self.failed[self._bin(t)] += count
            return 0, UNAVAILABLE, None
        room, retry_after = self._room(t)
        served = min(count, room)
        if served:
            self._count += served
            if self.sliding:
                self._batches.append((t, served))
            self.served[self._bin(t)] += served
        if served == count:
            return served, 200, None
        self.throttled[self._bin(t)] += count - served
        return served, THROTTLED, str(max(1, math.ceil(retry_after)))

    def take(self, t: float, count: int) -> bool:
        """Serve ``count`` requests at ``t`` if it has room for all of them
        (True); else serve none and count nothing (False)."""
        if self.is_down(t) or self._room(t)[0] < count:
            return False
        self._count += count
        if self.sliding:
            self._batches.append((t, count))
        self.served[self._bin(t)] += count
        return True

    def _room(self, t: float) -> Tuple[int, float]:
        """Transactions the window still takes at ``t``, and the seconds
        until it takes more once full."""
        if self.sliding:
            batches = self._batches
            while batches and batches[0][0] <= t - self.window_s:
                self._count -= batches.popleft()[1]
            wait = batches[0][0] + self.window_s - t if batches else 0.0
        else:
            bucket = int(t // self.window_s)
            if bucket != self._bucket:
                self._bucket, self._count = bucket, 0
            wait = (bucket + 1) * self.window_s - t
        return self.limit - self._count, wait


class _Job:
    """One refresh of one agent."""

    __slots__ = ("agent", "pending", "active", "failed", "list_failed", "listing", "recent",
                 "parked", "wake_at")

    def __init__(self, agent: int, pending: List[int], listing: bool,
                 recent: FrozenSet[int]) -> None:
        self.agent = agent
        self.pending: Deque[int] = deque(pending)
        self.active = 0  # requests started and not done: sent, sleeping or paused
        self.failed = 0  # secrets whose request gave up
        self.list_failed = False
        self.listing = listing
        self.recent = recent  # current by rule 5 (a start's retry): never fetched
        self.parked: List[_Retry] = []  # requests held back by the agent's Pause
        self.wake_at: Optional[float] = None  # when the parked look again


class _Retry:
    """One started request: its own Backoff on its own clock."""

    __slots__ = ("job", "item", "now", "backoff")

    def __init__(self, job: _Job, item: int, t: float, policy: RetryPolicy,
                 rng: Callable[[], float]) -> None:
        self.job = job
        self.item = item  # a secret's index, or -1 for a list page
        self.now = t

        def sleep(seconds: float) -> None:
            self.now += seconds

        self.backoff = Backoff(policy, clock=lambda: self.now, sleep=sleep, rng=rng)


REFRESH, ATTEMPT, LAUNCH, BOOT, ROTATE, WAKE = range(6)
LIST_PAGE = -1
NEVER = float("-inf")


class Fleet:
    """The agents and the event heap. Build, add agents and events, :meth:`run`."""

    def __init__(self, vault: Vault, *, list_mode: bool, seed: int = 1,
                 interval_s: float = DEFAULT_REFRESH_S, jitter: float = DEFAULT_JITTER,
                 latency_s: float = LATENCY_S, policy: RetryPolicy = REFRESH_RETRY) -> None:
        self.vault = vault
        self.policy = policy  # the daemon's; another only to try a proposal
        self.list_mode = list_mode
        # What the agent knows of the vault: its size (list-based), or that
        # its list is forbidden (per-secret: the agent's fallback).
        self.seen = VaultSeen(len(vault.versions)) if list_mode else VaultSeen(is_forbidden=True)
        self.rng = random.Random(seed)
        self.interval_s = interval_s
        self.jitter = jitter
        self.latency_s = latency_s
        self.now = 0.0
        self.life: List[Lifecycle] = []
        self.held: List[List[int]] = []  # versions on disk (0: no file)
        self.fetched: List[List[float]] = []  # when each was last fetched (NEVER)
        self.pauses: List[Pause] = []  # each agent's Retry-After pause for the vault
        self.ready_at: List[Optional[float]] = []
        self.current_at: List[Optional[float]] = []  # holds the tracked rotation
        self.tracked: Optional[Tuple[int, int]] = None  # (secret, version)
        self._heap: List[Tuple[float, int, int, object]] = []
        self._seq = 0
        self._waves = math.ceil(len(vault.versions) / MAX_CONCURRENCY)

    # -- set-up ------------------------------------------------------------------------

    def add_running(self, count: int) -> None:
        """Agents that are already ready, their next refreshes spread over
        one interval (a fleet that has run for a while)."""
        for _ in range(count):
            agent = self._new_agent(list(self.vault.versions))
            self.life[agent] = Lifecycle(phase=READY, is_ready=True,
                                         schedule=Schedule(self.interval_s, self.jitter))
            self.ready_at[agent] = 0.0
            self._schedule_refresh(agent, self.rng.random() * self.interval_s)

    def add_booting(self, count: int, start_s: float, spread_s: float) -> List[int]:
        """Agents that boot (no files, not ready) uniformly in [start, start + spread)."""
        agents = []
        for _ in range(count):
            agent = self._new_agent([0] * len(self.vault.versions))
            self.push(start_s + self.rng.random() * spread_s, BOOT, agent)
            agents.append(agent)
        return agents

    def rotate_at(self, t: float, secret: int = 0) -> None:
        """A new version of ``secret`` at ``t``; :attr:`current_at` records
        when each agent first holds it."""
        self.push(t, ROTATE, secret)

    def _new_agent(self, held: List[int]) -> int:
        self.life.append(Lifecycle(schedule=Schedule(self.interval_s, self.jitter)))
        self.held.append(held)
        self.fetched.append([NEVER if not version else -self.interval_s for version in held])
        self.pauses.append(Pause(REQUEST_TOTAL_S, self.policy, self.rng.random,
                                 max_in_flight=MAX_CONCURRENCY, is_slow_start=True))
        self.ready_at.append(None)
        self.current_at.append(None)
        return len(self.life) - 1

    # -- the event loop ----------------------------------------------------------------

    def push(self, t: float, kind: int, payload: object) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, kind, payload))

    def run(self, until_s: float) -> None:
        heap = self._heap
        life = self.life
        while heap and heap[0][0] < until_s:
            t, _, kind, payload = heapq.heappop(heap)
            self.now = t
            if kind == REFRESH:
                if lifecycle.is_refresh_due(life[payload], t):  # type: ignore[index]
                    self._start_refresh(payload, t)  # type: ignore[arg-type]
            elif kind == ATTEMPT:
                self._attempt(payload, t)  # type: ignore[arg-type]
            elif kind == WAKE:
                self._wake(payload, t)  # type: ignore[arg-type]
            elif kind == LAUNCH:
                self._launch(payload, t)  # type: ignore[arg-type]
            elif kind == BOOT:
                self._start_refresh(payload, t)  # type: ignore[arg-type]
            else:
                assert isinstance(payload, int)
                self.vault.versions[payload] += 1
                self.tracked = (payload, self.vault.versions[payload])
                self.current_at = [None] * len(self.life)

    def _schedule_refresh(self, agent: int, t: float) -> None:
        self.life[agent] = self.life[agent]._replace(next_refresh=t)
        self.push(t, REFRESH, agent)

    # -- one refresh -------------------------------------------------------------------

    def _start_refresh(self, agent: int, t: float) -> None:
        """What the agent's freshness rules fetch: while starting, nothing an
        earlier attempt fetched within an interval (rule 5); a listing when
        :func:`agent.sync.freshness.list_budget` finds it cheaper; else every
        secret."""
        self.life[agent], started = lifecycle.start_sync(self.life[agent], t)
        assert started  # refreshes never overlap in the simulation: nothing asks twice
        held = self.held[agent]
        recent: FrozenSet[int] = frozenset()
        if not self.life[agent].is_ready:  # the daemon passes fresh_for_s = the interval
            since = t - self.interval_s
            recent = frozenset(i for i, at in enumerate(self.fetched[agent])
                               if held[i] and is_fetched_since(SourceSeen("", None, at), since))
        remembered = len(held) - held.count(0) - len(recent)
        listing = list_budget(self.seen, remembered) is not None
        if listing:
            if self._served_at_once(agent, t, self.vault.pages, None, recent):
                return
            pending = [LIST_PAGE] * self.vault.pages
        else:
            pending = [i for i in range(len(held)) if i not in recent] if recent \
                else list(range(len(held)))
            if self._served_at_once(agent, t, 0, pending, recent):
                return
        self._launch(_Job(agent, pending, listing, recent), t)

    def _served_at_once(self, agent: int, t: float, pages: int, fetch: Optional[List[int]],
                        recent: FrozenSet[int]) -> bool:
        """A refresh the vault serves whole at ``t`` (the usual case): done in
        one step, as :meth:`_launch` would do it unthrottled: ``pages`` list
        pages one after another, then ``fetch`` (None: what the list shows
        changed) in waves of MAX_CONCURRENCY, one round trip each."""
        vault = self.vault
        if self.pauses[agent].is_paused or vault.is_down(t):
            return False
        held, versions = self.held[agent], vault.versions
        if fetch is None:
            fetch = [i for i, version in enumerate(versions)
                     if held[i] != version and i not in recent]
        if not vault.take(t, pages + len(fetch)):
            return False
        done = t + (pages + math.ceil(len(fetch) / MAX_CONCURRENCY)) * self.latency_s
        if len(fetch) == len(held):  # every secret (per-secret refresh)
            held[:] = versions
            self.fetched[agent] = [done] * len(held)
        else:
            fetched = self.fetched[agent]
            for item in fetch:
                held[item] = versions[item]
                fetched[item] = done
        tracked = self.tracked
        if tracked is not None and held[tracked[0]] == tracked[1] and \
                self.current_at[agent] is None:
            self.current_at[agent] = done
        self._finish(agent, failed=False, t=done)
        return True

    def _launch(self, job: _Job, t: float) -> None:
        """Send what the job has pending at ``t`` while threads are free: list
        pages one at a time, GETs up to MAX_CONCURRENCY at once, each first
        admitted by the agent's Pause (a started request it holds back is
        parked). A batch the vault serves whole frees its threads one round
        trip later."""
        pause = self.pauses[job.agent]
        while job.pending:
            if t > self.now + 2 * self.latency_s and not self.vault.is_down(t):
                self.push(t, LAUNCH, job)  # in the future: keep the vault's order
                return
            free = (0 if job.active else 1) if job.listing else MAX_CONCURRENCY - job.active
            batch: List[int] = []
            while len(batch) < free and job.pending:
                wait = pause.admit(t)
                if wait > 0:
                    held = [_Retry(job, job.pending.popleft(), t, self._policy(job.listing),
                                   self.rng.random)
                            for _ in range(min(free - len(batch), len(job.pending)))]
                    job.active += len(held)
                    for retry in held:
                        self._park(retry, t, wait)
                    break
                batch.append(job.pending.popleft())
            if not batch:
                return
            served = self._send(job, batch, t)
            if not served:
                return
            t += self.latency_s
        if not job.active and not job.parked:
            self._finish(job.agent, failed=bool(job.failed or job.list_failed), t=t)

    def _send(self, job: _Job, batch: List[int], t: float,
              retry: Optional[_Retry] = None) -> int:
        """Offer ``batch`` to the vault at ``t``; what it does not serve is
        retried by its own Backoff (``retry``'s, for a request sent again).
        The agent's Pause hears the answer."""
        # A wave a round trip ahead is charged now, so the vault sees
        # arrivals in order (50 ms early: no 10-s window notices).
        at = t if self.vault.is_down(t) else min(t, self.now)
        served, status, retry_after = self.vault.offer(at, len(batch))
        pause = self.pauses[job.agent]
        for _ in range(served if status in PAUSE_STATUSES else len(batch)):
            pause.answered(t)  # one answer per request, as each thread reports its own
        if served and job.parked and pause.remaining(t) <= 0:
            # The answers wake the requests the slow start held back (Pause.wait
            # in Pacing.take_turn), not their next PROBE_POLL_S look.
            self._wake_at(job, t + self.latency_s)
        seconds = _retry_after(retry_after)
        if served < len(batch) and status in PAUSE_STATUSES:
            pause.throttled(t, min(seconds or 0.0, self.policy.max_retry_after_s))
            seconds = max(seconds or 0.0, pause.remaining(t))
        for item in batch[:served]:
            self._served(job, item, t)
        for item in batch[served:]:
            job.active += 1
            self._retry(retry or _Retry(job, item, t, self._policy(job.listing), self.rng.random),
                        t, seconds)
        if job.listing and served and not job.pending:
            self._listed(job)
        return served

    def _policy(self, listing: bool) -> RetryPolicy:
        if listing:  # a page retries within the listing's deadline too
            return self.policy._replace(
                deadline_s=min(self.policy.deadline_s, ListLimits().deadline_s))
        return self.policy

    def _listed(self, job: _Job) -> None:
        """The listing is complete: GET what changed or has no file."""
        held, versions = self.held[job.agent], self.vault.versions
        job.listing = False
        job.pending.extend(i for i, version in enumerate(versions)
                           if held[i] != version and i not in job.recent)

    def _served(self, job: _Job, item: int, t: float) -> None:
        if item != LIST_PAGE:
            self._got(job.agent, item, t + self.latency_s)

    def _got(self, agent: int, item: int, t: float) -> None:
        """The agent wrote the vault's current version of ``item`` at ``t``."""
        version = self.vault.versions[item]
        self.held[agent][item] = version
        self.fetched[agent][item] = t
        if self.tracked == (item, version) and self.current_at[agent] is None:
            self.current_at[agent] = t

    def _retry(self, retry: _Retry, t: float, retry_after: Optional[float]) -> None:
        """A request got a 429 or a 503 at ``t``: the agent's Backoff decides
        whether and when to send it again. While the vault is down for the
        whole loop, the attempts are played here without the heap (the
        answer does not depend on load, so the result is the same)."""
        pause = self.pauses[retry.job.agent]
        while True:
            retry.now = t + self.latency_s
            if not retry.backoff.wait("vault busy", retry_after):
                self._gave_up(retry)
                return
            t = retry.now
            if not self.vault.is_down(t):
                self.push(t, ATTEMPT, retry)
                return
            wait = pause.admit(t)
            if wait > 0:
                self._park(retry, t, wait)
                return
            self.vault.failed[self.vault._bin(t)] += 1  # a 503, without Retry-After
            pause.throttled(t, 0.0)
            retry_after = pause.remaining(t)

    def _attempt(self, retry: _Retry, t: float) -> None:
        """A started request's turn at ``t``: sent if the agent's Pause admits it."""
        job = retry.job
        wait = self.pauses[job.agent].admit(t)
        if wait > 0:
            self._park(retry, t, wait)
            return
        job.active -= 1
        served = self._send(job, [retry.item], t, retry)
        if served:
            self._launch(job, t + self.latency_s)

    def _park(self, retry: _Retry, t: float, wait: float) -> None:
        """The Pause holds ``retry`` for ``wait`` s: it waits (one wake for all
        of the job's parked requests), or, past its budget, ends throttled
        without being sent (Pacing.take_turn); so does it at once when
        the agent is ready and the vault said wait (the daemon calls
        Sync.give_way once ready)."""
        retry.now = t
        agent = retry.job.agent
        if wait > retry.backoff.time_left() or (
                self.life[agent].is_ready and self.pauses[agent].remaining(t) > 0):
            self._gave_up(retry)
            return
        retry.job.parked.append(retry)
        self._wake_at(retry.job, t + wait)

    def _wake_at(self, job: _Job, at: float) -> None:
        """The job's parked requests ask the Pause again at ``at`` (or sooner)."""
        if job.wake_at is None or at < job.wake_at:
            job.wake_at = at
            self.push(at, WAKE, job)

    def _wake(self, job: _Job, t: float) -> None:
        """The job's parked requests ask the Pause again, every one before any
        is sent (the probe's answer takes a round trip)."""
        if job.wake_at != t:
            return  # superseded by an earlier wake
        job.wake_at = None
        parked, job.parked = job.parked, []
        pause = self.pauses[job.agent]
        waits = [(retry, pause.admit(t)) for retry in parked]
        for retry, wait in waits:
            if wait > 0:
                self._park(retry, t, wait)
        for retry, wait in waits:
            if wait <= 0:
                job.active -= 1
                self._send(job, [retry.item], t, retry)
        self._launch(job, t + self.latency_s)

    def _gave_up(self, retry: _Retry) -> None:
        job = retry.job
        job.active -= 1
        if retry.item == LIST_PAGE:
            job.list_failed = True
            job.pending.clear()
        else:
            job.failed += 1
        self._launch(job, retry.now)

    def _finish(self, agent: int, *, failed: bool, t: float) -> None:
        """The refresh is over at ``t``: the lifecycle decides what next."""
        held = self.held[agent]
        finished = lifecycle.sync_finished(
            self.life[agent], is_failing=failed, is_current=True,
            has_every_required_file=lambda: all(held), now=t, rng=self.rng.random())
        self.life[agent] = finished.state
        if finished.became_ready:
            self.ready_at[agent] = t
        assert not finished.start_sync
        assert finished.state.next_refresh is not None
        self.push(finished.state.next_refresh, REFRESH, agent)


# -- scenarios ---------------------------------------------------------------------


class Result(NamedTuple):
    """One scenario's run, with one mode of refresh."""

    name: str
    list_mode: bool
    agents: int
    horizon_s: float
    limit: int
    served: List[int]  # per second
    throttled: List[int]
    failed: List[int]
    recovery_s: Optional[float]  # time for the last agent to be ready/current
    ideal_s: Optional[float] = None  # scale-out: total requests / the spare rate
    after_s: Optional[float] = None  # outage: when the vault came back

    @property
    def offered(self) -> List[int]:
        return [a + b + c for a, b, c in zip(self.served, self.throttled, self.failed)]

    @property
    def total(self) -> int:
        return sum(self.served) + sum(self.throttled) + sum(self.failed)

    def peak(self, per_second: List[int], start: int = 0, end: Optional[int] = None) -> int:
        """The largest count in any 10-s span (sliding by 1 s)."""
        values = per_second[start:end]
        width = int(WINDOW_S)
        running = sum(values[:width])
        best = running
        for i in range(width, len(values)):
            running += values[i] - values[i - width]
            best = max(best, running)
        return best

    def windows(self, per_second: List[int], start: int) -> List[int]:
        """Counts in consecutive 10-s windows from ``start``."""
        width = int(WINDOW_S)
        return [sum(per_second[i:i + width]) for i in range(start, len(per_second) - width + 1,
                                                                width)]

    @property
    def per_agent_hour(self) -> float:
        return self.total / (self.agents * self.horizon_s / 3600.0)


def steady(agents: int = 10_000, secrets: int = 20, hours: float = 24.0, *,
           list_mode: bool, seed: int = 1, sliding: bool = True,
           limit: int = LIMIT) -> Result:
    """A steady day: every agent running; secret 0 rotates at half time."""
    horizon = hours * 3600.0
    vault = Vault(secrets, horizon, sliding=sliding, limit=limit)
    fleet = Fleet(vault, list_mode=list_mode, seed=seed)
    fleet.add_running(agents)
    rotated = horizon / 2
    fleet.rotate_at(rotated)
    fleet.run(horizon)
    return Result("steady day", list_mode, agents, horizon, limit, vault.served, vault.throttled,
                  vault.failed, _last(fleet.current_at, rotated))


def scale_out(agents: int = 10_000, booting: int = 2_000, secrets: int = 20,
              horizon_s: float = 3600.0, *, list_mode: bool, seed: int = 1,
              sliding: bool = True, limit: int = LIMIT, spread_s: float = 60.0,
              policy: RetryPolicy = REFRESH_RETRY) -> Result:
    """``booting`` VMs boot in the same minute beside the rest, running."""
    vault = Vault(secrets, horizon_s, sliding=sliding, limit=limit)
    fleet = Fleet(vault, list_mode=list_mode, seed=seed, policy=policy)
    running = agents - booting
    fleet.add_running(running)
    new = fleet.add_booting(booting, 0.0, spread_s)
    fleet.run(horizon_s)
    ready = [fleet.ready_at[agent] for agent in new]
    background = running * (vault.pages if list_mode else secrets) / fleet.interval_s
    # A work-conserving vault serves the boot's requests at its spare rate,
    # and no agent is ready before it boots.
    ideal = max(spread_s, booting * secrets / (limit / WINDOW_S - background))
    return Result("scale-out", list_mode, agents, horizon_s, limit, vault.served, vault.throttled,
                  vault.failed, _last(ready, 0.0), ideal_s=ideal)


def outage(agents: int = 10_000, secrets: int = 20, down_s: float = 600.0,
           start_s: float = 600.0, *, list_mode: bool, seed: int = 1,
           sliding: bool = True, limit: int = LIMIT) -> Result:
    """The vault answers 503 for ``down_s``; secret 0 rotates as it returns."""
    back = start_s + down_s
    horizon = back + 2 * DEFAULT_REFRESH_S + 600.0
    vault = Vault(secrets, horizon, sliding=sliding, outage=(start_s, back), limit=limit)
    fleet = Fleet(vault, list_mode=list_mode, seed=seed)
    fleet.add_running(agents)
    fleet.rotate_at(back)
    fleet.run(horizon)
    return Result("outage", list_mode, agents, horizon, limit, vault.served, vault.throttled,
                  vault.failed, _last(fleet.current_at, back), after_s=back)


_RETRY_AFTER: Dict[Optional[str], Optional[float]] = {}


def _retry_after(value: Optional[str]) -> Optional[float]:
    """The agent's parse_retry_after, remembered per header value (the
    vault sends few distinct values, the fleet millions of replies)."""
    if value not in _RETRY_AFTER:
        _RETRY_AFTER[value] = parse_retry_after(value)
    return _RETRY_AFTER[value]


def _last(times: List[Optional[float]], since: float) -> Optional[float]:
    """Seconds from ``since`` to the last of ``times``; None if any never came."""
    if any(t is None for t in times):
        return None
    return max((t for t in times if t is not None), default=since) - since


# -- the targets -----------------------------------------------------------


class Verdict(NamedTuple):
    target: str
    measured: str
    is_met: bool


def judge_steady(per_secret: Result, listed: Result) -> List[Verdict]:
    """Peak at most half the limit; list-based refresh at most 1/20 of per-secret.

    Per-secret refresh cannot meet the first by arithmetic (every agent GETs
    every secret each interval: 10,000 x 20 / 90 windows of 10 s is 56 % of
    4,000 on average), nor list-based refresh the second with 20 secrets a
    vault page (one page for 20 GETs is 1/20 exactly; a rotation's GET is on
    top): the verdicts say so beside the figure."""
    average = per_secret.total / (per_secret.horizon_s / WINDOW_S) / per_secret.limit
    verdicts = [Verdict(f"{_mode(r)}: peak <= 50 % of the limit",
                        f"{r.peak(r.served)} ({100 * r.peak(r.offered) / r.limit:.0f} %"
                        + (f"; average {100 * average:.0f} %)" if not r.list_mode else ")"),
                        r.peak(r.offered) <= r.limit // 2) for r in (per_secret, listed)]
    ratio = listed.per_agent_hour / per_secret.per_agent_hour
    verdicts.append(Verdict("list-based <= 1/20 of per-secret",
                            f"1/{1 / ratio:.1f} (a page for 20 GETs, and the rotation)",
                            ratio <= 1 / 20))
    return verdicts


def judge_scale_out(result: Result) -> List[Verdict]:
    """Every agent ready within 1.5x the ideal; throttled retries <= 20 %."""
    assert result.ideal_s is not None
    ready = result.recovery_s
    end = int(ready) + 1 if ready is not None else None
    share = sum(result.throttled[:end]) / max(1, sum(result.offered[:end]))
    return [
        Verdict(f"{_mode(result)}: all ready <= 1.5 x ideal ({1.5 * result.ideal_s:.0f} s)",
                "never" if ready is None else f"{ready:.0f} s",
                ready is not None and ready <= 1.5 * result.ideal_s),
        Verdict(f"{_mode(result)}: 429s <= 20 % of requests", f"{100 * share:.0f} %",
                share <= 0.2),
    ]


def judge_outage(result: Result) -> List[Verdict]:
    """After the vault returns: no 10-s window over the limit after the first;
    every agent current within 2 refresh intervals."""
    assert result.after_s is not None
    over = sum(1 for count in result.windows(result.offered, int(result.after_s))[1:]
               if count > result.limit)
    current = result.recovery_s
    return [
        Verdict(f"{_mode(result)}: no window > limit after the first",
                f"{over} windows over", over == 0),
        Verdict(f"{_mode(result)}: all current <= 2 intervals ({2 * DEFAULT_REFRESH_S:.0f} s)",
                "never" if current is None else f"{current:.0f} s",
                current is not None and current <= 2 * DEFAULT_REFRESH_S),
    ]


def _mode(result: Result) -> str:
    return "list" if result.list_mode else "per-secret"
