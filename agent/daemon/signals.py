"""Signal flags for ``kv-agent run``, installed before anything slow.

SIGHUP's default action terminates a process. Importing the agent's
dependencies (requests, urllib3, yaml) and reading the manifest take ~100 ms,
and the daemon used to install its handlers only after that: a SIGHUP in that
window (a reload racing a restart) killed it, and a SIGTERM ended it by signal
instead of with exit 0 (issue 9). ``kv-agent run`` therefore installs these
handlers first thing, and the daemon reads the same flags, so a stop or a
reload requested before its loop starts is honoured rather than lost. Only the
interpreter's own start-up, before any kv-agent code runs, stays unguarded.

This module imports nothing but the standard ``signal`` module, so installing
the handlers costs nothing. Handlers only set flags; the daemon's loop is woken
through ``signal.set_wakeup_fd`` (PEP 475 retries the interrupted call).
"""

from __future__ import annotations

import signal
from types import FrameType
from typing import Any, Dict, Optional

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
RELOAD_SIGNALS = (signal.SIGHUP,)


class SignalFlags:
    """What SIGTERM/SIGINT (stop) and SIGHUP (reload) asked for so far.

    :meth:`install` and :meth:`restore` must run in the main thread (a Python
    rule for ``signal.signal``); both are idempotent.
    """

    def __init__(self) -> None:
        self.stop_requested = False
        self.reload_requested = False
        self._previous: Dict[int, Any] = {}

    def install(self) -> None:
        """Route the stop and reload signals to these flags."""
        if self._previous:
            return
        for signum in RELOAD_SIGNALS:  # the one whose default action kills
            self._previous[signum] = signal.signal(signum, self._on_reload)
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._on_stop)

    def restore(self) -> None:
        """Put back the handlers that were there before :meth:`install`."""
        for signum, handler in self._previous.items():
            if handler is not None:  # None: installed from C, cannot be restored
                signal.signal(signum, handler)
        self._previous.clear()

    def take_reload(self) -> bool:
        """Whether a reload was requested since the last call (and forget it)."""
        requested, self.reload_requested = self.reload_requested, False
        return requested

    def _on_stop(self, signum: int, frame: Optional[FrameType]) -> None:
        self.stop_requested = True

    def _on_reload(self, signum: int, frame: Optional[FrameType]) -> None:
        self.reload_requested = True
