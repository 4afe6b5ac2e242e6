"""``on_change`` hooks: commands run after a secret's file changed.

A hook is an argv tuple, run without a shell. Triggers are debounced per
hook: a hook named by several entries runs once per refresh, and a trigger
that arrives while the hook is still running queues exactly one more run
after it. Each run has a timeout; a failure is logged and never fatal. Hooks
run in their own threads so a slow ``systemctl reload`` never delays a
refresh, a signal or the watchdog.

Hook output is discarded, not logged: a hook may print what it read, and the
agent's log must never hold a secret.
"""

from __future__ import annotations

import logging
import os
import subprocess
import threading
from typing import Dict, Mapping, Sequence, Set, Tuple

log = logging.getLogger(__name__)

Command = Tuple[str, ...]
DEFAULT_TIMEOUT_S = 30.0
PRIVATE_ENV = frozenset({"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS",
                         "LISTEN_PID", "LISTEN_FDNAMES"})


class HookRunner:
    """Runs hooks in the background, one run at a time per hook."""

    def __init__(self, environ: Mapping[str, str], timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        # systemd's hand-over variables are the agent's own: a hook that speaks
        # sd_notify must not report into the agent's notify socket or watchdog.
        self._environ = {key: value for key, value in environ.items()
                         if key not in PRIVATE_ENV}
        self._timeout_s = timeout_s
        self._lock = threading.Lock()
        self._running: Set[Command] = set()
        self._pending: Dict[Command, Tuple[str, ...]] = {}
        self._threads: Set[threading.Thread] = set()

    def trigger(self, command: Command, paths: Sequence[str]) -> None:
        """Run ``command`` (now, or after its current run) for changed ``paths``."""
        with self._lock:
            if command in self._running:
                merged = set(self._pending.get(command, ())) | set(paths)
                self._pending[command] = tuple(sorted(merged))
                return
            self._running.add(command)
        self._start(command, tuple(paths))

    def trigger_changed(self, changed: Sequence[Tuple[Command, str]]) -> None:
        """Run each command of (command, path) ``changed`` once, for all its paths."""
        for command, paths in hook_triggers(changed).items():
            self.trigger(command, paths)

    def _start(self, command: Command, paths: Tuple[str, ...]) -> None:
        thread = threading.Thread(target=self._loop, args=(command, paths),
                                  name="on_change", daemon=True)
        with self._lock:
            self._threads.add(thread)
        thread.start()

    def _loop(self, command: Command, paths: Tuple[str, ...]) -> None:
        try:
            while True:
                self._run_once(command, paths)
                with self._lock:
                    if command not in self._pending:
                        self._running.discard(command)
                        return
                    paths = self._pending.pop(command)
        finally:
            with self._lock:
                self._threads.discard(threading.current_thread())

    def _run_once(self, command: Command, paths: Tuple[str, ...]) -> None:
        env = dict(self._environ, KV_AGENT_CHANGED=" ".join(paths))
        shown = " ".join(command)
        try:
            done = subprocess.run(list(command), env=env, stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  timeout=self._timeout_s, check=False, close_fds=True,
                                  cwd="/")
        except subprocess.TimeoutExpired:
            log.warning("on_change hook '%s' timed out after %g s and was killed",
                        shown, self._timeout_s)
        except OSError as exc:
            log.warning("on_change hook '%s' could not start: %s", shown,
                        exc.strerror or exc)
        else:
            if done.returncode == 0:
                log.info("ran on_change hook '%s' for %s", shown, ", ".join(paths))
            else:
                log.warning("on_change hook '%s' exited with status %d (its output is "
                            "discarded; run it by hand to see why)", shown, done.returncode)

    def wait(self, timeout_s: float) -> None:
        """Wait (bounded) for running hooks, e.g. before exiting."""
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(timeout_s)


def hook_triggers(changed: Sequence[Tuple[Command, str]]) -> Dict[Command, Tuple[str, ...]]:
    """Group (command, path) pairs so each command runs once with all its paths."""
    grouped: Dict[Command, Set[str]] = {}
    for command, path in changed:
        if command:
            grouped.setdefault(command, set()).add(path)
    return {command: tuple(sorted(paths)) for command, paths in grouped.items()}


def is_executable(command: Command) -> bool:
    """Whether argv[0] can be found and run (for a warning at load time)."""
    program = command[0]
    if "/" in program:
        return os.access(program, os.X_OK)
    return any(os.access(os.path.join(d, program), os.X_OK)
               for d in os.environ.get("PATH", os.defpath).split(os.pathsep) if d)
