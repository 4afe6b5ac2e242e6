"""Test-only guard: no connection may leave loopback.

Installed in the pytest process by conftest.py and, through the
``sitecustomize`` beside this file (on PYTHONPATH), in every kv-agent process
the tests start. A blocked attempt raises ConnectionRefusedError *before* any
packet is sent, and is also recorded (in memory and in the file named by
``KV_AGENT_NETGUARD_LOG``) so that code which catches connection errors, such
as a retry loop, cannot hide it: the test fails afterwards.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from typing import Any, List

VIOLATIONS: List[str] = []
LOG_ENV = "KV_AGENT_NETGUARD_LOG"
_LOCAL_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"}
_installed = False


def _is_loopback(host: Any) -> bool:
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    host = str(host).strip("[]").split("%")[0].lower()
    if host in _LOCAL_NAMES or host.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return bool(address.is_loopback or (mapped is not None and mapped.is_loopback))


def _record(what: str) -> None:
    VIOLATIONS.append(what)
    path = os.environ.get(LOG_ENV)
    if path:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(f"{os.getpid()} {what}\n")


def _check(family: int, address: Any, what: str) -> None:
    if family not in (socket.AF_INET, socket.AF_INET6):
        return  # AF_UNIX (NOTIFY_SOCKET) and friends never leave the machine
    host = address[0] if isinstance(address, tuple) else address
    if not _is_loopback(host):
        _record(f"{what} {address!r}")
        raise ConnectionRefusedError(f"kv-agent test guard: {what} to {address!r} blocked "
                                     "(tests may only reach loopback)")


def install() -> None:
    """Patch socket connect/sendto/getaddrinfo (idempotent)."""
    global _installed
    if _installed:
        return
    _installed = True
    real_connect = socket.socket.connect
    real_connect_ex = socket.socket.connect_ex
    real_sendto = socket.socket.sendto
    real_getaddrinfo = socket.getaddrinfo

    def connect(self: socket.socket, address: Any) -> None:
        _check(self.family, address, "connect")
        return real_connect(self, address)

    def connect_ex(self: socket.socket, address: Any) -> int:
        _check(self.family, address, "connect")
        return real_connect_ex(self, address)

    def sendto(self: socket.socket, data: Any, *args: Any) -> int:
        _check(self.family, args[-1], "sendto")
        return real_sendto(self, data, *args)  # type: ignore[arg-type]

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        # A name lookup would ask a resolver off the machine.
        if host is not None and not _is_loopback(host):
            _record(f"getaddrinfo {host!r}")
            raise socket.gaierror(socket.EAI_NONAME,
                                  f"kv-agent test guard: lookup of {host!r} blocked")
        return real_getaddrinfo(host, *args, **kwargs)

    socket.socket.connect = connect  # type: ignore[method-assign]
    socket.socket.connect_ex = connect_ex  # type: ignore[method-assign]
    socket.socket.sendto = sendto  # type: ignore[method-assign,assignment]
    socket.getaddrinfo = getaddrinfo
