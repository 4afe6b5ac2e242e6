"""A harness for running the real ``kv-agent run`` process under test.

:class:`NotifySocket` plays systemd's side of sd_notify(3): a bound AF_UNIX
datagram socket whose messages are collected, with their arrival time, by a
background thread. :class:`AgentProcess` is one ``python -m agent run``
process whose stderr is collected line by line. :func:`wait_for` polls a
predicate until it holds. :class:`LateListener` is a loopback port that
refuses connections until it is opened. Nothing here sleeps for a fixed time
to let something happen: every wait is a poll with a deadline.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, TypeVar

T = TypeVar("T")

POLL_S = 0.05
STOP_KILL_AFTER_S = 15.0  # a process still alive this long after SIGTERM is killed

# The identity source of every agent under test is the emulator's IMDS,
# whatever the machine: `identity.source: auto` would pick Azure Arc on a host
# with the Arc agent installed (/var/opt/azcmagent) or its variables set, and
# the suite's result would depend on the machine (issue 17, item 22). The
# variables are dropped from the environment a test passes on from its own
# (without_host_identity); the Arc agent's files are hidden by this code, run
# before the agent's main in every AgentProcess.
HOST_IDENTITY_VARIABLES = ("IDENTITY_ENDPOINT", "IDENTITY_HEADER", "IMDS_ENDPOINT",
                           "MSI_ENDPOINT", "MSI_SECRET")
PIN_IDENTITY_SOURCE = (
    "import agent.identity.tokens\n"
    "agent.identity.tokens.ARC_AGENT_PATHS = ()\n"
)
# Modules only a manifest that uses the feature may load (with cryptography):
# certificate entries and select: entries (issue 17, item 21).
FEATURE_MODULES = ("agent.pipeline.certificates", "agent.sync.selection")

# A prelude that prints, as the process exits, every module it loaded:
# a line "loaded: NAME NAME ..." on stdout (see loaded_modules).
REPORT_MODULES = (
    "import atexit, sys\n"
    "atexit.register(lambda: print('loaded: ' + ' '.join(sorted(sys.modules)), flush=True))\n"
)
AGENT_MAIN = (
    "import sys\n"
    "from agent.cli import main\n"
    "sys.exit(main())\n"
)

# `python -c` code that runs the kv-agent command line with the daemon's
# retry schedule shortened to about a second, so a test sees a whole refresh
# fail (and the next one start) within seconds instead of 30 s.
FAST_RETRY_MAIN = (
    "import sys\n"
    "import agent.daemon.lifecycle as lifecycle\n"
    "import agent.base.retry as retry\n"
    "retry.REFRESH_RETRY = retry.REFRESH_RETRY._replace(deadline_s=1.0, base_delay_s=0.1,"
    " max_delay_s=0.3)\n"
    "lifecycle.START_RETRY_S = (0.3, 0.6)\n"
    "from agent.cli import main\n"
    "sys.exit(main())\n"
)


def without_host_identity(environ: Mapping[str, str]) -> Dict[str, str]:
    """``environ`` without the variables that would make the agent choose an
    identity source other than IMDS (see PIN_IDENTITY_SOURCE)."""
    return {key: value for key, value in environ.items()
            if key not in HOST_IDENTITY_VARIABLES}


def loaded_modules(stdout: str) -> List[str]:
    """The modules a process run with the REPORT_MODULES prelude loaded."""
    lines = [line for line in stdout.splitlines() if line.startswith("loaded: ")]
    assert lines, f"no module report in the output: {stdout[-500:]!r}"
    return lines[-1].split()[1:]


def wait_for(predicate: Callable[[], Optional[T]], timeout_s: float, what: str,
             describe: Callable[[], str] = lambda: "") -> T:
    """Poll ``predicate`` every POLL_S until it returns something truthy, and
    return that; raise AssertionError naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            detail = describe()
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}"
                                 + (f"\n{detail}" if detail else ""))
        time.sleep(POLL_S)


@dataclass(frozen=True)
class Datagram:
    """One sd_notify message: its arrival (time.monotonic) and KEY=value fields."""

    at: float
    fields: Dict[str, str]
    raw: str

    def has(self, key: str, value: Optional[str] = None) -> bool:
        return key in self.fields and (value is None or self.fields[key] == value)


class NotifySocket:
    """A bound NOTIFY_SOCKET that records every datagram it receives.

    ``on_datagram`` callbacks run in the receiving thread the moment a
    message arrives, so a test can inspect the world exactly when, say,
    READY=1 was sent (the agent has already done whatever preceded it).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(path)
        self._sock.settimeout(0.1)
        self._lock = threading.Lock()
        self._messages: List[Datagram] = []
        self._callbacks: List[Callable[[Datagram], None]] = []
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._receive, name="notify", daemon=True)
        self._thread.start()

    def on_datagram(self, callback: Callable[[Datagram], None]) -> None:
        with self._lock:
            self._callbacks.append(callback)

    def _receive(self) -> None:
        while not self._closed.is_set():
            try:
                data = self._sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                return
            raw = data.decode("utf-8", "replace")
            fields: Dict[str, str] = {}
            for line in raw.split("\n"):
                key, _, value = line.partition("=")
                if key:
                    fields[key] = value
            message = Datagram(time.monotonic(), fields, raw)
            with self._lock:
                callbacks = list(self._callbacks)
            for callback in callbacks:
                callback(message)
            with self._lock:
                self._messages.append(message)

    @property
    def messages(self) -> List[Datagram]:
        with self._lock:
            return list(self._messages)

    def with_key(self, key: str, value: Optional[str] = None) -> List[Datagram]:
        return [m for m in self.messages if m.has(key, value)]

    def statuses(self) -> List[str]:
        return [m.fields["STATUS"] for m in self.messages if "STATUS" in m.fields]

    def last_status(self) -> str:
        statuses = self.statuses()
        return statuses[-1] if statuses else ""

    def describe(self) -> str:
        return "notify messages:\n" + "\n".join(
            f"  {m.at:.3f} {m.raw!r}" for m in self.messages[-30:])

    def close(self) -> None:
        self._closed.set()
        self._thread.join(2.0)
        self._sock.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


class AgentProcess:
    """One running ``kv-agent`` process with its stderr collected."""

    def __init__(self, args: Sequence[str], env: Mapping[str, str],
                 main: Optional[str] = None, prelude: str = "") -> None:
        """``main``: Python code to run instead of the command line (e.g.
        FAST_RETRY_MAIN), after PIN_IDENTITY_SOURCE; ``prelude``: code run
        before both, standing for the machine (the test of the pin itself) or
        watching the process (REPORT_MODULES)."""
        code = prelude + PIN_IDENTITY_SOURCE + (AGENT_MAIN if main is None else main)
        self.argv = [sys.executable, "-c", code, *args]
        self.started = time.monotonic()
        self.proc = subprocess.Popen(self.argv, env=dict(env), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     cwd=str(Path(__file__).resolve().parent.parent))
        self._lock = threading.Lock()
        self._stderr: List[str] = []
        self._stdout: List[str] = []
        self._readers = [
            threading.Thread(target=self._read, args=(self.proc.stderr, self._stderr),
                             daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stdout, self._stdout),
                             daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _read(self, stream: Optional[IO[bytes]], sink: List[str]) -> None:
        assert stream is not None
        for line in iter(stream.readline, b""):
            with self._lock:
                sink.append(line.decode("utf-8", "replace"))

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def stderr(self) -> str:
        with self._lock:
            return "".join(self._stderr)

    @property
    def stdout(self) -> str:
        with self._lock:
            return "".join(self._stdout)

    def lines(self, fragment: str) -> List[str]:
        """stderr lines containing ``fragment``."""
        return [line for line in self.stderr.splitlines() if fragment in line]

    def is_running(self) -> bool:
        return self.proc.poll() is None

    def send_signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def wait(self, timeout_s: float) -> int:
        """The exit code, after the output readers drained; raises on timeout."""
        code = self.proc.wait(timeout_s)
        for reader in self._readers:
            reader.join(5.0)
        return code

    def stop(self, signum: int = signal.SIGTERM,
             timeout_s: float = STOP_KILL_AFTER_S) -> Tuple[int, float]:
        """Send ``signum``, then wait: (exit code, seconds from the signal to the exit)."""
        sent = time.monotonic()
        if self.is_running():
            self.proc.send_signal(signum)
        code = self.wait(timeout_s)
        return code, time.monotonic() - sent

    def kill(self) -> None:
        """Last resort in a finalizer: SIGKILL this process (by its pid) and reap it."""
        if self.is_running():
            self.proc.kill()
        try:
            self.wait(10.0)
        except subprocess.TimeoutExpired:
            pass
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()



class LateListener:
    """A loopback TCP port that refuses connections (it is bound but not
    listening, so the kernel answers a SYN with RST) until :meth:`open`, after
    which every connection is forwarded to ``target``: a service that is down,
    then comes up on the same address."""

    def __init__(self, target: Tuple[str, int]) -> None:
        self._target = target
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self.port = int(self._sock.getsockname()[1])
        self._closed = threading.Event()
        self._threads: List[threading.Thread] = []
        self._sockets: List[socket.socket] = []

    def open(self) -> None:
        """Start accepting (and forwarding) connections."""
        self._sock.listen(16)
        self._sock.settimeout(0.1)
        self._spawn(self._accept)

    def _spawn(self, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            client.settimeout(None)
            try:
                upstream = socket.create_connection(self._target, timeout=5.0)
            except OSError:
                client.close()
                continue
            self._sockets += [client, upstream]
            self._spawn(self._pump, client, upstream)
            self._spawn(self._pump, upstream, client)

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock, how in ((sink, socket.SHUT_WR), (source, socket.SHUT_RD)):
                try:
                    sock.shutdown(how)
                except OSError:
                    pass

    def close(self) -> None:
        self._closed.set()
        self._sock.close()
        for sock in self._sockets:
            sock.close()
