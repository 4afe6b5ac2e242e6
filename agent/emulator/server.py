"""HTTP plumbing: a loopback HTTP(S) server that turns requests into :class:`Request` values.

Server design, each point learnt from a benchmark stall: a thread per
connection with HTTP/1.1 keep-alive; a listen backlog of 128 (socketserver's 5
drops SYNs when 16 clients connect at once, costing a 1 s SYN retransmit);
``TCP_NODELAY`` (headers and body are two writes, and Nagle plus delayed ACK
turns that into a 40 ms stall); and the TLS handshake is done in the
connection's own thread, not in the accept loop, so one slow handshake never
serialises the others. The server knows nothing of IMDS or Key Vault: it calls
the ``dispatch`` it is given.
"""

from __future__ import annotations

import contextlib
import http
import http.server
import logging
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, Optional
from urllib.parse import urlsplit

from agent.emulator.wire import (
    HANDSHAKE_TIMEOUT_S,
    IDLE_TIMEOUT_S,
    MAX_DISCARDED_BODY_BYTES,
    MAX_REQUEST_BODY_BYTES,
    REQUEST_QUEUE_SIZE,
    Request,
)

logger = logging.getLogger(__name__)


# (status, headers, body), or None to drop the connection without answering.
Answer = Optional[tuple[int, list[tuple[str, str]], bytes]]
Dispatch = Callable[[Request], Answer]


class _Handler(http.server.BaseHTTPRequestHandler):
    """Turns HTTP into :class:`Request` and writes what the dispatcher answers."""

    # Keep-alive: clients reuse connections as they do against Azure.
    protocol_version = "HTTP/1.1"
    timeout = IDLE_TIMEOUT_S
    server: LoopbackServer

    def _serve(self) -> None:
        body = self._read_body()
        split = urlsplit(self.path)
        request = Request(
            method=self.command,
            path=split.path,
            query=split.query,
            headers={name.lower(): value for name, value in self.headers.items()},
            client_ip=str(self.client_address[0]),
            body=body,
        )
        answer = self.server.dispatch(request)
        if answer is None:  # injected drop: close without a byte of response
            self.close_connection = True
            return
        status, headers, body = answer
        self.send_response_only(status)
        self.send_header("Date", self.date_time_string(self.server.clock()))
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _read_body(self) -> bytes | None:
        """The request body, or None when it is chunked, malformed or over the cap.

        Whatever is not read makes the connection close after the answer, or its
        bytes would be parsed as the next request on this keep-alive connection.
        """
        length = self.headers.get("Content-Length", "0")
        if "Transfer-Encoding" in self.headers or not length.isdigit():
            self.close_connection = True
            return None
        size = int(length)
        if size > MAX_REQUEST_BODY_BYTES:
            self.close_connection = True
            if size <= MAX_DISCARDED_BODY_BYTES:
                while size > 0:
                    chunk = self.rfile.read(min(size, 65536))
                    if not chunk:
                        break
                    size -= len(chunk)
            return None
        return self.rfile.read(size) if size > 0 else b""

    do_GET = _serve
    do_HEAD = _serve
    do_POST = _serve
    do_PUT = _serve
    do_PATCH = _serve
    do_DELETE = _serve
    do_OPTIONS = _serve

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s %s", self.address_string(), format % args)


class LoopbackServer(http.server.ThreadingHTTPServer):
    """A thread-per-connection HTTP(S) server tuned for bursts of keep-alive clients."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = REQUEST_QUEUE_SIZE  # socketserver's 5 loses SYNs under a burst

    def __init__(
        self,
        address: tuple[str, int],
        dispatch: Dispatch,
        ssl_context: ssl.SSLContext | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.dispatch = dispatch
        self.ssl_context = ssl_context
        self.clock = clock  # the Date header's: the emulator's clock, not the host's
        self._connections: dict[threading.Thread, socket.socket] = {}
        self._connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls getfqdn(), a reverse DNS lookup; skip it.
        socketserver_bind = super(http.server.HTTPServer, self).server_bind
        socketserver_bind()
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, address = self.socket.accept()
        # Headers and body go out as two writes; without this, Nagle + delayed ACK = 40 ms.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock, address

    def finish_request(
        self,
        request: socket.socket | tuple[bytes, socket.socket],
        client_address: object,
    ) -> None:
        # Runs in the connection's own thread: the TLS handshake happens here, not in
        # the accept loop, so a slow or failed handshake holds up nobody else.
        assert isinstance(request, socket.socket)  # TCP, never a datagram tuple
        connection = request
        if self.ssl_context is not None:
            request.settimeout(HANDSHAKE_TIMEOUT_S)
            connection = self.ssl_context.wrap_socket(request, server_side=True)
        current = threading.current_thread()
        with self._connections_lock:
            self._connections[current] = connection
        try:
            _Handler(connection, client_address, self)
        finally:
            with self._connections_lock:
                self._connections.pop(current, None)
            if connection is not request:
                _close_quietly(connection)

    def handle_error(
        self,
        request: socket.socket | tuple[bytes, socket.socket],
        client_address: object,
    ) -> None:
        # Failed handshakes, resets and dropped clients are normal in fault tests:
        # no traceback on stderr, and the server keeps serving.
        logger.debug(
            "connection from %s ended with an error",
            client_address,
            exc_info=sys.exc_info(),
        )

    def close_connections(self) -> list[threading.Thread]:
        """Cut every open keep-alive connection; returns the threads serving them."""
        with self._connections_lock:
            connections = dict(self._connections)
        for connection in connections.values():
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        return list(connections)


def _close_quietly(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.close()
