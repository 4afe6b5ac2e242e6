"""Notices edits to the manifest through inotify, however they are made.

The manifest's *directory* is watched, not the file: editors and ``sed -i``
replace the file by renaming a new one over it, which a watch on the old
inode would never see. When the manifest is a symlink, the directory of its
target is watched too, so both a symlink swap and an in-place edit of the
target are seen. The watches are re-resolved after every change, and a queue
overflow or a removed watch is treated as "something changed".

The watcher only says *that* something may have changed; the daemon debounces
bursts and :class:`ManifestFile` compares the bytes before reloading.
"""

from __future__ import annotations

import logging
import os
from typing import Dict, Optional, Set, Tuple

from inotify_simple import INotify, flags

from agent.base.errors import KvAgentError, ManifestError
from agent.manifest import Manifest, parse_manifest, read_manifest_bytes, read_manifest_text

log = logging.getLogger(__name__)

WATCH_FLAGS = (flags.CLOSE_WRITE | flags.MOVED_TO | flags.MOVED_FROM | flags.CREATE
               | flags.DELETE | flags.ATTRIB | flags.DELETE_SELF | flags.MOVE_SELF)
RESYNC_FLAGS = flags.Q_OVERFLOW | flags.IGNORED | flags.DELETE_SELF | flags.MOVE_SELF


class ManifestWatcher:
    """An inotify instance watching everything a manifest path depends on."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        self._inotify = INotify()
        self._watches: Dict[int, str] = {}
        self._names: Set[str] = set()
        self.rewatch()

    def fileno(self) -> int:
        return int(self._inotify.fileno())

    def rewatch(self) -> None:
        """Watch the manifest's directory and its symlink target's directory,
        dropping watches no longer needed. Idempotent."""
        real = os.path.realpath(self.path)
        self._names = {os.path.basename(self.path), os.path.basename(real)}
        wanted = {os.path.dirname(self.path), os.path.dirname(real)}
        for wd, directory in list(self._watches.items()):
            if directory not in wanted:
                del self._watches[wd]  # its IGNORED event is then not ours to act on
                try:
                    self._inotify.rm_watch(wd)
                except OSError:
                    pass  # already gone with its directory
        for directory in wanted - set(self._watches.values()):
            try:
                self._watches[self._inotify.add_watch(directory, WATCH_FLAGS)] = directory
            except OSError as exc:
                log.warning("cannot watch %s for manifest edits (%s); "
                            "use systemctl reload after editing", directory, exc.strerror)

    def read(self) -> bool:
        """Drain pending events (never blocks); True when the manifest may have changed."""
        changed = False
        for event in self._inotify.read(timeout=0):
            if event.mask & flags.Q_OVERFLOW:
                changed = True  # events were lost: assume the worst
            elif event.wd not in self._watches:
                continue  # a watch we dropped
            elif event.mask & RESYNC_FLAGS:
                self._watches.pop(event.wd, None)  # the directory itself went away
                changed = True
            elif event.name in self._names:
                changed = True
        if changed:
            self.rewatch()  # a symlink swap may point somewhere new
        return changed

    def close(self) -> None:
        self._inotify.close()


class ManifestFile:
    """The manifest's file: its path, the very bytes of the manifest in use
    and, while an edit stands rejected, why (``error``). Main thread only."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._raw = b""
        self.error: Optional[str] = None

    def read(self) -> Tuple[Manifest, bytes]:
        """The validated manifest and the very bytes it was parsed from (read
        once, so an edit between two reads cannot pair one with the other).
        Raises ManifestError (or KvAgentError)."""
        text = read_manifest_text(self.path)
        return parse_manifest(text, self.path), text.encode()

    def accepted(self, raw: bytes) -> None:
        """The manifest read from ``raw`` is in use (or equals the one in use)."""
        self._raw, self.error = raw, None

    def rejected(self, error: KvAgentError) -> None:
        """An edit was refused for ``error``; the manifest in use stays. Each
        problem is logged; the first is kept for the status."""
        problems = error.problems if isinstance(error, ManifestError) else (str(error),)
        for problem in problems:
            log.error("manifest rejected, keeping the previous one: %s", problem)
        self.error = problems[0]

    def is_edited(self) -> bool:
        """Whether the file no longer holds the bytes in use, or an edit stands
        rejected: going back to the bytes in use is a change too (the reload
        clears the rejection from STATUS). Not when it was only touched,
        chmod-ed or rewritten identically. Bounded and non-blocking (a FIFO
        put in its place must not stall the loop); a file deleted or
        unreadable counts as edited: the reload reports it."""
        raw = read_manifest_bytes(self.path)
        return raw is None or raw != self._raw or self.error is not None
