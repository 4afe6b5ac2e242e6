"""One sync of :class:`agent.agent.Agent` against the in-process emulator:
the pipeline entries -> sources -> fetch -> transforms -> outputs -> writer."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Iterator, List

import pytest

from agent.agent import Agent, Interrupted, expiry_warnings, short_cause
from agent.emulator import Emulator
from agent.errors import SecretNotFoundError, SetKeptError
from agent.expiry import Validity
from agent.manifest import Accounts, Manifest, parse_manifest
from agent.writer import SET_GRACE_S

ACCOUNTS = Accounts(user=lambda name: {"root": 0}.get(name),
                    group=lambda name: {"root": 0}.get(name))


@pytest.fixture(scope="module")
def emulator() -> Iterator[Emulator]:
    with Emulator({}) as started:
        yield started


def environ(emulator: Emulator) -> Dict[str, str]:
    return {"KV_AGENT_IMDS_ENDPOINT": emulator.imds_endpoint,
            "REQUESTS_CA_BUNDLE": emulator.ca_path, "NO_PROXY": "127.0.0.1"}


def manifest(emulator: Emulator, directory: Path, entries: str) -> Manifest:
    text = f"vault: {emulator.vault_url}\ndirectory: {directory}\nsecrets:\n{entries}"
    return parse_manifest(text, "m.yaml", accounts=ACCOUNTS, check_filesystem=False)


def requests_for(emulator: Emulator, name: str) -> int:
    return sum(1 for record in emulator.vault_log if f"/secrets/{name}" in record.path)


def test_entries_naming_one_source_share_one_fetch(emulator: Emulator, shm_dir: Path) -> None:
    """Two entries of the same secret make one vault request and write both files."""
    emulator.set_secret("shared", "one value")
    agent = Agent(manifest(emulator, shm_dir, "  - {name: shared, path: a}\n"
                                              "  - {name: shared, path: b/c}\n"),
                  environ=environ(emulator))
    try:
        agent.prepare()
        report = agent.sync()  # the first request also meets the vault's challenge
        before = requests_for(emulator, "shared")
        agent.sync()
    finally:
        agent.close()
    assert requests_for(emulator, "shared") == before + 1
    assert (shm_dir / "a").read_text() == (shm_dir / "b" / "c").read_text() == "one value"
    assert [o.changed_paths for o in report.outcomes] == [(str(shm_dir / "a"),),
                                                          (str(shm_dir / "b" / "c"),)]
    assert report.changed == 2 and not report.failures


def test_unchanged_files_report_no_change(emulator: Emulator, shm_dir: Path) -> None:
    """A second sync of the same versions changes no file and reports none."""
    emulator.set_secret("steady", "same")
    agent = Agent(manifest(emulator, shm_dir, "  - {name: steady}\n"),
                  environ=environ(emulator))
    try:
        agent.prepare()
        first, second = agent.sync(), agent.sync()
    finally:
        agent.close()
    assert first.changed == 1 and second.changed == 0
    assert second.outcomes[0].version == first.outcomes[0].version


def test_a_failing_entry_keeps_its_file_and_never_stops_the_others(
        emulator: Emulator, shm_dir: Path) -> None:
    """A missing secret fails only its entry; its old file stays, the others are written."""
    emulator.set_secret("present", "here")
    (shm_dir / "absent").write_text("last good")
    agent = Agent(manifest(emulator, shm_dir, "  - {name: absent-secret, path: absent}\n"
                                              "  - {name: present}\n"),
                  environ=environ(emulator))
    try:
        report = agent.sync()
    finally:
        agent.close()
    failed, written = report.outcomes
    assert isinstance(failed.error, SecretNotFoundError) and not failed.changed
    assert "absent-secret" in failed.describe() and "left as it was" in failed.describe()
    assert (shm_dir / "absent").read_text() == "last good"
    assert (shm_dir / "present").read_text() == "here" and written.changed
    assert report.failures == (failed,)


def test_stop_between_writes_abandons_the_rest(emulator: Emulator, shm_dir: Path) -> None:
    """should_stop turning true raises Interrupted before the next write."""
    emulator.set_secret("never-written", "x")
    agent = Agent(manifest(emulator, shm_dir, "  - {name: never-written}\n"),
                  environ=environ(emulator))
    try:
        with pytest.raises(Interrupted):
            agent.sync(should_stop=lambda: True)
    finally:
        agent.close()
    assert not (shm_dir / "never-written").exists()


SET_ENTRIES = ("  - {name: db-password, path: db/password, set: db}\n"
               "  - {name: db-user, path: db/user, set: db}\n")


def test_a_set_is_written_by_one_swap_and_unchanged_sets_are_left(
        emulator: Emulator, shm_dir: Path) -> None:
    """A set's members go to disk in one swap of its directory; a sync with nothing new
    leaves the directory's inode alone; a changed member swaps the directory again and
    only that member reports its file changed."""
    emulator.set_secret("db-password", "pw 1")
    emulator.set_secret("db-user", "user 1")
    agent = Agent(manifest(emulator, shm_dir, SET_ENTRIES), environ=environ(emulator))
    calls = []
    apply_set = agent.writer.apply_set

    def spy(directory: str, specs: Any, **keys: Any) -> Any:
        calls.append((directory, sorted(spec.path for spec in specs)))
        return apply_set(directory, specs, **keys)

    agent.writer.apply_set = spy  # type: ignore[method-assign]
    try:
        agent.prepare()
        first = agent.sync()
        inode = os.lstat(shm_dir / "db").st_ino
        second = agent.sync()
        assert os.lstat(shm_dir / "db").st_ino == inode
        emulator.set_secret("db-password", "pw 2")
        third = agent.sync()
    finally:
        agent.close()
    paths = [str(shm_dir / "db" / "password"), str(shm_dir / "db" / "user")]
    assert calls == [(str(shm_dir / "db"), paths)] * 3
    assert [o.changed_paths for o in first.outcomes] == [(paths[0],), (paths[1],)]
    assert first.swapped == ()  # a new set: no old generation
    assert second.changed == 0 and second.swapped == ()
    assert [o.changed_paths for o in third.outcomes] == [(paths[0],), ()]
    assert third.swapped == (str(shm_dir / "db"),)
    assert os.lstat(shm_dir / "db").st_ino != inode
    assert (shm_dir / "db" / "password").read_text() == "pw 2"


def test_a_failing_member_keeps_the_whole_set(emulator: Emulator, shm_dir: Path) -> None:
    """When one member of a set fails, no file of the set changes (not even the members
    that arrived) and every member reports the error, naming the failing secret."""
    emulator.set_secret("db-password", "pw 1")
    emulator.set_secret("db-user", "user 1")
    agent = Agent(manifest(emulator, shm_dir, SET_ENTRIES), environ=environ(emulator))
    try:
        agent.prepare()
        agent.sync()
        inode = os.lstat(shm_dir / "db").st_ino
        emulator.set_secret("db-password", "pw 2")
        emulator.delete_secret("db-user")
        report = agent.sync()
    finally:
        agent.close()
    assert (shm_dir / "db" / "password").read_text() == "pw 1"
    assert (shm_dir / "db" / "user").read_text() == "user 1"
    assert os.lstat(shm_dir / "db").st_ino == inode
    password, user = report.outcomes
    assert isinstance(user.error, SecretNotFoundError)
    assert isinstance(password.error, SetKeptError)
    assert "db-user" in str(password.error) and "set 'db'" in str(password.error)
    assert not password.changed and not user.changed and report.swapped == ()
    assert short_cause(password.error) == "set kept: 404 not found"


def test_a_set_converges_when_a_member_leaves(emulator: Emulator, shm_dir: Path) -> None:
    """A member removed from a set's entries disappears from its directory at the next
    write, with the rest of the old generation."""
    emulator.set_secret("db-password", "pw 1")
    emulator.set_secret("db-user", "user 1")
    for entries in (SET_ENTRIES, "  - {name: db-password, path: db/password, set: db}\n"):
        agent = Agent(manifest(emulator, shm_dir, entries), environ=environ(emulator))
        try:
            agent.prepare()
            agent.sync()
        finally:
            agent.close()
    assert sorted(os.listdir(shm_dir / "db")) == ["password"]


def test_once_retires_old_generations_only_after_the_grace_when_a_set_swapped(
        emulator: Emulator, shm_dir: Path) -> None:
    """retire_generations waits out the grace only when a sync swapped a set, and
    leaves no old generation behind either way."""
    emulator.set_secret("db-password", "pw 1")
    emulator.set_secret("db-user", "user 1")
    slept: List[float] = []
    agent = Agent(manifest(emulator, shm_dir, SET_ENTRIES), environ=environ(emulator),
                  sleep=slept.append)
    try:
        agent.prepare()
        agent.retire_generations(agent.sync())
        assert slept == []
        emulator.set_secret("db-password", "pw 2")
        report = agent.sync()
        assert [n for n in os.listdir(shm_dir) if n.startswith(".kv-agent-set-")]
        agent.retire_generations(report)
    finally:
        agent.close()
    assert slept == [SET_GRACE_S]
    assert sorted(os.listdir(shm_dir)) == ["db"]


def test_outcomes_carry_the_validity_window(emulator: Emulator, shm_dir: Path) -> None:
    """A written entry's outcome holds its secret's nbf and exp, and expiry_warnings
    names it once it is expired (it is written all the same)."""
    emulator.set_secret("old-token", "v", not_before=1_000, expires_on=2_000)
    agent = Agent(manifest(emulator, shm_dir, "  - {name: old-token}\n"),
                  environ=environ(emulator))
    try:
        report = agent.sync()
    finally:
        agent.close()
    outcome, = report.outcomes
    assert outcome.validity == Validity(1_000, 2_000) and outcome.changed
    assert (shm_dir / "old-token").read_text() == "v"
    assert expiry_warnings(report.outcomes, 100, now=1_500) == []
    assert "expires at" in expiry_warnings(report.outcomes, 600, now=1_500)[0]
    warning, = expiry_warnings(report.outcomes, 86400, now=3_000)
    assert "'old-token' expired at 1970-01-01T00:33:20Z" in warning
