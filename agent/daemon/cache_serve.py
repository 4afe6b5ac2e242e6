"""Serving the sealed copies at start: what is written, in which pieces.

:class:`~agent.daemon.cache.SealedCache` decides *when* to look (``after``
into a start, while not ready) and keeps what was served; this room decides
*what* may be served, and writes it. The unit of serving is what a refresh
writes in one piece, so that a served start leaves the disk as a fetched one
would:

* a plain entry: its files one by one through the daemon's writer (atomic,
  owner and mode as fetched), then its credentials into the store;
* a set (a certificate's files, ``set:``): every member from its copy, by one
  swap of the set's directory (:meth:`agent.writer.Writer.apply_set`, with the
  directory's default owner and mode, as the sync writes it), recorded in the
  ledger as a set; or none of it.

Every entry of a unit is judged by :func:`agent.cache.decision.decide` (the
vault gave no answer; this entry's copy, readable, younger than ``max_age``)
and the unit by :func:`~agent.cache.decision.decide_whole`. A unit that is not
served gets one line naming it and the reason (through ``say``, which logs
each line once); a unit one of whose entries no refresh has judged yet is
looked at again after the next refresh, silently.

Owned by the daemon's main thread, as the cache's store is.
"""

from __future__ import annotations

import logging
from typing import Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Set, Tuple, Union

from agent.base.errors import CacheError, KvAgentError
from agent.cache.copy import Copy
from agent.cache.decision import Decision, decide, decide_whole
from agent.cache.store import CacheStore
from agent.daemon.entries import EntryTable
from agent.daemon.ledger import Ledger
from agent.manifest import Entry, Manifest
from agent.pipeline.credentials import Grant
from agent.pipeline.outputs import EntrySet
from agent.sync import credentials as loading
from agent.writer import Writer
from agent.writer.credentials import CredentialStore
from agent.writer.specs import FileSpec

log = logging.getLogger(__name__)


class Units(NamedTuple):
    """A manifest as serving sees it: its entries by key, and each set by
    the keys of its members."""

    entries: Mapping[str, Entry] = {}
    groups: Mapping[str, EntrySet] = {}

    @classmethod
    def of(cls, manifest: Manifest) -> "Units":
        return cls({entry.key: entry for entry in manifest.secrets},
                   {key: group for group in manifest.sets for key in group.keys})


class Serving:
    """One look at serving: the copies in ``store`` no older than
    ``max_age_s`` at epoch ``now_wall``, for entries whose last refresh
    failed with ``causes``, written with ``writer`` and ``credentials`` and
    recorded in ``ledger`` and ``table``."""

    def __init__(self, units: Units, store: CacheStore, max_age_s: float,
                 causes: Mapping[str, KvAgentError], now_wall: float, writer: Writer,
                 credentials: CredentialStore[Grant], ledger: Ledger, table: EntryTable,
                 say: Callable[[str], None]) -> None:
        self._units = units
        self._store = store
        self._max_age_s = max_age_s
        self._causes = causes
        self._now = now_wall
        self._writer = writer
        self._credentials = credentials
        self._ledger = ledger
        self._table = table
        self._say = say

    def run(self, missing: Sequence[str]) -> Dict[str, float]:
        """Serve each unit one of whose entries is ``missing`` (the keys READY
        waits for); returns each entry written -> its copy's fetch time."""
        served: Dict[str, float] = {}
        looked: Set[str] = set()
        for key in missing:
            if key in looked:
                continue
            group = self._units.groups.get(key)
            entry = self._units.entries.get(key)
            if group is not None:
                looked.update(group.keys)
                served.update(self._serve_set(group))
            elif entry is not None:
                served.update(self._serve_entry(entry))
            elif key in self._causes:
                self._say(f"{key}: not served from the sealed cache (a select: entry's "
                          "expansion is served only by the vault)")
        return served

    # -- a plain entry -------------------------------------------------------------------

    def _serve_entry(self, entry: Entry) -> Dict[str, float]:
        decision = self._decide(entry.key)
        if decision is None:
            return {}
        if not decision.serve or decision.copy is None:
            self._say(decision.reason)
            return {}
        try:
            contents = _contents(entry, decision.copy)
            for spec in _specs(entry, contents):
                self._writer.apply(spec)
            loading.load(self._credentials, entry, contents, "from the sealed cache")
        except KvAgentError as exc:
            self._say(f"{entry.key}: not served from the sealed cache: {exc.message}")
            return {}
        log.warning("%s", decision.reason)
        for path in entry.paths:
            self._ledger.record(path, entry.key)
        self._table.served(entry.key)
        return {entry.key: decision.copy.fetched_at}

    # -- a set ---------------------------------------------------------------------------

    def _serve_set(self, group: EntrySet) -> Dict[str, float]:
        """Every member from its copy by one swap of the set's directory, as
        Sync._write_group writes it, or none (one line naming the set)."""
        label = _set_label(group)
        decisions = [self._decide(key) for key in group.keys]
        judged = [decision for decision in decisions if decision is not None]
        if len(judged) != len(group.keys):
            return {}
        whole = decide_whole(label, judged)
        pairs = [(entry, decision.copy) for key, decision in zip(group.keys, judged)
                 for entry in [self._units.entries.get(key)]
                 if entry is not None and decision.copy is not None]
        if not whole.serve or len(pairs) != len(group.keys):
            self._say(whole.reason)
            return {}
        entries = [entry for entry, _ in pairs]
        copies = [copy for _, copy in pairs]
        try:
            contents = [_contents(entry, copy) for entry, copy in zip(entries, copies)]
            self._writer.apply_set(group.directory, [
                spec for entry, data in zip(entries, contents) for spec in _specs(entry, data)])
            for entry, data in zip(entries, contents):
                loading.load(self._credentials, entry, data, "from the sealed cache")
        except KvAgentError as exc:
            self._say(f"{label}: not served from the sealed cache: {exc.message}")
            return {}
        for decision in judged:
            log.warning("%s", decision.reason)
        entry_of = {path: entry.key for entry in entries for path in entry.paths}
        self._ledger.record_set(group.directory, entry_of, group.name, entry_of)
        for entry in entries:
            self._table.served(entry.key)
        return {entry.key: copy.fetched_at for entry, copy in zip(entries, copies)}

    # -- judging -------------------------------------------------------------------------

    def _decide(self, key: str) -> Optional[Decision]:
        """Whether ``key`` may be served from its copy; None while no refresh
        has said why it is missing (looked at again after the next)."""
        cause = self._causes.get(key)
        if cause is None:
            return None
        try:
            found: Union[Copy, CacheError, None] = self._store.load(key)
        except CacheError as exc:
            found = exc
        return decide(key, cause, found, self._max_age_s, self._now)


def _set_label(group: EntrySet) -> str:
    if group.name.startswith("certificate:"):
        return f"the certificate's files in {group.directory}"
    return f"set '{group.name}' ({group.directory})"


def _contents(entry: Entry, copy: Copy) -> List[bytes]:
    """The bytes of each of ``entry``'s outputs, in order, from ``copy``.
    Raises CacheError for a target the copy lacks."""
    return [copy.bytes_of(output.path if output.is_file else
                          output.credential.label if output.credential else "")
            for output in entry.outputs.outputs]


def _specs(entry: Entry, contents: Sequence[bytes]) -> Tuple[FileSpec, ...]:
    """The files of ``entry`` with ``contents``, as the sync writes them (a
    credential-only output is none)."""
    return tuple(FileSpec(output.path, data, output.uid, output.gid, output.mode)
                 for output, data in zip(entry.outputs.outputs, contents) if output.is_file)
