"""The packages' purge of /run (packaging/kv-agent-purge-list, then the .deb's postrm
purge and the .rpm's %postun): the agent's own files go, nothing else does; and of the
sealed cache, /var/lib/kv-agent, on a purge or an erase, never on an upgrade."""

from __future__ import annotations

import json
import os
import runpy
import subprocess
from pathlib import Path
from typing import Any, Dict, List

import pytest

from agent.status.snapshot import StatusSnapshot, Written, WrittenSet

REPO = Path(__file__).resolve().parent.parent
LIST_SCRIPT = REPO / "packaging" / "kv-agent-purge-list"
POSTRM = REPO / "packaging" / "debian" / "kv-agent.postrm"
SPEC = REPO / "packaging" / "rpm" / "kv-agent.spec"


def purge_list(state: Path, manifest: Path) -> List[str]:
    namespace: Dict[str, Any] = runpy.run_path(str(LIST_SCRIPT))
    return list(namespace["purge_list"](str(state), str(manifest)))


def rpm_postun() -> str:
    """The kv-agent package's %postun body, its macros spelt out as rpm would."""
    spec = SPEC.read_text()
    body = spec.split("\n%postun\n", 1)[1].split("\n%files", 1)[0].split("\n%post ", 1)[0]
    body = body.replace("%systemd_postun_with_restart kv-agent.service\n", "")
    return body.replace("%%", "%").replace("%{appdir}", "/nonexistent/kv-agent")


def cache_of(state: Path) -> Path:
    """Where run_purge points the script's /var/lib/kv-agent (the sealed cache)."""
    return state.parent / "var-lib-kv-agent"


def run_purge(script: str, state: Path, *args: str) -> None:
    """A maintainer script with its /run/kv-agent pointed at ``state`` and its
    /var/lib/kv-agent at ``cache_of(state)``: never the machine's own."""
    text = script.replace("/run/kv-agent", str(state)).replace("/var/lib/kv-agent",
                                                               str(cache_of(state)))
    assert "/run/kv-agent" not in text and "/var/lib/kv-agent" not in text
    done = subprocess.run(["sh", "-ec", text, "script", *args], capture_output=True,
                          text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr


@pytest.fixture
def machine(tmp_path: Path) -> Dict[str, Path]:
    """An output directory with the agent's files (one plain, one a set member, one
    replaced since), an operator's file, a metrics file, and status.json recording them."""
    out = tmp_path / "secrets"
    (out / "tls").mkdir(parents=True)
    (out / "db-password").write_text("s")
    (out / "tls" / "key.pem").write_text("k")
    (out / "replaced").write_text("old")
    recorded = {name: (out / name).stat().st_ino for name in ("db-password", "tls/key.pem",
                                                              "replaced")}
    os.rename(out / "replaced", tmp_path / "kept-old")  # alive: its inode is not reused
    (out / "replaced").write_text("the operator's")
    (out / "operators-own").write_text("mine")
    old = out / ".kv-agent-set-0123456789abcdef"  # an old generation a stop left behind
    old.mkdir(mode=0o755)
    (old / "key.pem").write_text("the old key")
    state = tmp_path / "state"
    state.mkdir(mode=0o711)
    metrics = tmp_path / "node-exporter" / "kv-agent.prom"
    metrics.parent.mkdir()
    metrics.write_text("# HELP kv_agent_up 1 while kv-agent runs\nkv_agent_up 0\n")
    snapshot = StatusSnapshot(
        pid=None, phase="stopped", saved_at=None, status="", manifest=None,
        directory=str(out),
        written=tuple(Written(str(out / name), inode) for name, inode in recorded.items()),
        sets=(WrittenSet(str(out / "tls"), (str(out / "tls" / "key.pem"),)),))
    (state / "status.json").write_text(json.dumps(snapshot.as_json()))
    manifest = tmp_path / "manifest.yaml"
    manifest.write_text(f"vault: https://kv.vault.azure.net\ndirectory: {out}\n"
                        f"metrics: {metrics}\nsecrets: []\n")
    manifest.chmod(0o600)
    return {"out": out, "state": state, "manifest": manifest, "metrics": metrics}


def test_the_list_names_only_the_agents_files_and_directories(machine: Dict[str, Path]) -> None:
    """Files still the agent's (by inode) and its metrics file are listed; a replaced
    file and an operator's are not; directories come deepest first, the root last; an
    old set generation (an old key) is removed at once, as the writer's start would."""
    out = machine["out"]
    lines = purge_list(machine["state"], machine["manifest"])
    assert not (out / ".kv-agent-set-0123456789abcdef").exists()
    files = sorted(line.split("\t")[2] for line in lines if line.startswith("file\t"))
    assert files == sorted([str(out / "db-password"), str(out / "tls" / "key.pem"),
                            str(machine["metrics"])])
    directories = [line.split("\t")[2] for line in lines if line.startswith("dir\t")]
    assert directories.index(str(out / "tls")) < directories.index(str(out))
    assert "/run/secrets" in directories


@pytest.mark.parametrize("script, args", [
    (POSTRM.read_text(), ("purge",)), (rpm_postun(), ("0",))], ids=["deb-postrm", "rpm-postun"])
def test_purge_removes_the_agents_files_and_keeps_the_rest(
        machine: Dict[str, Path], script: str, args: tuple) -> None:
    """The purge removes the listed files and the emptied set directory, keeps the
    replaced and the operator's files (so the output directory stays) and removes the
    agent's state directory."""
    out, state = machine["out"], machine["state"]
    listing = "".join(f"{line}\n" for line in purge_list(state, machine["manifest"]))
    (state / "purge.list").write_text(listing)
    run_purge(script, state, *args)
    assert sorted(p.name for p in out.iterdir()) == ["operators-own", "replaced"]
    assert (out / "replaced").read_text() == "the operator's"
    assert not machine["metrics"].exists() and not state.exists()
    (out / "operators-own").unlink()
    (out / "replaced").unlink()
    state.mkdir()
    (state / "purge.list").write_text(f"dir\t-\t{out}\n")
    run_purge(script, state, *args)
    assert not out.exists(), "an empty output directory stays after a purge"


@pytest.mark.parametrize("script, args, removed", [
    (POSTRM.read_text(), ("purge",), True),
    (POSTRM.read_text(), ("remove",), False),
    (POSTRM.read_text(), ("upgrade", "0.1.0"), False),
    (rpm_postun(), ("0",), True),
    (rpm_postun(), ("1",), False),
], ids=["deb-purge", "deb-remove", "deb-upgrade", "rpm-erase", "rpm-upgrade"])
def test_the_sealed_cache_goes_with_a_purge_not_with_an_upgrade(
        tmp_path: Path, script: str, args: tuple, removed: bool) -> None:
    """The cache directory (the unit's StateDirectory=, root's 0700, copies sealed to the
    machine) is removed whole on a .deb purge or an .rpm erase; a remove or an upgrade
    keeps it, so the next start can still boot through an outage."""
    state = tmp_path / "state"
    state.mkdir(mode=0o711)
    cache = cache_of(state) / "cache"
    cache.mkdir(parents=True, mode=0o700)
    (cache / f"{'0' * 64}.sealed").write_text("Whxqht+dQJax1aZeCGLxmi...\n")
    run_purge(script, state, *args)
    assert cache_of(state).exists() is not removed
