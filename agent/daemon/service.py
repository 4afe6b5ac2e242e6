"""``kv-agent run``: the long-running agent that systemd supervises.

Lifecycle (the only place that orders cycles of the pipeline; one
:class:`~agent.sync.sync.Sync` does each cycle):

1. Load and validate the manifest (invalid: ManifestError, exit 78), prepare
   the output directory (not tmpfs: WriteError), and delete files that a
   previous run wrote for entries no longer in the manifest.
2. Initial sync, retried with bounded backoff until every non-optional entry
   is on disk, with STATUS= saying what it waits for; then READY=1, so units
   ordered after kv-agent find their files. "On disk" is checked positively,
   file by file: a refresh that failed as a whole (IMDS down) leaves no
   per-secret error behind, so no error must never be read as "written".
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
5. SIGTERM/SIGINT: STOPPING=1, abandon the refresh between two atomic writes,
   remove every old set generation (even with a refresh still stuck: the
   writers then refuse any later swap) and exit 0. Files stay: consumers keep
   working across agent restarts.
   The handlers are installed before step 1 (by ``kv-agent run``, first
   thing: see :mod:`agent.daemon.signals`), and a stop or reload requested before
   the loop starts is honoured.

The daemon in parts: :mod:`agent.daemon.loop` waits (signals, wake pipe, inotify
debounce, watchdog timing); :mod:`agent.daemon.lifecycle` decides (pure functions of
state, event and clock); :mod:`agent.daemon.ledger` knows which files the agent
wrote; :mod:`agent.status.snapshot` is the status it publishes, and
:mod:`agent.daemon.metrics` the Prometheus file (``metrics:``), rewritten after every
refresh, successful or not. This module wires them: it performs what the
lifecycle decides and keeps each entry's state.

Threads: the main thread runs the event loop and owns all state. A refresh
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
import threading
import time
from typing import Callable, Dict, List, Mapping, NamedTuple, Optional, Tuple, Union

from agent.base import retry, transport
from agent.base.errors import KvAgentError, ManifestError
from agent.base.memory import release_free_memory
from agent.base.untrusted import escape
from agent.daemon import lifecycle
from agent.daemon.hooks import HookRunner, hook_triggers
from agent.daemon.ledger import Ledger, regular_inode, writer_root_for
from agent.daemon.lifecycle import Lifecycle
from agent.daemon.loop import EventLoop, Mailbox, Watchdog
from agent.daemon.metrics import (
    EntryMetrics,
    MetricsSnapshot,
    remove_metrics,
    render,
    write_metrics,
)
from agent.daemon.notify import Notifier, watchdog_interval_s
from agent.daemon.signals import SignalFlags
from agent.manifest import Entry, Manifest, parse_manifest, read_manifest_bytes, read_manifest_text
from agent.pipeline.expiry import (
    EXPIRED,
    EXPIRING,
    NOT_YET_VALID,
    ExpiryWarnings,
    Validity,
    describe,
    judge,
    short,
)
from agent.status.snapshot import EntryStatus, StatusSnapshot, iso_time, read_sets, read_written
from agent.status.store import StateStore
from agent.sync.freshness import Freshness, forget_forbidden
from agent.sync.sync import Interrupted, SecretOutcome, Sync, SyncReport, short_cause
from agent.writer import Writer, foreign_in_set

log = logging.getLogger(__name__)

# Wait this long for an in-flight refresh on SIGTERM. Only its writes are worth
# waiting for (tmpfs: milliseconds); its requests are abandoned at once
# (Sync.abort: their sockets shut down), and each write is atomic anyway.
# Short, so SIGTERM exits within ~2 s (issue 17, item 25).
STOP_GRACE_S = 1.5

SyncResult = Union[SyncReport, KvAgentError, None]  # None: interrupted


class SyncDone(NamedTuple):
    """Posted by the refresh thread when its refresh ended."""

    agent: Sync
    result: SyncResult


class Retrying(NamedTuple):
    """Posted by the refresh thread while IMDS or the vault is retried."""

    text: str


Message = Union[SyncDone, Retrying]


class EntryState:
    """What the agent knows about one manifest entry, for STATUS and status.json."""

    def __init__(self, entry: Entry) -> None:
        self.name = entry.name
        self.paths = entry.paths
        self.vault = entry.source.vault
        self.is_optional = entry.is_optional
        # A select entry's own state (its listing): on disk once listed.
        self.is_listing = entry.transform == "select"
        self.version: Optional[str] = None
        self.updated: Optional[float] = None  # wall time a file last changed
        self.checked: Optional[float] = None  # wall time the vault last confirmed it
        self.error: Optional[str] = None
        self.cause: Optional[str] = None
        self.error_since: Optional[float] = None
        # Inode of each file a refresh last found current (written or
        # unchanged): with the ledger, what makes this entry count as on disk.
        self.inodes: Dict[str, Optional[int]] = {}
        # Validity window of what was last written (agent.pipeline.expiry).
        self.validity = Validity()
        self.version_updated: Optional[int] = None  # its `updated` in Key Vault (epoch s)
        self.failures = 0  # refreshes in a row that did not confirm it (metrics)

    def is_same_entry(self, entry: Entry) -> bool:
        return (self.name, self.paths, self.vault) == (entry.name, entry.paths,
                                                      entry.source.vault)

    def as_status(self, expiry: Optional[str], is_pending: bool = False) -> EntryStatus:
        return EntryStatus(self.name, self.paths, self.vault, self.is_optional, self.version,
                           iso_time(self.updated), iso_time(self.checked), self.error,
                           self.cause, iso_time(self.error_since),
                           iso_time(self.validity.not_before), iso_time(self.validity.expires),
                           expiry, is_pending)

    def as_metrics(self, key: str) -> EntryMetrics:
        return EntryMetrics(key, self.name, self.vault, self.checked, self.version_updated,
                            self.failures, self.validity.expires)


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
    ) -> None:
        self._manifest_path = manifest_path
        self._environ = environ
        self._store = StateStore(state_dir)
        self._notifier = notifier or Notifier(environ)
        self._signals = signals or SignalFlags()
        self._wall = wall
        self._now = monotonic
        self._rng = rng
        self._stop = threading.Event()
        self._hooks = HookRunner(environ)
        self._mailbox: "Mailbox[Message]" = Mailbox()
        self._events = EventLoop(manifest_path, self._mailbox, monotonic)
        # State owned by the main thread:
        self._life = Lifecycle()
        self._ledger = Ledger()
        # One writer per output directory, kept across reloads: it holds the
        # old set generations still waiting out their grace (SET_GRACE_S).
        self._writers: Dict[str, Writer] = {}
        self._pending_removals: List[Tuple[Manifest, Manifest]] = []  # until no refresh runs
        self._expiry = ExpiryWarnings()
        # What the last refresh wrote and listed (agent.sync.freshness): kept across
        # reloads, so a refresh fetches only what changed; empty at start.
        self._freshness = Freshness()
        self._manifest: Optional[Manifest] = None
        self._manifest_bytes = b""
        self._agent: Optional[Sync] = None
        self._entries: Dict[str, EntryState] = {}  # by Entry.key
        self._sync_thread: Optional[threading.Thread] = None
        self._sync_agent: Optional[Sync] = None  # the running refresh's (a reload may swap)
        # True when stop left the refresh thread behind (stuck where no socket
        # can be shut): `kv-agent run` then exits without joining it.
        self.is_refresh_abandoned = False
        self._last_refresh: Optional[float] = None
        self._global_error: Optional[str] = None
        self._manifest_error: Optional[str] = None
        self._waiting: Optional[str] = None  # what the running refresh retries
        self._foreign: List[str] = []  # files in sets' directories that are not ours
        self.cycles = 0
        # For the metrics file: the refresh in flight, the last one's end and
        # length, results and files written since start, the last write error.
        self._sync_started: Optional[float] = None
        self._last_sync_end: Optional[float] = None
        self._last_sync_s: Optional[float] = None
        self._refreshes: Dict[str, int] = {}
        self._files_written = 0
        self._metrics_error: Optional[str] = None

    # -- entry point -------------------------------------------------------------------

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
        manifest, raw = self._read_manifest()
        if self._signals.stop_requested:  # SIGTERM while starting: nothing done yet
            log.info("stopped before the first refresh; no file touched")
            self._mailbox.close()
            return 0
        self._store.prepare()
        document = self._store.load()
        self._ledger = Ledger(read_written(document), read_sets(document))
        self._install(manifest, raw)
        self._remove_orphans(manifest)
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

    # -- the loop ----------------------------------------------------------------------

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
                                    self._events.debounce.deadline(), self._retire_deadline()))
            self._handle_messages()
            self._retire_due()
            if self._signals.stop_requested:
                break
            if self._events.debounce.take_if_due(self._now()):
                self._handle_edit()
            if self._signals.take_reload():
                self._reload("SIGHUP")
            if lifecycle.is_refresh_due(self._life, self._now()):
                self._start_sync()

    def _handle_messages(self) -> None:
        """Record what the refresh thread posted, in order."""
        waiting = self._waiting
        for message in self._mailbox.messages():
            if isinstance(message, Retrying):
                self._waiting = message.text
                # Ready or not, STATUS= and `kv-agent status` say what the
                # refresh waits for (a ready agent's used to say nothing).
                self._notifier.status(message.text if not self._life.is_ready
                                      else self._status_line())
            else:
                self._sync_done(message)
        if self._waiting is not None and self._waiting != waiting:
            self._save_status()

    # -- manifest ----------------------------------------------------------------------

    def _read_manifest(self) -> Tuple[Manifest, bytes]:
        """The validated manifest and the very bytes it was parsed from (read
        once, so an edit between two reads cannot pair one with the other)."""
        text = read_manifest_text(self._manifest_path)
        return parse_manifest(text, self._manifest_path), text.encode()

    def _install(self, manifest: Manifest, raw: bytes) -> None:
        """Make ``manifest`` current: a new Sync (token cache and sessions)."""
        is_new_directory = manifest.directory not in self._writers
        agent = Sync(manifest, environ=self._environ, on_retry=self._on_retry,
                      sleep=self._interruptible_sleep,
                      imds_policy=retry.REFRESH_RETRY, vault_policy=retry.REFRESH_RETRY,
                      writer=self._writer(manifest.directory),
                      is_slow_start=True)  # a booting fleet must not burst (VaultClient)
        if is_new_directory:
            # Only for a directory not yet in use: cleaning it again would take
            # an old generation from readers during its grace, or a new one
            # from under a refresh still running for the previous manifest.
            agent.prepare()
        old = self._agent
        self._agent, self._manifest, self._manifest_bytes = agent, manifest, raw
        if old is not None and self._sync_thread is None:
            old.close()
        states: Dict[str, EntryState] = {}
        for entry in manifest.secrets + tuple(s.entry for s in manifest.selections):
            state = self._entries.get(entry.key)
            if state is None or not state.is_same_entry(entry):
                state = EntryState(entry)
            state.is_optional = entry.is_optional
            states[entry.key] = state
        self._entries = states
        self._expiry.keep_only(states)
        self._freshness = forget_forbidden(self._freshness)  # a reload retries the list

    def _tighten_state_dir(self) -> None:
        """Make the state directory STATE_DIR_MODE (0711) again. systemd sets a
        RuntimeDirectory= back to the unit's RuntimeDirectoryMode= (0751, which
        /run/secrets needs) for every process it starts, ExecReload='s too, just
        before that process sends the SIGHUP; left so, 0711 (the promise of
        docs/design/lifecycle.md) would hold only until the first reload. Never fatal."""
        try:
            self._store.prepare()
        except KvAgentError as exc:
            log.warning("%s", exc)

    def _handle_edit(self) -> None:
        """After a quiet debounce, reload if the manifest's bytes changed."""
        # Bounded and non-blocking (a FIFO put in its place must not stall
        # the loop); None when deleted or unreadable: the reload reports it.
        raw = read_manifest_bytes(self._manifest_path)
        if raw is not None and raw == self._manifest_bytes and self._manifest_error is None:
            return  # touched, chmod-ed or rewritten identically
        # (When an edit was rejected, going back to the bytes in use is a
        # change too: the reload clears the rejection from STATUS.)
        self._reload("manifest changed")

    def _reload(self, reason: str) -> None:
        """RELOADING=1, re-read the manifest, refresh now, then READY=1."""
        log.info("reloading (%s)", reason)
        self._tighten_state_dir()
        self._notifier.reloading()
        self._life = lifecycle.reload_started(self._life)
        try:
            manifest, raw = self._read_manifest()
            old = self._manifest
            # Entries compare without their line numbers: comments and blank
            # lines change nothing, and the sessions and token are kept.
            if manifest != old:
                self._install(manifest, raw)
            else:
                self._manifest_bytes = raw
        except KvAgentError as exc:
            problems = exc.problems if isinstance(exc, ManifestError) else (str(exc),)
            for problem in problems:
                log.error("manifest rejected, keeping the previous one: %s", problem)
            self._manifest_error = problems[0]
            self._life, announce_ready = lifecycle.reload_rejected(self._life)
            self._announce(announce_ready)
            return
        self._manifest_error = None
        if old is not None:
            self._pending_removals.append((old, manifest))
            self._remove_pending()
            if old.metrics_path not in (None, manifest.metrics_path):
                self._remove_metrics(old.metrics_path)
        self._life, announce_ready = lifecycle.reload_accepted(self._life)
        self._start_sync()
        self._announce(announce_ready)  # now, not after the refresh (module docstring, 4.)

    def _announce(self, is_ready: bool) -> None:
        """Save status.json, then send READY=1 (``is_ready``) or STATUS= alone.
        In that order: `systemctl start` or `reload` returns at READY=1, and
        `kv-agent status` run next must not read the state from before it."""
        line = self._status_line()
        self._save_status()
        if is_ready:
            self._notifier.ready(line)
        else:
            self._notifier.status(line)

    # -- refresh -----------------------------------------------------------------------

    def _start_sync(self) -> None:
        """Start a refresh in the worker thread, or queue one after the current."""
        self._life, start = lifecycle.start_sync(self._life, self._now())
        if start:
            self._spawn_sync()

    def _spawn_sync(self) -> None:
        agent = self._agent
        assert agent is not None and self._sync_thread is None
        freshness = self._freshness
        # While starting, what an earlier attempt wrote is not fetched again.
        fresh_for_s = 0.0 if self._life.is_ready else agent.manifest.refresh_interval_s
        # Once ready, a busy vault's pause ends the refresh's waiting requests
        # (they keep their files) instead of holding them: Sync.give_way.
        agent.give_way(self._life.is_ready)

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

        self._sync_thread = threading.Thread(target=work, name="refresh", daemon=True)
        self._sync_agent = agent
        self._sync_started = self._now()
        self._sync_thread.start()

    def _sync_done(self, done: SyncDone) -> None:
        assert self._sync_thread is not None
        self._sync_thread.join()
        self._sync_thread = self._sync_agent = None
        self._waiting = None
        self._remove_pending()  # a reload's removals waited for this refresh
        if done.agent is not self._agent:
            done.agent.close()  # a reload replaced it during the refresh
        if done.result is None:
            self._life = lifecycle.sync_abandoned(self._life)  # interrupted by a stop
            return
        self._finish_sync(done.agent, done.result)
        release_free_memory()  # the sync's responses and buffers are garbage now

    def _finish_sync(self, agent: Sync, result: Union[SyncReport, KvAgentError]) -> None:
        self.cycles += 1
        now_wall = self._wall()
        self._count_refresh(result)
        changed: List[Tuple[Tuple[str, ...], str]] = []
        if isinstance(result, KvAgentError):
            if str(result) != self._global_error:
                log.error("refresh failed, every file kept as it was: %s", result)
            self._global_error = str(result)
            for state in self._entries.values():
                state.failures += 1  # no entry was confirmed
            is_failing = True
        else:
            if self._global_error is not None:
                log.info("refresh works again")
            self._global_error = None
            self._last_refresh = now_wall
            if agent is self._agent:  # else a reload replaced its selections
                self._follow_selections(result)
            self._freshness = result.freshness
            for outcome in result.outcomes:
                changed.extend(self._record(outcome, now_wall))
                self._note_version_time(outcome)
            self._record_sets(agent.manifest, result)
            is_failing = bool(result.failures or result.optional_failures)
        assert self._manifest is not None
        self._foreign = _foreign_files(self._manifest)
        finished = lifecycle.sync_finished(
            self._life, is_failing=is_failing, is_current=agent is self._agent,
            has_every_required_file=self._has_every_required_file, now=self._now(),
            interval_s=self._manifest.refresh_interval_s,
            jitter=self._manifest.refresh_jitter, rng=self._rng())
        self._life = finished.state
        if finished.run_hooks:
            for command, paths in hook_triggers(changed).items():
                self._hooks.trigger(command, paths)
        if finished.start_sync:
            self._spawn_sync()
        if finished.became_ready:
            log.info("ready: %s", self._status_line())
        self._announce(finished.announce_ready)
        self._write_metrics()

    def _record(self, outcome: SecretOutcome, now_wall: float) -> List[Tuple[Tuple[str, ...], str]]:
        """Update one entry's state; returns (hook, path) for each file that changed."""
        entry = outcome.entry
        state = self._entries.get(entry.key)
        if state is None:  # the entry left the manifest during the refresh
            state = EntryState(entry)
        if outcome.error is not None:
            message = str(outcome.error)
            if message != state.error:
                level = logging.WARNING if entry.is_optional else logging.ERROR
                log.log(level, "%s", outcome.describe())
                state.error_since = now_wall
            state.error, state.cause = message, short_cause(outcome.error)
            state.failures += 1
            return []
        if state.error is not None:
            log.info("secret '%s' recovered: %s is current again", entry.name,
                     ", ".join(entry.paths))
        state.error = state.cause = state.error_since = None
        state.failures = 0
        state.checked = now_wall
        if outcome.changed or state.updated is None:
            state.updated = now_wall
        state.version = outcome.version
        state.validity = outcome.validity
        self._warn_expiry(state, entry.key, now_wall)
        state.inodes = {path: regular_inode(path) for path in entry.paths}
        for path in outcome.changed_paths:
            self._ledger.record(path, entry.key)
        return [(entry.on_change, path) for path in outcome.changed_paths]

    def _has_every_required_file(self) -> bool:
        """READY's condition: every output of every non-optional entry is a
        regular file that a refresh found current, or that this agent wrote
        earlier in this boot (the ledger lives on /run) and keeps as its last
        good one.

        Checked on the files themselves, never inferred from an absence of
        errors: when IMDS is down, the refresh fails as a whole and no
        per-secret error is recorded at all (issue 9: READY=1 with an empty
        directory).
        """
        return all(self._is_on_disk(state, path) for state in self._entries.values()
                   if not state.is_optional for path in state.paths)

    def _is_on_disk(self, state: EntryState, path: str) -> bool:
        if state.is_listing:  # a select entry: listed since it was installed
            return state.checked is not None
        inode = regular_inode(path)
        return inode is not None and inode in (state.inodes.get(path), self._ledger.inode(path))

    # -- files of dropped entries --------------------------------------------------------

    def _remove_pending(self) -> None:
        """Remove what reloads dropped, once no refresh runs: the refresh
        thread writes with the same writer (which is not thread-safe), and a
        refresh of the old manifest may still write what is being dropped."""
        if self._sync_thread is not None:
            return
        while self._pending_removals:
            old, new = self._pending_removals.pop(0)
            self._remove_dropped(old, new)

    def _remove_dropped(self, old: Manifest, new: Manifest) -> None:
        """Sets and files of ``old`` that ``new`` no longer has. Files that
        left a set still in ``new`` leave its directory by one swap."""
        set_directories = {group.directory for group in new.sets}
        for group in old.sets:
            if group.directory not in set_directories:
                self._remove_set(group.directory, new.directory)
        kept = {path for entry in new.secrets for path in entry.paths}
        selected = {selection.directory for selection in new.selections}
        for selection in old.selections:
            if selection.directory not in selected:
                for path in self._ledger.orphans(kept):
                    if os.path.dirname(path) == selection.directory:
                        self._ledger.remove(old.directory, path)
        left: List[str] = []
        for entry in old.secrets:
            for path in entry.paths:
                if path in kept:
                    continue
                if os.path.dirname(path) in set_directories:
                    left.append(path)
                else:
                    self._ledger.remove(old.directory, path)
        self._remove_members(left, new.directory)

    def _remove_orphans(self, manifest: Manifest) -> None:
        """Sets and files a previous run wrote for entries this manifest no
        longer has. Files in a select entry's directory wait for its first
        successful listing (:meth:`_follow_selections`)."""
        set_directories = [group.directory for group in manifest.sets]
        for directory in self._ledger.set_orphans(set_directories):
            self._remove_set(directory, manifest.directory)
        kept = (path for entry in manifest.secrets for path in entry.paths)
        selected = {selection.directory for selection in manifest.selections}
        left: List[str] = []
        for path in self._ledger.orphans(kept):
            if os.path.dirname(path) in selected:
                continue
            if os.path.dirname(path) in set_directories:
                left.append(path)
            else:
                self._ledger.remove(writer_root_for(path, manifest.directory), path)
        self._remove_members(left, manifest.directory)

    def _remove_members(self, paths: List[str], top: str) -> None:
        """Files that left a set still in the manifest: out of each set's
        directory by one swap, if still the agent's (:meth:`Ledger.remove_members`)."""
        by_set: Dict[str, List[str]] = {}
        for path in paths:
            by_set.setdefault(os.path.dirname(path), []).append(path)
        for directory, members in sorted(by_set.items()):
            self._ledger.remove_members(self._writer(writer_root_for(directory, top)),
                                        directory, members)

    def _follow_selections(self, report: SyncReport) -> None:
        """After a refresh, for each select entry whose listing succeeded:
        track the entries it now covers (for STATUS= and READY) and remove
        the files it wrote for secrets that no longer match (disabled,
        deleted, retagged), each only if still the very file the agent
        wrote (:meth:`Ledger.remove`). A failed listing changes nothing:
        an empty or failed list never removes a file."""
        assert self._manifest is not None
        matched = {outcome.entry.key: outcome.entry for outcome in report.outcomes}
        for directory, paths in report.selected:
            covered = set(paths)
            for key in [key for key in self._entries if os.path.dirname(key) == directory
                        and key not in covered]:
                del self._entries[key]
            for path in paths:
                if path not in self._entries:
                    self._entries[path] = EntryState(matched[path])
            for path in self._ledger.orphans(covered):
                if os.path.dirname(path) == directory:
                    log.info("%s: its secret no longer matches the select entry", path)
                    self._ledger.remove(self._manifest.directory, path)

    def _remove_set(self, directory: str, top: str) -> None:
        self._ledger.remove_set(self._writer(writer_root_for(directory, top)), directory)

    def _record_sets(self, manifest: Manifest, report: SyncReport) -> None:
        """Record each set whose every member a refresh wrote or found
        current: the set's directory and every member's inode (a swap gives
        unchanged members new inodes too)."""
        done = {outcome.entry.key: outcome for outcome in report.outcomes}
        for group in manifest.sets:
            members = [done[key] for key in group.keys if key in done]
            if len(members) != len(group.keys) or any(o.error for o in members):
                continue
            entry_of = {path: o.entry.key for o in members for path in o.entry.paths}
            self._ledger.record_set(group.directory, entry_of, group.name, entry_of)

    # -- old set generations -----------------------------------------------------------

    def _writer(self, root: str) -> Writer:
        """The one writer for ``root``, on the daemon's clock (its grace
        deadlines are the loop's timers); a swap, even in the refresh
        thread, wakes the loop to set the timer for its old generation."""
        writer = self._writers.get(root)
        if writer is None:
            writer = self._writers[root] = Writer(root, clock=self._now,
                                                  on_retiring=self._mailbox.wake)
        return writer

    def _retire_deadline(self) -> Optional[float]:
        """When the oldest pending generation's grace ends; None when
        nothing is pending, so an idle agent has no timer. Whether a refresh
        runs does not matter: the writers' own lock makes removing old
        generations safe beside it (issue 17: a refresh stuck on the network
        kept the old key in tmpfs until it ended)."""
        deadlines = [deadline for deadline in (writer.retire_deadline()
                                               for writer in self._writers.values())
                     if deadline is not None]
        return min(deadlines) if deadlines else None

    def _retire_due(self) -> None:
        """Remove old set generations whose grace has passed (an old key
        must not stay in tmpfs until the next rotation)."""
        deadline = self._retire_deadline()
        if deadline is None or self._now() < deadline:
            return
        for writer in self._writers.values():
            for directory in writer.retire():
                log.debug("removed the old generation %s", directory)

    # -- expiry ------------------------------------------------------------------------

    def _warn_expiry(self, state: EntryState, key: str, now_wall: float) -> None:
        """Log once (daily for "expiring") that what was written is expired,
        expires soon, or is not valid yet; it is written all the same."""
        assert self._manifest is not None
        kind = judge(state.validity, now_wall, self._manifest.warn_before_expiry_s)
        if self._expiry.is_due(key, kind, state.validity, now_wall):
            assert kind is not None
            log.warning("%s", describe(state.name, kind, state.validity, now_wall))

    def _expiry_of(self, state: EntryState) -> Optional[str]:
        if self._manifest is None:
            return None
        return judge(state.validity, self._wall(), self._manifest.warn_before_expiry_s)

    # -- retries, status ---------------------------------------------------------------

    def _interruptible_sleep(self, seconds: float) -> None:
        """A retry sleep that a stop request cuts short (raising Interrupted)."""
        if self._stop.wait(seconds):
            raise Interrupted()

    def _on_retry(self, reason: str, attempt: int, delay: float) -> None:
        """Called in the refresh thread while IMDS or the vault is retried:
        hands the notice to the main thread, which owns the state."""
        text = reason if reason.startswith("waiting") else f"retrying {reason}"
        self._mailbox.post(Retrying(f"{text} (attempt {attempt})"))

    def _status_line(self) -> str:
        """One line an operator can act on, for STATUS= and `kv-agent status`."""
        total = len(self._entries)
        failing = [s for s in self._entries.values() if s.error is not None]
        is_ready = self._life.is_ready
        pending = [s for s in self._entries.values() if self._is_pending(s)] if is_ready else []
        parts: List[str] = []
        if not is_ready and (self._waiting or self._global_error is not None):
            parts.append(self._waiting or f"waiting: {self._global_error}")
        elif not is_ready and self.cycles == 0:
            parts.append(f"starting: fetching {total} secret{'s' if total != 1 else ''}")
        elif self._global_error is not None:
            parts.append(f"refresh failing, files kept: {self._global_error}")
        elif failing:
            names = ", ".join(f"{s.name} ({s.cause})" for s in failing[:3])
            more = f" and {len(failing) - 3} more" if len(failing) > 3 else ""
            parts.append(f"{len(failing)} of {total} secrets failing: {names}{more}")
        elif not pending:
            parts.append(f"{total} secret{'s' if total != 1 else ''} current")
        if pending:
            names = ", ".join(s.name for s in pending[:3])
            more = f" and {len(pending) - 3} more" if len(pending) > 3 else ""
            parts.append(f"{len(pending)} of {total} not written yet: {names}{more}")
        if is_ready and self._refresh_waiting() is not None:
            parts.append(f"refresh {self._refresh_waiting()}")
        parts.extend(self._expiry_parts())
        if self._foreign:
            more = f" and {len(self._foreign) - 1} more" if len(self._foreign) > 1 else ""
            parts.append(f"kept {escape(self._foreign[0])}{more} in a set's directory: "
                         "not kv-agent's, move it elsewhere")
        if self._last_refresh is not None:
            parts.append(f"last refresh {_clock(self._last_refresh)}")
        next_wall = self._next_refresh_wall()
        if next_wall is not None:
            parts.append(f"next {_clock(next_wall)}")
        if self._manifest_error is not None:
            parts.append("manifest edit rejected (see log), previous manifest in use")
        return "; ".join(parts)

    def _is_pending(self, state: EntryState) -> bool:
        """A new entry (a reload added it) that no refresh of this run has
        confirmed or failed yet and whose files the agent never wrote."""
        if state.checked is not None or state.error is not None:
            return False
        return state.is_listing or any(self._ledger.inode(p) is None for p in state.paths)

    def _refresh_waiting(self) -> Optional[str]:
        """What the running refresh retries (``waiting for IMDS: ...``), if anything."""
        return self._waiting if self._sync_thread is not None else None

    def _expiry_parts(self) -> List[str]:
        """``1 expired: web-tls (expired 2026-11-01)`` and the like, for STATUS=."""
        found: Dict[str, List[str]] = {}
        for state in self._entries.values():
            kind = self._expiry_of(state)
            if kind is not None:
                found.setdefault(kind, []).append(short(state.name, kind, state.validity))
        parts = []
        for kind in (EXPIRED, NOT_YET_VALID, EXPIRING):
            names = found.get(kind, [])
            if names:
                more = f" and {len(names) - 3} more" if len(names) > 3 else ""
                parts.append(f"{len(names)} {kind}: {', '.join(names[:3])}{more}")
        return parts

    def _next_refresh_wall(self) -> Optional[float]:
        if self._life.next_refresh is None:
            return None
        return self._wall() + self._life.next_refresh - self._now()

    def snapshot(self) -> StatusSnapshot:
        """The status as it stands, as status.json will hold it."""
        manifest = self._manifest
        return StatusSnapshot(
            pid=os.getpid(), phase=self._life.phase, saved_at=iso_time(self._wall()),
            status=self._status_line(), manifest=os.path.abspath(self._manifest_path),
            entries=tuple(state.as_status(self._expiry_of(state),
                                          self._life.is_ready and self._is_pending(state))
                          for state in self._entries.values()),
            written=self._ledger.records(), sets=self._ledger.sets(),
            manifest_error=self._manifest_error,
            directory=manifest.directory if manifest else None, error=self._global_error,
            last_refresh=iso_time(self._last_refresh),
            next_refresh=iso_time(self._next_refresh_wall()),
            refresh_interval_s=manifest.refresh_interval_s if manifest else None,
            identity_source=self._agent.tokens.source.describe() if self._agent else None,
            waiting=self._refresh_waiting(), is_refreshing=self._sync_thread is not None)

    def _save_status(self) -> None:
        try:
            self._store.save(self.snapshot().as_json())
        except OSError as exc:
            log.warning("cannot write %s: %s", self._store.path, exc.strerror)

    # -- metrics -----------------------------------------------------------------------

    def _count_refresh(self, result: Union[SyncReport, KvAgentError]) -> None:
        """Record a finished refresh's result, length and written files."""
        now = self._now()
        self._last_sync_end = self._wall()
        if self._sync_started is not None:
            self._last_sync_s = max(0.0, now - self._sync_started)
        if isinstance(result, SyncReport):
            self._files_written += sum(len(o.changed_paths) for o in result.outcomes)
            kind = "partial" if result.failures or result.optional_failures else "success"
        else:
            kind = "failure"  # as a whole: no token, no vault
        self._refreshes[kind] = self._refreshes.get(kind, 0) + 1

    def _note_version_time(self, outcome: SecretOutcome) -> None:
        """Keep the written version's ``updated`` time (for its age), as the
        refresh's memory (agent.sync.freshness) has it for the entry's first source."""
        state = self._entries.get(outcome.entry.key)
        if state is None or outcome.error is not None or not outcome.entry.sources:
            return
        seen = self._freshness.sources.get(outcome.entry.sources[0])
        if seen is not None and seen.version == outcome.version:
            state.version_updated = seen.updated

    def _remove_metrics(self, path: Optional[str]) -> None:
        """A reload turned metrics off or moved them: the old file goes, so
        no stale series (``kv_agent_up 1`` forever) stays behind."""
        if path is None:
            return
        try:
            if remove_metrics(path):
                log.info("metrics: removed %s (no longer in the manifest)", path)
        except KvAgentError as exc:
            log.warning("%s", exc)
        self._metrics_error = None

    def metrics(self, *, is_up: bool = True) -> MetricsSnapshot:
        """The metrics as they stand (agent.daemon.metrics renders them)."""
        return MetricsSnapshot(
            now_s=self._wall(), is_up=is_up,
            entries=tuple(state.as_metrics(key) for key, state in sorted(self._entries.items())),
            last_refresh_s=self._last_sync_end, refresh_duration_s=self._last_sync_s,
            refreshes=dict(self._refreshes), files_written=self._files_written,
            requests=transport.REQUESTS.snapshot())

    def _write_metrics(self, *, is_up: bool = True) -> None:
        """Rewrite the metrics file when the manifest asks for one; a failure
        is logged once (until it changes or the write works again), never fatal."""
        path = self._manifest.metrics_path if self._manifest else None
        if path is None:
            return
        try:
            write_metrics(path, render(self.metrics(is_up=is_up)))
        except KvAgentError as exc:
            if str(exc) != self._metrics_error:
                log.warning("%s", exc)
            self._metrics_error = str(exc)
            return
        except Exception:  # a bug: the metrics must never take the agent down
            log.exception("metrics: writing %s failed unexpectedly", path)
            return
        if self._metrics_error is not None:
            log.info("metrics: %s written again", path)
        self._metrics_error = None

    # -- stop --------------------------------------------------------------------------

    def _shutdown(self) -> None:
        """STOPPING=1; let an in-flight refresh finish its current write; exit."""
        self._notifier.stopping()
        self._life = lifecycle.stopped(self._life)
        self._stop.set()
        thread = self._sync_thread
        if thread is not None:
            # Abandon its requests: a vault that neither answers nor fails must
            # not hold SIGTERM for the request's own timeout (issue 17, item 25).
            abandoned = self._sync_agent.abort() if self._sync_agent is not None else 0
            thread.join(STOP_GRACE_S)
            self.is_refresh_abandoned = thread.is_alive()
            if abandoned or self.is_refresh_abandoned:
                log.warning("stopping with a refresh still waiting on the network: %d "
                            "request%s abandoned; no file is half-written (writes are "
                            "atomic)", abandoned, "" if abandoned == 1 else "s")
        self._record_late_writes()
        is_idle = thread is None or not thread.is_alive()
        # No reader is protected past the agent's life; no old key stays, and
        # a refresh still stuck on the network cannot swap in another.
        for writer in self._writers.values():
            writer.stop()
        self._save_status()
        self._write_metrics(is_up=False)
        if self._agent is not None and is_idle:
            self._agent.close()
        self._mailbox.close()
        log.info("stopped; files left in place")

    def _record_late_writes(self) -> None:
        """Record files written by a refresh that finished while stopping."""
        for message in self._mailbox.messages():
            if isinstance(message, SyncDone) and isinstance(message.result, SyncReport):
                for outcome in message.result.outcomes:
                    for path in outcome.changed_paths:
                        self._ledger.record(path, outcome.entry.key)
                self._record_sets(message.agent.manifest, message.result)


def _foreign_files(manifest: Manifest) -> List[str]:
    """Files in the manifest's sets' directories that are not the agent's:
    kept, never deleted, and named in STATUS= so someone moves them."""
    paths = {entry.key: entry.paths for entry in manifest.secrets}
    return [path for group in manifest.sets
            for path in foreign_in_set(group.directory,
                                       [p for key in group.keys for p in paths.get(key, ())])]


def _clock(epoch_s: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(epoch_s))
