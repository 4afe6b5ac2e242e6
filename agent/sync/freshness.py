"""List-based refresh: which sources a refresh must GET, and what it remembers.

A refresh that GETs every secret costs one vault request per secret, every
interval, on every VM (issue 12). Key Vault's list (``GET /secrets``, 25 items a
page, no values [protocol.md B4]) tells, for a whole vault, each secret's
``attributes.updated``: a secret whose ``updated`` is what the agent last wrote,
and whose files are still the files the agent wrote, needs no GET.

The decision, per refresh:

1. An entry is *current* when the last refresh wrote it with this very entry
   (same outputs, transform, owner, mode), each of its files still carries
   the :class:`FileStamp` taken after that write, and every one of its
   sources is current. A set is current only when all its members are, and
   the set itself is the one last written whole. Everything else is fetched
   as before, all of an entry's sources (a template needs every value), all
   of a set's members (a set is written whole).
2. A source pinned to a ``version:`` is immutable: once written, it is
   current without any request (a deleted or disabled pinned version goes
   unnoticed until a file check fails or the agent restarts).
3. An unpinned source is current when its vault was listed this refresh, the
   list holds it enabled, and its ``updated`` (and version, when the list
   gives one) is the one last written. Absent from the list (deleted) or
   disabled: fetched, so its error reads as it always did and its file stays.
   ``updated`` has a resolution of one second, so it is trusted only for a
   version fetched at least SETTLED_S after its ``updated``: a GET in the very
   second of a write could have seen the write before a second one in that
   same second, with the same ``updated``. "After" is read on the vault's own
   clock, the ``Date`` of the GET's answer, never on the VM's: a VM clock
   minutes ahead would otherwise take a version fetched in the second of its
   write for settled, and miss a rotation in that same second for good
   (issue 17, item 12). The Date is the answer's, so it is no earlier than
   the read; SETTLED_S (60 s) is longer than a request may take (30 s) and
   than the skew between the vault's own machines. Only a vault that sends
   no usable Date is judged on the VM's clock. In practice the refresh that
   finds a rotation runs minutes after it, so this costs nothing; a secret
   written just before a refresh is fetched once more at the next.
4. A vault is listed only when that is cheaper: ⌈size ÷ 25⌉ pages against one
   GET per remembered unpinned source, ``size`` from its last listing. A
   vault never listed is listed with a page budget one below the GETs it
   would save; a longer list stops at the budget (the vault is too large:
   per-secret GETs from then on). The initial sync (nothing remembered) and
   a vault whose list is forbidden (403: an access-policy vault without the
   ``list`` permission) use per-secret GETs.
5. While the agent is starting (not yet ready), a source that a previous
   attempt of this start fetched less than one refresh interval ago is
   current without any request (``fresh_since``): a failed start retries
   only what is still missing, neither listing nor GETting again what it
   just wrote, so 2,000 VMs booting into a throttled vault do not refetch
   their first files at every attempt (issue 12, fleet). Such a file is no
   older than a refresh interval, as after any refresh; the first refresh
   after READY checks it as usual.

Local check, decided: a :class:`FileStamp` is the file's inode, device, size,
owner, mode and **ctime**. A write(2), truncate, chmod, chown or link by
another process moves ctime, which no one can set back (mtime can be, with
``touch -d``); so such an edit behind the agent's back is seen without reading
the file, and the entry is fetched and written again.

One edit keeps inode, size and ctime: a store through a shared writable
mapping (mmap(2) MAP_SHARED) to a page already faulted in. On tmpfs only a
store that itself faults the page in moves ctime; after a read of the page,
or a first store, every store is unseen by ``lstat`` (issue 17: 0 GETs over
6 refreshes). Only whoever may open the file for writing can map it so: root
(trusted: it could do anything to the agent) and, through the mode, the
owner when that is not the agent's own user, the group and others. A file
whose mode lets any of those write it (:func:`is_writable_by_others`) is
also verified by content: its stamp carries a keyed BLAKE2b digest of its
bytes (the key is random per process; digest and key live in memory only,
never on disk or in a log), read again at every refresh. Every refresh, not
every Nth: the cost is one open, read and hash per such file, measured
(``tests/bench/stamps.py``, 1,000 files) at 12 to 17 ms of CPU per refresh
for 64 B to 4 KB values and 45 to 60 ms at Key Vault's 25 KB maximum,
against 3 to 5 ms for ``lstat`` alone; a refresh comes minutes apart. A
file of mode 0400 or 0440 (the default, and the usual choice) is not
writable by others and costs one ``lstat``. No secret value is ever kept
between refreshes.

Everything here is a pure function of values, but for :func:`file_stamp` (one
``lstat``, and a read for a file others may write) and the injected
``list_vault`` call.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import secrets
import stat
from typing import Callable, Dict, Iterable, Mapping, NamedTuple, Optional, Sequence, Tuple

from agent.base.errors import KvAgentError, ListTooLongError, VaultError, VaultForbiddenError
from agent.manifest import Entry
from agent.pipeline.expiry import Validity
from agent.pipeline.outputs import EntrySet
from agent.pipeline.sources import Source
from agent.vault.listing import PAGE_SIZE, SecretItem, pages_for

log = logging.getLogger(__name__)

# How long after its ``updated`` (on the vault's clock) a fetched version is
# trusted to be the last one of that second (see rule 3).
SETTLED_S = 60.0
# The largest file verified by content (see "Local check"); a larger one
# that others may write has no stamp, so its entry is fetched every refresh.
# Far above any secret: Key Vault holds 25 KB a value.
MAX_VERIFIED_BYTES = 1 << 20
_WRITE_BITS = stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH


class FileStamp(NamedTuple):
    """What a file looked like right after the agent wrote (or confirmed) it.

    ``digest`` is a keyed hash of the content, only for a file others may
    write (see "Local check" above); None otherwise. Never shown in a repr.
    """

    inode: int
    device: int
    size: int
    ctime_ns: int
    uid: int
    gid: int
    mode: int
    digest: Optional[bytes] = None

    def __repr__(self) -> str:
        digest = "None" if self.digest is None else "****"
        return (f"FileStamp(inode={self.inode}, device={self.device}, size={self.size}, "
                f"ctime_ns={self.ctime_ns}, uid={self.uid}, gid={self.gid}, "
                f"mode={self.mode:#o}, digest={digest})")


class SourceSeen(NamedTuple):
    """The version of a source last written, its ``attributes.updated``, the
    VM's wall time (epoch seconds) just before the GET that brought it, and
    the vault's own time when it answered that GET (its ``Date``; None when
    it sent no usable one)."""

    version: str
    updated: Optional[int]
    fetched_at: float = 0.0
    answered_at: Optional[float] = None

    def is_settled(self, updated: int) -> bool:
        """Whether a version ``updated`` (vault epoch seconds) was fetched at
        least SETTLED_S after that, on the vault's clock when known (rule 3)."""
        fetched = self.answered_at if self.answered_at is not None else self.fetched_at
        return updated + SETTLED_S < fetched


class EntryWritten(NamedTuple):
    """An entry as last written: the entry itself (a manifest edit makes it
    another), its version and validity (reported again when nothing is
    fetched) and the stamp of each of its files."""

    entry: Entry
    version: Optional[str]
    validity: Validity
    stamps: Tuple[Tuple[str, FileStamp], ...]


class VaultSeen(NamedTuple):
    """A vault as the last listing saw it: its number of secrets (None: never
    listed; a lower bound when the list ran past its budget) and whether
    listing is forbidden."""

    size: Optional[int] = None
    is_forbidden: bool = False


class Freshness(NamedTuple):
    """The agent's memory between refreshes; an empty one means "initial
    sync". A value: each refresh returns a new one (never mutated)."""

    sources: Mapping[Source, SourceSeen] = {}
    entries: Mapping[str, EntryWritten] = {}  # by Entry.key
    sets: Mapping[str, EntrySet] = {}  # by directory: the sets last written whole
    vaults: Mapping[str, VaultSeen] = {}


class Plan(NamedTuple):
    """One refresh's decision: entries that need nothing (by key, with what
    was last written), sources to GET, and each vault as now known."""

    current: Mapping[str, EntryWritten]
    fetch: Tuple[Source, ...]
    vaults: Mapping[str, VaultSeen]


# (vault, max_pages) -> every item of its list; raises a VaultError.
ListVault = Callable[[str, int], Sequence[SecretItem]]
Stamp = Callable[[str], Optional[FileStamp]]


def file_stamp(path: str, euid: Optional[int] = None) -> Optional[FileStamp]:
    """The stamp of ``path`` (never following a link); None unless a regular
    file. One ``lstat``; and, for a file others may write
    (:func:`is_writable_by_others`; ``euid`` is the agent's own user, this
    process's by default), one read of at most MAX_VERIFIED_BYTES for its
    digest: None when it cannot be read whole, so the entry is fetched."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    found = FileStamp(st.st_ino, st.st_dev, st.st_size, st.st_ctime_ns, st.st_uid, st.st_gid,
                      stat.S_IMODE(st.st_mode))
    if not is_writable_by_others(st.st_uid, st.st_mode,
                                 os.geteuid() if euid is None else euid):
        return found
    digest = _content_digest(path, st)
    return None if digest is None else found._replace(digest=digest)


def is_writable_by_others(uid: int, mode: int, euid: int) -> bool:
    """Whether a file of owner ``uid`` and ``mode`` may be opened for writing
    (and so mapped writable) by someone other than root and ``euid``, the
    agent's own user: by its group or others, or by its owner when that is
    another user (a service's user given ``mode: "0600"``, say). An owner
    without the write bit must chmod first, which moves ctime. Pure."""
    if not mode & _WRITE_BITS:
        return False
    return bool(mode & (stat.S_IWGRP | stat.S_IWOTH)) or uid not in (0, euid)


def _content_digest(path: str, st: os.stat_result) -> Optional[bytes]:
    """The keyed digest of the file ``st`` describes, read without following
    a link or blocking (a FIFO swapped in reads as nothing); None when
    another file took its place, it is over MAX_VERIFIED_BYTES, or it cannot
    be read. Reads at most one byte past ``st.st_size``: a file grown since
    hashes differently anyway."""
    if st.st_size > MAX_VERIFIED_BYTES:
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        opened = os.fstat(fd)
        if (opened.st_ino, opened.st_dev) != (st.st_ino, st.st_dev):
            return None
        hasher = hashlib.blake2b(key=_digest_key(), digest_size=32)
        left = st.st_size + 1
        while left > 0:
            chunk = os.read(fd, min(left, 65536))
            if not chunk:
                break
            hasher.update(chunk)
            left -= len(chunk)
        return hasher.digest()
    except OSError:
        return None
    finally:
        os.close(fd)


@functools.lru_cache(maxsize=1)
def _digest_key() -> bytes:
    """This process's random key for content digests, made at first use:
    a digest that leaked alone (a log, a core file's fragment) cannot be
    checked against guesses of a short secret."""
    return secrets.token_bytes(32)


def listing_pages(size: int) -> int:
    """Requests a list of ``size`` secrets costs: ⌈size ÷ 25⌉, at least one."""
    return pages_for(size)


def list_budget(seen: Optional[VaultSeen], remembered: int) -> Optional[int]:
    """Pages a refresh may spend listing a vault, or None for per-secret GETs.

    ``remembered`` is the number of unpinned sources on the vault that a
    previous refresh wrote: the GETs a listing could save. Listing wins only
    when it costs fewer requests: never for a forbidden vault, nor for one
    whose last listing already cost as much.
    """
    if remembered < 2 or (seen is not None and seen.is_forbidden):
        return None
    if seen is not None and seen.size is not None and listing_pages(seen.size) >= remembered:
        return None
    return remembered - 1


def is_fetched_since(seen: Optional[SourceSeen], since: Optional[float]) -> bool:
    """Whether ``seen`` was fetched at or after ``since`` (wall seconds; None:
    never), which makes it current while starting (rule 5)."""
    return since is not None and seen is not None and seen.fetched_at >= since


def is_source_current(source: Source, seen: Optional[SourceSeen],
                      listing: Optional[Mapping[str, SecretItem]],
                      fresh_since: Optional[float] = None) -> bool:
    """Whether ``source`` needs no GET (rules 2, 3 and 5 of the module docstring)."""
    if seen is None:
        return False
    if source.version is not None:
        return True  # a pinned version never changes
    if is_fetched_since(seen, fresh_since):
        return True
    if listing is None:
        return False
    item = listing.get(source.name.lower())  # names are case-insensitive [B7]
    if item is None or item.attributes.enabled is False:
        return False
    updated = item.attributes.updated
    return updated is not None and updated == seen.updated and \
        seen.is_settled(updated) and item.version in (None, seen.version)


def is_on_disk(written: EntryWritten, entry: Entry, stamp: Stamp) -> bool:
    """Whether ``entry`` is the one written and each of its files is still
    as written (the local check: one lstat per file, and a read for a file
    others may write)."""
    if written.entry != entry:
        return False
    stamps = dict(written.stamps)
    return all(path in stamps and stamp(path) == stamps[path] for path in entry.paths)


def plan(entries: Sequence[Entry], groups: Iterable[EntrySet], memory: Freshness,
         list_vault: ListVault, stamp: Stamp = file_stamp,
         fresh_since: Optional[float] = None) -> Plan:
    """Decide one refresh: list the vaults worth listing, then which entries
    are current and which sources to GET. ``fresh_since`` (wall seconds;
    only while starting): sources fetched since then need no request and
    count for no listing (rule 5). Never raises for a vault's list: one that
    fails is fetched per secret (a forbidden one for good, said once); an
    IMDS failure (IdentityUnavailableError) propagates."""
    vaults = dict(memory.vaults)
    listings: Dict[str, Mapping[str, SecretItem]] = {}
    for vault, count in _remembered_by_vault(entries, memory, fresh_since).items():
        budget = list_budget(vaults.get(vault), count)
        if budget is not None:
            listed = _list(vault, budget, vaults.get(vault, VaultSeen()), list_vault)
            vaults[vault] = listed[0]
            if listed[1] is not None:
                listings[vault] = listed[1]
    current: Dict[str, EntryWritten] = {}
    for entry in entries:
        written = memory.entries.get(entry.key)
        if written is not None and is_on_disk(written, entry, stamp) and all(
                is_source_current(source, memory.sources.get(source), listings.get(source.vault),
                                  fresh_since)
                for source in entry.sources):
            current[entry.key] = written
    for group in groups:
        if memory.sets.get(group.directory) != group or \
                not all(key in current for key in group.keys):
            for key in group.keys:
                current.pop(key, None)
    fetch = tuple(dict.fromkeys(source for entry in entries if entry.key not in current
                                for source in entry.sources))
    return Plan(current, fetch, vaults)


def with_sizes(decided: Plan, sizes: Mapping[str, int]) -> Plan:
    """``decided`` with each vault in ``sizes`` (listed whole this refresh, by
    a ``select:`` entry) known to hold that many secrets: its next listing's
    pages are bounded by it (:func:`agent.vault.listing.page_bound`)."""
    if not sizes:
        return decided
    vaults = dict(decided.vaults)
    for vault, size in sizes.items():
        vaults[vault] = vaults.get(vault, VaultSeen())._replace(size=size)
    return decided._replace(vaults=vaults)


def _remembered_by_vault(entries: Sequence[Entry], memory: Freshness,
                         fresh_since: Optional[float] = None) -> Dict[str, int]:
    """Per vault, the distinct unpinned sources a previous refresh wrote (and
    that are not current by rule 5 already)."""
    sources = {source for entry in entries for source in entry.sources
               if source.version is None and source in memory.sources
               and not is_fetched_since(memory.sources[source], fresh_since)}
    counts: Dict[str, int] = {}
    for source in sources:
        counts[source.vault] = counts.get(source.vault, 0) + 1
    return counts


def _list(vault: str, budget: int, seen: VaultSeen, list_vault: ListVault
          ) -> Tuple[VaultSeen, Optional[Mapping[str, SecretItem]]]:
    """List ``vault`` within ``budget`` pages: what is now known of it, and
    its items by lower-cased name (None: fetch its secrets one by one)."""
    try:
        items = list_vault(vault, budget)
    except ListTooLongError:
        log.info("vault %s holds more than %d secrets: fetching its secrets one by one "
                 "costs fewer requests than listing it", vault, budget * PAGE_SIZE)
        return VaultSeen(size=budget * PAGE_SIZE + 1), None
    except VaultForbiddenError as exc:
        log.warning("%s; fetching its secrets one by one, each refresh (fix: %s, and "
                    "restart or reload kv-agent)", exc.message,
                    "grant the identity the 'list' secret permission in the vault's "
                    "access policy, or the 'Key Vault Secrets User' role")
        return seen._replace(is_forbidden=True), None
    except VaultError as exc:
        log.info("%s; fetching its secrets one by one this refresh", exc.message)
        return seen, None
    return VaultSeen(size=len(items)), {item.name.lower(): item for item in items}


def remember(memory: Freshness, decided: Plan, groups: Iterable[EntrySet],
             written: Sequence["WrittenOutcome"], stamp: Stamp = file_stamp) -> Freshness:
    """The memory after a refresh that ``decided`` and wrote ``written``: only
    entries of this manifest, only what succeeded (a failed entry is fetched
    again next time), a stamp taken now for each file just written."""
    still = {source for one in written if one.written.entry.key in decided.current
             for source in one.written.entry.sources}
    sources = {source: seen for source, seen in memory.sources.items() if source in still}
    entries: Dict[str, EntryWritten] = {}
    for one in written:
        key = one.written.entry.key
        if key in decided.current:
            entries[key] = decided.current[key]
            continue
        if one.error is not None:
            continue
        entry = one.written.entry
        stamps = [(path, stamp(path)) for path in entry.paths]
        if any(found is None for _, found in stamps):
            continue
        entries[key] = one.written._replace(
            stamps=tuple((path, found) for path, found in stamps if found is not None))
        sources.update(one.sources)
    sets = {group.directory: group for group in groups
            if all(key in entries for key in group.keys)}
    return Freshness(sources, entries, sets, decided.vaults)


class WrittenOutcome(NamedTuple):
    """What :func:`remember` needs of one entry's outcome: the entry as written
    (stamps filled in by :func:`remember`), the sources' versions fetched for
    it, and its error, if any."""

    written: EntryWritten
    sources: Tuple[Tuple[Source, SourceSeen], ...] = ()
    error: Optional[KvAgentError] = None


def forget_forbidden(memory: Freshness) -> Freshness:
    """The memory with every vault's list tried again (after a reload: the
    operator may have granted the permission)."""
    vaults = {vault: seen._replace(is_forbidden=False) for vault, seen in memory.vaults.items()}
    return memory._replace(vaults=vaults)

