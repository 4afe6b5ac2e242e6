"""Writer: tmpfs-only root, atomic replace, owner and mode before bytes, no
symlink followed, leftovers cleaned, and "disk equals the last plan" as a
property over generated plan sequences."""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from racing_reader import FILE_READER, racing_reader

from agent.base.errors import EXIT_CANTCREAT, WriteError
from agent.base.landing import RAMFS_MAGIC, RESERVED_PREFIX, TMPFS_MAGIC, filesystem_type
from agent.writer import DIR_MODE, FileSpec, Writer, WriteResult

IS_ROOT = os.geteuid() == 0
ME: Tuple[int, int] = (os.geteuid(), os.getegid())
# Numeric ids that need no passwd/group entry; only root may chown to them.
OTHER_UID, OTHER_GID = 1234, 4321
EXT4_MAGIC = 0xEF53
SECRET = b"s3cr3t-value-never-in-messages"

# A file's observable state: (content, mode, uid, gid).
State = Tuple[bytes, int, int, int]
Plan = Dict[str, State]


# ---------------------------------------------------------------------------
# Helpers


def require_root() -> None:
    """Skip the calling test unless it may chown to arbitrary numeric ids."""
    if not IS_ROOT:
        pytest.skip("chown to numeric uids/gids needs root (CI runs the suite as root)")


def is_memory_fs(path: Path) -> bool:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return filesystem_type(fd) in (TMPFS_MAGIC, RAMFS_MAGIC)
    finally:
        os.close(fd)


def new_writer(root: Path) -> Writer:
    """A prepared writer for ``root``."""
    writer = Writer(str(root))
    assert writer.prepare() == []
    return writer


def spec_for(root: Path, relative: str, content: bytes, mode: int = 0o600,
             owner: Tuple[int, int] = ME) -> FileSpec:
    return FileSpec(path=f"{root}/{relative}", content=content, uid=owner[0],
                    gid=owner[1], mode=mode)


def state_of(path: Path) -> State:
    st_ = os.lstat(path)
    assert stat.S_ISREG(st_.st_mode), f"{path} is not a regular file"
    return (path.read_bytes(), stat.S_IMODE(st_.st_mode), st_.st_uid, st_.st_gid)


def snapshot(root: Path) -> Plan:
    """Every non-directory under ``root`` (links not followed), as states;
    anything that is not a regular file fails the calling test."""
    found: Plan = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            full = Path(dirpath, name)
            found[str(full.relative_to(root))] = state_of(full)
    return found


def reserved_names(root: Path) -> List[str]:
    """Every entry under ``root`` whose name has the reserved prefix."""
    return [str(Path(dirpath, name).relative_to(root))
            for dirpath, dirs, files in os.walk(root)
            for name in dirs + files if name.startswith(RESERVED_PREFIX)]


@pytest.fixture
def root(shm_dir: Path) -> Path:
    """A not-yet-existing writer root inside a fresh tmpfs directory; the
    fresh directory's other children serve as 'outside the root'."""
    return shm_dir / "root"


@pytest.fixture
def writer(root: Path) -> Writer:
    return new_writer(root)


@pytest.fixture
def strict_umask() -> Iterator[None]:
    """A umask that would strip every group/other bit if nothing undid it."""
    old = os.umask(0o077)
    yield
    os.umask(old)


# ---------------------------------------------------------------------------
# The root must be on tmpfs or ramfs


def test_filesystem_type_tells_tmpfs_from_disk(shm_dir: Path, tmp_path: Path) -> None:
    """filesystem_type reports TMPFS_MAGIC for /dev/shm and something else for /tmp."""
    assert is_memory_fs(shm_dir)
    assert not is_memory_fs(tmp_path)


@pytest.mark.parametrize("base", [
    pytest.param("tmp", id="under-tmp"),
    pytest.param("work", id="under-work"),
])
def test_prepare_refuses_root_on_disk(base: str, tmp_path: Path) -> None:
    """prepare() raises WriteError naming tmpfs/ramfs when the root is on a disk file system."""
    parent = tmp_path if base == "tmp" else Path(tempfile.mkdtemp(dir="/work"))
    try:
        if is_memory_fs(parent):
            pytest.skip(f"{parent} is on a memory file system here")
        (parent / "secrets").mkdir()
        (parent / "secrets" / f"{RESERVED_PREFIX}leftover").write_bytes(b"x")
        with pytest.raises(WriteError, match="is not on tmpfs or ramfs") as caught:
            Writer(str(parent / "secrets")).prepare()
        assert caught.value.exit_code == EXIT_CANTCREAT
        # Refused before touching anything: the leftover is not even cleaned.
        assert (parent / "secrets" / f"{RESERVED_PREFIX}leftover").exists()
    finally:
        if base == "work":
            shutil.rmtree(parent)


def test_check_refuses_missing_root_on_disk_without_creating_it(tmp_path: Path) -> None:
    """check() judges the nearest existing ancestor, refuses a disk and creates nothing."""
    root = tmp_path / "a" / "b"
    with pytest.raises(WriteError, match="is not on tmpfs or ramfs"):
        Writer(str(root)).check()
    assert not (tmp_path / "a").exists()


def test_check_accepts_missing_root_on_tmpfs_without_creating_it(root: Path) -> None:
    """check() accepts a root that would be on tmpfs and creates nothing."""
    Writer(str(root / "deeper")).check()
    assert not root.exists()


def test_check_refuses_root_below_a_regular_file(shm_dir: Path) -> None:
    """check() raises WriteError, not a bare OSError, when an ancestor is a file."""
    (shm_dir / "file").write_bytes(b"")
    with pytest.raises(WriteError, match="cannot use"):
        Writer(str(shm_dir / "file" / "root")).check()


@pytest.mark.parametrize("kind, is_accepted", [
    pytest.param(TMPFS_MAGIC, True, id="tmpfs"),
    pytest.param(RAMFS_MAGIC, True, id="ramfs"),
    pytest.param(EXT4_MAGIC, False, id="ext4"),
])
def test_prepare_and_check_follow_the_filesystem_type(root: Path, kind: int,
                                                      is_accepted: bool) -> None:
    """Only tmpfs and ramfs are accepted, and the refusal names the type in hex."""
    writer = Writer(str(root), fs_type=lambda fd: kind)
    if is_accepted:
        writer.check()
        assert writer.prepare() == []
        return
    with pytest.raises(WriteError, match="0xef53"):
        writer.check()
    with pytest.raises(WriteError, match="is not on tmpfs or ramfs"):
        writer.prepare()


def test_prepare_creates_root_with_dir_mode_despite_umask(root: Path,
                                                          strict_umask: None) -> None:
    """prepare() creates a missing root and its missing parents with DIR_MODE."""
    deep = root / "x" / "y"
    Writer(str(deep)).prepare()
    for directory in (root, root / "x", deep):
        assert stat.S_IMODE(os.lstat(directory).st_mode) == DIR_MODE


def test_symlinked_root_is_refused(shm_dir: Path) -> None:
    """A root that is itself a symlink is refused by prepare(), check() and apply()."""
    (shm_dir / "real").mkdir()
    (shm_dir / "link").symlink_to(shm_dir / "real")
    writer = Writer(str(shm_dir / "link"))
    with pytest.raises(WriteError, match="symlink"):
        writer.prepare()
    with pytest.raises(WriteError, match="symlink"):
        writer.check()
    with pytest.raises(WriteError, match="symlink"):
        writer.apply(spec_for(shm_dir / "link", "f", b"x"))
    assert os.listdir(shm_dir / "real") == []


def test_relative_root_is_rejected() -> None:
    """A relative root is a programming error: ValueError."""
    with pytest.raises(ValueError, match="absolute"):
        Writer("run/secrets")


def test_apply_before_the_root_exists_is_a_write_error(root: Path) -> None:
    """apply() without prepare() on a missing root raises WriteError."""
    with pytest.raises(WriteError, match="cannot open"):
        Writer(str(root)).apply(spec_for(root, "f", b"x"))


# ---------------------------------------------------------------------------
# Paths


BAD_PATHS: List[Any] = [
    pytest.param(lambda r: "/etc/kv-agent-test-file", id="absolute-elsewhere"),
    pytest.param(lambda r: "relative/file", id="relative"),
    pytest.param(lambda r: r, id="the-root-itself"),
    pytest.param(lambda r: r + "/", id="the-root-with-slash"),
    pytest.param(lambda r: r + "/../escaped", id="dotdot-out"),
    pytest.param(lambda r: r + "/a/../b", id="dotdot-inside"),
    pytest.param(lambda r: r + "/./a", id="dot-element"),
    pytest.param(lambda r: r + "//a", id="double-slash"),
    pytest.param(lambda r: r + "/a/", id="trailing-slash"),
    pytest.param(lambda r: r + "-sibling/file", id="sibling-sharing-prefix"),
    pytest.param(lambda r: r + "/a\0b", id="nul-byte"),
    pytest.param(lambda r: f"{r}/{RESERVED_PREFIX}x", id="reserved-name"),
    pytest.param(lambda r: f"{r}/sub/{RESERVED_PREFIX}x", id="reserved-name-nested"),
    pytest.param(lambda r: f"{r}/{RESERVED_PREFIX}", id="reserved-prefix-exactly"),
]


@pytest.mark.parametrize("make_path", BAD_PATHS)
def test_bad_paths_are_refused_and_nothing_is_created(
        writer: Writer, root: Path, shm_dir: Path, make_path: Callable[[str], str]) -> None:
    """apply() and remove() raise WriteError for paths outside the root or reserved."""
    before = sorted(os.listdir(shm_dir))
    path = make_path(str(root))
    with pytest.raises(WriteError):
        writer.apply(FileSpec(path=path, content=SECRET, uid=ME[0], gid=ME[1], mode=0o600))
    with pytest.raises(WriteError):
        writer.remove(path)
    assert sorted(os.listdir(shm_dir)) == before
    assert os.listdir(root) == []


def test_reserved_prefix_message_names_the_prefix(writer: Writer, root: Path) -> None:
    """The refusal of a reserved name says which prefix is reserved."""
    with pytest.raises(WriteError, match=f"names starting with {RESERVED_PREFIX} are reserved"):
        writer.apply(spec_for(root, f"{RESERVED_PREFIX}mine", b"x"))


@pytest.mark.parametrize("relative", [
    pytest.param("kv-agent-x", id="no-leading-dot"),
    pytest.param(".kv-agentx", id="prefix-without-dash"),
    pytest.param(f"{RESERVED_PREFIX}dir/file", id="reserved-prefix-only-on-a-directory"),
    pytest.param("..hidden", id="double-dot-name"),
])
def test_near_miss_names_are_allowed(writer: Writer, root: Path, relative: str) -> None:
    """Names that merely resemble the reserved prefix are ordinary targets."""
    assert writer.apply(spec_for(root, relative, b"ok")).changed
    assert (root / relative).read_bytes() == b"ok"


# ---------------------------------------------------------------------------
# Content, byte for byte


ONE_MIB = os.urandom(1 << 20)

CONTENTS: List[Any] = [
    pytest.param(b"", id="empty"),
    pytest.param(b"abc", id="no-trailing-newline"),
    pytest.param(b"abc\n", id="trailing-newline-kept"),
    pytest.param(b"line1\r\nline2\r\n", id="crlf"),
    pytest.param(b"\n", id="only-newline"),
    pytest.param(bytes(range(256)), id="all-256-byte-values"),
    pytest.param(b"\0" * 4096, id="only-nuls"),
    pytest.param(b"a\0b\0\xff\xfe", id="embedded-nuls"),
    pytest.param("pässwörd ✓".encode(), id="utf8"),
    pytest.param(ONE_MIB, id="one-mib-random"),
    pytest.param(ONE_MIB[:65536], id="exactly-one-read-chunk"),
    pytest.param(ONE_MIB + b"\x01", id="one-mib-plus-one"),
]


@pytest.mark.parametrize("content", CONTENTS)
def test_content_is_written_byte_for_byte(writer: Writer, root: Path, content: bytes) -> None:
    """The file holds exactly the given bytes, and re-applying them changes nothing."""
    spec = spec_for(root, "dir/secret", content, mode=0o640)
    assert writer.apply(spec) == WriteResult(spec.path, changed=True)
    assert state_of(root / "dir" / "secret") == (content, 0o640, *ME)
    inode = os.lstat(root / "dir" / "secret").st_ino
    assert writer.apply(spec) == WriteResult(spec.path, changed=False)
    assert os.lstat(root / "dir" / "secret").st_ino == inode
    assert reserved_names(root) == []


@pytest.mark.parametrize("old, new", [
    pytest.param(b"abcd", b"abce", id="same-size-last-byte"),
    pytest.param(b"abcd", b"abc", id="shorter-prefix"),
    pytest.param(b"abc", b"abcd", id="longer-extension"),
    pytest.param(b"abc", b"", id="to-empty"),
    pytest.param(b"", b"abc", id="from-empty"),
    pytest.param(ONE_MIB, ONE_MIB[:-1] + b"\0", id="large-last-byte"),
])
def test_changed_content_is_rewritten(writer: Writer, root: Path, old: bytes,
                                      new: bytes) -> None:
    """Any byte difference replaces the file with a new inode holding the new bytes."""
    writer.apply(spec_for(root, "f", old))
    inode = os.lstat(root / "f").st_ino
    assert writer.apply(spec_for(root, "f", new)).changed
    assert (root / "f").read_bytes() == new
    assert os.lstat(root / "f").st_ino != inode


# ---------------------------------------------------------------------------
# Unchanged files are not touched; mode or owner alone triggers a rewrite


def test_unchanged_file_keeps_inode_and_times(writer: Writer, root: Path) -> None:
    """Same bytes, owner and mode: changed is False and inode, mtime and ctime stay."""
    spec = spec_for(root, "a/b/secret", SECRET, mode=0o440)
    writer.apply(spec)
    target = root / "a" / "b" / "secret"
    os.utime(target, ns=(1_000_000_000, 1_000_000_000))  # an mtime no write could produce
    before = os.lstat(target)
    dir_before = os.lstat(target.parent)
    time.sleep(0.01)
    assert writer.apply(spec) == WriteResult(spec.path, changed=False)
    after = os.lstat(target)
    assert (after.st_ino, after.st_mtime_ns, after.st_ctime_ns) == (
        before.st_ino, before.st_mtime_ns, before.st_ctime_ns)
    # No temp file was even created and removed: the directory did not change.
    assert os.lstat(target.parent).st_mtime_ns == dir_before.st_mtime_ns


@pytest.mark.parametrize("old_mode, new_mode", [
    pytest.param(0o600, 0o400, id="0600-to-0400"),
    pytest.param(0o400, 0o440, id="0400-to-0440"),
    pytest.param(0o440, 0o444, id="0440-to-0444"),
    pytest.param(0o640, 0o600, id="0640-to-0600"),
])
def test_mode_only_change_rewrites(writer: Writer, root: Path, old_mode: int,
                                   new_mode: int) -> None:
    """A different mode with the same bytes gives a new file with the new mode."""
    writer.apply(spec_for(root, "f", SECRET, mode=old_mode))
    inode = os.lstat(root / "f").st_ino
    assert writer.apply(spec_for(root, "f", SECRET, mode=new_mode)).changed
    assert state_of(root / "f") == (SECRET, new_mode, *ME)
    assert os.lstat(root / "f").st_ino != inode


def test_mode_changed_behind_the_writers_back_is_repaired(writer: Writer, root: Path) -> None:
    """A file chmod-ed by someone else is rewritten with the planned mode."""
    spec = spec_for(root, "f", SECRET, mode=0o400)
    writer.apply(spec)
    os.chmod(root / "f", 0o666)
    assert writer.apply(spec).changed
    assert state_of(root / "f") == (SECRET, 0o400, *ME)


@pytest.mark.parametrize("old_owner, new_owner", [
    pytest.param((0, 0), (OTHER_UID, 0), id="uid-only"),
    pytest.param((0, 0), (0, OTHER_GID), id="gid-only"),
    pytest.param((OTHER_UID, OTHER_GID), (OTHER_GID, OTHER_UID), id="both-swapped"),
    pytest.param((OTHER_UID, OTHER_GID), (0, 0), id="back-to-root"),
])
def test_owner_only_change_rewrites(writer: Writer, root: Path, old_owner: Tuple[int, int],
                                    new_owner: Tuple[int, int]) -> None:
    """A different uid or gid with the same bytes and mode gives a new file with the new owner."""
    require_root()
    writer.apply(spec_for(root, "f", SECRET, mode=0o440, owner=old_owner))
    assert state_of(root / "f") == (SECRET, 0o440, *old_owner)
    inode = os.lstat(root / "f").st_ino
    assert writer.apply(spec_for(root, "f", SECRET, mode=0o440, owner=new_owner)).changed
    assert state_of(root / "f") == (SECRET, 0o440, *new_owner)
    assert os.lstat(root / "f").st_ino != inode


def test_numeric_owner_without_passwd_entry_is_applied(writer: Writer, root: Path) -> None:
    """uid/gid need not exist in passwd or group: the numbers are applied as given."""
    require_root()
    owner = (4_000_123, 4_000_321)
    writer.apply(spec_for(root, "f", SECRET, mode=0o400, owner=owner))
    assert state_of(root / "f") == (SECRET, 0o400, *owner)
    assert not writer.apply(spec_for(root, "f", SECRET, mode=0o400, owner=owner)).changed


# ---------------------------------------------------------------------------
# Symlinks and parents


def test_symlink_at_target_is_replaced_not_followed(writer: Writer, root: Path,
                                                    shm_dir: Path) -> None:
    """A symlink at the target becomes a regular file; the file it pointed to is untouched."""
    victim = shm_dir / "victim"
    victim.write_bytes(b"precious")
    os.chmod(victim, 0o644)
    victim_before = os.lstat(victim)
    (root / "target").symlink_to(victim)
    assert writer.apply(spec_for(root, "target", SECRET, mode=0o400)).changed
    assert state_of(root / "target") == (SECRET, 0o400, *ME)
    assert victim.read_bytes() == b"precious"
    victim_after = os.lstat(victim)
    assert (victim_after.st_ino, victim_after.st_mode, victim_after.st_mtime_ns) == (
        victim_before.st_ino, victim_before.st_mode, victim_before.st_mtime_ns)


def test_symlink_to_identical_file_is_still_replaced(writer: Writer, root: Path,
                                                     shm_dir: Path) -> None:
    """A symlink to a file that already matches the spec is not taken as 'unchanged'."""
    spec = spec_for(root, "target", SECRET, mode=0o600)
    victim = shm_dir / "same"
    victim.write_bytes(SECRET)
    os.chmod(victim, 0o600)
    (root / "target").symlink_to(victim)
    assert writer.apply(spec).changed
    assert not (root / "target").is_symlink()
    assert state_of(root / "target") == (SECRET, 0o600, *ME)


@pytest.mark.parametrize("kind", ["dangling", "to-directory", "to-root-itself"])
def test_other_symlinks_at_target_are_replaced(writer: Writer, root: Path, shm_dir: Path,
                                               kind: str) -> None:
    """Dangling links and links to directories at the target are replaced by the file."""
    elsewhere = shm_dir / "elsewhere"
    if kind == "to-directory":
        elsewhere.mkdir()
    (root / "target").symlink_to(root if kind == "to-root-itself" else elsewhere)
    writer.apply(spec_for(root, "target", SECRET))
    assert state_of(root / "target") == (SECRET, 0o600, *ME)
    if kind == "dangling":
        assert not elsewhere.exists()
    if kind == "to-directory":
        assert os.listdir(elsewhere) == []


@pytest.mark.parametrize("link_at, points_inside", [
    pytest.param("link", False, id="first-level-outside"),
    pytest.param("a/link", False, id="nested-outside"),
    pytest.param("link", True, id="first-level-inside-root"),
])
def test_symlinked_parent_is_refused(writer: Writer, root: Path, shm_dir: Path, link_at: str,
                                     points_inside: bool) -> None:
    """A symlinked directory below the root is never written through: WriteError."""
    destination = root / "real" if points_inside else shm_dir / "outside"
    destination.mkdir()
    (root / link_at).parent.mkdir(parents=True, exist_ok=True)
    (root / link_at).symlink_to(destination)
    for relative in (f"{link_at}/file", f"{link_at}/deeper/file"):
        with pytest.raises(WriteError, match="symlink"):
            writer.apply(spec_for(root, relative, SECRET))
        with pytest.raises(WriteError, match="symlink"):
            writer.remove(f"{root}/{relative}")
    assert os.listdir(destination) == []


def test_remove_through_symlinked_parent_leaves_the_file(writer: Writer, root: Path,
                                                         shm_dir: Path) -> None:
    """remove() refuses a symlinked parent, so the file behind it survives."""
    (shm_dir / "outside").mkdir()
    (shm_dir / "outside" / "file").write_bytes(b"keep")
    (root / "link").symlink_to(shm_dir / "outside")
    with pytest.raises(WriteError, match="symlink"):
        writer.remove(f"{root}/link/file")
    assert (shm_dir / "outside" / "file").read_bytes() == b"keep"


def test_regular_file_as_parent_is_refused(writer: Writer, root: Path) -> None:
    """A regular file where a parent directory should be gives WriteError and stays as it is."""
    (root / "notadir").write_bytes(b"data")
    with pytest.raises(WriteError, match="refusing to write through it"):
        writer.apply(spec_for(root, "notadir/file", SECRET))
    assert (root / "notadir").read_bytes() == b"data"


def test_directory_at_target_is_refused(writer: Writer, root: Path) -> None:
    """A directory at the target gives WriteError, stays, and no temp file is left."""
    (root / "target" / "inner").mkdir(parents=True)
    with pytest.raises(WriteError, match="is a directory"):
        writer.apply(spec_for(root, "target", SECRET))
    assert (root / "target" / "inner").is_dir()
    assert reserved_names(root) == []


def test_missing_parents_are_created_with_dir_mode(writer: Writer, root: Path,
                                                   strict_umask: None) -> None:
    """Every directory apply() creates has DIR_MODE whatever the umask."""
    writer.apply(spec_for(root, "a/b/c/file", SECRET, mode=0o444))
    for directory in (root / "a", root / "a" / "b", root / "a" / "b" / "c"):
        st_ = os.lstat(directory)
        assert stat.S_ISDIR(st_.st_mode)
        assert stat.S_IMODE(st_.st_mode) == DIR_MODE
    assert state_of(root / "a" / "b" / "c" / "file") == (SECRET, 0o444, *ME)


def test_file_mode_ignores_the_umask(writer: Writer, root: Path, strict_umask: None) -> None:
    """The file gets exactly the planned mode even under a umask of 077."""
    writer.apply(spec_for(root, "f", SECRET, mode=0o444))
    assert stat.S_IMODE(os.lstat(root / "f").st_mode) == 0o444


# ---------------------------------------------------------------------------
# The steps, in the contract's order


class Recorder:
    """Wraps os functions the writer calls and logs what it did, in order."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.events: List[Tuple[str, Dict[str, Any]]] = []
        self.temp_fd: Optional[int] = None
        for name in ("open", "fchown", "fchmod", "write", "fsync", "replace", "rename"):
            monkeypatch.setattr(os, name, self._wrap(name, getattr(os, name)))

    def _wrap(self, name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            info = self._before(name, args, kwargs)
            result = real(*args, **kwargs)
            if info.get("is_temp_open"):
                self.temp_fd = result
                info["mode_after_open"] = stat.S_IMODE(os.fstat(result).st_mode)
            self.events.append((name, info))
            return result
        return wrapper

    def _before(self, name: str, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Dict[str, Any]:
        info: Dict[str, Any] = {"args": args, "kwargs": kwargs}
        if name == "open":
            info["is_temp_open"] = str(args[0]).startswith(RESERVED_PREFIX)
            if "dir_fd" in kwargs:
                info["dir_ino"] = os.fstat(kwargs["dir_fd"]).st_ino
        if name in ("fchown", "fchmod", "write", "fsync"):
            st_ = os.fstat(args[0])
            info.update(is_temp=args[0] == self.temp_fd, is_dir=stat.S_ISDIR(st_.st_mode),
                        mode=stat.S_IMODE(st_.st_mode), owner=(st_.st_uid, st_.st_gid),
                        size=st_.st_size, ino=st_.st_ino)
        return info

    def index(self, name: str, **match: Any) -> int:
        for position, (event, info) in enumerate(self.events):
            if event == name and all(info.get(k) == v for k, v in match.items()):
                return position
        raise AssertionError(f"no {name} {match} in {[e for e, _ in self.events]}")


def test_steps_follow_the_writer_contract(writer: Writer, root: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """apply() makes the temp beside the target, then fchown, fchmod, write, fsync, replace,
    and fsyncs the directory, in that order."""
    owner = (OTHER_UID, OTHER_GID) if IS_ROOT else ME
    (root / "dir").mkdir()
    (root / "dir" / "target").write_bytes(b"old")
    dir_ino = os.lstat(root / "dir").st_ino
    recorder = Recorder(monkeypatch)
    writer.apply(spec_for(root, "dir/target", SECRET, mode=0o440, owner=owner))
    monkeypatch.undo()

    temp_open = recorder.index("open", is_temp_open=True)
    info = recorder.events[temp_open][1]
    name, flags, mode = info["args"][:3]
    required = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
    assert flags & required == required
    assert (mode, info["mode_after_open"], info["dir_ino"]) == (0o600, 0o600, dir_ino)
    assert [e for e, i in recorder.events if e == "open" and i["is_temp_open"]] == ["open"]

    chown = recorder.index("fchown", is_temp=True)
    chmod = recorder.index("fchmod", is_temp=True)
    first_write = recorder.index("write", is_temp=True)
    file_sync = recorder.index("fsync", is_temp=True)
    replace = recorder.index("replace")
    dir_sync = recorder.index("fsync", is_dir=True, ino=dir_ino)
    assert temp_open < chown < chmod < first_write < file_sync < replace < dir_sync
    # Owner and final mode are in place before the first byte goes in.
    first = recorder.events[first_write][1]
    assert (first["mode"], first["owner"], first["size"]) == (0o440, owner, 0)
    # The file is complete when synced.
    assert recorder.events[file_sync][1]["size"] == len(SECRET)
    # The rename stays in the target's directory: temp name -> target name.
    replaced = recorder.events[replace][1]
    assert replaced["args"] == (name, "target")
    assert replaced["kwargs"]["src_dir_fd"] == replaced["kwargs"]["dst_dir_fd"]
    assert "rename" not in [event for event, _ in recorder.events]
    assert state_of(root / "dir" / "target") == (SECRET, 0o440, *owner)
    assert reserved_names(root) == []


# ---------------------------------------------------------------------------
# Failures leave the old file and no temp file


def failing(error: BaseException, real: Callable[..., Any],
            when: Callable[..., bool] = lambda *a, **k: True) -> Callable[..., Any]:
    """A stand-in for ``real`` that raises ``error`` whenever ``when(*args)`` holds."""
    def stand_in(*args: Any, **kwargs: Any) -> Any:
        if when(*args, **kwargs):
            raise error
        return real(*args, **kwargs)
    return stand_in


def is_regular_fd(fd: int, *args: Any, **kwargs: Any) -> bool:
    return stat.S_ISREG(os.fstat(fd).st_mode)


FAILURES: List[Any] = [
    pytest.param("replace", errno.EIO, None, "Input/output error", id="replace"),
    pytest.param("replace", errno.ENOSPC, None, "tmpfs is full", id="replace-enospc"),
    pytest.param("fchown", errno.EPERM, None, "not permitted to give it owner",
                 id="fchown-eperm"),
    pytest.param("fchmod", errno.EIO, is_regular_fd, "Input/output error",
                 id="fchmod-of-the-file"),
    pytest.param("write", errno.ENOSPC, None, "tmpfs is full", id="write-enospc"),
    pytest.param("fsync", errno.EIO, is_regular_fd, "Input/output error",
                 id="fsync-of-the-file"),
]


@pytest.mark.parametrize("function, code, when, message", FAILURES)
@pytest.mark.parametrize("has_old", [pytest.param(True, id="old-file"),
                                     pytest.param(False, id="new-file")])
def test_failure_keeps_old_file_and_removes_temp(
        writer: Writer, root: Path, monkeypatch: pytest.MonkeyPatch, function: str,
        code: int, when: Optional[Callable[..., bool]], message: str, has_old: bool) -> None:
    """A failing os call raises WriteError, the old file survives intact, no temp file remains."""
    target = root / "sub" / "secret"
    if has_old:
        writer.apply(spec_for(root, "sub/secret", b"old value", mode=0o440))
        before = os.lstat(target)
    real = getattr(os, function)
    error = OSError(code, os.strerror(code))
    monkeypatch.setattr(os, function, failing(error, real, when or (lambda *a, **k: True)))
    with pytest.raises(WriteError, match=message) as caught:
        writer.apply(spec_for(root, "sub/secret", SECRET, mode=0o400))
    monkeypatch.undo()
    assert SECRET.decode() not in str(caught.value)
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
    assert reserved_names(root) == []
    if has_old:
        assert state_of(target) == (b"old value", 0o440, *ME)
        assert os.lstat(target).st_ino == before.st_ino
    else:
        assert not os.path.lexists(target)
    # The writer is still usable afterwards.
    assert writer.apply(spec_for(root, "sub/secret", SECRET, mode=0o400)).changed
    assert state_of(target) == (SECRET, 0o400, *ME)


@pytest.mark.parametrize("function", ["fchown", "write", "replace"])
def test_interrupt_removes_temp_and_propagates(writer: Writer, root: Path, function: str,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A KeyboardInterrupt mid-write propagates unchanged and leaves the old file, no temp."""
    writer.apply(spec_for(root, "f", b"old"))
    monkeypatch.setattr(os, function, failing(KeyboardInterrupt(), getattr(os, function)))
    with pytest.raises(KeyboardInterrupt):
        writer.apply(spec_for(root, "f", SECRET))
    monkeypatch.undo()
    assert state_of(root / "f") == (b"old", 0o600, *ME)
    assert reserved_names(root) == []


def _expect_unprivileged_chown_refused(writer: Writer, root: Path) -> None:
    with pytest.raises(WriteError, match="not permitted"):
        writer.apply(spec_for(root, "f", SECRET, owner=(OTHER_UID, OTHER_GID)))
    assert os.listdir(root) == []


def test_unprivileged_chown_fails_cleanly(writer: Writer, root: Path) -> None:
    """Without root, asking for another owner raises WriteError and writes nothing."""
    if not IS_ROOT:
        _expect_unprivileged_chown_refused(writer, root)
        return
    # As root, drop to nobody in a forked child, which keeps this process's
    # interpreter and imports (the venv may not be readable by nobody). The
    # root is nobody's then, as it would be for an agent run as nobody.
    os.chmod(root.parent, 0o755)
    os.chown(root, 65534, 65534)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            _expect_unprivileged_chown_refused(Writer(str(root)), root)
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "unprivileged chown was not refused cleanly"


# ---------------------------------------------------------------------------
# An unsafe or system root is refused (issue 9, item 10), as sudo and ssh
# refuse paths others can write: whoever can replace the root or one of its
# parents can delete or replace the secrets.


def _fix_hint_for(path: Path) -> List[str]:
    return [f"chown root:root {path}", f"chmod 0755 {path}", "remove it so kv-agent creates it"]


@pytest.mark.parametrize("owner, mode", [
    pytest.param((OTHER_UID, 0), 0o755, id="owned-by-another-user"),
    pytest.param((0, OTHER_GID), 0o775, id="group-writable"),
    pytest.param((0, 0), 0o777, id="world-writable"),
    pytest.param((0, 0), 0o1777, id="sticky-world-writable"),
    pytest.param((OTHER_UID, OTHER_GID), 0o777, id="app-secrets-0777-of-another-user"),
])
def test_precreated_unsafe_root_is_refused(shm_dir: Path, owner: Tuple[int, int],
                                           mode: int) -> None:
    """A pre-created root that another user owns or may write is refused, with the fix."""
    require_root()
    root = shm_dir / "app-secrets"
    root.mkdir()
    (root / f"{RESERVED_PREFIX}planted").write_bytes(b"x")
    os.chown(root, *owner)
    os.chmod(root, mode)
    for action in (Writer(str(root)).check, Writer(str(root)).prepare):
        with pytest.raises(WriteError) as caught:
            action()
        assert caught.value.exit_code == EXIT_CANTCREAT
        for fragment in _fix_hint_for(root):
            assert fragment in str(caught.value), str(caught.value)
    assert (root / f"{RESERVED_PREFIX}planted").exists()  # refused before any cleaning


@pytest.mark.parametrize("owner, mode", [
    pytest.param((OTHER_UID, 0), 0o755, id="parent-owned-by-another-user"),
    pytest.param((0, 0), 0o777, id="parent-world-writable-not-sticky"),
    pytest.param((0, OTHER_GID), 0o775, id="parent-group-writable"),
    pytest.param((OTHER_UID, 0), 0o1777, id="parent-sticky-but-not-root"),
])
def test_unsafe_parent_is_refused_and_nothing_created(shm_dir: Path, owner: Tuple[int, int],
                                                      mode: int) -> None:
    """A parent another user controls is refused, naming it, and nothing is created."""
    require_root()
    parent = shm_dir / "parent"
    parent.mkdir()
    os.chown(parent, *owner)
    os.chmod(parent, mode)
    for root in (parent / "secrets", parent / "a" / "secrets"):
        for action in (Writer(str(root)).check, Writer(str(root)).prepare):
            with pytest.raises(WriteError, match=f"{parent}"):
                action()
    assert os.listdir(parent) == []


def test_existing_root_under_an_unsafe_parent_is_refused(shm_dir: Path) -> None:
    """A safe root below a parent another user owns is still refused (they could swap it)."""
    require_root()
    parent = shm_dir / "parent"
    (parent / "secrets").mkdir(parents=True)
    os.chown(parent, OTHER_UID, OTHER_GID)
    with pytest.raises(WriteError, match=f"{parent} is owned by uid {OTHER_UID}"):
        Writer(str(parent / "secrets")).check()


def test_unsafe_directory_behind_a_symlinked_parent_is_refused(shm_dir: Path) -> None:
    """A parent reached through a symlink is judged where it really is."""
    require_root()
    real = shm_dir / "theirs"
    real.mkdir()
    os.chown(real, OTHER_UID, OTHER_GID)
    (shm_dir / "link").symlink_to(real)
    with pytest.raises(WriteError, match=f"{real}"):
        Writer(str(shm_dir / "link" / "secrets")).check()


def test_root_reached_through_a_symlinked_parent_is_judged_as_the_root(shm_dir: Path) -> None:
    """A world-writable sticky root stays refused when reached through a symlinked parent."""
    require_root()
    (shm_dir / "real" / "secrets").mkdir(parents=True)
    os.chmod(shm_dir / "real" / "secrets", 0o1777)
    (shm_dir / "link").symlink_to(shm_dir / "real")
    with pytest.raises(WriteError, match="writable by group or others"):
        Writer(str(shm_dir / "link" / "secrets")).check()


def test_safe_roots_are_accepted(shm_dir: Path) -> None:
    """Root-owned parents, a sticky root-owned parent (like /dev/shm) and a 0700 root pass."""
    require_root()
    sticky = shm_dir / "sticky"
    sticky.mkdir()
    os.chmod(sticky, 0o1777)
    Writer(str(sticky / "secrets")).prepare()
    private = shm_dir / "private"
    private.mkdir(mode=0o700)
    Writer(str(private)).prepare()
    Writer(str(shm_dir / "new" / "deeper")).prepare()
    assert stat.S_IMODE(os.lstat(sticky / "secrets").st_mode) == DIR_MODE


def test_root_created_by_another_user_after_check_is_refused(shm_dir: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """prepare() re-checks the root it opened: one planted between check and mkdir is refused."""
    require_root()
    root = shm_dir / "raced"
    writer = Writer(str(root))
    real_check = writer.check

    def check_then_plant() -> None:
        real_check()
        root.mkdir(mode=0o777)
        os.chmod(root, 0o777)

    monkeypatch.setattr(writer, "check", check_then_plant)
    with pytest.raises(WriteError, match="writable by group or others"):
        writer.prepare()


@pytest.mark.parametrize("directory", ["/", "/dev", "/dev/shm", "/run", "/run/user", "/tmp",
                                       "/var/tmp", "/proc", "/sys", "/run/lock",
                                       "/dev/kv-agent-secrets", "/dev/mqueue/x",
                                       "/sys/fs/cgroup/x", "/proc/self/x"])
def test_system_directories_are_refused(directory: str) -> None:
    """System roots and trees (/dev, /run, /dev/shm itself, /proc, /sys...) are refused, uncreated."""
    existed = os.path.lexists(directory)
    for action in (Writer(directory).check, Writer(directory).prepare):
        with pytest.raises(WriteError) as caught:
            action()
        assert caught.value.exit_code == EXIT_CANTCREAT
        assert directory in str(caught.value)
    assert os.path.lexists(directory) == existed


def test_devtmpfs_is_refused_although_it_reports_tmpfs(shm_dir: Path) -> None:
    """devtmpfs reports TMPFS_MAGIC to statfs (as /dev shows), so the mount's type decides."""
    fd = os.open("/dev", os.O_RDONLY | os.O_DIRECTORY)
    try:
        from agent.base.landing import mount_type
        if mount_type(fd) != "devtmpfs":
            pytest.skip("/dev is not devtmpfs here")
        assert filesystem_type(fd) == TMPFS_MAGIC
    finally:
        os.close(fd)
    fake_dev = shm_dir / "fake-dev"
    with pytest.raises(WriteError, match="devtmpfs"):
        Writer(str(fake_dev), mount_type=lambda fd: "devtmpfs").check()
    assert not fake_dev.exists()


def test_devtmpfs_bind_mounted_below_dev_shm_is_refused(shm_dir: Path) -> None:
    """/dev bind-mounted under /dev/shm is still devtmpfs: refused by its mount type."""
    require_root()
    bind = shm_dir / "devbind"
    bind.mkdir()
    if subprocess.run(["mount", "--bind", "/dev", str(bind)], capture_output=True,
                      check=False).returncode != 0:
        pytest.skip("cannot bind-mount /dev here")
    try:
        fd = os.open(bind, os.O_RDONLY | os.O_DIRECTORY)
        try:
            from agent.base.landing import mount_type
            if mount_type(fd) != "devtmpfs":
                pytest.skip("/dev is not devtmpfs here")
        finally:
            os.close(fd)
        with pytest.raises(WriteError, match="devtmpfs"):
            Writer(str(bind / "kv-agent-secrets")).check()
        assert not (bind / "kv-agent-secrets").exists()
    finally:
        subprocess.run(["umount", "-l", str(bind)], check=False)


def test_check_command_reports_an_unsafe_directory_with_exit_73(shm_dir: Path,
                                                                 tmp_path: Path) -> None:
    """`kv-agent check` on a pre-created 0777 directory exits 73 with the fix, in one line."""
    require_root()
    directory = shm_dir / "app-secrets"
    directory.mkdir()
    os.chmod(directory, 0o777)
    manifest = tmp_path / "manifest.yaml"
    manifest.write_text(f"vault: https://kv.vault.azure.net\ndirectory: {directory}\n"
                        "secrets:\n  - name: s\n")
    os.chmod(manifest, 0o600)
    result = subprocess.run([sys.executable, "-m", "agent", "check", "--manifest", str(manifest)],
                            capture_output=True, text=True, timeout=60, check=False,
                            cwd=str(Path(__file__).resolve().parent.parent))
    assert result.returncode == EXIT_CANTCREAT, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for fragment in _fix_hint_for(directory):
        assert fragment in lines[0], lines[0]


@pytest.mark.parametrize("owner, mode", [
    pytest.param((OTHER_UID, OTHER_GID), 0o777, id="another-users-0777"),
    pytest.param((OTHER_UID, 0), 0o755, id="owned-by-another-user"),
    pytest.param((0, OTHER_GID), 0o775, id="group-writable"),
    pytest.param((0, 0), 0o1777, id="sticky-world-writable"),
])
def test_a_foreign_directory_below_the_root_is_refused_and_nothing_written_in_it(
        writer: Writer, root: Path, owner: Tuple[int, int], mode: int) -> None:
    """A directory below the root that another user could change fails the writes into it
    and below it (naming it, with the fix) and check_directory; other files are written."""
    require_root()
    foreign = root / "sub"
    foreign.mkdir()
    os.chown(foreign, *owner)
    os.chmod(foreign, mode)
    for relative in ("sub/db", "sub/deeper/db"):
        with pytest.raises(WriteError) as caught:
            writer.apply(spec_for(root, relative, SECRET))
        assert caught.value.exit_code == EXIT_CANTCREAT
        assert str(caught.value).startswith(f"{root}/{relative}: not written: {foreign} ")
        for fragment in _fix_hint_for(foreign):
            assert fragment in str(caught.value), str(caught.value)
        assert SECRET.decode() not in str(caught.value)
    assert os.listdir(foreign) == []
    for directory in (foreign, foreign / "deeper"):
        with pytest.raises(WriteError, match=f"^{foreign} "):
            writer.check_directory(str(directory))
    assert writer.apply(spec_for(root, "other/db", SECRET)).changed
    writer.check_directory(str(root / "other"))
    writer.check_directory(str(root / "missing" / "deeper"))  # created later, by the writer


def test_a_directory_made_foreign_after_a_write_stops_the_next_one(writer: Writer,
                                                                    root: Path) -> None:
    """Each write judges every directory it opens again, the root too: one handed to
    another user (0777) after a first write is refused at the next, its file left as it is."""
    require_root()
    writer.apply(spec_for(root, "sub/db", b"first"))
    os.chown(root / "sub", OTHER_UID, OTHER_GID)
    os.chmod(root / "sub", 0o777)
    with pytest.raises(WriteError, match=f"{root / 'sub'} is owned by uid {OTHER_UID}"):
        writer.apply(spec_for(root, "sub/db", b"second"))
    with pytest.raises(WriteError, match=f"{root / 'sub'} is owned by uid {OTHER_UID}"):
        writer.remove(str(root / "sub" / "db"))
    assert (root / "sub" / "db").read_bytes() == b"first"
    writer.apply(spec_for(root, "top", b"first"))
    os.chmod(root, 0o777)  # the root itself, after prepare()
    with pytest.raises(WriteError, match=f"{root}/top: not written: {root} is writable"):
        writer.apply(spec_for(root, "top", b"second"))
    assert (root / "top").read_bytes() == b"first"


def _agent_command(args: List[str], environ: Dict[str, str]) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if "proxy" not in key.lower()}
    env.update(environ)
    return subprocess.run([sys.executable, "-m", "agent", *args], env=env, capture_output=True,
                          text=True, timeout=60, check=False,
                          cwd=str(Path(__file__).resolve().parent.parent))


def test_check_refuses_and_once_skips_a_foreign_directory_below_the_root(
        shm_dir: Path, tmp_path: Path) -> None:
    """`check` refuses another user's 0777 directory below the root in one line with the fix;
    `once` writes every other file, not that one, and exits 1 naming it."""
    from agent.emulator import Emulator

    require_root()
    directory = shm_dir / "secrets"
    foreign = directory / "sub"
    foreign.mkdir(parents=True)
    os.chown(foreign, OTHER_UID, OTHER_GID)
    os.chmod(foreign, 0o777)
    with Emulator({}) as emulator:
        emulator.set_secret("db", "db value")
        emulator.set_secret("api", "api value")
        manifest = tmp_path / "manifest.yaml"
        manifest.write_text(f"vault: {emulator.vault_url}\ndirectory: {directory}\nsecrets:\n"
                            "  - name: db\n    path: sub/db\n  - name: api\n")
        os.chmod(manifest, 0o600)
        environ = {"KV_AGENT_IMDS_ENDPOINT": emulator.imds_endpoint,
                   "REQUESTS_CA_BUNDLE": emulator.ca_path, "NO_PROXY": "127.0.0.1"}
        checked = _agent_command(["check", "--manifest", str(manifest)], environ)
        assert checked.returncode == EXIT_CANTCREAT, checked.stderr
        [line] = checked.stderr.splitlines()
        assert f"{foreign} is owned by uid {OTHER_UID}" in line
        for fragment in _fix_hint_for(foreign):
            assert fragment in line, line
        once = _agent_command(["once", "--manifest", str(manifest)], environ)
    assert once.returncode == 1, once.stderr
    assert (directory / "api").read_text() == "api value"
    assert os.listdir(foreign) == []
    assert f"{foreign}/db: not written: {foreign} is owned by uid {OTHER_UID}" in once.stderr
    assert "Traceback" not in once.stderr and "db value" not in once.stderr


@pytest.mark.parametrize("memory, hint", [
    pytest.param({"/run", "/dev/shm"}, "choose a directory under /run or /dev/shm", id="both"),
    pytest.param({"/dev/shm"}, "choose a directory under /dev/shm", id="shm-only"),
    pytest.param({"/run"}, "choose a directory under /run", id="run-only"),
    pytest.param(set(), "mount a tmpfs", id="neither"),
])
def test_not_tmpfs_hint_names_a_tmpfs_that_exists(memory: set, hint: str) -> None:
    """The 'not on tmpfs' hint names only directories that are tmpfs on this host."""
    from agent.base.landing import tmpfs_hint

    def fake_type(fd: int) -> int:
        path = os.readlink(f"/proc/self/fd/{fd}")
        return TMPFS_MAGIC if path in memory else EXT4_MAGIC

    assert tmpfs_hint(fake_type).startswith(hint)


def test_not_tmpfs_message_on_this_host_names_a_real_tmpfs(tmp_path: Path) -> None:
    """On this host, the refusal of a disk root suggests only directories that are tmpfs here."""
    if is_memory_fs(tmp_path):
        pytest.skip("tmp_path is on tmpfs here")
    with pytest.raises(WriteError) as caught:
        Writer(str(tmp_path / "secrets")).check()
    message = str(caught.value)
    for candidate in ("/run", "/dev/shm"):
        if os.path.isdir(candidate) and not is_memory_fs(Path(candidate)):
            assert f"under {candidate}" not in message and f"or {candidate}" not in message, \
                message


# ---------------------------------------------------------------------------
# Leftovers from a crash


def test_prepare_removes_only_reserved_leftovers(root: Path, shm_dir: Path) -> None:
    """prepare() removes reserved-prefix files at any depth and nothing else."""
    leftovers = [f"{RESERVED_PREFIX}0123456789abcdef", f"sub/{RESERVED_PREFIX}x",
                 f"sub/deeper/{RESERVED_PREFIX}", f"{RESERVED_PREFIX}dir/{RESERVED_PREFIX}y"]
    keepers = ["keep", ".hidden", "kv-agent-x", ".kv-agentx", f"sub/x{RESERVED_PREFIX}",
               "sub/deeper/keep", f"{RESERVED_PREFIX}dir/keep"]
    for relative in leftovers + keepers:
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_bytes(relative.encode())
    # A reserved-named symlink is removed as a link; what it points to stays.
    (shm_dir / "target").write_bytes(b"target")
    (root / f"{RESERVED_PREFIX}link").symlink_to(shm_dir / "target")
    leftovers.append(f"{RESERVED_PREFIX}link")
    # A symlinked directory is not descended into.
    (shm_dir / "elsewhere").mkdir()
    (shm_dir / "elsewhere" / f"{RESERVED_PREFIX}z").write_bytes(b"not ours")
    (root / "linked").symlink_to(shm_dir / "elsewhere")

    removed = Writer(str(root)).prepare()

    assert sorted(removed) == sorted(f"{root}/{relative}" for relative in leftovers)
    for relative in leftovers:
        assert not os.path.lexists(root / relative)
    for relative in keepers:
        assert (root / relative).read_bytes() == relative.encode()
    assert (shm_dir / "target").read_bytes() == b"target"
    assert (shm_dir / "elsewhere" / f"{RESERVED_PREFIX}z").read_bytes() == b"not ours"
    assert Writer(str(root)).prepare() == []


def test_clean_leftovers_after_a_simulated_crash(writer: Writer, root: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A temp file stranded by a crash before the rename is removed by the next prepare()."""
    writer.apply(spec_for(root, "a/f", b"old"))
    # Simulate the process dying right before the rename: no cleanup runs.
    monkeypatch.setattr(os, "unlink", lambda *a, **k: None)
    monkeypatch.setattr(os, "replace", failing(OSError(errno.EIO, "I/O error"), os.replace))
    with pytest.raises(WriteError):
        writer.apply(spec_for(root, "a/f", SECRET))
    monkeypatch.undo()
    stranded = reserved_names(root)
    assert len(stranded) == 1 and stranded[0].startswith("a/")
    assert (root / stranded[0]).read_bytes() == SECRET
    assert Writer(str(root)).prepare() == [f"{root}/{stranded[0]}"]
    assert snapshot(root) == {"a/f": (b"old", 0o600, *ME)}


def test_clean_leftovers_stays_on_the_roots_file_system(root: Path, shm_dir: Path) -> None:
    """Start-up cleaning never descends into a file system mounted below the root."""
    require_root()
    mounted = root / "mnt"
    mounted.mkdir(parents=True)
    if subprocess.run(["mount", "-t", "tmpfs", "kv-agent-test", str(mounted)],
                      capture_output=True, check=False).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        (mounted / f"{RESERVED_PREFIX}not-ours").write_bytes(b"x")
        (root / f"{RESERVED_PREFIX}ours").write_bytes(b"x")
        assert Writer(str(root)).prepare() == [f"{root}/{RESERVED_PREFIX}ours"]
        assert (mounted / f"{RESERVED_PREFIX}not-ours").exists()
    finally:
        subprocess.run(["umount", str(mounted)], check=False)


def test_clean_leftovers_is_bounded_in_depth_and_size(root: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A deep tree never overflows the stack, and a huge one is refused as not kv-agent's."""
    import agent.writer.root as writer_module

    deep = root
    for _ in range(writer_module.MAX_CLEAN_DEPTH + 5):
        deep = deep / "d"
    deep.mkdir(parents=True)
    (deep / f"{RESERVED_PREFIX}too-deep").write_bytes(b"x")
    (root / "d" / f"{RESERVED_PREFIX}shallow").write_bytes(b"x")
    assert Writer(str(root)).prepare() == [f"{root}/d/{RESERVED_PREFIX}shallow"]
    monkeypatch.setattr(writer_module, "MAX_CLEAN_ENTRIES", 50)
    for index in range(60):
        (root / f"file-{index}").write_bytes(b"")
    with pytest.raises(WriteError, match="more than 50 entries"):
        Writer(str(root)).prepare()


# ---------------------------------------------------------------------------
# remove()


def test_remove_unlinks_files_and_reports_absence(writer: Writer, root: Path) -> None:
    """remove() returns True once for an existing file and False when nothing is there."""
    writer.apply(spec_for(root, "a/b/f", SECRET))
    assert writer.remove(f"{root}/a/b/f") is True
    assert not (root / "a" / "b" / "f").exists()
    assert writer.remove(f"{root}/a/b/f") is False
    assert writer.remove(f"{root}/missing/parent/f") is False
    assert not (root / "missing").exists()


def test_remove_unlinks_a_symlink_not_its_target(writer: Writer, root: Path,
                                                 shm_dir: Path) -> None:
    """remove() on a symlink removes the link and leaves the file it points to."""
    (shm_dir / "victim").write_bytes(b"precious")
    (root / "link").symlink_to(shm_dir / "victim")
    assert writer.remove(f"{root}/link") is True
    assert not os.path.lexists(root / "link")
    assert (shm_dir / "victim").read_bytes() == b"precious"


def test_remove_refuses_a_directory(writer: Writer, root: Path) -> None:
    """remove() raises WriteError for a directory and leaves it."""
    (root / "d" / "inner").mkdir(parents=True)
    with pytest.raises(WriteError, match="is a directory"):
        writer.remove(f"{root}/d")
    assert (root / "d" / "inner").is_dir()


@pytest.mark.parametrize("function, message", [
    pytest.param("mkdir", "cannot create parent 'new'", id="mkdir"),
    pytest.param("fchmod", "cannot set the mode of parent 'new'", id="fchmod-of-the-directory"),
])
def test_parent_creation_failure_is_a_write_error(writer: Writer, root: Path, function: str,
                                                  message: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A parent directory that cannot be created or chmod-ed gives WriteError, not OSError."""
    error = OSError(errno.EACCES, os.strerror(errno.EACCES))
    monkeypatch.setattr(os, function, failing(error, getattr(os, function)))
    with pytest.raises(WriteError, match=message):
        writer.apply(spec_for(root, "new/f", SECRET))
    monkeypatch.undo()
    assert reserved_names(root) == []
    assert not (root / "new" / "f").exists()


# ---------------------------------------------------------------------------
# Property: after every apply the directory equals the last plan

# No path is a directory of another, so any plan can follow any other.
PLAN_PATHS = ["a", "b.txt", ".hidden", "d1/c", "d1/e", "d1/d2/f", "d3/g"]
MODES = [0o400, 0o440, 0o444, 0o600, 0o640]
OWNERS = ([(0, 0), (OTHER_UID, OTHER_GID), (OTHER_GID, OTHER_UID), (0, OTHER_GID)]
          if IS_ROOT else [ME])
# Crosses the writer's 64 KiB read chunk, so "unchanged" needs more than one read.
BIG_VALUE = os.urandom(65536 + 123)

contents = st.one_of(
    st.just(b""),
    st.binary(max_size=48),
    # Same-size pairs: only a byte comparison tells them apart.
    st.sampled_from([bytes(range(256)), b"\0" * 33, b"value\n", b"value", b"valuf",
                     BIG_VALUE, BIG_VALUE[:-1] + b"\0"]),
)
file_states = st.tuples(contents, st.sampled_from(MODES), st.sampled_from(OWNERS)).map(
    lambda t: (t[0], t[1], t[2][0], t[2][1]))


CHANGES = ["keep", "keep", "content", "flip-last-byte", "mode", "owner", "drop", "anew"]


def evolve(draw: st.DrawFn, old: Optional[State]) -> Optional[State]:
    """The next state of one path: kept, changed in one aspect, dropped or new."""
    change = draw(st.sampled_from(CHANGES))
    if old is None:
        return draw(file_states) if change in ("anew", "content") else None
    content, mode, uid, gid = old
    if change == "keep":
        return old
    if change == "content":
        return (draw(contents), mode, uid, gid)
    if change == "flip-last-byte":  # same size: only the bytes tell them apart
        flipped = content[:-1] + bytes([content[-1] ^ 1]) if content else b"x"
        return (flipped, mode, uid, gid)
    if change == "mode":
        return (content, draw(st.sampled_from(MODES)), uid, gid)
    if change == "owner":
        return (content, mode, *draw(st.sampled_from(OWNERS)))
    if change == "drop":
        return None
    return draw(file_states)


@st.composite
def plan_sequences(draw: st.DrawFn) -> List[Plan]:
    """A first plan, then up to four successors, each derived path by path from
    the one before, so unchanged files and one-aspect changes are common."""
    plans = [draw(st.dictionaries(st.sampled_from(PLAN_PATHS), file_states,
                                  max_size=len(PLAN_PATHS)))]
    for _ in range(draw(st.integers(min_value=0, max_value=4))):
        plan: Plan = {}
        for path in PLAN_PATHS:
            state = evolve(draw, plans[-1].get(path))
            if state is not None:
                plan[path] = state
        plans.append(plan)
    return plans


def apply_plan(writer: Writer, root: Path, plan: Plan) -> None:
    """Remove what the plan dropped, apply the rest, and check the outcome."""
    before = snapshot(root)
    inodes = {relative: os.lstat(root / relative).st_ino for relative in before}
    for relative in sorted(set(before) - set(plan)):
        assert writer.remove(f"{root}/{relative}") is True
    for relative, (content, mode, uid, gid) in sorted(plan.items()):
        result = writer.apply(spec_for(root, relative, content, mode, (uid, gid)))
        should_change = before.get(relative) != (content, mode, uid, gid)
        assert result == WriteResult(f"{root}/{relative}", changed=should_change)
        is_same_inode = os.lstat(root / relative).st_ino == inodes.get(relative)
        assert is_same_inode is not should_change, relative
    assert snapshot(root) == plan
    assert reserved_names(root) == []
    for dirpath, dirs, _files in os.walk(root):
        for name in dirs:
            assert stat.S_IMODE(os.lstat(Path(dirpath, name)).st_mode) == DIR_MODE


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(plans=plan_sequences())
def test_directory_equals_the_last_plan(plans: List[Plan]) -> None:
    """After each apply the files equal the plan (bytes, mode, owner), no temp file remains,
    and exactly the unchanged files keep their inode."""
    shm = tempfile.mkdtemp(prefix="kv-agent-test-", dir="/dev/shm")
    old_umask = os.umask(0o077)  # created directories must get DIR_MODE regardless
    try:
        root = Path(shm) / "root"
        writer = new_writer(root)
        for plan in plans:
            apply_plan(writer, root, plan)
        # A restart finds nothing to clean and nothing to rewrite.
        writer = new_writer(root)
        for relative, (content, mode, uid, gid) in plans[-1].items():
            assert not writer.apply(spec_for(root, relative, content, mode, (uid, gid))).changed
    finally:
        os.umask(old_umask)
        shutil.rmtree(shm, ignore_errors=True)


# ---------------------------------------------------------------------------
# A reader hammering the target never sees a partial file or a wrong owner/mode


def test_hammering_reader_sees_only_complete_files_with_their_owner_and_mode(
        writer: Writer, root: Path, shm_dir: Path) -> None:
    """A reader process looping over the target while it is replaced 2000 times sees
    only complete contents, each with the mode and owner that belong to it."""
    short_state: State = (b"short secret", 0o400, 0, 0) if IS_ROOT else (
        b"short secret", 0o400, *ME)
    long_content = bytes(range(256)) * 160  # 40 KiB: several reads per open
    long_state: State = (long_content, 0o440, OTHER_UID, OTHER_GID) if IS_ROOT else (
        long_content, 0o440, *ME)
    states = [short_state, long_state]
    specs = [spec_for(root, "sub/target", c, m, (u, g)) for c, m, u, g in states]
    writer.apply(specs[0])
    expected = {c.hex(): [m, u, g] for c, m, u, g in states}
    with racing_reader(FILE_READER, str(root / "sub" / "target"), json.dumps(expected),
                       stop=shm_dir / "stop") as race:
        for round_ in range(2000):
            assert writer.apply(specs[(round_ + 1) % 2]).changed
    report = race.report
    assert report["problem_count"] == 0, report["problems"]
    # The reader really raced the writer: it saw both versions, many times.
    assert report["reads"] >= 200, report
    assert min(report["seen"]) > 0, report
    assert reserved_names(root) == []


# ---------------------------------------------------------------------------
# Guards the mutation check relies on (tests/mutations)


def test_file_spec_repr_never_shows_the_content() -> None:
    """repr() and str() of a FileSpec show path, owner and mode but never the content."""
    spec = FileSpec("/run/secrets/db", SECRET, 1234, 4321, 0o440)
    for text in (repr(spec), str(spec), repr([spec])):
        assert SECRET.decode() not in text and "content=****" in text
        assert "/run/secrets/db" in text and "0o440" in text


def is_directory_fd(fd: int, *args: Any, **kwargs: Any) -> bool:
    return stat.S_ISDIR(os.fstat(fd).st_mode)


def test_directory_fsync_failure_after_the_rename_is_not_a_failed_write(
        writer: Writer, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failing fsync of the directory after the rename (the commit point) neither raises a
    bare OSError nor reports a write that happened as failed: apply and remove both succeed."""
    target = root / "sub" / "secret"
    writer.apply(spec_for(root, "sub/secret", b"old value"))
    error = OSError(errno.EIO, os.strerror(errno.EIO))
    monkeypatch.setattr(os, "fsync", failing(error, os.fsync, is_directory_fd))
    assert writer.apply(spec_for(root, "sub/secret", SECRET, mode=0o400)).changed
    assert state_of(target) == (SECRET, 0o400, *ME)
    assert writer.remove(str(target))
    assert not os.path.lexists(target)
