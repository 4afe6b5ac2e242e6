"""The architecture, checked rather than hoped for.

* The import contracts in ``pyproject.toml`` ([tool.importlinter]): the agent
  never imports the emulator, the writer knows no Azure, errors import nothing
  of ours, the manifest makes no network call, pipeline values do no I/O, and
  data flows one way. ``lint-imports`` runs here, so a broken contract fails
  the suite with the offending import chain in the message.
* Only ``agent/cli.py`` prints to users or ends the process: no other module
  of the agent calls ``print``, ``sys.exit``, ``exit``, ``quit`` or
  ``os._exit``, nor raises ``SystemExit`` (``__main__`` hands main()'s code on).
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Set, Tuple

import pytest

REPO = Path(__file__).resolve().parent.parent
AGENT = REPO / "agent"
EXIT_CALLS = {("sys", "exit"), ("os", "_exit")}
BARE_CALLS = {"print", "exit", "quit"}


def _lint_imports() -> str:
    """The lint-imports command of this interpreter's environment."""
    beside = Path(sys.executable).parent / "lint-imports"
    found = str(beside) if beside.exists() else shutil.which("lint-imports")
    if found is None:
        pytest.fail("lint-imports is missing: install the test extras (pip install '.[test]')")
    return found


def test_import_contracts_hold() -> None:
    """Every import contract in pyproject.toml is kept; a broken one is named with its chain."""
    done = subprocess.run([_lint_imports(), "--no-cache"], cwd=REPO, capture_output=True,
                          text=True, timeout=120, check=False,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    report = done.stdout + done.stderr
    assert done.returncode == 0, report[report.find("Broken contracts"):] or report
    assert re.search(r"Contracts: (\d+) kept, 0 broken", report), report


TOP_LEVEL = {"agent", "agent.__main__", "agent.cli"}  # the command line and the package root
MAX_MODULE_LINES = 600
MAX_CLASS_LINES = 300


def _wings() -> Set[str]:
    """The agent's subpackages, the emulator apart."""
    return {f"agent.{path.parent.name}" for path in AGENT.glob("*/__init__.py")} - \
        {"agent.emulator"}


def _contracts() -> Dict[str, Dict[str, object]]:
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in Python 3.11 and later")
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    return {c["id"]: c for c in config["tool"]["importlinter"]["contracts"]}


def test_every_module_of_the_agent_lives_in_a_wing() -> None:
    """Only the command line (cli, __main__) sits beside the wings; a new module goes into one,
    where the contracts already cover it."""
    top = {"agent" if path.name == "__init__.py" else f"agent.{path.stem}"
           for path in AGENT.glob("*.py")}
    assert top == TOP_LEVEL
    assert len(_wings()) >= 5


def test_the_layers_name_every_wing_and_the_emulator_contract_covers_them() -> None:
    """The 'wings' layers contract places every wing (and the CLI above them), and
    'agent-apart-from-emulator' forbids the emulator to each of them, so a new wing cannot
    escape either unnoticed."""
    contracts = _contracts()
    layers = contracts["wings"]["layers"]
    assert isinstance(layers, list)
    placed = {f"agent.{name.strip()}" for layer in layers for name in layer.split("|")}
    assert placed == _wings() | {"agent.cli"}
    assert set(contracts["agent-apart-from-emulator"]["source_modules"]) == _wings()  # type: ignore[arg-type]


def test_every_wing_is_shipped_by_the_wheel_the_deb_and_the_rpm() -> None:
    """Each package names the wings it installs: a new wing missing from one of them is
    an installed `kv-agent` that fails to import it (the .deb and .rpm file lists in
    tests/system/test_packages.py say so too, but only after a package build)."""
    names = {wing.split(".", 1)[1] for wing in _wings()}
    packages = re.search(r"packages = \[(.*?)\]", (REPO / "pyproject.toml").read_text(), re.S)
    assert packages is not None
    assert {f"agent.{name}" for name in names} <= set(re.findall(r'"([\w.]+)"', packages[1]))
    install = (REPO / "packaging/debian/kv-agent.install").read_text()
    assert names <= set(re.findall(r"^agent/(\w+)/\*\.py ", install, re.M)) - {"emulator"}
    loop = re.search(r"^for wing in ([\w ]+); do$", (REPO / "packaging/rpm/kv-agent.spec")
                     .read_text(), re.M)
    assert loop is not None and names <= set(loop[1].split())


def _sizes() -> Iterator[Tuple[str, int]]:
    """(module path, lines) and (module path:Class, lines) of the agent outside the emulator."""
    for path in sorted(AGENT.rglob("*.py")):
        relative = path.relative_to(REPO).as_posix()
        if relative.startswith("agent/emulator/"):
            continue
        text = path.read_text()
        yield relative, len(text.splitlines())
        for node in ast.walk(ast.parse(text, relative)):
            if isinstance(node, ast.ClassDef) and node.end_lineno is not None:
                yield f"{relative}:{node.name}", node.end_lineno - node.lineno + 1


def test_no_module_over_600_lines_and_no_class_over_300() -> None:
    """Rooms stay small enough to read whole: a module at most 600 lines, a class at most 300
    (the emulator, a test double, apart)."""
    over = []
    for name, lines in _sizes():
        limit = MAX_CLASS_LINES if ":" in name else MAX_MODULE_LINES
        if lines > limit:
            over.append(f"{name}: {lines} lines (at most {limit})")
    assert not over, "\n".join(over)


def _calls_that_print_or_exit(tree: ast.AST) -> Iterator[Tuple[int, str]]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            function = node.func
            if isinstance(function, ast.Name) and function.id in BARE_CALLS:
                yield node.lineno, f"{function.id}()"
            elif (isinstance(function, ast.Attribute) and isinstance(function.value, ast.Name)
                  and (function.value.id, function.attr) in EXIT_CALLS):
                yield node.lineno, f"{function.value.id}.{function.attr}()"
        elif isinstance(node, ast.Raise) and node.exc is not None:
            raised = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            if isinstance(raised, ast.Name) and raised.id == "SystemExit":
                yield node.lineno, "raise SystemExit"


def test_only_the_cli_prints_or_exits() -> None:
    """No module of the agent but cli.py prints or ends the process (__main__ only passes
    main()'s exit code on); the emulator package reports through callbacks the CLI gives it."""
    offenders = []
    for path in sorted(AGENT.rglob("*.py")):
        relative = path.relative_to(REPO).as_posix()
        if relative in ("agent/cli.py", "agent/__main__.py"):
            continue
        for line, what in _calls_that_print_or_exit(ast.parse(path.read_text(), relative)):
            offenders.append(f"{relative}:{line}: {what}")
    assert not offenders, "only agent/cli.py may print or exit:\n" + "\n".join(offenders)


def import_cycles(edges: Dict[str, Set[str]]) -> List[List[str]]:
    """Every group of modules that import one another in a circle (Tarjan's
    strongly connected components with more than one module), each sorted."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    cycles: List[List[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for imported in sorted(edges.get(module, ())):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            group: List[str] = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == module:
                    break
            if len(group) > 1:
                cycles.append(sorted(group))

    for module in sorted(edges):
        if module not in index:
            visit(module)
    return cycles


def test_import_cycles_are_found() -> None:
    """A circle of any length is one group; a chain or a self-import is none."""
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}) == \
        [["a", "b", "c"]]
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_no_module_of_the_agent_imports_itself_through_others() -> None:
    """No import cycle between the agent's modules, lazy imports inside functions included
    (certificates and transforms were one: TransformError and strict_base64 moved down)."""
    import grimp

    graph = grimp.build_graph("agent", cache_dir=None)
    edges = {module: set(graph.find_modules_directly_imported_by(module))
             for module in graph.modules}
    assert import_cycles(edges) == []


def test_the_drawing_of_the_house_is_the_layers_contract() -> None:
    """docs/design/architecture.md draws the wings top to bottom exactly as the 'wings'
    contract layers them, so the picture a newcomer reads is the one CI enforces."""
    text = (REPO / "docs" / "design" / "architecture.md").read_text(encoding="utf-8")
    drawing = text.split("## The wings, top to bottom", 1)[1].split("```", 2)[1]
    drawn = [line.strip() for line in drawing.splitlines() if line.strip()]
    layers = _contracts()["wings"]["layers"]
    assert isinstance(layers, list)
    assert drawn == [" | ".join(part.strip() for part in layer.split("|")) for layer in layers]


def test_no_wing_imports_one_above_it_or_beside_it() -> None:
    """Drawn from the imports themselves (grimp), the wings form no circle: every import
    between two wings goes down the layers, so the house has one direction."""
    import grimp

    graph = grimp.build_graph("agent", cache_dir=None)
    layers = _contracts()["wings"]["layers"]
    assert isinstance(layers, list)
    rank = {f"agent.{name.strip()}": depth for depth, layer in enumerate(layers)
            for name in layer.split("|")}

    def wing(module: str) -> Optional[str]:
        parts = module.split(".")
        name = ".".join(parts[:2])
        return name if name in rank else None

    upward = []
    for module in graph.modules:
        for imported in graph.find_modules_directly_imported_by(module):
            source, target = wing(module), wing(imported)
            if source and target and source != target and rank[target] <= rank[source]:
                upward.append(f"{module} -> {imported}")
    assert upward == []
