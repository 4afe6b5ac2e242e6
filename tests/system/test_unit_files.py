"""The systemd files in systemd/, checked without booting anything."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest
from kvsystem import REPO, run

SYSTEMD = REPO / "systemd"
MAX_EXPOSURE = 2.5


def exposure(output: str) -> float:
    """The number in systemd-analyze security's 'Overall exposure level' line."""
    match = re.search(r"Overall exposure level for kv-agent\.service: (\d+(?:\.\d+)?)", output)
    assert match, output
    return float(match.group(1))


@pytest.fixture
def unit_root(tmp_path: Path) -> Path:
    """A root directory holding only the unit, as a package installs it."""
    unit_dir = tmp_path / "usr/lib/systemd/system"
    unit_dir.mkdir(parents=True)
    shutil.copy(SYSTEMD / "kv-agent.service", unit_dir)
    return tmp_path


def test_exposure_score_is_ok(host_tools: None, unit_root: Path) -> None:
    """systemd-analyze security rates the unit at most 2.5 ("OK")."""
    result = run(["systemd-analyze", "security", "--offline=true", f"--root={unit_root}",
                  "--no-pager", "kv-agent.service"], check=False)
    score = exposure(result.stdout)
    print(f"exposure: {score}")
    assert score <= MAX_EXPOSURE, result.stdout


def test_unit_keeps_what_the_agent_needs() -> None:
    """The hardening leaves chown, network, notify and reload in place, and the
    sealed cache its directory and host key."""
    text = (SYSTEMD / "kv-agent.service").read_text()
    settings: Dict[str, List[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    assert settings["Type"] == ["notify"]
    assert settings["RestartPreventExitStatus"] == ["78"]
    assert settings["Restart"] == ["on-failure"]
    assert "WatchdogSec" in settings and "ExecReload" in settings
    assert "kill -HUP" in settings["ExecReload"][0]
    capabilities = set(settings["CapabilityBoundingSet"][0].split())
    assert capabilities == {"CAP_CHOWN", "CAP_FOWNER", "CAP_DAC_READ_SEARCH"}
    families = set(settings["RestrictAddressFamilies"][0].split())
    assert {"AF_UNIX", "AF_INET", "AF_INET6"} <= families
    assert "User" not in settings and "PrivateNetwork" not in settings
    assert settings["RuntimeDirectoryPreserve"] == ["yes"]
    assert set(settings["RuntimeDirectory"][0].split()) == {"kv-agent", "secrets"}
    assert "network-online.target" in settings["After"][0]
    # The sealed cache (issue 20): /var/lib/kv-agent root's 0700, and the host key
    # made outside the sandbox (ProtectSystem=strict) before the agent seals; "-": a
    # failure never stops an agent without `cache:`.
    assert settings["StateDirectory"] == ["kv-agent"]
    assert settings["StateDirectoryMode"] == ["0700"]
    assert settings["ExecStartPre"] == ["+-/usr/bin/systemd-creds setup"]


def test_tmpfiles_match_the_unit() -> None:
    """tmpfiles.d creates /run/secrets and /run/kv-agent with the unit's mode."""
    lines = [line.split() for line in (SYSTEMD / "kv-agent.tmpfiles").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert sorted((f[0], f[1], f[2], f[3], f[4]) for f in lines) == [
        ("d", "/run/kv-agent", "0751", "root", "root"),
        ("d", "/run/secrets", "0751", "root", "root"),
    ]
    assert "RuntimeDirectoryMode=0751" in (SYSTEMD / "kv-agent.service").read_text()


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"),
                    reason="needs root and unshare: mounts a tmpfs on /run in a private "
                           "mount namespace")
def test_default_manifest_passes_check(tmp_path: Path) -> None:
    """`kv-agent check` accepts the default manifest as installed (root:root 0600).

    /run is not tmpfs on every build host, so the check runs in a private mount
    namespace with a tmpfs on /run, as on a booted system.
    """
    manifest = tmp_path / "manifest.yaml"
    shutil.copy(SYSTEMD / "manifest.yaml", manifest)
    manifest.chmod(0o600)
    result = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-ec",
         'mount -t tmpfs tmpfs /run && exec "$@"', "check",
         sys.executable, "-m", "agent", "check", "--manifest", str(manifest)],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert "OK: 0 secrets into /run/secrets" in result.stdout


def test_consumer_example_orders_after_the_agent() -> None:
    """The example consumer and drop-in wait for kv-agent and read /run/secrets."""
    unit = (SYSTEMD / "examples" / "kv-agent-consumer-example.service").read_text()
    assert "After=kv-agent.service" in unit and "Wants=kv-agent.service" in unit
    assert "/run/secrets/example-token" in unit
    drop_in = (SYSTEMD / "examples" / "consumer-drop-in.conf").read_text()
    assert "After=kv-agent.service" in drop_in
    assert "LoadCredential=" in drop_in


def test_emulator_unit_and_the_agents_drop_in_agree() -> None:
    """kv-agent-emulator.service serves IMDS and the vault on loopback with its CA in
    its runtime directory (not /tmp, which kv-agent's unit sees privately), and
    kv-agent's example drop-in names exactly that endpoint and CA and orders the
    agent after the emulator's READY=1."""
    unit = (SYSTEMD / "emulator" / "kv-agent-emulator.service").read_text()
    drop_in = (SYSTEMD / "emulator" / "emulator.conf").read_text()
    exec_start = " ".join(unit.split("ExecStart=", 1)[1].split("\n", 2)[:2]).replace("\\", "")
    options = dict(re.findall(r"--([a-z-]+) (\S+)", exec_start))
    assert options["host"] == "127.0.0.1" and "Type=notify\n" in unit
    assert "RuntimeDirectory=kv-agent-emulator\n" in unit
    assert options["cert-dir"] == "/run/kv-agent-emulator"
    environment = dict(line.split("=", 2)[1:] for line in drop_in.splitlines()
                       if line.startswith("Environment="))
    assert environment == {
        "KV_AGENT_IMDS_ENDPOINT": f"http://127.0.0.1:{options['imds-port']}"
                                  "/metadata/identity/oauth2/token",
        "REQUESTS_CA_BUNDLE": f"{options['cert-dir']}/ca.pem"}
    assert "PrivateTmp=yes" in (SYSTEMD / "kv-agent.service").read_text()
    assert not environment["REQUESTS_CA_BUNDLE"].startswith(("/tmp/", "/var/tmp/"))
    assert "After=kv-agent-emulator.service" in drop_in
    assert "Wants=kv-agent-emulator.service" in drop_in


def test_consumer_examples_user_commands_work_on_a_fresh_machine(tmp_path: Path) -> None:
    """The example consumer's commands that create its user run as written where
    /etc/sysusers.d does not exist yet (here under a scratch root; systemd-sysusers
    itself is not run)."""
    unit = (SYSTEMD / "examples" / "kv-agent-consumer-example.service").read_text()
    block = unit.split("To create it", 1)[1].split("\n#\n", 1)[0]
    commands = [line[1:].strip() for line in block.splitlines()[1:] if line.startswith("#   ")]
    assert commands and commands[-1] == "systemd-sysusers", commands
    script = "\n".join(commands[:-1]).replace("/etc/", f"{tmp_path}/etc/")
    done = subprocess.run(["sh", "-ec", script], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "etc/sysusers.d/kv-example.conf").read_text() == \
        'u kv-example - "kv-agent example consumer"\n'
