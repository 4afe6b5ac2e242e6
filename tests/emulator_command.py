"""``kv-agent emulator`` as a test runs it: a subprocess on loopback, its banner
read, and the process always stopped and its pipes closed afterwards."""

from __future__ import annotations

import queue
import re
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict, Iterator, Mapping, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parent.parent
BANNER = {"imds": r"^\s*IMDS token endpoint:\s+(\S+)", "vault": r"^\s*vault:\s+(\S+)",
          "ca": r"^\s*CA certificate:\s+(\S+)"}


def read_banner(process: "subprocess.Popen[str]", timeout_s: float = 20.0,
                on_line: Callable[[str], None] = lambda line: None) -> Dict[str, str]:
    """Read the banner until 'Stop with Ctrl-C.'; returns its imds, vault and ca."""
    lines: "queue.Queue[Optional[str]]" = queue.Queue()
    assert process.stdout is not None
    stdout = process.stdout

    def pump() -> None:
        for line in stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    found: Dict[str, str] = {}
    deadline = time.monotonic() + timeout_s
    while True:
        line = lines.get(timeout=max(0.01, deadline - time.monotonic()))
        assert line is not None, f"the emulator exited early: {found}"
        on_line(line)
        for key, pattern in BANNER.items():
            match = re.match(pattern, line)
            if match and key not in found:
                found[key] = match.group(1)
        if line.startswith("Stop with Ctrl-C."):
            return found


@contextmanager
def emulator_command(secrets_file: Path, *args: str, env: Mapping[str, str],
                     on_line: Callable[[str], None] = lambda line: None
                     ) -> Iterator[Tuple["subprocess.Popen[str]", Dict[str, str]]]:
    """Run ``kv-agent emulator --secrets FILE ARGS`` from this checkout; yields the
    process and its banner. However the test ends, the process is gone afterwards."""
    argv: Sequence[str] = [sys.executable, "-m", "agent", "emulator",
                           "--secrets", str(secrets_file), *args]
    process = subprocess.Popen(argv, env=dict(env), cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        yield process, read_banner(process, on_line=on_line)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()
