"""The sealed cache's limits end to end (issue 20's proof): `kv-agent run` and `kv-agent
once` against the emulator, sealing with the real systemd-creds in a private mount
namespace (tests/sealing.py, through test_daemon_cache_serve's prelude; never the
machine's host key).

A copy stands in only at start, only for an outage: a running agent that loses IMDS and
the vault keeps its own files (never the cache's), `once` neither serves nor saves, a 404
is an answer, and a reload prunes the copies of the entries it dropped."""

from __future__ import annotations

import hashlib
import os
import signal
import time
from pathlib import Path
from typing import Dict, Optional, Tuple

import pytest
from daemon_harness import AgentProcess
from prometheus_client.parser import text_string_to_metric_families
from test_daemon import (  # noqa: F401 - fixtures
    Running,
    StartAgent,
    Vault,
    entry,
    manifest_text,
    read,
    replace_file,
    short_dir,
    start_agent,
    vault,
    write_file,
)
from test_daemon_cache_serve import prelude  # noqa: F401 - fixture

from agent.base.errors import EXIT_UNAVAILABLE
from agent.cache.store import file_name

pytestmark = pytest.mark.integration

AFTER = "1s"
NAMES = ("alpha", "beta")
# What only serving from the cache prints: "serving N of M from the sealed cache of",
# "served from the sealed copy of", "(from the sealed cache, ...)".
SERVING_WORDS = ("from the sealed cache", "from the sealed copy")


def fingerprint(directory: Path) -> Dict[str, Tuple[str, int, int]]:
    """Every file in ``directory``: its SHA-256, inode and mtime (ns)."""
    found = {}
    for path in sorted(directory.iterdir()):
        st = path.stat()
        found[path.name] = (hashlib.sha256(path.read_bytes()).hexdigest(), st.st_ino,
                            st.st_mtime_ns)
    return found


def metric(metrics: Path, name: str) -> Dict[str, float]:
    """The samples named ``kv_agent_<name>`` by their labels' values, as Prometheus reads
    them."""
    return {",".join(sample.labels.values()): sample.value
            for found in text_string_to_metric_families(metrics.read_text())
            for sample in found.samples if sample.name == f"kv_agent_{name}"}


def failed_refreshes(metrics: Path) -> float:
    """Refreshes that failed, whole or entry by entry (the vault down: each entry fails)."""
    if not metrics.exists():
        return 0.0
    counts = metric(metrics, "refreshes_total")
    return counts.get("failure", 0.0) + counts.get("partial", 0.0)


def cache_keys(directory: Path, **more: str) -> Dict[str, str]:
    return {"after": AFTER, "directory": str(directory), **more}


def cached(start_agent: StartAgent, vault: Vault, cache: Path,  # noqa: F811
           prelude: str, **keys: object) -> Running:  # noqa: F811
    """A daemon that fetched both secrets and sealed both copies (it runs on)."""
    run = start_agent([entry(name) for name in NAMES], prelude=prelude,
                      cache=cache_keys(cache), **keys)
    run.wait_ready()
    run.wait(lambda: cache.is_dir() and len(list(cache.iterdir())) == len(NAMES),
             "a sealed copy of each entry")
    return run


def reboot(run: Running) -> None:
    """Stop ``run`` and lose what lived on tmpfs (its files, its ledger); the cache stays."""
    run.stop()
    for path in run.directory.iterdir():
        path.unlink()


def assert_never_served(run: Running, metrics: Optional[Path] = None) -> None:
    """No line, STATUS=, status.json, `kv-agent status` or gauge says the cache serves."""
    assert not any(run.process.lines(words) for words in SERVING_WORDS), run.describe()
    assert not any("sealed cache" in status for status in run.notes.statuses())
    document = run.status_json()
    assert "cache" not in document, document
    assert not any("from_cache" in row for row in document["secrets"]), document
    shown = run.status_cli().stdout
    assert not any(words in shown for words in SERVING_WORDS), shown
    if metrics is not None:
        assert set(metric(metrics, "secret_from_cache").values()) == {0.0}


# -- a running agent never falls back to the cache ---------------------------------------


@pytest.mark.parametrize("outage", ["failing", "stopped"])
def test_a_running_agent_keeps_its_files_and_never_serves_the_cache(
        start_agent: StartAgent, vault: Vault, shm_dir: Path, tmp_path: Path,  # noqa: F811
        prelude: str, outage: str) -> None:  # noqa: F811
    """Ready from the vault, then IMDS and the vault gone (failing every request, or the
    emulator stopped) through several refreshes and a SIGHUP: alpha keeps its bytes and
    inode, beta (removed under the agent) stays missing, and nothing (log, STATUS=,
    status.json, `kv-agent status`, the gauge) says the cache serves; the copies are not
    touched."""
    values = {name: vault.put(name) for name in NAMES}
    cache, metrics = tmp_path / "cache", shm_dir / "metrics" / "kv-agent.prom"
    run = cached(start_agent, vault, cache, prelude, refresh="1s", fast_retry=True,
                 metrics=str(metrics))
    run.wait(lambda: metrics.exists() and metric(metrics, "secret_from_cache"),
             "the gauge in the metrics file")
    alpha = run.directory / "alpha"
    inode, copies = alpha.stat().st_ino, fingerprint(cache)
    if outage == "stopped":
        vault.emulator.stop()  # connections refused (and its CA file gone)
    else:
        vault.emulator.inject_fault("imds", 410, count=100_000)
        vault.emulator.inject_fault("vault", drop=True, count=100_000)
    failed = failed_refreshes(metrics)
    run.wait(lambda: failed_refreshes(metrics) > failed, "a failed refresh", timeout_s=40)
    # A file lost while ready (after the refresh in flight, which may have fetched it):
    # only the vault may write it again, never the cache.
    (run.directory / "beta").unlink()
    failed = failed_refreshes(metrics)
    run.wait(lambda: failed_refreshes(metrics) >= failed + 3, "three failed refreshes",
             timeout_s=40)
    run.process.send_signal(signal.SIGHUP)
    run.wait_ready(2)
    failed = failed_refreshes(metrics)
    run.wait(lambda: failed_refreshes(metrics) >= failed + 2,
             "two failed refreshes after the reload", timeout_s=40)
    assert read(alpha) == values["alpha"] and alpha.stat().st_ino == inode
    assert not (run.directory / "beta").exists(), "a ready agent wrote a file from the cache"
    assert_never_served(run, metrics)
    assert fingerprint(cache) == copies
    assert len(run.readies()) == 2  # the first, and the reload's
    run.stop()


# -- `kv-agent once` never uses the cache ------------------------------------------------


def once(run: Running, prelude: str, *options: str) -> Tuple[int, str]:  # noqa: F811
    """``kv-agent once`` on ``run``'s manifest, its sealer in the private namespace (were
    it to seal, never with the machine's key): (exit code, output)."""
    env = {key: value for key, value in run.env.items() if key != "NOTIFY_SOCKET"}
    process = AgentProcess(["once", "--manifest", str(run.manifest), *options], env,
                           prelude=prelude)
    try:
        code = process.wait(60)
    finally:
        process.kill()
    return code, process.stderr + process.stdout


def test_once_neither_serves_nor_saves_the_cache(
        start_agent: StartAgent, vault: Vault, tmp_path: Path,  # noqa: F811
        prelude: str) -> None:  # noqa: F811
    """With IMDS down and good copies present, `once` exits 69 and writes nothing; with
    IMDS up it writes the rotated value: either way every copy keeps its bytes, inode
    and mtime, and no copy is added."""
    values = {name: vault.put(name) for name in NAMES}
    cache = tmp_path / "cache"
    run = cached(start_agent, vault, cache, prelude, refresh="60s")
    reboot(run)
    copies = fingerprint(cache)
    vault.emulator.inject_fault("imds", 410, count=100_000)
    code, output = once(run, prelude, "--retry-for", "1")
    assert code == EXIT_UNAVAILABLE, output
    assert list(run.directory.iterdir()) == [], "once wrote a file from the cache"
    assert not any(words in output for words in SERVING_WORDS), output
    assert fingerprint(cache) == copies
    vault.emulator.clear_faults()
    values["alpha"] = vault.put("alpha")
    code, output = once(run, prelude)
    assert code == 0, output
    assert {name: read(run.directory / name) for name in NAMES} == values
    assert fingerprint(cache) == copies, "once sealed a copy"
    assert "sealed" not in output, output


# -- a 404 is an answer ------------------------------------------------------------------


def test_a_404_is_an_answer_never_hidden_by_the_cache(
        start_agent: StartAgent, vault: Vault, shm_dir: Path, tmp_path: Path,  # noqa: F811
        prelude: str) -> None:  # noqa: F811
    """alpha deleted from the vault while the agent was down: at the restart its copy is
    not served (one line names the entry and the answer), beta is fetched, and no
    READY=1 comes; status.json says why alpha is missing."""
    vault.put("alpha")
    values = {"beta": vault.put("beta")}
    cache = tmp_path / "cache"
    first = cached(start_agent, vault, cache, prelude, refresh="60s",
                   state_dir=shm_dir / "state-boot1")
    reboot(first)
    vault.emulator.delete_secret("alpha")
    second = start_agent(manifest=first.manifest, prelude=prelude, fast_retry=True,
                         state_dir=shm_dir / "state-boot2")
    alpha = str(second.directory / "alpha")
    line = f"{alpha}: not served from the sealed cache: the vault answered"
    second.wait(lambda: second.process.lines(line) or second.readies(),
                "the refusal to serve alpha logged")
    assert not second.readies(), second.describe()
    refused = second.process.lines(line)
    assert "not found" in refused[0].lower(), refused
    second.wait_content("beta", values["beta"])
    time.sleep(1.0)  # past `after` again, and a retry or two
    assert not second.readies(), second.describe()
    assert not (second.directory / "alpha").exists()
    rows = {row["name"]: row for row in second.status_json()["secrets"]}
    assert rows["alpha"]["error"] and "not found" in rows["alpha"]["error"].lower(), rows
    assert "cache" not in second.status_json()
    assert not second.process.lines("served from the sealed copy")
    second.stop()


# -- a reload prunes the copies of dropped entries ---------------------------------------


def _drop_by_sighup(run: Running, hidden: Path, text: str) -> None:
    write_file(hidden, text)  # the manifest's other name: inotify does not see it
    assert run.manifest.read_text() == text
    run.process.send_signal(signal.SIGHUP)


def _drop_by_edit(run: Running, hidden: Path, text: str) -> None:
    replace_file(run.manifest, text)  # noticed by the manifest watch alone


@pytest.mark.parametrize("how", ["sighup", "manifest-watch"])
def test_a_reload_prunes_the_copy_of_a_dropped_entry(
        start_agent: StartAgent, vault: Vault, shm_dir: Path, tmp_path: Path,  # noqa: F811
        prelude: str, how: str) -> None:  # noqa: F811
    """Both entries sealed; the manifest loses beta (SIGHUP, or an edit the watch sees):
    beta's copy leaves the cache directory, alpha's stays as it was."""
    for name in NAMES:
        vault.put(name)
    cache, directory = tmp_path / "cache", shm_dir / "out"
    hidden = tmp_path / "hidden" / "manifest.yaml"
    hidden.parent.mkdir()
    (tmp_path / "etc").mkdir(exist_ok=True)
    manifest = tmp_path / "etc" / "manifest.yaml"

    def text(names: Tuple[str, ...]) -> str:
        return manifest_text(vault.url, directory, [entry(name) for name in names],
                             refresh="60s", cache=cache_keys(cache))

    write_file(hidden, text(NAMES))
    os.link(hidden, manifest)
    run = cached(start_agent, vault, cache, prelude, manifest=manifest)
    alpha, beta = (file_name(str(directory / name)) for name in NAMES)
    kept = fingerprint(cache)[alpha]
    (_drop_by_sighup if how == "sighup" else _drop_by_edit)(run, hidden, text(("alpha",)))
    run.wait_ready(2)
    run.wait(lambda: not (cache / beta).exists(), "beta's copy removed")
    assert fingerprint(cache) == {alpha: kept}
    assert run.process.lines("sealed cache: removed 1 copies")
    reason = "SIGHUP" if how == "sighup" else "manifest changed"
    assert run.process.lines(f"reloading ({reason})")
    run.stop()

