#!/usr/bin/env python3
"""Benchmark: ``kv-agent once`` against the emulator at 20 ms per request,
100 and 1,000 secrets side by side with the floor.

Prints, from one run on one machine, for each size (``--sizes``):

* the median wall time of ``kv-agent once`` (a fresh process each time, as an
  operator or a boot script runs it), its peak RSS and IMDS requests per run;
* the median wall time of the floor (``floor.py``: a minimal Python client
  sending the same requests and writing the same files, without any check)
  and the ratio of the two; the runs of both are interleaved, so the load
  of a shared machine falls on both alike;

and, for the first size, the same job done the tutorial's way with curl: one
token from IMDS, then one ``curl`` per secret, one after another, each writing
its file, and the agent's speed-up over it.

Everything runs on loopback: the emulator is started here and every process
is pointed at it with KV_AGENT_IMDS_ENDPOINT. Targets: within 1.08x of the
floor (issue 17), at least 10x faster than curl, peak RSS at most 35 MB,
exactly 1 IMDS request (issue 3).

Run: ``.venv/bin/python tests/bench/once.py [--sizes 100,1000] [--latency-ms 20] [--runs 5]``
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
from typing import Dict, List, Mapping, NamedTuple, Tuple

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from benchlib import agent_command  # noqa: E402

from agent.emulator import Emulator  # noqa: E402

API_VERSION = "7.6"
FLOOR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "floor.py")


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


def _run_floor(manifest: str, env: Mapping[str, str], out_dir: str) -> Tuple[float, int]:
    """One run of the floor (``floor.py``) into an empty directory: (seconds, KiB)."""
    shutil.rmtree(out_dir, ignore_errors=True)
    elapsed, rss_kib, code = _timed_child([sys.executable, FLOOR, manifest], env)
    if code != 0:
        raise SystemExit(f"the floor failed with exit code {code}")
    return elapsed, rss_kib


class _Size(NamedTuple):
    """One size's manifests (the agent's and the floor's directories differ)."""

    secrets: int
    agent_manifest: str
    floor_manifest: str
    agent_dir: str
    floor_dir: str


def _sizes(work: str, vault: str, names: List[str], counts: List[int]) -> List[_Size]:
    sizes = []
    for count in counts:
        paths = [os.path.join(work, f"{who}-{count}.yaml") for who in ("agent", "floor")]
        dirs = [os.path.join(work, f"{who}-{count}") for who in ("agent", "floor")]
        for path, directory in zip(paths, dirs):
            with open(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600), "w") as handle:
                handle.write(_manifest(vault, directory, names[:count]))
        sizes.append(_Size(count, *paths, *dirs))
    return sizes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,1000",
                        help="comma-separated numbers of secrets, measured side by side")
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--no-tutorial", action="store_true",
                        help="skip the curl baseline (about 20 s)")
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    args = parser.parse_args()
    counts = [int(size) for size in args.sizes.split(",")]
    if not args.no_tutorial and not shutil.which("curl"):
        raise SystemExit("the tutorial baseline needs curl (or pass --no-tutorial)")

    names = [f"bench-secret-{i:04d}" for i in range(max(counts))]
    secrets: Dict[str, str] = {name: f"value-{i}-" + "x" * 40 for i, name in enumerate(names)}
    work = tempfile.mkdtemp(prefix="kv-agent-bench-", dir="/dev/shm")
    agent_runs: Dict[int, List[Tuple[float, int, int]]] = {count: [] for count in counts}
    floor_runs: Dict[int, List[Tuple[float, int]]] = {count: [] for count in counts}
    tutorial: List[float] = []
    curl_only: List[float] = []
    try:
        with Emulator(secrets, latency_s=args.latency_ms / 1000.0) as emulator:
            sizes = _sizes(work, emulator.vault_url, names, counts)
            env = dict(os.environ, KV_AGENT_IMDS_ENDPOINT=emulator.imds_endpoint,
                       REQUESTS_CA_BUNDLE=emulator.ca_path)
            for size in sizes:  # warm the page cache
                _run_agent(size.agent_manifest, env, emulator, size.agent_dir)
                _run_floor(size.floor_manifest, env, size.floor_dir)
            # Interleaved, the order flipped every run: the machine's other
            # load falls on the agent and the floor alike.
            for run in range(args.runs):
                for size in sizes:
                    for is_agent in (True, False) if run % 2 == 0 else (False, True):
                        if is_agent:
                            agent_runs[size.secrets].append(_run_agent(
                                size.agent_manifest, env, emulator, size.agent_dir))
                        else:
                            floor_runs[size.secrets].append(_run_floor(
                                size.floor_manifest, env, size.floor_dir))
            if not args.no_tutorial:
                tutorial, curl_only = _tutorials(emulator, names[:counts[0]], work)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    rows = [_figures(count, agent_runs[count], floor_runs[count]) for count in counts]
    print(f"kv-agent once benchmark: {args.latency_ms:g} ms added per request, loopback "
          f"emulator, medians of {args.runs} interleaved runs")
    print(f"  command: {' '.join(agent_command())}; floor: tests/bench/floor.py")
    print(f"  {'secrets':>7}  {'kv-agent once':>13}  {'python floor':>12}  {'ratio':>6}"
          f"  {'paired':>6}  {'peak RSS':>9}  {'floor RSS':>9}  IMDS/run")
    for row in rows:
        print(f"  {row['secrets']:>7}  {row['agent_once_median_s']:>11.3f} s"
              f"  {row['floor_median_s']:>10.3f} s  {row['ratio_to_floor']:>5.2f}x"
              f"  {row['paired_ratio_median']:>5.2f}x"
              f"  {row['agent_peak_rss_mib']:>5.1f} MiB  {row['floor_peak_rss_mib']:>5.1f} MiB"
              f"  {row['imds_requests_per_run']}")
    print("  ratio: of the medians; paired: the median of each run's own ratio (the agent and")
    print("  the floor run back to back, so a busy moment of a shared machine falls on both)")
    print("  targets: ratio <= 1.08x; peak RSS <= 35 MB for 100 secrets; 1 IMDS request per run")
    figures: Dict[str, object] = {"latency_ms": args.latency_ms, "runs": args.runs,
                                  "sizes": rows}
    if tutorial:
        agent_s = float(rows[0]["agent_once_median_s"])  # type: ignore[arg-type]
        tutorial_s, curl_s = statistics.median(tutorial), statistics.median(curl_only)
        parser_name = "jq" if shutil.which("jq") else "python3"
        print(f"  tutorial, {counts[0]} secrets: curl + {parser_name} {tutorial_s:.3f} s, "
              f"curl only {curl_s:.3f} s (medians of 3): kv-agent once is "
              f"{tutorial_s / agent_s:.1f}x and {curl_s / agent_s:.1f}x faster   target >= 10x")
        figures.update(tutorial_curl_extract_median_s=round(tutorial_s, 3),
                       tutorial_curl_only_median_s=round(curl_s, 3))
    if args.json:
        print(json.dumps(figures))
    return 0


def _figures(count: int, agent: List[Tuple[float, int, int]],
             floor: List[Tuple[float, int]]) -> Dict[str, object]:
    """One size's medians and ratio, as printed and as JSON."""
    agent_s = statistics.median(run[0] for run in agent)
    floor_s = statistics.median(run[0] for run in floor)
    return {
        "secrets": count,
        "agent_once_median_s": round(agent_s, 3),
        "agent_once_min_s": round(min(run[0] for run in agent), 3),
        "agent_once_max_s": round(max(run[0] for run in agent), 3),
        "floor_median_s": round(floor_s, 3),
        "ratio_to_floor": round(agent_s / floor_s, 3),
        "paired_ratio_median": round(statistics.median(
            run[0] / paired[0] for run, paired in zip(agent, floor)), 3),
        "agent_peak_rss_mib": round(max(run[1] for run in agent) / 1024.0, 1),
        "floor_peak_rss_mib": round(max(run[1] for run in floor) / 1024.0, 1),
        "imds_requests_per_run": sorted({run[2] for run in agent}),
    }


def _tutorials(emulator: Emulator, names: List[str], work: str) -> Tuple[List[float], List[float]]:
    """Three runs each of the tutorial's curl recipe, with and without jq."""
    curl_dir = os.path.join(work, "curl")
    full = _tutorial_script(emulator.imds_endpoint, emulator.vault_url,
                            emulator.ca_path, names, curl_dir)
    bare = _tutorial_curl_only(emulator.imds_endpoint, emulator.vault_url,
                               emulator.ca_path, names, curl_dir)
    return ([_run_tutorial(full, curl_dir) for _ in range(3)],
            [_run_tutorial(bare, curl_dir) for _ in range(3)])


if __name__ == "__main__":
    sys.exit(main())
