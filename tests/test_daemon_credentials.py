"""``kv-agent run`` serving systemd credentials, the real process against the loopback emulator
(the fixtures of tests/test_daemon.py): the socket exists before READY=1, which waits for every
required credential; a client that binds the abstract address as systemd's loader does gets a
granted value, and a refusal otherwise; a rotation is served to the next connection and runs the
entry's hook with the credential's name; a stuck client delays neither a refresh nor SIGTERM;
status, status.json and the metrics show credential entries; no file is written for them, the
process is not dumpable, and a manifest without credentials has no socket."""

from __future__ import annotations

import os
import signal
import socket
import stat
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import pytest
from test_credential_socket import (
    Journal,
    connect,
    loader_address,
    read_all,
    timed_load,
)
from test_daemon import (  # noqa: F401 (fixtures)
    PROMPT_EXIT_S,
    Running,
    StartAgent,
    Vault,
    entry,
    manifest_text,
    replace_file,
    short_dir,
    start_agent,
    vault,
)

from agent.daemon.credentials import REFUSAL_BYTES
from agent.pipeline.credentials import SOCKET_NAME

pytestmark = pytest.mark.integration

APP = "credential:app.service/db-password"
# Sends the agent's journal entries to the socket named by KV_TEST_JOURNAL (journald, played)
# and prints, at exit, whether the process could be dumped.
JOURNAL_AND_DUMPABLE = (
    "import atexit, os\n"
    "import agent.daemon.journal as journal\n"
    "journal.JOURNAL_SOCKET = os.environ.get('KV_TEST_JOURNAL', '/nonexistent')\n"
    "from agent.base.memory import is_dumpable\n"
    "atexit.register(lambda: print('dumpable:', is_dumpable(), flush=True))\n"
)


def credential_entry(name: str = "db-password", **keys: Any) -> Dict[str, Any]:
    """An entry that writes no file: ``name`` served to app.service as ``name``."""
    return {"name": name, "credential": {"units": ["app.service"]}, **keys}


def socket_of(run: Running) -> str:
    return str(run.state_dir / SOCKET_NAME)


def load(run: Running, unit: str = "app.service", credential_id: str = "db-password") -> bytes:
    return timed_load(socket_of(run), unit, credential_id)[0]


def is_serving(run: Running) -> bool:
    try:
        return stat.S_ISSOCK(os.lstat(socket_of(run)).st_mode)
    except FileNotFoundError:
        return False


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[Journal]:
    import tempfile

    directory = Path(tempfile.mkdtemp(prefix="kvj-", dir="/tmp"))
    sink = Journal(directory / "journal")
    yield sink
    sink.close()
    os.unlink(sink.path)
    directory.rmdir()


def start(agent: StartAgent, entries: List[Dict[str, Any]],
          journal: Optional[Journal] = None, **keys: Any) -> Running:
    env = dict(keys.pop("env", {}))
    if journal is not None:
        env["KV_TEST_JOURNAL"] = journal.path
    return agent(entries, prelude=JOURNAL_AND_DUMPABLE, env=env, **keys)


def dumpable_at_exit(run: Running) -> str:
    lines = [line for line in run.process.stdout.splitlines() if line.startswith("dumpable:")]
    assert lines, run.describe()
    return lines[-1]


def test_ready_waits_for_a_required_credential_and_the_socket_serves_it_then(
        start_agent: StartAgent, vault: Vault) -> None:  # noqa: F811
    """While a credential-only entry's secret is missing, no READY=1 (its unit would start
    without it); once it exists, READY=1 comes, and at that moment the socket (made before,
    root's, 0600) serves the value to app.service; no file is written for it."""
    vault.put("plain")
    run = start(start_agent, [entry("plain"), credential_entry()], fast_retry=True)
    at_ready: List[object] = []

    def look(message: Any) -> None:
        if message.has("READY", "1") and not at_ready:
            st = os.lstat(socket_of(run))
            at_ready.append((stat.S_ISSOCK(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid))
            at_ready.append(load(run))

    run.notes.on_datagram(look)
    run.wait(lambda: is_serving(run) and (run.directory / "plain").exists(),
             "the socket and the plain file")
    time.sleep(1.0)  # a few refreshes: the credential is still missing
    assert not run.readies(), run.describe()
    assert load(run) != b""  # refused (not loaded yet), never empty
    value = vault.put("db-password")
    run.wait_ready()
    assert at_ready == [(True, 0o600, os.geteuid()), value.encode()]
    assert sorted(path.name for path in run.directory.iterdir()) == ["plain"]
    run.stop()
    assert not os.path.lexists(socket_of(run))
    assert dumpable_at_exit(run) == "dumpable: False"


def test_granted_refused_and_foreign_clients_of_the_running_agent(
        start_agent: StartAgent, vault: Vault, journal: Journal) -> None:  # noqa: F811
    """A granted unit gets the value; an ungranted unit and an unknown ID are refused (more
    than systemd's limit, and an entry in the unit's journal naming why); an unbound client
    gets nothing; each refusal is logged once."""
    value = vault.put("db-password")
    run = start(start_agent, [credential_entry()], journal)
    run.wait_ready()
    assert load(run) == value.encode()
    for _ in range(2):
        refused = load(run, "other.service")
        assert len(refused) == REFUSAL_BYTES and not refused.strip(b"\0")
    assert len(load(run, "app.service", "nope")) == REFUSAL_BYTES
    assert read_all(connect(socket_of(run))) == b""
    entries = journal.entries()
    assert [(e["OBJECT_SYSTEMD_UNIT"], e["SYSLOG_IDENTIFIER"]) for e in entries] == \
        [("other.service", "kv-agent")] * 2 + [("app.service", "kv-agent")]
    assert "refused credential db-password to other.service: the unit is not granted it" \
        in entries[0]["MESSAGE"]
    assert len(run.process.lines("credential db-password refused to other.service")) == 1
    assert len(run.process.lines("not systemd's credential loader")) == 1
    run.stop()
    assert value not in "".join(e["MESSAGE"] for e in entries)


def test_a_rotation_is_served_next_and_runs_the_hook_with_the_credential_name(
        start_agent: StartAgent, vault: Vault, shm_dir: Path) -> None:  # noqa: F811
    """A new version is served to the next connection, and the entry's on_change hook runs
    once with KV_AGENT_CHANGED naming credential:<unit>/<ID>; no file appears."""
    vault.put("db-password")
    log = shm_dir / "hook.log"
    hook = ["/bin/sh", "-c", f'echo "$KV_AGENT_CHANGED" >> {log}']
    run = start(start_agent, [entry("plain"), credential_entry(on_change=hook)])
    vault.put("plain")
    run.wait_ready()
    rotated = vault.put("db-password")
    run.wait(lambda: load(run) == rotated.encode(), "the rotated value to be served")
    run.wait(lambda: log.exists(), "the hook")
    time.sleep(1.5)  # another refresh: the hook must not run again
    assert log.read_text() == f"{APP}\n"
    assert sorted(path.name for path in run.directory.iterdir()) == ["plain"]
    run.stop()


def test_a_stuck_client_delays_neither_a_refresh_nor_the_watchdog_nor_sigterm(
        start_agent: StartAgent, vault: Vault) -> None:  # noqa: F811
    """Clients that connect and never read (each owed a 1-MiB refusal) hold no one up: the
    watchdog pings on, a rotation is still fetched and served, and SIGTERM exits 0 promptly
    with one of them still connected."""
    vault.put("db-password")
    run = start(start_agent, [credential_entry()], env={"WATCHDOG_USEC": "1000000"})
    run.wait_ready()
    stuck = [connect(socket_of(run), loader_address("other.service", "db-password"))
             for _ in range(4)]
    try:
        pings = len(run.notes.with_key("WATCHDOG", "1"))
        rotated = vault.put("db-password")
        run.wait(lambda: load(run) == rotated.encode(), "the rotation, served", 10.0)
        run.wait(lambda: len(run.notes.with_key("WATCHDOG", "1")) >= pings + 2,
                 "the watchdog pinging on")
        stuck.append(connect(socket_of(run), loader_address("other.service", "db-password")))
        time.sleep(0.2)  # accepted, its refusal written as far as the socket takes it
        code, elapsed = run.process.stop(signal.SIGTERM)
        print(f"SIGTERM to exit with {len(stuck)} stuck clients: {elapsed * 1000:.0f} ms")
        assert code == 0 and elapsed < PROMPT_EXIT_S, (elapsed, run.describe())
    finally:
        for client in stuck:
            client.close()
    assert not os.path.lexists(socket_of(run))


def test_no_socket_without_credentials_and_a_reload_opens_and_closes_it(
        start_agent: StartAgent, vault: Vault, shm_dir: Path) -> None:  # noqa: F811
    """A manifest of files only has no socket and keeps its status.json keys and its metrics
    as before; a reload that adds a credential opens the socket and shows it (status, STATUS=,
    metrics); a reload that drops it removes the socket; a process that never held a
    credential stays dumpable."""
    vault.put("plain")
    vault.put("db-password")
    metrics = shm_dir / "metrics" / "kv-agent.prom"
    files = manifest_text(vault.url, shm_dir / "out", [entry("plain")], metrics=str(metrics))
    run = start(start_agent, [], text=files)
    run.wait_ready()
    assert not is_serving(run)
    (plain,) = run.status_json()["secrets"]
    assert "credentials" not in plain and "loaded" not in plain
    assert "credential" not in metrics.read_text()

    with_credential = manifest_text(vault.url, shm_dir / "out",
                                    [entry("plain"), credential_entry()], metrics=str(metrics))
    replace_file(run.manifest, with_credential)
    run.wait(lambda: is_serving(run) and load(run) != b"" and len(load(run)) < REFUSAL_BYTES,
             "the credential to be served after the reload")
    document = run.wait_status_json(
        lambda d: any(s.get("loaded") for s in d["secrets"]), "the credential loaded")
    credential = next(s for s in document["secrets"] if s["name"] == "db-password")
    assert (credential["path"], credential["paths"], credential["credentials"]) == \
        (APP, [], [APP])
    assert "1 credential in memory" in document["status"]
    shown = run.status_cli().stdout
    assert f"db-password -> {APP} (loaded)" in shown, shown
    run.wait(lambda: "kv_agent_credential_loaded" in metrics.read_text(), "the metrics")
    text = metrics.read_text()
    assert f'kv_agent_credential_loaded{{entry="{APP}",secret="db-password"' in text
    assert 'kv_agent_credential_connections_total{result="served"}' in text

    replace_file(run.manifest, files)
    run.wait(lambda: not os.path.lexists(socket_of(run)), "the socket to go")
    run.stop()
    assert dumpable_at_exit(run) == "dumpable: False"  # it held a credential once


def test_a_process_that_never_held_a_credential_stays_dumpable(
        start_agent: StartAgent, vault: Vault) -> None:  # noqa: F811
    """Nothing changes for a manifest of files: the process may be dumped as before."""
    vault.put("plain")
    run = start(start_agent, [entry("plain")])
    run.wait_ready()
    assert not is_serving(run)
    run.stop()
    assert dumpable_at_exit(run) == "dumpable: True"


def test_the_loader_socket_answers_in_milliseconds(
        start_agent: StartAgent, vault: Vault) -> None:  # noqa: F811
    """Connection to value (bind, connect, read to the end) takes milliseconds: the median of
    50 is under 50 ms even on a loaded machine."""
    value = vault.put("db-password").encode()
    run = start(start_agent, [credential_entry()])
    run.wait_ready()
    times = []
    for _ in range(50):
        data, elapsed = timed_load(socket_of(run), "app.service", "db-password")
        assert data == value
        times.append(elapsed)
    times.sort()
    print(f"connection to value: median {times[25] * 1000:.2f} ms, max {times[-1] * 1000:.2f} ms")
    assert times[25] < 0.05, times
    run.stop()


def test_the_abstract_client_is_what_systemd_binds() -> None:
    """(The test client's address has systemd's shape: NUL, hex without padding, unit, ID.)"""
    address = loader_address("app.service", "db")
    random, unit_word, unit, credential_id = address[1:].decode().split("/")
    assert address[0] == 0 and int(random, 16) >= 0 and len(random) <= 16
    assert (unit_word, unit, credential_id) == ("unit", "app.service", "db")
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.bind(address)
    assert client.getsockname() == address
    client.close()
