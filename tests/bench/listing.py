#!/usr/bin/env python3
"""Benchmark: requests per refresh, list-based against per-secret (issue 12).

One emulator holds a vault of N secrets (default 1,000); the manifest names
every one. Two agents (the real :class:`agent.sync.sync.Sync`, each keeping its
token cache across refreshes as the daemon does) run the same refreshes, one
with the freshness memory carried from refresh to refresh (list-based), one
without (per-secret: every refresh GETs every secret, as before issue 12):

1. the initial sync;
2. a refresh with nothing changed;
3. a refresh after R secrets (default 10) rotated;
4. a refresh with nothing changed again.

For each it prints the vault and IMDS requests, counted at the emulator, and
the wall time, side by side. Targets: an unchanged refresh of 1,000 costs at
most 40 vault requests and 0 IMDS requests, and at most 50 after 10 rotate.

Run: ``.venv/bin/python tests/bench/listing.py [--secrets 1000] [--rotate 10]
[--latency-ms 0]`` (as root: files are written with owner root). Loopback only.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from typing import Callable, List, Optional, Tuple

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from agent.emulator import Emulator  # noqa: E402
from agent.manifest import parse_manifest  # noqa: E402
from agent.sync.freshness import Freshness  # noqa: E402
from agent.sync.sync import Sync  # noqa: E402

Measure = Tuple[int, int, float]  # vault requests, IMDS requests, seconds


def _manifest_text(vault: str, directory: str, names: List[str]) -> str:
    lines = [f"vault: {vault}", f"directory: {directory}", "secrets:"]
    lines += [f"  - name: {name}" for name in names]
    return "\n".join(lines) + "\n"


def _measured(emulator: Emulator, work: Callable[[], object]) -> Measure:
    emulator.reset_stats()
    started = time.perf_counter()
    work()
    return emulator.vault_requests, emulator.imds_requests, time.perf_counter() - started


class _Runner:
    """One agent and its directory; ``is_listing`` carries the memory."""

    def __init__(self, emulator: Emulator, names: List[str], is_listing: bool) -> None:
        self.directory = tempfile.mkdtemp(prefix="kv-bench-", dir="/dev/shm")
        environ = {"KV_AGENT_IMDS_ENDPOINT": emulator.imds_endpoint,
                   "REQUESTS_CA_BUNDLE": emulator.ca_path, "NO_PROXY": "127.0.0.1"}
        manifest = parse_manifest(_manifest_text(emulator.vault_url, self.directory, names),
                                  "bench.yaml", check_filesystem=False)
        self.agent = Sync(manifest, environ=environ)
        self.agent.prepare()
        self.is_listing = is_listing
        self.memory = Freshness()

    def refresh(self) -> None:
        report = self.agent.sync(freshness=self.memory)
        assert not report.failures, [o.describe() for o in report.failures]
        if self.is_listing:
            self.memory = report.freshness

    def close(self) -> None:
        self.agent.close()
        shutil.rmtree(self.directory, ignore_errors=True)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--secrets", type=int, default=1000)
    parser.add_argument("--rotate", type=int, default=10)
    parser.add_argument("--latency-ms", type=int, default=0)
    args = parser.parse_args(argv)
    names = [f"bench-{number:05d}" for number in range(args.secrets)]
    # The vault's secrets were written long before the agent starts (a vault's
    # clock an hour back while they are made); rotations happen just before a
    # refresh, so the refresh after them confirms those once more (SETTLED_S).
    offset = [3600.0]
    with Emulator({name: f"value {name}" for name in names},
                  clock=lambda: time.time() - offset[0]) as emulator:
        offset[0] = 0.0
        emulator.latency_s = args.latency_ms / 1000
        listing = _Runner(emulator, names, is_listing=True)
        per_secret = _Runner(emulator, names, is_listing=False)
        try:
            rows = []
            for step in ("initial sync", "unchanged", f"{args.rotate} rotated", "unchanged"):
                if step.endswith("rotated"):
                    for name in names[:: max(1, args.secrets // args.rotate)][:args.rotate]:
                        emulator.set_secret(name, f"rotated {name} {time.time()}")
                rows.append((step, _measured(emulator, listing.refresh),
                             _measured(emulator, per_secret.refresh)))
        finally:
            listing.close()
            per_secret.close()
    print(f"vault of {args.secrets} secrets, manifest names all of them, "
          f"latency {args.latency_ms} ms per request")
    print(f"{'refresh':<16} {'list-based':>30}   {'per-secret':>30}")
    print(f"{'':<16} {'vault':>8} {'IMDS':>6} {'wall s':>12}   "
          f"{'vault':>8} {'IMDS':>6} {'wall s':>12}")
    for step, (lv, li, lt), (pv, pi, pt) in rows:
        print(f"{step:<16} {lv:>8} {li:>6} {lt:>12.3f}   {pv:>8} {pi:>6} {pt:>12.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
