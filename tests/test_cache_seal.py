"""agent.cache.seal against the real systemd-creds, in a private mount
namespace with a host key of the test's own (tests/sealing.py): never the
machine's /var/lib/systemd/credential.secret, which each test checks it left
as it was."""

from __future__ import annotations

import base64
import os
import time
from pathlib import Path
from typing import Tuple

import pytest
from sealing import key_directory, null_key_copy, private_sealer, tool_unseals

from agent.base.errors import (
    SealError,
    SealRefusedError,
    SealTimeoutError,
    SealToolMissingError,
)
from agent.cache.seal import MAX_PLAINTEXT_BYTES, Sealer, key_type

VALUE = b"cache-seal-value-7f3a9c\x00\xff binary too"
# The key-type ids a sealed copy starts with (systemd's src/shared/creds-util.h).
HOST_KEY_ID = bytes.fromhex("5a1c6a86df9d4096b1d5a65e0862f19a")
NULL_KEY_ID = bytes.fromhex("058469daf6f54324800549da0f8ea2fb")
# Text shaped like a host-key copy (what a stand-in tool is given to "unseal").
HOST_SHAPED = base64.b64encode(HOST_KEY_ID + bytes(80)) + b"\n"




def _later(seconds: float = 3600) -> float:
    return time.time() + seconds


def test_a_sealed_value_unseals_to_the_same_bytes(sealer: Sealer) -> None:
    """seal then unseal under the same name gives back the bytes, and the sealed text holds
    none of them."""
    sealed = sealer.seal("entry-a", VALUE, _later())
    assert VALUE not in sealed and b"cache-seal-value" not in sealed
    assert sealer.unseal("entry-a", sealed) == VALUE


def test_an_empty_value_and_the_largest_round_trip(sealer: Sealer) -> None:
    """Nothing and MAX_PLAINTEXT_BYTES both come back whole (so every copy sealed can be
    unsealed); one byte more is refused before systemd-creds runs."""
    assert sealer.unseal("e", sealer.seal("e", b"", _later())) == b""
    largest = os.urandom(MAX_PLAINTEXT_BYTES)
    assert sealer.unseal("e", sealer.seal("e", largest, _later())) == largest
    with pytest.raises(SealRefusedError, match="more than a sealed copy holds"):
        sealer.seal("e", largest + b"x", _later())


def test_another_name_is_refused(sealer: Sealer) -> None:
    """A copy unsealed under another entry's name is refused (systemd-creds's --name check)."""
    sealed = sealer.seal("entry-a", VALUE, _later())
    with pytest.raises(SealRefusedError, match="does not match"):
        sealer.unseal("entry-b", sealed)


def test_an_inherited_switch_cannot_turn_the_name_check_off(
        sealer: Sealer, monkeypatch: pytest.MonkeyPatch) -> None:
    """SYSTEMD_CREDENTIAL_VALIDATE_NAME=0 in the agent's environment does not reach
    systemd-creds: the sealer gives it an environment of its own."""
    monkeypatch.setenv("SYSTEMD_CREDENTIAL_VALIDATE_NAME", "0")
    monkeypatch.setenv("SYSTEMD_CREDENTIAL_VALIDATE_NOT_AFTER", "0")
    sealed = sealer.seal("entry-a", VALUE, _later())
    with pytest.raises(SealRefusedError):
        sealer.unseal("entry-b", sealed)


def test_an_expired_copy_is_refused(sealer: Sealer) -> None:
    """After --not-after a copy is refused; a not_after already past cannot be sealed."""
    sealed = sealer.seal("entry-a", VALUE, time.time() + 1)
    time.sleep(2.2)  # --not-after keeps whole seconds
    with pytest.raises(SealRefusedError, match="time passed"):
        sealer.unseal("entry-a", sealed)
    with pytest.raises(SealRefusedError):
        sealer.seal("entry-a", VALUE, time.time() - 60)


def _damaged(sealed: bytes) -> Tuple[bytes, ...]:
    raw = bytearray(base64.b64decode(sealed))
    raw[-20] ^= 0x01
    return (base64.b64encode(bytes(raw)), sealed[:len(sealed) // 2], b"garbage!",
            b"", b"\x00" * 64)


def test_a_damaged_copy_is_refused(sealer: Sealer) -> None:
    """A flipped bit, a cut copy, garbage and nothing are each refused, never unsealed."""
    sealed = sealer.seal("entry-a", VALUE, _later())
    for damaged in _damaged(sealed):
        with pytest.raises(SealRefusedError):
            sealer.unseal("entry-a", damaged)


def test_a_copy_from_another_host_key_is_refused(sealer: Sealer, tmp_path: Path) -> None:
    """A copy sealed on one "machine" (host key) is refused on another: a second private
    namespace with a fresh key."""
    sealed = sealer.seal("entry-a", VALUE, _later())
    other = private_sealer(key_directory(tmp_path))
    assert other.unseal("entry-a", other.seal("entry-a", VALUE, _later())) == VALUE
    with pytest.raises(SealRefusedError, match="incorrect key|[Dd]ecrypt"):
        other.unseal("entry-a", sealed)


def test_no_value_on_the_command_line_or_in_an_error(sealer: Sealer, tmp_path: Path) -> None:
    """The argv holds the name and the dates only; an error names the credential and
    systemd-creds's reason, never the value."""
    seen = tmp_path / "argv"
    spy = Sealer(command=("sh", "-c", f'printf "%s\\n" "$@" > {seen}; exit 3', "spy"))
    with pytest.raises(SealRefusedError) as refused:
        spy.seal("entry-a", VALUE, _later())
    argv = seen.read_bytes()
    assert b"entry-a" in argv and VALUE not in argv and b"cache-seal" not in argv
    assert "cache-seal" not in str(refused.value) and "exit status 3" in str(refused.value)


def test_a_missing_tool_and_a_silent_one_are_typed_errors(tmp_path: Path) -> None:
    """No systemd-creds: SealToolMissingError saying what to install; one that does not
    answer: SealTimeoutError after the timeout, the child killed."""
    with pytest.raises(SealToolMissingError, match="systemd 250 or later"):
        Sealer(command=(str(tmp_path / "no-such-tool"),)).seal("e", VALUE, _later())
    started = time.monotonic()
    with pytest.raises(SealTimeoutError, match="no answer in 0.3 s"):
        Sealer(command=("sh", "-c", "sleep 30", "x"), timeout_s=0.3).unseal("e", HOST_SHAPED)
    assert time.monotonic() - started < 5


def test_the_complaint_is_escaped_and_bounded(tmp_path: Path) -> None:
    """systemd-creds's stderr reaches the message as one escaped, bounded line; an
    output beyond its bound is refused, not kept."""
    noisy = Sealer(command=("sh", "-c", "printf 'first\\nbad \\033[31m%s\\n' "
                            "\"$(head -c 5000 /dev/zero | tr '\\0' x)\" >&2; exit 1", "x"))
    with pytest.raises(SealRefusedError) as refused:
        noisy.unseal("e", HOST_SHAPED)
    text = str(refused.value)
    assert "\x1b" not in text and "\\x1b" in text and "first" not in text
    assert len(text) < 500
    flood = Sealer(command=("sh", "-c", "head -c 3000000 /dev/zero", "x"))
    with pytest.raises(SealRefusedError, match="more than"):
        flood.unseal("e", HOST_SHAPED)


def test_a_null_key_copy_is_refused_without_decrypting_it(sealer: Sealer) -> None:
    """systemd-creds itself decrypts a copy sealed with its null key (no secrecy: anyone
    who can write the directory can make one); the Sealer refuses it, naming the reason."""
    planted = null_key_copy(sealer, "entry-a", b"planted bytes")
    assert tool_unseals(sealer, "entry-a", planted) == b"planted bytes"
    with pytest.raises(SealRefusedError, match="null key") as refused:
        sealer.unseal("entry-a", planted)
    assert "entry-a" in str(refused.value) and "planted" not in str(refused.value)


@pytest.mark.parametrize("key_id, kind", [
    ("5a1c6a86df9d4096b1d5a65e0862f19a", "host"),
    ("0c7cc07b117645919c4b0bea08bc20fe", "tpm2"),
    ("faf7eb9341e3412ca1a436f95a29362f", "tpm2 with a public key"),
    ("93a894094874449090caf2fc93cab553", "host+tpm2"),
    ("af4950a849134eb1a73846304ff30c05", "host+tpm2 with a public key"),
])
def test_the_key_types_auto_seals_with_reach_the_tool(tmp_path: Path, key_id: str,
                                                      kind: str) -> None:
    """A copy whose first 16 bytes name a key --with-key=auto uses (systemd's
    creds-util.h) is handed to systemd-creds, wrapped at 76 columns as it writes it."""
    ran = tmp_path / "ran"
    spy = Sealer(command=("sh", "-c", f"touch {ran}; cat", "spy"))
    text = base64.encodebytes(bytes.fromhex(key_id) + bytes(100))
    assert key_type("e", text) == kind
    assert spy.unseal("e", text) == text and ran.exists()


@pytest.mark.parametrize("head", [
    NULL_KEY_ID,
    bytes.fromhex("55b9ed1d38594d43a8319d2ebb332ac6"),  # host, user-scoped: not auto's
    bytes.fromhex("a219cb0785b24c04b16d18cab9d2ee01"),  # _CRED_AUTO: never on disk
    b"",
    b"\x00" * 4,
], ids=["null", "host scoped", "auto", "empty", "short"])
def test_any_other_key_type_is_refused_before_the_tool_runs(tmp_path: Path,
                                                           head: bytes) -> None:
    """The null key, a key type auto never uses, and text too short to name one are
    refused without running systemd-creds."""
    ran = tmp_path / "ran"
    spy = Sealer(command=("sh", "-c", f"touch {ran}; cat", "spy"))
    with pytest.raises(SealRefusedError, match="null key|key type|not a sealed copy"):
        spy.unseal("e", base64.b64encode(head + (bytes(100) if head else b"")))
    with pytest.raises(SealRefusedError):
        spy.unseal("e", b"not base64 at all, nor a copy")
    assert not ran.exists()


def test_every_seal_error_is_a_seal_error() -> None:
    """One except clause catches them all: the daemon skips the copy with its reason."""
    for kind in (SealToolMissingError, SealTimeoutError, SealRefusedError):
        assert issubclass(kind, SealError)
