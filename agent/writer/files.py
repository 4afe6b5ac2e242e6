"""Single files: one file under the root replaced atomically, or left alone.

The write is the numbered steps of :meth:`FileWriter.apply`, mirrored by
``# (n)`` comments in the code. A reader of the target sees the old file or
the new one, complete, with its final owner and mode; never a partial file
or a moment of wrong ownership (consul-template's weak spot: it chowns after
the rename).
"""

from __future__ import annotations

import os
import posixpath
import secrets
import stat
from typing import List

from agent.base.errors import WriteError
from agent.base.landing import RESERVED_PREFIX
from agent.writer.specs import FileSpec, WriteResult
from agent.writer.tree import (
    DIR_MODE,
    O_DIR,
    O_NEW_FILE,
    Tree,
    describe_failure,
    matches,
    sync_directory,
)


class FileWriter:
    """Writes and removes single files under ``tree``'s root."""

    def __init__(self, tree: Tree) -> None:
        self._tree = tree

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
        name = self._tree.check_path(spec.path)  # (1)
        dir_fd = self._tree.open_parents(spec.path)  # (2)
        try:
            if matches(dir_fd, name, spec):  # (3)
                return WriteResult(spec.path, changed=False)
            _replace(dir_fd, name, spec)  # (4)-(8)
            return WriteResult(spec.path, changed=True)
        finally:
            os.close(dir_fd)

    def remove(self, path: str) -> bool:
        """Unlink ``path`` (a file or symlink, never a directory) if it exists;
        True when something was removed. Parents are not followed."""
        name = self._tree.check_path(path)
        try:
            dir_fd = self._tree.open_parents(path, create=False)
        except FileNotFoundError:
            return False
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                raise WriteError(f"{path} is a directory; not removing it")
            os.unlink(name, dir_fd=dir_fd)
            sync_directory(dir_fd)
            return True
        except FileNotFoundError:
            return False
        finally:
            os.close(dir_fd)

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
        root = self._tree.root
        self._tree.check_path(path)
        relative = posixpath.relpath(posixpath.dirname(path), root)
        parts = [] if relative == "." else relative.split("/")
        fds = [self._tree.open_root()]  # fds[i] is the directory holding parts[i]
        removed: List[str] = []
        try:
            for part in parts:
                try:
                    fds.append(os.open(part, O_DIR, dir_fd=fds[-1]))
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
                removed.append(posixpath.join(root, *parts[:depth]))
        finally:
            for fd in fds:
                os.close(fd)
        return removed


def _replace(dir_fd: int, name: str, spec: FileSpec) -> None:
    """apply's (4)-(8): a complete temporary file renamed over ``name``."""
    temp = f"{RESERVED_PREFIX}{secrets.token_hex(8)}"
    flags = O_NEW_FILE
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
        raise WriteError(describe_failure(spec, exc)) from None
    except BaseException:
        _unlink_quietly(temp, dir_fd)
        raise
    sync_directory(dir_fd)  # (8)


def _unlink_quietly(name: str, dir_fd: int) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except OSError:
        pass
