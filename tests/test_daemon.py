"""``kv-agent run``, the real process, against the loopback emulator.

Every test starts ``python -m agent run`` as systemd would, with
``NOTIFY_SOCKET`` bound by the test (see :mod:`tests.daemon_harness`),
``KV_AGENT_IMDS_ENDPOINT`` and ``REQUESTS_CA_BUNDLE`` pointing at an
in-process :class:`~agent.emulator.Emulator`, a 1 s refresh without jitter
and an output directory on /dev/shm. Every process is stopped with SIGTERM
and must exit 0; its stderr is checked for every secret value the test
created and every token the vault saw.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import (
    Any,
    Callable,
    Dict,
    Iterator,
    List,
    Mapping,
    Optional,
    Sequence,
    Set,
    Tuple,
)

import pytest
import secrecy
import yaml
from daemon_harness import (
    FAST_RETRY_MAIN,
    FEATURE_MODULES,
    REPORT_MODULES,
    AgentProcess,
    Datagram,
    LateListener,
    NotifySocket,
    loaded_modules,
    wait_for,
    without_host_identity,
)
from racing_reader import racing_reader
from secrecy import fresh_value

from agent.daemon.notify import Notifier
from agent.daemon.service import Daemon
from agent.emulator import Emulator

pytestmark = pytest.mark.integration

WAIT_S = 20.0  # generous: a loaded 2-core machine may be slow to start Python
PROMPT_EXIT_S = 3.0  # the "exit 0 within a few seconds"


# ---------------------------------------------------------------------------
# Helpers


class Vault:
    """The emulator plus every value a test stored in it (for the leak check)."""

    def __init__(self, emulator: Emulator) -> None:
        self.emulator = emulator
        self.values: Set[str] = set()

    @property
    def url(self) -> str:
        return str(self.emulator.vault_url)

    def put(self, name: str, *, enabled: bool = True) -> str:
        """Store a new version of ``name`` with a fresh value; returns the value."""
        value = fresh_value(name)
        self.values.add(value)
        self.emulator.set_secret(name, value, enabled=enabled)
        return value

    def tokens(self) -> Set[str]:
        """Every bearer token the vault was sent."""
        found = set()
        for record in self.emulator.vault_log:
            header = record.headers.get("Authorization") or record.headers.get("authorization")
            if header and header.lower().startswith("bearer "):
                found.add(header[7:].strip())
        return found

    def requests_for(self, name: str) -> int:
        return sum(1 for r in self.emulator.vault_log if f"/secrets/{name}" in r.path)


def manifest_text(vault: str, directory: Path, entries: Sequence[Mapping[str, Any]],
                  refresh: str = "1s", jitter: str = "0%", **extra: Any) -> str:
    document: Dict[str, Any] = {"vault": vault, "directory": str(directory),
                                "refresh": refresh, "refresh_jitter": jitter, **extra,
                                "secrets": [dict(entry) for entry in entries]}
    return yaml.safe_dump(document, sort_keys=False)


def entry(name: str, **keys: Any) -> Dict[str, Any]:
    """A manifest entry writing ``name`` to ``<directory>/<name>``, mode 0440."""
    return {"name": name, "path": keys.pop("path", name), "mode": keys.pop("mode", "0440"),
            **keys}


def write_file(path: Path, text: str, mode: int = 0o600) -> None:
    """Write in place (open, truncate, write, close)."""
    with open(path, "w") as handle:
        handle.write(text)
    os.chmod(path, mode)


def replace_file(path: Path, text: str) -> None:
    """Write the way editors do: a new file renamed over the old one."""
    temp = path.with_name(f".{path.name}.swp")
    write_file(temp, text)
    os.replace(temp, path)


def read(path: Path) -> Optional[str]:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


@dataclass
class Running:
    """A started agent: its process, notify socket and the paths it uses."""

    process: AgentProcess
    notify: Optional[NotifySocket]
    manifest: Path
    directory: Path
    state_dir: Path
    vault: Vault
    env: Dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        notes = self.notify.describe() if self.notify else "(no notify socket)"
        return f"{notes}\nstderr:\n{self.process.stderr[-4000:]}"

    def wait(self, predicate: Callable[[], Any], what: str, timeout_s: float = WAIT_S) -> Any:
        """Poll ``predicate``; fail at once (not after ``timeout_s``) when the agent
        exits without it coming true, so a dying agent costs no waiting."""

        def holds_or_exited() -> Any:
            result = predicate()
            if result or self.process.is_running():
                return result
            result = predicate()  # it may have come true as the agent stopped
            if not result:
                raise AssertionError(f"the agent exited while waiting for {what}\n"
                                     + self.describe())
            return result

        return wait_for(holds_or_exited, timeout_s, what, self.describe)

    @property
    def notes(self) -> NotifySocket:
        """The notify socket (the test started the agent with one)."""
        assert self.notify is not None
        return self.notify

    def readies(self) -> List[Datagram]:
        return self.notes.with_key("READY", "1")

    def wait_ready(self, count: int = 1) -> Datagram:
        """The ``count``-th READY=1 (1: the first), waiting for it."""
        found = self.wait(lambda: len(self.readies()) >= count, f"READY=1 #{count}")
        assert found
        return self.readies()[count - 1]

    def wait_content(self, name: str, value: str, timeout_s: float = WAIT_S) -> None:
        path = self.directory / name
        self.wait(lambda: read(path) == value, f"{path} to hold the new value", timeout_s)

    def status_json(self) -> Dict[str, Any]:
        return dict(json.loads((self.state_dir / "status.json").read_text()))

    def wait_status_json(self, predicate: Callable[[Dict[str, Any]], bool],
                         what: str) -> Dict[str, Any]:
        """The first status.json document for which ``predicate`` holds."""
        found: List[Dict[str, Any]] = []

        def check() -> bool:
            document = self.status_json() if (self.state_dir / "status.json").exists() else {}
            if document and predicate(document):
                found.append(document)
                return True
            return False

        self.wait(check, what)
        return found[0]

    def status_cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run_cli(["status", "--state-dir", str(self.state_dir), *args], self.env)

    def stop(self, signum: int = signal.SIGTERM) -> int:
        """SIGTERM (or ``signum``); assert a prompt exit 0 and STOPPING=1."""
        code, elapsed = self.process.stop(signum)
        assert code == 0, f"exit {code}\n{self.describe()}"
        assert elapsed < PROMPT_EXIT_S, f"took {elapsed:.2f} s to stop\n{self.describe()}"
        if self.notify is not None:
            assert self.notify.with_key("STOPPING", "1"), self.describe()
        return code


def run_cli(args: Sequence[str], env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", *args], env=dict(env), check=False,
                          capture_output=True, text=True, timeout=60,
                          cwd=str(Path(__file__).resolve().parent.parent))


def assert_no_leak(text: str, vault: Vault) -> None:
    """No secret value, no token and nothing token-shaped in ``text``."""
    secrecy.assert_no_leak(text, vault.values, vault.tokens(), allow_traceback=True)


# ---------------------------------------------------------------------------
# Fixtures


@pytest.fixture
def vault() -> Iterator[Vault]:
    """A fresh emulator per test: faults and disabled secrets never leak across."""
    emulator = Emulator()
    emulator.start()
    try:
        yield Vault(emulator)
    finally:
        emulator.stop()


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short directory for the notify socket (sun_path holds 108 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="kvn-", dir="/tmp"))
    yield path
    for child in path.iterdir():
        child.unlink()
    path.rmdir()


StartAgent = Callable[..., Running]


@pytest.fixture
def start_agent(vault: Vault, shm_dir: Path, tmp_path: Path,
                short_dir: Path) -> Iterator[StartAgent]:
    """Start ``kv-agent run`` on a manifest; every process is stopped (or
    killed) afterwards and its stderr checked for leaks."""
    started: List[Running] = []
    sockets: List[NotifySocket] = []
    etc = tmp_path / "etc"
    etc.mkdir()

    def start(entries: Sequence[Mapping[str, Any]] = (), *, text: Optional[str] = None,
              notify: bool = True, args: Sequence[str] = (), env: Mapping[str, str] = {},
              manifest: Optional[Path] = None, state_dir: Optional[Path] = None,
              fast_retry: bool = False, main: Optional[str] = None, prelude: str = "",
              **manifest_keys: Any) -> Running:
        directory = shm_dir / "out"
        path = manifest or etc / "manifest.yaml"
        if not path.exists():
            write_file(path, text if text is not None else
                       manifest_text(vault.url, directory, entries, **manifest_keys))
        state_dir = state_dir or shm_dir / f"state{len(started)}"
        full_env = {key: value for key, value in without_host_identity(os.environ).items()
                    if key not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID",
                                   "JOURNAL_STREAM", "KV_AGENT_MANIFEST")}
        full_env.update(KV_AGENT_IMDS_ENDPOINT=vault.emulator.imds_endpoint,
                        REQUESTS_CA_BUNDLE=vault.emulator.ca_path,
                        NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
        sock = None
        if notify:
            sock = NotifySocket(str(short_dir / f"notify{len(started)}"))
            sockets.append(sock)
            full_env["NOTIFY_SOCKET"] = sock.path
        full_env.update(env)
        process = AgentProcess([*args, "run", "--manifest", str(path),
                                "--state-dir", str(state_dir)], full_env,
                               main=FAST_RETRY_MAIN if fast_retry else main,
                               prelude=prelude)
        running = Running(process, sock, path, directory, state_dir, vault, full_env)
        started.append(running)
        return running

    yield start

    for running in started:
        running.process.kill()
        # Stopped by the test or just killed: either way nothing may have leaked.
        assert_no_leak(running.process.stderr + running.process.stdout, vault)
    for sock in sockets:
        sock.close()


# ---------------------------------------------------------------------------
# Start-up and readiness


def test_ready_only_after_every_required_file_exists(start_agent: StartAgent,
                                                      vault: Vault) -> None:
    """READY=1 arrives only once every non-optional file holds its value with its mode."""
    values = {name: vault.put(name) for name in ("db-password", "api-key")}
    vault.emulator.latency_s = 0.05  # room for a premature READY to show
    seen_at_ready: List[Dict[str, Any]] = []
    run = start_agent([entry("db-password"), entry("api-key", mode="0400"),
                       entry("not-there", optional=True)])

    def snapshot(message: Datagram) -> None:
        if message.has("READY", "1") and not seen_at_ready:
            seen = {}
            for name in values:
                path = run.directory / name
                seen[name] = ((read(path), stat.S_IMODE(os.lstat(path).st_mode))
                              if path.exists() else None)
            seen_at_ready.append(seen)

    run.notes.on_datagram(snapshot)
    ready = run.wait_ready()
    assert seen_at_ready == [{"db-password": (values["db-password"], 0o440),
                              "api-key": (values["api-key"], 0o400)}]
    assert not (run.directory / "not-there").exists()
    # Something to act on before READY, and an honest STATUS with it.
    before = [m for m in run.notes.messages if m.at < ready.at]
    assert before and all("READY" not in m.fields for m in before)
    assert "1 of 3 secrets failing: not-there (404 not found)" in ready.fields["STATUS"]
    run.stop()
    assert run.notes.with_key("STOPPING", "1")
    for name, value in values.items():  # files stay for consumers across restarts
        assert read(run.directory / name) == value


def test_imds_down_at_start_then_up(start_agent: StartAgent, vault: Vault) -> None:
    """While IMDS does not answer, STATUS says "waiting for IMDS" and READY comes after it recovers."""
    value = vault.put("boot-secret")
    vault.emulator.inject_fault("imds", drop=True, count=10_000)
    run = start_agent([entry("boot-secret")])
    run.wait(lambda: any(s.startswith("waiting for IMDS") and "attempt 2" in s
                         for s in run.notes.statuses()), "STATUS waiting for IMDS (attempt 2)")
    assert not run.readies()
    assert not (run.directory / "boot-secret").exists()
    # `kv-agent status` sees a running agent that is not ready yet, and why.
    shown: List[subprocess.CompletedProcess[str]] = []

    def status_says_waiting() -> bool:
        shown.append(run.status_cli())
        return "waiting for IMDS" in shown[-1].stdout

    run.wait(status_says_waiting, "`kv-agent status` to report the wait")
    waiting = shown[-1]
    assert waiting.returncode == 1, waiting.stdout
    assert f"kv-agent is running (pid {run.process.pid}, starting)" in waiting.stdout
    vault.emulator.clear_faults()
    ready = run.wait_ready()
    assert read(run.directory / "boot-secret") == value
    assert "1 secret current" in ready.fields["STATUS"]
    run.stop()


class ReadyWatch:
    """Checks the output directory the moment each READY=1 arrives."""

    def __init__(self, run: Running, required: Sequence[str]) -> None:
        self.run = run
        self.required = required
        self.missing_at_ready: List[List[str]] = []  # one list per READY=1
        run.notes.on_datagram(self._check)

    def _check(self, message: Datagram) -> None:
        if message.has("READY", "1"):
            self.missing_at_ready.append(
                [name for name in self.required if not (self.run.directory / name).is_file()])


def _assert_not_ready_while_imds_down(run: Running, watch: ReadyWatch) -> None:
    """Whole refreshes fail (at least two); meanwhile no READY=1 and no "ready" status."""
    run.wait(lambda: len(run.process.lines("refresh failed")) >= 1
             and len(run.notes.statuses()) >= 3, "a whole refresh to fail")
    failed_at = len(run.notes.messages)
    run.wait(lambda: len(run.notes.messages) > failed_at + 1, "the next failing refresh")
    assert watch.missing_at_ready == [], "READY=1 was sent without the files"
    assert not (run.directory / "boot-secret").exists()
    document = run.status_json()
    assert document["state"] == "starting", document
    shown = run.status_cli()
    assert shown.returncode == 1, shown.stdout
    assert "starting" in shown.stdout and "ready" not in shown.stdout.split("\n")[0]


def test_no_ready_while_imds_answers_410(start_agent: StartAgent, vault: Vault) -> None:
    """IMDS answering 410 at start fails whole refreshes without READY=1; READY=1 comes
    only once IMDS recovers, and at that moment every required file exists."""
    value = vault.put("boot-secret")
    vault.put("second")
    vault.emulator.inject_fault("imds", 410, count=100_000)
    run = start_agent([entry("boot-secret"), entry("second"), entry("extra", optional=True)],
                      fast_retry=True)
    watch = ReadyWatch(run, ["boot-secret", "second"])
    _assert_not_ready_while_imds_down(run, watch)
    # A reload while starting ends without READY=1 too.
    run.process.send_signal(signal.SIGHUP)

    def reload_refresh_failed() -> bool:
        reloading = run.notes.with_key("RELOADING", "1")
        return bool(reloading) and any(
            m.at > reloading[0].at and "; next " in m.fields.get("STATUS", "")
            for m in run.notes.messages)  # "next": the refresh ended and the next is due

    run.wait(reload_refresh_failed, "the reload's refresh to fail")
    assert watch.missing_at_ready == [], run.describe()
    vault.emulator.clear_faults()
    run.wait_ready()
    assert watch.missing_at_ready[0] == []
    assert read(run.directory / "boot-secret") == value
    assert run.status_cli().returncode == 0
    run.stop()
    assert all(missing == [] for missing in watch.missing_at_ready)


def test_no_ready_while_imds_refuses_connections(start_agent: StartAgent,
                                                vault: Vault) -> None:
    """IMDS refusing connections at start fails whole refreshes without READY=1; READY=1
    comes only once IMDS listens, and at that moment every required file exists."""
    value = vault.put("boot-secret")
    endpoint = vault.emulator.imds_endpoint
    imds = re.match(r"http://([^:/]+):(\d+)", endpoint)
    assert imds is not None
    late = LateListener((imds.group(1), int(imds.group(2))))
    try:
        closed = endpoint.replace(f":{imds.group(2)}/", f":{late.port}/", 1)
        run = start_agent([entry("boot-secret")], fast_retry=True,
                          env={"KV_AGENT_IMDS_ENDPOINT": closed})
        watch = ReadyWatch(run, ["boot-secret"])
        _assert_not_ready_while_imds_down(run, watch)
        assert "connection refused" in run.status_json()["error"]
        late.open()
        run.wait_ready()
        assert watch.missing_at_ready == [[]]
        assert read(run.directory / "boot-secret") == value
        run.stop()
    finally:
        late.close()


def test_restart_with_imds_down_is_ready_with_the_files_it_wrote(start_agent: StartAgent,
                                                                 vault: Vault,
                                                                 shm_dir: Path) -> None:
    """After a restart in the same boot, IMDS down still allows READY=1: every required
    file is the one this agent wrote before (its ledger's inode), and stays in place."""
    values = {name: vault.put(name) for name in ("kept-a", "kept-b")}
    state = shm_dir / "state"
    first = start_agent([entry("kept-a"), entry("kept-b")], refresh="60s", state_dir=state)
    first.wait_ready()
    first.stop()
    vault.emulator.inject_fault("imds", 410, count=100_000)
    second = start_agent(state_dir=state, fast_retry=True)
    watch = ReadyWatch(second, list(values))
    second.wait_ready()
    assert watch.missing_at_ready == [[]]
    second.wait(lambda: second.process.lines("refresh failed"), "the failed refresh logged")
    assert {name: read(second.directory / name) for name in values} == values
    second.stop()


def test_invalid_manifest_at_start_exits_78(start_agent: StartAgent, vault: Vault) -> None:
    """An invalid manifest at start exits 78 with a one-line error naming the key, no traceback."""
    run = start_agent([entry("x", colour="blue")])
    code = run.process.wait(WAIT_S)
    assert code == 78
    err = run.process.stderr
    assert "kv-agent: error:" in err and "secrets[0].colour: unknown key" in err
    assert "Traceback" not in err
    assert run.notify is not None and not run.readies()


def test_output_directory_not_on_tmpfs_exits_73(start_agent: StartAgent, vault: Vault,
                                                tmp_path: Path) -> None:
    """An output directory on a disk file system is refused with exit 73 and a clear message."""
    vault.put("disk-secret")
    disk = tmp_path / "on-disk"
    from agent.base.landing import MEMORY_FILESYSTEMS, filesystem_type
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        if filesystem_type(fd) in MEMORY_FILESYSTEMS:
            pytest.skip("tmp_path is on tmpfs here")
    finally:
        os.close(fd)
    run = start_agent(text=manifest_text(vault.url, disk, [entry("disk-secret")]))
    code = run.process.wait(WAIT_S)
    err = run.process.stderr
    assert code == 73, err
    assert "kv-agent: error:" in err and "not on tmpfs or ramfs" in err
    assert "Traceback" not in err
    assert not disk.exists()


def test_works_without_notify_socket(start_agent: StartAgent, vault: Vault) -> None:
    """Without NOTIFY_SOCKET the agent writes, refreshes and stops just the same."""
    first = vault.put("plain")
    run = start_agent([entry("plain")], notify=False)
    run.wait_content("plain", first)
    second = vault.put("plain")
    run.wait_content("plain", second)
    assert "Traceback" not in run.process.stderr
    run.stop()
    assert read(run.directory / "plain") == second


def caught_signals(pid: int) -> Set[int]:
    """The signals ``pid`` has a handler for (SigCgt in /proc/<pid>/status)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return set()
    mask = int(re.search(r"^SigCgt:\s*([0-9a-f]+)$", text, re.M).group(1), 16)  # type: ignore
    return {signum for signum in range(1, 65) if mask & (1 << (signum - 1))}


class ManifestOpens:
    """Watches the manifest file for IN_OPEN, so a test can tell whether the
    agent has opened it yet (inotify queues the event synchronously with open(2))."""

    def __init__(self, path: Path) -> None:
        from inotify_simple import INotify, flags

        self._inotify = INotify(nonblocking=True)
        self._inotify.add_watch(str(path), flags.OPEN)
        self.count = 0

    def seen(self) -> bool:
        self.count += len(self._inotify.read(timeout=0))
        return self.count > 0

    def close(self) -> None:
        self._inotify.close()


START_SIGNALS = {signal.SIGHUP, signal.SIGTERM, signal.SIGINT}


def wait_for_early_handlers(run: "Running", opens: ManifestOpens) -> None:
    """Poll until the agent has its signal handlers, and prove that at that moment
    it had not opened the manifest yet: handlers are read first, opens second, so
    'handlers and no open' held at the first read (opens only ever grow)."""
    deadline = time.monotonic() + 15.0
    while time.monotonic() < deadline:
        if START_SIGNALS <= caught_signals(run.process.pid):
            assert not opens.seen(), "the manifest was read before the signal handlers existed"
            return
        assert not opens.seen(), "the manifest was read before the signal handlers existed"
        time.sleep(0.0005)
    pytest.fail("the agent never installed its SIGHUP/SIGTERM/SIGINT handlers")


@pytest.fixture
def early_manifest(vault: Vault, shm_dir: Path, tmp_path: Path) -> Callable[[str], Path]:
    """Writes a one-entry manifest before the agent starts, so a test can watch it."""

    def make(name: str) -> Path:
        path = tmp_path / "early" / "manifest.yaml"
        path.parent.mkdir(exist_ok=True)
        write_file(path, manifest_text(vault.url, shm_dir / "out", [entry(name)]))
        return path

    return make


def test_sighup_during_start_up_is_survived(start_agent: StartAgent, vault: Vault,
                                            early_manifest: Callable[[str], Path]) -> None:
    """Handlers are in place before the manifest is read; SIGHUPs sent then (and during
    the first 100 ms after) neither kill the agent nor get lost: it reloads and is READY."""
    value = vault.put("early")
    path = early_manifest("early")
    opens = ManifestOpens(path)
    try:
        run = start_agent(manifest=path)
        wait_for_early_handlers(run, opens)
        for _ in range(20):  # from before the manifest is read into the start proper
            run.process.send_signal(signal.SIGHUP)
            time.sleep(0.005)
        assert run.process.is_running()
        run.wait_ready()
        assert read(run.directory / "early") == value
        run.wait(lambda: run.process.lines("reloading (SIGHUP)"), "the early reload")
        assert run.process.is_running()
        run.stop()
    finally:
        opens.close()


def test_sigterm_during_start_up_exits_zero(start_agent: StartAgent, vault: Vault,
                                            early_manifest: Callable[[str], Path]) -> None:
    """SIGTERM before the manifest is read is honoured once it is: exit 0, nothing fetched."""
    vault.put("never")
    path = early_manifest("never")
    opens = ManifestOpens(path)
    try:
        run = start_agent(manifest=path)
        wait_for_early_handlers(run, opens)
        run.process.send_signal(signal.SIGTERM)
        assert run.process.wait(PROMPT_EXIT_S + 5) == 0, run.describe()
        assert vault.emulator.vault_requests == 0 and vault.emulator.imds_requests == 0
        assert not run.readies()
        assert "Traceback" not in run.process.stderr
    finally:
        opens.close()


# ---------------------------------------------------------------------------
# Refresh


def test_rotation_is_picked_up_by_the_timer(start_agent: StartAgent, vault: Vault) -> None:
    """A new version is written at the next refresh; an unchanged file is not touched."""
    old = vault.put("rotating")
    steady = vault.put("steady")
    run = start_agent([entry("rotating"), entry("steady")])
    run.wait_ready()
    steady_before = os.stat(run.directory / "steady")
    new = vault.put("rotating")
    rotated_at = time.monotonic()
    run.wait_content("rotating", new, timeout_s=10.0)
    assert time.monotonic() - rotated_at < 1.0 + 5.0  # one interval, plus a slow machine
    steady_after = os.stat(run.directory / "steady")
    assert (steady_after.st_ino, steady_after.st_mtime_ns) == (steady_before.st_ino,
                                                               steady_before.st_mtime_ns)
    assert read(run.directory / "steady") == steady
    assert old != new
    run.stop()


def test_throttling_during_a_refresh_is_waited_out(start_agent: StartAgent,
                                                   vault: Vault) -> None:
    """429 with Retry-After during a refresh is retried and the rotation still lands."""
    vault.put("throttled")
    run = start_agent([entry("throttled")])
    run.wait_ready()
    vault.emulator.inject_fault("vault", 429, count=2, retry_after="1",
                                path_contains="/secrets/throttled")
    new = vault.put("throttled")
    run.wait_content("throttled", new)
    assert sum(1 for r in vault.emulator.vault_log if r.status == 429) == 2
    document = run.wait_status_json(
        lambda d: d["secrets"][0]["version"] is not None and d["secrets"][0]["error"] is None
        and bool(d["last_refresh"]), "a clean status after the throttled refresh")
    assert document["error"] is None
    assert run.process.is_running()
    run.stop()


def test_disabled_secret_keeps_its_file_and_recovers(start_agent: StartAgent,
                                                     vault: Vault) -> None:
    """A disabled secret keeps its last good file, is logged once, fails STATUS and
    `kv-agent status` (exit 1), and recovers by itself once enabled, while others rotate."""
    good = vault.put("flaky")
    vault.put("other")
    run = start_agent([entry("flaky"), entry("other")])
    run.wait_ready()
    pending = vault.put("flaky", enabled=False)  # the latest version is disabled: 403
    run.wait(lambda: "1 of 2 secrets failing: flaky (403 disabled)" in run.notes.last_status(),
             "STATUS naming the disabled secret")
    # Other secrets keep rotating meanwhile, for several failing cycles.
    for _ in range(2):
        other = vault.put("other")
        run.wait_content("other", other)
    failing_fetches = vault.requests_for("flaky")
    run.wait(lambda: vault.requests_for("flaky") >= failing_fetches + 2, "more failed fetches")
    assert read(run.directory / "flaky") == good
    failures = [line for line in run.process.lines("flaky") if "wrote" not in line]
    assert len(failures) == 1, run.process.stderr  # once per state change, not per cycle
    assert failures[0].startswith("kv-agent: error: secret 'flaky'")
    assert "disabled" in failures[0]
    status = run.status_cli()
    assert status.returncode == 1, status.stdout + status.stderr
    assert "FAIL flaky" in status.stdout
    document = run.status_json()
    flaky = next(s for s in document["secrets"] if s["name"] == "flaky")
    assert flaky["error"] and "disabled" in flaky["error"].lower()

    vault.emulator.enable_secret("flaky")
    run.wait_content("flaky", pending)
    run.wait(lambda: run.status_cli().returncode == 0, "`kv-agent status` healthy again")
    assert len(run.process.lines("secret 'flaky' recovered")) == 1
    assert len([line for line in run.process.lines("flaky") if "wrote" not in line]) == 2
    run.stop()


# ---------------------------------------------------------------------------
# Reload: SIGHUP and manifest edits


def test_sighup_reload_adds_and_removes_entries(start_agent: StartAgent, vault: Vault,
                                                shm_dir: Path, tmp_path: Path) -> None:
    """SIGHUP sends RELOADING=1 with MONOTONIC_USEC, then READY=1, writes added entries
    and deletes only files this agent wrote for removed ones."""
    values = {name: vault.put(name) for name in ("keep", "drop", "swapped", "added")}
    directory = shm_dir / "out"
    # The manifest is a hard link to a file edited through another directory,
    # so the inotify watcher does not see the edit: only SIGHUP can reload it.
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    write_file(hidden / "manifest.yaml", manifest_text(
        vault.url, directory, [entry("keep"), entry("drop"), entry("swapped"),
                               entry("never-fetched", optional=True)], refresh="60s"))
    os.link(hidden / "manifest.yaml", tmp_path / "etc" / "manifest.yaml")
    # A file the agent never writes (its secret does not exist) is there first.
    directory.mkdir()
    foreign = directory / "never-fetched"
    foreign.write_text("operator's own file")
    run = start_agent()
    run.wait_ready()
    assert read(directory / "drop") == values["drop"]
    # The operator replaces one of the agent's files with their own.
    replace_file(directory / "swapped", "operator's replacement")

    write_file(hidden / "manifest.yaml", manifest_text(
        vault.url, directory, [entry("keep"), entry("added")], refresh="60s"))
    assert run.manifest.read_text() == (hidden / "manifest.yaml").read_text()
    sent = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    run.process.send_signal(signal.SIGHUP)
    ready = run.wait_ready(2)
    reloading = run.notes.with_key("RELOADING", "1")
    assert len(reloading) == 1 and reloading[0].at <= ready.at
    usec = int(reloading[0].fields["MONOTONIC_USEC"])
    assert sent <= usec <= sent + 10_000_000
    run.wait_content("added", values["added"])
    run.wait(lambda: not (directory / "drop").exists(), "the dropped entry's file to go")
    assert read(directory / "keep") == values["keep"]
    assert read(directory / "swapped") == "operator's replacement"
    assert read(foreign) == "operator's own file"
    run.wait(lambda: "2 secrets current" in run.notes.last_status(), "STATUS: 2 current")
    assert run.process.lines("reloading (SIGHUP)")
    run.stop()
    assert sorted(p.name for p in directory.iterdir()) == ["added", "keep", "never-fetched",
                                                           "swapped"]


def test_reload_is_ready_at_once_while_its_refresh_waits(start_agent: StartAgent,
                                                        vault: Vault) -> None:
    """With IMDS and the vault down, a reload that adds an entry sends READY=1 within
    seconds (not after its refresh's 30 s of retries), and meanwhile STATUS=, status.json
    and `kv-agent status` (exit 1) name the entry not written yet and what the refresh
    waits for; once the services are back the file arrives and status exits 0."""
    values = {name: vault.put(name) for name in ("kept", "added")}
    run = start_agent([entry("kept")], refresh="1h")
    run.wait_ready()
    for service in ("imds", "vault"):
        vault.emulator.inject_fault(service, drop=True, count=100_000)
    write_file(run.manifest, manifest_text(vault.url, run.directory,
                                           [entry("kept"), entry("added")], refresh="1h"))
    sent = time.monotonic()
    run.process.send_signal(signal.SIGHUP)
    ready = run.wait_ready(2)
    assert ready.at - sent < 5.0, f"READY=1 came {ready.at - sent:.1f} s after SIGHUP"
    assert "1 of 2 not written yet: added" in ready.fields["STATUS"], ready.fields
    assert not (run.directory / "added").exists()
    run.wait(lambda: any("; refresh " in s and "(attempt " in s for s in run.notes.statuses()),
             "STATUS= naming what the refresh waits for")
    shown: List[subprocess.CompletedProcess[str]] = []

    def status_says_waiting() -> bool:
        shown.append(run.status_cli())
        return "refresh waiting: " in shown[-1].stdout

    run.wait(status_says_waiting, "`kv-agent status` to name the wait")
    assert shown[-1].returncode == 1, shown[-1].stdout
    assert f"(pid {run.process.pid}, ready)" in shown[-1].stdout
    assert re.search(r"^  wait +added -> ", shown[-1].stdout, re.M), shown[-1].stdout
    document = run.status_json()
    assert document["waiting"] and document["refreshing"] is True, document
    assert [s["name"] for s in document["secrets"] if s["pending"]] == ["added"], document
    vault.emulator.clear_faults()
    run.wait_content("added", values["added"], timeout_s=60)
    run.wait(lambda: run.status_cli().returncode == 0, "`kv-agent status` to exit 0")
    assert run.status_json()["waiting"] is None and run.status_json()["refreshing"] is False
    assert len(run.readies()) == 2  # the refresh's end announced nothing more
    run.stop()


SECOND_ENTRY = "- name: second\n  path: second\n  mode: '0440'\n"


def _edit_in_place(manifest: Path, text: str) -> None:
    write_file(manifest, text)


def _edit_rename(manifest: Path, text: str) -> None:
    replace_file(manifest, text)


def _edit_sed(manifest: Path, text: str) -> None:
    # sed -i writes a temporary file beside the manifest and renames it over.
    addition = SECOND_ENTRY.rstrip("\n").replace("\n", "\\n")
    subprocess.run(["sed", "-i", f"s/^# ADD$/{addition}/", str(manifest)], check=True,
                   timeout=10)
    assert manifest.read_text() == text


def _edit_symlink(manifest: Path, text: str) -> None:
    target = manifest.parent / "releases" / "manifest-2.yaml"
    write_file(target, text)
    link = manifest.with_name(".manifest.yaml.new")
    os.symlink(target, link)
    os.replace(link, manifest)


EDITS: Dict[str, Callable[[Path, str], None]] = {
    "in-place": _edit_in_place, "rename": _edit_rename, "sed-i": _edit_sed,
    "symlink-swap": _edit_symlink}


@pytest.mark.parametrize("how", list(EDITS))
def test_manifest_edit_is_noticed_without_a_signal(start_agent: StartAgent, vault: Vault,
                                                   shm_dir: Path, tmp_path: Path,
                                                   how: str) -> None:
    """Editing the manifest (in place, rename-replace, sed -i or a symlink swap)
    reloads it without a signal: RELOADING=1, READY=1, then the new entry's file."""
    values = {name: vault.put(name) for name in ("first", "second")}
    before = manifest_text(vault.url, shm_dir / "out", [entry("first")]) + "# ADD\n"
    after = before.replace("# ADD\n", SECOND_ENTRY)
    manifest = tmp_path / "etc" / "manifest.yaml"
    if how == "symlink-swap":
        (manifest.parent / "releases").mkdir()
        write_file(manifest.parent / "releases" / "manifest-1.yaml", before)
        manifest.symlink_to(manifest.parent / "releases" / "manifest-1.yaml")
    run = start_agent(text=before)
    run.wait_ready()
    assert read(run.directory / "first") == values["first"]
    edited_at = time.monotonic()
    EDITS[how](manifest, after)
    ready = run.wait_ready(2)
    reloading = run.notes.with_key("RELOADING", "1")
    assert len(reloading) == 1 and edited_at < reloading[0].at < ready.at
    assert "MONOTONIC_USEC" in reloading[0].fields
    run.wait_content("second", values["second"])
    assert read(run.directory / "first") == values["first"]
    run.wait(lambda: "2 secrets current" in run.notes.last_status(), "STATUS: 2 current")
    assert run.process.lines("reloading (manifest changed)")
    run.stop()


def test_comment_only_edit_keeps_sessions_and_token(start_agent: StartAgent,
                                                    vault: Vault) -> None:
    """A manifest edit that only adds comments (moving every entry's line)
    reloads without a new token: the sessions and the token cache are kept."""
    value = vault.put("stable")
    run = start_agent([entry("stable")], refresh="60s")
    run.wait_ready()
    assert read(run.directory / "stable") == value
    tokens_before = vault.emulator.imds_requests
    replace_file(run.manifest, "# a comment\n# and another\n" + run.manifest.read_text())
    run.wait_ready(2)
    run.process.send_signal(signal.SIGHUP)
    run.wait_ready(3)
    assert vault.emulator.imds_requests == tokens_before
    assert len(run.notes.with_key("RELOADING", "1")) == 2
    run.stop()


def test_invalid_manifest_on_reload_keeps_the_old_one(start_agent: StartAgent,
                                                      vault: Vault) -> None:
    """An invalid edit is rejected with a log line and STATUS, and the old manifest keeps refreshing."""
    vault.put("survivor")
    run = start_agent([entry("survivor")])
    run.wait_ready()
    original = run.manifest.read_text()
    write_file(run.manifest, original.replace("refresh_jitter:", "refresh_jiter:"))
    run.wait(lambda: "manifest edit rejected" in run.notes.last_status(),
             "STATUS saying the edit was rejected")
    rejected = run.process.lines("manifest rejected, keeping the previous one")
    assert rejected and "refresh_jiter: unknown key" in rejected[0]
    assert "Traceback" not in run.process.stderr
    # Still the old manifest, still refreshing.
    new = vault.put("survivor")
    run.wait_content("survivor", new)
    assert run.status_json()["manifest_error"]
    assert run.process.is_running()
    # Reverting the bad edit (back to the very bytes in use) clears the complaint.
    write_file(run.manifest, original)
    run.wait(lambda: "manifest" not in run.notes.last_status()
             and run.status_json()["manifest_error"] is None, "the rejection to clear")
    run.stop()


def test_restart_removes_only_its_own_files_of_dropped_entries(start_agent: StartAgent,
                                                                vault: Vault,
                                                                shm_dir: Path) -> None:
    """Entries dropped while the agent was stopped lose their files at the next start,
    unless the file is no longer the one the agent wrote; unchanged files keep their inode."""
    values = {name: vault.put(name) for name in ("stays", "goes", "taken-over")}
    state = shm_dir / "state"
    first = start_agent([entry("stays"), entry("goes"), entry("taken-over")],
                        refresh="60s", state_dir=state)
    first.wait_ready()
    inode = os.stat(first.directory / "stays").st_ino
    first.stop(signal.SIGINT)
    assert {n: read(first.directory / n) for n in values} == values
    replace_file(first.directory / "taken-over", "operator's file now")
    write_file(first.manifest, manifest_text(vault.url, first.directory, [entry("stays")],
                                             refresh="60s"))
    # Under systemd (JOURNAL_STREAM set) lines carry sd-daemon priorities.
    second = start_agent(state_dir=state, env={"JOURNAL_STREAM": "8:12345"})
    second.wait_ready()
    assert not (first.directory / "goes").exists()
    assert read(first.directory / "taken-over") == "operator's file now"
    assert os.stat(first.directory / "stays").st_ino == inode
    assert "<6>removed " + str(first.directory / "goes") in second.process.stderr
    assert "<6>not removing " + str(first.directory / "taken-over") in second.process.stderr
    assert all(re.match(r"<[0-7]>", line) for line in second.process.stderr.splitlines())
    second.stop()
    assert sorted(p.name for p in first.directory.iterdir()) == ["stays", "taken-over"]


def test_upgrade_reads_the_previous_status_version_and_its_ledger(start_agent: StartAgent,
                                                                 vault: Vault,
                                                                 shm_dir: Path) -> None:
    """An agent upgraded in place finds a version 1 status.json (path -> inode): the
    ledger survives, so files of dropped entries go only if they are still its own."""
    values = {name: vault.put(name) for name in ("stays", "goes", "taken-over")}
    state = shm_dir / "state"
    first = start_agent([entry("stays"), entry("goes"), entry("taken-over")],
                        refresh="60s", state_dir=state)
    first.wait_ready()
    first.stop()
    document = first.status_json()
    assert document["version"] == 2
    old = dict(document, version=1,
               written={path: record["inode"] for path, record in document["written"].items()},
               secrets=[{key: value for key, value in secret.items() if key != "paths"}
                        for secret in document["secrets"]])
    (state / "status.json").write_text(json.dumps(old))
    assert run_cli(["status", "--state-dir", str(state)], env=dict(os.environ)).stdout \
        .startswith("kv-agent is not running; the last run")
    replace_file(first.directory / "taken-over", "operator's file now")
    write_file(first.manifest, manifest_text(vault.url, first.directory, [entry("stays")],
                                             refresh="60s"))
    second = start_agent(state_dir=state)
    second.wait_ready()
    assert not (first.directory / "goes").exists()
    assert read(first.directory / "taken-over") == "operator's file now"
    assert read(first.directory / "stays") == values["stays"]
    written = second.status_json()["written"]
    assert list(written) == [str(first.directory / "stays")]
    second.stop()


# ---------------------------------------------------------------------------
# Hooks, watchdog, stop


def test_on_change_hooks_run_once_per_change_never_at_start(start_agent: StartAgent,
                                                            vault: Vault,
                                                            shm_dir: Path) -> None:
    """A hook shared by two entries runs once when both rotate together, once per later
    change, and never for the first write at start."""
    for name in ("cert", "key", "unhooked"):
        vault.put(name)
    log = shm_dir / "hook.log"
    hook = ["/bin/sh", "-c", f'echo "$KV_AGENT_CHANGED" >> {log}']
    run = start_agent([entry("cert", on_change=hook), entry("key", on_change=hook),
                       entry("unhooked")])
    run.wait_ready()

    def refresh_done() -> None:
        """Wait until a refresh has fetched all three, so a rotation lands whole in the next."""
        before = vault.emulator.vault_requests
        run.wait(lambda: vault.emulator.vault_requests >= before + 3, "a refresh")
        time.sleep(0.1)

    vault.put("unhooked")
    refresh_done()
    refresh_done()
    assert not log.exists(), "the hook ran at start, or for an entry that does not name it"

    cert, key = vault.put("cert"), vault.put("key")
    run.wait_content("cert", cert)
    run.wait_content("key", key)
    run.wait(lambda: log.exists() and log.read_text().count("\n") >= 1, "the hook to run")
    refresh_done()
    both = f"{run.directory / 'cert'} {run.directory / 'key'}\n"
    assert log.read_text() == both

    cert = vault.put("cert")
    run.wait(lambda: log.read_text().count("\n") >= 2, "the hook to run again")
    refresh_done()
    assert log.read_text() == both + f"{run.directory / 'cert'}\n"
    assert read(run.directory / "cert") == cert
    assert len(run.process.lines("ran on_change hook")) == 2
    run.stop()


def test_watchdog_pings_at_half_the_interval(start_agent: StartAgent, vault: Vault) -> None:
    """With WATCHDOG_USEC=1000000 the agent sends WATCHDOG=1 about every 0.5 s."""
    vault.put("dog")
    run = start_agent([entry("dog")], env={"WATCHDOG_USEC": "1000000"})
    run.wait_ready()
    run.wait(lambda: len(run.notes.with_key("WATCHDOG", "1")) >= 6, "six WATCHDOG=1")
    times = [m.at for m in run.notes.with_key("WATCHDOG", "1")]
    gaps = sorted(b - a for a, b in zip(times[1:], times[2:]))
    assert 0.35 <= gaps[len(gaps) // 2] <= 0.75, gaps
    assert max(gaps) < 1.0, gaps  # never late enough for systemd to kill it
    run.stop()


def test_no_watchdog_without_watchdog_usec(start_agent: StartAgent, vault: Vault) -> None:
    """Without WATCHDOG_USEC (or for another WATCHDOG_PID) no WATCHDOG=1 is sent."""
    vault.put("quiet")
    run = start_agent([entry("quiet")], env={"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"})
    run.wait_ready()
    time.sleep(1.2)
    assert not run.notes.with_key("WATCHDOG")
    run.stop()


def test_sigterm_during_a_slow_refresh_exits_promptly(start_agent: StartAgent,
                                                      vault: Vault) -> None:
    """SIGTERM while a refresh waits on a slow vault still exits 0 promptly with STOPPING=1,
    leaving every file whole and no temporary file behind."""
    value = vault.put("slow")
    run = start_agent([entry("slow")])
    ready = run.wait_ready()
    vault.emulator.inject_fault("vault", delay_s=4.0, count=5)
    # The next refresh starts 1 s after READY and then hangs for 4 s: stop in between.
    time.sleep(max(0.0, ready.at + 1.6 - time.monotonic()))
    requests_before_stop = vault.emulator.vault_requests
    run.stop()
    assert vault.emulator.vault_requests == requests_before_stop, "the refresh was not in flight"
    assert run.process.lines("stopping with a refresh still waiting on the network")
    assert run.notes.with_key("STOPPING", "1")
    assert read(run.directory / "slow") == value
    assert [p.name for p in run.directory.iterdir()] == ["slow"]


# Runs the kv-agent command line with secret 'b's fetch stuck for a minute once the
# file named by KV_TEST_STUCK exists: a request stuck where no socket can be shut
# down (DNS resolution, connect()), in a fetch thread the interpreter would join.
STUCK_FETCH_MAIN = (
    "import os, sys, time\n"
    "import agent.vault.client as vault\n"
    "fetch = vault.VaultClient.fetch_secret\n"
    "def stuck(self, request):\n"
    "    if request.name == 'b' and os.path.exists(os.environ['KV_TEST_STUCK']):\n"
    "        time.sleep(60)\n"
    "    return fetch(self, request)\n"
    "vault.VaultClient.fetch_secret = stuck\n"
    "from agent.cli import main\n"
    "sys.exit(main())\n"
)
STOP_WITHIN_S = 2.0  # docs/design/lifecycle.md's "within 2 s" (issue 17 item 25)


def wait_in_flight(run: Running, vault: Vault, since: Dict[str, int]) -> None:
    """Wait until a refresh after READY fetched 'a' and 'c' again: 'b', sent with
    them by the fetch pool, is then in flight."""
    run.wait(lambda: all(vault.requests_for(name) > since[name] for name in ("a", "c")),
             "the refresh's fetches of a and c")
    time.sleep(0.3)


def test_sigterm_abandons_a_request_that_neither_answers_nor_fails(
        start_agent: StartAgent, vault: Vault) -> None:
    """SIGTERM while a fetch thread waits on a vault request that hangs (no answer, no
    error) exits 0 within 2 s, not after the request's 20-s timeout: the request is
    abandoned, every file keeps its last good bytes and no temporary file is left
    (issue 17 item 25)."""
    values = {name: vault.put(name) for name in ("a", "b", "c")}
    run = start_agent([entry(name) for name in values])
    run.wait_ready()
    vault.emulator.inject_fault("vault", delay_s=60.0, count=100, path_contains="/secrets/b")
    since = {name: vault.requests_for(name) for name in values}
    wait_in_flight(run, vault, since)
    code, elapsed = run.process.stop(signal.SIGTERM)
    assert code == 0, run.describe()
    assert elapsed < STOP_WITHIN_S, f"took {elapsed:.2f} s to stop\n{run.describe()}"
    assert run.process.lines("waiting on the network: 1 request abandoned")
    assert {name: read(run.directory / name) for name in values} == values
    assert sorted(p.name for p in run.directory.iterdir()) == ["a", "b", "c"]


def test_sigterm_does_not_wait_for_a_fetch_stuck_where_no_socket_can_be_shut(
        start_agent: StartAgent, vault: Vault, tmp_path: Path) -> None:
    """A fetch thread stuck outside any socket (as in DNS or connect()) does not hold the
    exit either: the agent exits 0 within 2 s without joining it, its files whole."""
    values = {name: vault.put(name) for name in ("a", "b", "c")}
    marker = tmp_path / "stuck"
    run = start_agent([entry(name) for name in values], main=STUCK_FETCH_MAIN,
                      env={"KV_TEST_STUCK": str(marker)})
    run.wait_ready()
    since = {name: vault.requests_for(name) for name in values}
    marker.touch()
    wait_in_flight(run, vault, since)
    code, elapsed = run.process.stop(signal.SIGTERM)
    assert code == 0, run.describe()
    assert elapsed < STOP_WITHIN_S, f"took {elapsed:.2f} s to stop\n{run.describe()}"
    assert run.process.lines("stopping with a refresh still waiting on the network")
    assert run.process.lines("stopped; files left in place")
    assert {name: read(run.directory / name) for name in values} == values
    assert sorted(p.name for p in run.directory.iterdir()) == ["a", "b", "c"]


# ---------------------------------------------------------------------------
# Status and logs


def test_status_command_and_status_file(start_agent: StartAgent, vault: Vault) -> None:
    """`kv-agent status` exits 0 for a healthy agent and 69 once it stopped;
    status.json lists each secret's path, version and update time and the refresh times."""
    vault.put("alpha")
    run = start_agent([entry("alpha"), entry("beta", path="sub/beta", optional=True)])
    run.wait_ready()
    document = run.wait_status_json(lambda d: bool(d.get("last_refresh")),
                                    "status.json with a refresh")
    assert document["pid"] == run.process.pid
    assert document["state"] == "ready"
    # It names every secret and path: root's alone (issue 9); the directory may only be
    # passed through (to metrics/), not listed.
    assert stat.S_IMODE(os.lstat(run.state_dir).st_mode) == 0o711
    assert stat.S_IMODE(os.lstat(run.state_dir / "status.json").st_mode) == 0o600
    assert document["next_refresh"] and document["refresh_interval_s"] == 1.0
    by_name = {s["name"]: s for s in document["secrets"]}
    alpha, beta = by_name["alpha"], by_name["beta"]
    assert alpha["path"] == str(run.directory / "alpha")
    assert re.fullmatch(r"[0-9a-f]{32}", alpha["version"])
    assert alpha["updated"] and alpha["error"] is None
    assert beta["path"] == str(run.directory / "sub" / "beta")
    assert beta["optional"] and beta["error"] and beta["version"] is None
    # Which identity endpoint the agent uses, and why (issue 12).
    assert document["identity_source"] == "imds (no App Service or Azure Arc environment found)"

    human = run.status_cli()
    assert human.returncode == 0, human.stdout + human.stderr
    assert f"kv-agent is running (pid {run.process.pid}" in human.stdout
    assert "identity: imds (no App Service or Azure Arc environment found)" in human.stdout
    assert "ok   alpha" in human.stdout and "warn beta" in human.stdout
    as_json = run.status_cli("--json")
    assert as_json.returncode == 0
    assert json.loads(as_json.stdout)["secrets"][0]["name"] == "alpha"


# What makes `identity.source: auto` pick Azure Arc on a host: the Arc agent's
# variables in the environment (from /etc/environment), or its files (here
# its directory, made to exist for the agent's process only).
ARC_HOST_FILES = ("import os.path\n"
                  "_lexists = os.path.lexists\n"
                  "os.path.lexists = lambda path: (path.startswith('/var/opt/azcmagent')\n"
                  "                                or _lexists(path))\n")


@pytest.mark.parametrize("arc_host", ["variables", "files"])
def test_the_harness_uses_imds_on_an_azure_arc_host(
        start_agent: StartAgent, vault: Vault, monkeypatch: pytest.MonkeyPatch,
        arc_host: str) -> None:
    """On a host where the Azure Arc agent is installed, the agents the harness starts
    still ask the emulator's IMDS (issue 17, item 22)."""
    himds = LateListener(("127.0.0.1", 9))  # never opened: Arc's endpoint refuses
    try:
        if arc_host == "variables":
            monkeypatch.setenv("IDENTITY_ENDPOINT",
                               f"http://127.0.0.1:{himds.port}/metadata/identity/oauth2/token")
            monkeypatch.setenv("IMDS_ENDPOINT", f"http://127.0.0.1:{himds.port}")
        vault.put("alpha")
        run = start_agent([entry("alpha")],
                          prelude=ARC_HOST_FILES if arc_host == "files" else "")
        run.wait_ready()
        document = run.wait_status_json(lambda d: bool(d.get("identity_source")),
                                        "status.json naming the identity source")
        assert document["identity_source"] == \
            "imds (no App Service or Azure Arc environment found)"
        run.stop()
    finally:
        himds.close()


def test_plain_secrets_load_no_certificate_or_select_code(start_agent: StartAgent,
                                                          vault: Vault) -> None:
    """`kv-agent run` with plain secrets imports neither the certificate nor the select:
    code, nor cryptography (issue 17, item 21: it costs start-up time and RSS)."""
    vault.put("alpha")
    run = start_agent([entry("alpha"), entry("beta", optional=True)], prelude=REPORT_MODULES)
    run.wait_ready()
    run.stop()
    loaded = loaded_modules(run.process.stdout)
    assert {"agent.daemon.service", "agent.sync.sync", "requests"} <= set(loaded)
    assert [name for name in loaded if name.split(".")[0] == "cryptography"
            or name in FEATURE_MODULES] == []

    run.stop()
    stopped = run.status_cli()
    assert stopped.returncode == 69
    first, *rest = stopped.stdout.splitlines()
    assert re.fullmatch(r"kv-agent is not running; the last run \(pid \d+\) stopped at "
                        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ; the lines below are from then", first)
    assert any(line.startswith("  was ok   alpha") for line in rest)
    assert not any(line.startswith("  ok") for line in rest), stopped.stdout
    assert run.status_cli("--json").returncode == 69
    never = run_cli(["status", "--state-dir", str(run.state_dir / "nothing-here")], run.env)
    assert never.returncode == 69


def test_reload_makes_the_state_directory_0711_again(start_agent: StartAgent,
                                                     vault: Vault) -> None:
    """systemd sets /run/kv-agent back to the unit's RuntimeDirectoryMode= (0751) for
    ExecReload='s process, just before its SIGHUP arrives (seen in booted Debian 12
    and 13); the reload makes the directory 0711 again, so it never stays listable."""
    vault.put("alpha")
    run = start_agent([entry("alpha")])
    run.wait_ready()
    assert stat.S_IMODE(os.lstat(run.state_dir).st_mode) == 0o711
    os.chmod(run.state_dir, 0o751)  # what systemd's ExecReload= does
    run.process.send_signal(signal.SIGHUP)
    run.wait(lambda: run.process.lines("reloading (SIGHUP)"), "the reload")
    run.wait(lambda: stat.S_IMODE(os.lstat(run.state_dir).st_mode) == 0o711,
             "the state directory to be 0711 again", timeout_s=3)
    run.stop()


def test_no_secret_or_token_in_debug_logs(start_agent: StartAgent, vault: Vault) -> None:
    """With --debug, through rotation, failure, recovery and reload, stderr holds
    no secret value and no token."""
    vault.put("leaky")
    vault.put("second")
    run = start_agent([entry("leaky"), entry("second")], args=["--debug"])
    run.wait_ready()
    run.wait_content("leaky", vault.put("leaky"))
    vault.emulator.forbid_secret("second")
    run.wait(lambda: run.process.lines("second"), "the failure logged")
    vault.emulator.allow_secret("second")
    run.wait_content("second", vault.put("second"))
    vault.emulator.inject_fault("vault", 401, count=1)
    run.process.send_signal(signal.SIGHUP)
    run.wait_ready(2)
    run.wait_content("leaky", vault.put("leaky"))
    run.stop()
    err = run.process.stderr
    assert "DEBUG" in err or "debug:" in err  # it really logged at debug level
    assert vault.tokens()
    assert_no_leak(err, vault)


def test_vault_unreachable_at_start_shows_the_vaults_reason(start_agent: StartAgent,
                                                             vault: Vault,
                                                             shm_dir: Path) -> None:
    """Issue 9 item 16: while the vault refuses connections at start, STATUS= names the vault
    and the reason, like IMDS: 'waiting for vault 127.0.0.1:PORT: connection refused (attempt 4)'."""
    import socket

    with socket.socket() as probe:  # a loopback port nobody listens on: refused
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    run = start_agent(text=manifest_text(f"https://127.0.0.1:{port}", shm_dir / "out",
                                         [entry("unreached")]))
    expected = f"waiting for vault 127.0.0.1:{port}: connection refused (attempt 4)"
    run.wait(lambda: any(s.startswith(expected) for s in run.notes.statuses()),
             f"STATUS {expected!r}")
    assert not run.readies()
    run.stop()


def test_hostile_manifest_edits_keep_the_previous_manifest(start_agent: StartAgent,
                                                          vault: Vault) -> None:
    """Hostile edits (huge refresh, alias bomb, over-long path, 5 MB owner, a FIFO, a //-directory)
    never kill or hang a running agent: it keeps the previous manifest and stops on SIGTERM."""
    vault.put("steady")
    run = start_agent([entry("steady")])
    run.wait_ready()
    original = run.manifest.read_text()
    assert "refresh: 1s\n" in original and "  path: steady\n" in original
    bomb = "".join(f"  - &l{level} [" + ", ".join([f"*l{level - 1}" if level else "lol"] * 9)
                   + "]\n" for level in range(10))
    hostile = {
        "refresh overflowing a float": original.replace("refresh: 1s", "refresh: " + "9" * 400),
        "refresh over 4300 digits": original.replace("refresh: 1s", "refresh: " + "9" * 5000),
        "billion laughs": original.replace("refresh: 1s\n", "refresh:\n" + bomb),
        "path component over 255 bytes": original.replace("  path: steady",
                                                          "  path: " + "p" * 300 + "/x"),
        "owner of 5 MB": original.replace("  path: steady",
                                          "  owner: " + "o" * (5 << 20) + "\n  path: steady"),
    }
    rejected = 0

    def wait_rejected(what: str) -> None:
        run.wait(lambda: len(run.process.lines("manifest rejected, keeping the previous one"))
                 > rejected, f"the {what} edit to be rejected")
        assert run.process.is_running(), f"the {what} edit stopped the agent"

    for what, text in hostile.items():
        write_file(run.manifest, text)
        wait_rejected(what)
        rejected = len(run.process.lines("manifest rejected, keeping the previous one"))
    run.manifest.unlink()  # a FIFO in its place: reading it must not block the loop
    os.mkfifo(run.manifest, 0o600)
    wait_rejected("FIFO")
    run.manifest.unlink()
    # '//dev/shm/...' is /dev/shm/...: accepted (its walk up used to loop forever).
    write_file(run.manifest, original.replace(f"directory: {run.directory}",
                                              f"directory: /{run.directory}"))
    run.wait(lambda: run.status_json()["manifest_error"] is None
             and "manifest" not in run.notes.last_status(), "the //-directory edit to be read")
    new = vault.put("steady")  # still refreshing, into the same directory
    run.wait_content("steady", new)
    assert "Traceback" not in run.process.stderr
    run.stop()


# ---------------------------------------------------------------------------
# In-process: the threads' contract (no subprocess)


class _RecordingNotifier(Notifier):
    """Records which thread sent each STATUS= line."""

    def __init__(self) -> None:
        super().__init__({})
        self.sent: List[Tuple[int, str]] = []

    def status(self, text: str) -> None:
        self.sent.append((threading.get_ident(), text))


def test_retry_notices_reach_systemd_from_the_main_thread(tmp_path: Path) -> None:
    """A retry in the refresh thread only posts a notice: the main thread records it,
    sends STATUS= and writes status.json (the main thread owns all state)."""
    notifier = _RecordingNotifier()
    daemon = Daemon(str(tmp_path / "manifest.yaml"), environ={}, state_dir=str(tmp_path),
                    notifier=notifier)
    worker = threading.Thread(target=daemon._worker.on_retry, args=("IMDS (410)", 2, 1.0))
    worker.start()
    worker.join()
    assert notifier.sent == [] and not (tmp_path / "status.json").exists()
    daemon._handle_messages()
    assert notifier.sent == [(threading.get_ident(), "retrying IMDS (410) (attempt 2)")]
    saved = json.loads((tmp_path / "status.json").read_text())
    assert saved["status"] == "retrying IMDS (410) (attempt 2)" and saved["state"] == "starting"


# ---------------------------------------------------------------------------
# Sets: a certificate's files change together (issue 11)

PAIR_CHECK = r"""
import os, sys
from cryptography import x509
from cryptography.hazmat.primitives import serialization

def spki(key):
    return key.public_bytes(serialization.Encoding.DER,
                            serialization.PublicFormat.SubjectPublicKeyInfo)

def read_pair(dir_fd):
    '''(matched, serial) of tls.key and tls.crt read relative to dir_fd.'''
    blobs = []
    for name in ("tls.key", "tls.crt"):
        fd = os.open(name, os.O_RDONLY, dir_fd=dir_fd)
        with os.fdopen(fd, "rb") as handle:
            blobs.append(handle.read())
    key = serialization.load_pem_private_key(blobs[0], None)
    cert = x509.load_pem_x509_certificate(blobs[1])
    return spki(key.public_key()) == spki(cert.public_key()), cert.serial_number
"""

# The racing_reader protocol (tests/racing_reader.py): argv stop, directory.
CERTIFICATE_SET_READER = PAIR_CHECK + r"""
import json
stop, directory = sys.argv[1], sys.argv[2]
reads, serials, problems = 0, set(), []
print("ready", flush=True)
while not os.path.exists(stop):
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        matched, serial = read_pair(dir_fd)
        names = sorted(os.listdir(dir_fd))
    except FileNotFoundError as exc:
        problems.append(f"missing: {exc.filename}")
        continue
    finally:
        os.close(dir_fd)
    if not matched:
        problems.append(f"mismatched pair at serial {serial}")
    if names != ["tls.crt", "tls.key"]:
        problems.append(f"directory holds {names}")
    reads += 1
    serials.add(serial)
print(json.dumps({"reads": reads, "serials": len(serials), "problems": problems[:10],
                  "problem_count": len(problems)}), flush=True)
"""

SET_HOOK = PAIR_CHECK + r"""
directory, log = sys.argv[1], sys.argv[2]
dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
try:
    matched, serial = read_pair(dir_fd)
finally:
    os.close(dir_fd)
changed = os.environ.get("KV_AGENT_CHANGED", "")
with open(log, "a") as handle:
    handle.write(f"{'ok' if matched else 'MISMATCH'} {serial} {changed}\n")
"""


def certificate_entry(name: str = "web-tls", **keys: Any) -> Dict[str, Any]:
    return {"name": name, "certificate": {"key": "web/tls.key", "cert": "web/tls.crt"},
            "mode": "0440", **keys}


def serial_of(path: Path) -> Optional[int]:
    from cryptography import x509

    try:
        return x509.load_pem_x509_certificate(path.read_bytes()).serial_number
    except (OSError, ValueError):
        return None


def reserved_dirs(directory: Path) -> List[str]:
    return sorted(n for n in os.listdir(directory) if n.startswith(".kv-agent-set-"))


def test_a_certificate_set_rotates_whole_for_readers_and_hooks(start_agent: StartAgent,
                                                                 vault: Vault,
                                                                 shm_dir: Path) -> None:
    """Through the running agent, a reader that opens the set's directory and reads key
    and cert relative to it during 100 rotations never sees a mismatched pair or a
    missing file; the hook run after each swap reads a matched pair every time, with
    both paths in KV_AGENT_CHANGED; old generations are removed once their grace ends."""
    vault.emulator.add_certificate("web-tls", key_type="ec")
    hook_log = shm_dir / "hook.log"
    directory = shm_dir / "out" / "web"
    run = start_agent([certificate_entry(on_change=[
        sys.executable, "-c", SET_HOOK, str(directory), str(hook_log)])], refresh="1h")
    run.wait_ready()
    rotations = 100
    with racing_reader(CERTIFICATE_SET_READER, str(directory),
                       stop=shm_dir / "stop-reader") as race:
        started = time.monotonic()
        for _ in range(rotations):
            before = serial_of(directory / "tls.crt")
            vault.emulator.rotate_certificate("web-tls")
            run.process.send_signal(signal.SIGHUP)
            run.wait(lambda old=before: serial_of(directory / "tls.crt") not in (old, None),  # type: ignore[misc]
                     "the rotated certificate")
        elapsed = time.monotonic() - started
    report = race.report
    print(f"\n{rotations} certificate rotations through the daemon (rotate + SIGHUP + "
          f"refresh + swap) in {elapsed:.2f} s: {elapsed * 1000 / rotations:.0f} ms each; "
          f"reader: {report}")
    assert report["problem_count"] == 0, report["problems"]
    assert report["reads"] >= rotations and report["serials"] >= 10, report
    run.wait(lambda: hook_log.exists() and hook_log.read_text().count("\n") >= 10,
             "the hook to run")
    lines = hook_log.read_text().splitlines()
    assert all(line.startswith("ok ") for line in lines), lines[:5]
    assert all(line.endswith(f" {directory}/tls.crt {directory}/tls.key") for line in lines)
    # Nothing refreshes for an hour: only the grace timer removes the last old generation.
    run.wait(lambda: not reserved_dirs(shm_dir / "out"), "the old generations to go",
             timeout_s=10)
    assert sorted(os.listdir(directory)) == ["tls.crt", "tls.key"]
    run.stop()


def test_sigkill_during_certificate_rotations_leaves_one_whole_generation(
        start_agent: StartAgent, vault: Vault, shm_dir: Path) -> None:
    """`kv-agent run` killed with SIGKILL at random moments during rotations 6 times:
    each time the set's directory holds one whole generation (key matches cert), and
    after the next start no half-built or old generation remains."""
    vault.emulator.add_certificate("web-tls", key_type="ec")
    directory = shm_dir / "out" / "web"
    state_dir = shm_dir / "state-kill"
    rng = random.Random(11)
    check = PAIR_CHECK + "\nimport json\nfd = os.open(sys.argv[1], os.O_RDONLY | " \
        "os.O_DIRECTORY)\nprint(json.dumps([read_pair(fd)[0], sorted(os.listdir(fd))]))\n"
    left_behind: List[str] = []
    for _ in range(6):
        run = start_agent([certificate_entry()], state_dir=state_dir, refresh="1h")
        run.wait_ready()
        assert not set(left_behind) & set(reserved_dirs(shm_dir / "out")), \
            "a crash's leftover survived the next start"
        stopping = threading.Event()

        def rotate(run: Running = run, stopping: threading.Event = stopping) -> None:
            while not stopping.is_set() and run.process.is_running():
                vault.emulator.rotate_certificate("web-tls")
                run.process.send_signal(signal.SIGHUP)
                time.sleep(0.02)

        rotator = threading.Thread(target=rotate)
        rotator.start()
        time.sleep(rng.uniform(0.3, 1.0))
        run.process.kill()
        stopping.set()
        rotator.join()
        done = subprocess.run([sys.executable, "-c", check, str(directory)],
                              capture_output=True, text=True, check=True)
        matched, names = json.loads(done.stdout)
        assert matched and names == ["tls.crt", "tls.key"]
        left_behind = reserved_dirs(shm_dir / "out")
    run = start_agent([certificate_entry()], state_dir=state_dir, refresh="1h")
    run.wait_ready()
    assert not set(left_behind) & set(reserved_dirs(shm_dir / "out"))
    run.wait(lambda: not reserved_dirs(shm_dir / "out"), "no generation left", timeout_s=10)
    run.stop()


def test_a_set_that_leaves_the_manifest_is_removed(start_agent: StartAgent, vault: Vault,
                                                    shm_dir: Path) -> None:
    """A certificate entry dropped by a reload has its set's directory removed (it is
    still the agent's), and a set dropped while the agent was down goes at the next start."""
    vault.emulator.add_certificate("web-tls", key_type="ec")
    vault.emulator.add_certificate("api-tls", key_type="ec")
    api = {"name": "api-tls", "certificate": {"cert": "api/tls.crt"}}
    run = start_agent([certificate_entry(), api])
    run.wait_ready()
    out = shm_dir / "out"
    assert (out / "web" / "tls.key").exists() and (out / "api" / "tls.crt").exists()
    document = run.status_json()
    assert set(document["sets"]) == {str(out / "web"), str(out / "api")}
    replace_file(run.manifest, manifest_text(vault.url, out, [api]))
    run.process.send_signal(signal.SIGHUP)
    run.wait(lambda: not (out / "web").exists(), "the dropped set to be removed")
    run.wait(lambda: not reserved_dirs(out), "its old generation to go after the grace",
             timeout_s=10)
    run.wait_status_json(lambda d: set(d["sets"]) == {str(out / "api")}, "the ledger")
    run.stop()
    replace_file(run.manifest, manifest_text(vault.url, out, [entry("plain")]))
    vault.put("plain")
    again = start_agent(state_dir=run.state_dir)
    again.wait_ready()
    assert not (out / "api").exists() and (out / "plain").exists()
    again.stop()
    assert not reserved_dirs(out)


def test_a_foreign_file_in_a_set_is_kept_and_named_and_a_member_that_left_goes(
        start_agent: StartAgent, vault: Vault) -> None:
    """A file someone adds to a set's directory is named in STATUS= (escaped: its name
    cannot add a field), never makes the unchanged set swap, and survives a rotation and
    the removal of the old generation as the same inode; a member a reload drops leaves
    the directory by one swap, the other member keeping its inode and the foreign file
    staying."""
    vault.put("db-password")
    vault.put("db-user")
    members = [entry("db-password", path="db/password", set="db"),
               entry("db-user", path="db/user", set="db")]
    run = start_agent(members, refresh="1s")
    run.wait_ready()
    directory = run.directory / "db"
    notes = directory / "notes\nREADY=1"
    notes.write_text("operator's")
    inode, set_inode = os.lstat(notes).st_ino, os.lstat(directory).st_ino
    named = f"kept {directory}/notes\\x0aREADY=1 in a set's directory"
    run.wait(lambda: named in run.notes.last_status(), "STATUS= to name the foreign file")
    assert len(run.readies()) == 1
    refreshes = len(run.notes.statuses())
    run.wait(lambda: len(run.notes.statuses()) >= refreshes + 2, "two more refreshes")
    assert os.lstat(directory).st_ino == set_inode, "the unchanged set was swapped"
    password = vault.put("db-password")
    run.wait_content("db/password", password)
    run.wait(lambda: not reserved_dirs(run.directory), "the old generation to go")
    assert os.lstat(notes).st_ino == inode and notes.read_text() == "operator's"
    password_inode = os.lstat(directory / "password").st_ino
    replace_file(run.manifest, manifest_text(vault.url, run.directory, members[:1]))
    run.wait(lambda: not (directory / "user").exists(), "the dropped member to go")
    assert sorted(os.listdir(directory)) == ["notes\nREADY=1", "password"]
    assert os.lstat(directory / "password").st_ino == password_inode
    assert os.lstat(notes).st_ino == inode
    run.wait(lambda: not reserved_dirs(run.directory), "the old generation to go")
    assert run.process.lines(f"removed {directory}/user: it left the set")
    run.stop()


# Retiring old generations: the deadline is the writer's, never the refresh thread's.
GRACE_SLACK_S = 1.5  # a loaded 2-core machine's scheduling, on top of SET_GRACE_S
SLOW_VAULT_S = 4.0  # each request of a slow vault: far beyond the grace
STUCK_S = 15.0  # a stuck vault's answer: longer than any of these tests waits


def rotate_and_wait(run: Running, vault: Vault, *, reload: bool = False) -> float:
    """Rotate the certificate (and send SIGHUP with ``reload``) and wait until the
    agent swapped it in; returns when it saw the swap (time.monotonic)."""
    path = run.directory / "web" / "tls.crt"
    before = serial_of(path)
    vault.emulator.rotate_certificate("web-tls")
    if reload:
        run.process.send_signal(signal.SIGHUP)
    run.wait(lambda: serial_of(path) not in (before, None), "the rotated certificate")
    return time.monotonic()


def wait_generations_gone(run: Running, swapped: float) -> None:
    """No old generation left within the grace (plus slack) after ``swapped``."""
    from agent.writer import SET_GRACE_S

    left = SET_GRACE_S + GRACE_SLACK_S - (time.monotonic() - swapped)
    run.wait(lambda: not reserved_dirs(run.directory), "the old generations to go",
             timeout_s=max(left, 0.1))


def test_old_generations_go_within_the_grace_with_a_one_second_refresh(
        start_agent: StartAgent, vault: Vault) -> None:
    """With `refresh: 1s`, a refresh is due again before the grace ends: with the vault
    then slow (each refresh runs across the deadline), the old generation of the last
    rotation is still gone within the grace plus a little slack."""
    vault.emulator.add_certificate("web-tls", key_type="ec")
    run = start_agent([certificate_entry()], refresh="1s")
    run.wait_ready()
    for _ in range(3):
        swapped = rotate_and_wait(run, vault)
    vault.emulator.latency_s = SLOW_VAULT_S
    wait_generations_gone(run, swapped)
    run.stop()


def test_an_old_generation_goes_on_time_while_a_refresh_is_stuck(
        start_agent: StartAgent, vault: Vault) -> None:
    """A reload's refresh stuck on a vault that answers after 15 s does not hold back
    the old generation swapped out just before: it goes when its grace ends."""
    vault.emulator.add_certificate("web-tls", key_type="ec")
    run = start_agent([certificate_entry()], refresh="1h")
    run.wait_ready()
    swapped = rotate_and_wait(run, vault, reload=True)
    vault.emulator.inject_fault("vault", delay_s=STUCK_S, count=10)
    stuck = time.monotonic()
    run.process.send_signal(signal.SIGHUP)
    wait_generations_gone(run, swapped)
    assert time.monotonic() - stuck < STUCK_S, "the refresh was not stuck: nothing proved"
    run.stop()


def test_stop_during_a_stuck_refresh_right_after_a_swap_leaves_no_old_generation(
        start_agent: StartAgent, vault: Vault) -> None:
    """SIGTERM while a refresh is stuck on the vault, within the grace of a swap just
    made: the agent exits promptly and no old generation (the old key) is left."""
    vault.emulator.add_certificate("web-tls", key_type="ec")
    run = start_agent([certificate_entry()], refresh="1h")
    run.wait_ready()
    rotate_and_wait(run, vault, reload=True)
    vault.emulator.inject_fault("vault", delay_s=STUCK_S, count=10)
    run.process.send_signal(signal.SIGHUP)
    run.wait(lambda: len(run.notes.with_key("RELOADING", "1")) >= 2, "the second reload")
    time.sleep(0.2)  # the reload's refresh sends its listing, which the vault holds
    assert reserved_dirs(run.directory), "the grace already ended: nothing was proved"
    run.stop()
    assert reserved_dirs(run.directory) == []
    assert sorted(os.listdir(run.directory / "web")) == ["tls.crt", "tls.key"]


def test_expired_and_expiring_secrets_are_written_and_shown(start_agent: StartAgent,
                                                             vault: Vault) -> None:
    """An expired certificate, a secret expiring within warn_before_expiry and one not
    yet valid are all written; each is logged once as a warning, and STATUS=,
    status.json and `kv-agent status` show them."""
    vault.emulator.add_certificate("old-tls", key_type="ec", validity_days=10,
                                   valid_from_days=-30)
    now = int(time.time())
    vault.emulator.set_secret("soon", "v1", expires_on=now + 3 * 86400)
    vault.emulator.set_secret("later", "v2", not_before=now + 86400)
    run = start_agent([certificate_entry("old-tls"), entry("soon"), entry("later")],
                      warn_before_expiry="7d")
    run.wait_ready()
    assert (run.directory / "web" / "tls.crt").exists()
    assert read(run.directory / "soon") == "v1" and read(run.directory / "later") == "v2"
    status = run.notes.last_status()
    assert re.search(r"1 expired: old-tls \(expired \d{4}-\d\d-\d\d\)", status), status
    assert "1 not yet valid: later (valid from" in status
    assert "1 expiring: soon (expires" in status
    run.process.send_signal(signal.SIGHUP)
    run.wait_ready(2)
    assert len(run.process.lines("'old-tls' expired at")) == 1
    assert len(run.process.lines("'soon' expires at")) == 1
    assert len(run.process.lines("'later' is not valid before")) == 1
    secrets = {s["name"]: s for s in run.status_json()["secrets"]}
    assert secrets["old-tls"]["expired"] and not secrets["old-tls"]["expiring"]
    assert secrets["soon"]["expiring"] and secrets["soon"]["expires"]
    assert secrets["later"]["not_yet_valid"]
    shown = run.status_cli()
    assert shown.returncode == 0, shown.stdout
    assert "EXPIRED at" in shown.stdout and "expires soon" in shown.stdout
    run.stop()


def test_expiry_warnings_follow_the_injected_wall_clock(
        tmp_path: Path, shm_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """With an injected wall clock: an entry expiring within warn_before_expiry is warned
    about once a day, not at every refresh; once expired it is warned about once more and
    STATUS= names it with its date; a rotation to a valid version clears it."""
    from agent.manifest import Accounts, parse_manifest
    from agent.pipeline.expiry import Validity
    from agent.sync.freshness import Freshness
    from agent.sync.sync import SecretOutcome

    day = 86400.0
    now = [1_793_491_200.0 - 3 * day]  # three days before 2026-11-01
    daemon = Daemon(str(tmp_path / "manifest.yaml"), environ={}, state_dir=str(tmp_path),
                    notifier=_RecordingNotifier(), wall=lambda: now[0])
    accounts = Accounts(user=lambda name: 0, group=lambda name: 0)
    manifest = parse_manifest(
        f"vault: https://kv.vault.azure.net\ndirectory: {shm_dir}\nwarn_before_expiry: 7d\n"
        "secrets:\n  - name: web-tls\n", "m.yaml", accounts=accounts, check_filesystem=False)
    daemon._install(manifest)
    entry, = manifest.secrets
    window = Validity(None, 1_793_491_200)
    caplog.set_level("WARNING")

    def refresh(validity: Validity = window) -> None:
        daemon._entries.record([SecretOutcome(entry, version="v1", validity=validity)],
                               Freshness(), now[0])

    refresh()
    now[0] += day / 2
    refresh()
    assert len(caplog.records) == 1 and "'web-tls' expires at 2026-11-01" in caplog.text
    assert "1 expiring: web-tls (expires 2026-11-01)" in daemon.snapshot().status
    now[0] += day
    refresh()
    assert len(caplog.records) == 2
    now[0] = 1_793_491_200.0 + 60
    refresh()
    refresh()
    assert len(caplog.records) == 3 and "'web-tls' expired at" in caplog.records[-1].message
    assert "1 expired: web-tls (expired 2026-11-01)" in daemon.snapshot().status
    assert daemon.snapshot().entries[0].expiry == "expired"
    refresh(Validity(None, int(now[0] + 365 * day)))
    assert "expire" not in daemon.snapshot().status and len(caplog.records) == 3


def test_a_set_counts_for_ready_only_while_it_is_the_agents(start_agent: StartAgent,
                                                             vault: Vault,
                                                             shm_dir: Path) -> None:
    """After a restart with IMDS down, a set the agent wrote counts for READY=1, even its
    unchanged member (whose inode the last swap changed too); a member replaced by
    someone else does not, and then no READY=1 comes."""
    vault.put("db-password")
    vault.put("db-user")
    state = shm_dir / "state"
    members = [entry("db-password", path="db/password", set="db"),
               entry("db-user", path="db/user", set="db")]
    first = start_agent(members, refresh="60s", state_dir=state)
    first.wait_ready()
    user_inode = os.lstat(first.directory / "db" / "user").st_ino
    password = vault.put("db-password")
    first.process.send_signal(signal.SIGHUP)
    first.wait_content("db/password", password)
    first.wait_ready(2)
    assert os.lstat(first.directory / "db" / "user").st_ino != user_inode
    first.stop()
    vault.emulator.inject_fault("imds", 410, count=100_000)
    second = start_agent(state_dir=state, fast_retry=True)
    second.wait_ready()
    second.stop()
    user = second.directory / "db" / "user"
    replacement = user.with_name("replacement")
    replacement.write_bytes(user.read_bytes())
    os.replace(replacement, user)
    third = start_agent(state_dir=state, fast_retry=True)
    third.wait(lambda: third.process.lines("refresh failed"), "the failed refresh logged")
    assert not third.readies()
    third.stop()


def test_a_ready_agents_refresh_gives_way_to_a_busy_vault(tmp_path: Path, shm_dir: Path) -> None:
    """Once ready (every file on disk), the daemon's refreshes give way to a vault that
    said wait (Sync.give_way: held-back requests end unsent, their files kept,
    and the lifecycle retries later, issue 12 fleet outage); while starting they wait
    the pause out, since a missing file is worth the wait."""
    from agent.daemon.lifecycle import Lifecycle
    from agent.manifest import Accounts, parse_manifest
    from agent.sync.sync import Interrupted

    daemon = Daemon(str(tmp_path / "manifest.yaml"), environ={}, state_dir=str(tmp_path),
                    notifier=_RecordingNotifier())
    accounts = Accounts(user=lambda name: 0, group=lambda name: 0)
    manifest = parse_manifest(
        f"vault: https://kv.vault.azure.net\ndirectory: {shm_dir}\nsecrets:\n  - name: db\n",
        "m.yaml", accounts=accounts, check_filesystem=False)
    daemon._install(manifest)
    agent = daemon._sync
    assert agent is not None
    seen: List[bool] = []

    def sync(**_: object) -> None:
        seen.append(agent.vault.pacing.is_giving_way)
        raise Interrupted("stub: nothing is sent")

    agent.sync = sync  # type: ignore[method-assign]
    for is_ready in (False, True):
        daemon._life = Lifecycle(is_ready=is_ready)
        daemon._spawn_sync()
        assert daemon._worker.is_running
        done, = wait_for(lambda: list(daemon._mailbox.messages()), WAIT_S, "the refresh's end")
        daemon._worker.ended(done)
    assert seen == [False, True]
