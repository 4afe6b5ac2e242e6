"""The daemon's state as one :class:`~agent.status.snapshot.StatusSnapshot`:
what status.json holds, STATUS= sends and ``kv-agent status`` shows.

One pure function of the daemon's parts, read at one wall time ``wall`` and
one monotonic ``now`` (the next refresh, a monotonic deadline, is shown as a
wall time). The daemon calls it after every change; it only reads.
"""

from __future__ import annotations

import os
from typing import Optional

from agent import __version__
from agent.daemon.cache import SealedCache
from agent.daemon.entries import EntryTable
from agent.daemon.lifecycle import Lifecycle
from agent.daemon.reconcile import Reconciler
from agent.daemon.refresh import RefreshStats, RefreshThread
from agent.daemon.watch import ManifestFile
from agent.status.line import with_status_line
from agent.status.snapshot import StatusSnapshot, iso_time
from agent.sync.sync import Sync


def daemon_snapshot(file: ManifestFile, sync: Optional[Sync], life: Lifecycle,
                    entries: EntryTable, reconcile: Reconciler, stats: RefreshStats,
                    worker: RefreshThread, cache: SealedCache, *, wall: float,
                    now: float) -> StatusSnapshot:
    """The status as it stands, with its line (:mod:`agent.status.line`).
    ``sync`` is the manifest in use's (None before the first); each entry
    the sealed cache serves is marked with its copy's fetch time."""
    manifest, ledger = sync.manifest if sync is not None else None, reconcile.ledger
    return with_status_line(StatusSnapshot(
        pid=os.getpid(), phase=life.phase, saved_at=iso_time(wall), status="",
        manifest=os.path.abspath(file.path),
        entries=entries.statuses(wall, life.is_ready, ledger.inode, cache.served),
        written=ledger.records(), sets=ledger.sets(), manifest_error=file.error,
        directory=manifest.directory if manifest else None, error=stats.error,
        last_refresh=iso_time(stats.last_success_s),
        next_refresh=_wall_time(life.next_refresh, wall, now),
        refresh_interval_s=manifest.refresh_interval_s if manifest else None,
        identity_source=sync.tokens.source.describe() if sync else None,
        waiting=worker.waiting, is_refreshing=worker.is_running,
        is_ready=life.is_ready, foreign=reconcile.foreign, cache=cache.serving,
        agent_version=__version__))


def _wall_time(deadline: Optional[float], wall: float, now: float) -> Optional[str]:
    """A monotonic ``deadline`` (None: none) as status.json's wall time."""
    return iso_time(None if deadline is None else wall + deadline - now)
