"""Root policy: what may be a secrets root, and cleaning it at start.

The rules themselves (tmpfs or ramfs, not a system directory, the owner
chain) live in :mod:`agent.base.landing`, which the manifest and the doctor
consult too; this room applies them to one root, before anything is created
and again on the very directory opened, and removes what a crash left.

* The root must be on tmpfs or ramfs, so secrets never reach a disk; not on
  devtmpfs (which reports the tmpfs magic), and not a system directory such
  as /run, /dev or /dev/shm itself.
* The root and every directory above it belong to root (or the agent's own
  user) and are not writable by group or others, as sudo and ssh demand of
  the paths they trust. A world-writable sticky parent owned by root
  (/dev/shm, /tmp) is fine, since only its owner may then remove the root;
  the root itself may not be one.
* Start-up cleaning stays on the root's file system, MAX_CLEAN_DEPTH levels
  down at most, and gives up (WriteError) beyond MAX_CLEAN_ENTRIES entries.
"""

from __future__ import annotations

import os
import posixpath
import stat
from typing import Callable, List, Optional

from agent.base.errors import WriteError
from agent.base.landing import (
    MEMORY_FILESYSTEMS,
    RESERVED_PREFIX,
    directories_above,
    replaceable_problem,
    system_directory_problem,
    tmpfs_hint,
)
from agent.writer.generations import SET_PREFIX, remove_generation
from agent.writer.tree import DIR_MODE, Tree

MAX_CLEAN_DEPTH = 64  # directory levels below the root that start-up cleaning visits
MAX_CLEAN_ENTRIES = 100_000  # more than any manifest makes: not kv-agent's tree


class RootPolicy:
    """Judges and prepares ``tree``'s root. ``fs_type`` and ``mount_type``
    are injectable so tests can exercise the refusal paths."""

    def __init__(self, tree: Tree, fs_type: Callable[[int], int],
                 mount_type: Callable[[int], Optional[str]]) -> None:
        self._tree = tree
        self.root = tree.root
        self._euid = tree.euid
        self._fs_type = fs_type
        self._mount_type = mount_type

    def create(self) -> None:
        """After :meth:`check`: create the root if needed and judge the very
        directory opened again. Raises WriteError."""
        self._make_root()
        fd = self._tree.open_root()
        try:
            kind = self._fs_type(fd)
            # Judged again on the very directory opened: one planted between
            # check() and mkdir() (which then finds it "already there") is
            # refused like any other.
            self._check_owner(self.root, os.fstat(fd), is_root=True)
            self._check_mount(fd, self.root)
        finally:
            os.close(fd)
        if kind not in MEMORY_FILESYSTEMS:
            raise WriteError(
                f"{self.root} is not on tmpfs or ramfs (filesystem type 0x{kind:x}); "
                f"secrets must never reach a disk: {tmpfs_hint()}"
            )

    def check(self) -> None:
        """Without creating anything: raise WriteError if the root is a system
        directory, a symlink, not on tmpfs/ramfs (judged on its nearest
        existing ancestor when it does not exist yet), on devtmpfs, or if it
        or a directory above it could be replaced by another user."""
        problem = system_directory_problem(self.root)
        if problem:
            raise WriteError(problem)
        path = self.root
        while not os.path.lexists(path) and path != posixpath.dirname(path):
            path = posixpath.dirname(path)
        if path == self.root and os.path.islink(path):
            raise WriteError(f"{self.root} is a symlink; point directory at a real directory")
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:  # e.g. an ancestor is a regular file
            raise WriteError(f"cannot use {self.root}: {path}: {exc.strerror}") from None
        try:
            kind = self._fs_type(fd)
            if kind not in MEMORY_FILESYSTEMS:
                where = (f"is not on tmpfs or ramfs (filesystem type 0x{kind:x})"
                         if path == self.root
                         else f"is not on tmpfs or ramfs ({path} is type 0x{kind:x})")
                raise WriteError(f"{self.root} {where}; secrets must never reach a disk: "
                                 f"{tmpfs_hint()}")
            self._check_mount(fd, path)
        finally:
            os.close(fd)
        self._check_directories(path)

    def _check_mount(self, fd: int, path: str) -> None:
        if self._mount_type(fd) == "devtmpfs":
            raise WriteError(f"{self.root}: {path} is on devtmpfs (/dev, the kernel's device "
                             f"nodes), which only looks like tmpfs; {tmpfs_hint()}")

    def _check_directories(self, existing: str) -> None:
        """Every directory from / down to ``existing`` (the root, or its
        nearest existing ancestor), both as written and as resolved through
        symlinks, must be one only root or we can change."""
        real = os.path.realpath(existing)
        for chain in (list(directories_above(existing)), list(directories_above(real))):
            for path in chain:
                try:
                    st = os.lstat(path)
                except OSError as exc:
                    raise WriteError(f"cannot use {self.root}: {path}: {exc.strerror}") from None
                is_root = existing == self.root and path == chain[-1]  # the root, resolved
                self._check_owner(path, st, is_root=is_root)

    def _check_owner(self, path: str, st: os.stat_result, *, is_root: bool) -> None:
        """Raise WriteError if another user could replace ``path`` (or, for a
        directory above the root, what is inside it)."""
        fix_owner = "root:root" if self._euid == 0 else str(self._euid)
        if is_root:
            problem = replaceable_problem(path, st, self._euid)
            if problem:
                raise WriteError(problem)
            return
        if stat.S_ISLNK(st.st_mode):
            if st.st_uid not in (0, self._euid):  # its owner may retarget it in a sticky dir
                raise WriteError(f"{self.root}: {path} is a symlink owned by uid {st.st_uid}, "
                                 f"who could point it elsewhere; {tmpfs_hint()}")
            return
        if st.st_uid not in (0, self._euid):
            raise WriteError(f"{self.root}: {path} is owned by uid {st.st_uid}, who could "
                             f"replace {self.root}; chown {fix_owner} {path}, or "
                             f"{tmpfs_hint()}")
        is_sticky_root = bool(st.st_mode & stat.S_ISVTX) and st.st_uid == 0
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not is_sticky_root:
            raise WriteError(f"{self.root}: {path} is writable by group or others (mode "
                             f"{stat.S_IMODE(st.st_mode):04o}), who could replace "
                             f"{self.root}; chmod go-w {path}, or {tmpfs_hint()}")

    def check_directory(self, directory: str) -> None:
        """Without creating anything: raise WriteError if a directory from the
        root (excluded: see :meth:`check`) down to ``directory`` (included)
        exists and another user could replace what is in it
        (:func:`replaceable_problem`), or is a symlink or not a directory.
        What does not exist yet passes: the writer creates it, with its own
        owner and DIR_MODE. ``kv-agent check`` asks this of every directory
        a file lands in; the writes themselves judge each directory again as
        they open it (:meth:`agent.writer.tree.Tree.open_parents`)."""
        relative = posixpath.relpath(directory, self.root)
        if relative.startswith("..") or posixpath.isabs(relative):
            raise WriteError(f"{directory} is not under {self.root}")
        current = self.root
        for part in [] if relative == "." else relative.split("/"):
            current = posixpath.join(current, part)
            try:
                st = os.lstat(current)
            except FileNotFoundError:
                return
            except OSError as exc:
                raise WriteError(f"cannot use {current}: {exc.strerror}") from None
            if not stat.S_ISDIR(st.st_mode):
                raise WriteError(f"{current} is a symlink or not a directory; "
                                 "replace it with a directory, or remove it")
            problem = replaceable_problem(current, st, self._euid)
            if problem:
                raise WriteError(problem)

    def clean_leftovers(self) -> List[str]:
        """Remove temporary files a crash left behind (never following links).

        A directory named with SET_PREFIX (a set's generation a crash left
        half-built, or an old one not yet removed) goes too, with the files in
        it; one holding a subdirectory is not the writer's and stays.

        Bounded, because the root may hold a tree kv-agent did not make: it
        never descends into another file system mounted below the root, nor
        deeper than MAX_CLEAN_DEPTH, and raises WriteError after
        MAX_CLEAN_ENTRIES entries.
        """
        removed = []
        root_device = os.lstat(self.root).st_dev
        seen = 0
        for dirpath, dirs, files, dir_fd in os.fwalk(self.root, follow_symlinks=False):
            seen += len(dirs) + len(files)
            if seen > MAX_CLEAN_ENTRIES:
                raise WriteError(
                    f"{self.root} holds more than {MAX_CLEAN_ENTRIES} entries, far more than "
                    "kv-agent writes; choose a directory of its own")
            is_deepest = dirpath[len(self.root):].count("/") >= MAX_CLEAN_DEPTH
            dirs[:] = [] if is_deepest else [
                name for name in dirs if _device_of(name, dir_fd) == root_device]
            for name in [name for name in dirs if name.startswith(SET_PREFIX)]:
                dirs.remove(name)  # a set's half-built or old generation: not descended
                if remove_generation(dir_fd, name):
                    removed.append(posixpath.join(dirpath, name))
            for name in files:
                if name.startswith(RESERVED_PREFIX):
                    os.unlink(name, dir_fd=dir_fd)
                    removed.append(posixpath.join(dirpath, name))
        return removed

    def _make_root(self) -> None:
        """mkdir -p the root with DIR_MODE. Ancestors above the root may be
        system symlinks (/var/run -> /run); the root itself may not be one."""
        missing = []
        path = self.root
        while not os.path.lexists(path) and path != posixpath.dirname(path):
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


def _device_of(name: str, dir_fd: int) -> Optional[int]:
    """st_dev of ``name`` in ``dir_fd`` (not following a link), None if gone."""
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_dev
    except OSError:
        return None
