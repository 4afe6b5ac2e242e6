"""The README and the man page document every command, option and
environment variable the code has.

Issue 9, item 20: ``once --retry-for``, ``demo --directory``, the emulator's
options and ``KV_AGENT_STATE_DIR`` had drifted out of the docs. The lists here
come from the code (argparse's parser, the ``KV_AGENT_*`` names in agent/),
never from a copy, so a new option or variable fails this test until it is
documented in both places.

An option counts as documented for a command when it appears
* in the README, in a table row or paragraph that names ``kv-agent COMMAND``;
* in the man page, in the ``.SS`` subsection of COMMANDS for that command.
Options of the top-level parser (``--debug``, ``-q``, ...) belong to the
README's Commands section and the man page's OPTIONS section; a subcommand
that accepts them too needs no second mention.
"""

from __future__ import annotations

import argparse
import ast
import re
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

import pytest

from agent.cli import build_parser

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
MAN_PAGE = REPO / "packaging" / "kv-agent.8"
ENV_NAME = re.compile(r"^KV_AGENT_[A-Z0-9_]+$")
HELP = {"-h", "--help"}


# -- what the code has ----------------------------------------------------------------


def _subcommands(parser: argparse.ArgumentParser) -> Dict[str, argparse.ArgumentParser]:
    """Every subcommand's parser, by name, from argparse's subparsers action."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("build_parser() has no subcommands")


def _options(parser: argparse.ArgumentParser) -> Set[str]:
    """Every option string (``-q``, ``--quiet``, ...) the parser accepts, bar help."""
    return {option for action in parser._actions for option in action.option_strings} - HELP


def _global_options() -> Set[str]:
    return _options(build_parser())


def _command_options() -> Iterator[Tuple[str, str]]:
    """(command, option) for every option of every subcommand that is not
    also a top-level option."""
    global_options = _global_options()
    for name, sub in sorted(_subcommands(build_parser()).items()):
        for option in sorted(_options(sub) - global_options):
            yield name, option


def _environment_names() -> Set[str]:
    """Every ``KV_AGENT_*`` string literal in agent/: the variables it reads
    (and KV_AGENT_CHANGED, which it sets for hooks)."""
    names = set()
    for path in (REPO / "agent").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                    and ENV_NAME.match(node.value):
                names.add(node.value)
    return names


# -- what the docs say ------------------------------------------------------------------


def _mentions(text: str, option: str) -> bool:
    """``option`` as a whole word (``--json`` is not in ``--jsonl``)."""
    return re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text) is not None


def _readme_section(title: str) -> str:
    """The README's ``## title`` section, up to the next ``## ``."""
    text = README.read_text(encoding="utf-8")
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"README.md has no '## {title}' section"
    return match.group(1)


def _readme_blocks() -> List[str]:
    """The README as blocks: each table row, and each run of non-blank,
    non-table lines (a paragraph, or a list with its lead-in line)."""
    blocks: List[str] = []
    current: List[str] = []
    for line in README.read_text(encoding="utf-8").splitlines() + [""]:
        if line.startswith("|") or not line.strip():
            if current:
                blocks.append("\n".join(current))
                current = []
            if line.startswith("|"):
                blocks.append(line)
        else:
            current.append(line)
    return blocks


def _man_text() -> str:
    """The man page with roff escapes for hyphens and fonts undone."""
    text = MAN_PAGE.read_text(encoding="utf-8")
    return re.sub(r"\\f[BIRP]", "", text).replace("\\-", "-")


def _man_sections() -> Dict[str, str]:
    """``.SH`` sections of the man page, by title."""
    sections: Dict[str, str] = {}
    for chunk in re.split(r"^\.SH ", _man_text(), flags=re.M)[1:]:
        title, _, body = chunk.partition("\n")
        sections[title.strip().strip('"')] = body
    return sections


def _man_command(command: str) -> str:
    """The ``.SS`` subsection of COMMANDS whose title starts with ``command``."""
    commands = _man_sections().get("COMMANDS", "")
    for chunk in re.split(r"^\.SS ", commands, flags=re.M)[1:]:
        title = chunk.partition("\n")[0].strip().strip('"')
        if title.split()[0] == command:
            return chunk
    raise AssertionError(f"{MAN_PAGE.name}: no '.SS \"{command} ...\"' under COMMANDS")


# -- the tests ------------------------------------------------------------------------------


@pytest.mark.parametrize("command", sorted(_subcommands(build_parser())))
def test_every_command_is_documented(command: str) -> None:
    """Each subcommand has a README table row and a man page subsection."""
    rows = [block for block in _readme_blocks() if block.startswith(f"| `kv-agent {command}")]
    assert rows, f"README.md: no row '| `kv-agent {command} ...` |' in the commands table"
    _man_command(command)


@pytest.mark.parametrize(("command", "option"), list(_command_options()),
                         ids=[f"{c} {o}" for c, o in _command_options()])
def test_every_command_option_is_in_the_readme_and_the_man_page(command: str, option: str) -> None:
    """Each option of each subcommand appears in the README next to
    `kv-agent COMMAND` and in that command's man page subsection."""
    blocks = [block for block in _readme_blocks()
              if _mentions(block, f"kv-agent {command}") and _mentions(block, option)]
    assert blocks, (f"README.md: document `kv-agent {command} {option}` in the table row or "
                    f"a paragraph that names `kv-agent {command}`")
    assert _mentions(_man_command(command), option), (
        f"{MAN_PAGE.name}: document {option} under '.SS \"{command} ...\"'")


@pytest.mark.parametrize("option", sorted(_global_options()))
def test_every_global_option_is_in_the_readme_and_the_man_page(option: str) -> None:
    """Each top-level option appears in the README's Commands section and in
    the man page's OPTIONS section."""
    assert _mentions(_readme_section("Commands"), option), \
        f"README.md: document {option} in the Commands section"
    assert _mentions(_man_sections().get("OPTIONS", ""), option), \
        f"{MAN_PAGE.name}: document {option} under .SH OPTIONS"


@pytest.mark.parametrize("name", sorted(_environment_names()))
def test_every_environment_variable_is_in_the_readme_and_the_man_page(name: str) -> None:
    """Each KV_AGENT_* variable the code uses appears in the README and in
    the man page's ENVIRONMENT section."""
    assert _mentions(README.read_text(encoding="utf-8"), name), f"README.md: document {name}"
    assert _mentions(_man_sections().get("ENVIRONMENT", ""), name), \
        f"{MAN_PAGE.name}: document {name} under .SH ENVIRONMENT"


def test_the_lists_come_from_the_code() -> None:
    """The collected lists hold what issue 9 found undocumented, so a broken
    collector cannot pass by finding nothing."""
    pairs = set(_command_options())
    assert {("once", "--retry-for"), ("demo", "--directory"), ("status", "--state-dir"),
            ("emulator", "--latency-ms"), ("emulator", "--tls-key")} <= pairs
    assert {"KV_AGENT_STATE_DIR", "KV_AGENT_IMDS_ENDPOINT", "KV_AGENT_MANIFEST"} <= \
        _environment_names()
    assert {"--debug", "-q", "--quiet", "--version"} <= _global_options()


# -- the promises table ---------------------------------------------------------------


def _promises_section() -> str:
    text = README.read_text()
    start = text.index("## The promises, and the tests that prove them")
    return text[start:text.index("\n## ", start + 1)]


def test_every_test_the_promises_table_names_exists() -> None:
    """Each `file.py::test_name` (or `system/file.py::test_name`) the README gives as
    proof of a promise is a real test function, so the table cannot point at a test
    that was renamed or removed."""
    named = re.findall(r"`((?:system/)?test_[a-z_]+\.py)(?:::(test_[a-z0-9_]+))?",
                       _promises_section())
    assert len(named) >= 10
    for filename, function in named:
        source = REPO / "tests" / filename
        assert source.is_file(), f"README promises table: tests/{filename} does not exist"
        if function:
            assert re.search(rf"^def {function}\(", source.read_text(), re.M), (
                f"README promises table: {filename}::{function} does not exist")


def test_every_mutation_the_promises_table_names_exists() -> None:
    """The bracketed mutation names in the promises table are mutations of the check."""
    from mutations.table import MUTATIONS

    known = {mutation.name for mutation in MUTATIONS}
    named = [name.strip() for group in re.findall(r"\[([a-z0-9, -]+)\]", _promises_section())
             for name in group.split(",")]
    assert len(named) >= 8
    assert set(named) <= known, f"unknown mutations: {sorted(set(named) - known)}"


def test_the_layout_names_every_module() -> None:
    """README's Layout section names every module of the agent and of the emulator
    package, so the module map a newcomer reads is never behind the code."""
    text = README.read_text()
    layout = text[text.index("## Layout"):]
    modules = [path for path in sorted((REPO / "agent").rglob("*.py"))
               if not path.name.startswith("__")]
    missing = [str(path.relative_to(REPO)) for path in modules
               if f"`{path.name}`" not in layout]
    assert not missing, f"README.md's Layout does not name: {', '.join(missing)}"


def _exit_codes() -> Dict[str, int]:
    """Every EXIT_* constant of agent/errors.py but 2 (argparse's usage error)."""
    import agent.errors as errors

    return {name: value for name, value in vars(errors).items()
            if name.startswith("EXIT_") and isinstance(value, int) and value != 2}


@pytest.mark.parametrize("name", sorted(_exit_codes()))
def test_every_exit_code_is_in_the_readme_and_the_man_page(name: str) -> None:
    """Each exit code the code has is in the README's exit codes and the man page's EXIT
    STATUS (77, permission denied, was missing from both)."""
    code = _exit_codes()[name]
    readme = " ".join(_readme_section("Commands").split("Exit codes:", 1)[1].split())
    assert f"`{code}` " in readme, f"README.md, Exit codes: add `{code}` ({name})"
    man = " ".join(_man_sections()["EXIT STATUS"].split())
    assert re.search(rf"(?<!\d){code} ", man), f"kv-agent.8, EXIT STATUS: add {code} ({name})"
