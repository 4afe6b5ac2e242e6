"""agent.transport is the one place that sends HTTP and reads bodies (issue 10)."""

from __future__ import annotations

import re
from pathlib import Path

AGENT = Path(__file__).resolve().parent.parent / "agent"
# Sending a request or reading a response body by any other road than
# transport.bounded_get would skip its size and total-time bounds.
HTTP_USE = re.compile(
    r"\bsession\.(get|post|request|send)\(|\brequests\.(get|post|request)\(|"
    r"\.iter_content\(|\.raw\.(read|stream)\(|\.json\(\)|\burlopen\(")


def test_only_transport_sends_requests_and_reads_bodies() -> None:
    """Identity and vault code reach the network only through transport.bounded_get (the
    emulator and demo, which serve or drive it, are not the agent's path)."""
    offenders = []
    for path in sorted(AGENT.rglob("*.py")):
        relative = path.relative_to(AGENT).as_posix()
        if relative == "transport.py" or "emulator" in relative or relative == "demo.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if HTTP_USE.search(line):
                offenders.append(f"agent/{relative}:{number}: {line.strip()}")
    assert offenders == []
    uses = {path.name for path in AGENT.glob("*.py") if "bounded_get(" in path.read_text()}
    assert {"token_request.py", "vault.py"} <= uses
