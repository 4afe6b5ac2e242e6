"""Global options (--debug, -q/--quiet) work before and after the subcommand (issue 9)."""

from __future__ import annotations

import contextlib
import io
import logging
from typing import Iterator, List, Tuple

import pytest

from agent.cli import build_parser, main

# Each subcommand with the least it needs to parse.
COMMANDS: List[Tuple[str, ...]] = [("once",), ("check",), ("run",), ("status",), ("doctor",),
                                   ("emulator", "--secrets", "s.yaml"), ("demo",),
                                   ("import", "vm-extension", "settings.json")]
OPTIONS = {"--debug": "debug", "-q": "quiet", "--quiet": "quiet"}


def test_every_subcommand_is_covered() -> None:
    """The table above names every subcommand the parser has."""
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command")
    assert sorted(subparsers.choices) == sorted(c[0] for c in COMMANDS)  # type: ignore[arg-type]


@pytest.mark.parametrize("command", COMMANDS, ids=[c[0] for c in COMMANDS])
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("where", ["before", "after"])
def test_global_option_in_either_position(command: Tuple[str, ...], option: str,
                                          where: str) -> None:
    """`kv-agent --debug check` and `kv-agent check --debug` mean the same."""
    argv = [option, *command] if where == "before" else [*command, option]
    args = build_parser().parse_args(argv)
    assert getattr(args, OPTIONS[option]) is True
    other = "quiet" if OPTIONS[option] == "debug" else "debug"
    assert getattr(args, other) is False


@pytest.mark.parametrize("command", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_options_default_to_off(command: Tuple[str, ...]) -> None:
    """Without the options, neither is set, whatever the subcommand."""
    args = build_parser().parse_args(list(command))
    assert args.debug is False and args.quiet is False


@pytest.fixture
def root_logger() -> Iterator[None]:
    """main() configures the root logger; put it back afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_debug_after_the_subcommand_takes_effect(root_logger: None) -> None:
    """`kv-agent check --manifest missing --debug` fails as a manifest error (78) with the
    traceback --debug adds, not as a usage error (2)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["check", "--manifest", "/nonexistent/manifest.yaml", "--debug"],
                    environ={})
    assert code == 78, err.getvalue()
    assert "no such file" in err.getvalue() and "Traceback" in err.getvalue()
