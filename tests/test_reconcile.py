"""Reconciliation: which of the agent's files and sets go, and when (no process).

The plans are pure functions of the manifests and the ledger's records; the
:class:`Reconciler` performs them through the ledger, with real files on tmpfs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import pytest
import yaml

from agent.daemon.ledger import Ledger
from agent.daemon.reconcile import (
    Reconciler,
    RemovalPlan,
    plan_dropped,
    plan_orphans,
    plan_unselected,
)
from agent.manifest import Accounts, Manifest, parse_manifest
from agent.status.snapshot import Written, WrittenSet
from agent.writer import SET_GRACE_S, FileSpec, Writer

ROOT = "/run/secrets"
ACCOUNTS = Accounts(user=lambda name: 0, group=lambda name: 0)


def manifest(entries: Sequence[Dict[str, Any]], directory: str = ROOT) -> Manifest:
    document = {"vault": "https://kv.vault.azure.net", "directory": directory,
                "secrets": list(entries)}
    return parse_manifest(yaml.safe_dump(document), "m.yaml", accounts=ACCOUNTS,
                          check_filesystem=False)


def plain(name: str, path: Optional[str] = None, **keys: Any) -> Dict[str, Any]:
    return {"name": name, "path": path or name, **keys}


def select(prefix: str, directory: str) -> Dict[str, Any]:
    return {"select": {"prefix": prefix}, "directory": directory}


def ledger_of(paths: Sequence[str], sets: Sequence[WrittenSet] = ()) -> Ledger:
    return Ledger([Written(path, number + 1, path) for number, path in enumerate(paths)], sets)


def test_orphans_at_start_are_what_no_entry_keeps() -> None:
    """At start, a recorded set no current set has goes whole (its members with it), a
    recorded file no entry keeps goes from under its root (an old directory's own
    parent), a file that left a set still in the manifest leaves by one swap, and files
    in a select entry's directory wait for its listing."""
    current = manifest([plain("kept"), plain("db-user", "db/user", set="db"),
                        select("app-", "app")])
    ledger = ledger_of(
        [f"{ROOT}/kept", f"{ROOT}/gone", "/run/old/x", f"{ROOT}/db/user",
         f"{ROOT}/db/password", f"{ROOT}/app/app-1", f"{ROOT}/web/tls.crt",
         f"{ROOT}/web/tls.key"],
        [WrittenSet(f"{ROOT}/web", (f"{ROOT}/web/tls.crt", f"{ROOT}/web/tls.key"))])
    assert plan_orphans(current, ledger) == RemovalPlan(
        sets=((f"{ROOT}/web", ROOT),),
        files=(("/run/old/x", "/run/old"), (f"{ROOT}/gone", ROOT)),
        members=((f"{ROOT}/db", ROOT, (f"{ROOT}/db/password",)),))
    assert plan_orphans(current, ledger_of([f"{ROOT}/kept"])) == RemovalPlan()


def test_a_reload_drops_what_the_new_manifest_lacks() -> None:
    """After a reload: the old manifest's dropped sets, its dropped entries' files (from
    under the old directory), the recorded files of a select entry it dropped, and files
    that left a set still in the new manifest (by one swap); never a kept path, nor a
    member of a dropped set again (the ledger forgets those with their set)."""
    old = manifest([plain("kept"), plain("gone"), plain("db-user", "db/user", set="db"),
                    plain("db-password", "db/password", set="db"),
                    {"name": "web", "certificate": {"cert": "web/tls.crt"}},
                    select("app-", "app")])
    new = manifest([plain("kept"), plain("db-user", "db/user", set="db")])
    web = WrittenSet(f"{ROOT}/web", (f"{ROOT}/web/tls.crt",))
    ledger = ledger_of([f"{ROOT}/kept", f"{ROOT}/gone", f"{ROOT}/app/app-1",
                        f"{ROOT}/app/app-2", f"{ROOT}/web/tls.crt"], [web])
    assert plan_dropped(old, new, ledger) == RemovalPlan(
        sets=((f"{ROOT}/web", ROOT),),
        files=((f"{ROOT}/app/app-1", ROOT), (f"{ROOT}/app/app-2", ROOT),
               (f"{ROOT}/gone", ROOT)),
        members=((f"{ROOT}/db", ROOT, (f"{ROOT}/db/password",)),))
    assert plan_dropped(new, new, ledger) == RemovalPlan()


def test_a_listing_removes_only_what_its_selection_no_longer_covers() -> None:
    """Files recorded in a select entry's directory that its successful listing no
    longer covers go; files of other directories and covered ones stay."""
    ledger = ledger_of([f"{ROOT}/app/app-1", f"{ROOT}/app/app-2", f"{ROOT}/app/sub/x",
                        f"{ROOT}/other"])
    assert plan_unselected([(f"{ROOT}/app", (f"{ROOT}/app/app-1",))], ledger) == \
        (f"{ROOT}/app/app-2",)
    assert plan_unselected([], ledger) == ()


def _write(root: Path, relative: str) -> str:
    path = root / relative
    Writer(str(root)).apply(FileSpec(str(path), b"x", os.geteuid(), os.getegid(), 0o440))
    return str(path)


def test_removals_wait_for_the_refresh_and_take_the_emptied_directories(
        shm_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Removing entries a reload dropped waits while a refresh runs; then it removes
    their files and the directories that became empty (deepest first), but never a
    non-empty one, one the operator gave another mode, or the root."""
    caplog.set_level("INFO")
    entries = [plain("keep"), plain("cert", "tls/cert"), plain("key", "tls/key"),
               plain("deep", "a/b/c/deep"), plain("shared", "mixed/shared"),
               plain("own", "custom/own")]
    (shm_dir / "custom").mkdir()
    os.chmod(shm_dir / "custom", 0o750)  # the operator's own directory
    reconciler = Reconciler(lambda: 0.0, lambda: None)
    for entry in entries:
        reconciler.ledger.record(_write(shm_dir, entry["path"]), entry["path"])
    (shm_dir / "mixed" / "operator-file").write_text("not kv-agent's")
    old, new = manifest(entries, str(shm_dir)), manifest(entries[:1], str(shm_dir))
    reconciler.dropped(old, new, is_refreshing=True)
    assert (shm_dir / "tls" / "cert").exists()
    reconciler.remove_pending(is_refreshing=False)
    assert sorted(p.name for p in shm_dir.iterdir()) == ["custom", "keep", "mixed"]
    assert os.listdir(shm_dir / "mixed") == ["operator-file"]
    assert os.listdir(shm_dir / "custom") == []
    assert f"removed {shm_dir / 'tls'}:" in caplog.text
    assert f"removed {shm_dir / 'a'}:" in caplog.text
    assert [record.path for record in reconciler.ledger.records()] == [str(shm_dir / "keep")]


def test_the_grace_timer_exists_only_while_a_generation_is_pending(shm_dir: Path) -> None:
    """With an injected monotonic clock: no retire deadline while nothing is pending (an
    idle agent has no timer); after a swap one deadline at the end of the grace, which
    removes the old generation and then disappears. Whether a refresh runs is not among
    its inputs (the writers' retire lock makes retiring safe beside one)."""
    now = [100.0]
    woken: List[bool] = []
    reconciler = Reconciler(lambda: now[0], lambda: woken.append(True))
    writer = reconciler.writer(str(shm_dir))
    assert reconciler.writer(str(shm_dir)) is writer and reconciler.has_writer(str(shm_dir))
    directory = shm_dir / "web"
    writer.apply_set(str(directory), [FileSpec(str(directory / "k"), b"1",
                                               os.geteuid(), os.getegid(), 0o400)])
    assert reconciler.retire_deadline() is None  # a new set: no old generation
    writer.apply_set(str(directory), [FileSpec(str(directory / "k"), b"2",
                                               os.geteuid(), os.getegid(), 0o400)])
    assert woken  # the swap woke the loop to set its timer
    assert reconciler.retire_deadline() == now[0] + SET_GRACE_S
    now[0] += SET_GRACE_S - 0.1
    reconciler.retire_due()
    assert len(_reserved(shm_dir)) == 1
    now[0] += 0.1
    reconciler.retire_due()
    assert _reserved(shm_dir) == [] and reconciler.retire_deadline() is None


def _reserved(directory: Path) -> List[str]:
    return sorted(n for n in os.listdir(directory) if n.startswith(".kv-agent-set-"))
