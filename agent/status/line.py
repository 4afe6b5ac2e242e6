"""The status line: one line an operator can act on, a pure function of the snapshot.

The daemon builds a :class:`~agent.status.snapshot.StatusSnapshot`, puts
:func:`status_line` of it in its ``status`` field, saves that snapshot as
status.json and sends the same text as ``STATUS=``; ``kv-agent status`` shows
it from status.json. So STATUS=, status.json and ``kv-agent status`` derive from
one typed value, and every wording below is tested without a process
(tests/test_status_line.py).

The line is parts joined by ``"; "``, in this order:

0. while sealed copies stand in for the vault (``cache:``), ``serving N of M
   from the sealed cache of <time>: <why>``;
1. what the agent is doing or what is wrong, the first that applies: not
   ready yet and a refresh waiting (``waiting for IMDS: ... (attempt 4)``) or
   failed as a whole (``waiting: ...``); not ready and no refresh ended yet
   (``starting: fetching 3 secrets``); a ready agent whose refresh failed as a
   whole (``refresh failing, files kept: ...``); entries failing (the first
   three, with a short cause); else ``3 secrets current`` (unless entries are
   pending);
2. entries a reload added that no refresh has written yet (a ready agent's);
   then, for a manifest with systemd credentials, how many are in memory
   (``2 credentials in memory``, ``1 of 2 credentials in memory``);
3. what a ready agent's running refresh waits for;
4. expired, not yet valid and expiring entries, with their dates;
5. files in a set's directory that are not the agent's (escaped: a file name
   must not add a ``KEY=`` field to the notification);
6. the last good refresh and the next one, as local clock times;
7. a rejected manifest edit.
"""

from __future__ import annotations

import calendar
import time
from typing import Dict, List, Optional, Sequence

from agent.base.untrusted import escape
from agent.pipeline.expiry import EXPIRED, EXPIRING, NOT_YET_VALID
from agent.status.snapshot import EntryStatus, StatusSnapshot

NAMED = 3  # entries named in one part; the rest are counted ("and 2 more")
ISO_FORMAT = "%Y-%m-%dT%H:%M:%SZ"  # agent.pipeline.expiry.moment's


def status_line(snapshot: StatusSnapshot) -> str:
    """The status line of ``snapshot`` (its own ``status`` field is ignored)."""
    entries = snapshot.entries
    total = len(entries)
    failing = [entry for entry in entries if entry.error is not None]
    pending = [entry for entry in entries if entry.is_pending]  # only a ready agent's
    is_ready = snapshot.is_ready
    parts: List[str] = [snapshot.cache] if snapshot.cache else []
    if not is_ready and (snapshot.waiting or snapshot.error is not None):
        parts.append(snapshot.waiting or f"waiting: {snapshot.error}")
    elif not is_ready and snapshot.last_refresh is None:
        # No refresh ended yet: one that failed as a whole would have set
        # the error, one that did not the last refresh.
        parts.append(f"starting: fetching {_secrets(total)}")
    elif snapshot.error is not None:
        parts.append(_whole_failure(snapshot.error, snapshot.cache))
    elif failing:
        names = ", ".join(f"{entry.name} ({entry.cause})" for entry in failing[:NAMED])
        parts.append(f"{len(failing)} of {total} secrets failing: {names}{_more(failing)}")
    elif not pending:
        parts.append(f"{_secrets(total)} current")
    if pending:
        names = ", ".join(entry.name for entry in pending[:NAMED])
        parts.append(f"{len(pending)} of {total} not written yet: {names}{_more(pending)}")
    parts.extend(_credentials_part(entries))
    if is_ready and snapshot.waiting is not None:
        parts.append(f"refresh {snapshot.waiting}")
    parts.extend(_expiry_parts(entries))
    if snapshot.foreign:
        foreign = snapshot.foreign
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        parts.append(f"kept {escape(foreign[0])}{more} in a set's directory: "
                     "not kv-agent's, move it elsewhere")
    if snapshot.last_refresh is not None:
        parts.append(f"last refresh {clock(snapshot.last_refresh)}")
    if snapshot.next_refresh is not None:
        parts.append(f"next {clock(snapshot.next_refresh)}")
    if snapshot.manifest_error is not None:
        parts.append("manifest edit rejected (see log), previous manifest in use")
    return "; ".join(parts)


def with_status_line(snapshot: StatusSnapshot) -> StatusSnapshot:
    """``snapshot`` with its status line in ``status``: the value the daemon
    saves, sends and logs."""
    return snapshot._replace(status=status_line(snapshot))


def clock(iso: str) -> str:
    """The local time of day (``14:02:11``) of a status.json time (UTC ISO
    8601 with seconds); the text itself when it is not one."""
    try:
        epoch_s = calendar.timegm(time.strptime(iso, ISO_FORMAT))
    except ValueError:
        return iso
    return time.strftime("%H:%M:%S", time.localtime(epoch_s))


def _credentials_part(entries: Sequence[EntryStatus]) -> List[str]:
    """``2 credentials in memory`` (or ``1 of 2 ...``); nothing without credentials."""
    total = sum(len(entry.credentials) for entry in entries)
    loaded = sum(len(entry.credentials) for entry in entries if entry.is_loaded)
    if not total:
        return []
    noun = f"credential{'s' if total != 1 else ''} in memory"
    return [f"{total} {noun}" if loaded == total else f"{loaded} of {total} {noun}"]


def _expiry_parts(entries: Sequence[EntryStatus]) -> List[str]:
    """``1 expired: web-tls (expired 2026-11-01)`` and the like: expired,
    then not yet valid, then expiring."""
    found: Dict[str, List[str]] = {}
    for entry in entries:
        if entry.expiry is not None:
            found.setdefault(entry.expiry, []).append(_short(entry))
    parts = []
    for kind in (EXPIRED, NOT_YET_VALID, EXPIRING):
        names = found.get(kind, [])
        if names:
            parts.append(f"{len(names)} {kind}: {', '.join(names[:NAMED])}{_more(names)}")
    return parts


def _short(entry: EntryStatus) -> str:
    """``web-tls (expired 2026-11-01)``: the entry and the date that matters
    (the UTC day of its status.json time)."""
    if entry.expiry == NOT_YET_VALID and entry.not_before is not None:
        return f"{entry.name} (valid from {entry.not_before[:10]})"
    verb = "expired" if entry.expiry == EXPIRED else "expires"
    return f"{entry.name} ({verb} {(entry.expires or '?')[:10]})"


def serving_part(served: int, total: int, since: str, why: str) -> str:
    """Part 0: ``serving N of M from the sealed cache of <time>: <why>`` (the
    daemon's cache builds it; status.json keeps it as ``cache``)."""
    return f"serving {served} of {total} from the sealed cache of {since}{SERVING_WHY}{why}"


SERVING_WHY = ": "  # what separates the serving part from its why (no time has it)


def _whole_failure(error: str, cache: Optional[str]) -> str:
    """A ready agent's refresh failed as a whole. While sealed copies stand in,
    part 0 (:func:`serving_part`) ends with why, the same failure as it began:
    not said twice."""
    why = cache.partition(SERVING_WHY)[2] if cache else ""
    if why and error.startswith(why):
        rest = error[len(why):].lstrip("; ")
        return f"retrying: {rest}" if rest else "retrying"
    return f"refresh failing, files kept: {error}"


def _secrets(count: int) -> str:
    return f"{count} secret{'s' if count != 1 else ''}"


def _more(items: Sequence[object]) -> str:
    return f" and {len(items) - NAMED} more" if len(items) > NAMED else ""
