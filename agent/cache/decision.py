"""Whether an entry may be served from its sealed copy at start: pure.

A copy stands in for the vault only while the vault cannot answer: the
identity endpoint or the vault unreachable (refused, timed out, DNS), 5xx or
429 past the retry budget, a list that never ends. An answer is never
hidden behind an old copy: a 403 (forbidden, disabled, firewall), a 404, a
401 or any other refusal, the identity endpoint's 4xx (a 400 "Identity not
found": the identity was taken from this machine), a fetched secret its
transform cannot use, a file that cannot be written. And the copy itself
must be this entry's, readable (decrypted: this machine's key, not
expired, not damaged) and younger than ``max_age``.

The daemon asks once per entry not ready ``after`` into the start; each
answer carries one line naming the entry and the reason, for the journal.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

from agent.base.errors import (
    CacheError,
    EndlessListError,
    IdentityRefusedError,
    IdentityUnavailableError,
    KvAgentError,
    SetKeptError,
    VaultThrottledError,
    VaultUnavailableError,
)
from agent.cache.copy import Copy
from agent.pipeline.expiry import moment

# Failures that mean "no answer": what a copy may stand in for.
UNAVAILABLE = (IdentityUnavailableError, VaultUnavailableError, VaultThrottledError,
               EndlessListError)
# Answers among them: the identity endpoint refused (4xx), which no copy may hide.
ANSWERS = (IdentityRefusedError,)
# A copy dated further ahead than this was written under another clock: refused, since
# a clock set back would make any copy look young.
MAX_CLOCK_SKEW_S = 300.0


@dataclass(frozen=True)
class Decision:
    """``serve`` the ``copy`` (set only then) or not; ``reason`` is one line
    naming the entry, for the journal and ``doctor``."""

    serve: bool
    reason: str
    copy: Optional[Copy] = None


def is_unavailable(error: KvAgentError) -> bool:
    """True when ``error`` means the identity endpoint or the vault gave no
    answer; a set kept for another member's failure is judged by that cause."""
    error = _root(error)
    return isinstance(error, UNAVAILABLE) and not isinstance(error, ANSWERS)


def _root(error: KvAgentError) -> KvAgentError:
    """The failure itself: a set kept for another member's is that member's."""
    while isinstance(error, SetKeptError):
        error = error.cause
    return error


def decide(key: str, cause: Optional[KvAgentError], copy: Union[Copy, CacheError, None],
           max_age_s: float, now: float) -> Decision:
    """Serve entry ``key`` from ``copy`` or not.

    ``cause`` is why the entry is not ready (None: it is); ``copy`` what the
    store gave back for it: the copy, the CacheError (SealError included)
    that kept it from being read, or None when there is none. ``now`` is
    epoch seconds.
    """
    if cause is None:
        return Decision(False, f"{key}: fetched; the sealed copy is not needed")
    if not is_unavailable(cause):
        who = "the identity endpoint" if isinstance(_root(cause), IdentityRefusedError) \
            else "the vault"
        return Decision(False, f"{key}: not served from the sealed cache: {who} answered "
                               f"({cause.message}); an answer is not an outage")
    if copy is None:
        return Decision(False, f"{key}: no sealed copy to serve")
    if isinstance(copy, CacheError):
        return Decision(False, f"{key}: sealed copy skipped: {copy.message}")
    if copy.key != key:
        return Decision(False, f"{key}: sealed copy skipped: it is another entry's")
    age = now - copy.fetched_at
    if age < -MAX_CLOCK_SKEW_S:
        return Decision(False, f"{key}: sealed copy skipped: fetched {describe_age(-age)} in "
                               "the future (is the clock right?)")
    if age > max_age_s:
        return Decision(False, f"{key}: sealed copy skipped: fetched {describe_age(age)} ago, "
                               f"older than max_age {describe_age(max_age_s)}")
    return Decision(True, f"{key}: served from the sealed copy of {moment(copy.fetched_at)} "
                          f"({describe_age(max(age, 0.0))} old): the vault is unreachable",
                    copy)


def decide_whole(label: str, members: Sequence[Decision]) -> Decision:
    """Serve a unit written in one piece (a set: one swap of its directory;
    a ``select:`` entry: its expansion whole) only when every member may be
    served; else none of it, with the first member's reason. ``label``
    names the unit; the members' decisions carry their copies."""
    refused = [decision for decision in members if not decision.serve]
    if not members or refused:
        why = refused[0].reason if refused else "no member"
        return Decision(False, f"{label}: not served from the sealed cache, none of it (it "
                               f"is written whole or not at all): {why}")
    return Decision(True, f"{label}: served whole from the sealed copies")


def describe_age(seconds: float) -> str:
    """``3d4h``, ``5h12m``, ``7m30s``, ``42s``: two units at most."""
    whole = int(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    for big, big_unit, small, small_unit in ((days, "d", hours, "h"), (hours, "h", minutes, "m"),
                                             (minutes, "m", secs, "s")):
        if big:
            return f"{big}{big_unit}{f'{small}{small_unit}' if small else ''}"
    return f"{secs}s"
