#!/usr/bin/env python3
"""Benchmark: the CPU a refresh spends on the local check of its files (issue 17).

A refresh checks every file it wrote against the stamp taken after the write
(:func:`agent.sync.freshness.file_stamp`): one ``lstat`` for a file only root and
the agent may write, plus one read and one keyed BLAKE2b digest for a file
others may write (group- or other-writable, or owned by another user with the
write bit), which an edit through a shared mapping could change without
moving its ctime. This writes N files (default 1,000) to a fresh directory on
/dev/shm for each value size, then times the check of all of them, lstat only
(mode 0440) against verified by content (mode 0660), and prints the median
CPU time per refresh (``time.process_time``; wall time beside it) of
``--rounds`` rounds.

Run: ``.venv/bin/python tests/bench/stamps.py [--files 1000] [--rounds 21]``.
No network.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import List, Tuple

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from agent.sync.freshness import file_stamp  # noqa: E402

SIZES = (64, 4096, 25_000)  # a password, a PEM bundle, Key Vault's largest value
MODES = (("lstat only (0440)", 0o440), ("verified by content (0660)", 0o660))


def _write_files(directory: str, count: int, size: int, mode: int) -> List[str]:
    paths = []
    for number in range(count):
        path = os.path.join(directory, f"s{number}")
        with open(path, "wb") as handle:
            handle.write(os.urandom(size))
        os.chmod(path, mode)
        paths.append(path)
    return paths


def _one_refresh(paths: List[str]) -> Tuple[float, float]:
    """CPU and wall seconds to stamp every file once, as a refresh does."""
    cpu, wall = time.process_time(), time.perf_counter()
    for path in paths:
        if file_stamp(path) is None:
            raise SystemExit(f"{path}: no stamp")
    return time.process_time() - cpu, time.perf_counter() - wall


def measure(count: int, size: int, mode: int, rounds: int) -> Tuple[float, float]:
    """Median CPU and wall milliseconds per refresh of ``count`` files."""
    directory = tempfile.mkdtemp(prefix="kv-bench-stamps-", dir="/dev/shm")
    try:
        paths = _write_files(directory, count, size, mode)
        _one_refresh(paths)  # warm the dentry cache and the digest key
        samples = [_one_refresh(paths) for _ in range(rounds)]
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return (statistics.median(s[0] for s in samples) * 1000,
            statistics.median(s[1] for s in samples) * 1000)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=21)
    args = parser.parse_args()
    print(f"local check of {args.files} files per refresh, median of {args.rounds} rounds")
    print(f"{'value size':>10}  {'check':<27} {'CPU ms':>8} {'wall ms':>8} {'us/file':>8}")
    for size in SIZES:
        for label, mode in MODES:
            cpu_ms, wall_ms = measure(args.files, size, mode, args.rounds)
            print(f"{size:>10}  {label:<27} {cpu_ms:>8.1f} {wall_ms:>8.1f} "
                  f"{cpu_ms * 1000 / args.files:>8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
