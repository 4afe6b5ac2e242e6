"""The manifest's YAML, with line numbers, and the bounds on what it may cost.

:func:`check_shape` reads libyaml's event stream before anything is built
and refuses text too costly to build (a value too long, nesting too deep, an
alias bomb). :class:`LineLoader` then builds it, each mapping a
:class:`YamlMap` that remembers the line of every key and the text of every
scalar as written, so that each problem names its line and ``mode: 0440``
can be told from ``mode: "0440"``.
"""

from __future__ import annotations

from typing import Any, Dict, Iterator, List, Optional, Tuple

import yaml

from agent.manifest.quoting import echo

# Bounds on the text itself, checked before any value is built, so no input
# can cost more than a bounded amount of time or memory (a "billion laughs"
# alias bomb is a few hundred bytes that expand to billions of values).
MAX_MANIFEST_BYTES = 1 << 20  # 1 MiB; a thousand entries take about 150 KiB
MAX_SCALAR_CHARS = 4096  # PATH_MAX: no valid value is longer
MAX_DEPTH = 20  # the schema nests 4 deep (secrets, entry, on_change)
MAX_NODES = 100_000  # values with every alias expanded


class YamlMap(Dict[Any, Any]):
    """A YAML mapping that remembers where it and each of its keys stood."""

    line: int = 0
    key_lines: Dict[Any, int]
    raw: Dict[Any, str]  # the scalar text as written, e.g. ``0440`` unquoted
    duplicates: List[Tuple[Any, int]]


# libyaml's parser when PyYAML was built with it (Debian's and PyPI's wheels
# are): the same safe constructors, a seventh of the parse time.
_SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class LineLoader(_SafeLoader):  # type: ignore[valid-type,misc]
    """SafeLoader whose mappings carry line numbers and raw scalar text."""


def _construct_map(loader: LineLoader, node: yaml.MappingNode) -> Iterator[YamlMap]:
    data = YamlMap()
    data.line = node.start_mark.line + 1
    data.key_lines, data.raw, data.duplicates = {}, {}, []
    yield data
    own = sum(1 for key_node, _ in node.value if key_node.tag != "tag:yaml.org,2002:merge")
    loader.flatten_mapping(node)
    # flatten_mapping puts merged pairs (``<<: *base``) first: keys given
    # here override them, as YAML says, and only a key given twice here is
    # a mistake.
    merged = len(node.value) - own
    explicit = set()
    for index, (key_node, value_node) in enumerate(node.value):
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, str):
            key = echo(key)  # a list or number as a key: named, never formatted whole
        if index >= merged:
            if key in explicit:
                data.duplicates.append((key, key_node.start_mark.line + 1))
            explicit.add(key)
        data[key] = loader.construct_object(value_node, deep=True)
        data.key_lines[key] = key_node.start_mark.line + 1
        if isinstance(value_node, yaml.ScalarNode):
            data.raw[key] = value_node.value


LineLoader.add_constructor("tag:yaml.org,2002:map", _construct_map)


class _Open:
    """A collection being parsed in check_shape: what it expands to so far,
    and where in it the parser is (for the key path of a problem)."""

    def __init__(self, anchor: Optional[str], is_map: bool) -> None:
        self.anchor = anchor
        self.is_map = is_map
        self.values = 1
        self.depth_below = 0
        self.children = 0  # events seen directly inside: keys and values alternate in a map
        self.key = ""

    def add(self, values: int, depth: int, key_text: Optional[str]) -> None:
        if self.is_map and self.children % 2 == 0:
            self.key = key_text if key_text is not None else "?"
        self.children += 1
        self.values += values
        self.depth_below = max(self.depth_below, depth)

    def where(self) -> str:
        if self.is_map:  # after a key, its value is being parsed
            return f".{echo(self.key)}" if self.children % 2 == 1 else ""
        return f"[{self.children}]"


def check_shape(text: str) -> Optional[Tuple[str, Optional[int]]]:
    """The first reason ``text`` is too costly to build, with its line, or None.

    Runs on libyaml's event stream (a state machine: no recursion, no values
    built) before anything is constructed, and refuses a scalar longer than
    MAX_SCALAR_CHARS or holding a NUL or an unpaired surrogate (which no
    system call accepts), nesting deeper than MAX_DEPTH, and more than
    MAX_NODES values once aliases are expanded: anchors and merge keys stay
    usable, a "billion laughs" does not. Syntax errors are left to the
    loader, which reports them with their line.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        # libyaml's parser takes UTF-8 and raises on an unpaired surrogate
        # before any event: find it here, with its line, as a problem.
        return ("an unpaired surrogate (not text); remove it",
                text.count("\n", 0, exc.start) + 1)
    expanded: Dict[str, Tuple[int, int]] = {}  # anchor -> (values, depth) it stands for
    stack: List[_Open] = []
    total = 0

    def where() -> str:
        path = "".join(node.where() for node in stack).lstrip(".")
        return f"{path}: " if path else ""

    try:
        for event in yaml.parse(text, Loader=_SafeLoader):
            line = event.start_mark.line + 1 if event.start_mark else None
            key_text = None
            if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                stack.append(_Open(event.anchor, isinstance(event, yaml.MappingStartEvent)))
                total += 1
                if len(stack) > MAX_DEPTH:
                    return f"{where()}nested deeper than {MAX_DEPTH} levels; flatten it", line
                continue
            if isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                node = stack.pop()
                values, depth = node.values, node.depth_below + 1
                if node.anchor is not None:
                    expanded[node.anchor] = (values, depth)
            elif isinstance(event, yaml.AliasEvent):
                if event.anchor not in expanded:
                    return (f"{where()}alias *{echo(event.anchor)} refers to an anchor "
                            "that is not complete before it; define the anchor first", line)
                values, depth = expanded[event.anchor]
                total += values
            elif isinstance(event, yaml.ScalarEvent):
                problem = _scalar_problem(event.value)
                if problem:
                    return f"{where()}{problem}", line
                values, depth, key_text = 1, 0, event.value
                if event.anchor is not None:
                    expanded[event.anchor] = (values, depth)
                total += 1
            else:
                continue  # stream and document events
            if total > MAX_NODES:
                return (f"more than {MAX_NODES} values (aliases expanded); "
                        "a manifest needs far fewer: split it or remove repetition", line)
            if len(stack) + depth > MAX_DEPTH:
                return (f"{where()}nested deeper than {MAX_DEPTH} levels "
                        "(aliases expanded); flatten it", line)
            if stack:
                stack[-1].add(values, depth, key_text)
    except yaml.YAMLError:
        return None  # the loader reports the syntax error with its line
    return None


def _scalar_problem(value: str) -> Optional[str]:
    if len(value) > MAX_SCALAR_CHARS:
        return (f"a value of {len(value)} characters; values are at most "
                f"{MAX_SCALAR_CHARS} characters: shorten it")
    if "\0" in value:
        return f"'{echo(value)}' contains a NUL character; remove it"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return f"'{echo(value)}' contains an unpaired surrogate (not text); remove it"
    return None

