"""A hostile HTTP(S) server on loopback, for tests of untrusted network input.

It records every request it receives (request line and headers, including
whether an ``Authorization`` header arrived) and answers each with a scripted
behaviour: a whole response at once, or a response trickled out one byte at a
time. It never answers anything it was not told to, and it stops trickling
after ``give_up_s`` so a test of old, unbounded code still ends.
"""

from __future__ import annotations

import gzip
import random
import socket
import ssl
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

from agent.emulator import generate_certificates

Behaviour = Callable[["HostileServer", socket.socket, int], None]


@dataclass(frozen=True)
class Seen:
    """One request as the server received it."""

    line: str
    headers: Dict[str, str]

    @property
    def has_authorization(self) -> bool:
        return "authorization" in self.headers


def response(status: int, body: bytes = b"", headers: Optional[Dict[str, str]] = None) -> bytes:
    """An HTTP/1.1 response with Content-Length and Connection: close."""
    lines = [f"HTTP/1.1 {status} X"]
    for key, value in {"Content-Length": str(len(body)), "Connection": "close",
                       **(headers or {})}.items():
        lines.append(f"{key}: {value}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def answer(data: bytes) -> Behaviour:
    """Send ``data`` at once."""
    def behave(server: "HostileServer", conn: socket.socket, index: int) -> None:
        conn.sendall(data)
    return behave


def trickle(data: bytes, interval_s: float, *, prefix: int = 0) -> Behaviour:
    """Send the first ``prefix`` bytes at once, then one byte every ``interval_s``."""
    def behave(server: "HostileServer", conn: socket.socket, index: int) -> None:
        conn.sendall(data[:prefix])
        stop_at = time.monotonic() + server.give_up_s
        for offset in range(prefix, len(data)):
            if server.stopping.wait(interval_s) or time.monotonic() > stop_at:
                return
            conn.sendall(data[offset:offset + 1])
    return behave


def gzip_bomb(inflated_bytes: int) -> bytes:
    """A 200 whose gzip body inflates to ``inflated_bytes`` zeros."""
    body = gzip.compress(b"0" * inflated_bytes, compresslevel=9)
    return response(200, body, {"Content-Encoding": "gzip", "Content-Type": "application/json"})


class HostileServer:
    """Serves ``behaviours[i]`` to the i-th request (the last one repeats)."""

    def __init__(self, *behaviours: Behaviour, tls: bool = True, host: str = "127.0.0.1",
                 port: int = 0, give_up_s: float = 60.0) -> None:
        self.behaviours = list(behaviours)
        self.give_up_s = give_up_s
        self.stopping = threading.Event()
        self.seen: List[Seen] = []
        self.connections = 0
        self._lock = threading.Lock()
        self._dir = tempfile.mkdtemp(prefix="kv-hostile-")
        self.ca_path = ""
        self._context: Optional[ssl.SSLContext] = None
        if tls:
            paths = generate_certificates(self._dir, hostnames=[host])
            self.ca_path = paths.ca_cert
            self._context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self._context.load_cert_chain(paths.server_cert, paths.server_key)
        self._listener = socket.create_server((host, port))
        self.host, self.port = self._listener.getsockname()[:2]
        self._listener.settimeout(0.1)
        self._thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def url(self) -> str:
        return f"https://{self.host}:{self.port}"

    @property
    def saw_authorization(self) -> bool:
        with self._lock:
            return any(seen.has_authorization for seen in self.seen)

    def __enter__(self) -> "HostileServer":
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stopping.set()
        self._thread.join(5)
        self._listener.close()

    def _serve(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, raw: socket.socket) -> None:
        try:
            raw.settimeout(10)
            conn = (self._context.wrap_socket(raw, server_side=True)
                    if self._context else raw)
            with self._lock:
                self.connections += 1
            request = self._read_request(conn)
            if request is None:
                return
            with self._lock:
                self.seen.append(request)
                index = len(self.seen) - 1
            behaviour = self.behaviours[min(index, len(self.behaviours) - 1)]
            behaviour(self, conn, index)
        except (OSError, ssl.SSLError):
            pass
        finally:
            raw.close()

    @staticmethod
    def _read_request(conn: socket.socket) -> Optional[Seen]:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(4096)
            if not chunk:
                return None
            data += chunk
        head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
        headers = {}
        for line in head[1:]:
            key, _, value = line.partition(":")
            headers[key.strip().lower()] = value.strip()
        return Seen(head[0], headers)


def loopback_443_server(*behaviours: Behaviour) -> Tuple[HostileServer, str]:
    """A TLS HostileServer on port 443 of a random 127.x.y.z address (needs
    root or CAP_NET_BIND_SERVICE; raises PermissionError otherwise). The
    default port matters: in ``https://IP\\.vault.azure.net`` urllib3 takes
    what follows the backslash as the path, so the port must be 443."""
    for _ in range(20):
        address = f"127.{random.randint(1, 254)}.{random.randint(1, 254)}.{random.randint(2, 254)}"
        try:
            return HostileServer(*behaviours, host=address, port=443), address
        except PermissionError:
            raise
        except OSError:
            continue
    raise OSError("no free loopback address for port 443")
