"""The credential socket: systemd's ``LoadCredential=`` served from the agent's memory.

A unit that says ``LoadCredential=db-password:/run/kv-agent/credentials.sock``
has systemd connect to this socket once per credential, from a client bound
to the abstract address ``\\0<random>/unit/<unit>/<ID>``, and read the
bytes to the end (:mod:`agent.pipeline.credentials` parses the address,
:class:`~agent.writer.credentials.CredentialStore` decides what to serve).
What systemd 252 and 257 do with each answer was measured (issue 19's
research, sections 1 and 5), and the answers follow from it:

1. A granted unit whose value is loaded: all the bytes, then close. The
   value is written at once (a socket's buffer takes some 200 KiB, a Key
   Vault secret at most 25 KiB), never waiting for a request: systemd
   shuts its side for writing right after ``connect()``.
2. Anything else from systemd's loader fails closed. Closing without data,
   or a "reset" (there is none on AF_UNIX), starts the unit with an
   *empty* credential; only more than systemd's limit for a unit's
   credentials (1 MiB) fails it, with status 243/CREDENTIALS. So a refusal
   sends one journal entry filed under the unit (:mod:`agent.daemon.journal`:
   ``journalctl -u app.service`` says why, where systemd itself says only
   "Protocol error"), then writes 1 MiB + 1 zero bytes and closes; systemd
   stops reading at its limit, so the write ending in EPIPE is expected.
3. A client that is not systemd's loader (no abstract address of that form:
   unbound, bound to a path, any other name) gets nothing: closed at once.

Each refusal and each kind of ignored client is logged once (unit, ID and
reason; never a value), and every refusal is journaled for its unit.

Bounded, in a thread of its own: the socket is served by one thread waiting
in one ``selectors`` call over the listening socket, a wake pipe and the
open connections, all non-blocking. The daemon's loop (signals, the
watchdog, refreshes, reloads) never waits on a client, and the server's
answers never wait on the loop, whose turn may include an fsync of
status.json: systemd waits for the answer without a timeout of its own.
The store is thread-safe; the server only reads it. Each connection has
CONNECTION_TIMEOUT_S to take its bytes, then it is closed; at most
MAX_CONNECTIONS are open at once. While that many are, no more are
accepted: they wait in the listening socket's queue (of MAX_CONNECTIONS
more) for a free place, at most a timeout away, instead of being closed,
which would start their unit with an empty credential.

The socket is created so it is never wider than 0600, root's (the agent's
user's): bound inside a fresh 0700 directory, made 0600 there, then renamed
into place, which also replaces a stale socket a crashed agent left (in one
step). Anything else at its path (a file, a directory, a symlink) is refused,
never followed. At close it is removed, if it is still the one this agent
made.
"""

from __future__ import annotations

import logging
import os
import selectors
import socket
import stat
import tempfile
import threading
import time
from typing import Callable, Dict, List, Mapping, Optional, Set, Tuple, Union

from agent.base.errors import KvAgentError
from agent.base.memory import make_undumpable
from agent.daemon import journal
from agent.manifest import Manifest
from agent.pipeline.credentials import SOCKET_NAME, SUN_PATH_MAX, Grant, parse_peer
from agent.sync.credentials import declare, served
from agent.writer.credentials import (
    AMBIGUOUS,
    NOT_GRANTED,
    NOT_LOADED,
    UNKNOWN_ID,
    Answer,
    CredentialStore,
)

log = logging.getLogger(__name__)

SOCKET_MODE = 0o600  # systemd's loader connects as root
CONNECTION_TIMEOUT_S = 2.0  # systemd reads at once: this is for clients that do not
MAX_CONNECTIONS = 16
# systemd refuses a unit's credentials over 1 MiB in all (CREDENTIALS_TOTAL_SIZE_MAX;
# 1 MiB - 4096 bytes was the largest accepted): one byte more fails the unit.
REFUSAL_BYTES = 1024 * 1024 + 1
CHUNK_BYTES = 64 * 1024

# What a connection's results are counted as (the metrics).
SERVED = "served"
REFUSED = "refused"
IGNORED = "ignored"  # not systemd's loader
RESULTS = (SERVED, REFUSED, IGNORED)

# What to do about each refusal (the store's reasons), for the unit's journal.
HINTS = {
    UNKNOWN_ID: "add it to kv-agent's manifest, or fix the unit's LoadCredential= ID",
    NOT_GRANTED: "list the unit in the credential's units: in kv-agent's manifest",
    AMBIGUOUS: "kv-agent check refuses such a manifest; check it",
    NOT_LOADED: "order the unit After=kv-agent.service; see kv-agent status",
}

Lookup = Callable[[str, str], Answer]


def peer_kind(address: Union[bytes, str, None]) -> str:
    """What a client that is not systemd's loader was, for the log (never its
    address, which may hold anything)."""
    if not address:
        return "an unbound client"
    if isinstance(address, str):
        return "a client bound to a path"
    if address[:1] == b"\0":
        return "a client with an abstract address not in systemd's form"
    return "a client with an unreadable address"


class _Reply:
    """One accepted connection and the bytes it is owed: a value, or the
    refusal's zeros (``value`` None)."""

    def __init__(self, sock: socket.socket, deadline: float, name: str,
                 value: Optional[bytes]) -> None:
        self.sock = sock
        self.deadline = deadline
        self.name = name  # "<ID> for <unit>", for the log
        self.value = memoryview(value) if value is not None else None
        self.remaining = len(value) if value is not None else REFUSAL_BYTES
        self.is_registered = False

    def chunk(self, zeros: bytes) -> memoryview:
        """The next bytes to send."""
        if self.value is not None:
            return self.value[len(self.value) - self.remaining:]
        return memoryview(zeros)[:self.remaining]


class CredentialSocket:
    """Serves ``lookup`` (the store's) on an AF_UNIX stream socket at ``path``
    while open. :meth:`open` and :meth:`close` belong to the daemon's main
    thread; the connections are served in the socket's own thread."""

    def __init__(self, path: str, lookup: Lookup, *, journal_path: Optional[str] = None,
                 timeout_s: float = CONNECTION_TIMEOUT_S,
                 max_connections: int = MAX_CONNECTIONS,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self._lookup = lookup
        self._journal_path = journal_path  # None: journald's (journal.JOURNAL_SOCKET)
        self._timeout_s = timeout_s
        self._max = max_connections
        self._now = monotonic
        self._listener: Optional[socket.socket] = None
        self._identity: Optional[Tuple[int, int]] = None  # (st_dev, st_ino) of ours
        self._thread: Optional[threading.Thread] = None
        self._stopping = threading.Event()
        self._wake_r = self._wake_w = -1
        self._counts = dict.fromkeys(RESULTS, 0)
        self._logged: Set[Tuple[str, ...]] = set()  # refusals and kinds, logged once
        self._zeros = b""

    @property
    def is_open(self) -> bool:
        return self._listener is not None

    def counts(self) -> Dict[str, int]:
        """Connections since start by result: served, refused, ignored."""
        return dict(self._counts)

    # -- the main thread's -----------------------------------------------------------------

    def open(self) -> None:
        """Create the socket (see the module: never wider than 0600; a stale
        socket replaced, anything else refused) and start serving. Raises
        KvAgentError when it cannot be made."""
        if self._listener is not None:
            return
        self._listener, self._identity = _listen(self.path, self._max)
        self._stopping.clear()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._thread = threading.Thread(target=self._serve, args=(self._listener,),
                                        name="credentials", daemon=True)
        self._thread.start()
        log.info("serving credentials on %s", self.path)

    def close(self) -> None:
        """Stop serving: the thread ends at once (open connections are closed
        as they stand), and the socket file goes if it is still ours."""
        listener, thread = self._listener, self._thread
        if listener is None:
            return
        self._stopping.set()
        try:
            os.write(self._wake_w, b"\0")
        except OSError:
            pass
        if thread is not None:
            thread.join(self._timeout_s)  # it wakes at once: its sends never block
        self._listener = self._thread = None
        listener.close()
        if thread is None or not thread.is_alive():
            # (A thread still alive keeps its pipe: closed, the numbers could be
            # another file's by the time it reads them.)
            for fd in (self._wake_r, self._wake_w):
                os.close(fd)
        self._wake_r = self._wake_w = -1
        self._remove_ours()

    def _remove_ours(self) -> None:
        """Unlink the socket file, only if it is the very one :meth:`open`
        made (another agent's, made since, stays)."""
        try:
            st = os.lstat(self.path)
            if stat.S_ISSOCK(st.st_mode) and (st.st_dev, st.st_ino) == self._identity:
                os.unlink(self.path)
        except OSError as exc:
            log.warning("cannot remove %s: %s", self.path, exc.strerror)
        self._identity = None

    # -- the socket's thread ---------------------------------------------------------------

    def _serve(self, listener: socket.socket) -> None:
        """The thread: accept while there is room, answer, expire, until stopped."""
        replies: List[_Reply] = []
        selector = selectors.DefaultSelector()
        selector.register(self._wake_r, selectors.EVENT_READ, None)
        is_listening = False
        try:
            while not self._stopping.is_set():
                has_room = len(replies) < self._max
                if has_room != is_listening:
                    if has_room:
                        selector.register(listener, selectors.EVENT_READ, listener)
                    else:
                        selector.unregister(listener)
                        self._log_once(("busy",), logging.WARNING,
                                       "credential socket: %d connections open, the next "
                                       "wait for one to end (logged once)", self._max)
                    is_listening = has_room
                deadlines = [reply.deadline for reply in replies]
                timeout = max(0.0, min(deadlines) - self._now()) if deadlines else None
                for key, _ in selector.select(timeout):
                    if key.data is None:
                        _drain(self._wake_r)
                    elif key.data is listener:
                        self._accept(listener, selector, replies)
                    elif self._send(key.data):
                        self._finish(key.data, selector, replies)
                self._expire(selector, replies)
        except Exception:  # a bug: the files and the loop go on
            log.exception("credential socket: serving failed unexpectedly; no more "
                          "credentials are served until kv-agent restarts")
            # Closed, not left unanswered: a unit's connect() then fails at
            # once (243/CREDENTIALS) instead of waiting in the queue forever.
            listener.close()
        finally:
            for reply in replies:
                reply.sock.close()
            selector.close()

    def _accept(self, listener: socket.socket, selector: selectors.BaseSelector,
                replies: List[_Reply]) -> None:
        """Take the waiting connections (while there is room) and answer each."""
        while len(replies) < self._max:
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # ECONNABORTED, EMFILE: try again at the next event
                log.debug("credential socket: accept failed: %s", exc)
                return
            sock.setblocking(False)
            reply = self._answer(sock)
            if reply is None:
                continue
            if self._send(reply):
                sock.close()
                continue
            selector.register(sock, selectors.EVENT_WRITE, reply)
            reply.is_registered = True
            replies.append(reply)

    def _answer(self, sock: socket.socket) -> Optional[_Reply]:
        """What this client is owed (module docstring, 1. to 3.); None: nothing
        (it is closed already)."""
        try:
            address = sock.getpeername()
        except OSError:
            address = None
        peer = parse_peer(address)
        if peer is None:
            self._counts[IGNORED] += 1
            kind = peer_kind(address)
            self._log_once(("ignored", kind), logging.WARNING,
                           "credential socket: %s connected; it is not systemd's "
                           "credential loader and got nothing (logged once)", kind)
            sock.close()
            return None
        unit, credential_id = peer
        name = f"{credential_id} for {unit}"
        deadline = self._now() + self._timeout_s
        answer = self._lookup(unit, credential_id)
        if answer.value is not None:
            self._counts[SERVED] += 1
            self._log_once(("served", unit, credential_id), logging.INFO,
                           "credential %s served to %s", credential_id, unit)
            return _Reply(sock, deadline, name, answer.value)
        self._counts[REFUSED] += 1
        self._refused(unit, credential_id, answer.refusal or NOT_GRANTED)
        if not self._zeros:
            self._zeros = bytes(CHUNK_BYTES)
        return _Reply(sock, deadline, name, None)

    def _refused(self, unit: str, credential_id: str, reason: str) -> None:
        """Say why, in the unit's journal every time (its failure shows it)
        and in the agent's log once per unit, ID and reason."""
        hint = HINTS.get(reason, "")
        text = (f"kv-agent refused credential {credential_id} to {unit}: {reason}"
                + (f" ({hint})" if hint else "") + "; the unit fails to start")
        journal.send_entry({"MESSAGE": text, "PRIORITY": journal.PRIORITY_WARNING,
                            "OBJECT_SYSTEMD_UNIT": unit, "SYSLOG_IDENTIFIER": "kv-agent"},
                           self._journal_path or journal.JOURNAL_SOCKET)
        self._log_once(("refused", unit, credential_id, reason), logging.WARNING,
                       "credential %s refused to %s: %s (logged once per unit and "
                       "credential)", credential_id, unit, reason)

    def _send(self, reply: _Reply) -> bool:
        """Send what the socket takes now; True when the reply is done (all
        sent, or the client gone)."""
        try:
            while reply.remaining:
                reply.remaining -= reply.sock.send(reply.chunk(self._zeros),
                                                   socket.MSG_NOSIGNAL)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:
            # A refusal's EPIPE is systemd at its limit; a value's, a client gone.
            if reply.value is not None:
                log.debug("credential %s: the client left before its bytes (%s)",
                          reply.name, exc.strerror)
        return True

    def _finish(self, reply: _Reply, selector: selectors.BaseSelector,
                replies: List[_Reply]) -> None:
        if reply.is_registered:
            selector.unregister(reply.sock)
        reply.sock.close()
        replies.remove(reply)

    def _expire(self, selector: selectors.BaseSelector, replies: List[_Reply]) -> None:
        """Close the connections whose time is up (a client that stopped reading)."""
        now = self._now()
        for reply in [reply for reply in replies if now >= reply.deadline]:
            log.warning("credential %s: the client took nothing for %g s; closed with "
                        "%d bytes unsent", reply.name, self._timeout_s, reply.remaining)
            self._finish(reply, selector, replies)

    def _log_once(self, key: Tuple[str, ...], level: int, message: str,
                  *args: object) -> None:
        if key not in self._logged:
            self._logged.add(key)
            log.log(level, message, *args)


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


def _listen(path: str, backlog: int) -> Tuple[socket.socket, Tuple[int, int]]:
    """A listening socket at ``path``, root's (the process's) and 0600 from
    its first moment, and its file's identity. Steps:

    1. Refuse a path too long for a socket address, and anything at ``path``
       that is not a socket (lstat: a symlink is refused, never followed).
    2. Bind in a fresh directory of the same file system, 0700 (mkdtemp), so
       nobody else can reach the socket while it has bind()'s mode (0777 less
       the umask; fchmod on a socket's descriptor does not change its file).
    3. chmod it to SOCKET_MODE there; listen.
    4. Rename it to ``path``: atomic, replacing a stale socket in one step.
    5. Remove the directory (and the socket, if a step failed).
    """
    if len(os.fsencode(path)) >= SUN_PATH_MAX:  # (1)
        raise KvAgentError(f"cannot serve credentials: {path} is longer than a socket "
                           f"address allows ({SUN_PATH_MAX - 1} bytes)",
                           "use a shorter --state-dir")
    try:
        existing: Optional[os.stat_result] = os.lstat(path)
    except FileNotFoundError:
        existing = None
    except OSError as exc:
        raise _cannot(path, exc) from None
    if existing is not None and not stat.S_ISSOCK(existing.st_mode):
        raise KvAgentError(f"cannot serve credentials: {path} exists and is not a socket",
                           "remove it; kv-agent creates the socket itself")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC
                         | socket.SOCK_NONBLOCK)
    directory = temp = ""
    try:
        directory = tempfile.mkdtemp(prefix=".cs-", dir=os.path.dirname(path))  # (2)
        temp = os.path.join(directory, "s")
        sock.bind(temp)
        os.chmod(temp, SOCKET_MODE)  # (3)
        sock.listen(backlog)
        os.rename(temp, path)  # (4)
        temp = ""
        st = os.lstat(path)
    except OSError as exc:
        sock.close()
        raise _cannot(path, exc) from None
    finally:
        if temp:  # (5)
            _unlink_quietly(temp)
        if directory:
            try:
                os.rmdir(directory)
            except OSError:
                pass
    if existing is not None:
        log.info("replaced the stale socket %s (a previous run's)", path)
    return sock, (st.st_dev, st.st_ino)


def _cannot(path: str, exc: OSError) -> KvAgentError:
    return KvAgentError(f"cannot serve credentials on {path}: {exc.strerror or exc}",
                        "check the state directory (--state-dir), and run as root")


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


class Credentials:
    """The daemon's credentials: the store every refresh loads (memory only)
    and the socket that serves it while the manifest in use has any.
    Main thread only (the store and the socket's thread are their own)."""

    def __init__(self, state_dir: str, *, journal_path: Optional[str] = None) -> None:
        self.store: CredentialStore[Grant] = CredentialStore()
        self._socket = CredentialSocket(os.path.join(state_dir, SOCKET_NAME),
                                        self.store.lookup, journal_path=journal_path)
        self._is_started = False
        self._is_undumpable = False
        self._has_served = False  # a manifest in use had credentials (for the metrics)

    @property
    def is_serving(self) -> bool:
        return self._socket.is_open

    def install(self, manifest: Manifest) -> None:
        """``manifest`` is accepted: serve its credentials from now on
        (:func:`agent.sync.credentials.declare`), and open the socket when it
        has any (the process made undumpable first), or close it when it has
        none. At start a socket that cannot be made raises KvAgentError; at a
        reload it is logged, and the files are served as before."""
        declare(self.store, manifest)
        has_credentials = served(manifest).credentials > 0
        self._has_served = self._has_served or has_credentials
        try:
            if has_credentials and not self._socket.is_open:
                if not self._is_undumpable:
                    self._is_undumpable = make_undumpable()
                self._socket.open()
            elif not has_credentials and self._socket.is_open:
                self._socket.close()
                log.info("no credential in the manifest: %s removed", self._socket.path)
        except KvAgentError as exc:
            if not self._is_started:
                raise
            log.error("%s; the units that load credentials fail to start until a reload "
                      "can serve them", exc)
        finally:
            self._is_started = True

    def stop(self) -> None:
        """At stop: the socket goes, and nothing is served any more."""
        self._socket.close()
        self.store.declare({})

    def counts(self) -> Optional[Mapping[str, int]]:
        """Connections by result, for the metrics; None while no manifest
        has served credentials (their families are then left out)."""
        return self._socket.counts() if self._has_served else None
