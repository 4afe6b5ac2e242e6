"""The agent's own state under ``/run/kv-agent``: ``status.json``, stored.

This module is the storage (a private directory, an atomic replace); what the
document holds is :class:`agent.status.snapshot.StatusSnapshot`, and the ledger of
written files in it is :mod:`agent.daemon.ledger`. One JSON document, replaced
atomically after every change, serves two readers:

* operators and health checks, through ``kv-agent status`` (or ``jq``): per
  entry its paths, version, last update and last error; the last and next
  refresh;
* the agent itself after a restart, a reload or an upgrade: ``written`` lists
  the files this agent wrote (path -> inode and entry), so an entry removed
  from the manifest has its files deleted only if they are still the very
  files the agent wrote, never anything else.

It holds no secret value and no token, but it names every secret and its
path, which consumers must not learn: /run/secrets is 0751 precisely so that
they cannot list it. So the file is 0600, root's (the agent's user's) alone,
and the directory 0711: no one else may list it, but node_exporter's user may
pass through to ``metrics/`` (the default of ``metrics: true``, 0755, see
:mod:`agent.daemon.metrics`). :meth:`StateStore.prepare` tightens what an older
version left world-readable (issue 9). A non-root ``kv-agent status`` gets
PermissionDeniedError, not "not running".
The output directory holds only the manifest's files; nothing here goes there.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
from typing import Any, Dict, Mapping, Optional

from agent.base.errors import KvAgentError, PermissionDeniedError
from agent.status.snapshot import StatusSnapshot

log = logging.getLogger(__name__)

DEFAULT_STATE_DIR = "/run/kv-agent"
STATE_DIR_ENV = "KV_AGENT_STATE_DIR"
STATUS_FILE = "status.json"
STATE_DIR_MODE = 0o711  # traverse only: metrics/ is reached, status.json (0600) is not
STATUS_FILE_MODE = 0o600


def state_dir(environ: Mapping[str, str], given: Optional[str] = None) -> str:
    """``--state-dir``, else ``$KV_AGENT_STATE_DIR``, else /run/kv-agent."""
    return given or environ.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR


class StateStore:
    """Reads and atomically replaces ``<directory>/status.json``."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.path = os.path.join(directory, STATUS_FILE)

    def prepare(self) -> None:
        """Create the directory if needed; make it STATE_DIR_MODE and an existing
        status file STATUS_FILE_MODE. Raises KvAgentError when the directory
        cannot be made or is another user's (who could loosen it again)."""
        try:
            os.makedirs(self.directory, mode=STATE_DIR_MODE, exist_ok=True)
            fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                         | os.O_CLOEXEC)
        except OSError as exc:
            raise KvAgentError(f"cannot use state directory {self.directory}: "
                               f"{exc.strerror}", "pass --state-dir with a writable "
                               "directory, or run as root") from None
        try:
            st = os.fstat(fd)
            if st.st_uid != os.geteuid():
                raise KvAgentError(
                    f"state directory {self.directory} is owned by uid {st.st_uid}, "
                    "not the agent's user", "remove it (kv-agent recreates it) or "
                    "pass --state-dir with a directory of your own")
            if stat.S_IMODE(st.st_mode) != STATE_DIR_MODE:
                os.fchmod(fd, STATE_DIR_MODE)  # makedirs applies the umask; older 0755/0700
            _make_private(STATUS_FILE, fd)
        except OSError as exc:
            raise KvAgentError(f"cannot make state directory {self.directory} private: "
                               f"{exc.strerror}", "run as root") from None
        finally:
            os.close(fd)

    def tighten_again(self) -> None:
        """:meth:`prepare` again at a reload; never fatal (a failure is logged).
        systemd sets a RuntimeDirectory= back to the unit's RuntimeDirectoryMode=
        (0751, which /run/secrets needs) for every process it starts, ExecReload='s
        too, just before that process sends the SIGHUP; left so, 0711 (the promise
        of docs/design/lifecycle.md) would hold only until the first reload."""
        try:
            self.prepare()
        except KvAgentError as exc:
            log.warning("%s", exc)

    def load(self) -> Dict[str, Any]:
        """The last status document, or {} when there is none or it is corrupt.

        Raises PermissionDeniedError when this user may not read it: that
        means "ask root", not "no agent".
        """
        try:
            with open(self.path, "rb") as handle:
                data = json.loads(handle.read(4 * 1024 * 1024))
        except PermissionError:
            raise PermissionDeniedError(f"cannot read {self.path}: permission denied",
                                        "run as root (sudo kv-agent status)") from None
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def publish(self, snapshot: StatusSnapshot) -> StatusSnapshot:
        """Save ``snapshot`` as status.json; a failure is logged (the agent
        goes on: the file is for people and tools, not for the agent)."""
        try:
            self.save(snapshot.as_json())
        except OSError as exc:
            log.warning("cannot write %s: %s", self.path, exc.strerror)
        return snapshot

    def save(self, document: Mapping[str, Any]) -> None:
        """Replace the status file atomically: temp file, fsync, rename."""
        payload = json.dumps(document, indent=2, sort_keys=True).encode() + b"\n"
        temp = os.path.join(self.directory, f".{STATUS_FILE}.{os.getpid()}.tmp")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
                     | os.O_CLOEXEC, STATUS_FILE_MODE)
        try:
            os.fchmod(fd, STATUS_FILE_MODE)  # a leftover temp may have another mode
            os.write(fd, payload)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, self.path)


def _make_private(name: str, dir_fd: int) -> None:
    """chmod ``name`` (a regular file in ``dir_fd``) to STATUS_FILE_MODE,
    through an O_NOFOLLOW descriptor: a symlink planted there is left alone
    (the next save replaces it by rename anyway)."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ELOOP):
            return
        raise
    try:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) != STATUS_FILE_MODE:
            os.fchmod(fd, STATUS_FILE_MODE)
    finally:
        os.close(fd)
