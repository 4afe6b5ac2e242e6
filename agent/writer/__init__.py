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
  as /run, /dev or /dev/shm itself (see
  :func:`agent.base.landing.system_directory_problem`).
* The root and every directory above it belong to root (or the agent's own
  user) and are not writable by group or others, as sudo and ssh demand of
  the paths they trust: whoever can write a directory on the way can replace
  what is below it. A world-writable sticky parent owned by root (/dev/shm,
  /tmp) is fine, since only its owner may then remove the root; the root
  itself may not be one. Every directory from the root down to a file
  passes the root's own rule (:func:`agent.base.landing.replaceable_problem`),
  judged on the very directory opened on the way to each write: a file is
  never written into one another user could empty or refill.
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

The rooms, each holding its part of these invariants:

* ``writer/tree.py``: the root's tree reached by openat with O_NOFOLLOW,
  paths checked, each directory judged as it is opened (shared by all);
* ``writer/root.py``: root policy, what may be a root, cleaning at start;
* ``writer/files.py``: single files, the write as numbered steps (1)-(8);
* ``writer/sets.py``: sets, their write as numbered steps (1)-(8);
* ``writer/generations.py``: renameat2, the swap, old generations' grace;
* ``writer/specs.py``: the values asked and answered.

:class:`Writer` here is the facade the rest of the agent holds.
"""

from __future__ import annotations

import os
import time
from typing import Callable, Iterable, List, Optional, Sequence

from agent.base.landing import RESERVED_PREFIX, filesystem_type, mount_type
from agent.writer.files import FileWriter
from agent.writer.generations import (
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    SET_GRACE_S,
    SET_PREFIX,
    Generations,
    renameat2,
)
from agent.writer.root import MAX_CLEAN_DEPTH, MAX_CLEAN_ENTRIES, RootPolicy
from agent.writer.sets import SetWriter, foreign_in_set
from agent.writer.specs import FileSpec, SetResult, WriteResult
from agent.writer.tree import DIR_MODE, Tree

__all__ = [
    "DIR_MODE", "MAX_CLEAN_DEPTH", "MAX_CLEAN_ENTRIES", "RENAME_EXCHANGE", "RENAME_NOREPLACE",
    "RESERVED_PREFIX", "SET_GRACE_S", "SET_PREFIX", "FileSpec", "SetResult", "WriteResult",
    "Writer", "foreign_in_set", "renameat2",
]


class Writer:
    """Applies :class:`FileSpec` values under ``root``: the one object the
    rest of the agent holds, each call handed to the room that does it.

    Rooms: :class:`~agent.writer.root.RootPolicy` (what may be a root,
    cleaning at start), :class:`~agent.writer.files.FileWriter` (single
    files), :class:`~agent.writer.sets.SetWriter` (sets) and
    :class:`~agent.writer.generations.Generations` (the swap, the old
    generations' grace), all reaching paths through one
    :class:`~agent.writer.tree.Tree` (openat with O_NOFOLLOW).

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
        tree = Tree(root, os.geteuid() if euid is None else euid)
        self.root = tree.root
        self._policy = RootPolicy(tree, fs_type, mount_type)
        self._files = FileWriter(tree)
        self._generations = Generations(tree, set_grace_s, clock, on_retiring)
        self._sets = SetWriter(tree, self._generations)

    # -- start-up: RootPolicy ---------------------------------------------

    def prepare(self) -> List[str]:
        """Create the root if needed, check it (tmpfs or ramfs, not a system
        directory, only root or we can replace it), and remove leftover
        temporary files. Returns the leftovers removed. Raises WriteError."""
        self.check()  # refuse before creating anything on a disk or in a shared place
        self._policy.create()
        return self.clean_leftovers()

    def check(self) -> None:
        """Without creating anything: WriteError if the root may not be one
        (:meth:`RootPolicy.check <agent.writer.root.RootPolicy.check>`)."""
        self._policy.check()

    def check_directory(self, directory: str) -> None:
        """Without creating anything: WriteError if a directory from the root
        down to ``directory`` could be replaced by another user
        (:meth:`RootPolicy.check_directory
        <agent.writer.root.RootPolicy.check_directory>`)."""
        self._policy.check_directory(directory)

    def clean_leftovers(self) -> List[str]:
        """Remove what a crash left (temporary files, set generations); the
        paths removed (:meth:`RootPolicy.clean_leftovers
        <agent.writer.root.RootPolicy.clean_leftovers>`)."""
        return self._policy.clean_leftovers()

    # -- single files: FileWriter -----------------------------------------

    def apply(self, spec: FileSpec) -> WriteResult:
        """Make ``spec.path`` hold ``spec.content`` with its owner and mode,
        atomically, or leave it untouched when it already does
        (:meth:`FileWriter.apply <agent.writer.files.FileWriter.apply>`,
        steps (1)-(8)). Raises WriteError."""
        return self._files.apply(spec)

    def remove(self, path: str) -> bool:
        """Unlink ``path`` (never a directory) if it exists; True when
        something was removed (:meth:`FileWriter.remove
        <agent.writer.files.FileWriter.remove>`)."""
        return self._files.remove(path)

    def remove_empty_parents(self, path: str) -> List[str]:
        """After ``path`` was removed: rmdir the now empty directories of the
        writer's shape above it, deepest first; those removed
        (:meth:`FileWriter.remove_empty_parents
        <agent.writer.files.FileWriter.remove_empty_parents>`)."""
        return self._files.remove_empty_parents(path)

    # -- sets: SetWriter and Generations ----------------------------------

    def apply_set(self, directory: str, specs: Sequence[FileSpec], *,
                  mode: int = DIR_MODE, uid: Optional[int] = None,
                  gid: Optional[int] = None) -> SetResult:
        """Make ``directory`` hold the files ``specs`` by one swap of
        directories, keeping what the caller did not write; the result names
        the members that differed (:meth:`SetWriter.apply_set
        <agent.writer.sets.SetWriter.apply_set>`, steps (1)-(8)). Raises
        WriteError."""
        return self._sets.apply_set(directory, specs, mode=mode, uid=uid, gid=gid)

    def remove_from_set(self, directory: str, paths: Iterable[str]) -> bool:
        """Take ``paths`` (files the caller wrote) out of a set by one swap;
        True when swapped (:meth:`SetWriter.remove_from_set
        <agent.writer.sets.SetWriter.remove_from_set>`)."""
        return self._sets.remove_from_set(directory, paths)

    def remove_set(self, directory: str, paths: Iterable[str], *,
                   mode: int = DIR_MODE) -> bool:
        """Remove a set's directory of the writer's shape whole; True when
        something was removed (:meth:`SetWriter.remove_set
        <agent.writer.sets.SetWriter.remove_set>`)."""
        return self._sets.remove_set(directory, paths, mode=mode)

    def retire(self, *, everything: bool = False) -> List[str]:
        """Remove the old set generations whose grace ended (all with
        ``everything``); those removed. Never raises; thread-safe
        (:meth:`Generations.retire <agent.writer.generations.Generations.retire>`)."""
        return self._generations.retire(everything=everything)

    def retire_deadline(self) -> Optional[float]:
        """When the oldest pending generation's grace ends, None when none
        is pending; thread-safe (:meth:`Generations.retire_deadline
        <agent.writer.generations.Generations.retire_deadline>`)."""
        return self._generations.retire_deadline()

    def stop(self) -> List[str]:
        """Remove every old generation now and refuse every later swap;
        thread-safe (:meth:`Generations.stop
        <agent.writer.generations.Generations.stop>`)."""
        return self._generations.stop()
