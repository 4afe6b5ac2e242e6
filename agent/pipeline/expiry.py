"""Expiry awareness: when what the agent wrote stops (or starts) being valid, and when to say so.

Key Vault serves a secret outside its ``nbf``/``exp`` window, and so does the
agent: refusing an expired certificate would take the services that use it
down, while a warning lets an operator rotate it. So nothing here decides
whether to write; it decides what to *say*:

* :class:`Validity` is an entry's window: the latest ``nbf`` and the earliest
  ``exp`` of its sources and, for a certificate, the leaf's notBefore and
  notAfter (the earlier end counts: a certificate past its notAfter is
  refused by every TLS client whatever the secret's ``exp`` says).
* :func:`judge` says whether a window is expired, expiring (within
  ``warn_before_expiry``), not yet valid, or fine, at a given time.
* :class:`ExpiryWarnings` remembers which warnings were given: an expired or
  not-yet-valid entry is logged once (per window: a rotation to a new window
  that is expired again is said again), an expiring one at most once a day.

Dates come from the vault (``nbf``, ``exp``) and from certificates, so they
are bounded where they are parsed (:func:`usable_epoch`): a date before 1970
or after the year 9999 is "no date" (``time.gmtime`` and the status file
cannot show it: ``nbf`` near 2^62 once stopped the agent at its first
refresh). :func:`moment` is total all the same.

Pure: times are epoch seconds given by the caller (the daemon's wall clock,
or a test's); nothing here reads a clock or logs.
"""

from __future__ import annotations

import time
from typing import Dict, Iterable, NamedTuple, Optional, Tuple

EXPIRED = "expired"
EXPIRING = "expiring"
NOT_YET_VALID = "not yet valid"
REPEAT_EXPIRING_S = 86400.0  # an expiring entry is warned about at most once a day
MAX_EPOCH_S = 253402300799  # 9999-12-31T23:59:59Z, the last second ISO 8601 can write


def usable_epoch(value: object) -> Optional[int]:
    """``value`` as epoch seconds when it is an integer from 1970 to the end
    of the year 9999, else None ("no date"). A bool is not a time."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_EPOCH_S:
        return value
    return None


class Validity(NamedTuple):
    """An entry's validity window in epoch seconds; None: no bound known."""

    not_before: Optional[int] = None
    expires: Optional[int] = None


def combine(windows: Iterable[Validity]) -> Validity:
    """The window in which every one of ``windows`` is valid: the latest
    start and the earliest end (a template is as valid as its least valid value)."""
    listed = list(windows)
    starts = [w.not_before for w in listed if w.not_before is not None]
    ends = [w.expires for w in listed if w.expires is not None]
    return Validity(max(starts) if starts else None, min(ends) if ends else None)


def judge(validity: Validity, now: float, warn_before_s: float) -> Optional[str]:
    """EXPIRED, NOT_YET_VALID, EXPIRING (expires within ``warn_before_s``) or
    None (valid, or nothing known), at epoch second ``now``."""
    if validity.expires is not None and now >= validity.expires:
        return EXPIRED
    if validity.not_before is not None and now < validity.not_before:
        return NOT_YET_VALID
    if validity.expires is not None and now >= validity.expires - warn_before_s:
        return EXPIRING
    return None


def moment(epoch_s: float) -> str:
    """UTC ISO 8601 with seconds (what logs and status.json show). Total: a
    time outside 1970..9999 (which parsing never lets through) is clamped to
    that range rather than raising."""
    finite = epoch_s if epoch_s == epoch_s else 0  # NaN is not equal to itself
    clamped = int(min(max(finite, 0), MAX_EPOCH_S))
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(clamped))


def describe(name: str, kind: str, validity: Validity, now: float) -> str:
    """One log line for an operator: the entry, what is wrong, since or until
    when, and what to do. ``kind`` is what :func:`judge` returned."""
    if kind == EXPIRED and validity.expires is not None:
        return (f"secret '{name}' expired at {moment(validity.expires)}; it is still written "
                "(Key Vault serves it), but clients may refuse it: rotate it in Key Vault")
    if kind == NOT_YET_VALID and validity.not_before is not None:
        return (f"secret '{name}' is not valid before {moment(validity.not_before)}; it is "
                "written anyway (Key Vault serves it): check the version's activation date")
    assert validity.expires is not None
    days = max(0.0, (validity.expires - now) / 86400.0)
    return (f"secret '{name}' expires at {moment(validity.expires)} (in {days:.1f} days): "
            "rotate it in Key Vault before then")


class ExpiryWarnings:
    """Which expiry warnings were given, per entry key, so each is given once
    (EXPIRED, NOT_YET_VALID: once per window) or daily (EXPIRING)."""

    def __init__(self) -> None:
        self._given: Dict[str, Tuple[str, Validity, float]] = {}

    def is_due(self, key: str, kind: Optional[str], validity: Validity, now: float) -> bool:
        """Whether to warn now about entry ``key`` judged ``kind``; records it
        when so. A fine entry (None) forgets its past warnings."""
        if kind is None:
            self._given.pop(key, None)
            return False
        last = self._given.get(key)
        if last is not None and last[:2] == (kind, validity):
            if kind != EXPIRING or now - last[2] < REPEAT_EXPIRING_S:
                return False
        self._given[key] = (kind, validity, now)
        return True

    def keep_only(self, keys: Iterable[str]) -> None:
        """Forget entries that left the manifest."""
        kept = set(keys)
        self._given = {key: given for key, given in self._given.items() if key in kept}
