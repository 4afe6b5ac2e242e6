"""Where an output path of the manifest points, checked before anything is written.

A path is resolved inside the manifest's ``directory`` purely
(:func:`resolve_path`: no ``..``, no reserved name, no name the kernel
would refuse as too long) and then, for ``check`` on the target host, the
existing parents on the way are looked at (:func:`check_no_symlinked_parents`).
"""

from __future__ import annotations

import os
import posixpath
import stat
from dataclasses import dataclass
from typing import Any, Callable, Optional

from agent.base.landing import RESERVED_PREFIX
from agent.manifest.quoting import echo

NAME_MAX = 255  # bytes in one path component (Linux)
PATH_MAX = 4095  # bytes in a path, without the terminating NUL


def resolve_path(directory: str, value: Any) -> str:
    """Return the absolute target for ``path`` inside ``directory``.

    Rejects, each with a reason: empty paths, NUL bytes, ``..`` elements,
    absolute paths outside ``directory``, the directory itself, a trailing
    slash, a component over NAME_MAX or a path over PATH_MAX bytes (the
    kernel's ENAMETOOLONG, found here rather than at the first write) and
    names starting with the writer's reserved prefix. Pure: it does not look
    at the file system (see :func:`check_no_symlinked_parents`).
    """
    if not isinstance(value, str) or not value.strip():
        raise ValueError("must be a file name relative to directory")
    if "\0" in value:
        raise ValueError("contains a NUL byte")
    if value.endswith("/"):
        raise ValueError(f"'{echo(value)}' ends with '/'; name a file, not a directory")
    if ".." in value.split("/"):
        raise ValueError(f"'{echo(value)}' contains '..'; paths must stay inside {directory}")
    joined = normalise_path(posixpath.join(directory, value))
    if not joined.startswith(directory.rstrip("/") + "/"):
        raise ValueError(f"'{echo(value)}' is outside {directory}; use a path inside it")
    check_path_length(joined)
    if posixpath.basename(joined).startswith(RESERVED_PREFIX):
        raise ValueError(f"names starting with '{RESERVED_PREFIX}' are reserved for kv-agent")
    return joined


def normalise_path(path: str) -> str:
    """``posixpath.normpath``, but with one leading slash: POSIX keeps exactly
    two (``//dev/shm``) as implementation-defined, and ``//`` is its own
    dirname, so walking up from such a path never reached ``/`` (issue 9:
    ``directory: //dev/shm/x`` looped forever). Linux reads ``//`` as ``/``."""
    normal = posixpath.normpath(path)
    return "/" + normal.lstrip("/") if normal.startswith("//") else normal


def check_path_length(path: str) -> None:
    """Raise ValueError if a component of ``path`` is over NAME_MAX bytes or
    the whole over PATH_MAX, as the kernel would with ENAMETOOLONG."""
    for part in path.split("/"):
        if len(part.encode("utf-8", "surrogatepass")) > NAME_MAX:
            raise ValueError(f"component '{echo(part)}' is longer than {NAME_MAX} bytes; "
                             "shorten it")
    if len(path.encode("utf-8", "surrogatepass")) > PATH_MAX:
        raise ValueError(f"longer than {PATH_MAX} bytes; choose a shorter path")


def check_no_symlinked_parents(directory: str, path: str) -> None:
    """Raise ValueError if an existing directory between ``directory`` and
    ``path`` is a symlink (which could point the write anywhere)."""
    relative = posixpath.relpath(posixpath.dirname(path), directory)
    current = directory
    for part in [] if relative == "." else relative.split("/"):
        current = posixpath.join(current, part)
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            return  # the writer creates the rest, never through a symlink
        except OSError as exc:  # e.g. EACCES, ENOTDIR: a problem to report, not a crash
            raise ValueError(f"parent {current}: {exc.strerror}") from None
        if stat.S_ISLNK(st.st_mode):
            raise ValueError(f"parent {current} is a symlink; replace it with a directory")
        if not stat.S_ISDIR(st.st_mode):
            raise ValueError(f"parent {current} is not a directory")


@dataclass(frozen=True)
class Paths:
    """Resolves an output path inside the manifest's directory, or reports why not."""

    directory: str
    check_filesystem: bool

    def resolve(self, fail: Callable[..., None], key: str, value: Any) -> Optional[str]:
        try:
            path = resolve_path(self.directory, value)
            if self.check_filesystem:
                check_no_symlinked_parents(self.directory, path)
        except ValueError as exc:
            fail(key, str(exc))
            return None
        return path
