"""The entry table: each entry's state, the READY gate and what status and metrics show.

No process, no network: outcomes are built by hand, files are real (on tmpfs)
where the READY gate looks at them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import pytest
import yaml

from agent.base.errors import SecretNotFoundError, VaultForbiddenError
from agent.daemon.entries import EntryTable
from agent.daemon.metrics import EntryMetrics
from agent.manifest import Accounts, Entry, Manifest, parse_manifest
from agent.pipeline.credentials import Grant
from agent.pipeline.expiry import Validity
from agent.status.snapshot import EntryStatus
from agent.sync.freshness import Freshness, SourceSeen
from agent.sync.sync import SecretOutcome, SyncReport
from agent.writer.credentials import CredentialStore

ACCOUNTS = Accounts(user=lambda name: 0, group=lambda name: 0)
VAULT = "https://kv.vault.azure.net"


def manifest(directory: Path, entries: Sequence[Dict[str, Any]], **top: Any) -> Manifest:
    document = {"vault": VAULT, "directory": str(directory), **top, "secrets": list(entries)}
    return parse_manifest(yaml.safe_dump(document), "m.yaml", accounts=ACCOUNTS,
                          check_filesystem=False)


def table_for(m: Manifest) -> EntryTable:
    table = EntryTable()
    table.install(m)
    return table


def by_name(m: Manifest) -> Dict[str, Entry]:
    return {entry.name: entry for entry in m.secrets}


def no_ledger(path: str) -> Optional[int]:
    return None


def test_outcomes_are_recorded_and_each_change_is_logged_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A failure is logged once per change of error (optional ones as warnings), counted
    per refresh and kept with its short cause and since when; a success clears it, logs
    the recovery once, and marks the entry confirmed (updated only when a file changed)."""
    caplog.set_level("INFO")
    m = manifest(tmp_path, [{"name": "db"}, {"name": "opt", "optional": True}])
    table, entries = table_for(m), by_name(m)
    missing = SecretNotFoundError("secret 'db' not found")
    for now in (10.0, 20.0):
        table.record([SecretOutcome(entries["db"], error=missing),
                      SecretOutcome(entries["opt"], error=missing)], Freshness(), now)
    db, opt = table.statuses(20.0, False, no_ledger)
    assert (db.error, db.cause, db.error_since) == (str(missing), "404 not found",
                                                   "1970-01-01T00:00:10Z")
    assert [r.levelname for r in caplog.records] == ["ERROR", "WARNING"]
    assert table.metrics()[0].consecutive_failures == 2
    table.record([SecretOutcome(entries["db"], version="v1",
                                changed_paths=(str(tmp_path / "db"),))], Freshness(), 30.0)
    table.record([SecretOutcome(entries["db"], version="v1")], Freshness(), 40.0)
    db = table.statuses(40.0, False, no_ledger)[0]
    assert (db.error, db.version, db.updated, db.checked) == (
        None, "v1", "1970-01-01T00:00:30Z", "1970-01-01T00:00:40Z")
    assert len([r for r in caplog.records if "recovered" in r.message]) == 1
    table.record_failure()  # a refresh that failed as a whole confirms nothing
    assert [e.consecutive_failures for e in table.metrics()] == [1, 3]


def test_changed_files_name_their_hooks(tmp_path: Path) -> None:
    """record() returns (hook, path) for every file that changed, none for a failure."""
    hook = ["systemctl", "reload", "app"]
    m = manifest(tmp_path, [{"name": "a", "on_change": hook}, {"name": "b"}])
    entries = by_name(m)
    changed = table_for(m).record(
        [SecretOutcome(entries["a"], version="1", changed_paths=(str(tmp_path / "a"),)),
         SecretOutcome(entries["b"], error=VaultForbiddenError("secret 'b': 403"))],
        Freshness(), 1.0)
    assert changed == [(tuple(hook), str(tmp_path / "a"))]


def test_a_reload_keeps_the_rows_of_unchanged_entries(tmp_path: Path) -> None:
    """install() keeps an entry's row when name, paths and vault are the same (its
    optional flag follows the manifest), starts a row for a changed one and drops
    the others."""
    before = manifest(tmp_path, [{"name": "kept"}, {"name": "moved"}, {"name": "gone"}])
    table, entries = table_for(before), by_name(before)
    table.record([SecretOutcome(entries[name], version="v1") for name in entries],
                 Freshness(), 5.0)
    table.install(manifest(tmp_path, [{"name": "kept", "optional": True},
                                      {"name": "moved", "path": "elsewhere"},
                                      {"name": "new"}]))
    rows = {row.name: row for row in table.statuses(5.0, False, no_ledger)}
    assert list(rows) == ["kept", "moved", "new"]
    assert rows["kept"].version == "v1" and rows["kept"].is_optional
    assert rows["moved"].version is None and rows["new"].version is None


def test_ready_needs_every_required_file_on_disk(shm_dir: Path) -> None:
    """The READY gate looks at the files: every output of every required entry is the
    regular file a refresh found current, or the one the ledger says the agent wrote;
    a missing, replaced or only-reported file does not count; optional entries do not
    matter."""
    m = manifest(shm_dir, [{"name": "db"}, {"name": "opt", "optional": True}])
    table, entries = table_for(m), by_name(m)
    path = shm_dir / "db"
    assert not table.has_every_required_file(no_ledger)  # nothing written, no error either
    table.record([SecretOutcome(entries["db"], version="v1")], Freshness(), 1.0)
    assert not table.has_every_required_file(no_ledger)  # reported, but not on disk
    path.write_text("v1")
    assert not table.has_every_required_file(no_ledger)  # not the file the refresh found
    table.record([SecretOutcome(entries["db"], version="v1")], Freshness(), 2.0)
    assert table.has_every_required_file(no_ledger)
    (shm_dir / "replacement").write_text("someone else's")
    os.replace(shm_dir / "replacement", path)  # a new inode while the old one lives
    inode = os.lstat(path).st_ino
    assert not table.has_every_required_file(no_ledger)
    assert table.has_every_required_file({str(path): inode}.get)  # the ledger's own


def test_a_select_entry_counts_once_listed_and_follows_its_listing(tmp_path: Path) -> None:
    """A required select entry counts for READY once it listed; a successful listing adds
    a row per covered secret and drops the rows of those it no longer covers."""
    m = manifest(tmp_path, [{"select": {"prefix": "app-"}, "directory": "app"}])
    table = table_for(m)
    listing = m.selections[0].entry
    assert not table.has_every_required_file(no_ledger)
    table.record([SecretOutcome(listing, version="2 matched")], Freshness(), 1.0)
    assert table.has_every_required_file(no_ledger)
    one, two = (manifest(tmp_path, [{"name": name, "path": f"app/{name}"}]).secrets[0]
                for name in ("app-1", "app-2"))
    table.follow_selections(SyncReport(
        (SecretOutcome(one, "v1"), SecretOutcome(two, "v1")), 0.0,
        selected=((str(tmp_path / "app"), (one.key, two.key)),)))
    assert len(table) == 3
    table.follow_selections(SyncReport((SecretOutcome(two, "v1"),), 0.0,
                                       selected=((str(tmp_path / "app"), (two.key,)),)))
    assert [row.name for row in table.statuses(1.0, False, no_ledger)] == [listing.name,
                                                                            "app-2"]


def test_an_added_entry_is_pending_only_for_a_ready_agent(tmp_path: Path) -> None:
    """An entry no refresh confirmed or failed and whose file the agent never wrote is
    pending (not written yet) once the agent is ready; not while starting, not once the
    ledger holds its file, not once a refresh failed it."""
    m = manifest(tmp_path, [{"name": "added"}])
    table, entry = table_for(m), m.secrets[0]
    assert table.statuses(0.0, True, no_ledger)[0].is_pending
    assert not table.statuses(0.0, False, no_ledger)[0].is_pending
    assert not table.statuses(0.0, True, lambda path: 7)[0].is_pending
    table.record([SecretOutcome(entry, error=SecretNotFoundError("x"))], Freshness(), 1.0)
    assert not table.statuses(1.0, True, no_ledger)[0].is_pending


def test_status_and_metrics_rows_map_the_state(tmp_path: Path) -> None:
    """statuses() and metrics() are the one mapping of a row: times as ISO text for the
    status, unix seconds for the metrics; the written version's updated time is taken
    from the refresh's memory when it is the version written; expiry judged at the
    given time against warn_before_expiry."""
    m = manifest(tmp_path, [{"name": "tls"}], warn_before_expiry="7d")
    table, entry = table_for(m), m.secrets[0]
    memory = Freshness(sources={entry.sources[0]: SourceSeen("v2", 1_700_000_000)})
    table.record([SecretOutcome(entry, "v2", validity=Validity(100, 10 * 86400))], memory,
                 3 * 86400.0)
    assert table.statuses(3 * 86400.0, True, no_ledger) == (EntryStatus(
        "tls", entry.paths, VAULT, False, "v2", "1970-01-04T00:00:00Z",
        "1970-01-04T00:00:00Z", not_before="1970-01-01T00:01:40Z",
        expires="1970-01-11T00:00:00Z", expiry="expiring"),)
    assert table.statuses(11 * 86400.0, True, no_ledger)[0].expiry == "expired"
    assert table.metrics() == (EntryMetrics(entry.key, "tls", VAULT, 3 * 86400.0,
                                            1_700_000_000, 0, 10 * 86400),)
    other = Freshness(sources={entry.sources[0]: SourceSeen("v1", 5)})
    table.record([SecretOutcome(entry, "v3")], other, 4 * 86400.0)
    assert table.metrics()[0].version_updated_s == 1_700_000_000  # not v3's: unknown


def test_expiry_is_warned_once_and_expiring_daily(tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    """An expiring entry is warned about at most once a day; once expired once more; a
    valid one is not (and its warnings are forgotten)."""
    caplog.set_level("WARNING")
    m = manifest(tmp_path, [{"name": "web-tls"}], warn_before_expiry="7d")
    table, entry = table_for(m), m.secrets[0]
    expires = 1_793_491_200

    def refresh(now: float, validity: Validity = Validity(None, expires)) -> None:
        table.record([SecretOutcome(entry, "v1", validity=validity)], Freshness(), now)

    for now in (expires - 3 * 86400, expires - 2.5 * 86400, expires - 1.5 * 86400,
                expires + 60, expires + 120):
        refresh(now)
    assert ["expires at" in r.message for r in caplog.records] == [True, True, False]
    assert "'web-tls' expired at" in caplog.records[-1].message
    refresh(expires + 180, Validity(None, expires + 365 * 86400))
    assert len(caplog.records) == 3


# -- systemd credentials (issue 19) ------------------------------------------------------------

CREDENTIAL = {"name": "db", "credential": {"units": ["app.service"]}}
HOOK = ["systemctl", "try-restart", "app.service"]


def credential_table(tmp_path: Path, entries: Sequence[Dict[str, Any]]
                     ) -> Tuple[EntryTable, Manifest, CredentialStore[Grant]]:
    m = manifest(tmp_path, list(entries))
    store: CredentialStore[Grant] = CredentialStore()
    store.declare({entry.key: entry.grants for entry in m.secrets if entry.grants})
    table = EntryTable(store)
    table.install(m)
    return table, m, store


def test_ready_waits_for_every_required_credential_in_memory(tmp_path: Path) -> None:
    """A credential-only entry (no file at all) counts for READY once the store holds its
    value, as a file counts once on disk; an optional one does not matter."""
    table, m, store = credential_table(tmp_path, [
        CREDENTIAL, {"name": "opt", "optional": True,
                     "credential": {"units": ["app.service"]}}])
    db = by_name(m)["db"]
    assert db.paths == () and db.key == "credential:app.service/db"
    table.record([SecretOutcome(db, version="v1")], Freshness(), 1.0)
    assert not table.has_every_required_file(no_ledger)  # reported, not in the store
    store.replace(db.key, [(db.grants[0], b"value")])
    assert table.has_every_required_file(no_ledger)


def test_a_changed_credential_names_its_hook(tmp_path: Path) -> None:
    """A changed credential runs the entry's on_change with its KV_AGENT_CHANGED name, after
    the entry's changed files."""
    table, m, _ = credential_table(tmp_path, [
        {**CREDENTIAL, "path": "db", "on_change": HOOK}])
    db = by_name(m)["db"]
    changed = table.record([SecretOutcome(
        db, "v2", changed_paths=db.paths,
        changed_credentials=("credential:app.service/db",))], Freshness(), 1.0)
    assert changed == [(tuple(HOOK), str(tmp_path / "db")),
                       (tuple(HOOK), "credential:app.service/db")]


def test_a_credential_entry_shows_its_key_and_whether_it_is_loaded(tmp_path: Path) -> None:
    """Status and metrics rows name a credential-only entry by its credential and say whether
    it is in memory; a reload that adds one is pending until loaded; new units are a new row."""
    table, m, store = credential_table(tmp_path, [CREDENTIAL, {"name": "plain"}])
    db = by_name(m)["db"]
    rows = {row.name: row for row in table.statuses(0.0, True, no_ledger)}
    assert (rows["db"].path, rows["db"].credentials, rows["db"].is_loaded) == \
        (db.key, (db.key,), False)
    assert rows["db"].is_pending
    assert rows["plain"].credentials == () and not rows["plain"].is_loaded
    store.replace(db.key, [(db.grants[0], b"value")])
    rows = {row.name: row for row in table.statuses(0.0, True, no_ledger)}
    assert rows["db"].is_loaded and not rows["db"].is_pending
    assert {row.entry: row.credentials_loaded for row in table.metrics()} == {
        db.key: True, str(tmp_path / "plain"): None}


def test_an_entry_whose_grants_change_starts_a_new_row(tmp_path: Path) -> None:
    """A file with a credential keeps its key when the credential's units change, but not its
    row: the store dropped the value, and the entry is pending again until a refresh."""
    both = {"name": "db", "path": "db", "credential": {"units": ["app.service"]}}
    table, m, _ = credential_table(tmp_path, [both, {"name": "plain"}])
    table.record([SecretOutcome(e, "v1") for e in m.secrets], Freshness(), 1.0)
    widened = manifest(tmp_path, [{**both, "credential": {"units": ["app.service",
                                                                     "worker@*.service"]}},
                                  {"name": "plain"}])
    assert widened.secrets[0].key == m.secrets[0].key
    table.install(widened)
    assert [row.checked for row in table.statuses(2.0, True, no_ledger)] == \
        [None, "1970-01-01T00:00:01Z"]
