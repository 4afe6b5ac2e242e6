"""Values quoted into the manifest's problems, bounded and on one line.

Whatever the manifest holds may end up in a message: a 1 MiB string, a
number of 4,000 digits, an alias bomb, a newline that forges a log line, an
escape sequence. :func:`echo` formats only a bounded prefix of it and makes
every character visible; :func:`one_line` is the net under a whole problem.
"""

from __future__ import annotations

from typing import Any, Iterator, List

ECHO_CHARS = 60  # of a value quoted in a problem


def echo(value: Any) -> str:
    """``value`` as at most ECHO_CHARS printable characters on one line.

    Whatever the manifest holds is quoted into problems through this: a
    value may be huge (a 1 MiB string, a number of 4,000 digits, an alias
    bomb that would take gigabytes to format), hold a newline that forges a
    log line, or an escape sequence. Only a bounded prefix is ever formatted.
    """
    text = "".join(char if char.isprintable() else _escape(char)
                   for char in _sketch(value, ECHO_CHARS + 1, 2))
    return text if len(text) <= ECHO_CHARS else text[:ECHO_CHARS - 3] + "..."


def _escape(char: str) -> str:
    return repr(char)[1:-1]  # \n, \x1b, \ud800: visible, never acted upon


def _sketch(value: Any, budget: int, levels: int) -> str:
    """At most about ``budget`` characters of ``value``, formatting no more."""
    if isinstance(value, str):
        return value[:budget]
    if isinstance(value, bool) or value is None or isinstance(value, float):
        return repr(value)
    if isinstance(value, int):
        if value.bit_length() > 128:
            return f"a number of about {int(value.bit_length() * 0.30103)} digits"
        return str(value)
    if isinstance(value, dict):
        pairs = (f"{_sketch_item(key, budget, levels - 1)}: "
                 f"{_sketch_item(item, budget, levels - 1)}" for key, item in value.items())
        return _sketch_items(pairs, "{", "}", budget, levels)
    if isinstance(value, (list, tuple)):
        items = (_sketch_item(item, budget, levels - 1) for item in value)
        return _sketch_items(items, "[", "]", budget, levels)
    if isinstance(value, (set, frozenset)):
        items = (_sketch_item(item, budget, levels - 1) for item in value)
        return _sketch_items(items, "{", "}", budget, levels)
    if isinstance(value, bytes):
        return repr(value[:budget])
    return f"<{type(value).__name__}>"[:budget]


def _sketch_items(items: Iterator[str], opening: str, closing: str, budget: int,
                  levels: int) -> str:
    """The first few of ``items`` (sketched lazily: the rest are never made)."""
    if levels == 0:
        return f"{opening}...{closing}"
    parts: List[str] = []
    used = 0
    for index, part in enumerate(items):
        if index == 4 or used > budget:
            parts.append("...")
            break
        parts.append(part)
        used += len(part) + 2
    return opening + ", ".join(parts) + closing


def _sketch_item(value: Any, budget: int, levels: int) -> str:
    """Items inside a collection are quoted the way Python's repr quotes them."""
    if isinstance(value, str):
        return repr(value[:max(budget, 0)])
    return _sketch(value, max(budget, 0), levels)


def one_line(text: str, limit: int) -> str:
    """``text`` with control characters escaped, capped at ``limit`` characters."""
    printable = "".join(char if char.isprintable() else _escape(char) for char in text[:limit])
    return printable if len(printable) <= limit else printable[:limit - 3] + "..."
