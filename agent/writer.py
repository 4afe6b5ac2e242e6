"""Atomic, ownership-correct file writes under one tmpfs root.

The writer knows nothing of Azure: it makes a file under ``root`` hold exactly
some bytes with some owner and mode, or leaves it untouched.

Invariants:

* Every path is reached by ``openat`` from the root with ``O_NOFOLLOW``: a
  symlink below the root is never followed, whoever planted it. A symlink at a
  target is replaced (rename(2) replaces the link itself), never written
  through.
* Names starting with :data:`RESERVED_PREFIX` belong to the writer (its
  temporary files); anything with that prefix at start-up is a leftover from a
  crash and is removed.
* A reader of a target sees the old file or the new one, complete, with its
  final owner and mode; never a partial file or a moment of wrong ownership
  (consul-template's weak spot: it chowns after the rename).
* The root must be on tmpfs or ramfs, so secrets never reach a disk.
* No concurrency guarantee: callers serialise calls (the agent writes from one
  thread).
"""

from __future__ import annotations

import ctypes
import errno
import os
import posixpath
import secrets
import stat
from typing import Callable, List, NamedTuple

from agent.errors import WriteError

RESERVED_PREFIX = ".kv-agent-"
DIR_MODE = 0o755  # consumers must traverse; each file's own mode guards its bytes

TMPFS_MAGIC = 0x01021994
RAMFS_MAGIC = 0x858458F6
MEMORY_FILESYSTEMS = {TMPFS_MAGIC: "tmpfs", RAMFS_MAGIC: "ramfs"}

_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class FileSpec(NamedTuple):
    """The desired state of one file: absolute ``path`` under the root."""

    path: str
    content: bytes
    uid: int
    gid: int
    mode: int

    def __repr__(self) -> str:
        return (f"FileSpec(path={self.path!r}, content=****, uid={self.uid}, "
                f"gid={self.gid}, mode={self.mode:#o})")


class WriteResult(NamedTuple):
    """``changed`` is False when the file already matched and was not touched."""

    path: str
    changed: bool


def filesystem_type(fd: int) -> int:
    """``f_type`` of the file system holding ``fd`` (fstatfs(2)).

    Python has no os.statfs; ``f_type`` is the first member of struct statfs
    on every Linux ABI, a C long.
    """
    # CDLL(None): the C library already linked into Python. ctypes.util's
    # find_library would import subprocess and run ldconfig, costing ~20 ms.
    libc = ctypes.CDLL(None, use_errno=True)
    buffer = ctypes.create_string_buffer(512)  # larger than any struct statfs
    if libc.fstatfs(fd, buffer) != 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))
    return ctypes.c_long.from_buffer(buffer).value & 0xFFFFFFFF


class Writer:
    """Applies :class:`FileSpec` values under ``root``.

    ``fs_type`` is injectable so tests can exercise the refusal path.
    """

    def __init__(self, root: str, *, fs_type: Callable[[int], int] = filesystem_type) -> None:
        if not root.startswith("/"):
            raise ValueError("root must be absolute")
        self.root = posixpath.normpath(root)
        self._fs_type = fs_type

    # -- start-up ---------------------------------------------------------

    def prepare(self) -> List[str]:
        """Create the root if needed, check it is tmpfs/ramfs, and remove
        leftover temporary files. Returns the leftovers removed."""
        self.check()  # refuse before creating anything on a disk file system
        self._make_root()
        fd = self._open_root()
        try:
            kind = self._fs_type(fd)
        finally:
            os.close(fd)
        if kind not in MEMORY_FILESYSTEMS:
            raise WriteError(
                f"{self.root} is not on tmpfs or ramfs (filesystem type 0x{kind:x}); "
                "secrets must never reach a disk: choose a directory under /run or /dev/shm"
            )
        return self.clean_leftovers()

    def check(self) -> None:
        """Without creating anything: raise WriteError if the root (or, when it
        does not exist yet, its nearest existing ancestor) is not tmpfs/ramfs."""
        path = self.root
        while not os.path.lexists(path):
            path = posixpath.dirname(path)
        if path == self.root and os.path.islink(path):
            raise WriteError(f"{self.root} is a symlink; point directory at a real directory")
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:  # e.g. an ancestor is a regular file
            raise WriteError(f"cannot use {self.root}: {path}: {exc.strerror}") from None
        try:
            kind = self._fs_type(fd)
        finally:
            os.close(fd)
        if kind not in MEMORY_FILESYSTEMS:
            where = (f"is not on tmpfs or ramfs (filesystem type 0x{kind:x})" if path == self.root
                     else f"is not on tmpfs or ramfs ({path} is type 0x{kind:x})")
            raise WriteError(f"{self.root} {where}; secrets must never reach a disk: "
                             "choose a directory under /run or /dev/shm")

    def clean_leftovers(self) -> List[str]:
        """Remove temporary files a crash left behind (never following links)."""
        removed = []
        for dirpath, _dirs, files, dir_fd in os.fwalk(self.root, follow_symlinks=False):
            for name in files:
                if name.startswith(RESERVED_PREFIX):
                    os.unlink(name, dir_fd=dir_fd)
                    removed.append(posixpath.join(dirpath, name))
        return removed

    # -- writing ----------------------------------------------------------

    def apply(self, spec: FileSpec) -> WriteResult:
        """Make ``spec.path`` hold ``spec.content`` with its owner and mode.

        (1) Check the path is under the root and not a reserved name.
        (2) Open (creating as needed, mode DIR_MODE) each parent with O_NOFOLLOW.
        (3) If a regular file already has these bytes, owner and mode, stop:
            same inode and mtime, so watchers are not woken.
        (4) Create a temporary file beside the target: O_CREAT|O_EXCL|
            O_NOFOLLOW, mode 0600.
        (5) fchown, then fchmod (chown may clear mode bits), before any byte.
        (6) Write everything, fsync.
        (7) rename over the target: atomic; replaces a symlink, never follows.
        (8) fsync the directory so the rename is durable as far as tmpfs goes.
        On any failure the temporary file is removed and the target is as it
        was. Raises WriteError.
        """
        name = self._check_path(spec.path)  # (1)
        dir_fd = self._open_parents(spec.path)  # (2)
        try:
            if self._matches(dir_fd, name, spec):  # (3)
                return WriteResult(spec.path, changed=False)
            self._replace(dir_fd, name, spec)  # (4)-(8)
            return WriteResult(spec.path, changed=True)
        finally:
            os.close(dir_fd)

    def remove(self, path: str) -> bool:
        """Unlink ``path`` (a file or symlink, never a directory) if it exists;
        True when something was removed. Parents are not followed."""
        name = self._check_path(path)
        try:
            dir_fd = self._open_parents(path, create=False)
        except FileNotFoundError:
            return False
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                raise WriteError(f"{path} is a directory; not removing it")
            os.unlink(name, dir_fd=dir_fd)
            os.fsync(dir_fd)
            return True
        except FileNotFoundError:
            return False
        finally:
            os.close(dir_fd)

    # -- steps ------------------------------------------------------------

    def _check_path(self, path: str) -> str:
        if "\0" in path:  # os.* would raise ValueError, not WriteError
            raise WriteError(f"{path!r} contains a NUL byte")
        normal = posixpath.normpath(path)
        if normal != path or not path.startswith(self.root + "/"):
            raise WriteError(f"{path} is not a normalised path under {self.root}")
        name = posixpath.basename(path)
        if name.startswith(RESERVED_PREFIX):
            raise WriteError(f"{path}: names starting with {RESERVED_PREFIX} are reserved")
        return name

    def _make_root(self) -> None:
        """mkdir -p the root with DIR_MODE. Ancestors above the root may be
        system symlinks (/var/run -> /run); the root itself may not be one."""
        missing = []
        path = self.root
        while not os.path.lexists(path):
            missing.append(path)
            path = posixpath.dirname(path)
        for directory in reversed(missing):
            try:
                os.mkdir(directory, DIR_MODE)
                os.chmod(directory, DIR_MODE)  # mkdir(2) applies the umask
            except FileExistsError:
                pass
            except OSError as exc:
                raise WriteError(f"cannot create {directory}: {exc.strerror}") from None

    def _open_root(self) -> int:
        try:
            return os.open(self.root, _O_DIR)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise WriteError(f"{self.root} is a symlink or not a directory") from None
            raise WriteError(f"cannot open {self.root}: {exc.strerror}") from None

    def _open_parents(self, path: str, create: bool = True) -> int:
        """An fd for the target's directory, walked from the root component by
        component with O_NOFOLLOW; missing ones are created (mode DIR_MODE)."""
        fd = self._open_root()
        relative = posixpath.relpath(posixpath.dirname(path), self.root)
        try:
            for part in [] if relative == "." else relative.split("/"):
                is_created = False
                if create:
                    try:
                        os.mkdir(part, DIR_MODE, dir_fd=fd)
                        is_created = True
                    except FileExistsError:
                        pass
                    except OSError as exc:
                        raise WriteError(
                            f"{path}: cannot create parent '{part}': {exc.strerror}") from None
                try:
                    child = os.open(part, _O_DIR, dir_fd=fd)
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise WriteError(
                            f"{path}: parent '{part}' is a symlink or a file; refusing to "
                            "write through it") from None
                    if exc.errno == errno.ENOENT and not create:
                        raise  # remove() reads this as "nothing to remove"
                    raise WriteError(
                        f"{path}: cannot open parent '{part}': {exc.strerror}") from None
                os.close(fd)
                fd = child
                if is_created:
                    # mkdir(2) applies the umask. fchmod on the fd just opened
                    # with O_NOFOLLOW: chmod by name could follow a symlink
                    # swapped in after the mkdir, and Python refuses
                    # chmod(dir_fd=..., follow_symlinks=False) on a symlink
                    # with ValueError.
                    try:
                        os.fchmod(fd, DIR_MODE)
                    except OSError as exc:
                        raise WriteError(
                            f"{path}: cannot set the mode of parent '{part}': "
                            f"{exc.strerror}") from None
            return fd
        except BaseException:
            os.close(fd)
            raise

    @staticmethod
    def _matches(dir_fd: int, name: str, spec: FileSpec) -> bool:
        """True when ``name`` is a regular file with exactly the spec's bytes,
        owner and mode. Anything unreadable counts as "differs": rewriting is
        always safe, a spurious error is not."""
        try:
            return Writer._compare(dir_fd, name, spec)
        except OSError:
            return False

    @staticmethod
    def _compare(dir_fd: int, name: str, spec: FileSpec) -> bool:
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        if not stat.S_ISREG(st.st_mode) or (st.st_uid, st.st_gid) != (spec.uid, spec.gid):
            return False
        if stat.S_IMODE(st.st_mode) != spec.mode or st.st_size != len(spec.content):
            return False
        # O_NONBLOCK: should a FIFO replace the file after the stat, the open
        # must not hang (the read then fails or returns nothing: "differs").
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        fd = os.open(name, flags, dir_fd=dir_fd)
        try:
            current = b""
            while len(current) <= len(spec.content):
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                current += chunk
        finally:
            os.close(fd)
        return current == spec.content

    def _replace(self, dir_fd: int, name: str, spec: FileSpec) -> None:
        temp = f"{RESERVED_PREFIX}{secrets.token_hex(8)}"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(temp, flags, 0o600, dir_fd=dir_fd)  # (4)
        except OSError as exc:
            raise WriteError(f"{spec.path}: cannot create a file: {exc.strerror}") from None
        try:
            try:
                os.fchown(fd, spec.uid, spec.gid)  # (5)
                os.fchmod(fd, spec.mode)
                view = memoryview(spec.content)
                while view:  # (6)
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)  # (7)
        except OSError as exc:
            _unlink_quietly(temp, dir_fd)
            raise WriteError(_describe_failure(spec, exc)) from None
        except BaseException:
            _unlink_quietly(temp, dir_fd)
            raise
        os.fsync(dir_fd)  # (8)

    def remove_empty_parents(self, path: str) -> List[str]:
        """After ``path`` was removed: rmdir the directories between it and the
        root that are now empty and have the shape this writer creates (owned
        by this user, DIR_MODE), deepest first, stopping at the first that is
        not. Returns the directories removed.

        The root is never removed, and a directory the operator made with its
        own mode is kept. Each level is opened from the root with O_NOFOLLOW
        (no symlink is followed) and removed by name in its parent only if
        that name is still the same inode; rmdir(2) fails on a non-empty
        directory, so nothing that appears meanwhile is lost.
        """
        self._check_path(path)
        relative = posixpath.relpath(posixpath.dirname(path), self.root)
        parts = [] if relative == "." else relative.split("/")
        fds = [self._open_root()]  # fds[i] is the directory holding parts[i]
        removed: List[str] = []
        try:
            for part in parts:
                try:
                    fds.append(os.open(part, _O_DIR, dir_fd=fds[-1]))
                except OSError:
                    break  # missing, a symlink or a file: nothing below to prune
            for depth in range(len(fds) - 1, 0, -1):
                st = os.fstat(fds[depth])
                if st.st_uid != os.geteuid() or stat.S_IMODE(st.st_mode) != DIR_MODE:
                    break
                name = parts[depth - 1]
                try:
                    if os.stat(name, dir_fd=fds[depth - 1], follow_symlinks=False).st_ino \
                            != st.st_ino:
                        break
                    os.rmdir(name, dir_fd=fds[depth - 1])
                except OSError:
                    break  # not empty, or gone: stop there
                removed.append(posixpath.join(self.root, *parts[:depth]))
        finally:
            for fd in fds:
                os.close(fd)
        return removed


def _unlink_quietly(name: str, dir_fd: int) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except OSError:
        pass


def _describe_failure(spec: FileSpec, exc: OSError) -> str:
    if exc.errno == errno.EPERM:
        return (f"{spec.path}: not permitted to give it owner {spec.uid}:{spec.gid} "
                "(run kv-agent as root)")
    if exc.errno == errno.EISDIR:
        return f"{spec.path} is a directory; remove it or choose another path"
    if exc.errno == errno.ENOSPC:
        return f"{spec.path}: the tmpfs is full"
    return f"{spec.path}: {exc.strerror}"
