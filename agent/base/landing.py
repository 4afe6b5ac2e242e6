"""Where secrets may land: the file systems, directories and owners a secrets
root may have, judged the same way by the manifest (``check``, with a line
number), the writer (before every write) and the doctor (with the fix).

Pure policy and the two system calls it needs to see a mount (fstatfs(2) and
/proc/self/mountinfo); it writes nothing. The writer alone writes.
"""

from __future__ import annotations

import ctypes
import os
import posixpath
import stat
from typing import Callable, Iterator, Optional

# Names starting with this belong to the writer (its temporary files and set
# generations); the manifest refuses them as output names.
RESERVED_PREFIX = ".kv-agent-"
TMPFS_MAGIC = 0x01021994
RAMFS_MAGIC = 0x858458F6
MEMORY_FILESYSTEMS = {TMPFS_MAGIC: "tmpfs", RAMFS_MAGIC: "ramfs"}
# Directories shared with the whole system: a root there mixes secrets with
# files kv-agent does not own, and start-up cleaning would walk all of them.
SYSTEM_DIRECTORIES = frozenset({
    "/", "/dev", "/dev/shm", "/run", "/run/user", "/run/lock", "/run/shm", "/tmp",
    "/var/tmp", "/var/run", "/var/lock", "/proc", "/sys",
})
# Trees that belong to the kernel: nothing below them is a secrets root
# (/sys/fs/cgroup may even be a tmpfs), except below /dev/shm.
KERNEL_TREES = ("/proc", "/sys", "/dev")
TMPFS_CANDIDATES = ("/run", "/dev/shm")  # named in hints when they are tmpfs here

def filesystem_type(fd: int) -> int:
    """``f_type`` of the file system holding ``fd`` (fstatfs(2)).

    Python has no os.statfs; ``f_type`` is the first member of struct statfs
    on every Linux ABI, a C long.
    """
    # CDLL(None): the C library already linked into Python. ctypes.util's
    # find_library would import subprocess and run ldconfig, costing ~20 ms.
    libc = ctypes.CDLL(None, use_errno=True)
    buffer = ctypes.create_string_buffer(512)  # larger than any struct statfs
    if libc.fstatfs(fd, buffer) != 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))
    return ctypes.c_long.from_buffer(buffer).value & 0xFFFFFFFF


def mount_type(fd: int) -> Optional[str]:
    """The type of the mount holding ``fd`` ("tmpfs", "devtmpfs", ...) from
    /proc/self/mountinfo, matched by device number; None when unknown.

    statfs cannot tell devtmpfs (/dev) from tmpfs: both report TMPFS_MAGIC.
    """
    st = os.fstat(fd)
    device = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    found = None
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                # ID PARENT MAJOR:MINOR ROOT POINT OPTIONS [OPTIONAL...] - TYPE SOURCE ...
                fields = line.split()
                if len(fields) > 2 and fields[2] == device and "-" in fields[6:]:
                    after = fields.index("-", 6) + 1
                    found = fields[after] if after < len(fields) else found
    except OSError:
        return None
    return found


def tmpfs_hint(fs_type: Callable[[int], int] = filesystem_type) -> str:
    """Where to put secrets instead, naming only TMPFS_CANDIDATES that are
    tmpfs or ramfs on this host (/run is not on every host)."""
    found = []
    for candidate in TMPFS_CANDIDATES:
        try:
            fd = os.open(candidate, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            if fs_type(fd) in MEMORY_FILESYSTEMS:
                found.append(candidate)
        except OSError:
            pass
        finally:
            os.close(fd)
    if found:
        return f"choose a directory under {' or '.join(found)}"
    return "mount a tmpfs (mount -t tmpfs) and choose a directory on it"


def system_directory_problem(path: str) -> Optional[str]:
    """Why the normalised absolute ``path`` may not be a secrets root, or None.

    Pure (apart from naming a tmpfs in the hint): refuses SYSTEM_DIRECTORIES
    themselves and anything inside KERNEL_TREES except below /dev/shm.
    """
    if path in SYSTEM_DIRECTORIES:
        if path in ("/", "/dev", "/proc", "/sys"):
            return f"{path} is a system directory, not a secrets directory; {tmpfs_hint()}"
        return (f"{path} is a system directory shared with other programs; "
                f"use a directory of its own inside it, e.g. {path}/secrets")
    for tree in KERNEL_TREES:
        if path.startswith(tree + "/") and not path.startswith("/dev/shm/"):
            return f"{path} is inside {tree}, which belongs to the kernel; {tmpfs_hint()}"
    return None


def replaceable_problem(path: str, st: os.stat_result, euid: int) -> Optional[str]:
    """Why another user could delete or replace the files in the directory
    ``path`` (its ``st``), or None: the rule for the root and for every
    directory below it on the way to a file. Owned by root or ``euid`` (the
    agent's own user), not writable by group or others; no sticky exception,
    since a sticky directory still lets anyone add a file beside the secrets.
    The message ends with the fix after "; ". Pure."""
    fix_owner = "root:root" if euid == 0 else str(euid)
    fix = (f"chown {fix_owner} {path} && chmod 0755 {path}, "
           "or remove it so kv-agent creates it")
    if st.st_uid not in (0, euid):
        return (f"{path} is owned by uid {st.st_uid}, who could delete or replace the "
                f"secrets; {fix}")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return (f"{path} is writable by group or others (mode "
                f"{stat.S_IMODE(st.st_mode):04o}), who could delete or replace the "
                f"secrets; {fix}")
    return None


def directories_above(path: str) -> Iterator[str]:
    """``/``, then each ancestor of ``path``, down to ``path`` itself."""
    current = "/"
    yield current
    for part in path.strip("/").split("/"):
        if part:
            current = posixpath.join(current, part)
            yield current
