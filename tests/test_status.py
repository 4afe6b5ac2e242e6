"""`kv-agent status` rendering and state file: a health check operators can trust."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any, Dict, List, Mapping, Tuple

from agent.base.errors import EXIT_FAILURE, EXIT_OK, EXIT_UNAVAILABLE
from agent.pipeline.expiry import EXPIRED, EXPIRING, NOT_YET_VALID
from agent.status.render import render_status as render_snapshot
from agent.status.snapshot import (
    READY,
    EntryStatus,
    StatusSnapshot,
    Written,
    WrittenSet,
    parse_snapshot,
    read_written,
)
from agent.status.store import StateStore, state_dir


def render_status(document: Mapping[str, Any], path: str) -> Tuple[List[str], int]:
    """What `kv-agent status` shows for a loaded status.json."""
    return render_snapshot(parse_snapshot(document), path)


def document(**overrides: Any) -> Dict[str, Any]:
    base: Dict[str, Any] = {
        "version": 1, "pid": os.getpid(), "state": "ready",
        "status": "2 secrets current; last refresh 14:02:11; next 14:17:03",
        "manifest": "/etc/kv-agent/manifest.yaml", "error": None, "manifest_error": None,
        "last_refresh": "2026-11-24T14:02:11Z", "next_refresh": "2026-11-24T14:17:03Z",
        "secrets": [
            {"name": "db", "path": "/run/secrets/db", "version": "a" * 32, "optional": False,
             "updated": "2026-11-24T14:02:11Z", "error": None},
            {"name": "flag", "path": "/run/secrets/flag", "version": None, "optional": True,
             "updated": None, "error": "not found", "error_since": "2026-11-24T14:00:00Z"},
        ],
    }
    base.update(overrides)
    return base


def test_healthy_agent_exits_zero() -> None:
    """A running agent with every required secret current is healthy, optional failures shown."""
    lines, code = render_status(document(), "/run/kv-agent/status.json")
    assert code == EXIT_OK
    assert lines[0].startswith(f"kv-agent is running (pid {os.getpid()}")
    assert any(line.startswith("  warn flag") for line in lines)


def test_failing_required_secret_exits_one() -> None:
    """A failing non-optional secret makes the health check fail, with its error."""
    doc = document()
    doc["secrets"][0]["error"] = "secret 'db': 403 forbidden; grant Key Vault Secrets User"
    lines, code = render_status(doc, "x")
    assert code == EXIT_FAILURE
    assert any("grant Key Vault Secrets User" in line for line in lines)


def test_no_status_or_dead_agent_is_unavailable() -> None:
    """No status file, a stopped agent or a dead pid all mean 'not running' (69)."""
    assert render_status({}, "/run/kv-agent/status.json")[1] == EXIT_UNAVAILABLE
    assert render_status(document(state="stopped"), "x")[1] == EXIT_UNAVAILABLE
    assert render_status(document(pid=2**22 + 12345), "x")[1] == EXIT_UNAVAILABLE


def test_state_store_replaces_atomically(tmp_path: Path) -> None:
    """The status file is replaced whole, root-only (0600), with no temp file left."""
    store = StateStore(str(tmp_path / "state"))
    store.prepare()
    store.save({"written": {"/run/secrets/db": 12}})
    first = os.stat(store.path).st_ino
    store.save({"written": {"/run/secrets/db": 13, "bad": "x"}})
    assert os.stat(store.path).st_ino != first
    assert stat.S_IMODE(os.stat(store.path).st_mode) == 0o600
    assert os.listdir(tmp_path / "state") == ["status.json"]
    assert read_written(store.load()) == (Written("/run/secrets/db", 13),)


def test_unreadable_state_is_empty(tmp_path: Path) -> None:
    """A corrupt status file reads as no state rather than an error."""
    store = StateStore(str(tmp_path))
    Path(store.path).write_text("{not json")
    assert store.load() == {}
    Path(store.path).write_text(json.dumps([1, 2]))
    assert store.load() == {}


def test_state_dir_precedence() -> None:
    """--state-dir beats KV_AGENT_STATE_DIR, which beats /run/kv-agent."""
    assert state_dir({}, None) == "/run/kv-agent"
    assert state_dir({"KV_AGENT_STATE_DIR": "/x"}, None) == "/x"
    assert state_dir({"KV_AGENT_STATE_DIR": "/x"}, "/y") == "/y"


def test_stopped_agent_shows_the_last_run_as_past() -> None:
    """After a clean stop, the status says when the last run stopped and marks every
    per-secret line as from then: no current "ok", no next refresh."""
    lines, code = render_status(document(state="stopped", saved_at="2026-11-24T14:05:09Z"), "x")
    assert code == EXIT_UNAVAILABLE
    assert lines[0] == ("kv-agent is not running; the last run (pid %d) stopped at "
                        "2026-11-24T14:05:09Z; the lines below are from then" % os.getpid())
    assert not any(line.lstrip().startswith(("ok ", "FAIL ", "warn ")) for line in lines)
    assert any(line.startswith("  was ok   db -> /run/secrets/db") for line in lines)
    assert any(line.startswith("  was warn flag") for line in lines)
    assert not any("next:" in line for line in lines)


def test_dead_agent_shows_its_last_status_time() -> None:
    """An agent that died without stopping is reported with the time of its last status."""
    doc = document(pid=2**22 + 12345, saved_at="2026-11-24T14:03:00Z")
    lines, code = render_status(doc, "x")
    assert code == EXIT_UNAVAILABLE
    assert lines[0].startswith(f"kv-agent is not running; the last run (pid {2**22 + 12345}) "
                               "ended without stopping cleanly; its last status was written at "
                               "2026-11-24T14:03:00Z; the lines below are from then")
    assert any(line.startswith("  was ok   db") for line in lines)


def test_version_2_round_trips_and_lists_every_path() -> None:
    """A version 2 snapshot reads back equal, keyed by entry with all its paths."""
    snapshot = StatusSnapshot(
        pid=os.getpid(), phase=READY, saved_at="2026-11-24T14:02:11Z", status="1 secret current",
        manifest="/etc/kv-agent/manifest.yaml",
        entries=(EntryStatus("tls", ("/run/secrets/tls.key", "/run/secrets/tls.crt"),
                             "https://a.vault.azure.net", version="b" * 32),),
        written=(Written("/run/secrets/tls.crt", 8, "/run/secrets/tls.key"),
                 Written("/run/secrets/tls.key", 7, "/run/secrets/tls.key")),
        refresh_interval_s=900.0)
    document = json.loads(json.dumps(snapshot.as_json()))
    assert document["version"] == 2 and document["secrets"][0]["path"] == "/run/secrets/tls.key"
    assert parse_snapshot(document) == snapshot
    lines, code = render_status(document, "x")
    assert code == EXIT_OK
    assert any("tls -> /run/secrets/tls.key, /run/secrets/tls.crt" in line for line in lines)


def test_the_running_agents_own_version_shows_and_an_older_agent_has_none() -> None:
    """status.json carries the running agent's version and `kv-agent status` shows it, so
    after a package upgrade the new code is told from an old process (issue 21); a status
    written by an agent that did not record it shows no such line."""
    snapshot = StatusSnapshot(pid=os.getpid(), phase=READY, saved_at=None, status="",
                              manifest="/etc/kv-agent/manifest.yaml", agent_version="0.0.9")
    saved = json.loads(json.dumps(snapshot.as_json()))
    assert saved["agent_version"] == "0.0.9" and parse_snapshot(saved) == snapshot
    assert "  agent: kv-agent 0.0.9" in render_status(saved, "x")[0]
    assert not [line for line in render_status(document(), "x")[0] if line.startswith("  agent:")]


def test_version_1_ledger_survives_an_upgrade() -> None:
    """An old agent's status.json (path -> inode) still yields its ledger and entries."""
    old = document(written={"/run/secrets/db": 12, "/run/secrets/gone": 14, "bad": "x"})
    snapshot = parse_snapshot(old)
    assert snapshot is not None and snapshot.version == 1
    assert snapshot.written == (Written("/run/secrets/db", 12), Written("/run/secrets/gone", 14))
    assert [e.paths for e in snapshot.entries] == [("/run/secrets/db",), ("/run/secrets/flag",)]


def test_damaged_documents_read_as_values_or_nothing() -> None:
    """Odd types in status.json never crash the reader; unknown versions read as none."""
    assert parse_snapshot({"version": 99, "pid": 1}) is None
    assert parse_snapshot({"pid": 1}) is None
    odd = parse_snapshot({"version": 2, "pid": "1", "state": 3, "secrets": [1, {"paths": 5}],
                          "written": {"/a": {"inode": "x"}, "/b": True},
                          "refresh_interval_s": True})
    assert odd is not None and odd.pid is None and odd.written == ()
    assert odd.entries == (EntryStatus("?", ()),) and odd.refresh_interval_s is None
    assert render_snapshot(odd, "x")[1] == EXIT_UNAVAILABLE


def test_sets_and_expiry_round_trip_and_show() -> None:
    """The ledger's sets and each entry's validity with its expiry flag read back equal;
    `kv-agent status` shows an expired entry's date and what to do, and stays healthy
    (an expired secret is written, as Key Vault serves it)."""
    snapshot = StatusSnapshot(
        pid=os.getpid(), phase=READY, saved_at="2026-11-24T14:02:11Z",
        status="1 secret current; 1 expired: web-tls (expired 2026-11-01)",
        manifest="/etc/kv-agent/manifest.yaml",
        entries=(EntryStatus("web-tls", ("/run/secrets/web/tls.key", "/run/secrets/web/tls.crt"),
                             version="c" * 32, not_before="2025-11-01T00:00:00Z",
                             expires="2026-11-01T00:00:00Z", expiry=EXPIRED),),
        sets=(WrittenSet("/run/secrets/web", ("/run/secrets/web/tls.crt",
                                              "/run/secrets/web/tls.key"),
                         "certificate:/run/secrets/web/tls.key"),))
    document = json.loads(json.dumps(snapshot.as_json()))
    assert document["secrets"][0]["expired"] is True
    assert document["secrets"][0]["expiring"] is False
    assert parse_snapshot(document) == snapshot
    lines, code = render_status(document, "x")
    assert code == EXIT_OK
    assert any("expires 2026-11-01T00:00:00Z" in line for line in lines)
    assert any("EXPIRED at 2026-11-01T00:00:00Z" in line and "rotate" in line
               for line in lines)


def test_identity_source_round_trips_and_shows() -> None:
    """The identity source the agent chose is kept in status.json and shown by status;
    an older document without it shows no identity line."""
    snapshot = StatusSnapshot(
        pid=os.getpid(), phase=READY, saved_at="2026-11-24T14:02:11Z", status="ok",
        manifest="/etc/kv-agent/manifest.yaml",
        identity_source="arc (IDENTITY_ENDPOINT and IMDS_ENDPOINT are set)")
    document = json.loads(json.dumps(snapshot.as_json()))
    assert parse_snapshot(document) == snapshot
    lines, _ = render_status(document, "x")
    assert "  identity: arc (IDENTITY_ENDPOINT and IMDS_ENDPOINT are set)" in lines
    assert not any("identity:" in line for line in render_status(
        {k: v for k, v in document.items() if k != "identity_source"}, "x")[0])


def test_expiry_column_shows_each_entrys_date_and_mark() -> None:
    """Every entry line has an expiry column, aligned: the date marked EXPIRED, expiring or
    not yet valid, the bare date when fine, "no expiry" when the secret has none; the
    identity source is shown above the entries."""
    snapshot = StatusSnapshot(
        pid=os.getpid(), phase=READY, saved_at="2026-11-24T14:02:11Z", status="ok",
        manifest="/etc/kv-agent/manifest.yaml", identity_source="imds (default)",
        entries=(
            EntryStatus("web-tls", ("/run/secrets/web/tls.key",), version="c" * 32,
                        expires="2026-11-01T00:00:00Z", expiry=EXPIRED),
            EntryStatus("db", ("/run/secrets/db",), version="a" * 32,
                        expires="2026-12-01T00:00:00Z", expiry=EXPIRING),
            EntryStatus("later", ("/run/secrets/later",), not_before="2027-01-01T00:00:00Z",
                        expiry=NOT_YET_VALID),
            EntryStatus("api", ("/run/secrets/api",), expires="2028-01-01T00:00:00Z"),
            EntryStatus("plain", ("/run/secrets/plain",))))
    lines, code = render_snapshot(snapshot, "x")
    assert code == EXIT_OK
    assert "  identity: imds (default)" in lines
    rows = {line.split()[1]: line for line in lines if line.startswith("  ok ")}
    assert "expires 2026-11-01T00:00:00Z EXPIRED " in rows["web-tls"]
    assert "expires 2026-12-01T00:00:00Z expiring " in rows["db"]
    assert " not yet valid " in rows["later"]
    assert "expires 2028-01-01T00:00:00Z " in rows["api"]
    assert " no expiry " in rows["plain"]
    columns = {row.index("version") for row in rows.values()}
    assert len(columns) == 1, rows  # aligned


def test_a_credential_entry_round_trips_and_shows_its_key_and_whether_loaded() -> None:
    """A credential-only entry is shown by its credential (``credential:<units>/<ID>``) as
    its path, with whether it is in memory; an entry without credentials keeps its keys."""
    label = "credential:app.service,worker@*.service/db"
    snapshot = StatusSnapshot(
        pid=os.getpid(), phase=READY, saved_at="2026-11-24T14:02:11Z",
        status="2 secrets current; 1 credential in memory",
        manifest="/etc/kv-agent/manifest.yaml",
        entries=(EntryStatus("db", (), "https://a.vault.azure.net", version="b" * 32,
                             credentials=(label,), is_loaded=True),
                 EntryStatus("plain", ("/run/secrets/plain",), "https://a.vault.azure.net")))
    document = json.loads(json.dumps(snapshot.as_json()))
    db, plain = document["secrets"]
    assert (db["path"], db["paths"], db["credentials"], db["loaded"]) == (label, [], [label],
                                                                          True)
    assert "credentials" not in plain and "loaded" not in plain
    assert parse_snapshot(document) == snapshot
    lines, code = render_status(document, "x")
    assert code == EXIT_OK
    assert any(f"ok   db -> {label} (loaded)" in line for line in lines), lines
    db["loaded"] = False
    assert any(f"-> {label} (not loaded)" in line for line in render_status(document, "x")[0])


def test_an_entry_served_from_the_sealed_cache_is_marked_with_its_copys_age() -> None:
    """While a sealed copy stands in for the vault (issue 20), status.json marks the entry
    with the copy's fetch time and the document with the serving line, and `kv-agent
    status` shows the copy's age; otherwise neither key is saved (an older reader, and
    this one, read the same version 2 document either way)."""
    snapshot = StatusSnapshot(
        pid=os.getpid(), phase=READY, saved_at="2026-11-24T14:02:11Z",
        status="serving 1 of 2 from the sealed cache of 2026-11-24T11:00:00Z: IMDS down",
        manifest="/etc/kv-agent/manifest.yaml",
        entries=(EntryStatus("db-password", ("/run/secrets/db",), "https://a.vault.azure.net",
                             from_cache="2026-11-24T11:00:00Z"),
                 EntryStatus("plain", ("/run/secrets/plain",), "https://a.vault.azure.net")),
        cache="serving 1 of 2 from the sealed cache of 2026-11-24T11:00:00Z: IMDS down")
    document = json.loads(json.dumps(snapshot.as_json()))
    db, plain = document["secrets"]
    assert document["version"] == 2 and document["cache"].startswith("serving 1 of 2")
    assert db["from_cache"] == "2026-11-24T11:00:00Z" and "from_cache" not in plain
    assert parse_snapshot(document) == snapshot
    now = 1795518000.0 + 3 * 3600 + 125  # 2026-11-24T11:00:00Z, then 3h2m5s
    lines, code = render_snapshot(parse_snapshot(document), "x", now=now)
    assert code == EXIT_OK
    assert any("ok   db-password -> /run/secrets/db (from the sealed cache, 3h2m old)" in line
               for line in lines), lines
    assert not any("sealed cache" in line for line in lines if "plain" in line)
    db["from_cache"] = "not a time"
    lines = render_snapshot(parse_snapshot(document), "x", now=now)[0]
    assert any("(from the sealed cache of not a time)" in line for line in lines), lines
    unserved = snapshot._replace(cache=None, entries=(snapshot.entries[1],)).as_json()
    assert "cache" not in unserved and "from_cache" not in unserved["secrets"][0]
