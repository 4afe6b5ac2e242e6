"""Shared fixtures. The network guard is installed before anything else runs.

No test may reach anything but loopback: kv_netguard blocks (and records)
every other connect or name lookup, in this process and in every kv-agent
process started by a test, and ``_no_network_escape`` fails the test that
tried.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping

import pytest

if TYPE_CHECKING:
    from agent.cache.seal import Sealer
    from agent.emulator import Emulator, IdentityConfig

NETGUARD_DIR = Path(__file__).parent / "netguard"
sys.path.insert(0, str(NETGUARD_DIR))
import kv_netguard  # noqa: E402

kv_netguard.install()


@pytest.fixture(scope="session", autouse=True)
def _guard_subprocesses(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Every child Python process loads the guard and logs to one file."""
    log = tmp_path_factory.mktemp("netguard") / "violations.log"
    log.touch()
    old_path = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(NETGUARD_DIR), old_path]))
    os.environ[kv_netguard.LOG_ENV] = str(log)
    yield log
    if old_path is None:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = old_path


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "trips_netguard: the test tries a blocked connection on purpose")


@pytest.fixture(autouse=True)
def _no_network_escape(
    request: pytest.FixtureRequest, _guard_subprocesses: Path
) -> Iterator[None]:
    """Fail any test during which a connection outside loopback was tried
    (and a test marked trips_netguard during which none was)."""
    before = _guard_subprocesses.read_text()
    kv_netguard.VIOLATIONS.clear()
    yield
    escaped = list(kv_netguard.VIOLATIONS)
    escaped += _guard_subprocesses.read_text()[len(before):].splitlines()
    kv_netguard.VIOLATIONS.clear()
    if request.node.get_closest_marker("trips_netguard"):
        if not escaped:
            pytest.fail("expected the network guard to block a connection; it did not")
    elif escaped:
        pytest.fail(f"attempted to reach beyond loopback: {escaped}")


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """Tests that run ``agent.cli.main`` in-process install a handler on the
    stream pytest captured for them; put the root logger back afterwards, so
    a later test never logs into a closed stream ("--- Logging error ---")."""
    import logging

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def shm_dir(tmp_path: Path) -> Iterator[Path]:
    """A fresh directory on tmpfs (/dev/shm), removed afterwards."""
    import shutil
    import tempfile

    if not os.path.isdir("/dev/shm"):
        pytest.skip("needs /dev/shm (a tmpfs) for the writer's tmpfs check")
    path = Path(tempfile.mkdtemp(prefix="kv-agent-test-", dir="/dev/shm"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


# -- the emulator --------------------------------------------------------------------------
#
# One definition of the loopback emulator the tests run against. A module says what its
# emulators serve by overriding ``emulator_secrets`` or ``emulator_identities`` (both
# module-scoped, like the emulator that uses them); every other module gets an empty vault
# and the default identity. agent.emulator is imported only when an emulator starts, so a
# test that checks what importing the agent loads never sees it.


@pytest.fixture(scope="module")
def emulator_secrets() -> Mapping[str, Any]:
    """The secrets a module's emulators start with (the emulator's secrets-file form)."""
    return {}


@pytest.fixture(scope="module")
def emulator_identities() -> IdentityConfig | None:
    """The identities a module's emulators serve; None is the emulator's default."""
    return None


def _started_emulator(
    secrets: Mapping[str, Any], identities: IdentityConfig | None
) -> Iterator[Emulator]:
    from agent.emulator import Emulator

    with Emulator(secrets, identities=identities) as started:
        yield started


@pytest.fixture(scope="module")
def emulator(
    emulator_secrets: Mapping[str, Any], emulator_identities: IdentityConfig | None
) -> Iterator[Emulator]:
    """One emulator shared by the module's tests: starting one per test would cost a TLS
    certificate and two servers each. A test that changes secrets other tests read, or
    injects faults it does not clear, takes ``fresh_emulator`` instead."""
    yield from _started_emulator(emulator_secrets, emulator_identities)


@pytest.fixture
def fresh_emulator(
    emulator_secrets: Mapping[str, Any], emulator_identities: IdentityConfig | None
) -> Iterator[Emulator]:
    """A new emulator for one test, serving what the module's emulator serves."""
    yield from _started_emulator(emulator_secrets, emulator_identities)


@pytest.fixture
def sealer(tmp_path: Path) -> Iterator["Sealer"]:
    """A sealer with a host key of its own (tests/sealing.py); the test fails if the
    machine's real host key was created, removed or replaced meanwhile."""
    import sealing

    sealing.skip_without_sealing()
    before = sealing.host_key_state()
    yield sealing.private_sealer(sealing.key_directory(tmp_path))
    after = sealing.host_key_state()
    assert (before is None) == (after is None), "the machine's host key was created or removed"
    if before is not None and after is not None:
        assert (before.st_ino, before.st_mtime_ns) == (after.st_ino, after.st_mtime_ns)
