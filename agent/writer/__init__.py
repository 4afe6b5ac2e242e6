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
* The root must be on tmpfs or ramfs, so secrets never reach a disk; not on
  devtmpfs (which reports the tmpfs magic), and not a system directory such
  as /run, /dev or /dev/shm itself (see :func:`system_directory_problem`).
* The root and every directory above it belong to root (or the agent's own
  user) and are not writable by group or others, as sudo and ssh demand of
  the paths they trust: whoever can write a directory on the way can replace
  what is below it. A world-writable sticky parent owned by root (/dev/shm,
  /tmp) is fine, since only its owner may then remove the root; the root
  itself may not be one. Every directory from the root down to a file
  passes the root's own rule (:func:`replaceable_problem`), judged on the
  very directory opened on the way to each write: a file is never written
  into one another user could empty or refill.
* A set (:meth:`Writer.apply_set`) is a directory of files (no
  subdirectory); it changes by one renameat2(RENAME_EXCHANGE) with a
  directory built beside it under :data:`SET_PREFIX`, so a reader that
  opened the set's directory sees one generation whole. A file in it that
  is not a member (someone else's) is never deleted: an unchanged set is
  not swapped for it, and a swap hard-links it into the new generation.
  Only :meth:`Writer.remove_from_set` takes out names, those a caller
  says it wrote (the running agent's ledger knows them). The old
  generation outlives the swap by ``set_grace_s`` (so such a reader never
  finds a file missing) and no longer; a directory with :data:`SET_PREFIX`
  at start-up is a half-built or old generation and is removed.
* Start-up cleaning stays on the root's file system, MAX_CLEAN_DEPTH levels
  down at most, and gives up (WriteError) beyond MAX_CLEAN_ENTRIES entries.
* No concurrency guarantee: callers serialise calls (the agent writes from one
  thread), except for old generations: :meth:`Writer.retire`,
  :meth:`Writer.retire_deadline` and :meth:`Writer.stop` may be called from
  another thread while a write runs (the daemon's loop retires on time
  while a refresh is stuck on the network). One lock covers the list of
  old generations, their removal and the swap that adds one, so a
  generation is either not swapped yet or registered, never in between.
"""

from __future__ import annotations

import ctypes
import errno
import os
import posixpath
import secrets
import stat
import threading
import time
from typing import (
    Callable,
    Iterable,
    List,
    NamedTuple,
    Optional,
    Sequence,
    Set,
    Tuple,
)

from agent.base.errors import WriteError
from agent.base.landing import (
    MEMORY_FILESYSTEMS,
    RESERVED_PREFIX,
    directories_above,
    filesystem_type,
    mount_type,
    replaceable_problem,
    system_directory_problem,
    tmpfs_hint,
)

SET_PREFIX = RESERVED_PREFIX + "set-"  # a set's new or old generation (a directory)
DIR_MODE = 0o755  # consumers must traverse; each file's own mode guards its bytes

_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# A temporary file or a new generation's member: never through a planted link.
_O_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC

MAX_CLEAN_DEPTH = 64  # directory levels below the root that start-up cleaning visits
MAX_CLEAN_ENTRIES = 100_000  # more than any manifest makes: not kv-agent's tree
# How long a set's old generation outlives its swap: a reader that opened the
# set's directory just before the swap still finds every file of it.
SET_GRACE_S = 2.0

# renameat2(2) flags (linux/fs.h).
RENAME_NOREPLACE = 1 << 0
RENAME_EXCHANGE = 1 << 1
# The raw syscall, for a C library without the renameat2 wrapper (glibc < 2.28).
_RENAMEAT2_SYSCALL = {"x86_64": 316, "aarch64": 276, "armv7l": 382, "i686": 353,
                      "ppc64le": 357, "s390x": 347, "riscv64": 276}


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


class SetResult(NamedTuple):
    """``changed`` is False when the set's directory already held exactly
    these files (bytes, owner, mode) and was not touched."""

    directory: str
    changed: bool


def renameat2(old_dir_fd: int, old: str, new_dir_fd: int, new: str, flags: int) -> None:
    """renameat2(2), which Python's os module lacks. Raises OSError.

    The C library's wrapper when it has one (glibc >= 2.28), else the raw
    system call for this architecture.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    args = (ctypes.c_int(old_dir_fd), os.fsencode(old), ctypes.c_int(new_dir_fd),
            os.fsencode(new), ctypes.c_uint(flags))
    if hasattr(libc, "renameat2"):
        result = libc.renameat2(*args)
    else:
        number = _RENAMEAT2_SYSCALL.get(os.uname().machine)
        if number is None:
            raise OSError(errno.ENOSYS, "renameat2 is not available on this architecture")
        result = libc.syscall(ctypes.c_long(number), *args)
    if result != 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error), old)


class Writer:
    """Applies :class:`FileSpec` values under ``root``.

    ``fs_type`` and ``mount_type`` are injectable so tests can exercise the
    refusal paths; ``euid`` is the user besides root who may own the root and
    its parents (the agent's own). ``set_grace_s`` is how long (``clock``
    seconds) a set's old generation is kept after its swap; ``on_retiring``
    is called (in the writing thread) each time an old generation starts its
    grace, so an event loop can wake and set a timer for its end.
    """

    def __init__(self, root: str, *, fs_type: Callable[[int], int] = filesystem_type,
                 mount_type: Callable[[int], Optional[str]] = mount_type,
                 euid: Optional[int] = None, set_grace_s: float = SET_GRACE_S,
                 clock: Callable[[], float] = time.monotonic,
                 on_retiring: Callable[[], None] = lambda: None) -> None:
        if not root.startswith("/"):
            raise ValueError("root must be absolute")
        normal = posixpath.normpath(root)
        self.root = "/" + normal.lstrip("/")  # POSIX keeps "//"; Linux reads it as "/"
        self._fs_type = fs_type
        self._mount_type = mount_type
        self._euid = os.geteuid() if euid is None else euid
        self._set_grace_s = set_grace_s
        self._clock = clock
        self._on_retiring = on_retiring
        # Old set generations awaiting removal: (swapped at, parent, name).
        self._retired: List[Tuple[float, str, str]] = []
        self._retire_lock = threading.Lock()  # _retired, their removal, a swap
        self._is_stopped = False  # stop(): no swap after it

    # -- start-up ---------------------------------------------------------

    def prepare(self) -> List[str]:
        """Create the root if needed, check it (tmpfs or ramfs, not a system
        directory, only root or we can replace it), and remove leftover
        temporary files. Returns the leftovers removed. Raises WriteError."""
        self.check()  # refuse before creating anything on a disk or in a shared place
        self._make_root()
        fd = self._open_root()
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
        return self.clean_leftovers()

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
        they open it (:meth:`_open_parents`)."""
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
                if _remove_generation(dir_fd, name):
                    removed.append(posixpath.join(dirpath, name))
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
            _sync_directory(dir_fd)
            return True
        except FileNotFoundError:
            return False
        finally:
            os.close(dir_fd)

    # -- sets -------------------------------------------------------------

    def apply_set(self, directory: str, specs: Sequence[FileSpec], *,
                  mode: int = DIR_MODE, uid: Optional[int] = None,
                  gid: Optional[int] = None) -> SetResult:
        """Make ``directory`` hold the files ``specs``, each with its owner
        and mode, by one atomic operation, keeping what the caller did not
        write.

        ``directory`` is absolute, normalised and strictly below the root;
        every spec's path is directly inside it. The directory itself gets
        ``mode`` and ``uid``:``gid`` (default: this process's user and group).
        An entry that is not a spec (an operator's file, or a member that
        left the set: the writer cannot tell them apart) is foreign: it never
        makes the set differ, and a swap keeps it (see remove_from_set).

        (1) Check the directory and every spec (directly inside it, no
            duplicate, no reserved name); at least one spec.
        (2) Open (creating as needed, mode DIR_MODE) the directory's parents
            with O_NOFOLLOW. A symlink or non-directory at ``directory`` is
            refused, never followed; so is a subdirectory inside it (not the
            writer's: nothing would know whether to keep it).
        (3) If the directory has its own owner and mode and holds every
            spec with its bytes, owner and mode, stop: no new inode,
            watchers are not woken, foreign files untouched.
        (4) mkdir a fresh generation beside it, SET_PREFIX + random, 0700.
        (5) Each file: O_CREAT|O_EXCL|O_NOFOLLOW 0600, fchown then fchmod
            before the first byte, write everything, fsync. Each foreign
            entry is hard-linked in: the very same file, never copied.
        (6) fsync the new directory; fchown and fchmod it to its final owner
            and mode.
        (7) Swap: renameat2(RENAME_EXCHANGE) with the existing directory, or
            renameat2(RENAME_NOREPLACE) when there is none (a directory that
            appeared meanwhile is an error, never overwritten). This is the
            commit point: a reader that opened the directory before sees the
            old generation whole, after it the new one.
        (8) Retire the old generation (now under the reserved name): it is
            removed, files first, then the directory, by the first
            :meth:`retire` (from any thread), apply_set or remove_set
            ``set_grace_s`` or more after the swap, so a reader that opened
            the directory just before the swap still finds every file. A
            failure to remove it is not a failed write: the set is in place;
            the next start cleans up. (7) and this registration are one step
            under the retire lock, refused after :meth:`stop`.
        Any failure before (7) removes the half-built generation and leaves
        the old set as it was. Raises WriteError, including when the file
        system lacks RENAME_EXCHANGE. (A file someone created in the old
        directory between (5) and (7) is linked into the new one right
        after the swap.)
        """
        names = self._check_set(directory, specs)  # (1)
        self.retire()
        wanted = (os.geteuid() if uid is None else uid,
                  os.getegid() if gid is None else gid, mode)
        name = posixpath.basename(directory)
        parent_fd = self._open_parents(directory)  # (2)
        try:
            present = _existing_set_directory(parent_fd, name, directory)
            if present is not None \
                    and self._set_matches(parent_fd, name, names, wanted):  # (3)
                return SetResult(directory, changed=False)
            members = {member for member, _spec in names}
            kept = _foreign_names(present or set(), members)
            generation = self._build_generation(parent_fd, directory, names, wanted,
                                                kept)  # (4)-(6)
            self._swap_and_retire(parent_fd, generation, name, directory, present)  # (7), (8)
            return SetResult(directory, changed=True)
        finally:
            os.close(parent_fd)

    def remove_from_set(self, directory: str, paths: Iterable[str]) -> bool:
        """Take ``paths``, files the caller wrote that left the set, out of
        the set's ``directory`` by one swap (see apply_set's (4)-(8)); every
        other entry is hard-linked into the new generation (members keep
        their inodes, foreign files stay), and the directory keeps its owner
        and mode. True when swapped; False when the directory or every one
        of ``paths`` is already gone. Raises WriteError.
        """
        names, name = self._set_names(directory, paths)
        self.retire()
        try:
            parent_fd = self._open_parents(directory, create=False)
        except FileNotFoundError:
            return False
        try:
            present = _existing_set_directory(parent_fd, name, directory)
            if present is None or not present & names:
                return False
            st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
            wanted = (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode))
            generation = self._build_generation(parent_fd, directory, [], wanted,
                                                _foreign_names(present, names))
            self._swap_and_retire(parent_fd, generation, name, directory, present)
            return True
        finally:
            os.close(parent_fd)

    def retire(self, *, everything: bool = False) -> List[str]:
        """Remove the old set generations swapped out ``set_grace_s`` or more
        ago (all of them with ``everything``, e.g. before ``once`` exits);
        returns those removed. Never raises: one that cannot be removed is
        forgotten and left to start-up cleaning. Thread-safe: the daemon's
        loop calls this when :meth:`retire_deadline` passes, whether or not
        a refresh is writing, so an old key never outlives its grace.
        """
        with self._retire_lock:
            return self._retire_locked(everything)

    def retire_deadline(self) -> Optional[float]:
        """When (``clock`` seconds) the oldest pending generation's grace
        ends; None when none is pending (an idle agent has no timer).
        Thread-safe."""
        with self._retire_lock:
            if not self._retired:
                return None
            return min(swapped for swapped, _parent, _name in self._retired) \
                + self._set_grace_s

    def stop(self) -> List[str]:
        """At the agent's stop: remove every old generation now, whatever
        its grace (no reader is protected past the agent's life, and no old
        key stays in tmpfs), and refuse every later swap or set removal
        (WriteError), so a refresh still running cannot leave a new old
        generation behind. Thread-safe; returns the generations removed."""
        with self._retire_lock:
            self._is_stopped = True
            return self._retire_locked(everything=True)

    def _retire_locked(self, everything: bool) -> List[str]:
        now = self._clock()
        due: List[Tuple[float, str, str]] = []
        kept: List[Tuple[float, str, str]] = []
        for item in self._retired:
            (due if everything or now - item[0] >= self._set_grace_s else kept).append(item)
        self._retired = kept
        removed = []
        for _swapped, parent, name in due:
            try:
                parent_fd = self._open_parents(posixpath.join(parent, name), create=False)
            except (OSError, WriteError):
                continue
            try:
                if _remove_generation(parent_fd, name):
                    removed.append(posixpath.join(parent, name))
                    _sync_directory(parent_fd)
            finally:
                os.close(parent_fd)
        return removed

    def _start_grace(self, directory: str, generation: str) -> None:
        """(8) Register ``generation`` (beside ``directory``), which just
        left it, for retirement. Called with the retire lock held."""
        self._retired.append((self._clock(), posixpath.dirname(directory), generation))

    def _after_grace_started(self, parent_fd: int) -> None:
        """Outside the lock: make the rename durable, tell the event loop,
        and retire at once when there is no grace at all."""
        _sync_directory(parent_fd)
        self._on_retiring()
        if self._set_grace_s <= 0:
            self.retire()

    def _swap_and_retire(self, parent_fd: int, generation: str, name: str, directory: str,
                         listed: Optional[Set[str]]) -> None:
        """(7) and (8) as one step under the retire lock: the generation is
        either not swapped in or swapped in with its predecessor registered.
        ``listed``: the names the old directory held when the new generation
        was built (None: there was none); a file created there since is
        linked into the new one. After :meth:`stop`, the new generation is
        removed instead and WriteError raised (the set stays as it was)."""
        exists = listed is not None
        with self._retire_lock:
            if self._is_stopped:
                _remove_generation(parent_fd, generation)
                raise WriteError(f"{directory}: not swapped, kv-agent is stopping; "
                                 "the set is kept as it was")
            self._swap(parent_fd, generation, name, directory, exists)  # (7)
            if listed is not None:
                _link_late_arrivals(parent_fd, generation, name, listed)
                self._start_grace(directory, generation)  # (8)
        if exists:
            self._after_grace_started(parent_fd)
        else:
            _sync_directory(parent_fd)

    def remove_set(self, directory: str, paths: Iterable[str], *,
                   mode: int = DIR_MODE) -> bool:
        """Remove a set's directory, when its entry left the manifest; True
        when something was removed, False when it does not exist.

        Only the writer's shape goes: a real directory (not a symlink) owned
        by this process's user with ``mode``, holding nothing but some of
        ``paths`` (each directly inside it) as regular files. Anything else
        is an operator's directory: WriteError, nothing touched. The directory
        is renamed to a reserved name (RENAME_NOREPLACE), so no reader ever
        sees half a set and a crash leaves only what start-up cleaning
        removes, and retired like an old generation (see apply_set's (8)).
        """
        names, name = self._set_names(directory, paths)
        self.retire()
        try:
            parent_fd = self._open_parents(directory, create=False)
        except FileNotFoundError:
            return False
        try:
            if _existing_set_directory(parent_fd, name, directory) is None:
                return False
            self._check_removable(parent_fd, name, directory, names, mode)
            generation = f"{SET_PREFIX}{secrets.token_hex(8)}"
            with self._retire_lock:
                if self._is_stopped:
                    raise WriteError(f"{directory}: not removed, kv-agent is stopping")
                try:
                    renameat2(parent_fd, name, parent_fd, generation, RENAME_NOREPLACE)
                except OSError as exc:
                    raise WriteError(f"{directory}: cannot remove the set: "
                                     f"{exc.strerror}") from None
                # Retired like a swapped-out generation: a reader that opened
                # the directory just before still finds the files it expects.
                self._start_grace(directory, generation)
            self._after_grace_started(parent_fd)
            return True
        finally:
            os.close(parent_fd)

    def _check_set(self, directory: str, specs: Sequence[FileSpec]) -> List[Tuple[str, FileSpec]]:
        """(1) The names of ``specs`` in ``directory``, in order. Pure."""
        self._check_path(directory)
        if not specs:
            raise WriteError(f"{directory}: a set needs at least one file; "
                             "use remove_set to remove one")
        names: List[Tuple[str, FileSpec]] = []
        seen = set()
        for spec in specs:
            name = self._check_path(spec.path)
            if posixpath.dirname(spec.path) != directory:
                raise WriteError(f"{spec.path} is not directly inside the set's directory "
                                 f"{directory}; put every file of a set in one directory")
            if name in seen:
                raise WriteError(f"{spec.path} appears twice in the set {directory}")
            seen.add(name)
            names.append((name, spec))
        return names

    @staticmethod
    def _set_matches(parent_fd: int, name: str, names: List[Tuple[str, FileSpec]],
                     wanted: Tuple[int, int, int]) -> bool:
        """True when the directory ``name`` has the wanted owner and mode and
        holds ``names`` with their bytes, owners and modes (anything else in
        it is not the writer's to judge). Anything unreadable counts as
        "differs"."""
        try:
            fd = os.open(name, _O_DIR, dir_fd=parent_fd)
        except OSError:
            return False
        try:
            st = os.fstat(fd)
            if (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) != wanted:
                return False
            return all(Writer._matches(fd, member, spec) for member, spec in names)
        except OSError:
            return False
        finally:
            os.close(fd)

    def _build_generation(self, parent_fd: int, directory: str,
                          names: List[Tuple[str, FileSpec]],
                          wanted: Tuple[int, int, int], kept: Sequence[str] = ()) -> str:
        """(4)-(6) A complete new generation beside ``directory``, with the
        entries ``kept`` of the current one linked in; its name. On any
        failure it is removed again and WriteError raised."""
        generation = f"{SET_PREFIX}{secrets.token_hex(8)}"
        try:
            os.mkdir(generation, 0o700, dir_fd=parent_fd)  # (4)
            fd = os.open(generation, _O_DIR, dir_fd=parent_fd)
        except OSError as exc:
            raise WriteError(f"{directory}: cannot create a new generation beside it: "
                             f"{exc.strerror}") from None
        try:
            try:
                for member, spec in names:
                    _create_member(fd, member, spec)  # (5)
                if kept:
                    _link_kept(parent_fd, posixpath.basename(directory), fd, kept, directory)
                os.fsync(fd)  # (6)
                os.fchown(fd, wanted[0], wanted[1])
                os.fchmod(fd, wanted[2])  # mkdir(2) applied 0700 and the umask
            finally:
                os.close(fd)
        except OSError as exc:
            _remove_generation(parent_fd, generation)
            raise WriteError(f"{directory}: cannot prepare the new generation: "
                             f"{exc.strerror}") from None
        except BaseException:  # WriteError from a member, or an interrupt
            _remove_generation(parent_fd, generation)
            raise
        return generation

    @staticmethod
    def _swap(parent_fd: int, generation: str, name: str, directory: str,
              exists: bool) -> None:
        """(7) Put the new generation at ``name`` in one rename."""
        flags = RENAME_EXCHANGE if exists else RENAME_NOREPLACE
        try:
            renameat2(parent_fd, generation, parent_fd, name, flags)
        except OSError as exc:
            _remove_generation(parent_fd, generation)
            if exc.errno in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                raise WriteError(f"{directory}: this kernel or file system cannot swap "
                                 "directories (renameat2 RENAME_EXCHANGE); use a tmpfs "
                                 "on Linux 3.15 or later") from None
            if exc.errno == errno.EEXIST:
                raise WriteError(f"{directory} appeared while its set was written; "
                                 "not replacing it") from None
            if exc.errno == errno.ENOENT:
                raise WriteError(f"{directory} disappeared while its set was written; "
                                 "the next write creates it") from None
            raise WriteError(f"{directory}: cannot swap in the new set: "
                             f"{exc.strerror}") from None
        except BaseException:
            _remove_generation(parent_fd, generation)
            raise

    @staticmethod
    def _check_removable(parent_fd: int, name: str, directory: str, names: Set[str],
                         mode: int) -> None:
        """Raise WriteError unless ``name`` has the shape the writer gives a
        set's directory and holds only some of ``names``, as regular files."""
        fd = os.open(name, _O_DIR, dir_fd=parent_fd)
        try:
            st = os.fstat(fd)
            if st.st_uid != os.geteuid() or stat.S_IMODE(st.st_mode) != mode:
                raise WriteError(f"{directory} was not made by kv-agent (owner {st.st_uid}, "
                                 f"mode {stat.S_IMODE(st.st_mode):04o}); not removing it")
            with os.scandir(fd) as entries:
                for entry in entries:
                    if entry.name not in names or not entry.is_file(follow_symlinks=False):
                        raise WriteError(f"{directory} holds {entry.name!r}, which is not "
                                         "part of the set; not removing it")
        finally:
            os.close(fd)

    # -- steps ------------------------------------------------------------

    def _set_names(self, directory: str, paths: Iterable[str]) -> Tuple[Set[str], str]:
        """(the members' names in the set's directory, the directory's own
        name): every path checked and directly inside ``directory``, or
        WriteError."""
        names = set()
        for path in paths:
            names.add(self._check_path(path))
            if posixpath.dirname(path) != directory:
                raise WriteError(f"{path} is not directly inside the set's directory "
                                 f"{directory}")
        return names, self._check_path(directory)

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

    def _open_root(self) -> int:
        try:
            return os.open(self.root, _O_DIR)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise WriteError(f"{self.root} is a symlink or not a directory") from None
            raise WriteError(f"cannot open {self.root}: {exc.strerror}") from None

    def _open_parents(self, path: str, create: bool = True) -> int:
        """An fd for the target's directory, walked from the root component by
        component with O_NOFOLLOW; missing ones are created (mode DIR_MODE).
        Each directory opened, the root included, must pass the root's rule
        (:meth:`_check_opened`)."""
        fd = self._open_root()
        relative = posixpath.relpath(posixpath.dirname(path), self.root)
        directory = self.root
        try:
            self._check_opened(fd, path, directory)
            for part in [] if relative == "." else relative.split("/"):
                directory = posixpath.join(directory, part)
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
                self._check_opened(fd, path, directory)
            return fd
        except BaseException:
            os.close(fd)
            raise

    def _check_opened(self, fd: int, path: str, directory: str) -> None:
        """``directory``, just opened (``fd``) on the way to ``path``, must
        pass the root's rule (:func:`replaceable_problem`). Judged on the fd,
        so a directory swapped in by name after ``check`` is judged too.
        Raises WriteError naming ``path``, the directory and the fix: that
        file is not written; the others are."""
        problem = replaceable_problem(directory, os.fstat(fd), self._euid)
        if problem:
            raise WriteError(f"{path}: not written: {problem}")

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
        flags = _O_NEW_FILE
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
        _sync_directory(dir_fd)  # (8)

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


def _device_of(name: str, dir_fd: int) -> Optional[int]:
    """st_dev of ``name`` in ``dir_fd`` (not following a link), None if gone."""
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_dev
    except OSError:
        return None


def _existing_set_directory(parent_fd: int, name: str, directory: str) -> Optional[Set[str]]:
    """The names in a set's ``directory`` when it exists as a real directory
    holding no subdirectory; None when absent. WriteError for a symlink, a
    file or a directory with a subdirectory: never followed, never taken over."""
    try:
        fd = os.open(name, _O_DIR, dir_fd=parent_fd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise WriteError(f"{directory} is a symlink or not a directory; a set needs a "
                             "directory of its own: remove it") from None
        raise WriteError(f"{directory}: cannot open the set's directory: "
                         f"{exc.strerror}") from None
    names: Set[str] = set()
    try:
        with os.scandir(fd) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    raise WriteError(f"{directory} holds a directory {entry.name!r}, which "
                                     "is not part of the set; move it elsewhere")
                names.add(entry.name)
    except OSError as exc:
        raise WriteError(f"{directory}: cannot list the set's directory: "
                         f"{exc.strerror}") from None
    finally:
        os.close(fd)
    return names


def _foreign_names(present: Set[str], ours: Set[str]) -> List[str]:
    """The entries of a set's directory that are not the writer's: neither
    ``ours`` (members, or former members the caller wrote) nor a reserved
    name (a crash's leftover, which start-up cleaning removes). Sorted."""
    return sorted(name for name in present - ours if not name.startswith(RESERVED_PREFIX))


def foreign_in_set(directory: str, members: Iterable[str]) -> List[str]:
    """The paths in a set's ``directory`` that are not among ``members``
    (paths) nor reserved names: someone else's files, which the writer keeps
    (see :meth:`Writer.apply_set`) and the agent reports. Empty when the
    directory is absent, not a directory or unreadable: a report, never a
    reason to fail."""
    try:
        fd = os.open(directory, _O_DIR)
    except OSError:
        return []
    try:
        present = set(os.listdir(fd))
    except OSError:
        return []
    finally:
        os.close(fd)
    ours = {posixpath.basename(path) for path in members}
    return [posixpath.join(directory, name) for name in _foreign_names(present, ours)]


def _link_late_arrivals(parent_fd: int, old: str, new: str, listed: Set[str]) -> None:
    """Right after a swap: link each file created in the old generation
    ``old`` since it was ``listed`` (someone wrote into the set's directory
    while the new one was built) into ``new``, so it does not go with the
    old generation. Best effort: a name the new generation already has
    stays as the new generation has it."""
    try:
        old_fd = os.open(old, _O_DIR, dir_fd=parent_fd)
    except OSError:
        return
    try:
        new_fd = os.open(new, _O_DIR, dir_fd=parent_fd)
    except OSError:
        os.close(old_fd)
        return
    try:
        for entry in _foreign_names(set(os.listdir(old_fd)), listed):
            try:
                os.link(entry, entry, src_dir_fd=old_fd, dst_dir_fd=new_fd,
                        follow_symlinks=False)
            except OSError:
                pass
    except OSError:
        pass
    finally:
        os.close(old_fd)
        os.close(new_fd)


def _link_kept(parent_fd: int, name: str, generation_fd: int, kept: Sequence[str],
               directory: str) -> None:
    """(5) Hard-link each of ``kept`` from the set's directory ``name`` into
    the new generation: the very same file (inode, owner, mode, bytes; a
    symlink itself, never followed), so the swap deletes nothing it did not
    write. One removed meanwhile is skipped. Raises WriteError naming it
    (e.g. EPERM: fs.protected_hardlinks and an agent not running as root)."""
    try:
        source_fd = os.open(name, _O_DIR, dir_fd=parent_fd)
    except OSError as exc:
        raise WriteError(f"{directory}: cannot open the set's directory: "
                         f"{exc.strerror}") from None
    try:
        for entry in kept:
            try:
                os.link(entry, entry, src_dir_fd=source_fd, dst_dir_fd=generation_fd,
                        follow_symlinks=False)
            except FileNotFoundError:
                continue  # removed meanwhile: nothing left to keep
            except OSError as exc:
                raise WriteError(f"{directory}/{entry} is not kv-agent's and cannot be "
                                 f"kept in the set's new generation ({exc.strerror}); "
                                 f"move it out of {directory}") from None
    finally:
        os.close(source_fd)


def _create_member(dir_fd: int, name: str, spec: FileSpec) -> None:
    """(5) One file of a new generation, complete, with its owner and mode
    before its first byte. Raises WriteError naming the file."""
    flags = _O_NEW_FILE
    try:
        fd = os.open(name, flags, 0o600, dir_fd=dir_fd)
        try:
            os.fchown(fd, spec.uid, spec.gid)
            os.fchmod(fd, spec.mode)
            view = memoryview(spec.content)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise WriteError(_describe_failure(spec, exc)) from None


def _remove_generation(parent_fd: int, name: str) -> bool:
    """Remove the directory ``name`` (a set's generation) and the files in
    it, never following a link; True when it is gone.

    A generation holds only files: one with a subdirectory, or on another
    file system, is not the writer's and is left whole. Errors are
    swallowed: this runs after the commit point or while cleaning up, and
    start-up cleaning retries.
    """
    try:
        fd = os.open(name, _O_DIR, dir_fd=parent_fd)
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
            return False
        try:  # a link or file swapped in under the reserved name: the name goes
            os.unlink(name, dir_fd=parent_fd)
            return True
        except OSError:
            return False
    try:
        if os.fstat(fd).st_dev != os.fstat(parent_fd).st_dev:
            return False
        with os.scandir(fd) as scan:
            entries = list(scan)
        if any(entry.is_dir(follow_symlinks=False) for entry in entries):
            return False
        for entry in entries:
            os.unlink(entry.name, dir_fd=fd)
        os.rmdir(name, dir_fd=parent_fd)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _sync_directory(dir_fd: int) -> None:
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
