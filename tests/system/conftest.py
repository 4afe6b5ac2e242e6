"""Fixtures for the packaging and system tests.

They need root and a Debian host: the session's first use installs the
missing host tools with apt-get (--no-install-recommends); without root or
apt the tests skip and say why. As root in CI they run.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Iterator

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import kvsystem  # noqa: E402

TIMINGS = kvsystem.TIMINGS


@pytest.fixture(scope="session")
def host_tools() -> None:
    """Installs (once) the host tools the packaging and system tests use."""
    started = time.monotonic()
    try:
        installed = kvsystem.ensure_host_tools()
    except kvsystem.Unavailable as exc:
        pytest.skip(str(exc))
    if installed:
        TIMINGS["host tools install"] = time.monotonic() - started


@pytest.fixture(scope="session")
def packages_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("packages")


@pytest.fixture(scope="session")
def built_debs(host_tools: None, packages_dir: Path) -> Dict[str, Path]:
    """The .debs built from this tree by packaging/build-deb.sh, by package name."""
    started = time.monotonic()
    paths = kvsystem.build_deb(packages_dir)
    TIMINGS["build .debs"] = time.monotonic() - started
    return paths


@pytest.fixture(scope="session")
def built_deb(built_debs: Dict[str, Path]) -> Path:
    """The agent's .deb (kv-agent)."""
    return built_debs["kv-agent"]


@pytest.fixture(scope="session")
def built_emulator_deb(built_debs: Dict[str, Path]) -> Path:
    """The emulator's .deb (kv-agent-emulator)."""
    return built_debs["kv-agent-emulator"]


@pytest.fixture(scope="session")
def built_rpms(host_tools: None, packages_dir: Path) -> Dict[str, Path]:
    """The .rpms built from this tree by packaging/build-rpm.sh, by package name."""
    started = time.monotonic()
    paths = kvsystem.build_rpm(packages_dir)
    TIMINGS["build .rpms"] = time.monotonic() - started
    return paths


@pytest.fixture(scope="session")
def built_rpm(built_rpms: Dict[str, Path]) -> Path:
    """The agent's .rpm (kv-agent)."""
    return built_rpms["kv-agent"]


@pytest.fixture(scope="session")
def built_emulator_rpm(built_rpms: Dict[str, Path]) -> Path:
    """The emulator's .rpm (kv-agent-emulator)."""
    return built_rpms["kv-agent-emulator"]


@pytest.fixture(scope="session", params=kvsystem.SUITES)
def suite(request: pytest.FixtureRequest) -> str:
    """The Debian release a system test boots: every one in kvsystem.SUITES."""
    return str(request.param)


@pytest.fixture(scope="session")
def rootfs_tar(host_tools: None, suite: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The cached root file system tar of ``suite`` (mmdebstrap on a cold cache)."""
    started = time.monotonic()
    try:
        tar = kvsystem.rootfs_tar(suite, log=tmp_path_factory.mktemp("mmdebstrap") / "log")
    except kvsystem.Unavailable as exc:
        pytest.skip(str(exc))
    TIMINGS[f"{suite}: root file system (mmdebstrap or cache)"] = time.monotonic() - started
    return tar


@pytest.fixture(scope="session")
def agent_run_available() -> bool:
    """Whether this tree's agent has the ``run`` command yet."""
    probe = subprocess.run([sys.executable, "-m", "agent", "run", "--help"],
                           cwd=kvsystem.REPO, capture_output=True, text=True, check=False)
    return probe.returncode == 0


@pytest.fixture
def needs_run(agent_run_available: bool) -> None:
    """Skips a test that starts the service while `kv-agent run` does not exist."""
    if not agent_run_available:
        pytest.skip("needs `kv-agent run` (issue 4): `kv-agent run --help` fails in this tree")


# -- ordered scenarios -----------------------------------------------------------
# Tests marked `scenario` in one module are steps of one story on one booted
# machine (one per suite): once a step fails, the later ones on that machine
# skip instead of failing for the same reason; the other suite's still run.

_FAILED_STEP: Dict[str, str] = {}


def _scenario_key(item: pytest.Item) -> str:
    callspec = getattr(item, "callspec", None)
    suite = callspec.params.get("suite", "") if callspec is not None else ""
    return f"{item.path}[{suite}]"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "scenario: an ordered step of a system test scenario")


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("scenario") is not None:
        failed = _FAILED_STEP.get(_scenario_key(item))
        if failed:
            pytest.skip(f"an earlier step failed: {failed}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if item.get_closest_marker("scenario") is not None and report.failed:
        _FAILED_STEP.setdefault(_scenario_key(item), item.name)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if TIMINGS:
        terminalreporter.section("system test timings")
        for what, seconds in TIMINGS.items():
            terminalreporter.write_line(f"{what}: {seconds:.1f} s")
