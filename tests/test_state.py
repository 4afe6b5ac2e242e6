"""The agent's state directory and status.json: private to root (issue 9).

status.json lists every secret's name and path, which consumers of
/run/secrets (0751: not listable) must not learn, so it is root-only; a
non-root ``kv-agent status`` says so instead of claiming "not running".
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import stat
import traceback
from pathlib import Path
from typing import Any, Dict, Iterator, Tuple

import pytest

import agent.status.render  # noqa: F401

# What `kv-agent status` imports lazily, loaded here: the child that drops to
# nobody keeps this interpreter's modules but may not read the interpreter's own
# library (e.g. a Python under /root), so a lazy import there would fail.
import agent.status.snapshot  # noqa: F401
from agent.base.errors import EXIT_NOPERM, EXIT_OK, EXIT_UNAVAILABLE, KvAgentError
from agent.cli import main
from agent.status.store import StateStore

IS_ROOT = os.geteuid() == 0
NOBODY = 65534


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.fixture
def state(shm_dir: Path) -> Path:
    """A state directory path whose parent anyone may traverse (as /run is)."""
    os.chmod(shm_dir, 0o755)
    return shm_dir / "kv-agent"


def test_new_state_is_private(state: Path) -> None:
    """prepare() creates the directory 0711 (no one else may list it, node_exporter may
    pass through to metrics/) and save() writes status.json 0600."""
    store = StateStore(str(state))
    store.prepare()
    store.save({"pid": 1})
    assert mode_of(state) == 0o711
    assert mode_of(state / "status.json") == 0o600


def test_existing_world_readable_state_is_tightened(state: Path) -> None:
    """A directory and status.json left world-readable by an older version become 0711/0600."""
    state.mkdir()
    os.chmod(state, 0o755)
    (state / "status.json").write_text('{"pid": 1}')
    os.chmod(state / "status.json", 0o644)
    StateStore(str(state)).prepare()
    assert mode_of(state) == 0o711
    assert mode_of(state / "status.json") == 0o600


def test_symlinked_status_file_is_not_followed(state: Path, shm_dir: Path) -> None:
    """Tightening never chmods through a symlink planted as status.json."""
    state.mkdir(mode=0o700)
    target = shm_dir / "elsewhere"
    target.write_text("x")
    os.chmod(target, 0o644)
    (state / "status.json").symlink_to(target)
    StateStore(str(state)).prepare()
    assert mode_of(target) == 0o644


@pytest.mark.skipif(not IS_ROOT, reason="needs root to give the directory to another user")
def test_state_directory_owned_by_another_user_is_refused(state: Path) -> None:
    """A state directory another user owns (and could loosen again) is refused."""
    state.mkdir(mode=0o700)
    os.chown(state, NOBODY, NOBODY)
    with pytest.raises(KvAgentError, match=r"owned by uid 65534"):
        StateStore(str(state)).prepare()


def _run_as_nobody(argv: Tuple[str, ...]) -> Dict[str, Any]:
    """``kv-agent`` with ``argv`` in a forked child that dropped to nobody:
    its exit code, stdout and stderr (the fork keeps this interpreter and its
    imports, which nobody may not be able to read)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                status = main(list(argv), environ={})
            os.write(write_end, json.dumps({"code": status, "stdout": out.getvalue(),
                                            "stderr": err.getvalue()}).encode())
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as reader:
        data = reader.read()
    _, wait_status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(wait_status) == 0, "the unprivileged child failed"
    return dict(json.loads(data))


@pytest.fixture
def running_status(state: Path) -> Iterator[Path]:
    """A state directory as a running agent leaves it (this process's pid)."""
    store = StateStore(str(state))
    store.prepare()
    store.save({"version": 1, "pid": os.getpid(), "state": "ready",
                "status": "1 secret current", "secrets": [
                    {"name": "db-password", "path": "/run/secrets/db", "version": "a" * 32,
                     "optional": False, "updated": "2026-11-24T14:02:11Z", "error": None}]})
    yield state


@pytest.mark.skipif(not IS_ROOT, reason="needs root to drop to another user")
@pytest.mark.parametrize("json_flag", [(), ("--json",)], ids=["human", "json"])
def test_status_as_non_root_says_permission_denied(running_status: Path,
                                                   json_flag: Tuple[str, ...]) -> None:
    """A non-root `kv-agent status` exits 77 with "permission denied: run as root",
    learns no secret name, and never claims the agent is not running."""
    result = _run_as_nobody(("status", "--state-dir", str(running_status), *json_flag))
    assert result["code"] == EXIT_NOPERM
    assert "permission denied" in result["stderr"]
    assert "run as root (sudo kv-agent status)" in result["stderr"]
    assert "not running" not in result["stdout"] + result["stderr"]
    assert "db-password" not in result["stdout"] + result["stderr"]
    # As root the same command works.
    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert main(["status", "--state-dir", str(running_status)], environ={}) == EXIT_OK
    assert "db-password" in out.getvalue()


@pytest.mark.skipif(not IS_ROOT, reason="needs root to drop to another user")
def test_status_as_non_root_without_state_is_not_running(state: Path) -> None:
    """Where no agent ever ran (no state directory), a non-root user is told "not running"."""
    result = _run_as_nobody(("status", "--state-dir", str(state)))
    assert result["code"] == EXIT_UNAVAILABLE
    assert "not running" in result["stdout"]
