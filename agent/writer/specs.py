"""What the writer is asked and what it answers: immutable values, no I/O.

A :class:`FileSpec` is one file's desired state; :class:`WriteResult` and
:class:`SetResult` say what a write changed, so a caller (the sync) never has
to read the files again to know.
"""

from __future__ import annotations

from typing import Iterable, NamedTuple, Protocol, Tuple


class FileSpec(NamedTuple):
    """The desired state of one file: absolute ``path`` under the root."""

    path: str
    content: bytes
    uid: int
    gid: int
    mode: int

    def __repr__(self) -> str:
        return (f"FileSpec(path={self.path!r}, content=****, uid={self.uid}, "
                f"gid={self.gid}, mode={self.mode:#o})")


class Target(Protocol):
    """Where and how one output is written, as the writer needs it (an
    :class:`agent.pipeline.outputs.Output`, which the writer does not
    import); ``is_file`` False: a credential alone, no file."""

    @property
    def path(self) -> str: ...

    @property
    def uid(self) -> int: ...

    @property
    def gid(self) -> int: ...

    @property
    def mode(self) -> int: ...

    @property
    def is_file(self) -> bool: ...


def specs_of(targets: Iterable[Target], contents: Iterable[bytes]) -> Tuple[FileSpec, ...]:
    """The files of ``targets`` (an entry's outputs) with ``contents`` (one
    each, in order), as a refresh and the sealed cache alike write them; a
    credential-only output is none."""
    return tuple(FileSpec(target.path, data, target.uid, target.gid, target.mode)
                 for target, data in zip(targets, contents) if target.is_file)


class WriteResult(NamedTuple):
    """``changed`` is False when the file already matched and was not touched."""

    path: str
    changed: bool


class SetResult(NamedTuple):
    """``changed`` is False when the set's directory already held exactly
    these files (bytes, owner, mode) and was not touched.

    ``changed_paths``: the members whose bytes, owner or mode differed from
    what the directory held before (every member of a new set), in the
    order given. A swap gives every member a new inode, changed or not, so
    this, not the inodes, tells which files a consumer must reload. Empty
    when nothing changed, and when only the directory's own owner or mode
    did (``changed`` then True).
    """

    directory: str
    changed: bool
    changed_paths: Tuple[str, ...] = ()
