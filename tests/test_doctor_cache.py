"""`kv-agent doctor` on the sealed cache (issue 20): its directory judged as the agent's
store judges it, its copies counted by name (never decrypted), and whether the running
agent serves from it now, and why (status.json). Fast: no systemd-creds, no network."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import List, Tuple

import pytest

from agent.cache.copy import expansion_key
from agent.cache.seal import Sealer
from agent.cache.store import file_name
from agent.doctor.cache_links import check_cache
from agent.doctor.report import FAIL, OK, WARN, Check
from agent.manifest import Accounts, Manifest, parse_manifest
from agent.status.snapshot import READY, STOPPED, EntryStatus, StatusSnapshot

ACCOUNTS = Accounts(user=lambda name: 0, group=lambda name: 0)
NOW = 1_795_518_000.0  # 2026-11-24T11:00:00Z
SERVING = "serving 1 of 2 from the sealed cache of 2026-11-24T08:00:00Z: IMDS unreachable"


def manifest(tmp_path: Path, cache: bool = True) -> Manifest:
    text = (f"vault: https://kv.vault.azure.net\ndirectory: {tmp_path / 'out'}\nsecrets:\n"
            "  - name: db-password\n    path: db\n  - name: api\n    path: api\n")
    if cache:
        text += f"cache: {{directory: {tmp_path / 'cache'}, max_age: 1d}}\n"
    return parse_manifest(text, "m.yaml", accounts=ACCOUNTS, check_filesystem=False)


def environ(tmp_path: Path) -> dict:
    (tmp_path / "state").mkdir(exist_ok=True)
    return {"KV_AGENT_STATE_DIR": str(tmp_path / "state")}


def seal_files(tmp_path: Path, keys: List[str], mtime: float = NOW - 3600) -> Path:
    """Stand-in copies: files named as the store names them (doctor never opens one)."""
    directory = tmp_path / "cache"
    directory.mkdir(mode=0o700, exist_ok=True)
    for key in keys:
        path = directory / file_name(key)
        path.write_bytes(b"ciphertext")
        os.utime(path, (mtime, mtime))
    return directory


def states(checks: List[Check]) -> List[Tuple[str, str]]:
    return [(check.name, check.state) for check in checks]


def test_no_cache_key_no_check(tmp_path: Path) -> None:
    assert check_cache(manifest(tmp_path, cache=False), environ(tmp_path), NOW) == []


def test_a_directory_not_created_yet_is_a_warning(tmp_path: Path) -> None:
    checks = check_cache(manifest(tmp_path), environ(tmp_path), NOW)
    assert states(checks) == [("directory", WARN), ("in use", OK)]
    assert "not created yet" in checks[0].detail
    assert checks[0].subject == f"cache {tmp_path / 'cache'}"


def test_a_directory_open_to_others_fails_with_the_fix(tmp_path: Path) -> None:
    (tmp_path / "cache").mkdir(mode=0o755)
    os.chmod(tmp_path / "cache", 0o755)
    checks = check_cache(manifest(tmp_path), environ(tmp_path), NOW)
    assert states(checks) == [("directory", FAIL), ("in use", OK)]
    assert "open to group or others" in checks[0].detail
    assert checks[0].fix is not None and "chmod 0700" in checks[0].fix


def test_copies_are_counted_by_name_and_the_missing_named(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Counted by file name, never opened: a sealer that is called fails the test."""
    def never(*args: object) -> bytes:
        raise AssertionError("doctor must not run systemd-creds")

    monkeypatch.setattr(Sealer, "seal", never)
    monkeypatch.setattr(Sealer, "unseal", never)
    current = manifest(tmp_path)
    db, api = (entry.key for entry in current.secrets)
    seal_files(tmp_path, [db])
    checks = check_cache(current, environ(tmp_path), NOW)
    assert states(checks) == [("directory", OK), ("copies", WARN), ("in use", OK)]
    assert "1 of 2 entries have a sealed copy" in checks[1].detail
    assert "2026-11-24T10:00:00Z (1h ago)" in checks[1].detail
    assert checks[1].detail.endswith("none yet for api")
    seal_files(tmp_path, [api, "/run/secrets/gone"])
    copies = check_cache(current, environ(tmp_path), NOW)[1]
    assert copies.state == OK, copies
    assert copies.detail.startswith("2 of 2 entries have a sealed copy (1 of entries no "
                                    "longer in the manifest")


def test_copies_older_than_max_age_are_never_served(tmp_path: Path) -> None:
    current = manifest(tmp_path)
    seal_files(tmp_path, [entry.key for entry in current.secrets], mtime=NOW - 2 * 86400)
    copies = check_cache(current, environ(tmp_path), NOW)[1]
    assert copies.state == WARN and "older than max_age 1d, never served" in copies.detail


def test_in_use_says_which_entries_and_why_from_status_json(tmp_path: Path) -> None:
    """The running agent's serving line and its served entries (never a value); a
    stopped agent's is its last run's; an agent not serving is OK."""
    env = environ(tmp_path)
    snapshot = StatusSnapshot(
        pid=os.getpid(), phase=READY, saved_at=None, status=SERVING, manifest="m.yaml",
        entries=(EntryStatus("db-password", ("/run/secrets/db",),
                             from_cache="2026-11-24T08:00:00Z"),
                 EntryStatus("api", ("/run/secrets/api",))), cache=SERVING)
    status = tmp_path / "state" / "status.json"
    status.write_text(json.dumps(snapshot.as_json()))
    in_use = check_cache(manifest(tmp_path), env, NOW)[-1]
    assert (in_use.name, in_use.state) == ("in use", WARN)
    assert in_use.detail == f"{SERVING}; served from it: db-password"
    assert in_use.fix is not None and "first good refresh" in in_use.fix
    status.write_text(json.dumps(snapshot._replace(phase=STOPPED).as_json()))
    assert check_cache(manifest(tmp_path), env, NOW)[-1].detail.startswith("the last run")
    status.write_text(json.dumps(snapshot._replace(cache=None, entries=()).as_json()))
    in_use = check_cache(manifest(tmp_path), env, NOW)[-1]
    assert in_use.state == OK and "not in use" in in_use.detail


def test_the_copies_of_a_select_entry_are_its_own_not_stale(tmp_path: Path) -> None:
    """A working select: entry's listing and the copies of the secrets it chose (named
    only inside the sealed listing, never decrypted here) are counted as the select:
    entry's, not as copies of entries no longer in the manifest."""
    text = (f"vault: https://kv.vault.azure.net\ndirectory: {tmp_path / 'out'}\nsecrets:\n"
            "  - name: db\n    path: db\n"
            "  - select: {prefix: app-}\n    directory: app\n"
            f"cache: {{directory: {tmp_path / 'cache'}, max_age: 1d}}\n")
    current = parse_manifest(text, "m.yaml", accounts=ACCOUNTS, check_filesystem=False)
    [selection] = current.selections
    chosen = [f"{selection.directory}/app-one", f"{selection.directory}/app-two"]
    seal_files(tmp_path, [current.secrets[0].key, expansion_key(selection.directory), *chosen])
    copies = check_cache(current, environ(tmp_path), NOW)[1]
    assert copies.state == OK, copies
    assert copies.detail.startswith("1 of 1 entries have a sealed copy, 1 of 1 select: "
                                    "entries a sealed listing (2 more: of the secrets the "
                                    "select: entries chose")
    assert "removed at the next start" not in copies.detail
    (tmp_path / "cache" / file_name(expansion_key(selection.directory))).unlink()
    copies = check_cache(current, environ(tmp_path), NOW)[1]
    assert copies.state == WARN and copies.detail.endswith("none yet for select prefix 'app-'")
