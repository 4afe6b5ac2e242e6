"""The agent's process memory: two malloc arenas, free pages returned,
long-lived objects kept out of the cyclic garbage collector, and kept out of
core dumps when it holds credentials.

glibc's malloc gives a thread that allocates while the others' arenas are
busy an arena of its own, up to eight per core, and keeps every arena for the
life of the process. A sync fans out over 16 fetch threads
(:data:`agent.vault.client.MAX_CONCURRENCY`); afterwards an idle ``kv-agent run``
kept about 0.8 MiB in arenas no thread used any more, and about 0.5 MiB of
freed pages glibc had not handed back (issue 17, item 21: idle RSS with 100
secrets 35.0 -> 34.0 MiB; ``once`` for 1,000 secrets peaks 0.8 MiB lower).
The fetch threads take turns under the GIL anyway: two arenas cost them
nothing measurable.

A process that serves systemd credentials holds values that no file holds
(:mod:`agent.writer.credentials`): :func:`make_undumpable` keeps them out of a
core dump and from another process's ``ptrace`` or ``/proc/<pid>/mem``
without ``CAP_SYS_PTRACE`` (prctl(2) ``PR_SET_DUMPABLE`` 0; the kernel also
makes the process's /proc files root's).

The malloc calls are best effort and change nothing but memory use: with
another C library (musl has neither function) they do nothing, and an
operator's own ``MALLOC_ARENA_MAX`` is left alone.
"""

from __future__ import annotations

import ctypes
import gc
from typing import Any, Mapping, Optional

M_ARENA_MAX = -8  # mallopt(3) parameter, from <malloc.h>
PR_GET_DUMPABLE = 3  # prctl(2) options, from <linux/prctl.h>
PR_SET_DUMPABLE = 4
MALLOC_ARENAS = 2


def _glibc() -> Optional[Any]:
    """The C library linked into Python when it is glibc (it has both calls)."""
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def limit_arenas(environ: Mapping[str, str], count: int = MALLOC_ARENAS) -> bool:
    """Cap malloc's arenas at ``count``; call before the first thread starts.
    True when the cap was set (glibc, and no MALLOC_ARENA_MAX of the operator's)."""
    if "MALLOC_ARENA_MAX" in environ:
        return False
    libc = _glibc()
    return libc is not None and libc.mallopt(M_ARENA_MAX, count) == 1


def release_free_memory() -> bool:
    """Hand the heap's free pages back to the kernel (malloc_trim(3)): after a
    sync, whose responses and buffers are garbage by then. True when glibc
    released some."""
    libc = _glibc()
    return libc is not None and libc.malloc_trim(0) == 1


def spare_the_collector() -> None:
    """Exempt every object alive now from the cyclic garbage collector
    (gc.freeze); reference counting still frees them. For what lives until
    the process ends (modules, the manifest), and at the end of a short-lived
    process: its exit would otherwise walk every object in a last full
    collection only to free them anyway (about 30 ms of ``kv-agent once`` for
    1,000 secrets; issue 17, item 20)."""
    gc.freeze()


def make_undumpable() -> bool:
    """prctl(PR_SET_DUMPABLE, 0): no core dump of this process, and no
    ptrace or /proc/<pid>/mem for other processes without CAP_SYS_PTRACE.
    For as long as the process lives (a value it held may linger in freed
    memory); ``execve`` of a hook resets it for the hook. True when set."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)) == 0
    except (OSError, AttributeError):  # not Linux, or no prctl
        return False


def is_dumpable() -> bool:
    """prctl(PR_GET_DUMPABLE): whether this process may be dumped (and
    traced by its own user); True when that cannot be asked."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0)) != 0
    except (OSError, AttributeError):
        return True
