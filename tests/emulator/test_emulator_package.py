"""The emulator as its own package (issue 10, item 4): apart from the agent in
both directions, nothing started or imported at import, its public names
where the tests and the CLI take them from."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator, Tuple

import pytest

import agent.emulator

REPO = Path(__file__).resolve().parents[2]
EMULATOR_DIR = REPO / "agent" / "emulator"
# What the emulator may take from the agent: the typed errors the CLI maps to
# exit codes (a missing cryptography is exit 69), and the package itself (the
# demo runs the agent it was installed with). Everything else it checks on its
# own: it is an oracle for the agent, not a mirror of it.
EMULATOR_MAY_IMPORT = {"agent", "agent.base.errors"}


def _imports(path: Path) -> Iterator[Tuple[int, str]]:
    """(line, module) of every import in ``path``, lazy ones included."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module


def test_emulator_imports_nothing_of_the_agent_but_its_errors() -> None:
    """No module of agent.emulator imports an agent module other than
    agent.base.errors (and the package root), so its validation stays its own."""
    offending = [f"{path.relative_to(REPO)}:{line}: {module}"
                 for path in sorted(EMULATOR_DIR.glob("*.py"))
                 for line, module in _imports(path)
                 if (module == "agent" or module.startswith("agent."))
                 and not module.startswith("agent.emulator")
                 and module not in EMULATOR_MAY_IMPORT]
    assert not offending, offending


def test_only_the_cli_imports_the_emulator() -> None:
    """The agent's modules never import agent.emulator (it may not be
    installed); only cli.py does, lazily, for `demo` and `emulator`."""
    agent = REPO / "agent"
    importers = sorted(path.relative_to(agent).as_posix() for path in agent.rglob("*.py")
                       if EMULATOR_DIR not in path.parents
                       for _line, module in _imports(path)
                       if module.startswith("agent.emulator"))
    assert set(importers) <= {"cli.py"}, importers


def test_import_starts_nothing_and_needs_no_cryptography(tmp_path: Path) -> None:
    """Importing the package and the demo loads no cryptography, starts no
    thread and creates no temporary file."""
    probe = ("import sys, threading; import agent.emulator, agent.emulator.demo; "
             "assert 'cryptography' not in sys.modules, 'cryptography imported'; "
             "assert threading.active_count() == 1, threading.enumerate()")
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True,
                          text=True, timeout=60, check=False,
                          env={**os.environ, "TMPDIR": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("name", sorted(agent.emulator.__all__))
def test_public_names_come_from_the_package(name: str) -> None:
    """Every name in agent.emulator.__all__ is importable from the package."""
    assert getattr(agent.emulator, name) is not None


def test_every_module_says_what_it_is_for() -> None:
    """Each module of the package opens with a docstring, and the package's
    docstring names every module."""
    package_doc = agent.emulator.__doc__ or ""
    for path in sorted(EMULATOR_DIR.glob("*.py")):
        assert ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))), path
        if path.stem != "__init__":
            assert f":mod:`.{path.stem}`" in package_doc, path.stem


def test_emulator_validates_names_on_its_own() -> None:
    """The emulator refuses a name Key Vault refuses with its own regex, not the
    agent's manifest parser (which it never imports)."""
    from agent.emulator import Emulator

    with pytest.raises(ValueError, match="invalid secret name"):
        Emulator({"not_valid": "x"})
    with pytest.raises(ValueError, match="invalid secret name"):
        Emulator().set_secret("a.b", "x")
