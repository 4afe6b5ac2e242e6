"""The packages' Azure Arc helper (packaging/kv-agent-himds): a drop-in adding the
himds group to kv-agent.service where, and only where, that group exists."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Optional

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "packaging" / "kv-agent-himds"
DROPIN = "etc/systemd/system/kv-agent.service.d/azure-arc-himds.conf"


def run(tmp_path: Path, action: str, *, has_group: bool) -> subprocess.CompletedProcess[str]:
    """Run the helper under ROOT=tmp_path with a getent that knows himds or not."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    getent = bin_dir / "getent"
    getent.write_text("#!/bin/sh\n" + (
        '[ "$1 $2" = "group himds" ] && echo himds:x:977: && exit 0\nexit 2\n' if has_group
        else "exit 2\n"))
    getent.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:/usr/bin:/bin"}
    return subprocess.run(["sh", str(SCRIPT), action, str(tmp_path / "root")], env=env,
                          capture_output=True, text=True, timeout=30, check=False)


def dropin(tmp_path: Path) -> Optional[str]:
    path = tmp_path / "root" / DROPIN
    return path.read_text() if path.exists() else None


def test_arc_server_gets_the_himds_group(tmp_path: Path) -> None:
    """Where the himds group exists, install writes SupplementaryGroups=himds (0644), and
    again idempotently; remove takes it and its directory away."""
    for _ in range(2):
        assert run(tmp_path, "install", has_group=True).returncode == 0
        text = dropin(tmp_path)
        assert text is not None and "[Service]\nSupplementaryGroups=himds\n" in text
    assert (tmp_path / "root" / DROPIN).stat().st_mode & 0o777 == 0o644
    assert run(tmp_path, "remove", has_group=True).returncode == 0
    assert dropin(tmp_path) is None
    assert not (tmp_path / "root" / DROPIN).parent.exists()


def test_other_machines_get_nothing_and_lose_a_stale_dropin(tmp_path: Path) -> None:
    """Without the group nothing is written (a missing group would stop the unit from
    starting), and a drop-in of ours from when the group existed is removed."""
    assert run(tmp_path, "install", has_group=False).returncode == 0
    assert not (tmp_path / "root" / "etc").exists()
    run(tmp_path, "install", has_group=True)
    assert dropin(tmp_path) is not None
    assert run(tmp_path, "install", has_group=False).returncode == 0
    assert dropin(tmp_path) is None


def test_an_administrators_file_is_left_alone(tmp_path: Path) -> None:
    """A file at that path without the helper's marker is neither replaced nor removed."""
    path = tmp_path / "root" / DROPIN
    path.parent.mkdir(parents=True)
    path.write_text("[Service]\nSupplementaryGroups=other\n")
    result = run(tmp_path, "install", has_group=True)
    assert result.returncode == 0 and "not ours" in result.stderr
    run(tmp_path, "remove", has_group=False)
    assert path.read_text() == "[Service]\nSupplementaryGroups=other\n"


def test_unknown_action_is_a_usage_error(tmp_path: Path) -> None:
    """Anything but install or remove prints the usage and exits 2."""
    result = run(tmp_path, "frobnicate", has_group=True)
    assert result.returncode == 2 and "usage" in result.stderr


@pytest.mark.parametrize("script, fragment", [
    ("packaging/debian/kv-agent.postinst", "sh /usr/lib/kv-agent/kv-agent-himds install"),
    ("packaging/debian/kv-agent.prerm", "sh /usr/lib/kv-agent/kv-agent-himds remove"),
    ("packaging/debian/kv-agent.install", "packaging/kv-agent-himds usr/lib/kv-agent"),
    ("packaging/rpm/kv-agent.spec", "sh %{appdir}/kv-agent-himds install"),
    ("packaging/rpm/kv-agent.spec", "sh %{appdir}/kv-agent-himds remove"),
    ("packaging/rpm/kv-agent.spec", "packaging/kv-agent-himds %{buildroot}%{appdir}/"),
])
def test_both_packages_run_the_helper(script: str, fragment: str) -> None:
    """The .deb and the .rpm install the helper and run it from their install scripts."""
    assert fragment in (REPO / script).read_text()
