"""The refresh: the thread that runs one sync, and what the daemon counts of refreshes.

Threads: a refresh runs in one worker thread (itself fanning out fetches).
The worker never touches the daemon's state: it posts messages to the
daemon's :class:`~agent.daemon.loop.Mailbox` (a :class:`Retrying` notice
while IMDS or the vault is retried, then :class:`SyncDone` with its
report), whose pipe wakes the loop, and the main thread records them.
:class:`RefreshThread` starts the worker, hands the sync a retry callback
and a sleep that a stop cuts short, and stops it (abandoning its requests).

:class:`RefreshStats` is what the daemon keeps of finished refreshes: how
many ended with each result, the files they wrote, when the last one ended
and how long it took (the metrics file: :mod:`agent.daemon.metrics`), and
when the last good one ended or why the last one failed as a whole (the
status).
"""

from __future__ import annotations

import logging
import threading
from typing import Dict, Mapping, NamedTuple, Optional, Tuple, Union

from agent.base.errors import KvAgentError
from agent.daemon.loop import Mailbox
from agent.daemon.metrics import EntryMetrics, MetricsSnapshot, RequestKey
from agent.sync.freshness import Freshness, forget_forbidden
from agent.sync.sync import Interrupted, Sync, SyncReport

log = logging.getLogger(__name__)

# Wait this long for an in-flight refresh on SIGTERM. Only its writes are worth
# waiting for (tmpfs: milliseconds); its requests are abandoned at once
# (Sync.abort: their sockets shut down), and each write is atomic anyway.
# Short, so SIGTERM exits within ~2 s (issue 17, item 25).
STOP_GRACE_S = 1.5

# A refresh's result, as the metrics count them.
SUCCESS = "success"  # every entry current
PARTIAL = "partial"  # some entries failed
FAILURE = "failure"  # failed as a whole: no token, no vault

SyncResult = Union[SyncReport, KvAgentError, None]  # None: interrupted


class SyncDone(NamedTuple):
    """Posted by the refresh thread when its refresh ended."""

    agent: Sync
    result: SyncResult


class Retrying(NamedTuple):
    """Posted by the refresh thread while IMDS or the vault is retried."""

    text: str


Message = Union[SyncDone, Retrying]


class RefreshThread:
    """At most one refresh at a time, in a worker thread, each starting
    from what the last one left (``freshness``).

    :meth:`on_retry` and :meth:`sleep` are called in the worker (the sync's
    callbacks); everything else belongs to the main thread, ``waiting``
    included: what the running refresh retries, as the main thread last
    heard it from a :class:`Retrying` notice (None once the refresh ended).
    """

    def __init__(self, mailbox: "Mailbox[Message]") -> None:
        self._mailbox = mailbox
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._sync: Optional[Sync] = None  # the running refresh's (a reload may swap)
        self.waiting: Optional[str] = None
        # What the last refresh wrote and listed (agent.sync.freshness): kept across
        # reloads, so a refresh fetches only what changed; empty at start.
        self.freshness = Freshness()
        # True when stop left the worker behind (stuck where no socket can
        # be shut): `kv-agent run` then exits without joining it.
        self.is_abandoned = False

    @property
    def is_running(self) -> bool:
        """A refresh runs (its end not yet handled by the main thread)."""
        return self._thread is not None

    def start(self, agent: Sync, fresh_for_s: float) -> None:
        """Run ``agent.sync`` in the worker; it posts SyncDone when it ends.
        ``fresh_for_s``: see :meth:`Sync.sync`."""
        assert self._thread is None
        freshness = self.freshness

        def work() -> None:
            result: SyncResult
            try:
                result = agent.sync(should_stop=self._stop.is_set, freshness=freshness,
                                    fresh_for_s=fresh_for_s)
            except Interrupted:
                result = None
            except KvAgentError as exc:
                result = exc
            except Exception:  # a bug: report it, keep the daemon alive
                log.exception("refresh failed unexpectedly")
                result = KvAgentError("refresh failed unexpectedly (a bug; see the log)")
            self._mailbox.post(SyncDone(agent, result))

        self._thread = threading.Thread(target=work, name="refresh", daemon=True)
        self._sync = agent
        self._thread.start()

    def ended(self, done: SyncDone) -> None:
        """Its SyncDone arrived: join the worker (it has nothing left to do)
        and keep what a report's refresh left for the next one."""
        assert self._thread is not None
        self._thread.join()
        self._thread = self._sync = None
        self.waiting = None
        if isinstance(done.result, SyncReport):
            self.freshness = done.result.freshness

    def reloaded(self) -> None:
        """A manifest was installed: every vault's list is tried again (after
        a reload: the operator may have granted the permission)."""
        self.freshness = forget_forbidden(self.freshness)

    def sleep(self, seconds: float) -> None:
        """A retry sleep that a stop request cuts short (raising Interrupted)."""
        if self._stop.wait(seconds):
            raise Interrupted()

    def on_retry(self, reason: str, attempt: int, delay: float) -> None:
        """Called in the refresh thread while IMDS or the vault is retried:
        hands the notice to the main thread, which owns the state."""
        text = reason if reason.startswith("waiting") else f"retrying {reason}"
        self._mailbox.post(Retrying(f"{text} (attempt {attempt})"))

    def stop(self) -> None:
        """Stop: abandon the running refresh's requests and give its current
        write STOP_GRACE_S (``is_abandoned`` when it is still alive then)."""
        self._stop.set()
        thread = self._thread
        if thread is None:
            return
        # Abandon its requests: a vault that neither answers nor fails must
        # not hold SIGTERM for the request's own timeout (issue 17, item 25).
        abandoned = self._sync.abort() if self._sync is not None else 0
        thread.join(STOP_GRACE_S)
        self.is_abandoned = thread.is_alive()
        if abandoned or self.is_abandoned:
            log.warning("stopping with a refresh still waiting on the network: %d "
                        "request%s abandoned; no file is half-written (writes are "
                        "atomic)", abandoned, "" if abandoned == 1 else "s")


class RefreshStats:
    """Finished refreshes since start. Times: ``*_s`` are unix seconds
    (wall clock), ``started`` is monotonic. Main thread only."""

    def __init__(self) -> None:
        self.started: Optional[float] = None  # the refresh in flight's start
        self.counts: Dict[str, int] = {}  # SUCCESS, PARTIAL, FAILURE -> refreshes
        self.files_written = 0  # created or replaced
        self.last_end_s: Optional[float] = None  # any result
        self.last_duration_s: Optional[float] = None
        self.last_success_s: Optional[float] = None  # the last that did not fail whole
        self.error: Optional[str] = None  # why the last refresh failed as a whole
        # A whole failure was logged and no refresh has fetched a secret since: a
        # report whose every entry failed (the same outage) does not "work again".
        self._is_broken = False

    def start(self, now: float) -> None:
        self.started = now

    def finish(self, result: Union[SyncReport, KvAgentError], now: float,
               now_wall: float) -> str:
        """Count a finished refresh (``now`` monotonic, ``now_wall`` unix s);
        returns its result (SUCCESS, PARTIAL or FAILURE). A whole failure is
        logged when it differs from the last one; after one, "works again" when a
        refresh fetches a secret again."""
        self.last_end_s = now_wall
        if self.started is not None:
            self.last_duration_s = max(0.0, now - self.started)
        if isinstance(result, SyncReport):
            self.files_written += sum(len(o.changed_paths) for o in result.outcomes)
            kind = PARTIAL if result.failures or result.optional_failures else SUCCESS
        else:
            kind = FAILURE
        self.counts[kind] = self.counts.get(kind, 0) + 1
        if isinstance(result, KvAgentError):
            if str(result) != self.error:
                log.error("refresh failed, every file kept as it was: %s", result)
            self.error = str(result)
            self._is_broken = True
        else:
            if self._is_broken and _fetched_any(result):
                log.info("refresh works again")
                self._is_broken = False
            self.error = None
            self.last_success_s = now_wall
        return kind

    def metrics(self, now_s: float, *, is_up: bool, entries: Tuple[EntryMetrics, ...],
                requests: Mapping[RequestKey, int],
                credentials: Optional[Mapping[str, int]] = None) -> MetricsSnapshot:
        """The metrics file's figures at ``now_s``, with the entries', the
        requests' and the credential socket's connections (None: none served)."""
        return MetricsSnapshot(
            now_s=now_s, is_up=is_up, entries=entries, last_refresh_s=self.last_end_s,
            refresh_duration_s=self.last_duration_s, refreshes=dict(self.counts),
            files_written=self.files_written, requests=requests, credentials=credentials)


def _fetched_any(report: SyncReport) -> bool:
    """Some entry was fetched (or there was none to fetch)."""
    return not report.outcomes or any(o.error is None for o in report.outcomes)
