"""``kv-agent status``: the daemon's status.json rendered for humans.

Pure: a document in, lines and an exit code out (the CLI prints them). The
exit code makes the command a health check: 0 when the agent runs and every
non-optional secret is current, 1 when one is failing or the agent has not
finished starting (not READY yet), 69 when no agent is running. A failing
optional secret is shown but fails nothing, as in the agent itself.

When no agent runs, the document is the last run's: the first line says when
that run stopped (or last wrote its status, if it died) and every secret's
mark reads "was ok", never a current-looking "ok" (issue 9).
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Mapping, Tuple

from agent.errors import EXIT_FAILURE, EXIT_OK, EXIT_UNAVAILABLE


def is_running(pid: Any) -> bool:
    """Whether a process with ``pid`` exists (it may belong to another user)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def render_status(document: Mapping[str, Any], path: str) -> Tuple[List[str], int]:
    """Lines describing the agent and each secret, and the exit code."""
    if not document:
        return [f"kv-agent is not running: no status in {path}"], EXIT_UNAVAILABLE
    pid = document.get("pid")
    running = document.get("state") != "stopped" and is_running(pid)
    secrets = [s for s in document.get("secrets", []) if isinstance(s, dict)]
    failing = [s for s in secrets if s.get("error")]
    required_failing = [s for s in failing if not s.get("optional")]
    if running:
        lines = [f"kv-agent is running (pid {pid}, {document.get('state')}): "
                 f"{document.get('status', '')}",
                 f"  manifest: {document.get('manifest')}",
                 f"  last refresh: {document.get('last_refresh') or 'never'}; "
                 f"next: {document.get('next_refresh') or '-'}"]
    else:
        lines = [_last_run_head(document),
                 f"  last status: {document.get('status', '')}",
                 f"  manifest: {document.get('manifest')}",
                 f"  last refresh: {document.get('last_refresh') or 'never'}"]
    if document.get("manifest_error"):
        lines.append(f"  manifest edit rejected: {document['manifest_error']}")
    if document.get("error"):
        lines.append(f"  refresh error: {document['error']}")
    for secret in secrets:
        mark = _mark(secret)
        if not running:
            mark = f"was {mark:4}"
        version = (secret.get("version") or "-")[:12]
        lines.append(f"  {mark:4} {secret.get('name')} -> {secret.get('path')} "
                     f"(version {version}, updated {secret.get('updated') or '-'})")
        if secret.get("error"):
            lines.append(f"       since {secret.get('error_since')}: {secret['error']}")
    if not running:
        return lines, EXIT_UNAVAILABLE
    # Still starting: the required files may not exist yet, so not healthy.
    is_starting = document.get("state") == "starting"
    return lines, (EXIT_FAILURE if required_failing or document.get("error") or is_starting
                   else EXIT_OK)


def _mark(secret: Dict[str, Any]) -> str:
    if not secret.get("error"):
        return "ok"
    return "warn" if secret.get("optional") else "FAIL"


def _last_run_head(document: Mapping[str, Any]) -> str:
    """The first line when no agent runs: whose lines these are, and from when."""
    when = document.get("saved_at") or "an unknown time"
    run = f"the last run (pid {document.get('pid')})"
    if document.get("state") == "stopped":
        ended = f"{run} stopped at {when}"
    else:
        ended = (f"{run} ended without stopping cleanly; its last status was written "
                 f"at {when}")
    return f"kv-agent is not running; {ended}; the lines below are from then"
