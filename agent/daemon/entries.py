"""The entry table: what the daemon knows of each manifest entry between refreshes.

One :class:`EntryState` per entry, by key (its first output's path), for
the manifest in use: its plain and certificate entries, each ``select:``
entry's own listing, and the entries a listing expanded into. The table
records each refresh's outcomes (once per change it logs a failure, a
recovery and an expiry warning), decides the READY gate and which entries a
reload added that are not on disk (or in memory) yet, and gives each entry's
figures to the status and the metrics. An entry's credentials count as its
files do: the table asks the daemon's
:class:`~agent.writer.credentials.CredentialStore` which entries it holds.

The daemon's per-entry record types, and the one place that maps between
them (this module):

* :class:`~agent.sync.sync.SecretOutcome`: what one refresh did for an entry;
  :meth:`EntryTable.record` folds it into the entry's state.
* :class:`EntryState`: the table's row, kept across refreshes and reloads
  (an entry a reload keeps unchanged keeps its row).
* :class:`~agent.status.snapshot.EntryStatus`: the row as status.json shows
  it (:meth:`EntryTable.statuses`).
* :class:`~agent.daemon.metrics.EntryMetrics`: the row as the metrics file
  shows it (:meth:`EntryTable.metrics`).
* :class:`~agent.status.snapshot.Written`: the ledger's record of a file the
  agent wrote; with the inodes a refresh found current, what makes an
  entry's file count as on disk (the READY gate takes the ledger's inodes as
  ``inode_of``).
* :class:`~agent.sync.freshness.EntryWritten`: what the sync's memory keeps
  of an outcome (the sync maps outcomes to it: it sits below the daemon);
  the table reads the written version's ``updated`` time from that memory.

Owned by the daemon's main thread; not thread-safe.
"""

from __future__ import annotations

import logging
import os
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from agent.daemon.ledger import regular_inode
from agent.daemon.metrics import EntryMetrics
from agent.manifest import Entry, Manifest
from agent.pipeline.credentials import Grant
from agent.pipeline.expiry import ExpiryWarnings, Validity, describe, judge
from agent.status.snapshot import EntryStatus, iso_time
from agent.sync.freshness import Freshness
from agent.sync.sync import SecretOutcome, SyncReport, short_cause
from agent.writer.credentials import CredentialStore

log = logging.getLogger(__name__)

InodeOf = Callable[[str], Optional[int]]  # the ledger's recorded inode of a path, or None
# (on_change hook, path) of a file that changed, or (hook, KV_AGENT_CHANGED
# name) of a credential that did.
Changed = Tuple[Tuple[str, ...], str]


class EntryState:
    """What the agent knows about one manifest entry, for STATUS and status.json."""

    def __init__(self, entry: Entry) -> None:
        self.name = entry.name
        self.paths = entry.paths
        self.grants = entry.grants  # its credentials (none: files only)
        self.vault = entry.source.vault
        self.is_optional = entry.is_optional
        # A select entry's own state (its listing): on disk once listed, or
        # once its sealed expansion stood in for the listing (agent.daemon.cache).
        self.is_listing = entry.transform == "select"
        self.is_listed_from_cache = False
        self.version: Optional[str] = None
        self.updated: Optional[float] = None  # wall time a file last changed
        self.checked: Optional[float] = None  # wall time the vault last confirmed it
        self.error: Optional[str] = None
        self.cause: Optional[str] = None
        self.error_since: Optional[float] = None
        # Inode of each file a refresh last found current (written or
        # unchanged): with the ledger, what makes this entry count as on disk.
        self.inodes: Dict[str, Optional[int]] = {}
        # Validity window of what was last written (agent.pipeline.expiry).
        self.validity = Validity()
        self.version_updated: Optional[int] = None  # its `updated` in Key Vault (epoch s)
        self.failures = 0  # refreshes in a row that did not confirm it (metrics)

    def is_same_entry(self, entry: Entry) -> bool:
        return (self.name, self.paths, self.vault, self.grants) == (
            entry.name, entry.paths, entry.source.vault, entry.grants)


class EntryTable:
    """Every entry's :class:`EntryState`, by key, in manifest order.
    ``credentials``: the store the refreshes load (none: an empty one)."""

    def __init__(self, credentials: Optional[CredentialStore[Grant]] = None) -> None:
        self._credentials = credentials if credentials is not None else CredentialStore()
        self._states: Dict[str, EntryState] = {}
        self._expiry = ExpiryWarnings()
        self._warn_before_s = 0.0  # the manifest's warn_before_expiry

    def __len__(self) -> int:
        return len(self._states)

    def install(self, manifest: Manifest) -> None:
        """Rows for ``manifest``'s entries: an entry a reload kept (same
        name, paths and vault) keeps its row, a new one starts empty, a
        dropped one (and its expiry warnings) is forgotten."""
        states: Dict[str, EntryState] = {}
        for entry in manifest.secrets + tuple(s.entry for s in manifest.selections):
            state = self._states.get(entry.key)
            if state is None or not state.is_same_entry(entry):
                state = EntryState(entry)
            state.is_optional = entry.is_optional
            states[entry.key] = state
        self._states = states
        self._expiry.keep_only(states)
        self._warn_before_s = manifest.warn_before_expiry_s

    # -- recording refreshes ---------------------------------------------------------------

    def record(self, outcomes: Sequence[SecretOutcome], freshness: Freshness,
               now_wall: float) -> List[Changed]:
        """Fold a refresh's outcomes into the rows (``freshness``: the memory
        that refresh left, for the written versions' times); returns (hook,
        path) for each file that changed."""
        changed: List[Changed] = []
        for outcome in outcomes:
            changed.extend(self._record(outcome, now_wall))
            self._note_version_time(outcome, freshness)
        return changed

    def _record(self, outcome: SecretOutcome, now_wall: float) -> List[Changed]:
        """Update one entry's state; returns (hook, path) for each file that
        changed, then (hook, name) for each credential that did."""
        entry = outcome.entry
        state = self._states.get(entry.key)
        if state is None:  # the entry left the manifest during the refresh
            state = EntryState(entry)
        if outcome.error is not None:
            message = str(outcome.error)
            if message != state.error:
                level = logging.WARNING if entry.is_optional else logging.ERROR
                log.log(level, "%s", outcome.describe())
                state.error_since = now_wall
            state.error, state.cause = message, short_cause(outcome.error)
            state.failures += 1
            return []
        if state.error is not None:
            log.info("secret '%s' recovered: %s is current again", entry.name,
                     ", ".join(entry.paths))
        state.error = state.cause = state.error_since = None
        state.failures = 0
        state.checked = now_wall
        if outcome.changed or state.updated is None:
            state.updated = now_wall
        state.version = outcome.version
        state.validity = outcome.validity
        self._warn_expiry(state, entry.key, now_wall)
        state.inodes = {path: regular_inode(path) for path in entry.paths}
        return [(entry.on_change, path) for path in outcome.changed_paths] + \
            [(entry.on_change, name) for name in outcome.changed_credentials]

    def _note_version_time(self, outcome: SecretOutcome, freshness: Freshness) -> None:
        """Keep the written version's ``updated`` time (for its age), as the
        refresh's memory (agent.sync.freshness) has it for the entry's first source."""
        state = self._states.get(outcome.entry.key)
        if state is None or outcome.error is not None or not outcome.entry.sources:
            return
        seen = freshness.sources.get(outcome.entry.sources[0])
        if seen is not None and seen.version == outcome.version:
            state.version_updated = seen.updated

    def _warn_expiry(self, state: EntryState, key: str, now_wall: float) -> None:
        """Log once (daily for "expiring") that what was written is expired,
        expires soon, or is not valid yet; it is written all the same."""
        kind = judge(state.validity, now_wall, self._warn_before_s)
        if self._expiry.is_due(key, kind, state.validity, now_wall):
            assert kind is not None
            log.warning("%s", describe(state.name, kind, state.validity, now_wall))

    def record_failure(self) -> None:
        """A refresh failed as a whole (no token, say): no entry was confirmed."""
        for state in self._states.values():
            state.failures += 1

    def follow_selections(self, report: SyncReport) -> None:
        """For each ``select:`` entry whose listing succeeded: rows for the
        entries it covers now, none for those it no longer covers (their
        files are the reconciliation's). A failed listing changes nothing."""
        matched = {outcome.entry.key: outcome.entry for outcome in report.outcomes}
        for directory, paths in report.selected:
            covered = set(paths)
            for key in [key for key in self._states if os.path.dirname(key) == directory
                        and key not in covered]:
                del self._states[key]
            for path in paths:
                if path not in self._states:
                    self._states[path] = EntryState(matched[path])

    # -- the READY gate --------------------------------------------------------------------

    def has_every_required_file(self, inode_of: InodeOf) -> bool:
        """READY's condition: every output of every non-optional entry is a
        regular file that a refresh found current, or that this agent wrote
        earlier in this boot (the ledger, ``inode_of``, lives on /run) and
        keeps as its last good one; and every credential of theirs is loaded
        in the store, so a unit ordered after kv-agent gets its value at boot.

        Checked on the files themselves, never inferred from an absence of
        errors: when IMDS is down, the refresh fails as a whole and no
        per-secret error is recorded at all (issue 9: READY=1 with an empty
        directory).
        """
        return not self.missing(inode_of)

    def missing(self, inode_of: InodeOf) -> Tuple[str, ...]:
        """The keys of the non-optional entries READY waits for (a file not
        on disk, or credentials not in memory), in manifest order."""
        loaded = self._credentials.loaded()
        return tuple(key for key, state in self._states.items() if not state.is_optional and (
            not all(self._is_on_disk(state, path, inode_of) for path in state.paths)
            or (bool(state.grants) and key not in loaded)))

    def served(self, key: str) -> None:
        """Entry ``key`` was written from its sealed copy (agent.daemon.cache):
        its files as they are now count as on disk, until a refresh says more."""
        state = self._states.get(key)
        if state is not None:
            state.inodes = {path: regular_inode(path) for path in state.paths}

    def served_selection(self, key: str, entries: Sequence[Entry]) -> None:
        """The ``select:`` entry ``key`` was served from its sealed expansion
        (agent.daemon.cache_serve): it counts as listed, and ``entries``
        (written from their copies) get rows whose files as they are now
        count as on disk, until a listing says more (follow_selections)."""
        state = self._states.get(key)
        if state is None:
            return
        state.is_listed_from_cache = True
        for entry in entries:
            row = self._states.setdefault(entry.key, EntryState(entry))
            row.inodes = {path: regular_inode(path) for path in row.paths}

    @staticmethod
    def _is_on_disk(state: EntryState, path: str, inode_of: InodeOf) -> bool:
        if state.is_listing:  # a select entry: listed since it was installed (or served)
            return state.checked is not None or state.is_listed_from_cache
        inode = regular_inode(path)
        return inode is not None and inode in (state.inodes.get(path), inode_of(path))

    @staticmethod
    def _is_pending(state: EntryState, inode_of: InodeOf, is_loaded: bool) -> bool:
        """A new entry (a reload added it) that no refresh of this run has
        confirmed or failed yet and whose files the agent never wrote, or
        whose credentials (``is_loaded``) are not in memory."""
        if state.checked is not None or state.error is not None:
            return False
        return state.is_listing or any(inode_of(p) is None for p in state.paths) or \
            (bool(state.grants) and not is_loaded)

    # -- what the status and the metrics show ----------------------------------------------

    def statuses(self, now_wall: float, is_ready: bool, inode_of: InodeOf,
                 cached: Optional[Mapping[str, float]] = None) -> Tuple[EntryStatus, ...]:
        """Every row as status.json shows it, its expiry judged at ``now_wall``;
        pending (not written yet) only once the agent is ready; an entry in
        ``cached`` (key -> its sealed copy's fetch time: agent.daemon.cache)
        marked as served from the cache."""
        loaded = self._credentials.loaded()
        return tuple(
            EntryStatus(state.name, state.paths, state.vault, state.is_optional, state.version,
                        iso_time(state.updated), iso_time(state.checked), state.error,
                        state.cause, iso_time(state.error_since),
                        iso_time(state.validity.not_before), iso_time(state.validity.expires),
                        judge(state.validity, now_wall, self._warn_before_s),
                        is_ready and self._is_pending(state, inode_of, key in loaded),
                        tuple(grant.label for grant in state.grants), key in loaded,
                        iso_time((cached or {}).get(key)))
            for key, state in self._states.items())

    def metrics(self, cached: Optional[Mapping[str, float]] = None
                ) -> Tuple[EntryMetrics, ...]:
        """Every row as the metrics file shows it, by key; ``cached``: the
        entries served from the sealed cache (None: the manifest has no
        ``cache:``, and the rows say nothing of it)."""
        loaded = self._credentials.loaded()
        return tuple(EntryMetrics(key, state.name, state.vault, state.checked,
                                  state.version_updated, state.failures,
                                  state.validity.expires,
                                  key in loaded if state.grants else None,
                                  None if cached is None else key in cached)
                     for key, state in sorted(self._states.items()))
