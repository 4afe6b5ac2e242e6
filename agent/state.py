"""The agent's own state under ``/run/kv-agent``: ``status.json``.

One JSON document, replaced atomically after every change, serves two readers:

* operators and health checks, through ``kv-agent status`` (or ``jq``): per
  secret its path, version, last update and last error; the last and next
  refresh;
* the agent itself after a restart or reload: ``written`` lists the files
  this agent wrote (path -> inode), so a secret removed from the manifest has
  its file deleted only if it is still the very file the agent wrote, never
  anything else.

It holds no secret value and no token: paths, versions and error messages
only, so it is world-readable (0644) like systemd's own state under /run.
The output directory holds only the manifest's files; nothing here goes there.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Dict, Mapping, Optional

from agent.errors import KvAgentError

DEFAULT_STATE_DIR = "/run/kv-agent"
STATE_DIR_ENV = "KV_AGENT_STATE_DIR"
STATUS_FILE = "status.json"
STATUS_VERSION = 1


def state_dir(environ: Mapping[str, str], given: Optional[str] = None) -> str:
    """``--state-dir``, else ``$KV_AGENT_STATE_DIR``, else /run/kv-agent."""
    return given or environ.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR


def iso_time(epoch_s: Optional[float]) -> Optional[str]:
    """UTC ISO 8601 with seconds, or None."""
    if epoch_s is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch_s))


class StateStore:
    """Reads and atomically replaces ``<directory>/status.json``."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.path = os.path.join(directory, STATUS_FILE)

    def prepare(self) -> None:
        """Create the directory (0755) if needed; raise KvAgentError if unusable."""
        try:
            os.makedirs(self.directory, mode=0o755, exist_ok=True)
        except OSError as exc:
            raise KvAgentError(f"cannot create state directory {self.directory}: "
                               f"{exc.strerror}", "pass --state-dir with a writable "
                               "directory, or run as root") from None

    def load(self) -> Dict[str, Any]:
        """The last status document, or {} when there is none or it is unreadable."""
        try:
            with open(self.path, "rb") as handle:
                data = json.loads(handle.read(4 * 1024 * 1024))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def save(self, document: Mapping[str, Any]) -> None:
        """Replace the status file atomically: temp file, fsync, rename."""
        payload = json.dumps(document, indent=2, sort_keys=True).encode() + b"\n"
        temp = os.path.join(self.directory, f".{STATUS_FILE}.{os.getpid()}.tmp")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o644)
        try:
            os.fchmod(fd, 0o644)  # open(2)'s mode is filtered by the umask
            os.write(fd, payload)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, self.path)


def read_written(document: Mapping[str, Any]) -> Dict[str, int]:
    """The ``written`` map (path -> inode) of a status document, validated."""
    written = document.get("written")
    if not isinstance(written, dict):
        return {}
    return {path: inode for path, inode in written.items()
            if isinstance(path, str) and isinstance(inode, int)}
