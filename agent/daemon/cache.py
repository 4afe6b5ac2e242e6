"""The daemon's side of the sealed cache (``cache:``): saving good copies,
and serving them at start while the vault cannot be reached.

After every refresh, each entry that succeeded has its bytes sealed into the
store (:class:`~agent.cache.store.CacheStore`, which skips an unchanged
copy): its files' bytes as the refresh left them on disk, and its
credentials' bytes as the credential store holds them. At start and at
every reload that installs a manifest, copies of entries no longer in it
are pruned.

Which entries: the manifest's own (``secrets:``), and those of each
``select:`` entry's last good listing, with that expansion itself (the
secret names, no value; sealed all the same) beside them, so that a start
without the vault can serve the select: entry whole.

Serving: ``after`` into the start (and after each refresh that ends later,
while the agent is not ready), every required entry not on disk whose last
refresh found the identity endpoint or the vault unavailable is written from
its copy (:func:`agent.cache.decision.decide`: this entry's, readable, younger
than ``max_age``; an answer such as a 403 or 404 is never hidden), through
the daemon's writer (owner, mode, atomicity as fetched) and into the
credential store; a set (a certificate's files, ``set:``) whole by one swap,
or not at all (:mod:`agent.daemon.cache_serve`). The daemon then sends
READY=1 if the gate is met, with the ``serving`` line in STATUS=. A ready
agent never serves: it keeps its files. A ``select:`` entry is served
from its sealed expansion whole, or not at all. Each skip is one line
naming the entry and the reason, logged once.

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
import time
from typing import Callable, Dict, List, Optional, Set, Tuple, Union

from agent.base.errors import CacheError, KvAgentError
from agent.cache.copy import Copy, expansion, expansion_key, expansion_names
from agent.cache.policy import CachePolicy
from agent.cache.seal import MACHINE_WIDE, Sealer
from agent.cache.store import CacheStore
from agent.daemon.cache_serve import Serving, Units, fingerprint
from agent.daemon.entries import EntryTable
from agent.daemon.reconcile import Reconciler
from agent.manifest import Entry, Manifest
from agent.pipeline.credentials import Grant
from agent.pipeline.expiry import moment
from agent.status.line import serving_part
from agent.sync.sync import SyncReport
from agent.writer.credentials import CredentialStore

log = logging.getLogger(__name__)

MAX_FILE_BYTES = 1024 * 1024  # a file larger than this is not what the agent wrote: skipped


class SealedCache:
    """The manifest's ``cache:`` in use (none: nothing happens), its store,
    and what was said about it. ``sealer`` runs systemd-creds (tests: in a
    private namespace)."""

    def __init__(self, sealer: Optional[Sealer] = None,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self._sealer = sealer or Sealer()
        self._clock = monotonic
        self.policy: Optional[CachePolicy] = None
        self.store: Optional[CacheStore] = None
        self._units = Units()
        self._expanded: Dict[str, Tuple[str, ...]] = {}  # select: key -> its entries' keys
        self._directory = ""  # the manifest's directory (its writer writes what is served)
        self._said: Set[str] = set()  # each problem is logged once
        self._started: Optional[float] = None  # monotonic: the first install
        self._causes: Dict[str, KvAgentError] = {}  # why each entry is not current
        self._check = True  # a refresh ended since the last look (or none was taken)
        self.served: Dict[str, float] = {}  # entry key -> its copy's fetch time, while served
        self.serving: Optional[str] = None  # the status line's part while copies stand in

    def install(self, manifest: Manifest) -> None:
        """Use ``manifest``'s ``cache:`` (a new store when its directory
        changed) and prune the copies of entries it no longer has."""
        self.policy = manifest.cache
        self._units = Units.of(manifest)
        self._directory = manifest.directory
        if self._started is None:
            self._started = self._clock()
        if self.policy is None:
            self.store = None
            return
        if self.store is None or self.store.directory != self.policy.directory:
            self.store = CacheStore(self.policy.directory, self._sealer)
        self._expanded = {key: keys for key, keys in self._expanded.items()
                          if key in self._units.selections}
        self._prune()

    def _prune(self) -> None:
        """Remove the copies of entries neither the manifest nor a ``select:``
        entry's last expansion has. An expansion not known in this run is read
        from its sealed copy first; while one cannot be read, nothing is
        removed (its entries' copies cannot be told from stale ones)."""
        assert self.store is not None
        for key, selection in self._units.selections.items():
            if key not in self._expanded:
                try:
                    copy = self.store.load(expansion_key(selection.directory))
                    self._expanded[key] = () if copy is None else tuple(
                        entry.key for entry in self._units.expanded(
                            selection, expansion_names(copy, fingerprint(selection))))
                except CacheError as exc:
                    self._say(str(exc))
                    return
        keep = list(self._units.entries) + [
            expansion_key(selection.directory) for selection in self._units.selections.values()
        ] + [key for keys in self._expanded.values() for key in keys]
        try:
            removed = self.store.prune(keep)
        except CacheError as exc:
            self._say(str(exc))
            return
        if removed:
            log.info("sealed cache: removed %d copies of entries no longer in the manifest",
                     len(removed))

    def from_cache(self) -> Optional[Dict[str, float]]:
        """The entries served now (key -> copy's fetch time), for the metrics;
        None without ``cache:`` (no gauge then)."""
        return None if self.policy is None else self.served

    def refreshed(self, result: Union[SyncReport, KvAgentError],
                  credentials: CredentialStore[Grant], now_wall: float,
                  is_current: bool = True) -> None:
        """A refresh ended: note why entries are not current, end the
        serving of every entry it fetched, and save the good copies, unless
        it refreshed a manifest a reload replaced meanwhile (``is_current``
        False): its listings are not the new manifest's selections."""
        self._check = True
        if isinstance(result, KvAgentError):
            self._causes = {key: result for key in self._units.keys()}
            return
        self._causes = {o.entry.key: o.error for o in result.outcomes if o.error is not None}
        for outcome in result.outcomes:
            if outcome.error is None:
                self.served.pop(outcome.entry.key, None)
        for directory, paths in result.selected:  # no longer selected: not served either
            for key in [key for key in self.served if os.path.dirname(key) == directory
                        and key not in paths]:
                del self.served[key]
        if not self.served and self.serving is not None:
            log.info("sealed cache: every served entry fetched again; the cache is no "
                     "longer in use")
            self.serving = None
        if is_current:
            self.save(result, credentials, now_wall)

    def save(self, report: SyncReport, credentials: CredentialStore[Grant],
             fetched_at: float) -> None:
        """Seal the bytes of every entry ``report`` wrote or found current.
        Never raises CacheError; stops at the first failure of the machine
        (:data:`~agent.cache.seal.MACHINE_WIDE`: each would hold the main
        thread up to the sealer's timeout)."""
        if self.store is None or self.policy is None:
            return
        copies: List[Copy] = []
        for outcome in report.outcomes:
            entry = self._units.current(outcome.entry)
            if outcome.error is not None or entry is None:
                continue  # failed, or of a manifest since replaced
            try:
                copies.append(Copy(entry.key, fetched_at, gather(entry, credentials)))
            except CacheError as exc:
                self._say(str(exc))
        names = {outcome.entry.key: outcome.entry.name for outcome in report.outcomes}
        expanded = dict(self._expanded)
        for directory, paths in report.selected:
            selection = self._units.selections.get(directory)
            if selection is not None:  # its last good expansion, beside the copies
                copies.append(expansion(directory, fetched_at, fingerprint(selection),
                                        [names[path] for path in paths if path in names]))
                self._expanded[directory] = tuple(paths)
        for copy in copies:
            try:
                self.store.save(copy, self.policy.max_age_s)
            except MACHINE_WIDE as exc:
                self._say(str(exc))
                return  # the next refresh tries again; nothing pruned meanwhile
            except CacheError as exc:
                self._say(str(exc))
        if self._expanded != expanded:
            self._prune()  # the copies of secrets no longer selected

    # -- serving at start --------------------------------------------------------------------

    def deadline(self, is_ready: bool) -> Optional[float]:
        """When (monotonic) to look at serving from the cache: ``after`` into
        the start, and again after each refresh while not ready; None once
        ready, without ``cache:``, or until the next refresh ends."""
        if is_ready or self.policy is None or self._started is None or not self._check:
            return None
        return self._started + self.policy.after_s

    def is_due(self, is_ready: bool, now: float) -> bool:
        """Whether to look at serving now (monotonic ``now``)."""
        deadline = self.deadline(is_ready)
        return deadline is not None and now >= deadline

    def serve(self, entries: EntryTable, reconcile: Reconciler,
              credentials: CredentialStore[Grant], now_wall: float) -> bool:
        """Write each unit READY waits for that may be served from its copies
        (:mod:`agent.daemon.cache_serve`: an entry, or a set whole), through
        the daemon's writer, recording its files in the ledger and as on disk
        in ``entries``. True when some were and READY's condition is now met.
        Each unit not served for a reason worth saying gets one line, once."""
        self._check = False
        if self.store is None or self.policy is None:
            return False
        ledger = reconcile.ledger
        served = Serving(self._units, self.store, self.policy.max_age_s, self._causes,
                         now_wall, reconcile.writer(self._directory), credentials, ledger,
                         entries, self._say).run(entries.missing(ledger.inode))
        if not served:
            return False
        self.served.update(served)
        self.serving = self._line(len(entries), list(served))
        log.warning("%s", self.serving)
        return entries.has_every_required_file(ledger.inode)

    def _line(self, total: int, served: List[str]) -> str:
        """``serving N of M from the sealed cache of <time>: <why>``."""
        oldest = min(self.served.values())
        causes = [self._causes[key] for key in served or list(self.served)
                  if key in self._causes]
        why = causes[0].message if causes else "the vault is unreachable"
        return serving_part(len(self.served), total, moment(oldest), why)

    def _say(self, line: str) -> None:
        """Log ``line`` once (a warning: the agent goes on without the copy)."""
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
