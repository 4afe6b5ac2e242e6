"""The running agent's list-based refresh (issue 12), through ``kv-agent run``.

The harness of tests/test_daemon.py, with a vault whose secrets were written
an hour ago: the list's ``updated`` is trusted only for versions fetched well
after their write (agent.sync.freshness.SETTLED_S), as on a real vault.
"""

from __future__ import annotations

import mmap
import os
import time
from typing import Iterator, List

import pytest
from test_daemon import StartAgent, Vault, entry, read, short_dir, start_agent  # noqa: F401

from agent.emulator import Emulator

FORBIDDEN_LIST = (b'{"error":{"code":"Forbidden","message":"The user, group or application '
                  b'does not have secrets list permission on key vault","innererror":'
                  b'{"code":"AccessDenied"}}}')
NAMES = [f"app-{number}" for number in range(6)]


@pytest.fixture
def vault() -> Iterator[Vault]:
    """A fresh emulator whose first secrets are an hour old (overrides test_daemon's)."""
    offset = [3600.0]
    emulator = Emulator(clock=lambda: time.time() - offset[0])
    emulator.start()
    try:
        aged = Vault(emulator)
        for name in NAMES:
            aged.put(name)
        offset[0] = 0.0
        yield aged
    finally:
        emulator.stop()


def paths(vault: Vault, since: int) -> List[str]:
    return [record.path for record in vault.emulator.vault_log[since:]]


def test_unchanged_refreshes_only_list_and_a_rotation_is_picked_up(
        start_agent: StartAgent, vault: Vault) -> None:  # noqa: F811 (the fixture)
    """Refreshes of unchanged secrets make list requests only; a rotated secret is
    fetched and written at the next refresh, and the others are not touched."""
    run = start_agent([entry(name) for name in NAMES])
    run.wait_ready()
    start = len(vault.emulator.vault_log)
    run.wait(lambda: paths(vault, start).count("/secrets") >= 3, "three listing refreshes")
    assert all(path == "/secrets" for path in paths(vault, start)), paths(vault, start)
    new = vault.put("app-2")
    run.wait_content("app-2", new)
    fetched = [path for path in paths(vault, start) if path.startswith("/secrets/")]
    assert {path.rstrip("/") for path in fetched} == {"/secrets/app-2"}
    run.stop()


def test_a_forbidden_list_falls_back_to_gets_logged_once(
        start_agent: StartAgent, vault: Vault) -> None:  # noqa: F811 (the fixture)
    """403 on the list: every secret is fetched one by one, a rotation still lands,
    and the fallback is logged once, with the fix, however many refreshes follow."""
    run = start_agent([entry(name) for name in NAMES])
    run.wait_ready()
    vault.emulator.inject_fault("vault", 403, count=1, path_contains="/secrets",
                                body=FORBIDDEN_LIST)
    start = len(vault.emulator.vault_log)
    run.wait(lambda: vault.requests_for("app-0") >= 3, "three per-secret refreshes")
    new = vault.put("app-4")
    run.wait_content("app-4", new)
    assert paths(vault, start).count("/secrets") == 1
    lines = run.process.lines("'list' secret permission")
    assert len(lines) == 1, run.process.stderr
    assert read(run.directory / "app-0") is not None
    run.stop()


def test_a_failed_start_retries_only_the_missing_secret(
        start_agent: StartAgent, vault: Vault) -> None:  # noqa: F811 (the fixture)
    """While not ready, each retry of the start GETs only the secret still missing: the
    files already written are neither listed nor fetched again (issue 12, fleet)."""
    run = start_agent([entry(name) for name in NAMES] + [entry("late")], refresh="1h")
    run.wait(lambda: vault.requests_for("late") >= 3, "three attempts at the missing secret")
    # app-0's first request is the unauthenticated one that meets the challenge.
    assert [vault.requests_for(name) for name in NAMES] == [2, 1, 1, 1, 1, 1], paths(vault, 0)
    assert "/secrets" not in paths(vault, 0)
    vault.put("late")
    run.wait_ready()
    run.stop()


def test_a_same_size_in_place_edit_is_fetched_and_repaired(
        start_agent: StartAgent, vault: Vault) -> None:  # noqa: F811 (the fixture)
    """A write(2) in place that keeps the file's size (and inode, owner, mode) is seen by its
    ctime at the next refresh: that secret alone is fetched and its file rewritten."""
    run = start_agent([entry(name) for name in NAMES])
    run.wait_ready()
    start = len(vault.emulator.vault_log)
    run.wait(lambda: paths(vault, start).count("/secrets") >= 1, "a listing refresh")
    path = run.directory / "app-1"
    value = read(path)
    assert value is not None
    fd = os.open(path, os.O_WRONLY)  # root may, whatever the mode
    try:
        os.pwrite(fd, b"X" * len(value.encode()), 0)
    finally:
        os.close(fd)
    run.wait_content("app-1", value)
    fetched = {p.rstrip("/") for p in paths(vault, start) if p.startswith("/secrets/")}
    assert fetched == {"/secrets/app-1"}, paths(vault, start)
    run.stop()


def test_an_edit_through_a_shared_mapping_is_fetched_and_repaired(
        start_agent: StartAgent, vault: Vault) -> None:  # noqa: F811 (the fixture)
    """A group-writable file edited through a shared writable mapping, which keeps inode,
    size and ctime, is verified by content: fetched and rewritten at the next refresh."""
    run = start_agent([entry(name) for name in NAMES[:-1]] + [entry(NAMES[-1], mode="0660")])
    run.wait_ready()
    path = run.directory / NAMES[-1]
    value = read(path)
    assert value is not None
    fd = os.open(path, os.O_RDWR)
    try:
        mapped = mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    try:
        # A read faults the page in; a store after it moves no ctime on tmpfs.
        first = mapped[0:1]
        mapped[0:1] = b"#" if first != b"#" else b"%"
        run.wait_content(NAMES[-1], value, timeout_s=10.0)  # ten refreshes at most
    finally:
        mapped.close()
    run.stop()
