"""The ledger of written files: a file is removed only while it is still the agent's."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List

import pytest

from agent.daemon.ledger import Ledger, writer_root_for
from agent.status.snapshot import Written, WrittenSet
from agent.writer import FileSpec, Writer


def test_records_inode_and_entry_of_a_written_file(shm_dir: Path) -> None:
    """record() notes the regular file's inode and its entry; a missing file is forgotten."""
    path = shm_dir / "db"
    path.write_text("x")
    ledger = Ledger()
    ledger.record(str(path), "/key")
    assert ledger.records() == (Written(str(path), os.lstat(path).st_ino, "/key"),)
    assert ledger.is_ours(str(path))
    path.unlink()
    ledger.record(str(path), "/key")
    assert ledger.records() == ()


def test_a_replaced_file_is_not_ours_and_survives_removal(shm_dir: Path,
                                                          caplog: pytest.LogCaptureFixture
                                                          ) -> None:
    """A file replaced (new inode) or turned into a symlink is left alone and forgotten."""
    caplog.set_level("INFO")
    ours, swapped, linked = (shm_dir / name for name in ("ours", "swapped", "linked"))
    for path in (ours, swapped, linked):
        path.write_text("agent")
    ledger = Ledger()
    for path in (ours, swapped, linked):
        ledger.record(str(path), str(path))
    (shm_dir / "new").write_text("operator")
    os.replace(shm_dir / "new", swapped)
    linked.unlink()
    linked.symlink_to(ours)
    for path in (swapped, linked, ours):
        ledger.remove(str(shm_dir), str(path))
    assert swapped.read_text() == "operator" and linked.is_symlink()
    assert not ours.exists()
    assert ledger.records() == ()
    assert f"not removing {swapped}" in caplog.text and f"removed {ours}" in caplog.text


def test_orphans_are_recorded_paths_no_output_keeps() -> None:
    """orphans() lists recorded paths absent from the kept outputs, sorted."""
    ledger = Ledger([Written("/run/secrets/b", 2), Written("/run/secrets/a", 1, "/a"),
                     Written("/run/secrets/c", 3)])
    assert ledger.orphans(["/run/secrets/c"]) == ("/run/secrets/a", "/run/secrets/b")
    assert ledger.inode("/run/secrets/a") == 1 and ledger.inode("/nope") is None


def test_writer_root_for_an_old_directory() -> None:
    """A path outside the manifest's directory is removed from under its own parent."""
    assert writer_root_for("/run/secrets/x/y", "/run/secrets") == "/run/secrets"
    assert writer_root_for("/run/old/y", "/run/secrets") == "/run/old"
    assert writer_root_for("/run/secrets-2/y", "/run/secrets") == "/run/secrets-2"


def _set(directory: Path, names: List[str]) -> Dict[str, str]:
    writer = Writer(str(directory.parent))
    writer.apply_set(str(directory), [FileSpec(str(directory / name), name.encode(),
                                               os.geteuid(), os.getegid(), 0o440)
                                      for name in names])
    return {str(directory / name): str(directory / names[0]) for name in names}


def test_a_recorded_set_is_removed_whole(shm_dir: Path) -> None:
    """A set the ledger recorded, still holding the agent's files, is removed by
    the writer (retired after its grace) and forgotten with its members."""
    directory = shm_dir / "web"
    members = _set(directory, ["tls.key", "tls.crt"])
    ledger = Ledger()
    ledger.record_set(str(directory), members, "certificate:x", members)
    assert ledger.sets() == (WrittenSet(str(directory), tuple(sorted(members)),
                                        "certificate:x"),)
    writer = Writer(str(shm_dir))
    assert ledger.remove_set(writer, str(directory))
    assert not directory.exists()
    writer.retire(everything=True)
    assert os.listdir(shm_dir) == []
    assert ledger.sets() == () and ledger.records() == ()


def test_a_set_whose_file_was_replaced_is_left_alone(shm_dir: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    """A set directory in which a member is no longer the agent's file (new inode) is
    not removed: the set is forgotten, the directory stays."""
    caplog.set_level("INFO")
    directory = shm_dir / "web"
    members = _set(directory, ["tls.key", "tls.crt"])
    ledger = Ledger()
    ledger.record_set(str(directory), members, "certificate:x", members)
    replacement = directory / ".tmp"
    replacement.write_text("operator's")
    os.replace(replacement, directory / "tls.key")
    assert not ledger.remove_set(Writer(str(shm_dir)), str(directory))
    assert (directory / "tls.key").read_text() == "operator's"
    assert ledger.sets() == ()
    assert "no longer the file kv-agent wrote" in caplog.text


def test_members_that_left_a_set_go_only_while_still_the_agents(
        shm_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """remove_members takes the former members still the agent's out of the set by one
    swap (the remaining member keeps its inode), keeps one someone replaced, and
    forgets both; with nothing of the agent's left to take out it swaps nothing."""
    caplog.set_level("INFO")
    directory = shm_dir / "web"
    members = _set(directory, ["tls.key", "tls.crt", "chain.pem"])
    ledger = Ledger()
    ledger.record_set(str(directory), members, "certificate:x", members)
    replacement = shm_dir / "replacement"
    replacement.write_text("operator's")
    os.replace(replacement, directory / "chain.pem")
    key_inode = os.lstat(directory / "tls.key").st_ino
    writer = Writer(str(shm_dir), set_grace_s=0)
    left = [str(directory / "tls.crt"), str(directory / "chain.pem")]
    assert ledger.remove_members(writer, str(directory), left)
    assert sorted(os.listdir(directory)) == ["chain.pem", "tls.key"]
    assert os.lstat(directory / "tls.key").st_ino == key_inode
    assert (directory / "chain.pem").read_text() == "operator's"
    assert [record.path for record in ledger.records()] == [str(directory / "tls.key")]
    assert f"not removing {directory}/chain.pem" in caplog.text
    assert not ledger.remove_members(writer, str(directory), left)
    assert sorted(os.listdir(shm_dir)) == ["web"]
