"""The daemon's side of the sealed cache (``cache:``): saving good copies.

After every refresh, each entry that succeeded has its bytes sealed into the
store (:class:`~agent.cache.store.CacheStore`, which skips an unchanged
copy): its files' bytes as the refresh left them on disk, and its
credentials' bytes as the credential store holds them. At start and at
every reload that installs a manifest, copies of entries no longer in it
are pruned.

Which entries: the manifest's own (``secrets:``); a ``select:`` entry's
expansion is not known before its listing, which needs the vault, so its
secrets are not cached.

The cache never stops the agent: a CacheError (SealError included) is
logged once per distinct message, as a warning, and the entry goes without
a fresh copy. ``kv-agent once`` neither saves nor serves (it is the tool for
"fetch now"; it leaves the daemon's copies as they are).

Owned by the daemon's main thread (the store is not thread-safe).
"""

from __future__ import annotations

import logging
import os
import stat
from typing import Dict, List, Optional, Set, Tuple

from agent.base.errors import CacheError
from agent.cache.copy import Copy
from agent.cache.policy import CachePolicy
from agent.cache.seal import Sealer
from agent.cache.store import CacheStore
from agent.manifest import Entry, Manifest
from agent.pipeline.credentials import Grant
from agent.sync.sync import SyncReport
from agent.writer.credentials import CredentialStore

log = logging.getLogger(__name__)

MAX_FILE_BYTES = 1024 * 1024  # a file larger than this is not what the agent wrote: skipped


class SealedCache:
    """The manifest's ``cache:`` in use (none: nothing happens), its store,
    and what was said about it. ``sealer`` runs systemd-creds (tests: in a
    private namespace)."""

    def __init__(self, sealer: Optional[Sealer] = None) -> None:
        self._sealer = sealer or Sealer()
        self.policy: Optional[CachePolicy] = None
        self.store: Optional[CacheStore] = None
        self._entries: Dict[str, Entry] = {}
        self._said: Set[str] = set()  # each problem is logged once

    def install(self, manifest: Manifest) -> None:
        """Use ``manifest``'s ``cache:`` (a new store when its directory
        changed) and prune the copies of entries it no longer has."""
        self.policy = manifest.cache
        self._entries = {entry.key: entry for entry in manifest.secrets}
        if self.policy is None:
            self.store = None
            return
        if self.store is None or self.store.directory != self.policy.directory:
            self.store = CacheStore(self.policy.directory, self._sealer)
        try:
            removed = self.store.prune(self._entries)
        except CacheError as exc:
            self.problem(exc)
            return
        if removed:
            log.info("sealed cache: removed %d copies of entries no longer in the manifest",
                     len(removed))

    def save(self, report: SyncReport, credentials: CredentialStore[Grant],
             fetched_at: float) -> int:
        """Seal the bytes of every entry ``report`` wrote or found current;
        returns how many copies were written. Never raises CacheError."""
        if self.store is None or self.policy is None:
            return 0
        written = 0
        for outcome in report.outcomes:
            entry = self._entries.get(outcome.entry.key)
            if outcome.error is not None or entry != outcome.entry:
                continue  # failed, a select's, or of a manifest since replaced
            try:
                copy = Copy(entry.key, fetched_at, gather(entry, credentials))
                written += self.store.save(copy, self.policy.max_age_s)
            except CacheError as exc:
                self.problem(exc)
        return written

    def problem(self, error: CacheError) -> None:
        """Log ``error`` once (a warning: the agent goes on without the copy)."""
        line = str(error)
        if line not in self._said:
            self._said.add(line)
            log.warning("sealed cache: %s", line)


def gather(entry: Entry, credentials: CredentialStore[Grant]) -> Tuple[Tuple[str, bytes], ...]:
    """``entry``'s bytes by target (:attr:`Entry.targets`): each file as on
    disk (read as a consumer reads it, through a set's link; a regular
    file), then each credential as held. Raises CacheError when one is
    missing."""
    items: List[Tuple[str, bytes]] = [(path, _read(entry, path)) for path in entry.paths]
    if entry.grants:
        values = credentials.values(entry.key, entry.grants)
        if values is None:
            raise CacheError(f"{entry.key}: its credentials are not held", "no copy this time")
        items.extend((grant.label, value) for grant, value in zip(entry.grants, values))
    return tuple(items)


def _read(entry: Entry, path: str) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise CacheError(f"{entry.key}: cannot read {path}: {exc.strerror}",
                         "no copy this time") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_FILE_BYTES:
            raise CacheError(f"{entry.key}: {path} is not a file the agent wrote",
                             "no copy this time")
        data = bytearray()
        while True:
            block = os.read(fd, 65536)
            if not block:
                return bytes(data)
            data += block
    finally:
        os.close(fd)
