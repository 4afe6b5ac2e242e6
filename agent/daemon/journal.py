"""One journal entry about another unit, by journald's native protocol.

The agent logs to stderr, which systemd hands to the journal as the agent's
own lines. A refused credential must also show where its operator looks:
``journalctl -u app.service`` and ``systemctl status app.service``, whose
only line from systemd is a generic "Failed to set up credentials:
Protocol error". journald files an entry under another unit when it carries
``OBJECT_SYSTEMD_UNIT=<unit>`` and comes from uid 0 (the agent runs as root),
and the entry stays in ``journalctl -u kv-agent`` too (its ``_SYSTEMD_UNIT``).
Measured on systemd 252 and 257 (issue 19's research, section 5).

The native protocol is one datagram of ``KEY=VALUE`` lines to
``/run/systemd/journal/socket`` (systemd.journal-fields(7); the protocol:
https://systemd.io/JOURNAL_NATIVE_PROTOCOL/); a value with a line feed takes
the binary form (the key, a line feed, its length as 64-bit little endian,
the value, a line feed). No library needed, and the unit's sandbox allows it
(AF_UNIX). Best effort: without journald (a test, a container without
systemd) nothing is sent and the caller logs as usual.
"""

from __future__ import annotations

import socket
import struct
from typing import Mapping

JOURNAL_SOCKET = "/run/systemd/journal/socket"
PRIORITY_WARNING = "4"  # syslog's LOG_WARNING, as PRIORITY= spells it


def entry_bytes(fields: Mapping[str, str]) -> bytes:
    """The datagram for ``fields`` (keys: upper-case journal field names)."""
    parts = []
    for key, value in fields.items():
        data = value.encode("utf-8", "replace")
        if b"\n" in data:
            parts.append(key.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n")
        else:
            parts.append(key.encode() + b"=" + data + b"\n")
    return b"".join(parts)


def send_entry(fields: Mapping[str, str], path: str = JOURNAL_SOCKET) -> bool:
    """Send one entry to the journal at ``path``; True when it was sent.
    Never blocks (a journald too busy to take it loses it) and never raises."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.setblocking(False)
            sock.sendto(entry_bytes(fields), path)
    except OSError:
        return False
    return True
