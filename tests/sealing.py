"""systemd-creds for tests, never with the machine's own host key.

``systemd-creds --with-key=auto`` reads (and on first use creates)
/var/lib/systemd/credential.secret. A test must neither create nor read that
file, so :func:`private_sealer` gives a :class:`~agent.cache.seal.Sealer`
whose command runs systemd-creds inside a private mount namespace
(``unshare --mount --propagation private``: nothing mounted there reaches
the host) with a directory of the test's own bind-mounted over
/var/lib/systemd. Each call gets a fresh namespace, and the directory, on
disk, keeps the key between calls; a second directory is a second machine
(another host key). The code under test runs the real tool with the real
arguments; only the argv's prefix differs.

Why a bind mount and not a tmpfs: ``--with-key=auto`` refuses a host key on
a temporary file system ("TPM2 not available and host key located on
temporary file system"), so the key directory must be on a disk-backed
file system: the test's tmp_path, or one under /var/tmp when that is tmpfs.

Why not SYSTEMD_CREDENTIAL_SECRET (systemd's variable naming another key
file): the sealer gives systemd-creds an environment of its own on purpose
(such variables also switch checks off), and a namespace cannot miss, where
a variable a future systemd ignored would fall back to the real key.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import pytest

from agent.base.landing import MEMORY_FILESYSTEMS, filesystem_type
from agent.cache.seal import SYSTEMD_CREDS, Sealer

HOST_KEY = Path("/var/lib/systemd/credential.secret")
# $0 is the key directory, "$@" the systemd-creds command line.
_IN_NAMESPACE = 'mount --bind "$0" /var/lib/systemd && exec "$@"'


def why_no_sealing() -> Optional[str]:
    """Why the real systemd-creds cannot run here in a private namespace, or None."""
    if os.geteuid() != 0:
        return "needs root (a private mount namespace, and systemd-creds's host key)"
    for tool in (SYSTEMD_CREDS, "unshare", "mount"):
        if shutil.which(tool) is None:
            return f"needs {tool} (systemd 250 or later, util-linux)"
    return None


def skip_without_sealing() -> None:
    reason = why_no_sealing()
    if reason:
        pytest.skip(reason)


def key_directory(parent: Path) -> Path:
    """A fresh, empty directory for one "machine's" host key, on a disk-backed
    file system (``parent`` unless it is tmpfs or ramfs, else /var/tmp)."""
    fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        in_memory = filesystem_type(fd) in MEMORY_FILESYSTEMS
    finally:
        os.close(fd)
    if in_memory:
        return Path(tempfile.mkdtemp(prefix="kv-agent-test-key-", dir="/var/tmp"))
    path = Path(tempfile.mkdtemp(prefix="key-", dir=parent))
    return path


def private_sealer(keys: Path, timeout_s: float = 10.0) -> Sealer:
    """A Sealer whose systemd-creds sees ``keys`` as /var/lib/systemd."""
    prefix = ("unshare", "--mount", "--propagation", "private", "sh", "-c", _IN_NAMESPACE,
              str(keys))
    return Sealer(command=prefix + (SYSTEMD_CREDS,), timeout_s=timeout_s)


def host_key_state() -> Optional[os.stat_result]:
    """The real host key's lstat (None if absent): a test compares it before
    and after, so that touching it cannot pass unseen."""
    try:
        return os.lstat(HOST_KEY)
    except FileNotFoundError:
        return None



NULL_KEY_PREFIX = b"BYRp2vb1QySABUnaD46i+"  # base64 of CRED_AES256_GCM_BY_NULL's id (05 84 69 da ...)


def null_key_copy(sealer: Sealer, name: str, plaintext: bytes) -> bytes:
    """``plaintext`` sealed under ``name`` with systemd-creds' null key, as anyone can
    make one (``--with-key=auto-initrd`` picks it where there is no TPM2; 252 has no
    ``--with-key=null``), in ``sealer``'s namespace. Skips where a TPM2 took its place."""
    import subprocess

    made = subprocess.run(  # noqa: S603 - an argv, no shell
        sealer.command + ("encrypt", "--with-key=auto-initrd", f"--name={name}", "-", "-"),
        input=plaintext, capture_output=True, env=dict(sealer.environ), timeout=30,
        check=True)
    if not made.stdout.startswith(NULL_KEY_PREFIX):
        pytest.skip("a TPM2 sealed it: no null-key copy on this machine")
    return made.stdout


def tool_unseals(sealer: Sealer, name: str, sealed: bytes) -> bytes:
    """What systemd-creds itself gives back for ``sealed`` (exit 0), bypassing the
    Sealer's own checks: to show what they stop."""
    import subprocess

    return subprocess.run(  # noqa: S603 - an argv, no shell
        sealer.command + ("decrypt", f"--name={name}", "-", "-"), input=sealed,
        capture_output=True, env=dict(sealer.environ), timeout=30, check=True).stdout
