"""The root's tree, reached only by openat(2) with O_NOFOLLOW: the helpers
every room of the writer shares.

:class:`Tree` checks a path (normalised, under the root, not a reserved name)
and opens its directory from the root, component by component, never
following a symlink and judging each directory it opens by the root's own
rule. The functions below compare a file with a spec, make a rename or an
unlink durable, and word a failure; none follows a link.
"""

from __future__ import annotations

import errno
import os
import posixpath
import stat

from agent.base.errors import WriteError
from agent.base.landing import RESERVED_PREFIX, replaceable_problem
from agent.writer.specs import FileSpec

DIR_MODE = 0o755  # consumers must traverse; each file's own mode guards its bytes

O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# A temporary file or a new generation's member: never through a planted link.
O_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class Tree:
    """Paths under ``root`` and the directories that hold them.

    ``root`` must be absolute; it is normalised. ``euid`` is the user besides
    root who may own a directory on the way (the agent's own).
    """

    def __init__(self, root: str, euid: int) -> None:
        if not root.startswith("/"):
            raise ValueError("root must be absolute")
        normal = posixpath.normpath(root)
        self.root = "/" + normal.lstrip("/")  # POSIX keeps "//"; Linux reads it as "/"
        self.euid = euid

    def check_path(self, path: str) -> str:
        """``path``'s last component, when ``path`` is normalised, strictly
        under the root and not a reserved name; else WriteError. Pure."""
        if "\0" in path:  # os.* would raise ValueError, not WriteError
            raise WriteError(f"{path!r} contains a NUL byte")
        normal = posixpath.normpath(path)
        if normal != path or not path.startswith(self.root + "/"):
            raise WriteError(f"{path} is not a normalised path under {self.root}")
        name = posixpath.basename(path)
        if name.startswith(RESERVED_PREFIX):
            raise WriteError(f"{path}: names starting with {RESERVED_PREFIX} are reserved")
        return name

    def open_root(self) -> int:
        """An fd for the root itself, never through a symlink. Raises WriteError."""
        try:
            return os.open(self.root, O_DIR)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise WriteError(f"{self.root} is a symlink or not a directory") from None
            raise WriteError(f"cannot open {self.root}: {exc.strerror}") from None

    def open_parents(self, path: str, create: bool = True) -> int:
        """An fd for the target's directory, walked from the root component by
        component with O_NOFOLLOW; missing ones are created (mode DIR_MODE).
        Each directory opened, the root included, must pass the root's rule
        (:meth:`check_opened`). Without ``create``, a missing directory is
        FileNotFoundError (the caller's "nothing to remove")."""
        fd = self.open_root()
        relative = posixpath.relpath(posixpath.dirname(path), self.root)
        directory = self.root
        try:
            self.check_opened(fd, path, directory)
            for part in [] if relative == "." else relative.split("/"):
                directory = posixpath.join(directory, part)
                child = self._open_child(fd, part, path, create)
                os.close(fd)
                fd = child
                self.check_opened(fd, path, directory)
            return fd
        except BaseException:
            os.close(fd)
            raise

    @staticmethod
    def _open_child(fd: int, part: str, path: str, create: bool) -> int:
        """The directory ``part`` in ``fd`` on the way to ``path``, opened with
        O_NOFOLLOW; created with DIR_MODE first when ``create``."""
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
            child = os.open(part, O_DIR, dir_fd=fd)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise WriteError(
                    f"{path}: parent '{part}' is a symlink or a file; refusing to "
                    "write through it") from None
            if exc.errno == errno.ENOENT and not create:
                raise  # remove() reads this as "nothing to remove"
            raise WriteError(
                f"{path}: cannot open parent '{part}': {exc.strerror}") from None
        if is_created:
            # mkdir(2) applies the umask. fchmod on the fd just opened
            # with O_NOFOLLOW: chmod by name could follow a symlink
            # swapped in after the mkdir, and Python refuses
            # chmod(dir_fd=..., follow_symlinks=False) on a symlink
            # with ValueError.
            try:
                os.fchmod(child, DIR_MODE)
            except OSError as exc:
                os.close(child)
                raise WriteError(
                    f"{path}: cannot set the mode of parent '{part}': "
                    f"{exc.strerror}") from None
        return child

    def check_opened(self, fd: int, path: str, directory: str) -> None:
        """``directory``, just opened (``fd``) on the way to ``path``, must
        pass the root's rule (:func:`replaceable_problem`). Judged on the fd,
        so a directory swapped in by name after ``check`` is judged too.
        Raises WriteError naming ``path``, the directory and the fix: that
        file is not written; the others are."""
        problem = replaceable_problem(directory, os.fstat(fd), self.euid)
        if problem:
            raise WriteError(f"{path}: not written: {problem}")


def matches(dir_fd: int, name: str, spec: FileSpec) -> bool:
    """True when ``name`` is a regular file with exactly the spec's bytes,
    owner and mode. Anything unreadable counts as "differs": rewriting is
    always safe, a spurious error is not."""
    try:
        return _compare(dir_fd, name, spec)
    except OSError:
        return False


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


def sync_directory(dir_fd: int) -> None:
    """fsync(2) a directory after a rename or unlink in it.

    The rename or unlink is the commit point: once it returned, the change is
    visible to every reader and cannot be undone. On tmpfs and ramfs (the only
    file systems the writer accepts) nothing ever reaches a disk, so the sync
    adds no durability; should it fail anyway, reporting the write as failed
    would be false. So a failure is ignored, rather than leaking a bare
    OSError past the WriteError contract.
    """
    try:
        os.fsync(dir_fd)
    except OSError:
        pass


def describe_failure(spec: FileSpec, exc: OSError) -> str:
    """One line naming the file and what to do; never its bytes."""
    if exc.errno == errno.EPERM:
        return (f"{spec.path}: not permitted to give it owner {spec.uid}:{spec.gid} "
                "(run kv-agent as root)")
    if exc.errno == errno.EISDIR:
        return f"{spec.path} is a directory; remove it or choose another path"
    if exc.errno == errno.ENOSPC:
        return f"{spec.path}: the tmpfs is full"
    return f"{spec.path}: {exc.strerror}"
