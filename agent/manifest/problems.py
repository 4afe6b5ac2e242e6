"""Every problem of a manifest, collected, each on one line with a fix.

A manifest is validated fully before anything is fetched: each problem is
recorded as ``FILE:LINE: KEY: what; fix`` and all of them are raised at once
in one :class:`~agent.base.errors.ManifestError`. An unknown key gets a
did-you-mean (:func:`suggest`), richer than consul-template's ``ErrorUnused``.
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence, Tuple

from agent.base.errors import ManifestError
from agent.manifest.document import YamlMap
from agent.manifest.quoting import echo, one_line

MAX_PROBLEMS = 50  # lines reported; the rest are counted
MAX_PROBLEM_CHARS = 320  # a problem's text after FILE:LINE:, escaped and capped


class Problems:
    """Collects one line per problem: ``FILE:LINE: KEY: what; fix``."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.lines: List[str] = []

    def add(self, key: str, message: str, line: Optional[int], hint: str = "") -> None:
        """Record one problem. Whatever the parts hold, the line is printable
        and at most MAX_PROBLEM_CHARS after ``FILE:LINE:`` (values are echoed
        short already; this is the net under every message)."""
        where = f"{self.source}:{line}" if line else self.source
        text = f"{key}: {message}" if key else message
        body = one_line(f"{text}; {hint}" if hint else text, MAX_PROBLEM_CHARS)
        self.lines.append(f"{where}: {body}")

    def raise_if_any(self) -> None:
        if self.lines:
            count = len(self.lines)
            shown = self.lines[:MAX_PROBLEMS]
            if count > MAX_PROBLEMS:
                shown.append(f"{self.source}: and {count - MAX_PROBLEMS} more problems; "
                             "fix these first")
            raise ManifestError(
                f"{self.source}: {count} problem{'s' if count > 1 else ''}",
                problems=shown,
            )


class Scope:
    """Reports problems under one key of an entry (``template.format``...)
    through the entry's ``fail``, and counts them, so the parser of that part
    knows whether it came out clean."""

    def __init__(self, fail: Callable[..., None], key: str) -> None:
        self._fail = fail
        self._key = key
        self.count = 0

    def __call__(self, sub: str, message: str, hint: str = "") -> None:
        self.count += 1
        self._fail(f"{self._key}.{sub}" if sub else self._key, message, hint)


def suggest(key: Any, known: Sequence[str], what: str = "keys") -> str:
    """The fix for an unknown key: the closest known one, else the list."""
    import difflib  # only on this error path: keeps start-up lean

    close = difflib.get_close_matches(str(key)[:64], known, n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'?" if close else f"known {what}: {', '.join(known)}"


def unknown_keys(
    problems: Problems, data: YamlMap, known: Tuple[str, ...], prefix: str
) -> None:
    """Report each key of ``data`` not in ``known`` (with a did-you-mean) and
    each key given twice, under ``prefix`` (``secrets[3].``)."""
    for key in data:
        if key in known:
            continue
        # Suggestions only for lines that will be shown: difflib costs ~50 us
        # a key, and a 1 MiB manifest can hold 50,000 unknown ones.
        hint = (suggest(key, known) if len(problems.lines) < MAX_PROBLEMS
                else f"known keys: {', '.join(known)}")
        problems.add(f"{prefix}{echo(key)}", "unknown key", data.key_lines.get(key), hint)
    for key, line in data.duplicates:
        problems.add(f"{prefix}{echo(key)}", "key given twice", line, "keep one")

