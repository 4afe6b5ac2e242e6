"""agent.base.memory: two malloc arenas and free pages returned, on glibc only (issue 17, item 21)."""

from __future__ import annotations

import ctypes
import gc
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, List, Tuple

import pytest

from agent.base import memory

REPO = Path(__file__).resolve().parent.parent


class FakeLibc:
    """A C library recording mallopt and malloc_trim calls."""

    def __init__(self) -> None:
        self.calls: List[Tuple[str, Tuple[int, ...]]] = []

    def mallopt(self, *args: int) -> int:
        self.calls.append(("mallopt", args))
        return 1

    def malloc_trim(self, *args: int) -> int:
        self.calls.append(("malloc_trim", args))
        return 1


class MuslLibc:
    """A C library without either call (musl)."""


def test_arenas_are_capped_at_two_unless_the_operator_chose(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """limit_arenas sets M_ARENA_MAX to 2 through mallopt, and leaves an operator's own
    MALLOC_ARENA_MAX alone."""
    libc = FakeLibc()
    monkeypatch.setattr(ctypes, "CDLL", lambda name, *args, **kwargs: libc)
    assert memory.limit_arenas({}) is True
    assert memory.limit_arenas({"MALLOC_ARENA_MAX": "8"}) is False
    assert libc.calls == [("mallopt", (memory.M_ARENA_MAX, 2))]


def test_free_pages_are_handed_back_with_malloc_trim(monkeypatch: pytest.MonkeyPatch) -> None:
    """release_free_memory calls malloc_trim(0)."""
    libc = FakeLibc()
    monkeypatch.setattr(ctypes, "CDLL", lambda name, *args, **kwargs: libc)
    assert memory.release_free_memory() is True
    assert libc.calls == [("malloc_trim", (0,))]


@pytest.mark.parametrize("libc", [MuslLibc(), None])
def test_without_glibc_nothing_is_done(monkeypatch: pytest.MonkeyPatch, libc: Any) -> None:
    """With a C library lacking the calls, or none loadable, both do nothing and say so."""
    def load(name: Any, *args: Any, **kwargs: Any) -> Any:
        if libc is None:
            raise OSError("no C library")
        return libc

    monkeypatch.setattr(ctypes, "CDLL", load)
    assert memory.limit_arenas({}) is False
    assert memory.release_free_memory() is False


def test_the_real_calls_work_here() -> None:
    """On this machine's C library both calls run in a fresh process, and on glibc the
    arena cap applies (whether a trim found pages to return depends on the heap)."""
    probe = ("from agent.base import memory; "
             "print(memory.limit_arenas({}), type(memory.release_free_memory()).__name__)")
    env = {key: value for key, value in os.environ.items() if key != "MALLOC_ARENA_MAX"}
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True,
                          text=True, timeout=60, check=True, env=env)
    is_glibc = hasattr(ctypes.CDLL(None), "mallopt")
    assert done.stdout.split() == [str(is_glibc), "bool"]


def test_sparing_the_collector_freezes_what_is_alive() -> None:
    """spare_the_collector moves every live object out of the collector's reach
    (gc.freeze), so neither later collections nor the exit's walk them again."""
    assert gc.get_freeze_count() == 0
    try:
        memory.spare_the_collector()
        assert gc.get_freeze_count() > 1000
    finally:
        gc.unfreeze()
