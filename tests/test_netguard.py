"""The test suite's own guard: nothing may leave loopback."""

import socket
import subprocess
import sys

import kv_netguard
import pytest


@pytest.mark.trips_netguard
def test_connect_outside_loopback_is_blocked_and_recorded() -> None:
    """A connect to a non-loopback address fails before any packet and is recorded."""
    with socket.socket() as sock, pytest.raises(ConnectionRefusedError, match="guard"):
        sock.connect(("192.0.2.1", 80))  # TEST-NET-1: never routed
    assert kv_netguard.VIOLATIONS


@pytest.mark.trips_netguard
def test_name_lookup_outside_loopback_is_blocked() -> None:
    """Resolving a public name is refused (it would ask a resolver off the machine)."""
    with pytest.raises(socket.gaierror):
        socket.getaddrinfo("example.com", 443)


def test_loopback_is_allowed() -> None:
    """Loopback connects are untouched."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        with socket.create_connection(server.getsockname(), timeout=2):
            pass


@pytest.mark.trips_netguard
def test_child_processes_carry_the_guard() -> None:
    """A Python child process started by a test has the guard installed too."""
    code = ("import socket\ns=socket.socket()\n"
            "try:\n s.connect(('192.0.2.1', 80))\nexcept ConnectionRefusedError as e:\n"
            " print('blocked' if 'guard' in str(e) else 'other')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=30, check=True).stdout
    assert out.strip() == "blocked"
