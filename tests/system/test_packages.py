"""The .debs and the .rpms built from this tree: contents, metadata, lintian.

Each build makes two packages: kv-agent (the service, nothing of the emulator)
and kv-agent-emulator (the emulator and ``kv-agent demo``), whose file lists
are checked apart (issue 10, item 4).
"""

from __future__ import annotations

import gzip
import importlib.util
import re
import subprocess
from pathlib import Path
from typing import Dict, Iterable, List, Set

import pytest
from kvsystem import REPO, run

AGENT_MODULES = sorted(p.relative_to(REPO / "agent").as_posix()  # every wing, not the emulator
                       for p in (REPO / "agent").rglob("*.py") if p.parent.name != "emulator")
EMULATOR_MODULES = sorted(p.name for p in (REPO / "agent" / "emulator").glob("*.py"))
APP = "/usr/lib/kv-agent"


def emulator_or_demo(paths: Iterable[str]) -> List[str]:
    """The paths among ``paths`` that belong to the emulator or the demo."""
    return sorted(path for path in paths if "emulator" in path or "demo" in path)


def pyproject_version() -> str:
    match = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.MULTILINE)
    assert match
    return match.group(1)


def test_versions_agree() -> None:
    """pyproject, the agent, debian/changelog and the spec name one version."""
    version = pyproject_version()
    init = (REPO / "agent" / "__init__.py").read_text()
    assert f'__version__ = "{version}"' in init
    changelog = (REPO / "packaging" / "debian" / "changelog").read_text().splitlines()[0]
    assert changelog.startswith(f"kv-agent ({version})"), changelog
    spec = (REPO / "packaging" / "rpm" / "kv-agent.spec").read_text()
    assert re.search(rf"^Version:\s+{re.escape(version)}$", spec, re.MULTILINE)


def pyproject_maintainer() -> str:
    """'Name <email>' of pyproject.toml's first author (the packages' maintainer)."""
    import tomllib

    with open(REPO / "pyproject.toml", "rb") as handle:
        author = tomllib.load(handle)["project"]["authors"][0]
    return f"{author['name']} <{author['email']}>"


def test_maintainer_comes_from_pyproject(host_tools: None) -> None:
    """packaging/maintainer prints pyproject.toml's author, and no packaging
    file names a placeholder (example.org) maintainer or homepage."""
    assert run([str(REPO / "packaging" / "maintainer")]).stdout.strip() == pyproject_maintainer()
    for path in (REPO / "packaging").rglob("*"):
        if path.is_file() and "vendor" not in path.parts:
            assert "example.org" not in path.read_text(errors="replace"), path


# -- .deb ---------------------------------------------------------------------------


def deb_files(deb: Path) -> Dict[str, str]:
    """path -> mode string (e.g. -rw-------) for every entry in the .deb."""
    listing = run(["dpkg-deb", "-c", str(deb)]).stdout
    files = {}
    for line in listing.splitlines():
        fields = line.split(None, 5)
        path = fields[5].split(" -> ")[0].lstrip(".").rstrip("/") or "/"
        files[path] = fields[0]
    return files


def test_deb_file_list(built_deb: Path) -> None:
    """The .deb holds exactly the agent, the bundled inotify_simple, the unit,
    tmpfiles.d, the manifest, the man pages and docs; nothing in dist-packages."""
    files = deb_files(built_deb)
    regular = {path for path, mode in files.items() if mode.startswith("-")}
    expected = {
        "/usr/bin/kv-agent",
        f"{APP}/inotify_simple.py",
        f"{APP}/kv-agent-himds",  # Azure Arc's himds drop-in, run by the install scripts
        f"{APP}/kv-agent-purge-list",  # what a purge removes from /run (issue 17, item 29)
        *(f"{APP}/agent/{name}" for name in AGENT_MODULES),
        # /usr/lib, not /lib: right on Debian 12 (/usr-merged) and 13 (issue 9, item 21).
        "/usr/lib/systemd/system/kv-agent.service",
        "/usr/lib/tmpfiles.d/kv-agent.conf",
        "/etc/kv-agent/manifest.yaml",
        "/usr/share/man/man8/kv-agent.8.gz",
        "/usr/share/man/man5/kv-agent.yaml.5.gz",  # the manifest's reference (issue 18)
        "/usr/share/doc/kv-agent/README.md.gz",
        "/usr/share/doc/kv-agent/changelog.gz",
        "/usr/share/doc/kv-agent/copyright",
        "/usr/share/doc/kv-agent/examples/consumer-drop-in.conf",
        "/usr/share/doc/kv-agent/examples/kv-agent-consumer-example.service",
        "/usr/share/doc/kv-agent/examples/kv-agent-credential-example.service",
        "/usr/share/doc/kv-agent/examples/metrics-path.conf",
        "/usr/share/lintian/overrides/kv-agent",
        "/usr/share/python3/runtime.d/kv-agent.rtupdate",
    }
    assert regular == expected, (
        f"missing: {sorted(expected - regular)}; unexpected: {sorted(regular - expected)}")
    assert files["/etc/kv-agent/manifest.yaml"] == "-rw-------"
    assert files["/usr/bin/kv-agent"] == "-rwxr-xr-x"
    assert not any("dist-packages" in path or "site-packages" in path for path in files)
    assert not any(path.endswith(".pyc") for path in files)
    # Nothing at all under /lib: on Debian 13 dpkg would try to remove
    # /lib/systemd/system (the symlinked /usr/lib one) on purge.
    assert not [path for path in files if path == "/lib" or path.startswith("/lib/")]
    # The emulator and the demo are kv-agent-emulator's alone (issue 10, item 4).
    assert not emulator_or_demo(files), emulator_or_demo(files)


def test_emulator_deb_file_list(built_emulator_deb: Path) -> None:
    """kv-agent-emulator holds the emulator package (with the demo) beside the
    agent in /usr/lib/kv-agent, its service (unit, root-only secrets file) and
    kv-agent's drop-in to use it, and nothing else but its Debian docs."""
    files = deb_files(built_emulator_deb)
    regular = {path for path, mode in files.items() if mode.startswith("-")}
    expected = {
        *(f"{APP}/agent/emulator/{name}" for name in EMULATOR_MODULES),
        # The emulator as a service (issue 17, item 28).
        "/usr/lib/systemd/system/kv-agent-emulator.service",
        "/etc/kv-agent-emulator/secrets.yaml",
        "/usr/share/doc/kv-agent-emulator/examples/emulator.conf",
        "/usr/share/doc/kv-agent-emulator/changelog.gz",
        "/usr/share/doc/kv-agent-emulator/copyright",
        "/usr/share/python3/runtime.d/kv-agent-emulator.rtupdate",
    }
    assert regular == expected, (
        f"missing: {sorted(expected - regular)}; unexpected: {sorted(regular - expected)}")
    assert f"{APP}/agent/emulator/demo.py" in regular
    assert files["/etc/kv-agent-emulator/secrets.yaml"] == "-rw-------"
    assert not any(path.endswith(".pyc") for path in files)
    assert not [path for path in files if path == "/lib" or path.startswith("/lib/")]


def test_emulator_deb_metadata(built_emulator_deb: Path) -> None:
    """kv-agent-emulator depends on this very kv-agent and on Debian's
    cryptography (the emulator's test CA) and yaml; its secrets file is its one
    conffile, and its unit is installed neither enabled nor started."""
    depends = run(["dpkg-deb", "-f", str(built_emulator_deb), "Depends"]).stdout
    items = [item.strip() for item in depends.split(",")]
    assert f"kv-agent (= {pyproject_version()})" in items, depends
    assert {"python3-cryptography", "python3-yaml"} <= {item.split()[0] for item in items}
    assert run(["dpkg-deb", "-f", str(built_emulator_deb), "Architecture"]
               ).stdout.strip() == "all"
    conffiles = run(["dpkg-deb", "-I", str(built_emulator_deb), "conffiles"]).stdout.split()
    assert conffiles == ["/etc/kv-agent-emulator/secrets.yaml"]


def generated_man_page() -> str:
    """kv-agent(8) as packaging/manpage.py makes it from this tree's parser."""
    spec = importlib.util.spec_from_file_location("manpage", REPO / "packaging" / "manpage.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return str(module.build())


def test_deb_man_pages_are_the_generated_one_and_the_manifest_reference(
        built_deb: Path) -> None:
    """The .deb's kv-agent(8) is the page generated from the parser at build time, and its
    kv-agent.yaml(5) is packaging/kv-agent.yaml.5 (issue 18)."""
    tar = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(built_deb)], check=True,
                         capture_output=True).stdout
    for member, expected in (
            ("./usr/share/man/man8/kv-agent.8.gz", generated_man_page()),
            ("./usr/share/man/man5/kv-agent.yaml.5.gz",
             (REPO / "packaging" / "kv-agent.yaml.5").read_text(encoding="utf-8"))):
        page = subprocess.run(["tar", "-xOf", "-", member], input=tar, check=True,
                              capture_output=True).stdout
        assert gzip.decompress(page).decode("utf-8") == expected, member


def test_deb_metadata(built_deb: Path) -> None:
    """Depends on Debian's requests, yaml, sdnotify and cryptography (certificate
    entries), suggests (never installs) the emulator; the manifest is a conffile."""
    depends = run(["dpkg-deb", "-f", str(built_deb), "Depends"]).stdout
    names = {item.strip().split()[0] for item in depends.split(",")}
    assert {"python3-requests", "python3-yaml", "python3-sdnotify",
            "python3-cryptography"} <= names  # cryptography: certificates (issue 11)
    assert not any("inotify" in name for name in names)
    assert not run(["dpkg-deb", "-f", str(built_deb), "Recommends"]).stdout.strip()
    assert run(["dpkg-deb", "-f", str(built_deb), "Suggests"]).stdout.strip() == \
        "kv-agent-emulator"
    assert run(["dpkg-deb", "-f", str(built_deb), "Architecture"]).stdout.strip() == "all"
    control = run(["dpkg-deb", "-I", str(built_deb), "conffiles"]).stdout.split()
    assert control == ["/etc/kv-agent/manifest.yaml"]
    # The maintainer is pyproject.toml's author; no Homepage until there is a real one.
    assert run(["dpkg-deb", "-f", str(built_deb), "Maintainer"]).stdout.strip() == \
        pyproject_maintainer()
    assert not run(["dpkg-deb", "-f", str(built_deb), "Homepage"]).stdout.strip()


def test_deb_maintainer_scripts_enable_nothing(built_deb: Path, tmp_path: Path) -> None:
    """postinst reloads systemd and creates the tmpfiles, and enables or starts
    the unit only where the admin had enabled it (upgrades)."""
    run(["dpkg-deb", "-e", str(built_deb), str(tmp_path / "control")])
    postinst = (tmp_path / "control" / "postinst").read_text()
    assert "systemctl --system daemon-reload" in postinst
    assert "systemd-tmpfiles" in postinst and "kv-agent.conf" in postinst
    assert "py3compile -p kv-agent /usr/lib/kv-agent" in postinst
    # The purge removes the agent's files from /run, as prerm listed them (after the stop).
    prerm = (tmp_path / "control" / "prerm").read_text()
    assert prerm.index("deb-systemd-invoke stop") < prerm.index("kv-agent-purge-list")
    postrm = (tmp_path / "control" / "postrm").read_text()
    assert "/run/kv-agent/purge.list" in postrm and "rm -rf /run/kv-agent" in postrm
    assert "rm -rf /var/lib/kv-agent" in postrm  # the sealed cache (issue 20)
    # dh_installsystemd --no-enable: `enable` only for units that were enabled.
    lines = postinst.splitlines()
    enables = [i for i, line in enumerate(lines) if "deb-systemd-helper enable" in line]
    assert enables, postinst
    for index in enables:
        guard = [line for line in lines[:index] if line.strip().startswith("if ")][-1]
        assert "was-enabled" in guard, postinst


def test_lintian_reports_no_errors(built_debs: Dict[str, Path]) -> None:
    """lintian finds no errors (and, with the overrides, no warnings) in either .deb."""
    result = run(["lintian", "--no-tag-display-limit", *map(str, built_debs.values())],
                 check=False)
    lines = [line for line in result.stdout.splitlines() if line]
    print("lintian:", "\n".join(lines) or "clean")
    assert not [line for line in lines if line.startswith("E:")], result.stdout
    assert result.returncode == 0, result.stdout + result.stderr


# -- .rpm ---------------------------------------------------------------------------


def rpm_query(rpm: Path, *args: str) -> str:
    return run(["rpm", "-qp", *args, str(rpm)]).stdout


def test_rpm_is_noarch(built_rpm: Path) -> None:
    """noarch, pyproject's version, its author as packager, and no URL."""
    assert rpm_query(built_rpm, "--qf", "%{ARCH} %{NAME} %{VERSION}") == \
        f"noarch kv-agent {pyproject_version()}"
    assert rpm_query(built_rpm, "--qf", "%{PACKAGER}") == pyproject_maintainer()
    assert rpm_query(built_rpm, "--qf", "%{URL}") == "(none)"
    assert pyproject_maintainer() in rpm_query(built_rpm, "--changelog").splitlines()[0]


def test_rpm_file_list(built_rpm: Path) -> None:
    """The .rpm holds exactly what the .deb does, laid out for RHEL, with
    sdnotify bundled too and the manifest a 0600 %config(noreplace)."""
    listing = rpm_query(built_rpm, "--qf", "[%{FILEMODES:perms} %{FILENAMES}\n]")
    files = {line.split(" ", 1)[1]: line.split(" ", 1)[0] for line in listing.splitlines()}
    regular = {path for path, mode in files.items() if mode.startswith("-")}
    # No -VERSION: the unit, the man page and the README say /usr/share/doc/kv-agent.
    doc = "/usr/share/doc/kv-agent"
    licenses = "/usr/share/licenses/kv-agent"
    expected = {
        "/usr/bin/kv-agent",
        f"{APP}/inotify_simple.py",
        f"{APP}/kv-agent-himds",  # Azure Arc's himds drop-in, run by the install scripts
        f"{APP}/kv-agent-purge-list",  # what a purge removes from /run (issue 17, item 29)
        f"{APP}/sdnotify/__init__.py",
        *(f"{APP}/agent/{name}" for name in AGENT_MODULES),
        "/usr/lib/systemd/system/kv-agent.service",
        "/usr/lib/tmpfiles.d/kv-agent.conf",
        "/etc/kv-agent/manifest.yaml",
        "/usr/share/man/man8/kv-agent.8",
        "/usr/share/man/man5/kv-agent.yaml.5",  # the manifest's reference (issue 18)
        f"{doc}/README.md",
        f"{doc}/examples/consumer-drop-in.conf",
        f"{doc}/examples/kv-agent-consumer-example.service",
        f"{doc}/examples/kv-agent-credential-example.service",
        f"{doc}/examples/metrics-path.conf",
        f"{licenses}/inotify_simple/LICENSE",
        f"{licenses}/sdnotify/LICENSE.txt",
    }
    # The man page may be compressed by the build host's brp scripts.
    regular = {p[:-3] if p.endswith((".8.gz", ".5.gz")) else p for p in regular}
    assert regular == expected, (
        f"missing: {sorted(expected - regular)}; unexpected: {sorted(regular - expected)}")
    assert files["/etc/kv-agent/manifest.yaml"] == "-rw-------"
    assert files["/usr/bin/kv-agent"] == "-rwxr-xr-x"
    assert files["/run/secrets"] == files["/run/kv-agent"] == "drwxr-x--x"
    configs = rpm_query(built_rpm, "-c").split()
    assert configs == ["/etc/kv-agent/manifest.yaml"]
    assert not any("site-packages" in path for path in files)
    # The emulator and the demo are kv-agent-emulator's alone (issue 10, item 4).
    assert not emulator_or_demo(files), emulator_or_demo(files)


def test_emulator_rpm_file_list(built_emulator_rpm: Path) -> None:
    """kv-agent-emulator holds the emulator package (with the demo) beside the
    agent in /usr/lib/kv-agent, its service and kv-agent's drop-in to use it, as
    the .deb does, and nothing else."""
    listing = rpm_query(built_emulator_rpm, "--qf", "[%{FILEMODES:perms} %{FILENAMES}\n]")
    files = {line.split(" ", 1)[1]: line.split(" ", 1)[0] for line in listing.splitlines()}
    regular = {path for path, mode in files.items() if mode.startswith("-")}
    # Byte-code only where the build host has the Python macros (RHEL, Azure Linux).
    regular = {path for path in regular if "/__pycache__/" not in path}
    expected = {f"{APP}/agent/emulator/{name}" for name in EMULATOR_MODULES} | {
        "/usr/lib/systemd/system/kv-agent-emulator.service",
        "/etc/kv-agent-emulator/secrets.yaml",
        "/usr/share/doc/kv-agent-emulator/examples/emulator.conf"}
    assert regular == expected, (
        f"missing: {sorted(expected - regular)}; unexpected: {sorted(regular - expected)}")
    assert f"{APP}/agent/emulator/demo.py" in regular
    assert files["/etc/kv-agent-emulator/secrets.yaml"] == "-rw-------"
    assert rpm_query(built_emulator_rpm, "-c").split() == ["/etc/kv-agent-emulator/secrets.yaml"]


def test_emulator_rpm_requires(built_emulator_rpm: Path) -> None:
    """kv-agent-emulator requires this very kv-agent and the distribution's
    cryptography (the emulator's test CA) and PyYAML."""
    assert rpm_query(built_emulator_rpm, "--qf", "%{ARCH} %{NAME} %{VERSION}") == \
        f"noarch kv-agent-emulator {pyproject_version()}"
    requires = rpm_query(built_emulator_rpm, "-R").splitlines()
    release = rpm_query(built_emulator_rpm, "--qf", "%{RELEASE}")
    assert f"kv-agent = {pyproject_version()}-{release}" in requires, requires
    assert {"python3-cryptography", "python3-pyyaml"} <= {line.split()[0] for line in requires}


def test_rpm_dependencies_and_scriptlets(built_rpm: Path) -> None:
    """Requires the distribution's requests, PyYAML and cryptography (certificate
    entries), bundles the rest,
    suggests (never installs) the emulator, and presets (never force-enables)
    the unit."""
    requires: Set[str] = {line.split()[0] for line in rpm_query(built_rpm, "-R").splitlines()}
    assert {"python3", "python3-requests", "python3-pyyaml", "python3-cryptography",
            "systemd"} <= requires  # cryptography: certificates (issue 11)
    assert not any("inotify" in r or "sdnotify" in r for r in requires)
    provides = rpm_query(built_rpm, "--provides")
    assert "bundled(python3dist(inotify-simple))" in provides
    assert "bundled(python3dist(sdnotify))" in provides
    assert not rpm_query(built_rpm, "--recommends").strip()
    assert rpm_query(built_rpm, "--suggests").split() == ["kv-agent-emulator"]
    scripts = rpm_query(built_rpm, "--scripts")
    assert "%systemd" not in scripts and "%tmpfiles" not in scripts, scripts
    assert "preset" in scripts or "install-system-units" in scripts
    assert "systemd-tmpfiles --create kv-agent.conf" in scripts
    assert "enable --now" not in scripts


@pytest.mark.parametrize("module", ["inotify_simple/inotify_simple.py", "sdnotify/__init__.py"])
def test_bundled_modules_are_the_pinned_releases(module: str) -> None:
    """The vendored files are listed, with version and license, in vendor/README.md."""
    vendor = REPO / "packaging" / "vendor"
    assert (vendor / module).is_file()
    table = (vendor / "README.md").read_text()
    assert Path(module).name in table
