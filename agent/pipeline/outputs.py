"""Outputs: the files an entry becomes, and the sets that change together.

The last stage before the writer (entries -> sources -> transforms ->
**outputs**). An :class:`Output` is one file with its owner and mode; an
:class:`OutputSet` is the outputs of one entry, in the order its transform
fills them. An :class:`EntrySet` is entries whose files change together
(``set:``, and every certificate entry): they share one directory that holds
nothing else, the unit the writer swaps. Until the writer swaps sets, each
file is replaced atomically on its own.

Pure values; nothing here does I/O.
"""

from __future__ import annotations

from typing import NamedTuple, Tuple


class Output(NamedTuple):
    """One file: an absolute, normalised ``path`` inside the manifest's
    directory, applied as ``uid``/``gid``/``mode``. ``owner`` and ``group``
    keep the manifest's spelling, for messages."""

    path: str
    uid: int
    gid: int
    mode: int
    owner: str = "root"
    group: str = "root"


class OutputSet(NamedTuple):
    """Outputs that must change together, in the order a transform fills them."""

    outputs: Tuple[Output, ...]

    @property
    def paths(self) -> Tuple[str, ...]:
        return tuple(output.path for output in self.outputs)


class EntrySet(NamedTuple):
    """Entries whose files change together: every file of entries ``keys``
    (each an :attr:`agent.manifest.Entry.key`) lives in ``directory``, which
    holds nothing else, so the writer can swap the directory as a whole.

    ``name`` is the manifest's ``set:`` name, or ``certificate:<key>`` for a
    certificate entry outside any named set (its outputs form a set of their own).
    """

    name: str
    directory: str
    keys: Tuple[str, ...]
