"""The ledger: which files this agent wrote, by inode, and for which entry.

A file is removed (its entry left the manifest) only if it is still the very
file the agent wrote: a regular file, at that path, with the inode recorded
when the agent wrote it. Anything else at that path (the operator's own
file, a replacement, a symlink) is left alone and forgotten. The ledger
lives in status.json on /run (:mod:`agent.status.snapshot`), so it survives a
restart of the agent but not a reboot, when tmpfs is empty anyway; an agent
upgraded in place reads the ledger an older version wrote (path -> inode,
no entry).

Sets (a set's directory swapped whole, :meth:`agent.writer.Writer.apply_set`)
are recorded too: the directory and its member paths. The directory's inode
changes at every swap, so it is not what identifies the set as the agent's;
a set is removed only when the ledger has it, every member file still there
is the very file the agent wrote (each member's inode is recorded after
every refresh that found the set current), and the directory still has the
writer's shape (the writer checks: its owner and mode, nothing but member
files). Anything else is left alone and forgotten. A member that leaves a
set still in the manifest is taken out of the set's directory by one swap
(:meth:`Ledger.remove_members`), only while it is the very file the agent
wrote: the writer keeps every file that is not the agent's.

Owned by the daemon's main thread; not thread-safe.
"""

from __future__ import annotations

import logging
import os
import stat
from typing import Dict, Iterable, Mapping, Optional, Tuple

from agent.base.errors import KvAgentError
from agent.status.snapshot import Written, WrittenSet
from agent.writer import Writer

log = logging.getLogger(__name__)


def regular_inode(path: str) -> Optional[int]:
    """The inode of the regular file at ``path`` (not following a symlink), or None."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st.st_ino if stat.S_ISREG(st.st_mode) else None


class Ledger:
    """The files this agent wrote, path -> :class:`Written`, and its sets."""

    def __init__(self, records: Iterable[Written] = (),
                 sets: Iterable[WrittenSet] = ()) -> None:
        self._records: Dict[str, Written] = {record.path: record for record in records}
        self._sets: Dict[str, WrittenSet] = {record.directory: record for record in sets}

    def sets(self) -> Tuple[WrittenSet, ...]:
        """Every set, sorted by directory (the order status.json shows)."""
        return tuple(self._sets[directory] for directory in sorted(self._sets))

    def record_set(self, directory: str, paths: Iterable[str], name: Optional[str],
                   entry_of: Mapping[str, str]) -> None:
        """Note that the set's ``directory`` now holds exactly the agent's
        generation of ``paths`` (written or found current by a refresh), and
        each member's inode (for entry ``entry_of[path]``)."""
        members = tuple(sorted(paths))
        self._sets[directory] = WrittenSet(directory, members, name)
        for path in members:
            self.record(path, entry_of[path])

    def set_orphans(self, kept: Iterable[str]) -> Tuple[str, ...]:
        """Recorded set directories that no current set has, sorted."""
        return tuple(sorted(set(self._sets) - set(kept)))

    def remove_set(self, writer: Writer, directory: str) -> bool:
        """Remove the set at ``directory`` (it left the manifest) only if it
        is still the agent's (see the module docstring), by ``writer`` (whose
        grace keeps the old files for readers in the middle of a read); forget
        it and its members either way. True when it was removed. Failures are
        logged, never raised."""
        record = self._sets.pop(directory, None)
        if record is None:
            return False
        removed = False
        foreign = [path for path in record.paths
                   if os.path.lexists(path) and not self.is_ours(path)]
        if foreign:
            log.info("not removing %s: %s is no longer the file kv-agent wrote", directory,
                     foreign[0])
        else:
            try:
                removed = writer.remove_set(directory, record.paths)
                if removed:
                    log.info("removed %s: its set left the manifest", directory)
            except (KvAgentError, OSError) as exc:
                log.warning("could not remove %s: %s", directory, exc)
        for path in record.paths:
            self._records.pop(path, None)
        return removed

    def remove_members(self, writer: Writer, directory: str, paths: Iterable[str]) -> bool:
        """Take ``paths``, files that left a set still in the manifest, out
        of the set's ``directory`` by one swap (:meth:`Writer.remove_from_set`),
        only those still the very files the agent wrote; forget them either
        way (one someone replaced is then foreign: kept, and reported). True
        when the set was swapped. Failures are logged, never raised."""
        paths = list(paths)
        ours = [path for path in paths if self.is_ours(path)]
        for path in paths:
            if path not in ours and path in self._records and os.path.lexists(path):
                log.info("not removing %s: it is no longer the file kv-agent wrote", path)
            self._records.pop(path, None)
        if not ours:
            return False
        try:
            removed = writer.remove_from_set(directory, ours)
        except (KvAgentError, OSError) as exc:
            log.warning("could not remove %s from %s: %s", ", ".join(ours), directory, exc)
            return False
        if removed:
            log.info("removed %s: it left the set in %s", ", ".join(ours), directory)
        return removed

    def records(self) -> Tuple[Written, ...]:
        """Every record, sorted by path (the order status.json shows)."""
        return tuple(self._records[path] for path in sorted(self._records))

    def inode(self, path: str) -> Optional[int]:
        """The inode recorded for ``path``, or None."""
        record = self._records.get(path)
        return record.inode if record else None

    def record(self, path: str, entry: str) -> None:
        """Note that the agent has just written ``path`` for ``entry``."""
        inode = regular_inode(path)
        if inode is None:
            self._records.pop(path, None)
        else:
            self._records[path] = Written(path, inode, entry)

    def is_ours(self, path: str) -> bool:
        """Whether ``path`` is still the regular file the agent wrote."""
        inode = self.inode(path)
        return inode is not None and regular_inode(path) == inode

    def orphans(self, kept: Iterable[str]) -> Tuple[str, ...]:
        """Recorded paths that no current output has, sorted."""
        return tuple(sorted(set(self._records) - set(kept)))

    def remove(self, root: str, path: str) -> None:
        """Delete ``path`` only if it is still the very file this agent wrote,
        then the empty parents the writer made for it; forget it either way.
        Failures are logged, never raised: a file left behind harms no one."""
        if not self.is_ours(path):
            if path in self._records:
                log.info("not removing %s: it is no longer the file kv-agent wrote", path)
            self._records.pop(path, None)
            return
        writer = Writer(root)
        try:
            writer.remove(path)
            log.info("removed %s: its secret left the manifest", path)
            # Only parents of a file this agent removed, and only the ones
            # shaped as the writer makes them: not a hunt for empty directories.
            for directory in writer.remove_empty_parents(path):
                log.info("removed %s: empty once its secrets left", directory)
        except (KvAgentError, OSError) as exc:
            log.warning("could not remove %s: %s", path, exc)
        self._records.pop(path, None)


def writer_root_for(path: str, directory: str) -> str:
    """The writer root for removing ``path``: the manifest directory when the
    path lies under it, else the path's own parent (an old directory)."""
    if path.startswith(directory.rstrip("/") + "/"):
        return directory
    return os.path.dirname(path)
