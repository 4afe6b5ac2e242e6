"""systemd readiness and status notifications (sd_notify(3)), via sdnotify.

Small and honest: without ``NOTIFY_SOCKET`` (not under systemd, or
``Type=simple``) every call is a no-op; with it, a send that fails is logged
once and never stops the agent, because losing a STATUS line must not cost the
secrets. sdnotify itself swallows every error unless ``debug=True``, so it is
used in that mode and errors are handled here.
"""

from __future__ import annotations

import logging
import time
from typing import Mapping, Optional

log = logging.getLogger(__name__)

SOCKET_ENV = "NOTIFY_SOCKET"
WATCHDOG_ENV = "WATCHDOG_USEC"
WATCHDOG_PID_ENV = "WATCHDOG_PID"


def watchdog_interval_s(environ: Mapping[str, str], pid: int) -> Optional[float]:
    """Half of ``WATCHDOG_USEC`` in seconds (as sd_watchdog_enabled(3)
    advises), or None when systemd asked for no watchdog or asked another
    process (``WATCHDOG_PID``)."""
    usec = environ.get(WATCHDOG_ENV, "")
    owner = environ.get(WATCHDOG_PID_ENV, "")
    if not usec.isdigit() or int(usec) == 0 or (owner and owner != str(pid)):
        return None
    return int(usec) / 2_000_000


class Notifier:
    """Sends sd_notify messages when systemd asked for them."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._notifier = None
        self._failed = False
        self._last_status: Optional[str] = None
        if environ.get(SOCKET_ENV):
            import sdnotify  # only under systemd

            try:
                # debug=True: raise instead of silently swallowing errors.
                self._notifier = sdnotify.SystemdNotifier(debug=True)
            except OSError as exc:
                log.warning("cannot reach systemd's notify socket (%s); "
                            "continuing without notifications", exc)

    @property
    def is_enabled(self) -> bool:
        return self._notifier is not None

    def send(self, *fields: str) -> None:
        """Send ``KEY=value`` fields as one datagram."""
        if self._notifier is None:
            return
        # sdnotify encodes latin-1; a path or message may hold anything else.
        message = "\n".join(fields).encode("latin-1", "replace").decode("latin-1")
        try:
            self._notifier.notify(message)
        except OSError as exc:
            if not self._failed:
                log.warning("notify to systemd failed (%s); will keep trying", exc)
            self._failed = True
        else:
            self._failed = False

    def ready(self, status: str) -> None:
        self._last_status = status
        self.send("READY=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        """Send STATUS= only when it changed: systemd keeps the last one."""
        if status != self._last_status:
            self._last_status = status
            self.send(f"STATUS={status}")

    def reloading(self) -> None:
        # MONOTONIC_USEC lets systemd (>= 253, Type=notify-reload) tie the
        # reload to this moment; older systemd ignores the field.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self._last_status = "reloading"
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=reloading")

    def stopping(self) -> None:
        self._last_status = "stopping"
        self.send("STOPPING=1", "STATUS=stopping")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")
