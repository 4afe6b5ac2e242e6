"""A reader process racing the writer: the one harness the tests that prove
"a reader never sees a partial file or half a set" share.

:func:`racing_reader` starts a reader script in its own process, waits until
it says ``ready``, lets the test write while the reader loops, then touches
the stop file and returns the reader's one-line JSON report. A process, not
a thread, so the reader really runs beside the writer (no GIL between them).

The reader protocol: the script gets the stop file as ``argv[1]`` and its
own arguments after it; it prints ``ready`` once it can read, loops until the
stop file exists, then prints one JSON object with at least ``reads``,
``problems`` (the first ten) and ``problem_count``. Two readers are here:
:data:`FILE_READER` (one path, read whole) and :data:`SET_READER` (a set's
directory opened once per read, every member read relative to it).
"""

from __future__ import annotations

import json
import select
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, Optional

READY_TIMEOUT_S = 15.0
REPORT_TIMEOUT_S = 30.0

# argv: stop, path, {content hex: [mode, uid, gid]}. Every read is one of the
# expected contents, complete, with the mode and owner that belong to it;
# "seen" counts the reads of each.
FILE_READER = r"""
import json, os, stat, sys
stop, path = sys.argv[1], sys.argv[2]
expected = {bytes.fromhex(k): tuple(v) for k, v in json.loads(sys.argv[3]).items()}
seen = {key: 0 for key in expected}
problems, reads = [], 0
while not os.path.exists(stop):
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        problems.append(f"open: {exc}")
        continue
    try:
        meta = os.fstat(fd)
        chunks = []
        while True:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(fd)
    data = b"".join(chunks)
    got = (stat.S_IMODE(meta.st_mode), meta.st_uid, meta.st_gid)
    if data not in expected:
        problems.append(f"partial or foreign content: {len(data)} bytes")
    elif expected[data] != got:
        problems.append(f"{len(data)} bytes with mode/owner {got}, want {expected[data]}")
    else:
        seen[data] += 1
    reads += 1
    if reads == 1:
        print("ready", flush=True)
print(json.dumps({"reads": reads, "seen": list(seen.values()), "problems": problems[:10],
                  "problem_count": len(problems)}), flush=True)
"""

# argv: stop, directory, [member names]. Each member holds "gen N ...": every
# read finds every member, all of one generation N; "generations" counts the
# distinct ones seen.
SET_READER = r"""
import json, os, sys
stop, directory = sys.argv[1], sys.argv[2]
members = json.loads(sys.argv[3])
reads, problems, generations = 0, [], set()
print("ready", flush=True)
while not os.path.exists(stop):
    try:
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        problems.append("directory missing")
        continue
    try:
        seen = []
        for name in members:
            try:
                fd = os.open(name, os.O_RDONLY, dir_fd=dir_fd)
            except FileNotFoundError:
                problems.append(f"{name} missing")
                break
            with os.fdopen(fd, "rb") as handle:
                seen.append(handle.read().split(b" ")[1])
        else:
            if len(set(seen)) != 1:
                problems.append(f"mismatch {seen!r}")
            generations.add(seen[0].decode())
            reads += 1
    finally:
        os.close(dir_fd)
print(json.dumps({"reads": reads, "generations": len(generations),
                  "problems": problems[:10], "problem_count": len(problems)}), flush=True)
"""


class Race:
    """One reader's run; ``report`` is its JSON report once the race ended."""

    def __init__(self) -> None:
        self.report: Dict[str, Any] = {}


@contextmanager
def racing_reader(script: str, *args: str, stop: Path,
                  cwd: Optional[Path] = None) -> Iterator[Race]:
    """Run ``script`` (a reader of the protocol above) with ``stop`` and
    ``args`` while the with-block writes; at its end stop the reader and
    fill the yielded :class:`Race`'s ``report``.

    Fails the test when the reader is not ready within READY_TIMEOUT_S, exits
    non-zero (its stderr in the message) or reports nothing within
    REPORT_TIMEOUT_S. The reader is killed whatever happens, so no test
    leaves one looping.
    """
    reader = subprocess.Popen([sys.executable, "-c", script, str(stop), *args],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd)
    race = Race()
    try:
        assert reader.stdout is not None
        ready, _, _ = select.select([reader.stdout], [], [], READY_TIMEOUT_S)
        assert ready and reader.stdout.readline() == b"ready\n", \
            f"the reader did not start: {reader.stderr}"
        yield race
        stop.touch()
        out, err = reader.communicate(timeout=REPORT_TIMEOUT_S)
    finally:
        if reader.poll() is None:
            reader.kill()
            reader.wait()
    assert reader.returncode == 0, err.decode()
    race.report = json.loads(out)
