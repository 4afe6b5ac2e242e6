"""`kv-agent doctor` on a manifest with `cache:`, the whole command (diagnose(), the
checklist, the exit code) against the emulator (issue 20's proof): beside a daemon that
serves from its sealed copies it says the cache is in use, for which entries and why;
before any copy it warns; a cache directory open to others fails with the fix. Exit codes
as docs/how-to/doctor.md gives them: 0 with warnings only, 1 when a check failed. It never
shows a value, and never runs systemd-creds with the machine's key (the prelude's sealer
is the private namespace's; the ``sealer`` fixture checks the host key untouched)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest
import secrecy
from daemon_harness import AgentProcess
from test_daemon import (  # noqa: F401 - fixtures
    Running,
    StartAgent,
    Vault,
    entry,
    manifest_text,
    short_dir,
    start_agent,
    vault,
    write_file,
)
from test_daemon_cache_serve import prelude  # noqa: F401 - fixture
from test_doctor import fake_systemctl

from agent.base.errors import EXIT_FAILURE, EXIT_OK
from agent.cache.seal import Sealer

pytestmark = pytest.mark.integration

NAMES = ("alpha", "beta")


class Doctored:
    """One `kv-agent doctor` run: exit code, checklist and checks (from --json)."""

    def __init__(self, code: int, text: str, checks: List[Dict[str, Any]]) -> None:
        self.code, self.text, self.checks = code, text, checks

    def cache(self) -> Dict[str, Tuple[str, str, Any]]:
        """The cache's checks: name -> (state, detail, fix)."""
        return {check["check"]: (check["state"], check["detail"], check["fix"])
                for check in self.checks if check["subject"].startswith("cache ")}


def doctor(vault: Vault, manifest: Path, state_dir: Path, prelude: str,  # noqa: F811
           bin_dir: Path) -> Doctored:
    """`kv-agent doctor` (checklist, then --json) as the agent runs: the emulator's
    endpoints, the agent's state directory, a systemctl that knows no unit."""
    env = {key: value for key, value in os.environ.items()
           if "proxy" not in key.lower() and key not in ("KV_AGENT_MANIFEST", "NOTIFY_SOCKET")}
    env.update(KV_AGENT_IMDS_ENDPOINT=vault.emulator.imds_endpoint,
               REQUESTS_CA_BUNDLE=vault.emulator.ca_path, KV_AGENT_STATE_DIR=str(state_dir),
               PATH=f"{bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}",
               PYTHONIOENCODING="utf-8")
    processes = [AgentProcess(["doctor", "--manifest", str(manifest), "--no-unit-env",
                               *options], env, prelude=prelude)
                 for options in ((), ("--json",))]  # both at once: each waits on IMDS
    outputs = []
    for process in processes:
        try:
            code = process.wait(60)
        finally:
            process.kill()
        secrecy.assert_no_leak(process.stdout + process.stderr, vault.values, vault.tokens())
        assert process.stderr == "", process.stderr
        outputs.append((code, process.stdout))
    (code, text), (json_code, listing) = outputs
    assert code == json_code, (text, listing)
    return Doctored(code, text, json.loads(listing))


@pytest.fixture
def bin_dir(tmp_path: Path) -> Path:
    fake_systemctl(tmp_path / "bin", None)  # no kv-agent.service: a warning, the same here
    return tmp_path / "bin"


def cache_manifest(vault: Vault, tmp_path: Path, shm_dir: Path,  # noqa: F811
                   cache: Path) -> Path:
    manifest = tmp_path / "doctor.yaml"
    write_file(manifest, manifest_text(vault.url, shm_dir / "out",
                                       [entry(name) for name in NAMES], refresh="60s",
                                       cache={"after": "1s", "directory": str(cache)}))
    return manifest


def test_doctor_says_the_cache_is_in_use_which_entries_and_why(
        start_agent: StartAgent, vault: Vault, shm_dir: Path, tmp_path: Path,  # noqa: F811
        prelude: str, bin_dir: Path, sealer: Sealer) -> None:  # noqa: F811
    """A daemon rebooted with IMDS down serves both copies: doctor fails the identity
    (exit 1), counts the two copies, and says the cache is in use, for alpha and beta,
    with the agent's serving line and the fix; once IMDS is back and the vault took
    over, the cache is not in use and doctor exits 0."""
    for name in NAMES:
        vault.put(name)
    cache = tmp_path / "cache"
    first = start_agent([entry(name) for name in NAMES], refresh="2s", prelude=prelude,
                        state_dir=shm_dir / "state-boot1",
                        cache={"after": "1s", "directory": str(cache)})
    first.wait_ready()
    first.wait(lambda: cache.is_dir() and len(list(cache.iterdir())) == 2, "two copies")
    first.stop()
    shutil.rmtree(first.directory)
    vault.emulator.inject_fault("imds", 410, count=100_000)
    second = start_agent(manifest=first.manifest, prelude=prelude, fast_retry=True,
                         state_dir=shm_dir / "state-boot2")
    serving = second.wait_ready().fields["STATUS"].split(";")[0]
    assert serving.startswith("serving 2 of 2 from the sealed cache of "), serving

    done = doctor(vault, first.manifest, second.state_dir, prelude, bin_dir)
    assert done.code == EXIT_FAILURE, done.text
    assert "✗ identity" in done.text, done.text
    checks = done.cache()
    assert checks["directory"][0] == "ok"
    assert checks["copies"][:2] == ("ok", checks["copies"][1])
    assert checks["copies"][1].startswith("2 of 2 entries have a sealed copy"), checks
    state, detail, fix = checks["in use"]
    assert state == "warn" and detail == f"{serving}; served from it: alpha, beta", checks
    assert "first good refresh replaces every served file" in fix
    assert f"! cache {cache}, in use: {serving}; served from it: alpha, beta" in done.text

    vault.emulator.clear_faults()
    second.wait_status_json(lambda d: "cache" not in d, "the vault took over")
    done = doctor(vault, first.manifest, second.state_dir, prelude, bin_dir)
    assert done.code == EXIT_OK, done.text
    assert done.cache()["in use"][:2] == (
        "ok", "not in use: the agent's files come from the vault")
    second.stop()


def test_doctor_warns_before_the_first_copy(
        vault: Vault, shm_dir: Path, tmp_path: Path, prelude: str,  # noqa: F811
        bin_dir: Path, sealer: Sealer) -> None:
    """No cache directory yet, then an empty one: warnings with what to do, exit 0 (the
    vault answers, so nothing fails), and no agent ran: the cache is not in use."""
    for name in NAMES:
        vault.put(name)
    cache = tmp_path / "cache"
    manifest = cache_manifest(vault, tmp_path, shm_dir, cache)
    (shm_dir / "state").mkdir()
    done = doctor(vault, manifest, shm_dir / "state", prelude, bin_dir)
    assert done.code == EXIT_OK, done.text
    state, detail, fix = done.cache()["directory"]
    assert (state, detail.split(":")[0]) == ("warn", "not created yet"), done.text
    assert "vault reachable" in fix
    assert done.cache()["in use"][0] == "ok" and "no agent ran here" in done.cache()["in use"][1]
    assert f"! cache {cache}, directory: not created yet" in done.text
    cache.mkdir(mode=0o700)
    done = doctor(vault, manifest, shm_dir / "state", prelude, bin_dir)
    assert done.code == EXIT_OK, done.text
    state, detail, fix = done.cache()["copies"]
    assert (state, detail) == ("warn", "0 of 2 entries have a sealed copy"), done.text
    assert "start it with the vault reachable" in fix


def test_doctor_fails_a_cache_directory_open_to_others_with_the_fix(
        vault: Vault, shm_dir: Path, tmp_path: Path, prelude: str,  # noqa: F811
        bin_dir: Path, sealer: Sealer) -> None:
    """A cache directory of mode 0755: the directory check fails naming the mode, with
    the chmod that fixes it; exit 1."""
    vault.put("alpha")
    vault.put("beta")
    cache = tmp_path / "cache"
    cache.mkdir()
    os.chmod(cache, 0o755)
    manifest = cache_manifest(vault, tmp_path, shm_dir, cache)
    (shm_dir / "state").mkdir()
    done = doctor(vault, manifest, shm_dir / "state", prelude, bin_dir)
    assert done.code == EXIT_FAILURE, done.text
    state, detail, fix = done.cache()["directory"]
    assert state == "fail" and "open to group or others (mode 0755)" in detail, done.text
    assert fix == f"chown root:root {cache} && chmod 0700 {cache}"
    assert f"✗ cache {cache}, directory: " in done.text
    assert f"    fix: chown root:root {cache} && chmod 0700 {cache}" in done.text
    assert [line for line in done.text.splitlines() if line.startswith("✗")] == [
        f"✗ cache {cache}, directory: {detail}"], done.text
