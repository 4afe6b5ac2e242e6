"""``kv-agent status``: the daemon's status snapshot rendered for humans.

Pure: a :class:`~agent.status.snapshot.StatusSnapshot` in (parsed from status.json,
either version), lines and an exit code out (the CLI prints them). The
exit code makes the command a health check: 0 when the agent runs and every
non-optional secret is current, 1 when one is failing, not written yet (a
reload added it and its refresh has not ended) or the agent has not finished
starting (not READY yet), 69 when no agent is running. A refresh that is
retrying says what it waits for. A failing
optional secret is shown but fails nothing, as in the agent itself; nor does
an expired one (it is written, as Key Vault serves it), shown with its date.

When no agent runs, the document is the last run's: the first line says when
that run stopped (or last wrote its status, if it died) and every secret's
mark reads "was ok", never a current-looking "ok" (issue 9).
"""

from __future__ import annotations

import calendar
import os
import time
from typing import List, Optional, Tuple

from agent.base.errors import EXIT_FAILURE, EXIT_OK, EXIT_UNAVAILABLE
from agent.cache.decision import describe_age
from agent.pipeline.expiry import EXPIRED, EXPIRING, NOT_YET_VALID
from agent.status.snapshot import STARTING, STOPPED, EntryStatus, StatusSnapshot

# Entry lines are columns: "mark name -> paths" (and credentials), expiry, version and update.
MAX_HEAD_WIDTH = 60  # a longer head pushes its own line's columns, not everyone's
EXPIRY_WIDTH = len("expires 2026-11-01T00:00:00Z not yet valid")


def is_running(pid: Optional[int]) -> bool:
    """Whether a process with ``pid`` exists (it may belong to another user)."""
    if pid is None or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def render_status(snapshot: Optional[StatusSnapshot], path: str,
                  now: Optional[float] = None) -> Tuple[List[str], int]:
    """Lines describing the agent and each entry, and the exit code; a copy
    served from the sealed cache is aged at ``now`` (unix s; None: the clock)."""
    now = time.time() if now is None else now
    if snapshot is None:
        return [f"kv-agent is not running: no status in {path}"], EXIT_UNAVAILABLE
    running = snapshot.phase != STOPPED and is_running(snapshot.pid)
    required_failing = [e for e in snapshot.entries
                        if (e.error or e.is_pending) and not e.is_optional]
    if running:
        lines = [f"kv-agent is running (pid {snapshot.pid}, {snapshot.phase}): "
                 f"{snapshot.status}",
                 f"  manifest: {snapshot.manifest}",
                 f"  last refresh: {snapshot.last_refresh or 'never'}; "
                 f"next: {snapshot.next_refresh or '-'}"]
    else:
        lines = [_last_run_head(snapshot),
                 f"  last status: {snapshot.status}",
                 f"  manifest: {snapshot.manifest}",
                 f"  last refresh: {snapshot.last_refresh or 'never'}"]
    if snapshot.agent_version:  # the process's own, not the installed package's
        lines.append(f"  agent: kv-agent {snapshot.agent_version}")
    if snapshot.identity_source:
        lines.append(f"  identity: {snapshot.identity_source}")
    if snapshot.manifest_error:
        lines.append(f"  manifest edit rejected: {snapshot.manifest_error}")
    if snapshot.error:
        lines.append(f"  refresh error: {snapshot.error}")
    if running and snapshot.waiting:
        lines.append(f"  refresh waiting: {snapshot.waiting}")
    heads = [_entry_head(entry, running, now) for entry in snapshot.entries]
    width = min(max((len(head) for head in heads), default=0), MAX_HEAD_WIDTH)
    for entry, head in zip(snapshot.entries, heads):
        version = (entry.version or "-")[:12]
        lines.append(f"  {head:<{width}}  {_expiry_column(entry):<{EXPIRY_WIDTH}}  "
                     f"version {version}, updated {entry.updated or '-'}")
        if entry.error:
            lines.append(f"       since {entry.error_since}: {entry.error}")
        if entry.expiry is not None:
            lines.append(f"       {_expiry_line(entry)}")
    if not running:
        return lines, EXIT_UNAVAILABLE
    # Still starting: the required files may not exist yet, so not healthy.
    is_starting = snapshot.phase == STARTING
    return lines, (EXIT_FAILURE if required_failing or snapshot.error or is_starting
                   else EXIT_OK)


def _entry_head(entry: EntryStatus, running: bool, now: float) -> str:
    """``ok   name -> paths``: the mark ("was ok" when no agent runs) and the
    files, then the credentials (``credential:<units>/<ID>``) and whether
    they are in memory (never their value), then, while its sealed copy
    stands in for the vault, that copy's age."""
    mark = _mark(entry)
    if not running:
        mark = f"was {mark:4}"
    loaded = (" (loaded)" if entry.is_loaded else " (not loaded)") if entry.credentials else ""
    cached = f" ({_cached(entry.from_cache, now)})" if entry.from_cache is not None else ""
    return f"{mark:4} {entry.name} -> {', '.join(entry.targets) or '?'}{loaded}{cached}"


def _cached(fetched: str, now: float) -> str:
    """``from the sealed cache, 3h old``; the fetch time itself when it does
    not parse (a damaged file)."""
    try:
        fetched_s = calendar.timegm(time.strptime(fetched, "%Y-%m-%dT%H:%M:%SZ"))
    except ValueError:
        return f"from the sealed cache of {fetched}"
    return f"from the sealed cache, {describe_age(max(0.0, now - fetched_s))} old"


def _expiry_column(entry: EntryStatus) -> str:
    """The expiry column: the date when the secret has one, marked EXPIRED,
    expiring (within warn_before_expiry) or not yet valid; else "no expiry"."""
    mark = {EXPIRED: " EXPIRED", EXPIRING: " expiring",
            NOT_YET_VALID: " not yet valid"}.get(entry.expiry or "", "")
    if entry.expires:
        return f"expires {entry.expires}{mark}"
    return mark.strip() or "no expiry"


def _expiry_line(entry: EntryStatus) -> str:
    """What an expired, expiring or not yet valid entry's operator should know."""
    if entry.expiry == EXPIRED:
        return (f"EXPIRED at {entry.expires}: still written (Key Vault serves it); "
                "rotate it in Key Vault")
    if entry.expiry == NOT_YET_VALID:
        return f"not valid before {entry.not_before}: written anyway (Key Vault serves it)"
    return f"expires soon, at {entry.expires}: rotate it in Key Vault before then"


def _mark(entry: EntryStatus) -> str:
    if entry.is_pending and not entry.error:
        return "wait"
    if not entry.error:
        return "ok"
    return "warn" if entry.is_optional else "FAIL"


def _last_run_head(snapshot: StatusSnapshot) -> str:
    """The first line when no agent runs: whose lines these are, and from when."""
    when = snapshot.saved_at or "an unknown time"
    run = f"the last run (pid {snapshot.pid})"
    if snapshot.phase == STOPPED:
        ended = f"{run} stopped at {when}"
    else:
        ended = (f"{run} ended without stopping cleanly; its last status was written "
                 f"at {when}")
    return f"kv-agent is not running; {ended}; the lines below are from then"
