"""on_change hooks: argv without a shell, debounced per hook, bounded, never fatal."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import pytest

from agent.daemon.hooks import HookRunner, hook_triggers


def test_triggers_group_paths_per_command() -> None:
    """Entries sharing a hook produce one run with all their paths; no hook, no run."""
    reload_app = ("systemctl", "reload", "app.service")
    grouped = hook_triggers([(reload_app, "/run/secrets/b"), ((), "/run/secrets/c"),
                             (reload_app, "/run/secrets/a")])
    assert grouped == {reload_app: ("/run/secrets/a", "/run/secrets/b")}


def test_hook_runs_without_a_shell_and_sees_changed_paths(tmp_path: Path) -> None:
    """The argv runs as given (no shell expansion) with KV_AGENT_CHANGED set."""
    out = tmp_path / "out"
    script = ("import os, sys; "
              "open(sys.argv[1], 'w').write(os.environ['KV_AGENT_CHANGED'] + '|' + sys.argv[2])")
    runner = HookRunner({})
    runner.trigger((sys.executable, "-c", script, str(out), "$HOME;*"), ["/run/secrets/a"])
    runner.wait(10.0)
    assert out.read_text() == "/run/secrets/a|$HOME;*"


def test_triggers_during_a_run_coalesce_into_one_more(tmp_path: Path) -> None:
    """Triggers arriving while a hook runs queue exactly one further run."""
    log = tmp_path / "log"
    script = "import sys, time; open(sys.argv[1], 'a').write('x'); time.sleep(0.3)"
    command = (sys.executable, "-c", script, str(log))
    runner = HookRunner({})
    runner.trigger(command, ["/a"])
    time.sleep(0.1)
    for path in ("/b", "/c", "/d"):
        runner.trigger(command, [path])
    runner.wait(10.0)
    assert log.read_text() == "xx"


def test_failing_hook_is_logged_not_fatal(caplog: pytest.LogCaptureFixture) -> None:
    """A non-zero exit is a warning naming the hook and status; its output is not logged."""
    runner = HookRunner({})
    with caplog.at_level(logging.INFO):
        runner.trigger((sys.executable, "-c", "print('s3' + 'cret'); raise SystemExit(3)"),
                       ["/a"])
        runner.wait(10.0)
    assert "exited with status 3" in caplog.text
    assert "s3cret" not in caplog.text


def test_missing_program_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    """A hook whose program does not exist is a warning, never an exception."""
    runner = HookRunner({})
    with caplog.at_level(logging.WARNING):
        runner.trigger(("/nonexistent/program",), ["/a"])
        runner.wait(10.0)
    assert "could not start" in caplog.text


def test_hook_timeout_kills_it(caplog: pytest.LogCaptureFixture) -> None:
    """A hook running past its timeout is killed and reported."""
    runner = HookRunner({}, timeout_s=0.3)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING):
        runner.trigger((sys.executable, "-c", "import time; time.sleep(30)"), ["/a"])
        runner.wait(10.0)
    assert time.monotonic() - started < 10
    assert "timed out" in caplog.text


def test_hook_does_not_inherit_systemd_hand_over(tmp_path: Path) -> None:
    """A hook never sees the agent's NOTIFY_SOCKET or watchdog variables."""
    out = tmp_path / "env"
    script = ("import os, sys; open(sys.argv[1], 'w').write(' '.join(sorted("
              "k for k in os.environ if k in ('NOTIFY_SOCKET', 'WATCHDOG_USEC', 'KEEP'))))")
    runner = HookRunner({"NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": "1",
                         "KEEP": "1", "PATH": "/usr/bin:/bin"})
    runner.trigger((sys.executable, "-c", script, str(out)), ["/a"])
    runner.wait(10.0)
    assert out.read_text() == "KEEP"


def test_hook_output_never_reaches_the_agents_output(capfd: pytest.CaptureFixture[str]) -> None:
    """What a hook prints on stdout or stderr is discarded: it never reaches the agent's own
    stdout or stderr (the journal), since a hook may print the secret it read."""
    runner = HookRunner({})
    # The markers are built at run time: the hook's argv (which a failure is logged with)
    # must not contain them, only its output may.
    script = ("import sys; print('hook-out-' + 's3cret'); "
              "print('hook-err-' + 's3cret', file=sys.stderr); raise SystemExit(1)")
    runner.trigger((sys.executable, "-c", script), ["/a"])
    runner.wait(10.0)
    out, err = capfd.readouterr()
    assert "hook-out-s3cret" not in out + err and "hook-err-s3cret" not in out + err
