"""Expiry awareness as pure decisions of (validity, clock): :mod:`agent.expiry`."""

from __future__ import annotations

from agent.expiry import (
    EXPIRED,
    EXPIRING,
    NOT_YET_VALID,
    REPEAT_EXPIRING_S,
    ExpiryWarnings,
    Validity,
    combine,
    describe,
    judge,
    short,
)

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
    """Log lines and STATUS= words name the secret, the UTC date and what to do."""
    expired = Validity(None, 1_793_491_200)  # 2026-11-01
    assert short("web-tls", EXPIRED, expired) == "web-tls (expired 2026-11-01)"
    assert short("x", EXPIRING, expired) == "x (expires 2026-11-01)"
    assert short("x", NOT_YET_VALID, Validity(1_793_491_200, None)) == "x (valid from 2026-11-01)"
    line = describe("web-tls", EXPIRED, expired, 1_793_491_200 + DAY)
    assert "'web-tls' expired at 2026-11-01T00:00:00Z" in line and "still written" in line
    assert "in 2.0 days" in describe("x", EXPIRING, expired, 1_793_491_200 - 2 * DAY)
