"""No value in plaintext in the cache directory, ever, crashes included (issue 20's
proof): a real `kv-agent run` against the emulator, sealing with the real systemd-creds
in a private mount namespace (tests/sealing.py, through test_daemon_cache_serve's
prelude), SIGKILLed in the middle of saving its copies, again and again.

After every step every byte of every file under the cache directory (the copies and any
temporary file a crash left) is searched for every value the vault ever held, in each
form that could carry it: see :func:`forms`."""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Iterable, List, Set

import pytest
from test_daemon import (  # noqa: F401 - fixtures
    Running,
    StartAgent,
    Vault,
    entry,
    read,
    short_dir,
    start_agent,
    vault,
)
from test_daemon_cache_serve import prelude  # noqa: F401 - fixture

from agent.cache.store import TEMP_PREFIX

pytestmark = pytest.mark.integration

NAMES = ("alpha", "beta")
PAUSE_S = 0.4  # how long a hook holds the save at its point: room for the SIGKILL
# Where a save is held and the agent killed: just before systemd-creds seals (nothing
# written yet), and with the temporary file written but not yet renamed over the copy.
SEALING, WRITTEN = "sealing", "written"


def hooks(markers: Path) -> str:
    """Prelude code that, at each point, drops a marker ``<point>-<pid>`` in ``markers``
    and pauses: it changes when the save's steps happen, never what they do."""
    return (
        "import os as _os, time as _time\n"
        "import agent.cache.seal as _seal, agent.cache.store as _store\n"
        f"_MARKERS, _PAUSE = {str(markers)!r}, {PAUSE_S!r}\n"
        "def _mark(point):\n"
        "    open(_os.path.join(_MARKERS, f'{point}-{_os.getpid()}'), 'w').close()\n"
        "    _time.sleep(_PAUSE)\n"
        "_real_seal = _seal.Sealer.seal\n"
        "def _seal_held(self, name, plaintext, not_after):\n"
        f"    _mark({SEALING!r})\n"
        "    return _real_seal(self, name, plaintext, not_after)\n"
        "_seal.Sealer.seal = _seal_held\n"
        "class _HeldOs:\n"
        "    def __getattr__(self, name):\n"
        "        return getattr(_os, name)\n"
        "    def fsync(self, fd):\n"
        "        import stat as _stat\n"
        "        if _stat.S_ISREG(_os.fstat(fd).st_mode):\n"
        f"            _mark({WRITTEN!r})\n"
        "        _os.fsync(fd)\n"
        "_store.os = _HeldOs()\n")


def forms(value: str) -> Set[bytes]:
    """What would betray ``value``: its UTF-8 bytes and each half of them, its hex
    (either case), and its base64 (standard and URL-safe) at each of the three
    alignments it could have inside a longer encoded document (the sealed document
    holds a value in base64): the characters that depend on the value alone."""
    raw = value.encode()
    found = {raw, raw[: len(raw) // 2], raw[len(raw) // 2:], raw.hex().encode(),
             raw.hex().upper().encode()}
    for offset in range(3):
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            encoded = encode(b"\0" * offset + raw + b"\0" * 2)
            found.add(encoded[4:-4])  # the first and last groups mix in other bytes
    return found


def assert_no_plaintext(cache: Path, values: Iterable[str]) -> List[str]:
    """No file under ``cache`` holds any form of any value; returns the names seen."""
    betrayals = {form for value in values for form in forms(value)}
    seen = []
    for folder, _, names in os.walk(cache):
        for name in names:
            data = Path(folder, name).read_bytes()
            seen.append(name)
            if any(form in data for form in betrayals):  # never shown: pytest would print it
                pytest.fail(f"{name} holds a value in plaintext (or half, hex or base64 of one)")
    return seen


def kill_at(run: Running, markers: Path, point: str) -> None:
    """SIGKILL ``run`` once its save is held at ``point``."""
    marker = markers / f"{point}-{run.process.pid}"
    run.wait(marker.exists, f"a save held at {point}")
    run.process.proc.kill()
    run.process.wait(10.0)


def test_no_plaintext_in_the_cache_after_writes_rotations_and_crashes(
        start_agent: StartAgent, vault: Vault, shm_dir: Path, tmp_path: Path,  # noqa: F811
        prelude: str) -> None:  # noqa: F811
    """First write, a rotation, then four restarts each SIGKILLed mid-save (before
    sealing, and with the temporary file written): the directory never holds a value,
    the temporary file a crash left holds none and is pruned at the next start, and the
    last start seals the last values."""
    cache, markers = tmp_path / "cache", tmp_path / "markers"
    markers.mkdir()
    code = prelude + hooks(markers)
    state = shm_dir / "state"
    values = {name: vault.put(name) for name in NAMES}
    run = start_agent([entry(name) for name in NAMES], refresh="1s", prelude=code,
                      state_dir=state, cache={"after": "1s", "directory": str(cache)})
    run.wait_ready()
    run.wait(lambda: len(list(cache.iterdir())) == len(NAMES), "both copies sealed")
    assert_no_plaintext(cache, vault.values)  # (1) the first write

    before = {path.name: path.read_bytes() for path in cache.iterdir()}
    values["alpha"] = vault.put("alpha")  # (2) a rotation, picked up by the timer
    run.wait_content("alpha", values["alpha"])
    run.wait(lambda: {p.name: p.read_bytes() for p in cache.iterdir()} != before,
             "alpha's copy sealed again")
    assert_no_plaintext(cache, vault.values)
    run.process.proc.kill()  # the timer's saves may be held: killed, not stopped
    run.process.wait(10.0)

    temporary = 0
    for point in (SEALING, WRITTEN, SEALING, WRITTEN):  # (3) crashes mid-save
        values = {name: vault.put(name) for name in NAMES}
        run = start_agent(manifest=run.manifest, prelude=code, state_dir=state)
        kill_at(run, markers, point)
        seen = assert_no_plaintext(cache, vault.values)
        temporary += sum(1 for name in seen if name.startswith(TEMP_PREFIX))
    assert temporary >= 2, "no crash left a temporary file: the held point was missed"

    values = {name: vault.put(name) for name in NAMES}  # (4) a clean start after them
    crashed = {path.name: path.read_bytes() for path in cache.iterdir()
               if not path.name.startswith(TEMP_PREFIX)}
    run = start_agent(manifest=run.manifest, prelude=code, state_dir=state)
    run.wait_ready()
    assert {name: read(run.directory / name) for name in NAMES} == values

    def sealed_again() -> bool:
        now = {path.name: path.read_bytes() for path in cache.iterdir()}
        return len(now) == len(NAMES) and all(now[name] != crashed.get(name) for name in now)

    run.wait(sealed_again, "the crash's temporary files pruned and both copies sealed again")
    assert_no_plaintext(cache, vault.values)
    run.stop()
