"""The manifest file: who may have written it, and reading it without blocking.

The manifest decides which secrets land where, owned by whom: whoever can
edit it can direct any secret to any user. So it is refused unless only
root (or the agent's own user) can write it, as sudo does with sudoers.
Only a regular file of at most MAX_MANIFEST_BYTES is read, and a FIFO in
its place cannot stall the agent.
"""

from __future__ import annotations

import os
import stat
from typing import List, Optional

from agent.base.errors import ManifestError
from agent.manifest.document import MAX_MANIFEST_BYTES


def check_file_safety(source: str, st: os.stat_result, euid: int) -> None:
    """Refuse a manifest others could have edited: it directs secrets anywhere.

    Raises ManifestError if the file is writable by group or others, or owned
    by someone other than root or the agent's own user.
    """
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ManifestError(
            f"{source}: writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})",
            f"it decides where secrets go: chmod go-w {source}",
        )
    if st.st_uid not in (0, euid):
        raise ManifestError(
            f"{source}: owned by uid {st.st_uid}, not root or the agent's user",
            f"chown root {source}",
        )


def read_manifest_text(source: str, euid: Optional[int] = None) -> str:
    """Read the manifest after checking its owner and mode (following a
    symlink, since a symlink swap is a legitimate way to publish it).

    Only a regular file of at most MAX_MANIFEST_BYTES is read: the open is
    non-blocking so a FIFO cannot stall the agent, and the size is checked
    before and during the read. Raises ManifestError.
    """
    try:
        fd = os.open(source, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ManifestError(
            f"{source}: no such file", "write one (see README) or pass --manifest"
        ) from None
    except PermissionError:
        raise ManifestError(f"{source}: permission denied", "run as root") from None
    except OSError as exc:
        raise ManifestError(f"{source}: {exc.strerror}", "pass the manifest file") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise ManifestError(f"{source}: is a directory", "pass the manifest file")
        if not stat.S_ISREG(st.st_mode):
            raise ManifestError(f"{source}: not a regular file", "pass the manifest file")
        check_file_safety(source, st, os.geteuid() if euid is None else euid)
        data = _read_at_most(fd, MAX_MANIFEST_BYTES + 1) \
            if st.st_size <= MAX_MANIFEST_BYTES else b""
    except OSError as exc:
        raise ManifestError(f"{source}: {exc.strerror}", "pass the manifest file") from None
    finally:
        os.close(fd)
    if st.st_size > MAX_MANIFEST_BYTES or len(data) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"{source}: larger than {MAX_MANIFEST_BYTES >> 20} MiB",
                            "a manifest needs far less; is this the right file?")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ManifestError(f"{source}: not UTF-8 text", "save it as UTF-8") from None


def read_manifest_bytes(source: str) -> Optional[bytes]:
    """The manifest's bytes for change detection, or None when it is not a
    readable regular file of at most MAX_MANIFEST_BYTES (never blocks)."""
    try:
        fd = os.open(source, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        data = _read_at_most(fd, MAX_MANIFEST_BYTES + 1)
    except OSError:
        return None
    finally:
        os.close(fd)
    return data if len(data) <= MAX_MANIFEST_BYTES else None


def _read_at_most(fd: int, limit: int) -> bytes:
    chunks: List[bytes] = []
    size = 0
    while size < limit:
        chunk = os.read(fd, min(65536, limit - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)

