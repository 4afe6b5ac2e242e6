"""One sync of :class:`agent.agent.Agent` against the in-process emulator:
the pipeline entries -> sources -> fetch -> transforms -> outputs -> writer."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterator

import pytest

from agent.agent import Agent, Interrupted
from agent.emulator import Emulator
from agent.errors import SecretNotFoundError
from agent.manifest import Accounts, Manifest, parse_manifest

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
