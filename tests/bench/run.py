#!/usr/bin/env python3
"""Benchmark and soak of ``kv-agent run`` against the loopback emulator.

Prints, from one run on one machine:

1. time from process start to READY=1 for 100 secrets with 20 ms added per
   request (median of several starts; target at most 0.7 s), next to the
   bare interpreter start-up measured in the same run, as a floor;
2. CPU seconds the agent uses over an idle minute after READY (target under
   0.05 s), and how many times its threads woke up; its RSS a second after
   READY and after the idle minute (target at most 35 MiB with plain
   secrets: issue 17, item 21);
3. the soak: RSS after 100 and after 10,000 refresh cycles (target at most
   35 MB, growth under 2 MB). A cycle is driven by SIGHUP with an unchanged
   manifest, which refreshes every secret with the agent's existing sessions
   and token, exactly like a timer refresh (plus one manifest read). READY=1
   comes as soon as the manifest is read (issue 17); the cycle ends when
   status.json says the refresh is over ("refreshing": false). Every 10th
   cycle rotates a secret so files are rewritten too.

Everything runs on loopback; the agent is pointed at the emulator through
KV_AGENT_IMDS_ENDPOINT and REQUESTS_CA_BUNDLE.

Run: ``.venv/bin/python tests/bench/run.py [--cycles 10000] [--idle-s 60]``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from benchlib import agent_command  # noqa: E402

from agent.emulator import Emulator  # noqa: E402

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class Sync:
    """One ``kv-agent run`` process with a notify socket of its own."""

    def __init__(self, work: str, manifest: str, env: Dict[str, str]) -> None:
        self.work = work
        self.socket_path = os.path.join(work, "notify.sock")
        if os.path.exists(self.socket_path):
            os.unlink(self.socket_path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.socket_path)
        self.started = time.perf_counter()
        self.process = subprocess.Popen(
            [*agent_command(), "-q", "run", "--manifest", manifest,
             "--state-dir", os.path.join(work, "state")],
            env=dict(env, NOTIFY_SOCKET=self.socket_path), stderr=subprocess.PIPE)

    def wait_for(self, field: str, timeout_s: float = 60.0) -> float:
        """Seconds since start when a datagram carrying ``field`` arrived."""
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.process.poll() is not None:
                raise SystemExit(f"no {field} from the agent (exit {self.process.poll()}): "
                                 + self._stderr())
            self.sock.settimeout(remaining)
            try:
                message = self.sock.recv(4096).decode()
            except socket.timeout:
                continue
            if field in message.split("\n"):
                return time.perf_counter() - self.started

    def wait_refreshed(self, timeout_s: float = 60.0) -> None:
        """Until status.json says no refresh runs (its "refreshing")."""
        path = os.path.join(self.work, "state", "status.json")
        deadline = time.monotonic() + timeout_s
        while True:
            with open(path, encoding="utf-8") as handle:
                if json.load(handle).get("refreshing") is False:
                    return
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise SystemExit("the refresh after a reload did not end: " + self._stderr())
            time.sleep(0.002)

    def _stderr(self) -> str:
        if self.process.poll() is None:
            self.process.kill()
        assert self.process.stderr is not None
        return self.process.stderr.read().decode(errors="replace")[-2000:]

    def cpu_s(self) -> float:
        with open(f"/proc/{self.process.pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime

    def wakeups(self) -> int:
        """Context switches of every thread: how often the process ran at all."""
        total = 0
        for task in os.listdir(f"/proc/{self.process.pid}/task"):
            with open(f"/proc/{self.process.pid}/task/{task}/status") as handle:
                for line in handle:
                    if "ctxt_switches:" in line:  # voluntary and nonvoluntary
                        total += int(line.split()[1])
        return total

    def rss_mib(self) -> float:
        with open(f"/proc/{self.process.pid}/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
        return 0.0

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(10)
        finally:
            self.sock.close()
            if self.process.stderr is not None:
                self.process.stderr.close()
        return code


def write_manifest(path: str, vault: str, directory: str, names: List[str],
                   refresh: str) -> None:
    lines = [f"vault: {vault}", f"directory: {directory}", f"refresh: {refresh}",
             "secrets:"]
    for name in names:
        lines += [f"  - name: {name}", '    mode: "0400"']
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as handle:
        handle.write("\n".join(lines) + "\n")


def interpreter_floor(runs: int) -> float:
    """Median start-up of ``python -c 'import requests, yaml'``: what no agent beats."""
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import requests, yaml"], check=True)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--secrets", type=int, default=100)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--starts", type=int, default=7)
    parser.add_argument("--idle-s", type=float, default=60.0)
    parser.add_argument("--cycles", type=int, default=10_000)
    parser.add_argument("--soak-secrets", type=int, default=10)
    args = parser.parse_args()

    names = [f"bench-secret-{i:03d}" for i in range(args.secrets)]
    work = tempfile.mkdtemp(prefix="kv-agent-bench-run-", dir="/dev/shm")
    try:
        with Emulator({n: f"value-{n}" for n in names},
                      latency_s=args.latency_ms / 1000.0) as emulator:
            env = dict(os.environ, KV_AGENT_IMDS_ENDPOINT=emulator.imds_endpoint,
                       REQUESTS_CA_BUNDLE=emulator.ca_path)
            out = os.path.join(work, "secrets")
            manifest = os.path.join(work, "manifest.yaml")
            write_manifest(manifest, emulator.vault_url, out, names, "1h")

            print(f"kv-agent run benchmark: {args.secrets} secrets, "
                  f"{args.latency_ms:g} ms added per request, loopback emulator")
            print(f"  command: {' '.join(agent_command())}")
            floor = interpreter_floor(5)
            ready: List[float] = []
            for _ in range(args.starts):
                shutil.rmtree(out, ignore_errors=True)
                shutil.rmtree(os.path.join(work, "state"), ignore_errors=True)
                agent = Sync(work, manifest, env)
                ready.append(agent.wait_for("READY=1"))
                agent.stop()
            print(f"  start to READY=1     median {statistics.median(ready):.3f} s "
                  f"(min {min(ready):.3f}, max {max(ready):.3f}, {args.starts} starts)"
                  f"   target <= 0.7 s")
            print(f"  floor: python + import requests, yaml  {floor:.3f} s")

            agent = Sync(work, manifest, env)
            agent.wait_for("READY=1")
            time.sleep(1.0)  # let the last log line and status write settle
            cpu0, wake0, rss_idle0 = agent.cpu_s(), agent.wakeups(), agent.rss_mib()
            time.sleep(args.idle_s)
            cpu = agent.cpu_s() - cpu0
            wakes = agent.wakeups() - wake0
            print(f"  idle {args.idle_s:g} s             CPU {cpu:.3f} s, {wakes} wakeups"
                  "   target CPU < 0.05 s")
            print(f"  idle RSS             {rss_idle0:.1f} MiB after READY=1, "
                  f"{agent.rss_mib():.1f} MiB after the idle time   target <= 35 MiB")
            agent.stop()

            soak(args, emulator, env, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def soak(args: argparse.Namespace, emulator: Emulator, env: Dict[str, str],
         work: str) -> None:
    """RSS after 100 and after ``args.cycles`` refresh cycles."""
    emulator.latency_s = 0.0
    names = [f"soak-{i:03d}" for i in range(args.soak_secrets)]
    for name in names:
        emulator.set_secret(name, f"soak-value-{name}")
    out = os.path.join(work, "soak")
    manifest = os.path.join(work, "soak.yaml")
    write_manifest(manifest, emulator.vault_url, out, names, "1h")
    shutil.rmtree(os.path.join(work, "state"), ignore_errors=True)
    agent = Sync(work, manifest, env)
    agent.wait_for("READY=1")
    rss: Dict[int, float] = {0: agent.rss_mib()}
    started = time.perf_counter()
    imds_before = emulator.imds_requests
    for cycle in range(1, args.cycles + 1):
        if cycle % 10 == 0:
            emulator.set_secret(names[cycle % len(names)], f"rotated-{cycle}")
        agent.process.send_signal(signal.SIGHUP)
        agent.wait_for("READY=1", timeout_s=60.0)
        agent.wait_refreshed()  # READY=1 came before the refresh
        if cycle in (100, 1000) or cycle == args.cycles:
            rss[cycle] = agent.rss_mib()
    elapsed = time.perf_counter() - started
    code = agent.stop()
    last = max(rss)
    print(f"  soak: {args.cycles} refresh cycles of {args.soak_secrets} secrets in "
          f"{elapsed:.0f} s ({elapsed / max(args.cycles, 1) * 1000:.1f} ms per cycle), "
          f"{emulator.imds_requests - imds_before} IMDS requests, exit {code}")
    figures = ", ".join(f"{k} cycles {v:.1f} MiB" for k, v in sorted(rss.items()))
    growth = rss[last] - rss.get(100, rss[0])
    print(f"  RSS: {figures}")
    print(f"  RSS growth from cycle 100 to {last}: {growth:+.2f} MiB   "
          "target <= 35 MB, growth < 2 MB")


if __name__ == "__main__":
    sys.exit(main())
