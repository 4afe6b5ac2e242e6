"""``kv-agent run``: the long-running agent that systemd supervises.

Lifecycle (the only place that orders cycles of the manifest -> identity ->
vault -> writer path; one :class:`~agent.agent.Agent` does each cycle):

1. Load and validate the manifest (invalid: ManifestError, exit 78), prepare
   the output directory (not tmpfs: WriteError), and delete files that a
   previous run wrote for secrets no longer in the manifest.
2. Initial sync, retried with bounded backoff until every non-optional secret
   is on disk, with STATUS= saying what it waits for; then READY=1, so units
   ordered after kv-agent find their files. "On disk" is checked positively,
   file by file: a refresh that failed as a whole (IMDS down) leaves no
   per-secret error behind, so no error must never be read as "written".
3. Sleep until the next refresh (interval with jitter), a signal, a manifest
   edit (inotify) or the watchdog; nothing else wakes the process.
4. SIGHUP or a manifest edit: RELOADING=1, re-read the manifest (an invalid
   one is rejected and the old one kept), delete files of removed entries,
   refresh now, READY=1.
5. SIGTERM/SIGINT: STOPPING=1, abandon the refresh between two atomic writes
   and exit 0. Files stay: consumers keep working across agent restarts.
   The handlers are installed before step 1 (by ``kv-agent run``, first
   thing: see :mod:`agent.signals`), and a stop or reload requested before
   the loop starts is honoured.

Threads: the main thread runs the event loop and owns all state; a refresh
runs in one worker thread (itself fanning out fetches) and hands its report
back through a queue plus the self-pipe that also carries signals, so the
loop never blocks on the network. Signal handlers only set flags.
"""

from __future__ import annotations

import errno
import logging
import os
import queue
import random
import selectors
import signal
import stat
import threading
import time
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple, Union

from agent.agent import Agent, Interrupted, SecretOutcome, SyncReport, short_cause
from agent.errors import KvAgentError, ManifestError
from agent.hooks import HookRunner, hook_triggers
from agent.manifest import Manifest, parse_manifest, read_manifest_bytes, read_manifest_text
from agent.notify import Notifier, watchdog_interval_s
from agent.retry import RetryPolicy
from agent.signals import SignalFlags
from agent.state import STATUS_VERSION, StateStore, iso_time, read_written
from agent.watch import ManifestWatcher
from agent.writer import Writer

log = logging.getLogger(__name__)

START_RETRY_S = (1.0, 30.0)  # first and largest delay while waiting to be ready
FAILURE_RETRY_S = 5.0  # a failing refresh retries after 5, 10, 20 ... s, up to the interval
DEBOUNCE_S = 0.25  # quiet time after a manifest event before reading it
DEBOUNCE_MAX_S = 2.0  # ... but never later than this after the first event
# Wait this long for an in-flight refresh on SIGTERM. Only its writes are worth
# waiting for (tmpfs: milliseconds); a fetch stuck on the network is abandoned,
# and each write is atomic anyway. Short, so SIGTERM exits within ~2 s.
STOP_GRACE_S = 1.5
STUCK_AFTER_S = 600.0  # a refresh running longer than this stops the watchdog
# Retry budget of one refresh's IMDS and vault requests; the start-up and
# failure backoffs above then space the refreshes themselves.
REFRESH_RETRY = RetryPolicy(deadline_s=30.0)

SyncResult = Union[SyncReport, KvAgentError, None]  # None: interrupted


class SecretState:
    """What the agent knows about one manifest entry, for STATUS and status.json."""

    def __init__(self, name: str, path: str, vault: str, is_optional: bool) -> None:
        self.name = name
        self.path = path
        self.vault = vault
        self.is_optional = is_optional
        self.version: Optional[str] = None
        self.updated: Optional[float] = None  # wall time the file last changed
        self.checked: Optional[float] = None  # wall time the vault last confirmed it
        self.error: Optional[str] = None
        self.cause: Optional[str] = None
        self.error_since: Optional[float] = None
        # Inode of the file a refresh last found current (written or unchanged):
        # with the ledger of written files, what makes this entry count as on disk.
        self.inode: Optional[int] = None

    def as_json(self) -> Dict[str, Any]:
        return {"name": self.name, "path": self.path, "vault": self.vault,
                "optional": self.is_optional, "version": self.version,
                "updated": iso_time(self.updated), "checked": iso_time(self.checked),
                "error": self.error, "cause": self.cause,
                "error_since": iso_time(self.error_since)}


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
        self._results: "queue.Queue[Tuple[Agent, SyncResult]]" = queue.Queue()
        self._hooks = HookRunner(environ)
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        # State owned by the main thread:
        self._manifest: Optional[Manifest] = None
        self._manifest_bytes = b""
        self._agent: Optional[Agent] = None
        self._secrets: Dict[str, SecretState] = {}
        self._written: Dict[str, int] = {}  # path -> inode of the file we wrote
        self._is_ready = False
        self._phase = "starting"
        self._sync_thread: Optional[threading.Thread] = None
        self._sync_started = 0.0
        self._sync_again = False
        self._ready_after_sync = False
        self._next_refresh: Optional[float] = None
        self._last_refresh: Optional[float] = None
        self._failing_streak = 0
        self._global_error: Optional[str] = None
        self._manifest_error: Optional[str] = None
        self._waiting: Optional[str] = None  # set by the refresh thread while retrying
        self._saved_waiting: Optional[str] = None
        self._edit_first: Optional[float] = None
        self._edit_last: Optional[float] = None
        self.cycles = 0

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
            self._close_wake_pipe()
            return 0
        self._store.prepare()
        self._written = read_written(self._store.load())
        self._install(manifest, raw)
        self._remove_orphans(manifest)
        watcher = ManifestWatcher(self._manifest_path)
        previous_wakeup_fd = signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        if self._signals.reload_requested:
            self._wake()  # a SIGHUP during start-up: reload at the first turn of the loop
        selector = selectors.DefaultSelector()
        selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        selector.register(watcher.fileno(), selectors.EVENT_READ, "inotify")
        try:
            self._notifier.status(f"starting: fetching {len(manifest.secrets)} secrets")
            self._save_status()  # `kv-agent status` sees a starting agent, not none
            self._start_sync()
            self._loop(selector, watcher)
        finally:
            signal.set_wakeup_fd(previous_wakeup_fd)
            selector.close()
            watcher.close()
            self._shutdown()
        return 0

    # -- the loop ----------------------------------------------------------------------

    def _loop(self, selector: selectors.BaseSelector, watcher: ManifestWatcher) -> None:
        watchdog_s = watchdog_interval_s(self._environ, os.getpid())
        next_watchdog = self._now() if watchdog_s else None
        while not self._signals.stop_requested:
            now = self._now()
            if next_watchdog is not None and now >= next_watchdog:
                if self._is_healthy(now):
                    self._notifier.watchdog()
                assert watchdog_s is not None
                next_watchdog = now + watchdog_s
            for key, _ in selector.select(self._timeout(now, next_watchdog)):
                if key.data == "wake":
                    self._drain_wake()
                elif watcher.read():
                    self._note_edit()
            self._handle_results()
            if self._signals.stop_requested:
                break
            if not self._is_ready and self._waiting != self._saved_waiting:
                self._saved_waiting = self._waiting  # what the start waits for
                self._save_status()
            self._handle_edits()
            if self._signals.take_reload():
                self._reload("SIGHUP")
            if self._sync_thread is None and self._next_refresh is not None \
                    and self._now() >= self._next_refresh:
                self._start_sync()

    def _timeout(self, now: float, next_watchdog: Optional[float]) -> Optional[float]:
        """Seconds until the next thing the loop must do itself (None: only events)."""
        deadlines = [d for d in (next_watchdog,) if d is not None]
        if self._sync_thread is None and self._next_refresh is not None:
            deadlines.append(self._next_refresh)
        if self._edit_last is not None:
            deadlines.append(self._edit_deadline())
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - now)

    def _is_healthy(self, now: float) -> bool:
        """The loop runs and no refresh is stuck: worth a WATCHDOG=1."""
        return self._sync_thread is None or now - self._sync_started < STUCK_AFTER_S

    # -- signals -----------------------------------------------------------------------

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:
            pass  # the pipe is full: the loop is waking anyway

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    # -- manifest ----------------------------------------------------------------------

    def _read_manifest(self) -> Tuple[Manifest, bytes]:
        """The validated manifest and the very bytes it was parsed from (read
        once, so an edit between two reads cannot pair one with the other)."""
        text = read_manifest_text(self._manifest_path)
        return parse_manifest(text, self._manifest_path), text.encode()

    def _install(self, manifest: Manifest, raw: bytes) -> None:
        """Make ``manifest`` current: a new Agent (token cache and sessions)."""
        agent = Agent(manifest, environ=self._environ, on_retry=self._on_retry,
                      sleep=self._interruptible_sleep,
                      imds_policy=REFRESH_RETRY, vault_policy=REFRESH_RETRY)
        agent.prepare()
        old = self._agent
        self._agent, self._manifest, self._manifest_bytes = agent, manifest, raw
        if old is not None and self._sync_thread is None:
            old.close()
        states: Dict[str, SecretState] = {}
        for entry in manifest.secrets:
            state = self._secrets.get(entry.path)
            if state is None or state.name != entry.name or state.vault != entry.vault:
                state = SecretState(entry.name, entry.path, entry.vault, entry.is_optional)
            state.is_optional = entry.is_optional
            states[entry.path] = state
        self._secrets = states

    def _note_edit(self) -> None:
        now = self._now()
        if self._edit_first is None:
            self._edit_first = now
        self._edit_last = now

    def _edit_deadline(self) -> float:
        assert self._edit_first is not None and self._edit_last is not None
        return min(self._edit_last + DEBOUNCE_S, self._edit_first + DEBOUNCE_MAX_S)

    def _handle_edits(self) -> None:
        """After a quiet DEBOUNCE_S, reload if the manifest's bytes changed."""
        if self._edit_last is None or self._now() < self._edit_deadline():
            return
        self._edit_first = self._edit_last = None
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
        self._notifier.reloading()
        self._phase = "reloading"
        try:
            manifest, raw = self._read_manifest()
            old = self._manifest
            if manifest != old:
                self._install(manifest, raw)
            else:  # same meaning (perhaps new comments): keep sessions and token
                self._manifest_bytes = raw
        except KvAgentError as exc:
            problems = exc.problems if isinstance(exc, ManifestError) else (str(exc),)
            for problem in problems:
                log.error("manifest rejected, keeping the previous one: %s", problem)
            self._manifest_error = problems[0]
            self._finish_reload()
            return
        self._manifest_error = None
        if old is not None:
            self._remove_dropped(old, manifest)
        self._ready_after_sync = True
        self._start_sync()

    def _finish_reload(self) -> None:
        """End a RELOADING=1 that needs no refresh: READY=1 again, unless the
        agent never was ready (then the first real READY=1 ends it; a READY=1
        now would announce files that may not exist)."""
        if self._is_ready:
            self._phase = "ready"
            self._notifier.ready(self._status_line())
        else:
            self._phase = "starting"
            self._notifier.status(self._status_line())
        self._save_status()

    # -- refresh -----------------------------------------------------------------------

    def _start_sync(self) -> None:
        """Start a refresh in the worker thread, or queue one after the current."""
        if self._sync_thread is not None:
            self._sync_again = True
            return
        agent = self._agent
        assert agent is not None
        self._next_refresh = None
        self._sync_started = self._now()

        def work() -> None:
            result: SyncResult
            try:
                result = agent.sync(should_stop=self._stop.is_set)
            except Interrupted:
                result = None
            except KvAgentError as exc:
                result = exc
            except Exception:  # a bug: report it, keep the daemon alive
                log.exception("refresh failed unexpectedly")
                result = KvAgentError("refresh failed unexpectedly (a bug; see the log)")
            self._results.put((agent, result))
            self._wake()

        self._sync_thread = threading.Thread(target=work, name="refresh", daemon=True)
        self._sync_thread.start()

    def _drain_results(self) -> Iterator[Tuple[Agent, SyncResult]]:
        """Finished refreshes handed over by the worker, without blocking."""
        while True:
            try:
                yield self._results.get_nowait()
            except queue.Empty:
                return

    def _handle_results(self) -> None:
        for agent, result in self._drain_results():
            assert self._sync_thread is not None
            self._sync_thread.join()
            self._sync_thread = None
            self._waiting = None
            if agent is not self._agent:
                agent.close()  # a reload replaced it during the refresh
            if result is None:
                continue  # interrupted by a stop
            self._finish_sync(agent, result)

    def _finish_sync(self, agent: Agent, result: Union[SyncReport, KvAgentError]) -> None:
        self.cycles += 1
        now_wall = self._wall()
        current = agent is self._agent
        if isinstance(result, KvAgentError):
            if str(result) != self._global_error:
                log.error("refresh failed, every file kept as it was: %s", result)
            self._global_error = str(result)
            changed: List[Tuple[Tuple[str, ...], str]] = []
        else:
            if self._global_error is not None:
                log.info("refresh works again")
            self._global_error = None
            self._last_refresh = now_wall
            changed = [self._record(outcome, now_wall) for outcome in result.outcomes]
            changed = [pair for pair in changed if pair[1]]
        if self._is_ready and current:
            for command, paths in hook_triggers(changed).items():
                self._hooks.trigger(command, paths)
        if self._sync_again or not current:
            self._sync_again = False
            self._start_sync()
        else:
            self._schedule(result)
        if not self._is_ready and self._has_every_required_file():
            self._is_ready = True
            self._ready_after_sync = False
            self._phase = "ready"
            log.info("ready: %s", self._status_line())
            self._notifier.ready(self._status_line())
        elif self._ready_after_sync and self._sync_thread is None and self._is_ready:
            self._ready_after_sync = False  # a reload is finished
            self._phase = "ready"
            self._notifier.ready(self._status_line())
        else:
            self._notifier.status(self._status_line())
        self._save_status()

    def _record(self, outcome: SecretOutcome, now_wall: float) -> Tuple[Tuple[str, ...], str]:
        """Update one secret's state; returns (hook, path) when its file changed."""
        entry = outcome.entry
        state = self._secrets.get(entry.path)
        if state is None:  # the entry left the manifest during the refresh
            state = SecretState(entry.name, entry.path, entry.vault, entry.is_optional)
        if outcome.error is not None:
            message = str(outcome.error)
            if message != state.error:
                level = logging.WARNING if entry.is_optional else logging.ERROR
                log.log(level, "%s", outcome.describe())
                state.error_since = now_wall
            state.error, state.cause = message, short_cause(outcome.error)
            return (), ""
        if state.error is not None:
            log.info("secret '%s' recovered: %s is current again", entry.name, entry.path)
        state.error = state.cause = state.error_since = None
        state.checked = now_wall
        if outcome.changed or state.updated is None:
            state.updated = now_wall
        state.version = outcome.version
        state.inode = _inode(entry.path)
        if outcome.changed:
            self._track(entry.path)
            return entry.on_change, entry.path
        return (), ""

    def _schedule(self, result: Union[SyncReport, KvAgentError]) -> None:
        """Next refresh: the interval with jitter, sooner (backing off) after failures."""
        assert self._manifest is not None
        interval = self._manifest.refresh_interval_s
        failing = isinstance(result, KvAgentError) or bool(
            result.failures or result.optional_failures)
        if not self._is_ready and failing:
            first, largest = START_RETRY_S
            delay = min(largest, first * 2 ** self._failing_streak, interval)
        elif failing:
            delay = min(interval, FAILURE_RETRY_S * 2 ** self._failing_streak)
        else:
            delay = interval
        self._failing_streak = self._failing_streak + 1 if failing else 0
        jitter = self._manifest.refresh_jitter
        delay *= 1 + jitter * (2 * self._rng() - 1)
        self._next_refresh = self._now() + max(delay, 0.5)

    def _has_every_required_file(self) -> bool:
        """READY's condition: every non-optional entry's path holds a regular
        file that a refresh found current, or that this agent wrote earlier in
        this boot (the ledger lives on /run) and keeps as its last good one.

        Checked on the files themselves, never inferred from an absence of
        errors: when IMDS is down, the refresh fails as a whole and no
        per-secret error is recorded at all (issue 9: READY=1 with an empty
        directory).
        """
        return all(self._is_on_disk(state) for state in self._secrets.values()
                   if not state.is_optional)

    def _is_on_disk(self, state: SecretState) -> bool:
        try:
            st = os.lstat(state.path)
        except OSError:
            return False
        return stat.S_ISREG(st.st_mode) and st.st_ino in (state.inode,
                                                          self._written.get(state.path))

    # -- files we wrote ----------------------------------------------------------------

    def _track(self, path: str) -> None:
        try:
            self._written[path] = os.lstat(path).st_ino
        except OSError:
            self._written.pop(path, None)

    def _is_our_file(self, path: str) -> bool:
        try:
            st = os.lstat(path)
        except OSError:
            return False
        return stat.S_ISREG(st.st_mode) and self._written.get(path) == st.st_ino

    def _remove_dropped(self, old: Manifest, new: Manifest) -> None:
        kept = {entry.path for entry in new.secrets}
        for entry in old.secrets:
            if entry.path not in kept:
                self._remove_file(old.directory, entry.path)

    def _remove_orphans(self, manifest: Manifest) -> None:
        """Files a previous run wrote for entries this manifest no longer has."""
        kept = {entry.path for entry in manifest.secrets}
        for path in sorted(set(self._written) - kept):
            self._remove_file(writer_root_for(path, manifest.directory), path)

    def _remove_file(self, root: str, path: str) -> None:
        """Delete ``path`` only if it is still the very file this agent wrote."""
        if not self._is_our_file(path):
            if path in self._written:
                log.info("not removing %s: it is no longer the file kv-agent wrote", path)
            self._written.pop(path, None)
            return
        writer = Writer(root)
        try:
            writer.remove(path)
            log.info("removed %s: its secret left the manifest", path)
            # Only parents of a file this agent removed, and only the ones
            # shaped as the writer makes them: not a hunt for empty directories.
            for directory in writer.remove_empty_parents(path):
                log.info("removed %s: empty once its secrets left", directory)
        except (KvAgentError, OSError) as exc:
            log.warning("could not remove %s: %s", path, exc)
        self._written.pop(path, None)

    # -- retries, status ---------------------------------------------------------------

    def _interruptible_sleep(self, seconds: float) -> None:
        """A retry sleep that a stop request cuts short (raising Interrupted)."""
        if self._stop.wait(seconds):
            raise Interrupted()

    def _on_retry(self, reason: str, attempt: int, delay: float) -> None:
        """Called from refresh threads while IMDS or the vault is retried."""
        text = reason if reason.startswith("waiting") else f"retrying {reason}"
        self._waiting = f"{text} (attempt {attempt})"
        if not self._is_ready:
            self._notifier.status(self._waiting)
            self._wake()  # the main thread records it in status.json

    def _status_line(self) -> str:
        """One line an operator can act on, for STATUS= and `kv-agent status`."""
        total = len(self._secrets)
        failing = [s for s in self._secrets.values() if s.error is not None]
        parts: List[str] = []
        if not self._is_ready and (self._waiting or self._global_error is not None):
            parts.append(self._waiting or f"waiting: {self._global_error}")
        elif not self._is_ready and self.cycles == 0:
            parts.append(f"starting: fetching {total} secret{'s' if total != 1 else ''}")
        elif self._global_error is not None:
            parts.append(f"refresh failing, files kept: {self._global_error}")
        elif failing:
            names = ", ".join(f"{s.name} ({s.cause})" for s in failing[:3])
            more = f" and {len(failing) - 3} more" if len(failing) > 3 else ""
            parts.append(f"{len(failing)} of {total} secrets failing: {names}{more}")
        else:
            parts.append(f"{total} secret{'s' if total != 1 else ''} current")
        if self._last_refresh is not None:
            parts.append(f"last refresh {_clock(self._last_refresh)}")
        if self._next_refresh is not None:
            parts.append(f"next {_clock(self._wall() + self._next_refresh - self._now())}")
        if self._manifest_error is not None:
            parts.append("manifest edit rejected (see log), previous manifest in use")
        return "; ".join(parts)

    def _save_status(self) -> None:
        next_wall = (None if self._next_refresh is None
                     else self._wall() + self._next_refresh - self._now())
        document = {
            "version": STATUS_VERSION,
            "pid": os.getpid(),
            "state": self._phase,
            "saved_at": iso_time(self._wall()),  # when stopped: the time of the stop
            "status": self._status_line(),
            "manifest": os.path.abspath(self._manifest_path),
            "manifest_error": self._manifest_error,
            "directory": self._manifest.directory if self._manifest else None,
            "error": self._global_error,
            "last_refresh": iso_time(self._last_refresh),
            "next_refresh": iso_time(next_wall),
            "refresh_interval_s": self._manifest.refresh_interval_s if self._manifest else None,
            "secrets": [state.as_json() for state in self._secrets.values()],
            "written": dict(sorted(self._written.items())),
        }
        try:
            self._store.save(document)
        except OSError as exc:
            log.warning("cannot write %s: %s", self._store.path, exc.strerror)

    # -- stop --------------------------------------------------------------------------

    def _shutdown(self) -> None:
        """STOPPING=1; let an in-flight refresh finish its current write; exit."""
        self._notifier.stopping()
        self._phase = "stopped"
        self._next_refresh = None  # none will come: not in the last status
        self._stop.set()
        thread = self._sync_thread
        if thread is not None:
            thread.join(STOP_GRACE_S)
            if thread.is_alive():
                log.warning("stopping with a refresh still waiting on the network; "
                            "no file is half-written (writes are atomic)")
        self._handle_results_quietly()
        self._save_status()
        if self._agent is not None and (thread is None or not thread.is_alive()):
            self._agent.close()
        self._close_wake_pipe()
        log.info("stopped; files left in place")

    def _close_wake_pipe(self) -> None:
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError as exc:
                if exc.errno != errno.EBADF:
                    raise

    def _handle_results_quietly(self) -> None:
        """Record files written by a refresh that finished while stopping."""
        for _agent, result in self._drain_results():
            if isinstance(result, SyncReport):
                for outcome in result.outcomes:
                    if outcome.changed:
                        self._track(outcome.entry.path)


def _inode(path: str) -> Optional[int]:
    """The inode of the regular file at ``path`` (not following a symlink), or None."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st.st_ino if stat.S_ISREG(st.st_mode) else None


def writer_root_for(path: str, directory: str) -> str:
    """The writer root for removing ``path``: the manifest directory when the
    path lies under it, else the path's own parent (an old directory)."""
    if path.startswith(directory.rstrip("/") + "/"):
        return directory
    return os.path.dirname(path)


def _clock(epoch_s: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(epoch_s))
