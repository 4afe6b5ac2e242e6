"""Sealing with ``systemd-creds``: the cache's only cryptography.

A copy is sealed to this machine by systemd's own tool, format and key
handling (``--with-key=auto``: TPM2 and the host key where a TPM2 is present,
else the host key in /var/lib/systemd/credential.secret, which the first
``encrypt`` creates). ``--name=`` binds a copy to its entry (decrypting it
under another name is refused) and ``--not-after=`` ends its life at
``max_age`` (decrypting it later is refused). kv-agent adds no cipher, key
or MAC of its own; it only reads, before decrypting, which key sealed a
copy, and refuses any that ``--with-key=auto`` never uses: systemd-creds
decrypts a copy sealed with its null key (no secret at all), which anyone
who can write the cache directory could plant.

Requires systemd 250 or later (``systemd-creds`` and its ``--name=``,
``--not-after=`` and ``--with-key=auto`` arrived together in 250); checked
against 252 (Debian 12) and written for 257 (Debian 13).

Every call runs without a shell, plaintext on stdin and the result on
stdout (never a value on the command line, where ``ps`` shows it), bounded
in time (:data:`TIMEOUT_S`) and in output, with an environment of our own:
``SYSTEMD_CREDENTIAL_VALIDATE_NAME=0`` or ``..._NOT_AFTER=0`` inherited from
anywhere would switch off exactly the checks a copy relies on.
"""

from __future__ import annotations

import base64
import binascii
import os
import selectors
import subprocess
import time
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from agent.base.errors import SealRefusedError, SealTimeoutError, SealToolMissingError
from agent.base.untrusted import escape

SYSTEMD_CREDS = "systemd-creds"
MIN_SYSTEMD = 250  # systemd-creds with --name=, --not-after= and --with-key=auto
TIMEOUT_S = 10.0  # a TPM2 answers in well under a second; a stuck one must not hold the start
# What we seal, at most: systemd 252's encrypt takes up to 1 MiB, but its decrypt reads at
# most 1,179,648 bytes of base64 (about 860 KiB of plaintext); below both, so that every
# copy sealed can be unsealed. A Key Vault secret is at most 25 KiB.
MAX_PLAINTEXT_BYTES = 768 * 1024
# What we read back from encrypt (base64, 4/3 of the plaintext, plus TPM2 data).
MAX_SEALED_BYTES = 2 * 1024 * 1024
MAX_STDERR_BYTES = 4096  # kept of systemd-creds's complaint; the message quotes 300 characters
# The environment systemd-creds runs with: a PATH for its helpers, the C locale for
# its messages, and nothing else (no SYSTEMD_CREDENTIAL_* switch, no alternative key).
ENVIRONMENT: Tuple[Tuple[str, str], ...] = (("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
                                           ("LC_ALL", "C"))


# The key types ``--with-key=auto`` seals with, by the id a sealed copy starts with (its
# first 16 bytes; systemd's src/shared/creds-util.h, CRED_AES256_GCM_BY_*): the host key,
# the TPM2, or both, the TPM2's optionally under a signed PCR policy (a public key). Not
# the user-scoped ones (``--user``), never the null key.
AUTO_KEY_IDS: Dict[bytes, str] = {
    bytes.fromhex("5a1c6a86df9d4096b1d5a65e0862f19a"): "host",
    bytes.fromhex("0c7cc07b117645919c4b0bea08bc20fe"): "tpm2",
    bytes.fromhex("faf7eb9341e3412ca1a436f95a29362f"): "tpm2 with a public key",
    bytes.fromhex("93a894094874449090caf2fc93cab553"): "host+tpm2",
    bytes.fromhex("af4950a849134eb1a73846304ff30c05"): "host+tpm2 with a public key",
}
# CRED_AES256_GCM_BY_NULL: a fixed, empty key, no secrecy and no authenticity. Anyone can
# make such a copy (``--with-key=null``, or ``auto-initrd`` without a TPM2) and
# ``decrypt`` accepts it on 252 and 257 (a warning on stderr, exit 0; 257's --allow-null
# is about something else): a copy planted in the directory would be served as if ours.
NULL_KEY_ID = bytes.fromhex("058469daf6f54324800549da0f8ea2fb")
_KEY_ID_CHARS = 24  # base64 characters that hold the 16-byte id (18 bytes)
# Failures of the machine, not of one copy: the tool is missing, or it (a stuck TPM2) did
# not answer. Every later call would fail alike or wait as long, so a caller going through
# many copies stops at the first (each call may take TIMEOUT_S, on the daemon's main
# thread, under WatchdogSec=).
MACHINE_WIDE = (SealToolMissingError, SealTimeoutError)


class _Output(Exception):
    """The tool wrote more than allowed: stop reading, refuse."""


@dataclass(frozen=True)
class Sealer:
    """Runs ``systemd-creds``. ``command`` is the argv that starts it: the
    tool itself, or (in tests) a prefix that runs it in a private mount
    namespace with a host key of its own (``tests/test_cache_seal.py``).
    ``environ`` is the whole environment it gets, as (name, value) pairs."""

    command: Tuple[str, ...] = (SYSTEMD_CREDS,)
    timeout_s: float = TIMEOUT_S
    environ: Tuple[Tuple[str, str], ...] = ENVIRONMENT

    def seal(self, name: str, plaintext: bytes, not_after: float) -> bytes:
        """``plaintext`` sealed under credential ``name``, refused by
        :meth:`unseal` after ``not_after`` (epoch seconds, whole seconds
        kept). Returns systemd's base64 text. Raises SealToolMissingError,
        SealTimeoutError, or SealRefusedError (no usable key, too large, a
        ``not_after`` already past)."""
        if len(plaintext) > MAX_PLAINTEXT_BYTES:
            raise SealRefusedError(
                f"credential '{escape(name)}': {len(plaintext)} bytes is more than a sealed "
                f"copy holds ({MAX_PLAINTEXT_BYTES})", "the entry's copy is skipped")
        argv = ("encrypt", "--with-key=auto", f"--name={name}",
                f"--not-after=@{int(not_after)}", "-", "-")
        return self._run("seal", name, argv, plaintext, MAX_SEALED_BYTES)

    def unseal(self, name: str, ciphertext: bytes) -> bytes:
        """The plaintext of ``ciphertext``, which must have been sealed under
        ``name`` on this machine (its host key, its TPM2) and not have
        expired. Raises SealRefusedError with systemd-creds's reason
        otherwise, or without running it for a copy not sealed by a key
        ``--with-key=auto`` uses (:func:`key_type`: the null key above all);
        never returns bytes that failed its check."""
        key_type(name, ciphertext)  # before systemd-creds reads a byte of it
        argv = ("decrypt", f"--name={name}", "--newline=no", "-", "-")
        return self._run("unseal", name, argv, ciphertext, MAX_PLAINTEXT_BYTES)

    def _run(self, verb: str, name: str, argv: Tuple[str, ...], data: bytes,
             max_output: int) -> bytes:
        what = f"{verb} credential '{escape(name)}' with {SYSTEMD_CREDS}"
        try:
            process = subprocess.Popen(  # noqa: S603 - an argv, no shell
                self.command + argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, env=dict(self.environ), close_fds=True)
        except OSError as exc:
            raise SealToolMissingError(
                f"cannot {what}: {escape(exc.strerror or exc)}",
                f"install systemd {MIN_SYSTEMD} or later (systemd-creds), or remove cache:",
            ) from None
        try:
            output, errors = _exchange(process, data, max_output, self.timeout_s)
        except subprocess.TimeoutExpired:
            raise SealTimeoutError(f"cannot {what}: no answer in {self.timeout_s:g} s",
                                   "check the TPM2 (systemd-creds has-tpm2)") from None
        except _Output:
            raise SealRefusedError(f"cannot {what}: it wrote more than {max_output} bytes",
                                   None) from None
        finally:
            _reap(process)
        if process.returncode != 0:
            raise SealRefusedError(f"cannot {what}: {_complaint(errors, process.returncode)}",
                                   None)
        return output


def key_type(name: str, ciphertext: bytes) -> str:
    """Which of :data:`AUTO_KEY_IDS` sealed ``ciphertext`` (systemd's
    base64 text), read from its first bytes without decrypting. Raises
    SealRefusedError for the null key (no secrecy: anyone who can write the
    directory could plant one), for any other key type, and for text that
    is no sealed copy at all."""
    head = b"".join(ciphertext[:_KEY_ID_CHARS + 8].split())[:_KEY_ID_CHARS]
    try:
        key_id = base64.b64decode(head, validate=True)[:16]
    except (binascii.Error, ValueError):
        key_id = b""
    known = AUTO_KEY_IDS.get(key_id)
    if known is not None:
        return known
    what = f"credential '{escape(name)}'"
    if key_id == NULL_KEY_ID:
        raise SealRefusedError(
            f"{what} is sealed with systemd-creds' null key, which keeps no secret "
            "(anyone can make one): refused without decrypting it",
            "remove the file; the next good refresh seals a new copy")
    if len(key_id) < 16:
        raise SealRefusedError(f"{what} is not a sealed copy (damaged or not systemd-creds')",
                               None)
    raise SealRefusedError(f"{what} is sealed with a key type --with-key=auto never uses "
                           f"({key_id.hex()}): refused without decrypting it", None)


def _exchange(process: "subprocess.Popen[bytes]", data: bytes, max_output: int,
              timeout_s: float) -> Tuple[bytes, bytes]:
    """Write ``data`` to the child's stdin and read its stdout and stderr,
    all at once (a pipe fills at 64 KiB), until both close or the deadline
    passes; stdout beyond ``max_output`` raises _Output, stderr beyond
    MAX_STDERR_BYTES is dropped."""
    assert process.stdin and process.stdout and process.stderr
    deadline = time.monotonic() + timeout_s
    chunks: Dict[int, bytearray] = {process.stdout.fileno(): bytearray(),
                                    process.stderr.fileno(): bytearray()}
    pending = memoryview(data)
    stdin_fd, stdout_fd = process.stdin.fileno(), process.stdout.fileno()
    with selectors.DefaultSelector() as selector:
        for fd in chunks:
            os.set_blocking(fd, False)
            selector.register(fd, selectors.EVENT_READ)
        if pending:
            os.set_blocking(stdin_fd, False)
            selector.register(stdin_fd, selectors.EVENT_WRITE)
        else:
            process.stdin.close()
        while selector.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                raise subprocess.TimeoutExpired(process.args, timeout_s)
            for key, _ in selector.select(left):
                if key.fd == stdin_fd:
                    pending = _write_some(process, selector, pending)
                    continue
                block = _read_some(key.fd)
                if block is None:
                    continue
                if not block:
                    selector.unregister(key.fd)
                    continue
                chunks[key.fd] += block
                if key.fd == stdout_fd and len(chunks[key.fd]) > max_output:
                    raise _Output()
                if key.fd != stdout_fd and len(chunks[key.fd]) > MAX_STDERR_BYTES:
                    del chunks[key.fd][MAX_STDERR_BYTES:]
    process.wait(max(deadline - time.monotonic(), 0.001))
    return bytes(chunks[stdout_fd]), bytes(chunks[process.stderr.fileno()])


def _write_some(process: "subprocess.Popen[bytes]", selector: selectors.BaseSelector,
                pending: memoryview) -> memoryview:
    """Write what the pipe takes; close stdin once all is written (or the
    child stopped reading: its exit status and stderr will say why)."""
    assert process.stdin
    fd = process.stdin.fileno()
    try:
        pending = pending[os.write(fd, pending):]
    except BlockingIOError:
        return pending
    except BrokenPipeError:
        pending = pending[len(pending):]
    if not pending:
        selector.unregister(fd)
        process.stdin.close()
    return pending


def _read_some(fd: int) -> Optional[bytes]:
    """What the pipe holds (b"" at its end), or None when it held nothing after all."""
    try:
        return os.read(fd, 65536)
    except BlockingIOError:
        return None


def _reap(process: "subprocess.Popen[bytes]") -> None:
    """The child ends with this call: killed if still running, waited for,
    its pipes closed."""
    if process.poll() is None:
        process.kill()
    process.wait()
    for pipe in (process.stdin, process.stdout, process.stderr):
        if pipe is not None:
            pipe.close()


def _complaint(errors: bytes, status: Optional[int]) -> str:
    """systemd-creds's last line of complaint, escaped and bounded (its
    "not located on encrypted media" warning comes first and says nothing
    about the failure), or its exit status."""
    lines = [line for line in errors.decode("utf-8", "replace").splitlines() if line.strip()]
    return escape(lines[-1].strip()) if lines else f"exit status {status}"
