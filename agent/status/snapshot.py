"""The status snapshot: one typed value the daemon writes and ``kv-agent status`` reads.

:class:`StatusSnapshot` is everything status.json holds: the agent's phase,
its one-line status (:mod:`agent.status.line`, derived from the rest), the
refresh times, each entry's state and the ledger of files the agent wrote.
The daemon builds one after every change and
:class:`~agent.status.store.StateStore` saves its JSON; ``kv-agent status`` parses
the JSON back with :func:`parse_snapshot` and renders it (:mod:`agent.status.render`).
Both sides share this one definition of the keys and the phase names.

Version 2 knows an entry by its key with the list of its output paths, and
records for each written file the entry it belongs to, and (since issue 11,
still version 2: an older reader ignores the new keys) the sets the agent
wrote and each entry's validity window with its expiry flags; since issue 19
an entry's credentials, and since issue 20, only while sealed copies stand
in for the vault, the ``cache`` line and each served entry's ``from_cache``
(its copy's fetch time); since issue 21, ``agent_version``, the running
agent's own version. Version 1 (one path
per secret; ``written`` as path -> inode) is still read: an agent upgraded in
place finds its predecessor's status.json on /run, and its ledger must
survive so that files of dropped entries are still removed only if they are
the agent's. Parsing is defensive throughout (the file may be damaged): a
value of the wrong type reads as None, never as a crash.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Tuple

from agent.pipeline.expiry import EXPIRED, EXPIRING, NOT_YET_VALID, moment


class Written(NamedTuple):
    """One file the agent wrote: its path, its inode then, and the key of
    the entry it belongs to (None when an older agent recorded it)."""

    path: str
    inode: int
    entry: Optional[str] = None


class WrittenSet(NamedTuple):
    """One set the agent wrote: its directory, its member paths, its name."""

    directory: str
    paths: Tuple[str, ...]
    name: Optional[str] = None


STATUS_VERSION = 2
READABLE_VERSIONS = (1, 2)

# The daemon's phases, as status.json spells them.
STARTING = "starting"
READY = "ready"
RELOADING = "reloading"
STOPPED = "stopped"


def iso_time(epoch_s: Optional[float]) -> Optional[str]:
    """UTC ISO 8601 with seconds, or None; total (:func:`agent.pipeline.expiry.moment`:
    one date out of range once made every status.json write fail)."""
    if epoch_s is None:
        return None
    return moment(epoch_s)


class EntryStatus(NamedTuple):
    """One manifest entry as status.json shows it; times are ISO 8601 text."""

    name: str
    paths: Tuple[str, ...]
    vault: Optional[str] = None
    is_optional: bool = False
    version: Optional[str] = None
    updated: Optional[str] = None
    checked: Optional[str] = None
    error: Optional[str] = None
    cause: Optional[str] = None
    error_since: Optional[str] = None
    not_before: Optional[str] = None  # validity of what was written (agent.pipeline.expiry)
    expires: Optional[str] = None
    expiry: Optional[str] = None  # "expired", "expiring", "not yet valid" or None
    # A ready agent's new entry (from a reload) that its first refresh has not
    # written or failed yet: not on disk, though nothing failed (issue 17).
    is_pending: bool = False
    # The systemd credentials it serves, each as credential:<units>/<ID>
    # (issue 19), and whether their values are in memory; never a value.
    credentials: Tuple[str, ...] = ()
    is_loaded: bool = False
    # While its sealed copy stands in for the vault (issue 20): when that copy
    # was fetched (ISO 8601; its age is now minus this). Saved only then.
    from_cache: Optional[str] = None

    @property
    def path(self) -> str:
        """The entry's key: its first output's path, or for an entry that
        writes no file its first credential, ``credential:<units>/<ID>``."""
        return (self.paths or self.credentials or ("?",))[0]

    @property
    def targets(self) -> Tuple[str, ...]:
        """Where its bytes go: each file, then each credential."""
        return self.paths + self.credentials

    def as_json(self) -> Dict[str, Any]:
        # "path" stays beside "paths" for readers of version 1.
        document = {
            "name": self.name, "path": self.path, "paths": list(self.paths),
            "vault": self.vault, "optional": self.is_optional, "version": self.version,
            "updated": self.updated, "checked": self.checked, "error": self.error,
            "cause": self.cause, "error_since": self.error_since,
            "not_before": self.not_before, "expires": self.expires,
            "expired": self.expiry == EXPIRED, "expiring": self.expiry == EXPIRING,
            "not_yet_valid": self.expiry == NOT_YET_VALID, "pending": self.is_pending}
        if self.credentials:  # an entry without keeps the keys it always had
            document.update(credentials=list(self.credentials), loaded=self.is_loaded)
        if self.from_cache is not None:  # only while served: older readers ignore it
            document["from_cache"] = self.from_cache
        return document


class StatusSnapshot(NamedTuple):
    """The whole of status.json (and two fields only the status line reads).
    ``status`` is :func:`agent.status.line.status_line` of the rest."""

    pid: Optional[int]
    phase: str
    saved_at: Optional[str]  # when stopped: the time of the stop
    status: str
    manifest: Optional[str]
    entries: Tuple[EntryStatus, ...] = ()
    written: Tuple[Written, ...] = ()
    sets: Tuple[WrittenSet, ...] = ()
    manifest_error: Optional[str] = None
    directory: Optional[str] = None
    error: Optional[str] = None
    last_refresh: Optional[str] = None
    next_refresh: Optional[str] = None
    refresh_interval_s: Optional[float] = None
    # which identity endpoint and why, e.g. "arc (IDENTITY_ENDPOINT and
    # IMDS_ENDPOINT are set)": agent.identity.tokens.SourceChoice.describe()
    identity_source: Optional[str] = None
    # What the running refresh retries, e.g. "waiting for IMDS: connection
    # refused (attempt 4)"; None when no refresh waits (issue 17).
    waiting: Optional[str] = None
    is_refreshing: bool = False  # a refresh runs (after a reload's READY=1, say)
    version: int = STATUS_VERSION
    # For the status line (agent.status.line) only, not saved (status.json
    # keeps its keys): whether the agent has been ready (a stopped agent's
    # phase no longer says), and files in sets' directories that are not the
    # agent's (kept, named so someone moves them).
    is_ready: bool = False
    foreign: Tuple[str, ...] = ()
    # While sealed copies stand in for an unreachable vault (agent.daemon.cache):
    # "serving N of M from the sealed cache of <time>: <why>"; saved as "cache".
    cache: Optional[str] = None
    # The running agent's own version (agent.__version__): after a package upgrade,
    # `kv-agent status` tells the new code from the old process still running.
    agent_version: Optional[str] = None

    def as_json(self) -> Dict[str, Any]:
        document = self._document()
        if self.cache is not None:  # only while served: the keys stay as they were
            document["cache"] = self.cache
        return document

    def _document(self) -> Dict[str, Any]:
        return {
            "version": STATUS_VERSION, "pid": self.pid, "state": self.phase,
            "saved_at": self.saved_at, "status": self.status, "manifest": self.manifest,
            "manifest_error": self.manifest_error, "directory": self.directory,
            "error": self.error, "last_refresh": self.last_refresh,
            "next_refresh": self.next_refresh, "refresh_interval_s": self.refresh_interval_s,
            "identity_source": self.identity_source, "waiting": self.waiting,
            "refreshing": self.is_refreshing, "agent_version": self.agent_version,
            "secrets": [entry.as_json() for entry in self.entries],
            "written": {record.path: {"inode": record.inode, "entry": record.entry}
                        for record in self.written},
            "sets": {record.directory: {"set": record.name, "paths": list(record.paths)}
                     for record in self.sets},
        }


def parse_snapshot(document: Mapping[str, Any]) -> Optional[StatusSnapshot]:
    """The snapshot in a loaded status.json (version 1 or 2), or None when
    there is none (empty, another version, or not a status document)."""
    if not document or document.get("version") not in READABLE_VERSIONS:
        return None
    interval = document.get("refresh_interval_s")
    return StatusSnapshot(
        pid=_int(document.get("pid")), phase=_str(document.get("state")) or "?",
        saved_at=_str(document.get("saved_at")), status=_str(document.get("status")) or "",
        manifest=_str(document.get("manifest")),
        entries=tuple(_entry(item) for item in _list(document.get("secrets"))
                      if isinstance(item, dict)),
        written=read_written(document), sets=read_sets(document),
        manifest_error=_str(document.get("manifest_error")),
        directory=_str(document.get("directory")), error=_str(document.get("error")),
        last_refresh=_str(document.get("last_refresh")),
        next_refresh=_str(document.get("next_refresh")),
        refresh_interval_s=float(interval) if isinstance(interval, (int, float))
        and not isinstance(interval, bool) else None,
        identity_source=_str(document.get("identity_source")),
        waiting=_str(document.get("waiting")),
        is_refreshing=document.get("refreshing") is True,
        version=int(document["version"]), cache=_str(document.get("cache")),
        agent_version=_str(document.get("agent_version")),
    )


def read_written(document: Mapping[str, Any]) -> Tuple[Written, ...]:
    """The ledger of a status document of either version, valid records only:
    version 1 maps path -> inode, version 2 path -> {inode, entry}."""
    written = document.get("written")
    if not isinstance(written, dict):
        return ()
    records: List[Written] = []
    for path, value in written.items():
        if isinstance(value, dict):
            inode, entry = _int(value.get("inode")), _str(value.get("entry"))
        else:
            inode, entry = _int(value), None
        if isinstance(path, str) and inode is not None:
            records.append(Written(path, inode, entry))
    return tuple(sorted(records))


def read_sets(document: Mapping[str, Any]) -> Tuple[WrittenSet, ...]:
    """The sets of the ledger (directory -> {set, paths}), valid records only;
    none in a document an older agent wrote."""
    sets = document.get("sets")
    if not isinstance(sets, dict):
        return ()
    records = []
    for directory, value in sets.items():
        if not isinstance(directory, str) or not isinstance(value, dict):
            continue
        paths = tuple(p for p in _list(value.get("paths")) if isinstance(p, str))
        if paths:
            records.append(WrittenSet(directory, paths, _str(value.get("set"))))
    return tuple(sorted(records))


def _expiry(item: Mapping[str, Any]) -> Optional[str]:
    for key, kind in (("expired", EXPIRED), ("not_yet_valid", NOT_YET_VALID),
                      ("expiring", EXPIRING)):
        if item.get(key) is True:
            return kind
    return None


def _entry(item: Mapping[str, Any]) -> EntryStatus:
    paths = tuple(p for p in _list(item.get("paths")) if isinstance(p, str))
    credentials = tuple(c for c in _list(item.get("credentials")) if isinstance(c, str))
    if not paths and not credentials and isinstance(item.get("path"), str):
        paths = (item["path"],)  # version 1
    return EntryStatus(
        name=_str(item.get("name")) or "?", paths=paths, vault=_str(item.get("vault")),
        is_optional=item.get("optional") is True, version=_str(item.get("version")),
        updated=_str(item.get("updated")), checked=_str(item.get("checked")),
        error=_str(item.get("error")), cause=_str(item.get("cause")),
        error_since=_str(item.get("error_since")), not_before=_str(item.get("not_before")),
        expires=_str(item.get("expires")), expiry=_expiry(item),
        is_pending=item.get("pending") is True, credentials=credentials,
        is_loaded=item.get("loaded") is True, from_cache=_str(item.get("from_cache")))


def _str(value: Any) -> Optional[str]:
    return value if isinstance(value, str) else None


def _int(value: Any) -> Optional[int]:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _list(value: Any) -> List[Any]:
    return value if isinstance(value, list) else []
