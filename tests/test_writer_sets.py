"""Writer sets: a directory of files swapped whole with renameat2(RENAME_EXCHANGE);
unchanged sets untouched, failures leave the old set, readers that open the
directory once see one generation, and crashes leave nothing start-up cannot
clean."""

from __future__ import annotations

import errno
import json
import os
import random
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from racing_reader import SET_READER, racing_reader

import agent.writer.generations as generations_module
from agent.base.errors import WriteError
from agent.writer import (
    DIR_MODE,
    RESERVED_PREFIX,
    SET_PREFIX,
    FileSpec,
    SetResult,
    Writer,
    foreign_in_set,
)

IS_ROOT = os.geteuid() == 0
ME: Tuple[int, int] = (os.geteuid(), os.getegid())
OTHER_UID, OTHER_GID = 1234, 4321
MEMBERS = ("tls.key", "tls.crt", "chain.pem")
REPO = Path(__file__).resolve().parent.parent


def require_root() -> None:
    if not IS_ROOT:
        pytest.skip("chown to numeric uids/gids needs root (CI runs the suite as root)")


@pytest.fixture
def root(shm_dir: Path) -> Path:
    return shm_dir / "root"


@pytest.fixture
def strict_umask() -> Iterator[None]:
    """A umask that would strip every group/other bit if nothing undid it."""
    old = os.umask(0o077)
    yield
    os.umask(old)


@pytest.fixture
def writer(root: Path) -> Writer:
    """A prepared writer that removes old generations right after the swap."""
    writer = Writer(str(root), set_grace_s=0)
    assert writer.prepare() == []
    return writer


def set_specs(directory: Path, generation: int, mode: int = 0o440,
              owner: Tuple[int, int] = ME, members: Tuple[str, ...] = MEMBERS
              ) -> List[FileSpec]:
    """One generation: every member carries ``gen N`` (and its own name)."""
    return [FileSpec(f"{directory}/{name}", f"gen {generation} {name}\n".encode(),
                     owner[0], owner[1], mode) for name in members]


def contents(directory: Path) -> Dict[str, Tuple[bytes, int, int, int]]:
    """Every entry of ``directory`` (which must be regular files) as states."""
    found = {}
    for name in os.listdir(directory):
        st = os.lstat(directory / name)
        assert stat.S_ISREG(st.st_mode), name
        found[name] = ((directory / name).read_bytes(), stat.S_IMODE(st.st_mode),
                       st.st_uid, st.st_gid)
    return found


def expected(specs: List[FileSpec]) -> Dict[str, Tuple[bytes, int, int, int]]:
    return {os.path.basename(s.path): (s.content, s.mode, s.uid, s.gid) for s in specs}


def reserved(root: Path) -> List[str]:
    return [name for _dirpath, dirs, files in os.walk(root)
            for name in dirs + files if name.startswith(RESERVED_PREFIX)]


def failing(error: BaseException, real: Callable[..., Any],
            when: Callable[..., bool] = lambda *a, **k: True) -> Callable[..., Any]:
    def fake(*args: Any, **kwargs: Any) -> Any:
        if when(*args, **kwargs):
            raise error
        return real(*args, **kwargs)
    return fake


# ---------------------------------------------------------------------------
# Writing a set


def test_new_set_is_created_whole_with_owners_and_modes(writer: Writer, root: Path,
                                                       strict_umask: None) -> None:
    """A new set's directory holds exactly its files, each with its owner and mode, and
    the directory has its mode despite the umask; nothing reserved is left."""
    directory = root / "web"
    specs = set_specs(directory, 1)
    specs[1] = specs[1]._replace(mode=0o444)
    assert writer.apply_set(str(directory), specs) == SetResult(
        str(directory), True, tuple(spec.path for spec in specs))
    assert contents(directory) == expected(specs)
    st = os.lstat(directory)
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == DIR_MODE
    assert (st.st_uid, st.st_gid) == ME
    assert reserved(root) == []


def test_set_directory_gets_the_given_owner_and_mode(writer: Writer, root: Path) -> None:
    """mode, uid and gid give the set's directory its own owner and mode."""
    require_root()
    directory = root / "db"
    writer.apply_set(str(directory), set_specs(directory, 1), mode=0o750, uid=0,
                     gid=OTHER_GID)
    st = os.lstat(directory)
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o750, 0, OTHER_GID)
    assert not writer.apply_set(str(directory), set_specs(directory, 1), mode=0o750,
                                uid=0, gid=OTHER_GID).changed
    assert writer.apply_set(str(directory), set_specs(directory, 1)).changed
    assert stat.S_IMODE(os.lstat(directory).st_mode) == DIR_MODE


def test_unchanged_set_keeps_its_inodes_and_times(writer: Writer, root: Path) -> None:
    """An unchanged set is not rewritten: same directory and file inodes, same mtimes."""
    directory = root / "web"
    writer.apply_set(str(directory), set_specs(directory, 1))
    before = {name: os.lstat(directory / name) for name in [".", *MEMBERS]}
    time.sleep(0.01)
    assert writer.apply_set(str(directory), set_specs(directory, 1)) == SetResult(
        str(directory), False)
    for name, old in before.items():
        new = os.lstat(directory / name)
        assert (new.st_ino, new.st_mtime_ns, new.st_ctime_ns) == (
            old.st_ino, old.st_mtime_ns, old.st_ctime_ns), name


def _make_difference(change: str, directory: Path, specs: List[FileSpec], member: int) -> Path:
    """Make the written set differ from ``specs`` by ``change`` at ``member`` (or, for
    "directory-mode" and "foreign", in the directory itself); the member's path."""
    target = directory / MEMBERS[member]
    if change == "content":
        specs[member] = specs[member]._replace(content=b"other")
    elif change == "mode":
        os.chmod(target, 0o644)
    elif change in ("owner", "group"):
        require_root()
        os.chown(target, OTHER_UID if change == "owner" else -1,
                 OTHER_GID if change == "group" else -1)
    elif change == "missing":
        target.unlink()
    elif change == "directory-mode":
        os.chmod(directory, 0o700)
    else:
        (directory / "notes").write_bytes(b"operator's")
    return target


@pytest.mark.parametrize("change", ["content", "mode", "owner", "group", "missing",
                                    "directory-mode"])
def test_any_difference_rewrites_the_whole_set(writer: Writer, root: Path,
                                               change: str) -> None:
    """A member whose bytes, owner or mode differ, a missing member, or a directory with
    another mode makes the set rewritten, exactly as specified."""
    directory = root / "web"
    specs = set_specs(directory, 1)
    writer.apply_set(str(directory), specs)
    old_inode = os.lstat(directory).st_ino
    _make_difference(change, directory, specs, 0)
    assert writer.apply_set(str(directory), specs).changed
    assert contents(directory) == expected(specs)
    assert stat.S_IMODE(os.lstat(directory).st_mode) == DIR_MODE
    assert os.lstat(directory).st_ino != old_inode
    assert reserved(root) == []


@pytest.mark.parametrize("change", ["content", "mode", "owner", "group", "missing",
                                    "directory-mode", "foreign"])
def test_a_set_write_reports_exactly_the_members_that_differed(writer: Writer, root: Path,
                                                               change: str) -> None:
    """changed_paths names every member of a new set, then only the member whose bytes,
    owner or mode differed (or that was missing); a directory's own mode or a foreign
    file changes no member, and an unchanged set reports none."""
    directory = root / "web"
    specs = set_specs(directory, 1)
    first = writer.apply_set(str(directory), specs)
    assert first.changed_paths == tuple(spec.path for spec in specs)
    target = _make_difference(change, directory, specs, 1)
    result = writer.apply_set(str(directory), specs)
    is_member_change = change not in ("directory-mode", "foreign")
    assert result == SetResult(str(directory), change != "foreign",
                               (str(target),) if is_member_change else ())
    assert writer.apply_set(str(directory), specs) == SetResult(str(directory), False, ())


@pytest.mark.parametrize("kind", ["file", "symlink", "fifo"])
def test_a_foreign_entry_never_swaps_a_set_and_is_never_deleted(writer: Writer, root: Path,
                                                               kind: str) -> None:
    """An entry someone else put in a set's directory is reported by foreign_in_set,
    leaves an unchanged set untouched, and survives the next swaps and the removal of
    the old generations as the very same inode."""
    directory = root / "web"
    writer.apply_set(str(directory), set_specs(directory, 1))
    stray = directory / "notes"
    if kind == "file":
        stray.write_bytes(b"operator's")
    elif kind == "symlink":
        stray.symlink_to(directory / MEMBERS[0])
    else:
        os.mkfifo(stray)
    inode, set_inode = os.lstat(stray).st_ino, os.lstat(directory).st_ino
    paths = [s.path for s in set_specs(directory, 1)]
    assert foreign_in_set(str(directory), paths) == [str(stray)]
    assert not writer.apply_set(str(directory), set_specs(directory, 1)).changed
    assert os.lstat(directory).st_ino == set_inode
    for generation in (2, 3):
        assert writer.apply_set(str(directory), set_specs(directory, generation)).changed
    writer.retire(everything=True)
    assert os.lstat(stray).st_ino == inode and reserved(root) == []
    if kind == "file":
        assert stray.read_bytes() == b"operator's"
    assert contents_except(directory, "notes") == expected(set_specs(directory, 3))
    assert foreign_in_set(str(directory), paths) == [str(stray)]


def contents_except(directory: Path, foreign: str) -> Dict[str, Tuple[bytes, int, int, int]]:
    """``contents`` of ``directory`` without the entry ``foreign``."""
    found = {}
    for name in os.listdir(directory):
        if name != foreign:
            st = os.lstat(directory / name)
            found[name] = ((directory / name).read_bytes(), stat.S_IMODE(st.st_mode),
                           st.st_uid, st.st_gid)
    return found


def test_a_file_created_while_the_set_is_swapped_is_kept(
        writer: Writer, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file someone creates in the set's directory after the new generation was built
    and before the swap is linked into the new generation, not removed with the old."""
    directory = root / "web"
    writer.apply_set(str(directory), set_specs(directory, 1))
    real = generations_module.renameat2

    def create_then_swap(*args: Any) -> None:
        if args[-1] == generations_module.RENAME_EXCHANGE:
            (directory / "late").write_bytes(b"operator's")
        real(*args)

    monkeypatch.setattr(generations_module, "renameat2", create_then_swap)
    assert writer.apply_set(str(directory), set_specs(directory, 2)).changed
    assert (directory / "late").read_bytes() == b"operator's" and reserved(root) == []
    assert contents_except(directory, "late") == expected(set_specs(directory, 2))


def test_a_member_that_left_the_set_stays_until_remove_from_set(writer: Writer,
                                                               root: Path) -> None:
    """apply_set cannot tell a member that left the set from an operator's file: it
    stays, reported by foreign_in_set, and the unchanged set is not swapped for it;
    remove_from_set takes it out."""
    directory = root / "web"
    writer.apply_set(str(directory), set_specs(directory, 1))
    fewer = set_specs(directory, 1, members=MEMBERS[:2])
    left = str(directory / MEMBERS[2])
    assert not writer.apply_set(str(directory), fewer).changed
    assert foreign_in_set(str(directory), [s.path for s in fewer]) == [left]
    assert writer.remove_from_set(str(directory), [left])
    assert contents(directory) == expected(fewer) and reserved(root) == []


def test_remove_from_set_swaps_out_only_the_named_files(writer: Writer, root: Path) -> None:
    """remove_from_set takes the named files out by one swap; every other entry keeps
    its inode (members stay the agent's files, a foreign file stays), the directory its
    mode; False once nothing named is left."""
    directory = root / "web"
    writer.apply_set(str(directory), set_specs(directory, 1), mode=0o750)
    (directory / "notes").write_bytes(b"operator's")
    inodes = {name: os.lstat(directory / name).st_ino for name in (*MEMBERS[:2], "notes")}
    set_inode = os.lstat(directory).st_ino
    gone = str(directory / MEMBERS[2])
    assert writer.remove_from_set(str(directory), [gone]) is True
    assert {name: os.lstat(directory / name).st_ino for name in os.listdir(directory)} \
        == inodes
    assert os.lstat(directory).st_ino != set_inode
    assert stat.S_IMODE(os.lstat(directory).st_mode) == 0o750 and reserved(root) == []
    assert writer.remove_from_set(str(directory), [gone]) is False
    assert writer.remove_from_set(str(root / "absent"), [str(root / "absent" / "x")]) is False


def test_members_get_owner_and_mode_before_their_first_byte(
        writer: Writer, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each file is created O_EXCL|O_NOFOLLOW 0600 in a 0700 generation directory, then
    fchown and fchmod, then written and fsynced; the directory gets its mode last."""
    require_root()
    directory = root / "web"
    writer.apply_set(str(directory), set_specs(directory, 1))
    calls: List[Tuple[str, Any]] = []
    real = {name: getattr(os, name) for name in ("open", "mkdir", "fchown", "fchmod",
                                                 "write", "fsync")}

    def traced(name: str) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            if name == "open" and isinstance(args[0], str):
                calls.append((name, (args[0], args[1], args[2] if len(args) > 2 else None)))
            elif name == "mkdir":
                calls.append((name, (args[0], args[1])))
            elif name in ("fchmod", "fchown"):
                calls.append((name, args[1:]))
            else:
                calls.append((name, None))
            return real[name](*args, **kwargs)
        return call

    for name in real:
        monkeypatch.setattr(os, name, traced(name))
    specs = set_specs(directory, 2, mode=0o440, owner=(OTHER_UID, OTHER_GID))
    writer.apply_set(str(directory), specs)
    monkeypatch.undo()
    mkdir = [c for c in calls if c[0] == "mkdir"]
    assert len(mkdir) == 1 and mkdir[0][1][0].startswith(SET_PREFIX)
    assert mkdir[0][1][1] == 0o700
    creates = [i for i, c in enumerate(calls) if c[0] == "open" and c[1][1] & os.O_CREAT]
    assert [calls[i][1][0] for i in creates] == list(MEMBERS)
    for index in creates:
        flags = calls[index][1][1]
        assert flags & os.O_EXCL and flags & os.O_NOFOLLOW and calls[index][1][2] == 0o600
        assert [c[0] for c in calls[index + 1:index + 5]] == ["fchown", "fchmod", "write",
                                                             "fsync"]
        assert calls[index + 1][1] == (OTHER_UID, OTHER_GID)
        assert calls[index + 2][1] == (0o440,)
    tail = [c for c in calls[creates[-1] + 5:] if c[0] in ("fsync", "fchown", "fchmod")]
    assert tail[:3] == [("fsync", None), ("fchown", ME), ("fchmod", (DIR_MODE,))]


def test_sets_swap_on_ramfs_too(shm_dir: Path) -> None:
    """ramfs, the writer's other memory file system, swaps sets with RENAME_EXCHANGE."""
    require_root()
    mounted = shm_dir / "ramfs"
    mounted.mkdir()
    if subprocess.run(["mount", "-t", "ramfs", "kv-agent-test", str(mounted)],
                      capture_output=True, check=False).returncode != 0:
        pytest.skip("cannot mount a ramfs here")
    try:
        os.chmod(mounted, 0o755)
        writer = Writer(str(mounted / "root"), set_grace_s=0)
        writer.prepare()
        directory = mounted / "root" / "web"
        for generation in range(3):
            assert writer.apply_set(str(directory), set_specs(directory, generation)).changed
        assert contents(directory) == expected(set_specs(directory, 2))
        assert reserved(mounted) == []
    finally:
        subprocess.run(["umount", str(mounted)], check=False)


# ---------------------------------------------------------------------------
# Refusals


@pytest.mark.parametrize("shape", ["symlink-to-directory", "dangling-symlink", "file",
                                   "subdirectory"])
def test_set_directory_of_the_wrong_shape_is_refused_untouched(
        writer: Writer, root: Path, shm_dir: Path, shape: str) -> None:
    """A symlink (never followed), a file, or a directory holding a subdirectory at the
    set's directory is refused with WriteError and left exactly as it was."""
    directory = root / "web"
    outside = shm_dir / "outside"
    outside.mkdir()
    (outside / "tls.key").write_bytes(b"not ours")
    if shape == "symlink-to-directory":
        directory.symlink_to(outside)
    elif shape == "dangling-symlink":
        directory.symlink_to(shm_dir / "nowhere")
    elif shape == "file":
        directory.write_bytes(b"a file")
    else:
        directory.mkdir()
        (directory / "keep").mkdir()
    before = os.lstat(directory)
    with pytest.raises(WriteError, match="web"):
        writer.apply_set(str(directory), set_specs(directory, 1))
    after = os.lstat(directory)
    assert (after.st_ino, after.st_mode, after.st_mtime_ns) == (
        before.st_ino, before.st_mode, before.st_mtime_ns)
    assert (outside / "tls.key").read_bytes() == b"not ours"
    assert os.listdir(outside) == ["tls.key"]
    assert not (shm_dir / "nowhere").exists()
    assert reserved(root) == []


def test_bad_sets_are_refused_and_nothing_is_created(writer: Writer, root: Path) -> None:
    """The root itself, a path outside the root, a member outside the directory, a
    duplicate, a reserved name or an empty set is refused before anything is made."""
    directory = root / "web"
    good = set_specs(directory, 1)
    cases = [
        (str(root), [FileSpec(f"{root}/x", b"x", *ME, 0o600)]),
        (str(root.parent / "elsewhere"), set_specs(root.parent / "elsewhere", 1)),
        (str(directory) + "/", good),
        (str(directory), good + [good[0]._replace(path=f"{root}/other/x")]),
        (str(directory), good + [good[0]._replace(path=f"{directory}/sub/x")]),
        (str(directory), good + [good[0]]),
        (str(directory), good + [good[0]._replace(path=f"{directory}/{RESERVED_PREFIX}x")]),
        (str(root / f"{SET_PREFIX}x"), set_specs(root / f"{SET_PREFIX}x", 1)),
        (str(directory), []),
    ]
    for target, specs in cases:
        with pytest.raises(WriteError):
            writer.apply_set(target, specs)
    assert os.listdir(root) == []


# ---------------------------------------------------------------------------
# Failures leave the old set


@pytest.mark.parametrize("function,when", [
    ("fchown", "member"), ("fchmod", "member"), ("write", "any"), ("fsync", "member"),
    ("fsync", "directory"), ("fchown", "directory"), ("fchmod", "directory"),
    ("open", "member"), ("mkdir", "any"), ("renameat2", "any"),
])
def test_failure_before_the_swap_keeps_the_old_set_and_leaves_nothing(
        writer: Writer, root: Path, monkeypatch: pytest.MonkeyPatch, function: str,
        when: str) -> None:
    """fchown, fchmod, write, fsync, open, mkdir or renameat2 failing (on a member or on
    the new directory) raises WriteError; the old set is intact and no generation is left."""
    directory = root / "web"
    old = set_specs(directory, 1)
    writer.apply_set(str(directory), old)
    old_inode = os.lstat(directory).st_ino
    error = OSError(errno.EIO, "I/O error")
    if function == "renameat2":
        monkeypatch.setattr(generations_module, "renameat2", failing(error, generations_module.renameat2))
    else:
        real = getattr(os, function)

        def is_directory(fd: Any, *args: Any, **kwargs: Any) -> bool:
            return isinstance(fd, int) and stat.S_ISDIR(os.fstat(fd).st_mode)

        if when == "member" and function == "open":
            def chosen(*args: Any, **kwargs: Any) -> bool:
                return bool(len(args) > 1 and args[1] & os.O_CREAT)
        elif when == "member":
            def chosen(*args: Any, **kwargs: Any) -> bool:
                return not is_directory(*args)
        elif when == "directory":
            chosen = is_directory
        else:
            def chosen(*args: Any, **kwargs: Any) -> bool:
                return True
        monkeypatch.setattr(os, function, failing(error, real, chosen))
    with pytest.raises(WriteError) as raised:
        writer.apply_set(str(directory), set_specs(directory, 2))
    monkeypatch.undo()
    assert "gen 2" not in str(raised.value)  # never a value in a message
    assert contents(directory) == expected(old)
    assert os.lstat(directory).st_ino == old_inode
    assert reserved(root) == []


def test_interrupt_while_building_removes_the_generation(
        writer: Writer, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A KeyboardInterrupt while writing members propagates; the half-built generation goes."""
    directory = root / "web"
    writer.apply_set(str(directory), set_specs(directory, 1))
    monkeypatch.setattr(os, "write", failing(KeyboardInterrupt(), os.write))
    with pytest.raises(KeyboardInterrupt):
        writer.apply_set(str(directory), set_specs(directory, 2))
    monkeypatch.undo()
    assert contents(directory) == expected(set_specs(directory, 1))
    assert reserved(root) == []


@pytest.mark.parametrize("code", [errno.EINVAL, errno.ENOSYS])
def test_missing_rename_exchange_fails_clearly(writer: Writer, root: Path,
                                               monkeypatch: pytest.MonkeyPatch,
                                               code: int) -> None:
    """A file system or kernel without RENAME_EXCHANGE is a WriteError naming renameat2."""
    directory = root / "web"
    writer.apply_set(str(directory), set_specs(directory, 1))
    monkeypatch.setattr(generations_module, "renameat2",
                        failing(OSError(code, os.strerror(code)), generations_module.renameat2))
    with pytest.raises(WriteError, match="RENAME_EXCHANGE"):
        writer.apply_set(str(directory), set_specs(directory, 2))
    assert contents(directory) == expected(set_specs(directory, 1))
    assert reserved(root) == []


def test_directory_created_meanwhile_is_not_overwritten(
        writer: Writer, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A new set uses RENAME_NOREPLACE: a directory that appears before the swap stays
    as it was, and the write fails."""
    directory = root / "web"
    real = generations_module.renameat2

    def racing(*args: Any) -> None:
        directory.mkdir()
        (directory / "theirs").write_bytes(b"theirs")
        real(*args)

    monkeypatch.setattr(generations_module, "renameat2", racing)
    with pytest.raises(WriteError, match="appeared"):
        writer.apply_set(str(directory), set_specs(directory, 1))
    assert os.listdir(directory) == ["theirs"]
    assert reserved(root) == []


def test_failing_removal_of_the_old_generation_is_not_a_failed_write(
        writer: Writer, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After the swap the write has happened: an unlink failing on the old generation
    still reports changed, and the next clean_leftovers removes the old generation."""
    directory = root / "web"
    writer.apply_set(str(directory), set_specs(directory, 1))
    monkeypatch.setattr(os, "unlink", failing(OSError(errno.EIO, "I/O error"), os.unlink))
    assert writer.apply_set(str(directory), set_specs(directory, 2)).changed
    monkeypatch.undo()
    assert contents(directory) == expected(set_specs(directory, 2))
    left = reserved(root)
    assert len(left) == 1 and left[0].startswith(SET_PREFIX)
    assert writer.clean_leftovers() == [f"{root}/{left[0]}"]
    assert reserved(root) == []


def test_old_generation_outlives_the_swap_by_the_grace(root: Path) -> None:
    """A directory opened before the swap still reads the old generation whole until
    set_grace_s has passed; the next apply_set or retire after that removes it."""
    now = [100.0]
    writer = Writer(str(root), set_grace_s=2.0, clock=lambda: now[0])
    writer.prepare()
    directory = root / "web"
    writer.apply_set(str(directory), set_specs(directory, 1))
    held = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        writer.apply_set(str(directory), set_specs(directory, 2))
        now[0] += 1.9
        assert writer.retire() == []
        assert not writer.apply_set(str(directory), set_specs(directory, 2)).changed
        for name in MEMBERS:
            fd = os.open(name, os.O_RDONLY, dir_fd=held)
            with os.fdopen(fd, "rb") as handle:
                assert handle.read() == f"gen 1 {name}\n".encode()
        assert len(reserved(root)) == 1
        now[0] += 0.1
        writer.apply_set(str(directory), set_specs(directory, 3))  # retires gen 1
        assert os.listdir(held) == []
        assert len(reserved(root)) == 1  # gen 2, until its own grace passed
        assert len(writer.retire(everything=True)) == 1
        assert reserved(root) == []
        assert contents(directory) == expected(set_specs(directory, 3))
    finally:
        os.close(held)


def test_retire_deadline_is_the_oldest_swap_plus_the_grace(root: Path) -> None:
    """retire_deadline is None with nothing pending, then the oldest pending swap plus
    set_grace_s; each old generation goes once its own grace passed; on_retiring is
    called once per swap that left an old generation."""
    now = [100.0]
    calls: List[float] = []
    writer = Writer(str(root), set_grace_s=2.0, clock=lambda: now[0],
                    on_retiring=lambda: calls.append(now[0]))
    writer.prepare()
    directory = root / "web"
    writer.apply_set(str(directory), set_specs(directory, 1))
    assert writer.retire_deadline() is None and calls == []
    writer.apply_set(str(directory), set_specs(directory, 2))
    now[0] += 1.0
    writer.apply_set(str(directory), set_specs(directory, 3))
    assert writer.retire_deadline() == 102.0 and calls == [100.0, 101.0]
    now[0] = 102.0
    assert len(writer.retire()) == 1 and writer.retire_deadline() == 103.0
    now[0] = 103.0
    assert len(writer.retire()) == 1 and writer.retire_deadline() is None
    assert reserved(root) == []


def test_stop_retires_every_generation_and_refuses_later_swaps(root: Path) -> None:
    """stop removes every old generation at once, whatever its grace; afterwards a
    changed set is not swapped (WriteError, the set as it was, no generation left) and
    a set is not removed."""
    writer = Writer(str(root), set_grace_s=3600)
    writer.prepare()
    directory = root / "web"
    for generation in (1, 2, 3):
        writer.apply_set(str(directory), set_specs(directory, generation))
    assert len(reserved(root)) == 2
    assert len(writer.stop()) == 2 and reserved(root) == []
    with pytest.raises(WriteError, match="stopping"):
        writer.apply_set(str(directory), set_specs(directory, 4))
    with pytest.raises(WriteError, match="stopping"):
        writer.remove_set(str(directory), [s.path for s in set_specs(directory, 3)])
    assert contents(directory) == expected(set_specs(directory, 3)) and reserved(root) == []
    assert writer.retire_deadline() is None


def test_retire_from_another_thread_while_sets_are_written(root: Path) -> None:
    """A thread retiring on its own clock while another rotates a set 300 times never
    fails either of them, and stop afterwards leaves no old generation: the retire
    lock keeps the list and the swaps consistent."""
    writer = Writer(str(root), set_grace_s=0.001)
    writer.prepare()
    directory = root / "web"
    done = threading.Event()
    errors: List[BaseException] = []

    def retire() -> None:
        try:
            while not done.is_set():
                writer.retire()
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    retirer = threading.Thread(target=retire)
    retirer.start()
    try:
        for generation in range(300):
            assert writer.apply_set(str(directory), set_specs(directory, generation)).changed
    finally:
        done.set()
        retirer.join()
    assert errors == []
    writer.stop()
    assert reserved(root) == [] and contents(directory) == expected(set_specs(directory, 299))


# ---------------------------------------------------------------------------
# Start-up cleaning and removal


def test_clean_leftovers_removes_generations_but_not_foreign_directories(
        writer: Writer, root: Path, shm_dir: Path) -> None:
    """Set-prefixed directories with files (or symlinks, unfollowed) go at any depth; one
    holding a subdirectory, and other reserved-named directories, stay."""
    (shm_dir / "target").write_bytes(b"target")
    for relative in (f"{SET_PREFIX}a", f"sub/{SET_PREFIX}b", f"sub/{SET_PREFIX}empty"):
        (root / relative).mkdir(parents=True)
    (root / f"{SET_PREFIX}a" / "tls.key").write_bytes(b"x")
    (root / f"sub/{SET_PREFIX}b" / "link").symlink_to(shm_dir / "target")
    (root / f"{SET_PREFIX}foreign" / "sub").mkdir(parents=True)
    (root / f"{SET_PREFIX}link").symlink_to(shm_dir)  # removed as a link, not followed
    (root / f"{RESERVED_PREFIX}dir").mkdir()
    removed = writer.clean_leftovers()
    assert sorted(removed) == sorted(f"{root}/{r}" for r in (
        f"{SET_PREFIX}a", f"sub/{SET_PREFIX}b", f"sub/{SET_PREFIX}empty", f"{SET_PREFIX}link"))
    assert sorted(os.listdir(root)) == sorted([f"{SET_PREFIX}foreign", f"{RESERVED_PREFIX}dir",
                                               "sub"])
    assert (shm_dir / "target").read_bytes() == b"target"
    assert (shm_dir / "root").is_dir()


def test_clean_leftovers_never_removes_a_generation_on_another_mount(
        root: Path) -> None:
    """A set-prefixed directory that is a mount point below the root is left alone."""
    require_root()
    mounted = root / f"{SET_PREFIX}mnt"
    mounted.mkdir(parents=True)
    if subprocess.run(["mount", "-t", "tmpfs", "kv-agent-test", str(mounted)],
                      capture_output=True, check=False).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        (mounted / "file").write_bytes(b"x")
        assert Writer(str(root)).prepare() == []
        assert (mounted / "file").exists()
    finally:
        subprocess.run(["umount", str(mounted)], check=False)


def test_remove_set_removes_only_the_writers_shape(writer: Writer, root: Path) -> None:
    """remove_set removes a set directory holding only (some of) its files; an absent one
    is False; a foreign file, a subdirectory or another mode is refused, untouched."""
    directory = root / "web"
    specs = set_specs(directory, 1)
    paths = [s.path for s in specs]
    assert writer.remove_set(str(directory), paths) is False
    for spoil in ("stray", "subdirectory", "mode", None):
        writer.apply_set(str(directory), specs)
        if spoil == "stray":
            (directory / "stray").write_bytes(b"operator's")
        elif spoil == "subdirectory":
            (directory / "sub").mkdir()
        elif spoil == "mode":
            os.chmod(directory, 0o700)
        if spoil is None:
            (directory / MEMBERS[0]).unlink()  # some of its files is fine
            assert writer.remove_set(str(directory), paths) is True
            assert os.listdir(root) == []
        else:
            with pytest.raises(WriteError, match="not removing|not part of the set"):
                writer.remove_set(str(directory), paths)
            assert directory.is_dir() and reserved(root) == []
            if spoil == "subdirectory":
                (directory / "sub").rmdir()
            elif spoil == "stray":
                (directory / "stray").unlink()
            os.chmod(directory, DIR_MODE)


def test_remove_set_refuses_a_symlink(writer: Writer, root: Path, shm_dir: Path) -> None:
    """remove_set never follows a symlink at the set's directory."""
    outside = shm_dir / "outside"
    outside.mkdir()
    (outside / "tls.key").write_bytes(b"x")
    (root / "web").symlink_to(outside)
    with pytest.raises(WriteError, match="symlink"):
        writer.remove_set(str(root / "web"), [f"{root}/web/tls.key"])
    assert (outside / "tls.key").read_bytes() == b"x"


# ---------------------------------------------------------------------------
# Property: after every set write or removal the directory equals the last plan

State = Tuple[bytes, int, int, int]  # (content, mode, uid, gid)
# A set's plan: its directory's mode and its members' states; None: the set is removed.
SetPlan = Optional[Tuple[int, Dict[str, State]]]

PLAN_MEMBERS = ("tls.key", "tls.crt", "chain.pem", ".hidden")
PLAN_MODES = (0o400, 0o440, 0o600, 0o644)
PLAN_OWNERS = ([ME, (0, 0), (OTHER_UID, OTHER_GID), (0, OTHER_GID)] if IS_ROOT else [ME])
DIRECTORY_MODES = (DIR_MODE, 0o750, 0o711)
# Crosses the writer's 64 KiB read chunk; the pair differs only in the last byte.
BIG = bytes(range(256)) * 257
member_contents = st.one_of(st.just(b""), st.binary(max_size=32),
                            st.sampled_from([b"value", b"valuf", BIG, BIG[:-1] + b"\0"]))
member_states = st.tuples(member_contents, st.sampled_from(PLAN_MODES),
                          st.sampled_from(PLAN_OWNERS)).map(
    lambda t: (t[0], t[1], t[2][0], t[2][1]))


@st.composite
def set_plans(draw: st.DrawFn, previous: SetPlan) -> SetPlan:
    """The next plan: often the same, else one member or the mode changed, members
    joining or leaving, a new set, or the set removed."""
    change = draw(st.sampled_from(["same", "member", "join-leave", "mode", "anew", "remove"]))
    if change == "remove":
        return None
    if previous is None or change == "anew":
        return (draw(st.sampled_from(DIRECTORY_MODES)),
                draw(st.dictionaries(st.sampled_from(PLAN_MEMBERS), member_states,
                                     min_size=1)))
    mode, members = previous[0], dict(previous[1])
    if change == "mode":
        mode = draw(st.sampled_from(DIRECTORY_MODES))
    elif change == "member":
        members[draw(st.sampled_from(sorted(members)))] = draw(member_states)
    elif change == "join-leave":
        for name in draw(st.sets(st.sampled_from(PLAN_MEMBERS), min_size=1)):
            if name in members and len(members) > 1:
                del members[name]
            else:
                members[name] = draw(member_states)
    return mode, members


@st.composite
def set_plan_sequences(draw: st.DrawFn) -> List[SetPlan]:
    """A first set, then up to five plans, each derived from the one before."""
    plans = [draw(set_plans(None))]
    for _ in range(draw(st.integers(min_value=0, max_value=5))):
        plans.append(draw(set_plans(plans[-1])))
    return plans


def plan_specs(directory: Path, members: Dict[str, State]) -> List[FileSpec]:
    return [FileSpec(f"{directory}/{name}", content, uid, gid, mode)
            for name, (content, mode, uid, gid) in sorted(members.items())]


def apply_set_plan(writer: Writer, directory: Path, plan: SetPlan) -> None:
    """Write or remove the set as the agent does (its ledger knows the members it
    wrote), then check the directory, the report and what is left behind."""
    root = directory.parent
    before = contents(directory) if directory.is_dir() else None
    old_mode = stat.S_IMODE(os.lstat(directory).st_mode) if before is not None else None
    if plan is None:
        if before is not None:
            assert writer.remove_set(str(directory), [f"{directory}/{name}" for name in before],
                                     mode=old_mode or DIR_MODE)
        assert not os.path.lexists(directory) and reserved(root) == []
        return
    mode, members = plan
    specs = plan_specs(directory, members)
    result = writer.apply_set(str(directory), specs, mode=mode)
    differing = tuple(spec.path for spec in specs
                      if (before or {}).get(os.path.basename(spec.path)) != members[
                          os.path.basename(spec.path)])
    assert result.changed_paths == differing
    assert result.changed == bool(differing or old_mode != mode)
    left = sorted(set(before or {}) - set(members))
    if left:
        assert writer.remove_from_set(str(directory), [f"{directory}/{name}" for name in left])
    assert contents(directory) == members
    assert stat.S_IMODE(os.lstat(directory).st_mode) == mode
    assert reserved(root) == []


@settings(max_examples=80, deadline=None, derandomize=True)
@given(plans=set_plan_sequences())
def test_a_set_directory_equals_the_last_plan(plans: List[SetPlan]) -> None:
    """After every set write or removal the set's directory holds exactly the plan's files
    (bytes, mode, owner) with the plan's mode, the write reports exactly the members that
    differed, no generation is left, and a restart finds nothing to clean or rewrite."""
    shm = tempfile.mkdtemp(prefix="kv-agent-test-", dir="/dev/shm")
    old_umask = os.umask(0o077)  # the directory's mode must not depend on it
    try:
        root = Path(shm) / "root"
        writer = Writer(str(root), set_grace_s=0)
        assert writer.prepare() == []
        directory = root / "web"
        for plan in plans:
            apply_set_plan(writer, directory, plan)
        restarted = Writer(str(root), set_grace_s=0)
        assert restarted.prepare() == []
        if plans[-1] is not None:
            mode, members = plans[-1]
            assert restarted.apply_set(str(directory), plan_specs(directory, members), mode=mode) == SetResult(
                str(directory), False, ())
    finally:
        os.umask(old_umask)
        shutil.rmtree(shm, ignore_errors=True)


# ---------------------------------------------------------------------------
# Readers, hooks and crashes


def test_reader_opening_the_directory_once_sees_one_generation(
        root: Path, shm_dir: Path) -> None:
    """A reader that opens the set's directory once per read and reads key and cert
    relative to it during 1,000 rotations never sees a mismatched pair or a missing file
    (old generations outlive their swap by the default grace)."""
    writer = Writer(str(root))
    writer.prepare()
    directory = root / "web"
    writer.apply_set(str(directory), set_specs(directory, 0))
    with racing_reader(SET_READER, str(directory), json.dumps(list(MEMBERS)),
                       stop=shm_dir / "stop") as race:
        started = time.monotonic()
        for generation in range(1, 1001):
            assert writer.apply_set(str(directory), set_specs(directory, generation)).changed
        elapsed = time.monotonic() - started
    report = race.report
    print(f"\n1000 rotations of a {len(MEMBERS)}-file set in {elapsed:.2f} s: "
          f"{1000 / elapsed:.0f} rotations/s, {elapsed * 1000 / 1000:.3f} ms per swap; "
          f"reader: {report}")
    assert report["problem_count"] == 0, report["problems"]
    assert report["reads"] >= 100 and report["generations"] >= 20, report
    assert contents(directory) == expected(set_specs(directory, 1000))
    assert len(writer.retire(everything=True)) == 1000
    assert reserved(root) == []


def test_a_hook_run_after_apply_set_reads_a_matched_pair(writer: Writer, root: Path) -> None:
    """A hook-like function called right after apply_set returns reads key and cert by
    plain path and finds both of the generation just written, every time."""
    directory = root / "web"

    def hook() -> Tuple[bytes, bytes]:
        return ((directory / "tls.key").read_bytes().split(b" ")[1],
                (directory / "tls.crt").read_bytes().split(b" ")[1])

    for generation in range(200):
        writer.apply_set(str(directory), set_specs(directory, generation))
        assert hook() == (str(generation).encode(),) * 2


ROTATOR = r"""
import sys
from agent.writer import FileSpec, Writer
root, directory, first = sys.argv[1], sys.argv[2], int(sys.argv[3])
members = sys.argv[4:]
writer = Writer(root, set_grace_s=0)  # killed while removing old generations too
print("ready", flush=True)
generation = first
while True:
    generation += 1
    writer.apply_set(directory, [FileSpec(f"{directory}/{name}",
                                          f"gen {generation} {name}\n".encode(),
                                          0, 0, 0o440) for name in members])
"""


def test_sigkill_during_rotations_leaves_one_whole_generation(writer: Writer,
                                                              root: Path) -> None:
    """A rotating process killed at random moments 40 times leaves the set's directory
    holding one whole generation each time (the old or a newer one), and after the next
    clean_leftovers no reserved directory remains."""
    require_root()
    directory = root / "web"
    writer.apply_set(str(directory), [s._replace(uid=0, gid=0)
                                      for s in set_specs(directory, 0)])
    rng = random.Random(11)
    last, left_behind = 0, 0
    for _ in range(40):
        child = subprocess.Popen(
            [sys.executable, "-c", ROTATOR, str(root), str(directory), str(last), *MEMBERS],
            stdout=subprocess.PIPE, cwd=REPO)
        assert child.stdout is not None
        ready, _, _ = select.select([child.stdout], [], [], 15)
        assert ready and child.stdout.readline() == b"ready\n"
        time.sleep(rng.uniform(0, 0.05))
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        child.stdout.close()
        found = contents(directory)
        assert sorted(found) == sorted(MEMBERS)
        generations = {state[0].split(b" ")[1] for state in found.values()}
        assert len(generations) == 1, found
        current = int(generations.pop())
        assert current >= last
        assert found == expected([s._replace(uid=0, gid=0)
                                  for s in set_specs(directory, current)])
        assert stat.S_IMODE(os.lstat(directory).st_mode) == DIR_MODE
        left_behind += len(reserved(root))
        writer.clean_leftovers()
        assert reserved(root) == []
        last = current
    print(f"\n40 kills: reached generation {last}; {left_behind} leftovers cleaned")
    assert last > 40
