#!/usr/bin/env python3
"""How long after exec a SIGHUP still kills ``kv-agent run`` (issue 17, item 15).

SIGHUP's default action ends a process. ``kv-agent run`` routes it to a flag
first thing (agent/daemon/signals.py), but the interpreter's own start-up and the
import of the command line come before any kv-agent code can: that is the
residual window. This starts ``kv-agent run`` again and again and measures,
for each start, the time from the exec to the moment the process has a
SIGHUP handler (the SigCgt mask of /proc/PID/status, polled every 0.2 ms),
then checks both sides of it: a SIGHUP sent at once kills a fresh process, one
sent once the handler is there does not (the agent takes it as a reload).

It can be run as a script against any launcher (``--command``, default: this
venv's entry point), and tests/system runs :func:`measure` inside booted
Debian 12 and 13 against the installed /usr/bin/kv-agent (copying this file
in: it imports nothing but the standard library). Everything stays on
loopback: IMDS and the vault are closed loopback ports, the output directory
is a fresh one on /dev/shm.

Run: ``.venv/bin/python tests/bench/early_sighup.py [--starts 20] [--command PATH]``
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence

SIGHUP_BIT = 1 << (signal.SIGHUP - 1)


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def catches_sighup(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) & SIGHUP_BIT)
    except OSError:
        pass
    return False


def handler_after_s(argv: Sequence[str], env: Dict[str, str]) -> Optional[float]:
    """Seconds from the exec to a SIGHUP handler (None: it never came), then stops it."""
    started = time.perf_counter()
    process = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    found = None
    try:
        while time.perf_counter() - started < 10.0 and process.poll() is None:
            if catches_sighup(process.pid):
                found = time.perf_counter() - started
                break
            time.sleep(0.0002)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=15)
    return found


def killed_by_sighup(argv: Sequence[str], env: Dict[str, str], wait_handler: bool) -> bool:
    """Whether a SIGHUP (at once, or once the handler is there) ended the process."""
    process = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.perf_counter() + 10.0
    while wait_handler and not catches_sighup(process.pid) and time.perf_counter() < deadline:
        time.sleep(0.0002)
    process.send_signal(signal.SIGHUP)
    try:
        code = process.wait(timeout=1.0)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=15)
    return code == -signal.SIGHUP


def measure(command: str, starts: int) -> Dict[str, float]:
    """The window over ``starts`` starts of ``command run``: median and max in ms,
    and the two checks (1.0: held)."""
    work = tempfile.mkdtemp(prefix="kv-agent-sighup-", dir="/dev/shm")
    try:
        manifest = os.path.join(work, "manifest.yaml")
        with open(manifest, "w", encoding="utf-8") as handle:
            handle.write(f"vault: https://127.0.0.1:{closed_port()}\n"
                         f"directory: {work}/out\nsecrets:\n  - name: early\n")
        os.chmod(manifest, 0o600)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8",
               "KV_AGENT_IMDS_ENDPOINT": f"http://127.0.0.1:{closed_port()}"
                                         "/metadata/identity/oauth2/token"}
        argv = [command, "run", "--manifest", manifest, "--state-dir", f"{work}/state"]
        found = [handler_after_s(argv, env) for _ in range(starts)]
        windows: List[float] = [1000 * s for s in found if s is not None]
        if len(windows) != starts:
            raise RuntimeError(f"{command}: {starts - len(windows)} starts never caught SIGHUP")
        return {"median_ms": statistics.median(windows), "max_ms": max(windows),
                "at_once_kills": float(killed_by_sighup(argv, env, wait_handler=False)),
                "after_handler_survives": float(not killed_by_sighup(argv, env,
                                                                     wait_handler=True))}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--starts", type=int, default=20)
    parser.add_argument("--command", default=os.path.join(os.path.dirname(sys.executable),
                                                          "kv-agent"))
    args = parser.parse_args()
    figures = measure(args.command, args.starts)
    print(f"{args.command} run: SIGHUP handler {figures['median_ms']:.0f} ms after exec "
          f"(median of {args.starts}, max {figures['max_ms']:.0f} ms); a SIGHUP at once "
          f"{'kills it' if figures['at_once_kills'] else 'did not kill it'}, one after the "
          f"handler {'is a reload' if figures['after_handler_survives'] else 'KILLED it'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
