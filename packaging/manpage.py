#!/usr/bin/env python3
"""Make kv-agent(8) from the command line's own parser, so it cannot drift.

    python3 packaging/manpage.py [-o FILE]       # default: standard output

The prose comes from ``packaging/kv-agent.8.in``; every option, its argument
name and its help come from ``agent.cli.build_parser()``, the parser
``kv-agent`` itself runs (borgbackup makes its man pages the same way). The
template marks where they go, in roff comments:

* ``.\\" @global-options``: the top-level options (``--debug``, ``-q``, ...);
* ``.\\" @command NAME``: the command's ``.SS`` heading, with its synopsis;
* ``.\\" @options``: the options of the command whose block it is in.

Every command of the parser needs a block and every block a command: a new
command, or a renamed one, fails the build (and ``tests/test_docs.py``) until
the template says what it does. The build scripts (``build-deb.sh``,
``build-rpm.sh``) run this into their scratch copy of the tree; nothing here
is written to the work tree unless ``-o`` says so.

The date is the Debian changelog's, not today's, so two builds of one
version make the same page. Importing ``agent.cli`` needs only the standard
library (its heavy imports are deferred to the commands).
"""

from __future__ import annotations

import argparse
import email.utils
import re
import sys
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Set

REPO = Path(__file__).resolve().parent.parent
TEMPLATE = REPO / "packaging" / "kv-agent.8.in"
CHANGELOG = REPO / "packaging" / "debian" / "changelog"
HELP = {"-h", "--help"}
# A synopsis lists a command's options up to this many; more become [options].
SYNOPSIS_OPTIONS = 4
MARK = re.compile(r'^\.\\" @(global-options|command|options)\b ?(.*)$')


class TemplateError(Exception):
    """The template and the parser disagree (a command without prose, ...)."""


def roff(text: str) -> str:
    """``text`` as roff body text: backslashes and hyphens escaped, and a
    leading ``.`` or ``'`` kept from being read as a request."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\\&" + text if text[:1] in (".", "'") else text


def sentence(text: str) -> str:
    """argparse's help fragment as a sentence: capitalised, with a full stop."""
    text = text.strip()
    if not text:
        return text
    text = text[0].upper() + text[1:]
    return text if text.endswith(".") else text + "."


def _metavar(action: argparse.Action) -> Optional[str]:
    """The argument's name as ``--help`` shows it, or None for a flag."""
    if action.nargs == 0:
        return None
    if isinstance(action.metavar, str):
        return action.metavar
    return action.dest.upper()


def _options(parser: argparse.ArgumentParser,
             leave_out: Sequence[str] = ()) -> List[argparse.Action]:
    """The parser's options, in its order, bar help and those in ``leave_out``."""
    return [action for action in parser._actions
            if action.option_strings and not set(action.option_strings) & HELP
            and not set(action.option_strings) & set(leave_out)]


def option_items(actions: Sequence[argparse.Action]) -> Iterator[str]:
    """One ``.TP`` item per option: its spellings and argument, then its help."""
    for action in actions:
        yield ".TP"
        metavar = _metavar(action)
        names = ", ".join(roff(option) for option in action.option_strings)
        if metavar is None:
            yield f".B {names}" if len(action.option_strings) == 1 else \
                ".BR " + ' ", " '.join(roff(option) for option in action.option_strings)
        else:
            yield f'.BI "{names}" " {roff(metavar)}"'
        if action.option_strings == ["--version"]:
            yield "Print the version and exit."
        else:
            yield roff(sentence(action.help or ""))


def synopsis(name: str, actions: Sequence[argparse.Action],
             positionals: Sequence[argparse.Action] = ()) -> str:
    """``name WORD FILE [--a A] [--b]``: the positional arguments (a choice of one
    as itself), required options, then optional ones in brackets, or
    ``[options]`` when there are many."""
    def spelled(action: argparse.Action) -> str:
        metavar = _metavar(action)
        return action.option_strings[-1] + (f" {metavar}" if metavar else "")

    required = [spelled(action) for action in actions if action.required]
    optional = [spelled(action) for action in actions if not action.required]
    words = [name, *(_positional(action) for action in positionals), *required]
    words += ["[options]"] if len(optional) > SYNOPSIS_OPTIONS else [f"[{o}]" for o in optional]
    return " ".join(roff(word) for word in words)


def _positional(action: argparse.Action) -> str:
    """A positional argument as the synopsis shows it: its only choice, its
    choices as ``a|b``, or its metavar."""
    if action.choices is not None:
        return "|".join(str(choice) for choice in action.choices)
    return str(action.metavar or action.dest.upper())


def positionals(parser: argparse.ArgumentParser) -> List[argparse.Action]:
    """The parser's positional arguments, in order (subcommand parsers excluded)."""
    return [action for action in parser._actions if not action.option_strings
            and not isinstance(action, argparse._SubParsersAction)]


def subcommands(parser: argparse.ArgumentParser) -> Dict[str, argparse.ArgumentParser]:
    """Every subcommand's parser, by name, in the order the parser adds them."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise TemplateError("the parser has no subcommands")


def changelog_date(changelog: Path = CHANGELOG) -> str:
    """The date of the changelog's latest entry, as YYYY-MM-DD."""
    for line in changelog.read_text(encoding="utf-8").splitlines():
        if line.startswith(" -- "):
            stamp = email.utils.parsedate_to_datetime(line.split("  ", 1)[1].strip())
            return stamp.strftime("%Y-%m-%d")
    raise TemplateError(f"{changelog}: no trailer line with a date")


def render(parser: argparse.ArgumentParser, template: str, version: str, date: str) -> str:
    """The man page: ``template`` with its marks replaced from ``parser``.

    Raises TemplateError when a command of the parser has no block, a block
    names no command, or a block has no ``@options`` mark."""
    commands = subcommands(parser)
    global_actions = _options(parser)
    global_options = [option for action in global_actions for option in action.option_strings]
    out: List[str] = []
    seen: List[str] = []
    current: Optional[str] = None
    placed: Set[str] = set()
    for line in template.splitlines():
        match = MARK.match(line)
        if match is None:
            if not line.startswith('.\\"'):  # the template's own comments stay out
                out.append(line.replace("@VERSION@", version).replace("@DATE@", date))
            continue
        kind, argument = match.group(1), match.group(2).strip()
        if kind == "global-options":
            out.extend(option_items(global_actions))
        elif kind == "command":
            _check_block_closed(current, placed)
            if argument not in commands:
                raise TemplateError(f"{TEMPLATE.name}: '@command {argument}' is not a command "
                                    f"of kv-agent ({', '.join(commands)})")
            current = argument
            seen.append(argument)
            actions = _options(commands[argument], global_options)
            out.append(f'.SS "{synopsis(argument, actions, positionals(commands[argument]))}"')
        else:
            if current is None:
                raise TemplateError(f"{TEMPLATE.name}: '@options' outside a command's block")
            out.extend(option_items(_options(commands[current], global_options)))
            placed.add(current)
    _check_block_closed(current, placed)
    missing = [name for name in commands if name not in seen]
    if missing:
        raise TemplateError(f"{TEMPLATE.name}: no '@command' block for {', '.join(missing)}; "
                            "say what the command does")
    return "\n".join(out) + "\n"


def _check_block_closed(command: Optional[str], placed: Set[str]) -> None:
    if command is not None and command not in placed:
        raise TemplateError(f"{TEMPLATE.name}: the block of '{command}' has no '@options' mark")


def build(template: Path = TEMPLATE) -> str:
    """kv-agent(8) for this tree: its parser, version and changelog date."""
    sys.path.insert(0, str(REPO))
    from agent import __version__
    from agent.cli import build_parser

    return render(build_parser(), template.read_text(encoding="utf-8"), __version__,
                  changelog_date())


def main(argv: Optional[Sequence[str]] = None) -> int:
    arguments = argparse.ArgumentParser(description="Make kv-agent(8) from the parser.")
    arguments.add_argument("-o", "--output", metavar="FILE", help="write here, not to stdout")
    args = arguments.parse_args(argv)
    try:
        page = build()
    except TemplateError as exc:
        print(f"manpage.py: error: {exc}", file=sys.stderr)
        return 1
    if args.output:
        Path(args.output).write_text(page, encoding="utf-8")
    else:
        sys.stdout.write(page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
