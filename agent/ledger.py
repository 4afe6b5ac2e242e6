"""The ledger: which files this agent wrote, by inode, and for which entry.

A file is removed (its entry left the manifest) only if it is still the very
file the agent wrote: a regular file, at that path, with the inode recorded
when the agent wrote it. Anything else at that path (the operator's own
file, a replacement, a symlink) is left alone and forgotten. The ledger
lives in status.json on /run (:mod:`agent.snapshot`), so it survives a
restart of the agent but not a reboot, when tmpfs is empty anyway; an agent
upgraded in place reads the ledger an older version wrote (path -> inode,
no entry).

Owned by the daemon's main thread; not thread-safe.
"""

from __future__ import annotations

import logging
import os
import stat
from typing import Dict, Iterable, NamedTuple, Optional, Tuple

from agent.errors import KvAgentError
from agent.writer import Writer

log = logging.getLogger(__name__)


class Written(NamedTuple):
    """One file the agent wrote: its path, its inode then, and the key of
    the entry it belongs to (None when an older agent recorded it)."""

    path: str
    inode: int
    entry: Optional[str] = None


def regular_inode(path: str) -> Optional[int]:
    """The inode of the regular file at ``path`` (not following a symlink), or None."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st.st_ino if stat.S_ISREG(st.st_mode) else None


class Ledger:
    """The files this agent wrote, path -> :class:`Written`."""

    def __init__(self, records: Iterable[Written] = ()) -> None:
        self._records: Dict[str, Written] = {record.path: record for record in records}

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
