"""One sync of :class:`agent.sync.sync.Sync` against the in-process emulator:
the pipeline entries -> sources -> fetch -> transforms -> outputs -> writer."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

import pytest

from agent.base.errors import SecretNotFoundError, SetKeptError
from agent.emulator import Emulator
from agent.manifest import Accounts, Manifest, parse_manifest
from agent.pipeline.expiry import Validity
from agent.sync.freshness import Freshness
from agent.sync.sync import Interrupted, Sync, SyncReport, expiry_warnings, short_cause
from agent.writer import SET_GRACE_S

ACCOUNTS = Accounts(user=lambda name: {"root": 0}.get(name),
                    group=lambda name: {"root": 0}.get(name))


def environ(emulator: Emulator) -> Dict[str, str]:
    return {"KV_AGENT_IMDS_ENDPOINT": emulator.imds_endpoint,
            "REQUESTS_CA_BUNDLE": emulator.ca_path, "NO_PROXY": "127.0.0.1"}


def manifest(emulator: Emulator, directory: Path, entries: str) -> Manifest:
    text = f"vault: {emulator.vault_url}\ndirectory: {directory}\nsecrets:\n{entries}"
    return parse_manifest(text, "m.yaml", accounts=ACCOUNTS, check_filesystem=False)


def requests_for(emulator: Emulator, name: str) -> int:
    return sum(1 for record in emulator.vault_log if f"/secrets/{name}" in record.path)


def test_entries_naming_one_source_share_one_fetch(emulator: Emulator, shm_dir: Path) -> None:
    """Two entries of the same secret make one vault request and write both files."""
    emulator.set_secret("shared", "one value")
    agent = Sync(manifest(emulator, shm_dir, "  - {name: shared, path: a}\n"
                                              "  - {name: shared, path: b/c}\n"),
                  environ=environ(emulator))
    try:
        agent.prepare()
        report = agent.sync()  # the first request also meets the vault's challenge
        before = requests_for(emulator, "shared")
        agent.sync()
    finally:
        agent.close()
    assert requests_for(emulator, "shared") == before + 1
    assert (shm_dir / "a").read_text() == (shm_dir / "b" / "c").read_text() == "one value"
    assert [o.changed_paths for o in report.outcomes] == [(str(shm_dir / "a"),),
                                                          (str(shm_dir / "b" / "c"),)]
    assert report.changed == 2 and not report.failures


def test_unchanged_files_report_no_change(emulator: Emulator, shm_dir: Path) -> None:
    """A second sync of the same versions changes no file and reports none."""
    emulator.set_secret("steady", "same")
    agent = Sync(manifest(emulator, shm_dir, "  - {name: steady}\n"),
                  environ=environ(emulator))
    try:
        agent.prepare()
        first, second = agent.sync(), agent.sync()
    finally:
        agent.close()
    assert first.changed == 1 and second.changed == 0
    assert second.outcomes[0].version == first.outcomes[0].version


def test_a_rotation_in_the_second_of_the_fetch_is_picked_up_with_the_vm_clock_ahead(
        shm_dir: Path) -> None:
    """Issue 17 item 12: with the VM's clock 90 s ahead of the vault's, a version fetched
    in the very second of its write is not taken for settled: a second write in that same
    second (the same `updated`) is fetched at the next list-based refresh."""
    vault_now = float(int(time.time()) - 90)  # the vault's clock, 90 s behind, and frozen
    with Emulator({}, clock=lambda: vault_now) as skewed:
        skewed.set_secret("skew-a", "first a")
        skewed.set_secret("skew-b", "first b")
        agent = Sync(manifest(skewed, shm_dir, "  - {name: skew-a}\n  - {name: skew-b}\n"),
                      environ=environ(skewed))
        try:
            agent.prepare()
            first = agent.sync()
            skewed.set_secret("skew-a", "second a")  # the same second: the same `updated`
            skewed.reset_stats()
            second = agent.sync(freshness=first.freshness)
        finally:
            agent.close()
        listed = [record.path for record in skewed.vault_log if record.path == "/secrets"]
    assert listed, "the second refresh was meant to be list-based"
    assert (shm_dir / "skew-a").read_text() == "second a"
    assert not second.failures


def test_a_failing_entry_keeps_its_file_and_never_stops_the_others(
        emulator: Emulator, shm_dir: Path) -> None:
    """A missing secret fails only its entry; its old file stays, the others are written."""
    emulator.set_secret("present", "here")
    (shm_dir / "absent").write_text("last good")
    agent = Sync(manifest(emulator, shm_dir, "  - {name: absent-secret, path: absent}\n"
                                              "  - {name: present}\n"),
                  environ=environ(emulator))
    try:
        report = agent.sync()
    finally:
        agent.close()
    failed, written = report.outcomes
    assert isinstance(failed.error, SecretNotFoundError) and not failed.changed
    assert "absent-secret" in failed.describe() and "left as it was" in failed.describe()
    assert (shm_dir / "absent").read_text() == "last good"
    assert (shm_dir / "present").read_text() == "here" and written.changed
    assert report.failures == (failed,)


def test_stop_between_writes_abandons_the_rest(emulator: Emulator, shm_dir: Path) -> None:
    """should_stop turning true raises Interrupted before the next write."""
    emulator.set_secret("never-written", "x")
    agent = Sync(manifest(emulator, shm_dir, "  - {name: never-written}\n"),
                  environ=environ(emulator))
    try:
        with pytest.raises(Interrupted):
            agent.sync(should_stop=lambda: True)
    finally:
        agent.close()
    assert not (shm_dir / "never-written").exists()


def test_entries_are_written_while_later_secrets_are_still_being_fetched(
        emulator: Emulator, shm_dir: Path) -> None:
    """The first entries' files are on disk before the last secret's GET is answered:
    writes overlap the fetches instead of waiting for all of them (issue 17, item 20)."""
    names = [f"overlap-{n:02d}" for n in range(40)]
    for name in names:
        emulator.set_secret(name, f"value of {name}")
    agent = Sync(manifest(emulator, shm_dir, "".join(f"  - {{name: {n}}}\n" for n in names)),
                  environ=environ(emulator))
    fetch_secret = agent.vault.fetch_secret
    seen_first_file: List[bool] = []

    def watching_fetch(request: Any) -> Any:
        if request.name == names[-1]:  # the last GET waits until the first file is there
            deadline = time.monotonic() + 5.0
            while not (shm_dir / names[0]).exists() and time.monotonic() < deadline:
                time.sleep(0.01)
            seen_first_file.append((shm_dir / names[0]).exists())
        return fetch_secret(request)

    agent.vault.fetch_secret = watching_fetch  # type: ignore[method-assign]
    try:
        agent.prepare()
        report = agent.sync()
    finally:
        agent.close()
    assert seen_first_file == [True]
    assert report.changed == len(names) and not report.failures


def test_a_final_sync_builds_no_memory_for_a_next_refresh(
        emulator: Emulator, shm_dir: Path) -> None:
    """A sync with nothing after it (`kv-agent once`) writes the same files but leaves
    the freshness memory (an lstat per file to build) empty."""
    emulator.set_secret("final-one", "v1")
    agent = Sync(manifest(emulator, shm_dir, "  - {name: final-one}\n"),
                  environ=environ(emulator))
    try:
        final = agent.sync(is_final=True)
        again = agent.sync()
    finally:
        agent.close()
    assert final.changed == 1 and final.freshness == Freshness()
    assert again.freshness != Freshness()


SET_ENTRIES = ("  - {name: db-password, path: db/password, set: db}\n"
               "  - {name: db-user, path: db/user, set: db}\n")


def test_a_set_is_written_by_one_swap_and_unchanged_sets_are_left(
        emulator: Emulator, shm_dir: Path) -> None:
    """A set's members go to disk in one swap of its directory; a sync with nothing new
    leaves the directory's inode alone; a changed member swaps the directory again and
    only that member reports its file changed."""
    emulator.set_secret("db-password", "pw 1")
    emulator.set_secret("db-user", "user 1")
    agent = Sync(manifest(emulator, shm_dir, SET_ENTRIES), environ=environ(emulator))
    calls = []
    apply_set = agent.writer.apply_set

    def spy(directory: str, specs: Any, **keys: Any) -> Any:
        calls.append((directory, sorted(spec.path for spec in specs)))
        return apply_set(directory, specs, **keys)

    agent.writer.apply_set = spy  # type: ignore[method-assign]
    try:
        agent.prepare()
        first = agent.sync()
        inode = os.lstat(shm_dir / "db").st_ino
        second = agent.sync()
        assert os.lstat(shm_dir / "db").st_ino == inode
        emulator.set_secret("db-password", "pw 2")
        third = agent.sync()
    finally:
        agent.close()
    paths = [str(shm_dir / "db" / "password"), str(shm_dir / "db" / "user")]
    assert calls == [(str(shm_dir / "db"), paths)] * 3
    assert [o.changed_paths for o in first.outcomes] == [(paths[0],), (paths[1],)]
    assert first.swapped == ()  # a new set: no old generation
    assert second.changed == 0 and second.swapped == ()
    assert [o.changed_paths for o in third.outcomes] == [(paths[0],), ()]
    assert third.swapped == (str(shm_dir / "db"),)
    assert os.lstat(shm_dir / "db").st_ino != inode
    assert (shm_dir / "db" / "password").read_text() == "pw 2"


def test_a_failing_member_keeps_the_whole_set(emulator: Emulator, shm_dir: Path) -> None:
    """When one member of a set fails, no file of the set changes (not even the members
    that arrived) and every member reports the error, naming the failing secret."""
    emulator.set_secret("db-password", "pw 1")
    emulator.set_secret("db-user", "user 1")
    agent = Sync(manifest(emulator, shm_dir, SET_ENTRIES), environ=environ(emulator))
    try:
        agent.prepare()
        agent.sync()
        inode = os.lstat(shm_dir / "db").st_ino
        emulator.set_secret("db-password", "pw 2")
        emulator.delete_secret("db-user")
        report = agent.sync()
    finally:
        agent.close()
    assert (shm_dir / "db" / "password").read_text() == "pw 1"
    assert (shm_dir / "db" / "user").read_text() == "user 1"
    assert os.lstat(shm_dir / "db").st_ino == inode
    password, user = report.outcomes
    assert isinstance(user.error, SecretNotFoundError)
    assert isinstance(password.error, SetKeptError)
    assert "db-user" in str(password.error) and "set 'db'" in str(password.error)
    assert not password.changed and not user.changed and report.swapped == ()
    assert short_cause(password.error) == "set kept: 404 not found"


def test_a_member_that_leaves_a_set_is_kept_without_a_ledger(emulator: Emulator,
                                                            shm_dir: Path) -> None:
    """Without the running agent's ledger (a one-shot sync, as `once` runs it), a file
    that left a set cannot be told from an operator's: it stays in the set's directory,
    reported as foreign, and the unchanged set is not swapped for it."""
    from agent.writer import foreign_in_set

    emulator.set_secret("db-password", "pw 1")
    emulator.set_secret("db-user", "user 1")
    inodes = []
    for entries in (SET_ENTRIES, "  - {name: db-password, path: db/password, set: db}\n"):
        agent = Sync(manifest(emulator, shm_dir, entries), environ=environ(emulator))
        try:
            agent.prepare()
            agent.sync()
        finally:
            agent.close()
        inodes.append(os.lstat(shm_dir / "db").st_ino)
    assert sorted(os.listdir(shm_dir / "db")) == ["password", "user"]
    assert inodes[0] == inodes[1]
    assert foreign_in_set(str(shm_dir / "db"), [str(shm_dir / "db" / "password")]) == [
        str(shm_dir / "db" / "user")]


def test_a_one_shot_sync_keeps_an_operators_file_in_a_set(emulator: Emulator,
                                                         shm_dir: Path) -> None:
    """A file an operator added to a set's directory survives one-shot syncs as `once`
    runs them: the unchanged set is not swapped for it, and after a rotation (and the
    old generation's removal) it is still there, the same inode."""
    emulator.set_secret("db-password", "pw 1")
    emulator.set_secret("db-user", "user 1")
    notes = shm_dir / "db" / "notes"
    inodes = []
    for value in ("pw 1", "pw 1", "pw 2"):
        emulator.set_secret("db-password", value)
        agent = Sync(manifest(emulator, shm_dir, SET_ENTRIES), environ=environ(emulator),
                      sleep=lambda seconds: None)
        try:
            agent.prepare()
            agent.retire_generations(agent.sync())
        finally:
            agent.close()
        if not notes.exists():
            notes.write_text("operator's")
            notes_inode = os.lstat(notes).st_ino
        inodes.append(os.lstat(shm_dir / "db").st_ino)
    assert inodes[0] == inodes[1] != inodes[2]
    assert notes.read_text() == "operator's" and os.lstat(notes).st_ino == notes_inode
    assert sorted(os.listdir(shm_dir)) == ["db"]
    assert (shm_dir / "db" / "password").read_text() == "pw 2"


def test_once_retires_old_generations_only_after_the_grace_when_a_set_swapped(
        emulator: Emulator, shm_dir: Path) -> None:
    """retire_generations waits out the grace only when a sync swapped a set, and
    leaves no old generation behind either way."""
    emulator.set_secret("db-password", "pw 1")
    emulator.set_secret("db-user", "user 1")
    slept: List[float] = []
    agent = Sync(manifest(emulator, shm_dir, SET_ENTRIES), environ=environ(emulator),
                  sleep=slept.append)
    try:
        agent.prepare()
        agent.retire_generations(agent.sync())
        assert slept == []
        emulator.set_secret("db-password", "pw 2")
        report = agent.sync()
        assert [n for n in os.listdir(shm_dir) if n.startswith(".kv-agent-set-")]
        agent.retire_generations(report)
    finally:
        agent.close()
    assert slept == [SET_GRACE_S]
    assert sorted(os.listdir(shm_dir)) == ["db"]


def test_outcomes_carry_the_validity_window(emulator: Emulator, shm_dir: Path) -> None:
    """A written entry's outcome holds its secret's nbf and exp, and expiry_warnings
    names it once it is expired (it is written all the same)."""
    emulator.set_secret("old-token", "v", not_before=1_000, expires_on=2_000)
    agent = Sync(manifest(emulator, shm_dir, "  - {name: old-token}\n"),
                  environ=environ(emulator))
    try:
        report = agent.sync()
    finally:
        agent.close()
    outcome, = report.outcomes
    assert outcome.validity == Validity(1_000, 2_000) and outcome.changed
    assert (shm_dir / "old-token").read_text() == "v"
    assert expiry_warnings(report.outcomes, 100, now=1_500) == []
    assert "expires at" in expiry_warnings(report.outcomes, 600, now=1_500)[0]
    warning, = expiry_warnings(report.outcomes, 86400, now=3_000)
    assert "'old-token' expired at 1970-01-01T00:33:20Z" in warning


def test_dates_beyond_the_year_9999_are_no_date_said_once(
        emulator: Emulator, shm_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """nbf and exp near 2^62 (beyond 9999) are read as no date: the entry is written, its
    window is empty, expiry_warnings stays quiet, and one warning names the secret and the
    fields however many syncs see them."""
    emulator.set_secret("far-dates", "v", not_before=2**62, expires_on=2**62 + 1)
    agent = Sync(manifest(emulator, shm_dir, "  - {name: far-dates}\n"),
                  environ=environ(emulator))
    try:
        with caplog.at_level(logging.WARNING, logger="agent.sync.sync"):
            first, second = agent.sync(), agent.sync()
    finally:
        agent.close()
    for report in (first, second):
        outcome, = report.outcomes
        assert outcome.error is None and outcome.validity == Validity(None, None)
        assert expiry_warnings(report.outcomes, 86400, now=time.time()) == []
    said = [r.getMessage() for r in caplog.records if "far-dates" in r.getMessage()]
    assert said == ["secret 'far-dates': the vault sent nbf and exp outside 1970..9999 or not "
                    "an integer; read as no date: check the secret's activation and expiry "
                    "dates"]


def test_a_bug_in_one_entrys_transform_fails_that_entry_alone(
        emulator: Emulator, shm_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An unexpected exception while converting one entry fails that entry, reported as a bug
    with its name, its file kept; the entries after it are written."""
    from agent.pipeline.transforms import TRANSFORMS

    def broken(materials: object, params: object) -> Tuple[bytes, ...]:
        raise KeyError("a value")

    monkeypatch.setitem(TRANSFORMS, "template", broken)  # type: ignore[index]
    emulator.set_secret("tpl-part", "a")
    emulator.set_secret("after-the-bug", "after")
    (shm_dir / "app.env").write_text("last good")
    agent = Sync(manifest(emulator, shm_dir,
                           "  - name: app-env\n"
                           "    template: {path: app.env, values: {A: tpl-part}}\n"
                           "  - {name: after-the-bug}\n"), environ=environ(emulator))
    try:
        report = agent.sync()
    finally:
        agent.close()
    failed, written = report.outcomes
    assert failed.error is not None and "entry 'app-env': the template transform failed " \
        "unexpectedly (KeyError at test_sync.py" in failed.error.message
    assert (shm_dir / "app.env").read_text() == "last good"
    assert written.error is None and (shm_dir / "after-the-bug").read_text() == "after"


# ---------------------------------------------------------------------------
# List-based refresh (issue 12): the freshness memory carried between syncs


class AgedVault:
    """An emulator whose secrets were written an hour ago (past SETTLED_S), so
    the list's ``updated`` is trusted at once; later writes are at real time."""

    def __init__(self, emulator: Emulator, offset: List[float]) -> None:
        self.emulator, self._offset = emulator, offset

    def settle(self) -> None:
        self._offset[0] = 0.0


@pytest.fixture
def aged() -> Iterator[AgedVault]:
    offset = [3600.0]
    with Emulator({f"item-{n:02d}": f"value {n}" for n in range(30)},
                  clock=lambda: time.time() - offset[0]) as started:
        vault = AgedVault(started, offset)
        vault.settle()
        yield vault


def list_requests(emulator: Emulator) -> int:
    return sum(1 for record in emulator.vault_log if record.path == "/secrets")


def get_requests(emulator: Emulator) -> List[str]:
    return [record.path for record in emulator.vault_log if record.path.startswith("/secrets/")]


ITEMS = "".join(f"  - {{name: item-{n:02d}}}\n" for n in range(30))


def refreshes(agent: Sync, count: int, memory: Freshness = Freshness()
              ) -> Tuple[List[SyncReport], Freshness]:
    reports = []
    for _ in range(count):
        report = agent.sync(freshness=memory)
        memory = report.freshness
        reports.append(report)
    return reports, memory


@pytest.mark.parametrize("empty_pages", [False, True])
def test_an_unchanged_refresh_only_lists_and_a_rotation_is_fetched(
        aged: AgedVault, shm_dir: Path, empty_pages: bool) -> None:
    """After the initial sync, an unchanged refresh makes only list requests (empty pages
    followed), and a rotated secret is fetched alone and written."""
    emulator = aged.emulator
    emulator.empty_pages = empty_pages
    agent = Sync(manifest(emulator, shm_dir, ITEMS), environ=environ(emulator))
    try:
        agent.prepare()
        (initial,), memory = refreshes(agent, 1)
        emulator.reset_stats()
        (unchanged,), memory = refreshes(agent, 1, memory)
        assert get_requests(emulator) == [] and emulator.imds_requests == 0
        assert list_requests(emulator) == emulator.vault_requests >= 2 + 2 * empty_pages
        assert unchanged.changed == 0 and not unchanged.failures
        assert [o.version for o in unchanged.outcomes] == [o.version for o in initial.outcomes]
        rotated = emulator.set_secret("item-07", "rotated value")
        emulator.reset_stats()
        (after,), memory = refreshes(agent, 1, memory)
    finally:
        agent.close()
    assert get_requests(emulator) == ["/secrets/item-07/"] or \
        get_requests(emulator) == ["/secrets/item-07"]
    assert (shm_dir / "item-07").read_text() == "rotated value"
    assert after.outcomes[7].version == rotated and after.changed == 1


def test_a_failed_start_fetches_only_what_is_missing(aged: AgedVault, shm_dir: Path) -> None:
    """A first sync that failed for some secrets is followed (while starting: fresh_for_s)
    by GETs of those alone: no list, and no second GET of what it wrote."""
    emulator = aged.emulator
    for number in range(5, 10):
        emulator.inject_fault("vault", 404, count=1, path_contains=f"/secrets/item-{number:02d}")
    agent = Sync(manifest(emulator, shm_dir, ITEMS), environ=environ(emulator))
    try:
        agent.prepare()
        first = agent.sync()
        emulator.reset_stats()
        second = agent.sync(freshness=first.freshness, fresh_for_s=900)
    finally:
        agent.close()
    assert len(first.failures) == 5 and not second.failures
    assert list_requests(emulator) == 0
    assert sorted(path.rstrip("/") for path in get_requests(emulator)) == [
        f"/secrets/item-{number:02d}" for number in range(5, 10)]
    assert (shm_dir / "item-07").read_text() == "value 7"


def test_a_forbidden_list_falls_back_to_gets_and_says_so_once(
        aged: AgedVault, shm_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """403 on the list (an access-policy vault without 'list'): every secret is fetched,
    one warning names the fix, and later refreshes do not list again."""
    emulator = aged.emulator
    body = (b'{"error":{"code":"Forbidden","message":"The user, group or application does not '
            b'have secrets list permission on key vault","innererror":{"code":"AccessDenied"}}}')
    agent = Sync(manifest(emulator, shm_dir, ITEMS), environ=environ(emulator))
    try:
        agent.prepare()
        _, memory = refreshes(agent, 1)
        emulator.inject_fault("vault", 403, count=1, path_contains="/secrets", body=body)
        emulator.reset_stats()
        with caplog.at_level(logging.INFO):
            reports, memory = refreshes(agent, 2, memory)
    finally:
        agent.close()
    assert list_requests(emulator) == 1 and len(get_requests(emulator)) == 60
    assert not any(report.failures for report in reports)
    warnings = [r.getMessage() for r in caplog.records
                if r.levelno == logging.WARNING and "list" in r.getMessage()]
    assert len(warnings) == 1 and "'list' secret permission" in warnings[0]


def test_a_pinned_version_costs_nothing_and_its_file_is_repaired(
        aged: AgedVault, shm_dir: Path) -> None:
    """A written pinned version makes no request at refresh; its deleted file is fetched
    again and rewritten, and a file edited behind the agent's back is rewritten too."""
    emulator = aged.emulator
    pinned = emulator.set_secret("pinned", "pinned value")
    emulator.set_secret("pinned", "a later version")
    agent = Sync(manifest(emulator, shm_dir, f"  - {{name: pinned, version: {pinned}}}\n"
                                              "  - {name: item-00}\n"),
                  environ=environ(emulator))
    try:
        agent.prepare()
        _, memory = refreshes(agent, 1)
        emulator.reset_stats()
        _, memory = refreshes(agent, 2, memory)
        assert emulator.vault_requests == 2  # item-00 alone: one GET each (cheaper than a list)
        assert get_requests(emulator) == ["/secrets/item-00/"] * 2 or \
            get_requests(emulator) == ["/secrets/item-00"] * 2
        (shm_dir / "pinned").unlink()
        emulator.reset_stats()
        (repaired,), memory = refreshes(agent, 1, memory)
        assert [p for p in get_requests(emulator) if "pinned" in p] == [f"/secrets/pinned/{pinned}"]
        assert (shm_dir / "pinned").read_text() == "pinned value"
        os.chmod(shm_dir / "pinned", 0o644)
        (shm_dir / "pinned").write_text("edited")
        emulator.reset_stats()
        (rewritten,), memory = refreshes(agent, 1, memory)
    finally:
        agent.close()
    assert (shm_dir / "pinned").read_text() == "pinned value"
    assert repaired.outcomes[0].changed and rewritten.outcomes[0].changed
    assert os.stat(shm_dir / "pinned").st_mode & 0o777 == 0o400


def test_disabled_and_deleted_secrets_report_as_before_and_keep_their_files(
        aged: AgedVault, shm_dir: Path) -> None:
    """A secret disabled in the list or gone from it is fetched: 403/404 reported, file kept."""
    emulator = aged.emulator
    agent = Sync(manifest(emulator, shm_dir, ITEMS), environ=environ(emulator))
    try:
        agent.prepare()
        _, memory = refreshes(agent, 1)
        emulator.disable_secret("item-03")
        emulator.delete_secret("item-04")
        emulator.reset_stats()
        (report,), memory = refreshes(agent, 1, memory)
    finally:
        agent.close()
    assert sorted(p.rstrip("/") for p in get_requests(emulator)) == ["/secrets/item-03",
                                                                     "/secrets/item-04"]
    assert short_cause(report.outcomes[3].error) == "403 disabled"  # type: ignore[arg-type]
    assert isinstance(report.outcomes[4].error, SecretNotFoundError)
    assert (shm_dir / "item-03").read_text() == "value 3"
    assert (shm_dir / "item-04").read_text() == "value 4"


def test_a_small_manifest_of_a_large_vault_keeps_per_secret_gets(
        aged: AgedVault, shm_dir: Path) -> None:
    """Two secrets of a 30-secret vault: the one list tried stops at its budget (one page,
    below the two GETs it would save), and later refreshes GET the two without listing."""
    emulator = aged.emulator
    agent = Sync(manifest(emulator, shm_dir, "  - {name: item-00}\n  - {name: item-01}\n"),
                  environ=environ(emulator))
    try:
        agent.prepare()
        _, memory = refreshes(agent, 1)
        emulator.reset_stats()
        _, memory = refreshes(agent, 1, memory)
        assert list_requests(emulator) == 1 and len(get_requests(emulator)) == 2
        emulator.reset_stats()
        reports, memory = refreshes(agent, 2, memory)
    finally:
        agent.close()
    assert list_requests(emulator) == 0 and len(get_requests(emulator)) == 4
    assert not any(report.failures for report in reports)
