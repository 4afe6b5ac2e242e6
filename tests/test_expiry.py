"""Expiry awareness as pure decisions of (validity, clock): :mod:`agent.pipeline.expiry`."""

from __future__ import annotations

import pytest

from agent.pipeline.expiry import (
    EXPIRED,
    EXPIRING,
    MAX_EPOCH_S,
    NOT_YET_VALID,
    REPEAT_EXPIRING_S,
    ExpiryWarnings,
    Validity,
    combine,
    describe,
    judge,
    moment,
    usable_epoch,
)
from agent.status.snapshot import iso_time

DAY = 86400
WINDOW = Validity(not_before=10 * DAY, expires=100 * DAY)


def test_judge_names_each_part_of_the_window() -> None:
    """Before nbf: not yet valid; within warn_before of exp: expiring; at or after exp:
    expired; otherwise (or with nothing known) nothing to say."""
    assert judge(WINDOW, 5 * DAY, 14 * DAY) == NOT_YET_VALID
    assert judge(WINDOW, 50 * DAY, 14 * DAY) is None
    assert judge(WINDOW, 90 * DAY, 14 * DAY) == EXPIRING
    assert judge(WINDOW, 100 * DAY, 14 * DAY) == EXPIRED
    assert judge(Validity(), 1e12, 14 * DAY) is None


def test_the_narrowest_window_counts() -> None:
    """A certificate's leaf notAfter earlier than the secret's exp is what expires."""
    assert combine([Validity(10, 1000), Validity(20, 500), Validity(None, None)]) == \
        Validity(20, 500)
    assert combine([]) == Validity()


def test_expired_is_warned_once_expiring_once_a_day() -> None:
    """An expired entry is warned about once (again only for a new window); an
    expiring one at most once a day; a fine one forgets its warnings."""
    warnings = ExpiryWarnings()
    assert warnings.is_due("a", EXPIRED, WINDOW, 0)
    assert not warnings.is_due("a", EXPIRED, WINDOW, 10 * DAY)
    assert warnings.is_due("a", EXPIRED, WINDOW._replace(expires=101 * DAY), 10 * DAY)
    assert warnings.is_due("b", EXPIRING, WINDOW, 0)
    assert not warnings.is_due("b", EXPIRING, WINDOW, REPEAT_EXPIRING_S - 1)
    assert warnings.is_due("b", EXPIRING, WINDOW, REPEAT_EXPIRING_S)
    assert not warnings.is_due("b", None, WINDOW, REPEAT_EXPIRING_S + 1)
    assert warnings.is_due("b", EXPIRING, WINDOW, REPEAT_EXPIRING_S + 2)
    warnings.keep_only(["b"])
    assert warnings.is_due("a", EXPIRED, WINDOW, 20 * DAY)


def test_words_name_the_entry_the_date_and_the_fix() -> None:
    """Log lines name the secret, the UTC date and what to do (STATUS= words: the
    status line's, tests/test_status_line.py)."""
    expired = Validity(None, 1_793_491_200)  # 2026-11-01
    line = describe("web-tls", EXPIRED, expired, 1_793_491_200 + DAY)
    assert "'web-tls' expired at 2026-11-01T00:00:00Z" in line and "still written" in line
    assert "in 2.0 days" in describe("x", EXPIRING, expired, 1_793_491_200 - 2 * DAY)


@pytest.mark.parametrize("value, usable", [
    (0, 0), (1_700_000_000, 1_700_000_000), (MAX_EPOCH_S, MAX_EPOCH_S),
    (MAX_EPOCH_S + 1, None), (2**62, None), (2**63 - 1, None), (-1, None), (True, None),
    (1.5, None), ("1700000000", None), (None, None),
])
def test_a_usable_epoch_is_an_integer_from_1970_to_the_year_9999(value: object,
                                                                  usable: object) -> None:
    """Integers from 0 to 9999-12-31T23:59:59Z are dates; anything else is no date."""
    assert usable_epoch(value) == usable


def test_dates_are_shown_whatever_the_number() -> None:
    """moment and status.json's iso_time never raise: a time beyond 9999 (2^62 made
    every status.json write fail) or before 1970 is clamped to the range (STATUS= shows
    the day of that time: tests/test_status_line.py)."""
    assert moment(MAX_EPOCH_S) == "9999-12-31T23:59:59Z" == iso_time(2**62)
    assert moment(float("inf")) == "9999-12-31T23:59:59Z"
    assert moment(-2**62) == "1970-01-01T00:00:00Z" == moment(float("nan"))
    assert describe("far", EXPIRED, Validity(None, 2**62), 0.0).startswith(
        "secret 'far' expired at 9999-12-31T23:59:59Z")
