"""The status line (STATUS=, status.json's ``status``): a pure function of the snapshot."""

from __future__ import annotations

import calendar
import time
from typing import Any

import pytest

from agent.pipeline.expiry import EXPIRED, EXPIRING, NOT_YET_VALID, Validity
from agent.status.line import clock, serving_part, status_line, with_status_line
from agent.status.snapshot import READY, STARTING, EntryStatus, StatusSnapshot, iso_time


def snapshot(*entries: EntryStatus, **fields: Any) -> StatusSnapshot:
    return StatusSnapshot(pid=1, phase=fields.pop("phase", READY), saved_at=None, status="",
                          manifest="/etc/kv-agent/manifest.yaml", entries=entries, **fields)


def ok(name: str, **fields: Any) -> EntryStatus:
    return EntryStatus(name, (f"/run/secrets/{name}",), **fields)


def failing(name: str, cause: str = "404 not found") -> EntryStatus:
    return ok(name, error=f"secret '{name}': {cause}", cause=cause)


DONE = "2026-11-24T14:02:11Z"  # a refresh has ended


def local(iso: str) -> str:
    """The local time of day of a UTC status time."""
    epoch_s = calendar.timegm(time.strptime(iso, "%Y-%m-%dT%H:%M:%SZ"))
    return time.strftime("%H:%M:%S", time.localtime(epoch_s))


def test_starting_says_what_it_fetches_or_what_it_waits_for() -> None:
    """Before READY: "starting: fetching N secrets" until a refresh ends, what a retried
    refresh waits for, or the error of a refresh that failed as a whole."""
    starting = snapshot(ok("a"), ok("b"), ok("c"), phase=STARTING)
    assert status_line(starting) == "starting: fetching 3 secrets"
    assert status_line(snapshot(ok("a"), phase=STARTING)) == "starting: fetching 1 secret"
    waiting = "waiting for IMDS: connection refused (attempt 4)"
    assert status_line(starting._replace(waiting=waiting)) == waiting
    assert status_line(starting._replace(error="IMDS unavailable")) == \
        "waiting: IMDS unavailable"
    assert status_line(starting._replace(error="IMDS unavailable", waiting=waiting)) == waiting
    assert status_line(snapshot(failing("a"), ok("b"), phase=STARTING, last_refresh=DONE)) \
        .startswith("1 of 2 secrets failing: a (404 not found); last refresh ")


def test_a_ready_agent_says_current_failing_or_refresh_failing() -> None:
    """Once ready: "N secrets current", the failing entries (three named, the rest
    counted) with their causes, or a whole refresh's failure with the files kept."""
    assert status_line(snapshot(ok("a"), is_ready=True)) == "1 secret current"
    assert status_line(snapshot(ok("a"), ok("b"), is_ready=True)) == "2 secrets current"
    five = snapshot(failing("a"), failing("b", "403 forbidden"), failing("c"), failing("d"),
                    failing("e"), ok("f"), is_ready=True)
    assert status_line(five) == ("5 of 6 secrets failing: a (404 not found), "
                                 "b (403 forbidden), c (404 not found) and 2 more")
    assert status_line(five._replace(error="IMDS unavailable")) == \
        "refresh failing, files kept: IMDS unavailable"


def test_pending_entries_and_the_refresh_they_wait_for() -> None:
    """Entries a reload added and no refresh wrote yet are named "not written yet" (and
    replace "current"); a ready agent's running refresh says what it retries."""
    added = snapshot(ok("kept"), ok("added", is_pending=True), is_ready=True,
                     waiting="waiting for IMDS: timed out (attempt 2)", is_refreshing=True)
    assert status_line(added) == ("1 of 2 not written yet: added; "
                                  "refresh waiting for IMDS: timed out (attempt 2)")
    assert status_line(added._replace(entries=(failing("kept"), ok("added", is_pending=True)),
                                      waiting=None)) == \
        "1 of 2 secrets failing: kept (404 not found); 1 of 2 not written yet: added"


def test_expiry_foreign_files_times_and_a_rejected_edit_follow_in_order() -> None:
    """After the state: expired, not yet valid and expiring entries with their dates;
    the first foreign file in a set's directory, escaped (a name cannot add a field),
    with a count of the rest; the last and next refresh in local time; a rejected edit."""
    entries = (ok("soon", expires="2026-12-01T00:00:00Z", expiry="expiring"),
               ok("old", expires="2026-11-01T10:00:00Z", expiry="expired"),
               ok("later", not_before="2027-01-01T00:00:00Z", expiry="not yet valid"))
    line = status_line(snapshot(
        *entries, is_ready=True, foreign=("/run/secrets/db/notes\nREADY=1", "/x"),
        last_refresh=DONE, next_refresh="2026-11-24T14:17:03Z",
        manifest_error="refresh_jiter: unknown key"))
    assert line.split("; ") == [
        "3 secrets current", "1 expired: old (expired 2026-11-01)",
        "1 not yet valid: later (valid from 2027-01-01)",
        "1 expiring: soon (expires 2026-12-01)",
        "kept /run/secrets/db/notes\\x0aREADY=1 and 1 more in a set's directory: "
        "not kv-agent's, move it elsewhere",
        f"last refresh {local(DONE)}", f"next {local('2026-11-24T14:17:03Z')}",
        "manifest edit rejected (see log), previous manifest in use"]


def test_expiry_words_name_the_entry_and_the_utc_day() -> None:
    """STATUS= words name the secret and the UTC day (from agent.pipeline.expiry's
    judgement and status.json's times); a date beyond 9999 shows as its last day."""
    def words(expiry: str, validity: Validity) -> str:
        entry = ok("x", not_before=iso_time(validity.not_before),
                   expires=iso_time(validity.expires), expiry=expiry)
        return status_line(snapshot(entry, is_ready=True)).split("; ")[1]

    expired = Validity(None, 1_793_491_200)  # 2026-11-01
    assert words(EXPIRED, expired) == "1 expired: x (expired 2026-11-01)"
    assert words(EXPIRING, expired) == "1 expiring: x (expires 2026-11-01)"
    assert words(NOT_YET_VALID, Validity(1_793_491_200, None)) == \
        "1 not yet valid: x (valid from 2026-11-01)"
    assert words(NOT_YET_VALID, Validity(2**62, None)) == \
        "1 not yet valid: x (valid from 9999-12-31)"
    assert words(EXPIRED, Validity(None, float("inf"))) == "1 expired: x (expired 9999-12-31)"


@pytest.mark.parametrize("epoch_s", [0.0, 1_764_000_000.0, 1_764_000_000.999])
def test_clock_is_the_local_time_of_a_status_time(epoch_s: float) -> None:
    """clock() shows a status.json time (UTC, whole seconds) as the local time of day, as
    time.localtime shows the epoch seconds it came from; anything else as it is."""
    iso = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch_s))
    assert clock(iso) == time.strftime("%H:%M:%S", time.localtime(epoch_s))
    assert clock("soon") == "soon"


def test_the_snapshot_carries_its_own_line() -> None:
    """with_status_line() puts the line in the snapshot's status: STATUS=, status.json
    and `kv-agent status` show that one value."""
    value = with_status_line(snapshot(ok("a"), is_ready=True)._replace(status="stale"))
    assert value.status == "1 secret current"
    assert value.as_json()["status"] == "1 secret current"


def test_credentials_in_memory_are_counted_only_when_there_are_any() -> None:
    """A manifest with systemd credentials says how many are in memory (``1 of 3`` while some
    are not); one without says nothing of them."""
    served = ok("db", credentials=("credential:app.service/db",), is_loaded=True)
    tls = EntryStatus("tls", (), credentials=("credential:nginx.service/tls.key",
                                              "credential:nginx.service/tls.crt"))
    assert status_line(snapshot(served, ok("a"), is_ready=True)) == "2 secrets current; 1 credential in memory"
    assert status_line(snapshot(served, tls, is_ready=True)) == \
        "2 secrets current; 1 of 3 credentials in memory"
    assert status_line(snapshot(served, tls._replace(is_loaded=True), is_ready=True)) == \
        "2 secrets current; 3 credentials in memory"
    assert "credential" not in status_line(snapshot(ok("a"), ok("b")))


def test_while_the_cache_serves_the_outage_is_said_once() -> None:
    """The serving part ends with why the vault cannot be reached; the same whole
    failure is not repeated after it (only its fix), and a different one is said."""
    why = "IMDS unreachable at http://169.254.169.254 after 9 attempts"
    cache = serving_part(1, 1, "2026-12-06T10:00:00Z", why)  # as the daemon's cache builds it
    assert cache == f"serving 1 of 1 from the sealed cache of 2026-12-06T10:00:00Z: {why}"
    line = status_line(snapshot(ok("db"), is_ready=True, cache=cache,
                                error=f"{why}; check the VM's managed identity"))
    assert line.count(why) == 1, line
    assert line.startswith(cache + "; retrying: check the VM's managed identity"), line
    other = "vault unreachable: connection refused"
    line = status_line(snapshot(ok("db"), is_ready=True, cache=cache, error=other))
    assert f"refresh failing, files kept: {other}" in line, line
