"""Outputs: the files and credentials an entry becomes, and the sets that change together.

The last stage before the writer (entries -> sources -> transforms ->
**outputs**). An :class:`Output` is one file with its owner and mode, or a
systemd credential (:class:`~agent.pipeline.credentials.Grant`) served by the
running agent, or both; an :class:`OutputSet` is the outputs of one entry, in
the order its transform fills them. An :class:`EntrySet` is entries whose files change together
(``set:``, and every certificate entry): they share one directory that holds
nothing else, the unit the writer swaps. Until the writer swaps sets, each
file is replaced atomically on its own.

Pure values; nothing here does I/O.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

from agent.pipeline.credentials import Grant


class Output(NamedTuple):
    """One output: a file at an absolute, normalised ``path`` inside the
    manifest's directory, applied as ``uid``/``gid``/``mode`` (``owner`` and
    ``group`` keep the manifest's spelling, for messages); and, with a
    ``credential``, the same bytes served to the units it grants. ``path`` is
    empty for a credential alone: no file at all (:attr:`is_file`)."""

    path: str
    uid: int
    gid: int
    mode: int
    owner: str = "root"
    group: str = "root"
    credential: Optional[Grant] = None

    @property
    def is_file(self) -> bool:
        """Whether the output is written as a file (else it is a credential only)."""
        return bool(self.path)


class OutputSet(NamedTuple):
    """Outputs that must change together, in the order a transform fills them."""

    outputs: Tuple[Output, ...]

    @property
    def paths(self) -> Tuple[str, ...]:
        """The files, in order; a credential-only output has none."""
        return tuple(output.path for output in self.outputs if output.is_file)

    @property
    def grants(self) -> Tuple[Grant, ...]:
        """The credentials, in order."""
        return tuple(output.credential for output in self.outputs
                     if output.credential is not None)


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
