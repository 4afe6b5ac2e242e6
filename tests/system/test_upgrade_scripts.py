"""The packages' maintainer scripts keep the upgrade contract (docs/design/upgrades.md):
on upgrade and downgrade the agent is never stopped before the new files are in place and
is restarted exactly once, after them; on removal it is stopped (and on erase disabled).

The scripts are taken from the built packages as they would run (the .deb's control
scripts with debhelper's parts; the .rpm's scriptlets as `rpm -qp --scripts` prints them,
its systemd macros expanded) and run on the host in the order dpkg and rpm run them, with
systemctl, deb-systemd-invoke, deb-systemd-helper and the other tools they call replaced
by stubs that only log their arguments, and every path they could touch pointed into a
scratch directory. test_nspawn_upgrade.py proves the same for the .deb in a booted
Debian 12 and 13; no RPM system (RHEL 9, Azure Linux) is reachable here, so for the .rpm
this, with its file flags, is the proof.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
from pathlib import Path
from typing import Dict, List, Sequence

import pytest
from kvsystem import REPO, run

# Tools the scripts call, stubbed: each logs "NAME ARGS" and succeeds, but answers "no"
# to deb-systemd-helper's questions (not installed, not enabled before).
STUBBED = ("systemctl", "deb-systemd-invoke", "deb-systemd-helper", "systemd-tmpfiles",
           "py3clean", "py3compile", "pypy3compile", "dpkg")
STUB = """\
#!/bin/sh
echo "$(basename "$0") $*" >>"{log}"
case "$(basename "$0") $1" in
    "deb-systemd-helper debian-installed"|"deb-systemd-helper was-enabled") exit 1 ;;
esac
exit 0
"""
# The paths the scripts act on, each pointed into the scratch directory.
REDIRECTED = ("/run/systemd/system", "/usr/lib/kv-agent", "/run/kv-agent", "/var/lib/kv-agent")
# The shipped default manifest (systemd/manifest.yaml): the package's conffile. dpkg
# prompts at an upgrade for a conffile both edited on the machine and changed in the
# package, and every machine edits its manifest: so the shipped one never changes.
SHIPPED_MANIFEST_SHA256 = "4a76d54ead182f42dff16dbdf2b0d9a721d6a202dc1ec72c6ff30c24b399d33e"


class Scripts:
    """A package's scripts by name, runnable with stubs in a scratch directory."""

    def __init__(self, texts: Dict[str, str], scratch: Path) -> None:
        self.scratch = scratch
        self.log = scratch / "calls.log"
        stubs = scratch / "bin"
        stubs.mkdir(parents=True)
        for name in STUBBED:
            (stubs / name).write_text(STUB.format(log=self.log))
            (stubs / name).chmod(0o755)
        (scratch / "run-systemd-system").mkdir()  # a booted systemd, as far as they can tell
        self.path = f"{stubs}:/usr/bin:/bin"
        self.texts = {name: self._redirect(text) for name, text in texts.items()}

    def _redirect(self, text: str) -> str:
        for path in REDIRECTED:
            text = text.replace(path, str(self.scratch / path.strip("/").replace("/", "-")))
        assert not [path for path in REDIRECTED if path in text]
        return text

    def run(self, steps: Sequence[Sequence[str]]) -> List[str]:
        """Run each (script, args...) in order, as the package manager would; the stubs'
        log, one call a line."""
        self.log.write_text("")
        for name, *args in steps:
            if name not in self.texts:
                continue  # a package without that script
            done = subprocess.run(["sh", "-c", self.texts[name], name, *args],
                                  capture_output=True, text=True, timeout=30, check=False,
                                  env={"PATH": self.path, "LANG": "C.UTF-8"})
            assert done.returncode == 0, f"{name} {args}: {done.stderr}"
        return self.log.read_text().splitlines()


def lifecycle(calls: List[str]) -> List[str]:
    """The calls that start, stop or restart the agent, or enable or disable it."""
    verbs = ("start", "stop", "restart", "try-restart", "enable", "disable", "preset", "kill")
    return [call for call in calls if any(f" {verb} " in f" {call} " for verb in verbs)
            and not call.startswith("deb-systemd-helper update-state")]


# -- the .deb --------------------------------------------------------------------------


@pytest.fixture
def deb_scripts(built_deb: Path, tmp_path: Path) -> Scripts:
    control = tmp_path / "control"
    run(["dpkg-deb", "-e", str(built_deb), str(control)])
    texts = {path.name: path.read_text() for path in control.iterdir()
             if path.name in ("preinst", "postinst", "prerm", "postrm")}
    return Scripts(texts, tmp_path / "scratch")


def test_deb_upgrade_restarts_once_after_the_unpack_and_never_stops_before(
        deb_scripts: Scripts) -> None:
    """An upgrade (or a downgrade: the same calls) runs the old prerm and postrm with
    `upgrade` and the new postinst with `configure OLD`: the only call that touches the
    running agent is one restart, in postinst, after dpkg unpacked the new files."""
    calls = deb_scripts.run([("prerm", "upgrade", "0.1.0"), ("preinst", "upgrade", "0.0.9"),
                             ("postrm", "upgrade", "0.1.0"), ("postinst", "configure", "0.0.9")])
    assert lifecycle(calls) == ["deb-systemd-invoke restart kv-agent.service"], calls
    before_unpack = deb_scripts.run([("prerm", "upgrade", "0.1.0"),
                                     ("preinst", "upgrade", "0.0.9")])
    assert lifecycle(before_unpack) == [], before_unpack


def test_deb_install_neither_enables_nor_starts_and_removal_stops(deb_scripts: Scripts) -> None:
    """A first install asks deb-systemd-invoke to start a unit that is not enabled (it
    starts nothing then), enables nothing; a removal stops the agent in prerm, and a purge
    drops debhelper's state of the unit."""
    installed = deb_scripts.run([("preinst", "install"), ("postinst", "configure", "")])
    assert lifecycle(installed) == ["deb-systemd-invoke start kv-agent.service"], installed
    removed = deb_scripts.run([("prerm", "remove"), ("postrm", "remove"), ("postrm", "purge")])
    assert lifecycle(removed) == ["deb-systemd-invoke stop kv-agent.service"], removed
    assert "deb-systemd-helper purge kv-agent.service" in removed


# -- the .rpm --------------------------------------------------------------------------


def rpm_scriptlets(rpm: Path) -> Dict[str, str]:
    """`rpm -qp --scripts`: scriptlet name ("postinstall", ...) -> its shell text."""
    text = run(["rpm", "-qp", "--scripts", str(rpm)]).stdout
    parts = re.split(r"^(\w+) scriptlet \(using /bin/sh\):$", text, flags=re.MULTILINE)
    return dict(zip(parts[1::2], parts[2::2]))


@pytest.fixture
def rpm_scripts(built_rpm: Path, tmp_path: Path) -> Scripts:
    return Scripts(rpm_scriptlets(built_rpm), tmp_path / "scratch")


def test_rpm_upgrade_restarts_once_after_the_old_files_go(rpm_scripts: Scripts) -> None:
    """An upgrade (or `--oldpackage` downgrade) runs the new %post with 2, then the old
    %preun and %postun with 1: no stop and no disable, one try-restart in %postun, once the
    old package's files are gone."""
    calls = rpm_scripts.run([("postinstall", "2"), ("preuninstall", "1"),
                             ("postuninstall", "1")])
    assert lifecycle(calls) == ["systemctl try-restart kv-agent.service"], calls
    before = rpm_scripts.run([("postinstall", "2"), ("preuninstall", "1")])
    assert lifecycle(before) == [], before


def test_rpm_install_presets_and_erase_stops_and_disables(rpm_scripts: Scripts) -> None:
    """A first install applies the preset (disabled unless the site enables it) and starts
    nothing; an erase stops and disables the agent in %preun, before its files go."""
    installed = rpm_scripts.run([("postinstall", "1")])
    assert lifecycle(installed) == ["systemctl --no-reload preset kv-agent.service"], installed
    erased = rpm_scripts.run([("preuninstall", "0"), ("postuninstall", "0")])
    assert lifecycle(erased) == ["systemctl --no-reload disable --now kv-agent.service"], erased


def test_rpm_manifest_is_a_noreplace_config_file(built_rpm: Path) -> None:
    """The manifest is %config(noreplace): an upgrade never overwrites an edited one (a
    changed shipped one would go beside it as .rpmnew), and never asks."""
    flags = run(["rpm", "-qp", "--qf", "[%{FILENAMES} %{FILEFLAGS:fflags}\n]",
                 str(built_rpm)]).stdout
    assert "/etc/kv-agent/manifest.yaml cn\n" in flags, flags


# -- the conffile ------------------------------------------------------------------------


def test_the_shipped_manifest_never_changes_so_upgrades_never_prompt() -> None:
    """The default manifest the packages ship is the one every release shipped: changing
    it would make dpkg ask, at the next upgrade, on every machine whose manifest was edited
    (all of them). To show a new default, ship it as an example instead."""
    shipped = hashlib.sha256((REPO / "systemd" / "manifest.yaml").read_bytes()).hexdigest()
    assert shipped == SHIPPED_MANIFEST_SHA256, (
        "systemd/manifest.yaml changed: an upgrade would prompt for the conffile on every "
        "machine that edited its manifest; see docs/design/upgrades.md")
