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
  ledger as a set; or none of it;
* a ``select:`` entry: its last good expansion (the secret names its listing
  gave, sealed beside the copies: :func:`agent.cache.copy.expansion`), each
  of those entries rebuilt as the listing made it and written from its copy
  file by file; the select: entry then counts as listed for READY, and its
  entries have rows, until a listing says more. Or none of it: an expansion
  sealed for a select: entry since changed, or one entry's copy that may not
  be served, keeps the whole entry unserved, as its failed listing would.

Every entry of a unit is judged by :func:`agent.cache.decision.decide` (the
vault gave no answer; this entry's copy, readable, younger than ``max_age``)
and the unit by :func:`~agent.cache.decision.decide_whole`. A unit that is not
served gets one line naming it and the reason (through ``say``, which logs
each line once); a unit one of whose entries no refresh has judged yet is
looked at again after the next refresh, silently.

Owned by the daemon's main thread, as the cache's store is.
"""

from __future__ import annotations

import hashlib
import logging
import posixpath
from typing import (
    AbstractSet,
    Callable,
    Dict,
    List,
    Mapping,
    NamedTuple,
    Optional,
    Sequence,
    Set,
    Tuple,
    Union,
)

from agent.base.errors import CacheError, KvAgentError
from agent.cache.copy import Copy, expansion_key, expansion_names
from agent.cache.decision import Decision, decide, decide_whole, is_unavailable
from agent.cache.seal import MACHINE_WIDE
from agent.cache.store import CacheStore
from agent.daemon.entries import EntryTable
from agent.daemon.ledger import Ledger
from agent.manifest import Entry, Manifest, Selection
from agent.pipeline.credentials import Grant
from agent.pipeline.expiry import moment
from agent.pipeline.outputs import EntrySet
from agent.sync import credentials as loading
from agent.writer import Writer
from agent.writer.credentials import CredentialStore
from agent.writer.specs import specs_of

log = logging.getLogger(__name__)


class Units(NamedTuple):
    """A manifest as serving sees it: its entries by key, each set by the
    keys of its members, each ``select:`` entry by its own key (its
    directory), and the secrets its explicit entries name (vault, lower-case
    name), which no expansion writes."""

    entries: Mapping[str, Entry] = {}
    groups: Mapping[str, EntrySet] = {}
    selections: Mapping[str, Selection] = {}
    explicit: AbstractSet[Tuple[str, str]] = frozenset()

    @classmethod
    def of(cls, manifest: Manifest) -> "Units":
        explicit: AbstractSet[Tuple[str, str]] = frozenset()
        if manifest.selections:  # only a manifest with select: loads the selection code
            from agent.sync.selection import explicit_names
            explicit = explicit_names(manifest.secrets)
        return cls({entry.key: entry for entry in manifest.secrets},
                   {key: group for group in manifest.sets for key in group.keys},
                   {selection.entry.key: selection for selection in manifest.selections},
                   explicit)

    def keys(self) -> Tuple[str, ...]:
        """Every key a refresh reports on before any listing: the entries' and
        the ``select:`` entries' own."""
        return tuple(self.entries) + tuple(self.selections)

    def current(self, entry: Entry) -> Optional[Entry]:
        """``entry`` if it is one of the manifest's, or one a ``select:``
        entry of it makes as it is now; None (one of a manifest since
        replaced, or a select: entry's own listing)."""
        if entry.transform == "select":
            return None
        if self.entries.get(entry.key) == entry:
            return entry
        selection = self.selections.get(posixpath.dirname(entry.key))
        if selection is None or entry.key in self.entries:
            return None
        from agent.sync.selection import entry_for, file_name

        if file_name(selection, entry.name) is None:
            return None
        return entry if entry_for(selection, entry.name) == entry else None

    def expanded(self, selection: Selection, names: Sequence[str]) -> Tuple[Entry, ...]:
        """The entries ``selection`` makes of the secret ``names`` its sealed
        expansion holds, as its listing made them (agent.sync.selection),
        without those an explicit entry names now. Raises CacheError for a
        name it could not have chosen (the expansion is not served)."""
        from agent.sync.selection import entry_for, file_name

        entries = []
        for name in names:
            if not name.lower().startswith(selection.prefix.lower()) \
                    or file_name(selection, name) is None:
                raise CacheError(f"{selection.label}: its sealed expansion names a secret it "
                                 "does not select", "the next good listing seals a new one")
            if (selection.vault, name.lower()) not in self.explicit:
                entries.append(entry_for(selection, name))
        return tuple(entries)


def fingerprint(selection: Selection) -> str:
    """A digest of what chose a ``select:`` entry's secrets and names their
    files (vault, prefix, tags, certificates, stripping, directory): an
    expansion sealed under another is not served."""
    chosen = (selection.vault, selection.prefix, selection.tags,
              selection.include_certificates, selection.strip_prefix, selection.directory)
    return hashlib.sha256(repr(chosen).encode("utf-8")).hexdigest()


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
        waits for); returns each entry written -> its copy's fetch time.
        Stops at the first failure of the machine (the tool missing, a TPM2
        that does not answer: :data:`~agent.cache.seal.MACHINE_WIDE`), with
        one line: each later copy would fail alike, or hold the main thread
        as long."""
        served: Dict[str, float] = {}
        try:
            self._run(missing, served)
        except MACHINE_WIDE as exc:
            self._say(f"{exc.message}; no sealed copy is served until the next refresh")
        return served

    def _run(self, missing: Sequence[str], served: Dict[str, float]) -> None:
        """:meth:`run`'s loop, adding to ``served`` unit by unit."""
        looked: Set[str] = set()
        for key in missing:
            if key in looked:
                continue
            group = self._units.groups.get(key)
            entry = self._units.entries.get(key)
            selection = self._units.selections.get(key)
            if group is not None:
                looked.update(group.keys)
                served.update(self._serve_set(group))
            elif entry is not None:
                served.update(self._serve_entry(entry))
            elif selection is not None:
                served.update(self._serve_selection(selection))
            elif key in self._causes:
                self._say(f"{key}: not served from the sealed cache (its select: entry was "
                          "listed: only the vault serves it now)")

    # -- a plain entry -------------------------------------------------------------------

    def _serve_entry(self, entry: Entry) -> Dict[str, float]:
        decision = self._decide(entry.key)
        if decision is None:
            return {}
        if not decision.serve:
            self._say(decision.reason)
            return {}
        copy = _served(decision)
        try:
            contents = _contents(entry, copy)
            for spec in specs_of(entry.outputs.outputs, contents):
                self._writer.apply(spec)
            loading.load(self._credentials, entry, contents, "from the sealed cache")
        except KvAgentError as exc:
            self._say(f"{entry.key}: not served from the sealed cache: {exc.message}")
            return {}
        log.warning("%s", decision.reason)
        for path in entry.paths:
            self._ledger.record(path, entry.key)
        self._table.served(entry.key)
        return {entry.key: copy.fetched_at}

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
        if not whole.serve:
            self._say(whole.reason)
            return {}
        entries = [self._units.entries[key] for key in group.keys]
        copies = [_served(decision) for decision in judged]
        try:
            contents = [_contents(entry, copy) for entry, copy in zip(entries, copies)]
            self._writer.apply_set(group.directory, [
                spec for entry, data in zip(entries, contents)
                for spec in specs_of(entry.outputs.outputs, data)])
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

    # -- a select: entry -----------------------------------------------------------------

    def _serve_selection(self, selection: Selection) -> Dict[str, float]:
        """Its last good expansion (the secret names its listing gave, sealed
        beside the copies) and every entry of it from its copy, each file as
        the sync writes it; or none of it (one line naming the entry)."""
        key = selection.entry.key
        cause = self._causes.get(key)
        if cause is None:
            return {}
        label = f"{selection.label} ({selection.directory})"
        listing = self._judge(expansion_key(selection.directory), cause)
        entries: Tuple[Entry, ...] = ()
        try:
            if listing.copy is not None:
                names = expansion_names(listing.copy, fingerprint(selection))
                entries = self._units.expanded(selection, names)
        except CacheError as exc:
            self._say(f"{label}: not served from the sealed cache: {exc.message}")
            return {}
        decisions = [self._judge(entry.key, cause) for entry in entries]
        whole = decide_whole(label, [listing, *decisions])
        if not whole.serve:
            self._say(whole.reason)
            return {}
        fetched_at = _served(listing).fetched_at
        pairs = [(entry, _served(decision)) for entry, decision in zip(entries, decisions)]
        try:
            for entry, copy in pairs:
                contents = _contents(entry, copy)
                for spec in specs_of(entry.outputs.outputs, contents):
                    self._writer.apply(spec)
                loading.load(self._credentials, entry, contents, "from the sealed cache")
                for path in entry.paths:
                    self._ledger.record(path, entry.key)
        except KvAgentError as exc:
            self._say(f"{label}: not served from the sealed cache: {exc.message}")
            return {}
        log.warning("%s: served from its sealed expansion of %s (%d secrets)", label,
                    moment(fetched_at), len(entries))
        for decision in decisions:
            log.warning("%s", decision.reason)
        self._table.served_selection(key, entries)
        return {key: fetched_at,
                **{entry.key: copy.fetched_at for entry, copy in pairs}}

    # -- judging -------------------------------------------------------------------------

    def _decide(self, key: str) -> Optional[Decision]:
        """:meth:`_judge` of ``key`` for its own last failure; None while no
        refresh has said why it is missing (looked at again after the next)."""
        cause = self._causes.get(key)
        return None if cause is None else self._judge(key, cause)

    def _judge(self, key: str, cause: KvAgentError) -> Decision:
        """Whether ``key`` may be served from its copy, missing for ``cause``.
        The copy is read (decrypted) only for an outage: an answer refuses
        it unread. Raises the failures of the machine
        (:data:`~agent.cache.seal.MACHINE_WIDE`)."""
        found: Union[Copy, CacheError, None] = None
        try:
            if is_unavailable(cause):
                found = self._store.load(key)
        except MACHINE_WIDE:
            raise
        except CacheError as exc:
            found = exc
        return decide(key, cause, found, self._max_age_s, self._now)


def _served(decision: Decision) -> Copy:
    """The copy of a decision to serve: :func:`decide` sets it whenever it serves."""
    assert decision.copy is not None
    return decision.copy


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
