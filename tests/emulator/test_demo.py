"""``kv-agent demo``: its steps run the agent it came from, a failed step is
reported (never a traceback), and a missing ``cryptography`` is one line.

Issue 9, item 15: installed from the .deb, the demo ran its steps as
``python3 -m agent`` (which does not find /usr/lib/kv-agent), printed "ok" for
a step whose files were missing, and crashed with a KeyError (exit 70).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, List

import pytest

from agent.base.errors import EXIT_FAILURE, EXIT_UNAVAILABLE
from agent.cli import main
from agent.emulator import demo

REPO = Path(__file__).resolve().parents[2]
# Run in a child: make ``import cryptography`` fail, then run the command line.
WITHOUT_CRYPTOGRAPHY = (
    "import sys; sys.modules['cryptography'] = None; sys.modules['cryptography.x509'] = None; "
    "from agent.cli import main; sys.exit(main())")


def _lines(text: str) -> List[str]:
    return [line for line in text.splitlines() if line.strip()]


def test_a_failed_step_stops_the_demo_with_exit_1_and_no_traceback(
        shm_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """When a step's command writes no file, the demo reports that step as
    UNEXPECTED, runs no later step, prints no "ok" after it, and exits 1 without
    a traceback."""
    calls: List[List[str]] = []

    def exits_zero_and_writes_nothing(argv: List[str], **_: Any) -> "subprocess.CompletedProcess[str]":
        calls.append(list(argv))
        return subprocess.CompletedProcess(argv, 0, stdout="", stderr="")

    monkeypatch.setattr(demo.subprocess, "run", exits_zero_and_writes_nothing)

    code = main(["demo", "--directory", str(shm_dir / "demo")])

    out, err = capsys.readouterr()
    assert code == EXIT_FAILURE, out + err
    assert "Traceback" not in out + err
    assert len(calls) == 2, "the demo went on after step 2 found no files"
    after_failure = out[out.index("UNEXPECTED"):]
    assert "ok:" not in after_failure, after_failure
    assert "UNEXPECTED: 3 files written" in out
    assert "kv-agent demo: stopped: step 2" in out
    assert "kv-agent demo: done" not in out


def test_a_step_that_cannot_start_is_reported_not_raised(
        shm_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A kv-agent command that cannot be executed fails step 1 with its reason."""
    code = demo.run_demo(str(shm_dir / "demo"), say=print,
                         command=[str(shm_dir / "no-such-python")])

    out = capsys.readouterr().out
    assert code == EXIT_FAILURE
    assert "cannot start" in out and "UNEXPECTED: manifest valid" in out


def test_demo_steps_run_the_agent_package_the_demo_came_from(shm_dir: Path) -> None:
    """Started the way /usr/bin/kv-agent starts it (the package in a private
    directory put on sys.path by a launcher, run from another directory), the
    demo succeeds and every step imports that same private copy."""
    private = shm_dir / "usr-lib-kv-agent"
    shutil.copytree(REPO / "agent", private / "agent",
                    ignore=shutil.ignore_patterns("__pycache__"))
    imports = shm_dir / "imports.log"
    with open(private / "agent" / "__init__.py", "a", encoding="utf-8") as init:
        init.write("\nimport os as _os\n"
                   "with open(_os.environ['KV_DEMO_TEST_IMPORTS'], 'a') as _log:\n"
                   "    _log.write(__file__ + '\\n')\n")
    launcher = shm_dir / "kv-agent"
    launcher.write_text(f"import sys\nsys.path.insert(0, {str(private)!r})\n"
                        "from agent.cli import main\nsys.exit(main())\n")
    env = dict(os.environ, KV_DEMO_TEST_IMPORTS=str(imports))
    cwd = shm_dir / "elsewhere"
    cwd.mkdir()

    done = subprocess.run([sys.executable, str(launcher), "demo", "--directory",
                           str(shm_dir / "demo")], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=180, check=False)

    assert done.returncode == 0, done.stdout + done.stderr
    assert "kv-agent demo: done" in done.stdout
    assert "Traceback" not in done.stdout + done.stderr
    imported = _lines(imports.read_text())
    assert len(imported) == 6, imported  # the demo itself and its five steps
    assert set(imported) == {str(private / "agent" / "__init__.py")}


@pytest.mark.parametrize("argv", [["demo", "--directory", "DIR"],
                                  ["emulator", "--secrets", "SECRETS"]],
                         ids=["demo", "emulator"])
def test_missing_cryptography_is_one_line_naming_the_package_exit_69(
        shm_dir: Path, argv: List[str]) -> None:
    """Without cryptography, demo and emulator exit 69 with one error line that
    names python3-cryptography and the pip extra; demo does not suggest
    --tls-cert, an option it does not have."""
    secrets = shm_dir / "secrets.yaml"
    secrets.write_text("db-password: x\n")
    argv = [{"DIR": str(shm_dir / "demo"), "SECRETS": str(secrets)}.get(a, a) for a in argv]

    done = subprocess.run([sys.executable, "-c", WITHOUT_CRYPTOGRAPHY, *argv], cwd=REPO,
                          capture_output=True, text=True, timeout=60, check=False)

    assert done.returncode == EXIT_UNAVAILABLE, done.stdout + done.stderr
    errors = _lines(done.stderr)
    assert len(errors) == 1, done.stderr
    assert errors[0].startswith("kv-agent: error: ")
    assert "python3-cryptography" in errors[0]
    assert "pip install 'kv-agent[emulator]'" in errors[0]
    if argv[0] == "demo":
        assert "--tls" not in errors[0]
        assert not (shm_dir / "demo").exists(), "the demo set up before checking"


def _tree_without_the_emulator(root: Path) -> Path:
    """A copy of this tree's ``agent`` package without ``agent/emulator``: what
    the kv-agent package installs alone (issue 10, item 4)."""
    shutil.copytree(REPO / "agent", root / "agent",
                    ignore=shutil.ignore_patterns("emulator", "__pycache__"))
    return root


@pytest.mark.parametrize("argv", [["demo", "--directory", "DIR"],
                                  ["emulator", "--secrets", "SECRETS"]],
                         ids=["demo", "emulator"])
def test_without_the_emulator_package_one_line_names_it_exit_69(
        shm_dir: Path, tmp_path: Path, argv: List[str]) -> None:
    """From an agent installed without its emulator, demo and emulator exit 69
    with one error line naming what to install (here, outside the packages,
    pip's emulator extra), and the demo sets nothing up."""
    root = _tree_without_the_emulator(tmp_path / "installed")
    argv = [{"DIR": str(shm_dir / "demo"), "SECRETS": "/dev/null"}.get(a, a) for a in argv]

    done = subprocess.run([sys.executable, "-I", "-c", demo._ENTRY, str(root), *argv],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          check=False)

    assert done.returncode == EXIT_UNAVAILABLE, done.stdout + done.stderr
    errors = _lines(done.stderr)
    assert errors == [f"kv-agent: error: kv-agent {argv[0]} needs the emulator, which is not "
                      "installed; install it with pip install 'kv-agent[emulator]'"], done.stderr
    assert not done.stdout
    assert not (shm_dir / "demo").exists()


def test_packaged_agent_without_the_emulator_names_the_distribution_package(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Where the .deb or the .rpm installed the agent (/usr/lib/kv-agent), the
    missing emulator is named as the kv-agent-emulator package, for apt and dnf."""
    import importlib.util

    import agent.cli as cli

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *rest: None
                        if name == "agent.emulator" else real_find_spec(name, *rest))
    monkeypatch.setattr(cli, "_PACKAGED_ROOT", str(REPO))

    assert main(["demo"]) == EXIT_UNAVAILABLE

    errors = _lines(capsys.readouterr().err)
    assert len(errors) == 1, errors
    assert "apt install kv-agent-emulator" in errors[0]
    assert "dnf install kv-agent-emulator" in errors[0]
