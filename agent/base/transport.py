"""Bounded HTTP GETs: every answer is bounded in size and in total time.

A vault or IMDS answer is untrusted input, and a server can be slow on
purpose. requests' ``timeout`` bounds each socket operation only: a server
that sends one byte every few seconds (in the TLS handshake, the headers or
the body) keeps a request alive for hours, and ``kv-agent once --retry-for
10`` with it (issue 9, item 4). So every request here runs under a **total
deadline**, enforced like this:

1. While :func:`bounded_get` runs, a :class:`_Deadline` is the calling
   thread's current one, registered with the process's one
   :class:`_Watchdog`.
2. The sessions built by :func:`new_session` use connection classes that
   attach every socket they connect, or reuse, to the current deadline.
3. When the deadline passes, the watchdog ``shutdown()``\\ s those sockets.
   Whatever recv the request is blocked in (handshake, status line, headers
   or body) returns at once, and :func:`bounded_get` reports
   :class:`DeadlineExceededError`.

One watchdog thread serves every request, rather than a ``threading.Timer``
each: a thread started and stopped per request cost about 0.4 ms of CPU, a
fifth of the CPU of ``kv-agent once`` for 1,000 secrets (issue 17, item 20).
It sleeps until the earliest deadline and not at all while no request runs.

Why a timer and not per-chunk clock checks with a shrinking socket timeout:
the status line and headers are read by http.client with ``readline()``,
which we cannot interleave with checks, and the TLS handshake happens inside
urllib3; only closing the socket from outside bounds those. ``shutdown`` (not
``close``) is safe from another thread: it never frees the descriptor under
the reader's feet. Connect itself is bounded by the connect timeout.

The same shutdown ends a request early on purpose: :func:`abort` (a stop of
the agent) shuts down the sockets of every request in flight on a session,
whatever it is blocked in, and every later request on it fails at once with
:class:`AbortedError`, so ``SIGTERM`` never waits for a vault that neither
answers nor fails (issue 17, item 25). Only a thread still in DNS resolution
or in ``connect()`` (bounded by the connect timeout) cannot be reached so.

Bodies are read raw and decoded here (gzip/deflate) with ``max_length``, so a
compression bomb never inflates beyond ``max_bytes`` in memory; an oversized
body is :class:`ResponseTooLargeError`, a corrupt encoding
:class:`BadResponseError`: both mean "a bad answer", not "unreachable".

Every request is counted here, and only here, in :data:`REQUESTS`: by target
(the session's, given to :func:`new_session`: ``vault`` or the identity
source), host and status code, or ``error``/``timeout`` when no status came
(the ``kv_agent_requests_total`` metric, :mod:`agent.daemon.metrics`).
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import ssl
import threading
import time
import zlib
from typing import (
    Any,
    ContextManager,
    Dict,
    Iterator,
    List,
    Mapping,
    NamedTuple,
    Optional,
    Set,
    Tuple,
)
from urllib.parse import urlsplit

import requests
import urllib3
from requests.adapters import HTTPAdapter
from requests.structures import CaseInsensitiveDict
from requests.utils import DEFAULT_CA_BUNDLE_PATH
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from agent.base.trust import BundleContext
from agent.base.untrusted import escape

CHUNK_BYTES = 4096

# Request counts: the code of a request that got no status line.
CODE_ERROR = "error"
CODE_TIMEOUT = "timeout"
OTHER_TARGET = "other"  # a session not made by new_session (tests)
# Distinct (target, host, code) keys kept; past this, host reads "other".
# Hosts come from the manifest, so only a runaway bug could exceed it.
MAX_COUNTED_KEYS = 1000

_current = threading.local()


class ResponseTooLargeError(requests.RequestException):
    """The body (after decoding) exceeded the size bound."""


class BadResponseError(requests.RequestException):
    """The body could not be decoded (a corrupt or unsupported Content-Encoding)."""


class DeadlineExceededError(requests.Timeout):
    """No complete answer within the request's total deadline."""


class AbortedError(requests.RequestException):
    """The request was abandoned: its session was aborted (the agent is stopping)."""


class Reply(NamedTuple):
    """A complete HTTP answer: status, headers and the decoded body."""

    status: int
    headers: "CaseInsensitiveDict[str]"
    body: bytes


RequestKey = Tuple[str, str, str]  # (target, host, code)


class RequestCounts:
    """How many requests this process sent, by (target, host, code).

    Thread-safe (fetches run in a pool) and cheap: a lock and a dict update
    per request. The one piece of process-wide state in the agent, on
    purpose: it is a tally of what this process did, read by the metrics
    writer, and a tally per session would be lost at every reload (a
    Prometheus counter must only grow while the process lives).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Dict[RequestKey, int] = {}

    def add(self, target: str, host: str, code: str) -> None:
        key = (target, host, code)
        with self._lock:
            if key not in self._counts and len(self._counts) >= MAX_COUNTED_KEYS:
                key = (target, OTHER_TARGET, code)
            self._counts[key] = self._counts.get(key, 0) + 1

    def snapshot(self) -> Dict[RequestKey, int]:
        """A copy of the counts as they stand."""
        with self._lock:
            return dict(self._counts)


REQUESTS = RequestCounts()


class _CountedSession(requests.Session):
    """A session that knows what it talks to, for :data:`REQUESTS`, and the
    deadlines of its requests in flight, for :func:`abort`."""

    target = OTHER_TARGET

    def __init__(self) -> None:
        super().__init__()
        self._flight_lock = threading.Lock()
        self._in_flight: Set["_Deadline"] = set()
        self.is_aborted = False

    @contextlib.contextmanager
    def flight(self, deadline: "_Deadline") -> Iterator[None]:
        """Count ``deadline``'s request in flight while the block runs; raise
        AbortedError (nothing sent) once the session is aborted."""
        with self._flight_lock:
            if self.is_aborted:
                raise AbortedError("the agent is stopping; nothing was sent")
            self._in_flight.add(deadline)
        try:
            yield
        finally:
            with self._flight_lock:
                self._in_flight.discard(deadline)

    def abort(self) -> int:
        """End every request in flight now and refuse new ones; returns how
        many were in flight."""
        with self._flight_lock:
            self.is_aborted = True
            in_flight = list(self._in_flight)
        for deadline in in_flight:
            deadline.abort()
        return len(in_flight)


def _host(url: str) -> str:
    """``host[:port]`` of ``url``, never its userinfo; "?" when unparsable."""
    try:
        parts = urlsplit(url)
        host, port = parts.hostname or "?", parts.port
    except ValueError:
        return "?"
    return f"{host}:{port}" if port is not None else host


class _Deadline:
    """The sockets of one request, shut down when its time is up (or when
    its session is aborted)."""

    def __init__(self, seconds: float) -> None:
        self.is_expired = False
        self.is_aborted = False
        self.expires_at = time.monotonic() + max(0.0, seconds)
        self._lock = threading.Lock()
        self._sockets: List[socket.socket] = []
        self._is_over = False

    def attach(self, sock: Optional[socket.socket]) -> None:
        if sock is None:
            return
        with self._lock:
            if not self.is_expired:
                self._sockets.append(sock)
                return
        _shutdown(sock)  # connected after the deadline passed

    def expire(self) -> None:
        """Shut down every socket attached so far, and any attached later;
        nothing once the request is over (its connection may serve another)."""
        with self._lock:
            if self._is_over:
                return
            self.is_expired = True
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            _shutdown(sock)

    def abort(self) -> None:
        """End the request now: its sockets are shut down, as at the deadline."""
        self.is_aborted = True
        self.expire()

    def __enter__(self) -> "_Deadline":
        _current.deadline = self
        _WATCHDOG.watch(self)
        return self

    def __exit__(self, *exc_info: object) -> None:
        _WATCHDOG.forget(self)
        with self._lock:
            self._is_over = True
            self._sockets = []
        _current.deadline = None


class _Watchdog:
    """Expires every request's :class:`_Deadline` when its time comes, from
    one daemon thread started at the first request.

    The thread waits for the earliest deadline it watches, and without a
    timeout while it watches none (an idle agent never wakes for it); a
    deadline earlier than the one it waits for wakes it. In a child forked
    while it ran, the first request starts a new one (a fork copies only
    the forking thread, and may copy the lock held).
    """

    def __init__(self) -> None:
        self._pid = -1  # the process whose thread this is; -1: none started
        self._start_lock = threading.Lock()
        self._condition = threading.Condition()
        self._watched: Set[_Deadline] = set()
        self._wakes_at = math.inf

    def watch(self, deadline: _Deadline) -> None:
        if self._pid != os.getpid():
            with self._start_lock:
                if self._pid != os.getpid():
                    self._start()
        with self._condition:
            self._watched.add(deadline)
            if deadline.expires_at < self._wakes_at:
                self._condition.notify()

    def forget(self, deadline: _Deadline) -> None:
        """Stop watching ``deadline``; the thread finds out when it next wakes."""
        with self._condition:
            self._watched.discard(deadline)

    def _start(self) -> None:
        self._condition = threading.Condition()
        self._watched = set()
        self._wakes_at = math.inf
        threading.Thread(target=self._run, args=(self._condition, self._watched),
                         name="kv-agent-deadlines", daemon=True).start()
        self._pid = os.getpid()

    def _run(self, condition: threading.Condition, watched: Set[_Deadline]) -> None:
        while True:
            with condition:
                now = time.monotonic()
                due = [deadline for deadline in watched if deadline.expires_at <= now]
                watched.difference_update(due)
                if not due:
                    self._wakes_at = min((d.expires_at for d in watched), default=math.inf)
                    condition.wait(None if self._wakes_at == math.inf
                                   else self._wakes_at - now)
                    continue
            for deadline in due:  # outside the lock: shutdown(2) may take a moment
                deadline.expire()


_WATCHDOG = _Watchdog()


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed or never connected


def _attach(sock: Optional[socket.socket]) -> None:
    deadline: Optional[_Deadline] = getattr(_current, "deadline", None)
    if deadline is not None:
        deadline.attach(sock)


class _DeadlineHTTPConnection(HTTPConnection):
    """Attaches its socket to the thread's current deadline (new or reused)."""

    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()
        _attach(sock)
        return sock

    def request(self, *args: Any, **kwargs: Any) -> None:
        _attach(self.sock)  # a keep-alive connection, already connected
        super().request(*args, **kwargs)


class _DeadlineHTTPSConnection(HTTPSConnection):
    """As :class:`_DeadlineHTTPConnection`; attached before the TLS handshake."""

    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()
        _attach(sock)
        return sock

    def request(self, *args: Any, **kwargs: Any) -> None:
        _attach(self.sock)
        super().request(*args, **kwargs)


class _HTTPPool(HTTPConnectionPool):
    ConnectionCls = _DeadlineHTTPConnection


class _HTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _DeadlineHTTPSConnection


_POOLS: Dict[str, Any] = {"http": _HTTPPool, "https": _HTTPSPool}


class _DeadlineAdapter(HTTPAdapter):
    """requests' adapter with the deadline-aware pools (direct and via a
    proxy), whose HTTPS connections share one TLS context per CA bundle
    (:class:`agent.base.trust.BundleContext`)."""

    def __init__(self, **kwargs: Any) -> None:
        self._trust: Dict[str, BundleContext] = {}
        self._trust_lock = threading.Lock()
        super().__init__(**kwargs)

    def _shared_context(self, url: str, verify: Any, cert: Any) -> Optional[ssl.SSLContext]:
        """The shared context for a request, or None to leave it to requests
        (plain HTTP, verification off, a client certificate, or a bundle that
        cannot be loaded: requests then fails the request as it always did)."""
        if not url.lower().startswith("https:") or verify is False or cert is not None:
            return None
        path = verify if isinstance(verify, str) else DEFAULT_CA_BUNDLE_PATH
        with self._trust_lock:
            trust = self._trust.setdefault(path, BundleContext(path))
        try:
            return trust.context()
        except OSError:
            return None

    def build_connection_pool_key_attributes(
            self, request: Any, verify: Any, cert: Any = None,
    ) -> Tuple[Dict[str, Any], Dict[str, Any]]:
        host, pool = super().build_connection_pool_key_attributes(request, verify, cert)
        context = self._shared_context(str(request.url), verify, cert)
        if context is not None:  # requests' documented way to bring a context
            pool.pop("ca_certs", None)
            pool.pop("ca_cert_dir", None)
            pool["ssl_context"] = context
        return host, pool

    def cert_verify(self, conn: Any, url: str, verify: Any, cert: Any) -> None:
        super().cert_verify(conn, url, verify, cert)
        if getattr(conn, "conn_kw", {}).get("ssl_context") is not None:
            # The bundle is in the shared context: loading it again into that
            # context at every new connection would cost its parse each time.
            conn.ca_certs = conn.ca_cert_dir = None

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = dict(_POOLS)

    def proxy_manager_for(self, proxy: str, **kwargs: Any) -> Any:
        manager = super().proxy_manager_for(proxy, **kwargs)
        if not proxy.lower().startswith("socks"):  # SOCKS has pools of its own
            manager.pool_classes_by_scheme = dict(_POOLS)
        return manager


def new_session(pool_size: int, target: str = OTHER_TARGET) -> requests.Session:
    """A keep-alive session whose requests :func:`bounded_get` can bound in
    total time; urllib3's own retries are off (ours honour Retry-After and
    budgets) and ``trust_env`` is off (callers read the environment once).
    Its requests count under ``target`` (``vault``, ``imds``...) in :data:`REQUESTS`."""
    session = _CountedSession()
    session.target = target
    session.trust_env = False
    adapter = _DeadlineAdapter(pool_connections=4, pool_maxsize=pool_size, max_retries=0)
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    return session


def bounded_get(
    session: requests.Session,
    url: str,
    *,
    params: Mapping[str, str],
    headers: Mapping[str, str],
    timeout: Tuple[float, float],
    total_s: float,
    max_bytes: int,
    proxies: Optional[Mapping[str, str]] = None,
) -> Reply:
    """GET ``url`` without following redirects and return the whole answer.

    Raises requests.RequestException: :class:`DeadlineExceededError` when no
    complete answer came within ``total_s`` seconds (connect, handshake,
    headers and body together), :class:`ResponseTooLargeError` past
    ``max_bytes`` of decoded body, :class:`BadResponseError` for a body that
    cannot be decoded, and requests' own errors otherwise.

    Counted in :data:`REQUESTS` under its status code once the status line
    came (even if the body then failed), else ``timeout`` or ``error``.
    On a session of :func:`new_session` that :func:`abort` ended, raises
    :class:`AbortedError` (before sending, or at once while in flight).
    """
    started = time.monotonic()
    code = CODE_ERROR
    with _Deadline(total_s) as deadline, _in_flight(session, deadline):
        try:
            response = session.get(url, params=dict(params), headers=dict(headers),
                                   timeout=timeout, allow_redirects=False, stream=True,
                                   proxies=dict(proxies or {}))
            code = str(response.status_code)
            try:
                body = _read_body(response, max_bytes, started + total_s)
                return Reply(response.status_code, response.headers, body)
            finally:
                response.close()
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
            if deadline.is_aborted:
                raise AbortedError("abandoned: the agent is stopping") from None
            is_late = deadline.is_expired or time.monotonic() >= started + total_s
            code = _failure_code(code, exc, is_late)
            if is_late:
                raise DeadlineExceededError(
                    f"no complete answer within {total_s:g} s") from None
            if isinstance(exc, requests.RequestException):
                raise
            if isinstance(exc, urllib3.exceptions.ReadTimeoutError):
                raise requests.exceptions.ReadTimeout(str(exc)) from None
            raise requests.ConnectionError(str(exc)) from None
        finally:
            REQUESTS.add(getattr(session, "target", OTHER_TARGET), _host(url), code)


def _in_flight(session: requests.Session, deadline: _Deadline) -> ContextManager[None]:
    """The request's place among its session's requests in flight (only
    sessions of :func:`new_session` keep one: others cannot be aborted)."""
    if isinstance(session, _CountedSession):
        return session.flight(deadline)
    return contextlib.nullcontext()


def abort(session: requests.Session) -> int:
    """Abandon every request in flight on ``session`` (made by
    :func:`new_session`): their sockets are shut down, so whatever read or
    handshake they are blocked in returns at once and they raise
    AbortedError; every later request on it raises AbortedError unsent.
    Returns how many were in flight. Thread-safe; for a stop, not undone."""
    return session.abort() if isinstance(session, _CountedSession) else 0


def _failure_code(code: str, exc: BaseException, is_late: bool) -> str:
    """A failed request's code for :data:`REQUESTS`: the status when one came
    (the body failed), else ``timeout`` (a black hole) or ``error`` (refused,
    reset, TLS)."""
    if code != CODE_ERROR:
        return code
    timed_out = is_late or isinstance(exc, (requests.Timeout,
                                            urllib3.exceptions.TimeoutError))
    return CODE_TIMEOUT if timed_out else CODE_ERROR


def _read_body(response: requests.Response, max_bytes: int, deadline: float) -> bytes:
    """The decoded body, at most ``max_bytes``; the clock is checked per chunk
    too, for sessions whose sockets the deadline cannot reach."""
    decoder = _decoder(response.headers.get("Content-Encoding", ""))
    chunks: List[bytes] = []
    size = 0
    for raw in _raw_chunks(response):
        if time.monotonic() >= deadline:
            raise DeadlineExceededError("the body did not arrive in time")
        data = decoder(raw, max_bytes - size)
        size += len(data)
        if size > max_bytes:
            raise ResponseTooLargeError(f"response too large (over {max_bytes} bytes)")
        chunks.append(data)
    return b"".join(chunks)


def _raw_chunks(response: requests.Response) -> Iterator[bytes]:
    """The body as sent (still encoded), in small chunks."""
    yield from response.raw.stream(CHUNK_BYTES, decode_content=False)


def _decoder(encoding: str) -> Any:
    """A function (data, room) -> decoded bytes, at most room + 1 of them, so
    a bomb is caught after inflating one byte too many, not gigabytes."""
    name = encoding.strip().lower()
    if name in ("", "identity"):
        return lambda data, room: data
    if name not in ("gzip", "x-gzip", "deflate"):
        raise BadResponseError(f"unsupported Content-Encoding '{escape(name, 40)}'")
    # gzip: the gzip header; deflate: zlib-wrapped (what servers send).
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS if "gzip" in name else zlib.MAX_WBITS)

    def decode(data: bytes, room: int) -> bytes:
        try:
            return inflater.decompress(data, max(room, 0) + 1)
        except zlib.error:
            raise BadResponseError(f"the response's {name} encoding is corrupt") from None

    return decode


def describe_failure(exc: BaseException) -> str:
    """A short cause for an operator: 'connection refused', 'timed out'...
    (fixed words or our own messages, never the server's text)."""
    if isinstance(exc, (DeadlineExceededError, ResponseTooLargeError, BadResponseError,
                        AbortedError)):
        return str(exc)
    if isinstance(exc, requests.Timeout):
        return "timed out"
    if isinstance(exc, requests.exceptions.SSLError):
        return "TLS failed"
    text = str(exc).lower()
    for needle, words in (("refused", "connection refused"),
                          ("reset", "connection reset"),
                          ("unreachable", "network unreachable"),
                          ("name or service", "name not resolved"),
                          ("remotedisconnected", "connection closed"),
                          ("aborted", "connection closed")):
        if needle in text:
            return words
    return type(exc).__name__
