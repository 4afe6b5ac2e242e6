"""Manifest watcher: every way of editing the manifest is noticed, nothing else."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Callable

import pytest

from agent.daemon.watch import ManifestWatcher


def settle(watcher: ManifestWatcher, timeout_s: float = 2.0) -> bool:
    """Poll the watcher until it reports a change or the timeout passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if watcher.read():
            return True
        time.sleep(0.02)
    return False


@pytest.fixture
def manifest(tmp_path: Path) -> Path:
    path = tmp_path / "manifest.yaml"
    path.write_text("a: 1\n")
    return path


def in_place(path: Path) -> None:
    with open(path, "r+") as handle:
        handle.write("b: 2\n")


def rename_replace(path: Path) -> None:
    temp = path.with_name(".manifest.yaml.swp")
    temp.write_text("c: 3\n")
    os.replace(temp, path)


def sed_in_place(path: Path) -> None:
    subprocess.run(["sed", "-i", "s/a: 1/a: 2/", str(path)], check=True)


@pytest.mark.parametrize("edit", [in_place, rename_replace, sed_in_place],
                         ids=["in-place", "rename-replace", "sed -i"])
def test_edits_are_noticed(manifest: Path, edit: Callable[[Path], None]) -> None:
    """An in-place write, an editor's rename and sed -i are all noticed."""
    watcher = ManifestWatcher(str(manifest))
    try:
        edit(manifest)
        assert settle(watcher)
        edit(manifest)  # and again, after the watches were renewed
        assert settle(watcher)
    finally:
        watcher.close()


def test_symlink_swap_and_target_edit_are_noticed(tmp_path: Path) -> None:
    """Swapping a symlinked manifest, then editing its new target, are both noticed."""
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "v1.yaml").write_text("v: 1\n")
    (configs / "v2.yaml").write_text("v: 2\n")
    etc = tmp_path / "etc"
    etc.mkdir()
    link = etc / "manifest.yaml"
    link.symlink_to(configs / "v1.yaml")
    watcher = ManifestWatcher(str(link))
    try:
        temp = etc / "manifest.yaml.new"
        temp.symlink_to(configs / "v2.yaml")
        os.replace(temp, link)  # what `ln -sfn` + `mv -T` does
        assert settle(watcher)
        (configs / "v2.yaml").write_text("v: 3\n")
        assert settle(watcher)
    finally:
        watcher.close()


def test_unrelated_files_are_ignored(manifest: Path) -> None:
    """Writing other files in the manifest's directory is not a manifest change."""
    watcher = ManifestWatcher(str(manifest))
    try:
        (manifest.parent / "other.yaml").write_text("x")
        assert not settle(watcher, 0.3)
    finally:
        watcher.close()


def test_deleted_then_recreated_manifest_is_noticed(manifest: Path) -> None:
    """Removing the manifest, and writing it again, are each a change."""
    watcher = ManifestWatcher(str(manifest))
    try:
        manifest.unlink()
        assert settle(watcher)
        manifest.write_text("again: 1\n")
        assert settle(watcher)
    finally:
        watcher.close()
