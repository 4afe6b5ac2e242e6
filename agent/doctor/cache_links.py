"""Link 7 of the chain, for a manifest with ``cache:`` (issue 20): the sealed
cache's directory, its copies, and whether the running agent serves from it.

Three checks, none of which reads a copy (doctor decrypts nothing and never
shows a value):

* ``directory``: judged as the agent's store judges it before each save
  (:meth:`agent.cache.store.CacheStore.inspect`: root's, 0700, no directory
  above it replaceable by another user); not created yet is a warning, since
  the agent creates it at its first good refresh;
* ``copies``: how many entries have a copy (a copy's file is named by its
  entry's key, so this needs no decryption), when the oldest was last sealed,
  and which entries have none (they cannot be served at a boot without the
  vault);
* ``in use``: from status.json, whether the running agent serves entries from
  their copies now, which ones and why (the vault or the identity endpoint
  unreachable: the serving line the agent sends as STATUS=).
"""

from __future__ import annotations

import os
import time
from typing import Dict, List, Mapping, Optional

from agent.base.errors import CacheError, PermissionDeniedError
from agent.base.untrusted import escape
from agent.cache.copy import expansion_key
from agent.cache.decision import describe_age
from agent.cache.policy import CachePolicy
from agent.cache.seal import Sealer
from agent.cache.store import CacheStore, file_name
from agent.doctor.report import FAIL, OK, WARN, Check
from agent.manifest import Manifest
from agent.pipeline.expiry import moment
from agent.status.render import is_running
from agent.status.snapshot import STOPPED, StatusSnapshot, parse_snapshot
from agent.status.store import StateStore, state_dir

NAMED = 3  # entries named in a detail; the rest are counted


def check_cache(manifest: Manifest, environ: Mapping[str, str],
                now: Optional[float] = None) -> List[Check]:
    """The cache's checks for ``manifest`` (none without ``cache:``), copies
    aged at ``now`` (unix s; None: the clock)."""
    policy = manifest.cache
    if policy is None:
        return []
    now = time.time() if now is None else now
    subject = f"cache {policy.directory}"
    if os.path.isdir(policy.directory) and not os.access(policy.directory, os.R_OK | os.X_OK):
        return [Check(subject, "directory", WARN, "not readable by this user (it is root's)",
                      "run as root: sudo kv-agent doctor"), _in_use(subject, environ)]
    try:
        found = CacheStore(policy.directory, Sealer()).inspect()
    except CacheError as exc:
        return [Check(subject, "directory", FAIL, exc.message, exc.hint),
                _in_use(subject, environ)]
    if found is None:
        return [Check(subject, "directory", WARN, "not created yet: the agent creates it "
                      "(root's, 0700) and seals a copy after each good refresh",
                      "start kv-agent with the vault reachable once, so there is a copy to "
                      "serve at a boot without it"),
                _in_use(subject, environ)]
    return [Check(subject, "directory", OK, "root's, 0700, safe from other users"),
            _copies(subject, manifest, policy, found, now), _in_use(subject, environ)]


def _copies(subject: str, manifest: Manifest, policy: CachePolicy,
            found: Dict[str, float], now: float) -> Check:
    """How many entries have a copy (a ``select:`` entry: its sealed
    listing), the oldest's sealing time (past ``max_age``: expired, never
    served), and the entries without one."""
    keys = [entry.key for entry in manifest.secrets]
    sealed = {key: found[file_name(key)] for key in keys if file_name(key) in found}
    listings = {selection.label: found[file_name(expansion_key(selection.directory))]
                for selection in manifest.selections
                if file_name(expansion_key(selection.directory)) in found}
    lacking = [entry.name for entry in manifest.secrets if entry.key not in sealed] + \
        [selection.label for selection in manifest.selections
         if selection.label not in listings]
    count = f"{len(sealed)} of {len(keys)} entries have a sealed copy"
    if manifest.selections:
        count += f", {len(listings)} of {len(manifest.selections)} select: entries a sealed listing"
    count += _others(len(found) - len(sealed) - len(listings), bool(manifest.selections))
    if not sealed and not listings:
        return Check(subject, "copies", WARN, count, "the agent seals a copy after each good "
                     "refresh: start it with the vault reachable")
    oldest = min([*sealed.values(), *listings.values()])
    age = max(0.0, now - oldest)
    count += f", the oldest sealed {moment(oldest)} ({describe_age(age)} ago)"
    if age > policy.max_age_s:
        return Check(subject, "copies", WARN, f"{count}: older than max_age "
                     f"{describe_age(policy.max_age_s)}, never served",
                     "let the agent refresh (it seals each copy again after a good refresh)")
    if lacking:
        return Check(subject, "copies", WARN, f"{count}; none yet for {_names(lacking)}",
                     "those entries are served only by the vault until a good refresh of "
                     "each seals it")
    return Check(subject, "copies", OK, count)


def _others(count: int, has_selections: bool) -> str:
    """The copies of no entry the manifest names. Without ``select:`` they
    are stale; with it, most are the copies of the secrets its listings
    chose (named only inside the sealed listing, which doctor never
    decrypts), so none is called stale."""
    if not count:
        return ""
    if not has_selections:
        return f" ({count} of entries no longer in the manifest: removed at the next start)"
    return (f" ({count} more: of the secrets the select: entries chose, or of entries no "
            "longer in the manifest, which the next start removes)")


def _in_use(subject: str, environ: Mapping[str, str]) -> Check:
    """Whether the agent serves from the cache now, which entries and why
    (its status.json); OK when it does not (or no agent ran here)."""
    store = StateStore(state_dir(environ))
    try:
        snapshot = parse_snapshot(store.load())
    except PermissionDeniedError as exc:
        return Check(subject, "in use", WARN, exc.message, "run as root: sudo kv-agent doctor")
    if snapshot is None:
        return Check(subject, "in use", OK, f"no status in {store.path}: no agent ran here")
    if snapshot.cache is None:
        return Check(subject, "in use", OK, "not in use: the agent's files come from the vault")
    served = [entry.name for entry in snapshot.entries if entry.from_cache is not None]
    detail = f"{escape(snapshot.cache)}; served from it: {_names(served) or '?'}"
    if not _is_running(snapshot):
        return Check(subject, "in use", WARN, f"the last run (no agent runs now): {detail}")
    return Check(subject, "in use", WARN, detail,
                 "make the identity endpoint and the vault reachable (the checks above say "
                 "which is not); the first good refresh replaces every served file")


def _is_running(snapshot: StatusSnapshot) -> bool:
    return snapshot.phase != STOPPED and is_running(snapshot.pid)


def _names(names: List[str]) -> str:
    shown = ", ".join(escape(name, 200) for name in names[:NAMED])
    more = len(names) - NAMED
    return f"{shown} and {more} more" if more > 0 else shown
