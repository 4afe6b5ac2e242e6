"""The repository itself: what is tracked is what was meant to be.

A merge or a patch that went wrong leaves ``*.orig`` and ``*.rej`` files
beside the real ones; tracked, they ship in the sdist and confuse readers
(``tests/mutations/table.py.orig`` was one). CI runs from a clean clone, so
a leftover that was committed fails here.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import List

import pytest

REPO = Path(__file__).resolve().parent.parent
LEFTOVER_SUFFIXES = (".orig", ".rej")


def _tracked_files() -> List[str]:
    """Every path git tracks in this checkout (skips outside a git checkout)."""
    try:
        done = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True,
                              timeout=60, check=False)
    except FileNotFoundError:
        pytest.skip("git is not installed: the tracked files cannot be listed")
    if done.returncode != 0:
        pytest.skip("not a git checkout (an sdist or a copy): no tracked files to check")
    return [name for name in done.stdout.decode().split("\0") if name]


def leftovers(paths: List[str]) -> List[str]:
    """The paths that are merge or patch leftovers."""
    return [path for path in paths if path.endswith(LEFTOVER_SUFFIXES)]


def test_leftovers_are_recognised() -> None:
    """A .orig or .rej file is a leftover; a file that merely contains the word is not."""
    assert leftovers(["a/table.py.orig", "b.rej", "origin.py", "rej/x.py", "x.orig.py"]) == \
        ["a/table.py.orig", "b.rej"]


def test_no_merge_or_patch_leftover_is_tracked() -> None:
    """No tracked file ends in .orig or .rej."""
    assert leftovers(_tracked_files()) == []
