"""sd_notify: datagrams to NOTIFY_SOCKET when set, nothing otherwise, never fatal."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Iterator, List

import pytest

from agent.daemon.notify import Notifier, watchdog_interval_s


@pytest.fixture
def listener(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(2)
    monkeypatch.setenv("NOTIFY_SOCKET", path)  # sdnotify reads os.environ
    yield sock
    sock.close()


def received(sock: socket.socket) -> List[str]:
    messages = []
    sock.settimeout(0.2)
    try:
        while True:
            messages.append(sock.recv(4096).decode())
    except socket.timeout:
        return messages


def test_messages_reach_the_socket(listener: socket.socket) -> None:
    """READY, STATUS, RELOADING with MONOTONIC_USEC, STOPPING and WATCHDOG are sent."""
    notifier = Notifier(dict(os.environ))
    assert notifier.is_enabled
    notifier.ready("3 secrets current")
    notifier.status("3 secrets current")  # unchanged: not sent again
    notifier.status("1 of 3 secrets failing")
    notifier.reloading()
    notifier.watchdog()
    notifier.stopping()
    messages = received(listener)
    assert messages[0] == "READY=1\nSTATUS=3 secrets current"
    assert messages[1] == "STATUS=1 of 3 secrets failing"
    fields = messages[2].split("\n")
    assert fields[0] == "RELOADING=1" and fields[1].startswith("MONOTONIC_USEC=")
    assert int(fields[1].split("=")[1]) > 0
    assert messages[3:] == ["WATCHDOG=1", "STOPPING=1\nSTATUS=stopping"]


def test_abstract_socket_address(monkeypatch: pytest.MonkeyPatch) -> None:
    """An '@' address is an abstract socket, as systemd may hand out."""
    name = f"kv-agent-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(2)
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    try:
        Notifier(dict(os.environ)).ready("ok")
        assert sock.recv(4096) == b"READY=1\nSTATUS=ok"
    finally:
        sock.close()


def test_without_notify_socket_nothing_happens() -> None:
    """Without NOTIFY_SOCKET every call is a quiet no-op."""
    notifier = Notifier({})
    assert not notifier.is_enabled
    notifier.ready("x")
    notifier.stopping()


def test_vanished_socket_is_not_fatal(listener: socket.socket, tmp_path: Path) -> None:
    """A notify socket that disappears makes sends fail quietly, not crash."""
    notifier = Notifier(dict(os.environ))
    listener.close()
    os.unlink(tmp_path / "notify.sock")
    notifier.status("still running")
    notifier.watchdog()


@pytest.mark.parametrize("environ, expected", [
    ({}, None),
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "junk"}, None),
    ({"WATCHDOG_USEC": "30000000"}, 15.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "42"}, 15.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "43"}, None),
])
def test_watchdog_interval(environ: dict, expected: object) -> None:
    """Pings go at half of WATCHDOG_USEC, and only when meant for this process."""
    assert watchdog_interval_s(environ, 42) == expected
