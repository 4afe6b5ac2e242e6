#!/usr/bin/env python3
"""Benchmark: ``kv-agent once`` for 100 secrets against the emulator at 20 ms per request.

Prints, from one run on one machine:

* the median wall time of ``kv-agent once`` (a fresh process each time, as an
  operator or a boot script runs it), its peak RSS and IMDS requests per run;
* the same job done the tutorial's way with curl: one token from IMDS, then one
  ``curl`` per secret, one after another, each writing its file;
* the ratio of the two.

Everything runs on loopback: the emulator is started here and every process
is pointed at it with KV_AGENT_IMDS_ENDPOINT. Targets (issue 3): at most 0.6 s,
at least 10x faster than curl, peak RSS at most 35 MB, exactly 1 IMDS request.

Run: ``.venv/bin/python tests/bench/once.py [--secrets 100] [--latency-ms 20] [--runs 7]``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Mapping, Tuple

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from benchlib import agent_command  # noqa: E402

from agent.emulator import Emulator  # noqa: E402

API_VERSION = "7.6"


def _manifest(vault: str, directory: str, names: List[str]) -> str:
    lines = [f"vault: {vault}", f"directory: {directory}", "secrets:"]
    for name in names:
        lines += [f"  - name: {name}", '    mode: "0400"']
    return "\n".join(lines) + "\n"


# Measures one child from a small launcher process: a child forked from this
# (large) benchmark process would inherit its high-water RSS, because Linux
# carries ru_maxrss across fork and execve.
_LAUNCHER = """
import json, os, sys, time
started = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print(json.dumps([time.perf_counter() - started, usage.ru_maxrss,
                  os.waitstatus_to_exitcode(status)]))
"""


def _timed_child(argv: List[str], env: Mapping[str, str]) -> Tuple[float, int, int]:
    """(wall seconds, peak RSS in KiB, exit code) of one child process."""
    done = subprocess.run([sys.executable, "-c", _LAUNCHER, *argv], env=dict(env),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=False)
    if done.returncode != 0 or not done.stdout.strip():
        sys.stderr.write(done.stderr.decode(errors="replace"))
        return 0.0, 0, done.returncode or 1
    elapsed, rss_kib, code = json.loads(done.stdout.decode().splitlines()[-1])
    if code != 0:
        sys.stderr.write(done.stderr.decode(errors="replace"))
    return float(elapsed), int(rss_kib), int(code)


def _run_agent(manifest: str, env: Mapping[str, str], emulator: Emulator,
               out_dir: str) -> Tuple[float, int, int]:
    """One cold ``kv-agent once`` into an empty directory: (seconds, KiB, IMDS calls)."""
    shutil.rmtree(out_dir, ignore_errors=True)
    before = emulator.imds_requests
    elapsed, rss_kib, code = _timed_child(
        [*agent_command(), "-q", "once", "--manifest", manifest], env)
    if code != 0:
        raise SystemExit(f"kv-agent once failed with exit code {code}")
    return elapsed, rss_kib, emulator.imds_requests - before


def _tutorial_script(imds: str, vault: str, ca: str, names: List[str], out_dir: str) -> str:
    """The tutorial's shell recipe: one token, then one curl per secret, in turn."""
    lines = [
        "set -eu",
        f"mkdir -p {out_dir}",
        f"token=$(curl -sf -H Metadata:true "
        f"'{imds}?api-version=2018-02-01&resource=https%3A%2F%2Fvault.azure.net' "
        "| python3 -c 'import json,sys; print(json.load(sys.stdin)[\"access_token\"])')",
    ]
    for name in names:
        lines.append(
            f"curl -sf --cacert {ca} -H \"Authorization: Bearer $token\" "
            f"'{vault}/secrets/{name}?api-version={API_VERSION}' "
            f"| {_extractor()} "
            f"> {out_dir}/{name}")
    return "\n".join(lines) + "\n"


def _extractor() -> str:
    """jq when installed (what tutorials use), else a python3 one-liner."""
    if shutil.which("jq"):
        return "jq -j .value"
    return "python3 -c 'import json,sys; sys.stdout.write(json.load(sys.stdin)[\"value\"])'"


def _run_tutorial(script: str, out_dir: str) -> float:
    shutil.rmtree(out_dir, ignore_errors=True)
    started = time.perf_counter()
    subprocess.run(["sh", "-c", script], check=True)
    return time.perf_counter() - started


def _tutorial_curl_only(imds: str, vault: str, ca: str, names: List[str], out_dir: str) -> str:
    """The same without the JSON parsing: curl alone, the kindest reading of the tutorial."""
    lines = ["set -eu", f"mkdir -p {out_dir}",
             f"token=$(curl -sf -H Metadata:true "
             f"'{imds}?api-version=2018-02-01&resource=https%3A%2F%2Fvault.azure.net' "
             "| sed 's/.*\"access_token\":\"\\([^\"]*\\)\".*/\\1/')"]
    for name in names:
        lines.append(f"curl -sf --cacert {ca} -H \"Authorization: Bearer $token\" "
                     f"-o {out_dir}/{name} '{vault}/secrets/{name}?api-version={API_VERSION}'")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--secrets", type=int, default=100)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    args = parser.parse_args()
    if not shutil.which("curl"):
        raise SystemExit("this benchmark needs curl for the tutorial baseline")

    names = [f"bench-secret-{i:03d}" for i in range(args.secrets)]
    secrets: Dict[str, str] = {name: f"value-{i}-" + "x" * 40 for i, name in enumerate(names)}
    work = tempfile.mkdtemp(prefix="kv-agent-bench-", dir="/dev/shm")
    try:
        with Emulator(secrets, latency_s=args.latency_ms / 1000.0) as emulator:
            out_dir = os.path.join(work, "secrets")
            manifest = os.path.join(work, "manifest.yaml")
            with open(os.open(manifest, os.O_WRONLY | os.O_CREAT, 0o600), "w") as handle:
                handle.write(_manifest(emulator.vault_url, out_dir, names))
            env = dict(os.environ, KV_AGENT_IMDS_ENDPOINT=emulator.imds_endpoint,
                       REQUESTS_CA_BUNDLE=emulator.ca_path)

            _run_agent(manifest, env, emulator, out_dir)  # warm the page cache
            agent_runs = [_run_agent(manifest, env, emulator, out_dir) for _ in range(args.runs)]
            times = [run[0] for run in agent_runs]
            peak_rss_mib = max(run[1] for run in agent_runs) / 1024.0
            imds_calls = sorted({run[2] for run in agent_runs})

            curl_dir = os.path.join(work, "curl")
            full = _tutorial_script(emulator.imds_endpoint, emulator.vault_url,
                                    emulator.ca_path, names, curl_dir)
            bare = _tutorial_curl_only(emulator.imds_endpoint, emulator.vault_url,
                                       emulator.ca_path, names, curl_dir)
            tutorial = [_run_tutorial(full, curl_dir) for _ in range(3)]
            curl_only = [_run_tutorial(bare, curl_dir) for _ in range(3)]
    finally:
        shutil.rmtree(work, ignore_errors=True)

    agent_s = statistics.median(times)
    tutorial_s = statistics.median(tutorial)
    curl_s = statistics.median(curl_only)
    figures = {
        "secrets": args.secrets, "latency_ms": args.latency_ms, "runs": args.runs,
        "agent_once_median_s": round(agent_s, 3),
        "agent_once_min_s": round(min(times), 3), "agent_once_max_s": round(max(times), 3),
        "tutorial_curl_extract_median_s": round(tutorial_s, 3),
        "tutorial_curl_only_median_s": round(curl_s, 3),
        "speedup_vs_tutorial": round(tutorial_s / agent_s, 1),
        "speedup_vs_curl_only": round(curl_s / agent_s, 1),
        "agent_peak_rss_mib": round(peak_rss_mib, 1),
        "imds_requests_per_run": imds_calls,
    }
    print(f"kv-agent once benchmark: {args.secrets} secrets, "
          f"{args.latency_ms:g} ms added per request, loopback emulator")
    print(f"  command: {' '.join(agent_command())}")
    print(f"  kv-agent once          median {agent_s:6.3f} s  "
          f"(min {min(times):.3f}, max {max(times):.3f}, {args.runs} runs)   target <= 0.6 s")
    parser_name = "jq" if shutil.which("jq") else "python3"
    print(f"  tutorial (curl + {parser_name:7}) median {tutorial_s:6.3f} s  (3 runs; extracts each value)")
    print(f"  tutorial (curl only)   median {curl_s:6.3f} s  (3 runs; files hold the JSON)")
    print(f"  speed-up               {tutorial_s / agent_s:6.1f}x vs curl + {parser_name}, "
          f"{curl_s / agent_s:.1f}x vs curl only   target >= 10x")
    print(f"  peak RSS               {peak_rss_mib:6.1f} MiB   target <= 35 MB")
    print(f"  IMDS requests per run  {imds_calls}   target [1]")
    if args.json:
        print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
