"""``kv-agent run``: the long-running agent that systemd supervises.

Lifecycle (the only place that orders cycles of the pipeline; one
:class:`~agent.sync.sync.Sync` does each cycle):

1. Load and validate the manifest (invalid: ManifestError, exit 78), prepare
   the output directory (not tmpfs: WriteError), and delete files that a
   previous run wrote for entries no longer in the manifest.
2. Initial sync, retried with bounded backoff until every non-optional entry
   is on disk (and its credentials in memory), with STATUS= saying what it
   waits for; then READY=1, so units ordered after kv-agent find their files,
   and a unit's ``LoadCredential=`` finds the credential socket, made before
   (while the manifest has credentials: :mod:`agent.daemon.credentials`).
   "On disk" is checked positively, file by file: a refresh that failed as a
   whole (IMDS down) leaves no per-secret error behind, so no error must never
   be read as "written".
3. Sleep until the next refresh (interval with jitter), a signal, a manifest
   edit (inotify), the watchdog, or the end of an old set generation's grace
   (only while one is pending, and whether or not a refresh runs: the
   writers' retire lock lets the loop remove it while a refresh is stuck);
   nothing else wakes the process.
4. SIGHUP or a manifest edit: RELOADING=1, re-read the manifest (an invalid
   one is rejected and the old one kept), READY=1 at once, then delete files
   and sets of removed entries (once no refresh runs) and refresh now. READY=1
   never waits for that refresh: systemd >= 253 keeps the unit "reloading",
   and `systemctl reload` waiting, until READY=1, and a refresh may wait on
   the network for a minute; STATUS= says what it waits for (issue 17).
5. SIGTERM/SIGINT: STOPPING=1, close the credential socket (its file goes,
   its values are dropped), abandon the refresh between two atomic writes,
   remove every old set generation (even with a refresh still stuck: the
   writers then refuse any later swap) and exit 0. Files stay: consumers keep
   working across agent restarts.
   The handlers are installed before step 1 (by ``kv-agent run``, first
   thing: see :mod:`agent.daemon.signals`), and a stop or reload requested before
   the loop starts is honoured.

The daemon in parts: :mod:`agent.daemon.loop` waits (signals, wake pipe, inotify
debounce, watchdog timing); :mod:`agent.daemon.lifecycle` decides (pure functions of
state, event and clock, holding the manifest's schedule); :mod:`agent.daemon.entries`
keeps each entry's state (outcomes, the READY gate, expiry warnings);
:mod:`agent.daemon.reconcile` decides what to remove and when, through
:mod:`agent.daemon.ledger`, which knows which files the agent wrote;
:mod:`agent.daemon.refresh` runs a refresh in its thread and counts refreshes;
:mod:`agent.daemon.credentials` holds the credentials and serves them in a
thread of its own;
:mod:`agent.status.snapshot` is the status it publishes (its line:
:mod:`agent.status.line`; built by :mod:`agent.daemon.status_view`), and
:mod:`agent.daemon.metrics` the Prometheus file (``metrics:``), rewritten after
every refresh, successful or not (and when the sealed cache stands in). This
module wires them and performs what they decide.

Threads: the main thread runs the event loop and owns all state (the
credential store apart: thread-safe, filled by refreshes and read by the
credential socket's thread). A refresh
runs in one worker thread (itself fanning out fetches); the worker never
touches the daemon's state or the notifier: it posts messages (a retry
notice, then its report) to a :class:`~agent.daemon.loop.Mailbox`, whose pipe wakes
the loop, and the main thread records them and sends STATUS=. Signal
handlers only set flags.
"""

from __future__ import annotations

import logging
import os
import random
import time
from typing import Callable, List, Mapping, Optional, Union

from agent.base import retry, transport
from agent.base.errors import KvAgentError
from agent.base.memory import release_free_memory
from agent.cache.seal import Sealer
from agent.daemon import lifecycle
from agent.daemon.cache import SealedCache
from agent.daemon.credentials import Credentials
from agent.daemon.entries import Changed, EntryTable
from agent.daemon.hooks import HookRunner
from agent.daemon.lifecycle import Lifecycle, Schedule
from agent.daemon.loop import EventLoop, Mailbox, Watchdog
from agent.daemon.metrics import MetricsFile
from agent.daemon.notify import Notifier, watchdog_interval_s
from agent.daemon.reconcile import Reconciler
from agent.daemon.refresh import SUCCESS, Message, RefreshStats, RefreshThread, Retrying, SyncDone
from agent.daemon.signals import SignalFlags
from agent.daemon.status_view import daemon_snapshot
from agent.daemon.watch import ManifestFile
from agent.manifest import Manifest
from agent.pipeline.credentials import Grant
from agent.status.snapshot import StatusSnapshot
from agent.status.store import StateStore
from agent.sync.sync import Sync, SyncReport
from agent.writer import Writer
from agent.writer.credentials import CredentialStore

log = logging.getLogger(__name__)


def _new_sync(manifest: Manifest, environ: Mapping[str, str], worker: RefreshThread,
              writer: Writer, credentials: CredentialStore[Grant]) -> Sync:
    """The daemon's Sync for ``manifest``: its retries reported by the refresh
    thread, slow to start (a booting fleet must not burst: VaultClient). With
    ``cache:``, a refresh retries for at most ``after``: the sealed cache is
    looked at when a refresh has said why the files are missing, so one still
    retrying at ``after`` would delay serving to its own end."""
    policy = retry.refresh_retry(manifest.cache.after_s if manifest.cache else None)
    return Sync(manifest, environ=environ, on_retry=worker.on_retry, sleep=worker.sleep,
                imds_policy=policy, vault_policy=policy,
                writer=writer, credentials_store=credentials, is_slow_start=True)


class Daemon:
    """One ``kv-agent run`` process. Construct, then :meth:`run` (main thread only)."""

    def __init__(
        self,
        manifest_path: str,
        *,
        environ: Mapping[str, str],
        state_dir: str,
        notifier: Optional[Notifier] = None,
        signals: Optional[SignalFlags] = None,
        wall: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        rng: Callable[[], float] = random.random,
        sealer: Optional[Sealer] = None,
    ) -> None:
        self._file = ManifestFile(manifest_path)
        self._environ = environ
        self._store = StateStore(state_dir)
        self._notifier = notifier or Notifier(environ)
        self._signals = signals or SignalFlags()
        self._wall, self._now, self._rng = wall, monotonic, rng
        self._hooks = HookRunner(environ)
        self._mailbox: "Mailbox[Message]" = Mailbox()
        self._events = EventLoop(manifest_path, self._mailbox, monotonic)
        self._worker = RefreshThread(self._mailbox)
        self._credentials = Credentials(state_dir)  # the store, and the socket serving it
        # State owned by the main thread:
        self._life = Lifecycle()
        self._entries = EntryTable(self._credentials.store)
        self._reconcile = Reconciler(monotonic, self._mailbox.wake)
        self._stats = RefreshStats()
        self._metrics = MetricsFile()
        self._sync: Optional[Sync] = None  # the manifest in use's (``.manifest``)
        self._cache = SealedCache(sealer, monotonic)  # cache: (agent.daemon.cache)

    @property
    def is_refresh_abandoned(self) -> bool:
        """True when stop left the refresh thread behind (stuck where no socket
        can be shut): `kv-agent run` then exits without joining it."""
        return self._worker.is_abandoned

    @property
    def _manifest(self) -> Optional[Manifest]:
        return self._sync.manifest if self._sync is not None else None

    def run(self) -> int:
        """Run until SIGTERM/SIGINT; returns the exit code (0).

        Raises ManifestError or KvAgentError when the agent cannot start at all.
        """
        self._signals.install()  # a no-op when `kv-agent run` did it first thing
        try:
            return self._run()
        finally:
            self._signals.restore()

    def _run(self) -> int:
        manifest, raw = self._file.read()
        if self._signals.stop_requested:  # SIGTERM while starting: nothing done yet
            log.info("stopped before the first refresh; no file touched")
            self._mailbox.close()
            return 0
        self._store.prepare()
        self._reconcile.load(self._store.load())
        self._install(manifest)
        self._file.accepted(raw)
        self._reconcile.remove_orphans(manifest)
        self._events.open()
        if self._signals.reload_requested:
            self._mailbox.wake()  # a SIGHUP during start-up: reload at the first turn
        try:
            self._notifier.status(f"starting: fetching {len(manifest.secrets)} secrets")
            self._save_status()  # `kv-agent status` sees a starting agent, not none
            self._start_sync()
            self._loop()
        finally:
            self._events.close()
            self._shutdown()
        return 0

    def _loop(self) -> None:
        watchdog = Watchdog(watchdog_interval_s(self._environ, os.getpid()), self._now())
        while not self._signals.stop_requested:
            now = self._now()
            if watchdog.is_due(now):
                if lifecycle.is_healthy(self._life, now):
                    self._notifier.watchdog()
                watchdog.sent(now)
            next_refresh = None if self._life.is_syncing else self._life.next_refresh
            self._events.wait(now, (watchdog.deadline(), next_refresh,
                                    self._events.debounce.deadline(),
                                    self._reconcile.retire_deadline(),
                                    self._cache.deadline(self._life.is_ready)))
            self._handle_messages()
            self._reconcile.retire_due()
            if self._cache.is_due(self._life.is_ready, self._now()):
                self._serve_cache()
            if self._signals.stop_requested:
                break
            if self._events.debounce.take_if_due(self._now()) and self._file.is_edited():
                self._reload("manifest changed")
            if self._signals.take_reload():
                self._reload("SIGHUP")
            if lifecycle.is_refresh_due(self._life, self._now()):
                self._start_sync()

    def _handle_messages(self) -> None:
        """Record what the refresh thread posted, in order."""
        waiting = self._worker.waiting
        for message in self._mailbox.messages():
            if isinstance(message, Retrying):
                self._worker.waiting = message.text
                # Ready or not, STATUS= and `kv-agent status` say what the
                # refresh waits for (a ready agent's used to say nothing).
                self._notifier.status(message.text if not self._life.is_ready
                                      else self.snapshot().status)
            else:
                self._sync_done(message)
        if self._worker.waiting is not None and self._worker.waiting != waiting:
            self._save_status()

    def _install(self, manifest: Manifest) -> None:
        """Make ``manifest`` current: a new Sync (token cache and sessions),
        its entries and its schedule."""
        is_new_directory = not self._reconcile.has_writer(manifest.directory)
        agent = _new_sync(manifest, self._environ, self._worker,
                          self._reconcile.writer(manifest.directory), self._credentials.store)
        if is_new_directory:
            # Only for a directory not yet in use: cleaning it again would take
            # an old generation from readers during its grace, or a new one
            # from under a refresh still running for the previous manifest.
            agent.prepare()
        old, self._sync = self._sync, agent
        if old is not None and not self._worker.is_running:
            old.close()
        self._entries.install(manifest)
        self._life = lifecycle.rescheduled(
            self._life, Schedule(manifest.refresh_interval_s, manifest.refresh_jitter))
        self._worker.reloaded()
        self._credentials.install(manifest)  # its socket open before READY=1
        self._cache.install(manifest)  # prunes the copies of entries it lacks

    def _reload(self, reason: str) -> None:
        """RELOADING=1, re-read the manifest, refresh now, then READY=1."""
        log.info("reloading (%s)", reason)
        self._store.tighten_again()  # systemd loosened it for ExecReload= (0751)
        self._notifier.reloading()
        self._life = lifecycle.reload_started(self._life)
        try:
            manifest, raw = self._file.read()
            old = self._manifest
            # Entries compare without their line numbers: comments and blank
            # lines change nothing, and the sessions and token are kept.
            if manifest != old:
                self._install(manifest)
        except KvAgentError as exc:
            self._file.rejected(exc)
            self._life, announce_ready = lifecycle.reload_rejected(self._life)
            self._announce(announce_ready)
            return
        self._file.accepted(raw)
        if old is not None:
            self._reconcile.dropped(old, manifest, is_refreshing=self._worker.is_running)
            if old.metrics_path not in (None, manifest.metrics_path):
                self._metrics.remove(old.metrics_path)
        self._life, announce_ready = lifecycle.reload_accepted(self._life)
        self._start_sync()
        self._announce(announce_ready)  # now, not after the refresh (module docstring, 4.)

    def _announce(self, is_ready: bool) -> None:
        """Save status.json, then send READY=1 (``is_ready``) or STATUS= alone,
        both from one snapshot. In that order: `systemctl start` or `reload`
        returns at READY=1, and `kv-agent status` run next must not read the
        state from before it."""
        line = self._save_status().status
        if is_ready:
            self._notifier.ready(line)
        else:
            self._notifier.status(line)

    # -- refreshes ---------------------------------------------------------------------

    def _start_sync(self) -> None:
        """Start a refresh in the worker thread, or queue one after the current."""
        self._life, start = lifecycle.start_sync(self._life, self._now())
        if start:
            self._spawn_sync()

    def _spawn_sync(self) -> None:
        agent = self._sync
        assert agent is not None and not self._worker.is_running
        # While starting, what an earlier attempt wrote is not fetched again.
        fresh_for_s = 0.0 if self._life.is_ready else agent.manifest.refresh_interval_s
        # Once ready, a busy vault's pause ends the refresh's waiting requests
        # (they keep their files) instead of holding them: Sync.give_way.
        agent.give_way(self._life.is_ready)
        self._stats.start(self._now())
        self._worker.start(agent, fresh_for_s)

    def _sync_done(self, done: SyncDone) -> None:
        self._worker.ended(done)
        # A reload's removals waited for this refresh.
        self._reconcile.remove_pending(is_refreshing=False)
        if done.agent is not self._sync:
            done.agent.close()  # a reload replaced it during the refresh
        if done.result is None:
            self._life = lifecycle.sync_abandoned(self._life)  # interrupted by a stop
            return
        self._finish_sync(done.agent, done.result)
        release_free_memory()  # the sync's responses and buffers are garbage now

    def _finish_sync(self, agent: Sync, result: Union[SyncReport, KvAgentError]) -> None:
        """Record a finished refresh, then do what the lifecycle decides."""
        now_wall = self._wall()
        kind = self._stats.finish(result, self._now(), now_wall)
        changed: List[Changed] = []
        self._cache.refreshed(result, self._credentials.store, now_wall,
                              is_current=agent is self._sync)
        if isinstance(result, KvAgentError):
            self._entries.record_failure()
        else:
            if agent is self._sync:  # else a reload replaced its selections
                self._entries.follow_selections(result)
                self._reconcile.follow_selections(result, agent.manifest.directory)
            changed = self._entries.record(result.outcomes, result.freshness, now_wall)
            self._reconcile.record(agent.manifest, result)
        manifest = self._manifest
        assert manifest is not None
        self._reconcile.scan_foreign(manifest)
        finished = lifecycle.sync_finished(
            self._life, is_failing=kind != SUCCESS, is_current=agent is self._sync,
            has_every_required_file=lambda: self._entries.has_every_required_file(
                self._reconcile.ledger.inode),
            now=self._now(), rng=self._rng(), is_serving=bool(self._cache.served))
        self._life = finished.state
        if finished.run_hooks:
            self._hooks.trigger_changed(changed)
        if finished.start_sync:
            self._spawn_sync()
        if finished.became_ready:
            log.info("ready: %s", self.snapshot().status)
        self._announce(finished.announce_ready)
        self._write_metrics()

    def _serve_cache(self) -> None:
        """Sealed copies stand in for an unreachable vault at start (agent.daemon.cache)."""
        if self._cache.serve(self._entries, self._reconcile, self._credentials.store,
                             self._wall()):
            self._life = lifecycle.served_from_cache(self._life)
            self._announce(True)
            self._write_metrics()  # the gauges say so now, not after the next refresh

    # -- status and metrics ------------------------------------------------------------

    def snapshot(self) -> StatusSnapshot:
        """The status as it stands, as status.json will hold it, with its line
        (:mod:`agent.status.line`): what STATUS= sends and `kv-agent status` shows."""
        return daemon_snapshot(self._file, self._sync, self._life, self._entries,
                               self._reconcile, self._stats, self._worker, self._cache,
                               wall=self._wall(), now=self._now())

    def _save_status(self) -> StatusSnapshot:
        """Save status.json (a failure is logged, never fatal); the snapshot saved."""
        return self._store.publish(self.snapshot())

    def _write_metrics(self, *, is_up: bool = True) -> None:
        """Rewrite the metrics file when the manifest asks for one (the figures
        are taken only then)."""
        self._metrics.write(self._manifest.metrics_path if self._manifest else None,
                            lambda: self._stats.metrics(
                                self._wall(), is_up=is_up,
                                entries=self._entries.metrics(self._cache.from_cache()),
                                requests=transport.REQUESTS.snapshot(),
                                credentials=self._credentials.counts()))

    def _shutdown(self) -> None:
        """STOPPING=1; let an in-flight refresh finish its current write; exit."""
        self._notifier.stopping()
        self._life = lifecycle.stopped(self._life)
        self._credentials.stop()  # first: a unit starting now fails, served by no one
        self._worker.stop()
        self._reconcile.record_late(self._mailbox.messages())
        self._reconcile.stop()
        self._save_status()
        self._write_metrics(is_up=False)
        if self._sync is not None and not self._worker.is_abandoned:
            self._sync.close()
        self._mailbox.close()
        log.info("stopped; files left in place")
