"""Reconciliation: the ledger's policy half. What to remove, and when.

The ledger (:mod:`agent.daemon.ledger`) knows which files and sets the agent
wrote and removes one only while it is still the agent's. This module
decides which of them must go, and keeps the writers that hold old set
generations:

* at start, what a previous run wrote for entries the manifest no longer
  has (:func:`plan_orphans`);
* after a reload, what the old manifest had and the new one has not
  (:func:`plan_dropped`), once no refresh runs: the refresh thread writes
  with the same writers (which are not thread-safe), and a refresh of the
  old manifest may still write what is being dropped;
* after a refresh, files of a ``select:`` entry's secrets that no longer
  match (:func:`plan_unselected`), only when its listing succeeded: an empty
  or failed list never removes a file;
* each refresh's written files and whole sets, recorded in the ledger (and
  those of a refresh that ended while stopping: late writes);
* one writer per output root, kept across reloads: it holds the old set
  generations still waiting out their grace (SET_GRACE_S), whose earliest
  end is the loop's timer (:meth:`Reconciler.retire_deadline`), refresh or
  no refresh: the writers' own retire lock makes removing them safe beside
  one (issue 17: a refresh stuck on the network kept the old key in tmpfs
  until it ended).

Planning is pure (a :class:`RemovalPlan` from the manifests and the ledger's
records, read only); :class:`Reconciler` performs a plan through the ledger.
Files in a set still in the manifest leave its directory by one swap
(:meth:`agent.daemon.ledger.Ledger.remove_members`), never one by one.

Owned by the daemon's main thread (the writers' retire lock aside).
"""

from __future__ import annotations

import logging
import os
from typing import (
    Any,
    Callable,
    Dict,
    Iterable,
    List,
    Mapping,
    NamedTuple,
    Optional,
    Sequence,
    Set,
    Tuple,
)

from agent.daemon.ledger import Ledger, writer_root_for
from agent.daemon.refresh import SyncDone
from agent.manifest import Manifest
from agent.status.snapshot import read_sets, read_written
from agent.sync.sync import SyncReport
from agent.writer import Writer, foreign_in_set

log = logging.getLogger(__name__)

Selected = Sequence[Tuple[str, Sequence[str]]]  # SyncReport.selected: (directory, paths)


class RemovalPlan(NamedTuple):
    """What to remove, in this order: whole sets, single files, and files
    that left a set still in the manifest. Each with the writer root that
    removes it; each only if still the agent's (the ledger checks)."""

    sets: Tuple[Tuple[str, str], ...] = ()  # (set directory, writer root)
    files: Tuple[Tuple[str, str], ...] = ()  # (path, writer root)
    members: Tuple[Tuple[str, str, Tuple[str, ...]], ...] = ()  # (set directory, root, paths)


def plan_orphans(manifest: Manifest, ledger: Ledger) -> RemovalPlan:
    """Sets and files a previous run wrote for entries ``manifest`` no longer
    has. Files in a ``select:`` entry's directory wait for its first
    successful listing (:func:`plan_unselected`)."""
    set_directories = {group.directory for group in manifest.sets}
    sets = ledger.set_orphans(set_directories)
    kept = {path for entry in manifest.secrets for path in entry.paths}
    selected = {selection.directory for selection in manifest.selections}
    files: List[Tuple[str, str]] = []
    left: List[str] = []
    for path in ledger.orphans(kept | _members(ledger, sets)):
        if os.path.dirname(path) in selected:
            continue
        if os.path.dirname(path) in set_directories:
            left.append(path)
        else:
            files.append((path, writer_root_for(path, manifest.directory)))
    return RemovalPlan(tuple((d, writer_root_for(d, manifest.directory)) for d in sets),
                       tuple(files), _by_set(left, manifest.directory))


def plan_dropped(old: Manifest, new: Manifest, ledger: Ledger) -> RemovalPlan:
    """Sets and files of ``old`` that ``new`` no longer has, and the files of
    a ``select:`` entry ``new`` dropped. Files that left a set still in
    ``new`` leave its directory by one swap."""
    set_directories = {group.directory for group in new.sets}
    sets = [group.directory for group in old.sets if group.directory not in set_directories]
    gone = _members(ledger, sets)  # the ledger forgets them with their set
    kept = {path for entry in new.secrets for path in entry.paths}
    selected = {selection.directory for selection in new.selections}
    files: List[Tuple[str, str]] = []
    for selection in old.selections:
        if selection.directory not in selected:
            files.extend((path, old.directory) for path in ledger.orphans(kept | gone)
                         if os.path.dirname(path) == selection.directory)
    left: List[str] = []
    for entry in old.secrets:
        for path in entry.paths:
            if path in kept or path in gone:
                continue
            if os.path.dirname(path) in set_directories:
                left.append(path)
            else:
                files.append((path, old.directory))
    return RemovalPlan(tuple((d, writer_root_for(d, new.directory)) for d in sets),
                       tuple(files), _by_set(left, new.directory))


def plan_unselected(selected: Selected, ledger: Ledger) -> Tuple[str, ...]:
    """Recorded files in the directory of each ``select:`` entry whose listing
    succeeded (``selected``: :attr:`SyncReport.selected`) that it no longer
    covers: their secrets were disabled, deleted or retagged."""
    return tuple(path for directory, paths in selected for path in ledger.orphans(paths)
                 if os.path.dirname(path) == directory)


def _members(ledger: Ledger, directories: Iterable[str]) -> Set[str]:
    """The recorded member paths of the recorded sets at ``directories``."""
    wanted = set(directories)
    return {path for record in ledger.sets() if record.directory in wanted
            for path in record.paths}


def _by_set(paths: Iterable[str], top: str) -> Tuple[Tuple[str, str, Tuple[str, ...]], ...]:
    """``paths`` grouped by their set's directory (sorted), each with its writer root."""
    by_set: Dict[str, List[str]] = {}
    for path in paths:
        by_set.setdefault(os.path.dirname(path), []).append(path)
    return tuple((directory, writer_root_for(directory, top), tuple(members))
                 for directory, members in sorted(by_set.items()))


def foreign_files(manifest: Manifest) -> Tuple[str, ...]:
    """Files in the manifest's sets' directories that are not the agent's:
    kept, never deleted, and named in STATUS= so someone moves them."""
    paths = {entry.key: entry.paths for entry in manifest.secrets}
    return tuple(path for group in manifest.sets
                 for path in foreign_in_set(group.directory,
                                            [p for key in group.keys for p in paths.get(key, ())]))


class Reconciler:
    """The ledger, the writers by root and the removals a reload left for
    later; performs the plans above. ``clock``: the daemon's monotonic clock
    (the writers' grace deadlines are the loop's timers); ``on_retiring``: a
    swap, even in the refresh thread, wakes the loop to set the timer for its
    old generation."""

    def __init__(self, clock: Callable[[], float], on_retiring: Callable[[], None]) -> None:
        self.ledger = Ledger()
        self._clock = clock
        self._on_retiring = on_retiring
        self._writers: Dict[str, Writer] = {}
        self._pending: List[Tuple[Manifest, Manifest]] = []  # (old, new), until no refresh runs
        self.foreign: Tuple[str, ...] = ()  # as the last refresh left the sets' directories

    def load(self, document: Mapping[str, Any]) -> None:
        """At start: the ledger a previous run left in status.json (either version)."""
        self.ledger = Ledger(read_written(document), read_sets(document))

    def has_writer(self, root: str) -> bool:
        """Whether ``root`` is in use already (a new one is cleaned first)."""
        return root in self._writers

    def writer(self, root: str) -> Writer:
        """The one writer for ``root``, on the daemon's clock."""
        writer = self._writers.get(root)
        if writer is None:
            writer = self._writers[root] = Writer(root, clock=self._clock,
                                                  on_retiring=self._on_retiring)
        return writer

    # -- removals ----------------------------------------------------------------------

    def remove_orphans(self, manifest: Manifest) -> None:
        """At start: what a previous run wrote for entries ``manifest`` lacks."""
        self._remove(plan_orphans(manifest, self.ledger))

    def dropped(self, old: Manifest, new: Manifest, *, is_refreshing: bool) -> None:
        """A reload replaced ``old`` by ``new``: remove what it dropped now,
        or once no refresh runs (:meth:`remove_pending`)."""
        self._pending.append((old, new))
        self.remove_pending(is_refreshing=is_refreshing)

    def remove_pending(self, *, is_refreshing: bool) -> None:
        """Remove what reloads dropped, unless a refresh runs (see the module docstring)."""
        if is_refreshing:
            return
        while self._pending:
            old, new = self._pending.pop(0)
            self._remove(plan_dropped(old, new, self.ledger))

    def follow_selections(self, report: SyncReport, root: str) -> None:
        """Remove the files of ``select:`` entries' secrets that no longer match."""
        for path in plan_unselected(report.selected, self.ledger):
            log.info("%s: its secret no longer matches the select entry", path)
            self.ledger.remove(root, path)

    def _remove(self, plan: RemovalPlan) -> None:
        for directory, root in plan.sets:
            self.ledger.remove_set(self.writer(root), directory)
        for path, root in plan.files:
            self.ledger.remove(root, path)
        for directory, root, paths in plan.members:
            self.ledger.remove_members(self.writer(root), directory, paths)

    # -- records -----------------------------------------------------------------------

    def record(self, manifest: Manifest, report: SyncReport) -> None:
        """Record the files ``report`` wrote and each set it wrote or found current."""
        for outcome in report.outcomes:
            for path in outcome.changed_paths:
                self.ledger.record(path, outcome.entry.key)
        self._record_sets(manifest, report)

    def record_late(self, messages: Iterable[object]) -> None:
        """At stop: record the files of a refresh that ended meanwhile (its
        :class:`~agent.daemon.refresh.SyncDone` still in the mailbox)."""
        for message in messages:
            if isinstance(message, SyncDone) and isinstance(message.result, SyncReport):
                self.record(message.agent.manifest, message.result)

    def _record_sets(self, manifest: Manifest, report: SyncReport) -> None:
        """Record each set whose every member a refresh wrote or found
        current: the set's directory and every member's inode (a swap gives
        unchanged members new inodes too)."""
        done = {outcome.entry.key: outcome for outcome in report.outcomes}
        for group in manifest.sets:
            members = [done[key] for key in group.keys if key in done]
            if len(members) != len(group.keys) or any(o.error for o in members):
                continue
            entry_of = {path: o.entry.key for o in members for path in o.entry.paths}
            self.ledger.record_set(group.directory, entry_of, group.name, entry_of)

    def scan_foreign(self, manifest: Manifest) -> None:
        """Look again for files in ``manifest``'s sets' directories that are not ours."""
        self.foreign = foreign_files(manifest)

    # -- old set generations -----------------------------------------------------------

    def retire_deadline(self) -> Optional[float]:
        """When the oldest pending generation's grace ends; None when
        nothing is pending, so an idle agent has no timer. Whether a refresh
        runs does not matter (see the module docstring)."""
        deadlines = [deadline for deadline in (writer.retire_deadline()
                                               for writer in self._writers.values())
                     if deadline is not None]
        return min(deadlines) if deadlines else None

    def retire_due(self) -> None:
        """Remove old set generations whose grace has passed (an old key
        must not stay in tmpfs until the next rotation)."""
        deadline = self.retire_deadline()
        if deadline is None or self._clock() < deadline:
            return
        for writer in self._writers.values():
            for directory in writer.retire():
                log.debug("removed the old generation %s", directory)

    def stop(self) -> None:
        """The agent stops: no reader is protected past its life; no old key
        stays, and a refresh still stuck on the network cannot swap in another."""
        for writer in self._writers.values():
            writer.stop()
