"""Outputs: the files an entry becomes, and the sets that change together.

The last stage before the writer (entries -> sources -> transforms ->
**outputs**). An :class:`Output` is one file with its owner and mode; an
:class:`OutputSet` is the outputs of one entry, which must change together.
Today every set has one file and the writer replaces each file atomically on
its own; a certificate's key and chain (two files that must match) will make
the set the unit the writer swaps, without changing anything above it.

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
