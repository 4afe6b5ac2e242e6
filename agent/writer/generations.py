"""A set's generations: the swap that puts a new one in place, and the grace
that keeps the old one a while before it is removed.

A set's directory changes by one renameat2(RENAME_EXCHANGE) with a complete
directory built beside it under :data:`SET_PREFIX` (see
:meth:`agent.writer.sets.SetWriter.apply_set`). The old generation, now under
the reserved name, outlives the swap by ``set_grace_s`` (so a reader that
opened the directory just before never finds a file missing) and no longer.

Thread-safety: :meth:`Generations.retire`, :meth:`Generations.retire_deadline`
and :meth:`Generations.stop` may be called from another thread while a write
runs (the daemon's loop retires on time while a refresh is stuck on the
network). One lock covers the list of old generations, their removal and the
swap that adds one, so a generation is either not swapped yet or registered,
never in between.
"""

from __future__ import annotations

import ctypes
import errno
import os
import posixpath
import secrets
import threading
from typing import Callable, List, Optional, Set, Tuple

from agent.base.errors import WriteError
from agent.base.landing import RESERVED_PREFIX
from agent.writer.tree import O_DIR, Tree, sync_directory

SET_PREFIX = RESERVED_PREFIX + "set-"  # a set's new or old generation (a directory)
# How long a set's old generation outlives its swap: a reader that opened the
# set's directory just before the swap still finds every file of it.
SET_GRACE_S = 2.0

# renameat2(2) flags (linux/fs.h).
RENAME_NOREPLACE = 1 << 0
RENAME_EXCHANGE = 1 << 1
# The raw syscall, for a C library without the renameat2 wrapper (glibc < 2.28).
_RENAMEAT2_SYSCALL = {"x86_64": 316, "aarch64": 276, "armv7l": 382, "i686": 353,
                      "ppc64le": 357, "s390x": 347, "riscv64": 276}


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


def new_generation_name() -> str:
    """A fresh reserved name for a generation beside a set's directory."""
    return f"{SET_PREFIX}{secrets.token_hex(8)}"


class Generations:
    """The swaps of one writer's sets and their old generations in grace.

    ``set_grace_s`` is how long (``clock`` seconds) an old generation is kept
    after its swap; ``on_retiring`` is called (in the writing thread) each
    time one starts its grace, so an event loop can wake and set a timer for
    its end.
    """

    def __init__(self, tree: Tree, set_grace_s: float, clock: Callable[[], float],
                 on_retiring: Callable[[], None]) -> None:
        self._tree = tree
        self._set_grace_s = set_grace_s
        self._clock = clock
        self._on_retiring = on_retiring
        # Old set generations awaiting removal: (swapped at, parent, name).
        self._retired: List[Tuple[float, str, str]] = []
        self._retire_lock = threading.Lock()  # _retired, their removal, a swap
        self._is_stopped = False  # stop(): no swap after it

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

    def swap_and_retire(self, parent_fd: int, generation: str, name: str, directory: str,
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
                remove_generation(parent_fd, generation)
                raise WriteError(f"{directory}: not swapped, kv-agent is stopping; "
                                 "the set is kept as it was")
            _swap(parent_fd, generation, name, directory, exists)  # (7)
            if listed is not None:
                _link_late_arrivals(parent_fd, generation, name, listed)
                self._start_grace(directory, generation)  # (8)
        if exists:
            self._after_grace_started(parent_fd)
        else:
            sync_directory(parent_fd)

    def retire_directory(self, parent_fd: int, name: str, directory: str) -> None:
        """Rename a set's whole ``directory`` (``name`` in ``parent_fd``) to a
        reserved name (RENAME_NOREPLACE), so no reader ever sees half a set
        and a crash leaves only what start-up cleaning removes, and retire
        it like a swapped-out generation. WriteError after :meth:`stop`."""
        generation = new_generation_name()
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
                parent_fd = self._tree.open_parents(posixpath.join(parent, name), create=False)
            except (OSError, WriteError):
                continue
            try:
                if remove_generation(parent_fd, name):
                    removed.append(posixpath.join(parent, name))
                    sync_directory(parent_fd)
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
        sync_directory(parent_fd)
        self._on_retiring()
        if self._set_grace_s <= 0:
            self.retire()


def _swap(parent_fd: int, generation: str, name: str, directory: str, exists: bool) -> None:
    """(7) Put the new generation at ``name`` in one rename."""
    flags = RENAME_EXCHANGE if exists else RENAME_NOREPLACE
    try:
        renameat2(parent_fd, generation, parent_fd, name, flags)
    except OSError as exc:
        remove_generation(parent_fd, generation)
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
        remove_generation(parent_fd, generation)
        raise


def foreign_names(present: Set[str], ours: Set[str]) -> List[str]:
    """The entries of a set's directory that are not the writer's: neither
    ``ours`` (members, or former members the caller wrote) nor a reserved
    name (a crash's leftover, which start-up cleaning removes). Sorted."""
    return sorted(name for name in present - ours if not name.startswith(RESERVED_PREFIX))


def _link_late_arrivals(parent_fd: int, old: str, new: str, listed: Set[str]) -> None:
    """Right after a swap: link each file created in the old generation
    ``old`` since it was ``listed`` (someone wrote into the set's directory
    while the new one was built) into ``new``, so it does not go with the
    old generation. Best effort: a name the new generation already has
    stays as the new generation has it."""
    try:
        old_fd = os.open(old, O_DIR, dir_fd=parent_fd)
    except OSError:
        return
    try:
        new_fd = os.open(new, O_DIR, dir_fd=parent_fd)
    except OSError:
        os.close(old_fd)
        return
    try:
        for entry in foreign_names(set(os.listdir(old_fd)), listed):
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


def remove_generation(parent_fd: int, name: str) -> bool:
    """Remove the directory ``name`` (a set's generation) and the files in
    it, never following a link; True when it is gone.

    A generation holds only files: one with a subdirectory, or on another
    file system, is not the writer's and is left whole. Errors are
    swallowed: this runs after the commit point or while cleaning up, and
    start-up cleaning retries.
    """
    try:
        fd = os.open(name, O_DIR, dir_fd=parent_fd)
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
