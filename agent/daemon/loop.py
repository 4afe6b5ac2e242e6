"""The daemon's event loop: signals, the wake pipe, inotify debounce, watchdog timing.

Everything the main thread waits on is one file descriptor in one
``selectors`` call, so the process sleeps until something happens and idles
at zero CPU:

* the **wake pipe** of a :class:`Mailbox`: worker threads post messages
  (a finished refresh, a retry notice) and write a byte; the same pipe is
  ``signal.set_wakeup_fd``, so a signal wakes the loop too (the handlers only
  set flags, :mod:`agent.daemon.signals`; Python retries an interrupted select,
  PEP 475, so without this fd a signal would wait for the next timeout);
* the **inotify** fd of the manifest's directory (:mod:`agent.daemon.watch`),
  whose events are debounced (:class:`Debounce`): editors write in bursts;
* timeouts: the next refresh, the debounce deadline and the **watchdog**
  (:class:`Watchdog`), whichever comes first.

:class:`Debounce` and :class:`Watchdog` are pure timing given ``now``; the
decisions about what an event means are the lifecycle's (:mod:`agent.daemon.lifecycle`).
"""

from __future__ import annotations

import os
import queue
import selectors
import signal
import threading
from typing import Any, Callable, Generic, Iterable, Iterator, Optional, TypeVar

from agent.daemon.watch import ManifestWatcher

DEBOUNCE_S = 0.25  # quiet time after a manifest event before reading it
DEBOUNCE_MAX_S = 2.0  # ... but never later than this after the first event

T = TypeVar("T")


class Debounce:
    """Coalesces a burst of manifest events into one reload: due DEBOUNCE_S
    after the last event, and never later than DEBOUNCE_MAX_S after the first."""

    def __init__(self) -> None:
        self._first: Optional[float] = None
        self._last: Optional[float] = None

    def note(self, now: float) -> None:
        if self._first is None:
            self._first = now
        self._last = now

    def deadline(self) -> Optional[float]:
        """When the burst is over, or None when there is none."""
        if self._first is None or self._last is None:
            return None
        return min(self._last + DEBOUNCE_S, self._first + DEBOUNCE_MAX_S)

    def take_if_due(self, now: float) -> bool:
        """True (once) when a burst is over: read the manifest now."""
        deadline = self.deadline()
        if deadline is None or now < deadline:
            return False
        self._first = self._last = None
        return True


class Watchdog:
    """When the next WATCHDOG=1 is due: at once, then every ``interval_s``
    (None: systemd asked for no watchdog, and none is ever due)."""

    def __init__(self, interval_s: Optional[float], now: float) -> None:
        self._interval_s = interval_s
        self._next = now if interval_s else None

    def deadline(self) -> Optional[float]:
        return self._next

    def is_due(self, now: float) -> bool:
        return self._next is not None and now >= self._next

    def sent(self, now: float) -> None:
        """The ping was considered (sent, or withheld for a stuck refresh)."""
        if self._interval_s:
            self._next = now + self._interval_s


class Mailbox(Generic[T]):
    """Messages from worker threads to the main thread, through a queue plus
    a non-blocking self-pipe that wakes the loop. ``post`` is thread-safe;
    everything else belongs to the main thread."""

    def __init__(self) -> None:
        self._queue: "queue.Queue[T]" = queue.Queue()
        self.read_fd, self.write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        # A refresh stuck on the network may post after close(): never into
        # a closed fd, whose number may since belong to another file.
        self._lock = threading.Lock()
        self._is_closed = False

    def post(self, message: T) -> None:
        self._queue.put(message)
        self.wake()

    def wake(self) -> None:
        with self._lock:
            if self._is_closed:
                return  # stopped: nobody listens
            try:
                os.write(self.write_fd, b"\0")
            except BlockingIOError:
                pass  # the pipe is full: the loop is waking anyway

    def drain_pipe(self) -> None:
        try:
            while os.read(self.read_fd, 4096):
                pass
        except BlockingIOError:
            pass

    def messages(self) -> Iterator[T]:
        """Messages posted so far, in order, without blocking."""
        while True:
            try:
                yield self._queue.get_nowait()
            except queue.Empty:
                return

    def close(self) -> None:
        with self._lock:
            if self._is_closed:
                return
            self._is_closed = True
            os.close(self.read_fd)
            os.close(self.write_fd)


class EventLoop:
    """One wait for the wake pipe, the manifest watcher or a deadline.

    :meth:`open` registers the fds and makes the pipe the signal wakeup fd;
    :meth:`close` undoes it. Main thread only.
    """

    def __init__(self, manifest_path: str, mailbox: "Mailbox[Any]",
                 monotonic: Callable[[], float]) -> None:
        self._manifest_path = manifest_path
        self._mailbox = mailbox
        self._now = monotonic
        self.debounce = Debounce()
        self._watcher: Optional[ManifestWatcher] = None
        self._selector: Optional[selectors.BaseSelector] = None
        self._previous_wakeup_fd = -1

    def open(self) -> None:
        self._watcher = ManifestWatcher(self._manifest_path)
        self._previous_wakeup_fd = signal.set_wakeup_fd(self._mailbox.write_fd,
                                                        warn_on_full_buffer=False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._mailbox.read_fd, selectors.EVENT_READ, "wake")
        self._selector.register(self._watcher.fileno(), selectors.EVENT_READ, "inotify")

    def wait(self, now: float, deadlines: Iterable[Optional[float]]) -> None:
        """Sleep until an fd is readable or the earliest deadline (monotonic
        seconds; None entries ignored, none at all: only events) passes;
        drain the wake pipe and note manifest events for the debounce."""
        assert self._selector is not None and self._watcher is not None
        due = [deadline for deadline in deadlines if deadline is not None]
        timeout = max(0.0, min(due) - now) if due else None
        for key, _ in self._selector.select(timeout):
            if key.data == "wake":
                self._mailbox.drain_pipe()
            elif self._watcher.read():
                self.debounce.note(self._now())

    def close(self) -> None:
        if self._selector is not None:
            signal.set_wakeup_fd(self._previous_wakeup_fd)
            self._selector.close()
        if self._watcher is not None:
            self._watcher.close()

