"""Writer.remove_empty_parents: directories left empty when the agent removes
a file (issue 9). Kept apart from test_writer.py, which another change owns."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.writer import DIR_MODE, FileSpec, Writer


@pytest.fixture
def root(shm_dir: Path) -> Path:
    return shm_dir / "out"


@pytest.fixture
def writer(root: Path) -> Writer:
    writer = Writer(str(root))
    writer.prepare()
    return writer


def put(writer: Writer, root: Path, relative: str) -> str:
    path = str(root / relative)
    writer.apply(FileSpec(path, b"x", os.geteuid(), os.getegid(), 0o400))
    return path


def test_empty_parents_are_removed_deepest_first(writer: Writer, root: Path) -> None:
    """Every directory the removal emptied goes, deepest first; the root stays."""
    path = put(writer, root, "a/b/c/f")
    writer.remove(path)
    assert writer.remove_empty_parents(path) == [str(root / "a/b/c"), str(root / "a/b"),
                                                 str(root / "a")]
    assert os.listdir(root) == []


def test_root_is_never_removed(writer: Writer, root: Path) -> None:
    """A file directly under the root leaves an empty root in place."""
    path = put(writer, root, "f")
    writer.remove(path)
    assert writer.remove_empty_parents(path) == []
    assert root.is_dir()


def test_pruning_stops_at_a_non_empty_directory(writer: Writer, root: Path) -> None:
    """A directory still holding something stops the pruning there."""
    path = put(writer, root, "a/b/f")
    put(writer, root, "a/other")
    writer.remove(path)
    assert writer.remove_empty_parents(path) == [str(root / "a/b")]
    assert os.listdir(root / "a") == ["other"]


def test_directory_with_another_mode_is_kept(writer: Writer, root: Path) -> None:
    """A directory not shaped as the writer makes it (the operator's 0750) is kept."""
    path = put(writer, root, "tls/f")
    os.chmod(root / "tls", 0o750)
    writer.remove(path)
    assert writer.remove_empty_parents(path) == []
    assert (root / "tls").is_dir()


def test_symlinked_parent_is_not_followed(writer: Writer, root: Path, shm_dir: Path) -> None:
    """A symlink where a parent was is neither followed nor removed, nor is its target."""
    elsewhere = shm_dir / "elsewhere"
    (elsewhere / "inner").mkdir(parents=True)
    for directory in (elsewhere, elsewhere / "inner"):
        os.chmod(directory, DIR_MODE)
    (root / "link").symlink_to(elsewhere)
    assert writer.remove_empty_parents(str(root / "link" / "inner" / "f")) == []
    assert (elsewhere / "inner").is_dir() and (root / "link").is_symlink()
