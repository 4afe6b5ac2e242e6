"""agent.cache.store with the real systemd-creds in a private mount namespace
(tests/sealing.py): copies round trip, are replaced atomically only when their bytes
change, are pruned with their entries, refuse an unsafe directory, and no file in the
directory ever holds a value in plaintext, after writes, rotations and a crash."""

from __future__ import annotations

import base64
import errno
import os
import shutil
import time
from pathlib import Path
from typing import Iterable, List

import pytest
from sealing import key_directory, null_key_copy, private_sealer, tool_unseals
from secrecy import fresh_value

from agent.base.errors import CacheError, SealRefusedError, VaultUnavailableError
from agent.cache.copy import Copy, encode, expansion
from agent.cache.decision import decide
from agent.cache.seal import Sealer
from agent.cache.store import (
    RESEAL_AFTER_S,
    TEMP_PREFIX,
    CacheStore,
    file_name,
    reseal_after,
    sealing_name,
)

WEEK = 7 * 86400.0
A = "/run/secrets/a"
B = "credential:app.service/db"




@pytest.fixture
def directory(tmp_path: Path) -> Path:
    return tmp_path / "state" / "cache"


def _copy(key: str, *values: bytes, at: float = 0.0) -> Copy:
    return Copy(key, at or time.time(), tuple((f"{key}#{i}", v) for i, v in enumerate(values)))


def _assert_no_plaintext(directory: Path, values: Iterable[bytes]) -> None:
    """Every byte of every file in the directory, against every value (and its halves),
    and its base64 (the unsealed document's own encoding of a value: a copy written
    unsealed would show it)."""
    for path in directory.iterdir():
        data = path.read_bytes()
        for value in values:
            encoded = base64.b64encode(value)
            for part in (value, value[: len(value) // 2], value[len(value) // 2:],
                         encoded[: len(encoded) // 2]):
                assert part not in data, f"{path.name} holds a value in plaintext"


def test_a_copy_round_trips_and_its_file_is_named_by_the_key(
        sealer: Sealer, directory: Path) -> None:
    """save then load gives the copy back; the directory is created 0700 and holds
    <sha256>.sealed only; the sealing name derives from the key."""
    store = CacheStore(str(directory), sealer)
    copy = _copy(B, fresh_value("b").encode(), b"\x00\xff")
    assert store.save(copy, WEEK)
    assert CacheStore(str(directory), sealer).load(B) == copy
    assert oct(directory.stat().st_mode & 0o777) == "0o700"
    assert [p.name for p in directory.iterdir()] == [file_name(B)]
    assert sealing_name(B).startswith("kv-agent-") and "/" not in sealing_name(B)


def test_nothing_to_load(sealer: Sealer, directory: Path) -> None:
    """No directory, or no copy of that entry: None, and nothing is created."""
    store = CacheStore(str(directory), sealer)
    assert store.load(A) is None and not directory.exists()
    assert store.prune([A]) == ()
    store.save(_copy(A, b"x"), WEEK)
    assert store.load(B) is None


def test_a_copy_is_replaced_only_when_its_bytes_change(sealer: Sealer, directory: Path) -> None:
    """The same bytes again: nothing written (same inode); new bytes: a new file renamed
    over the old; unchanged bytes whose copy is an hour old: sealed again; a fresh store
    that loaded the copy knows it too."""
    store = CacheStore(str(directory), sealer)
    now = time.time()
    assert store.save(_copy(A, b"one", at=now), WEEK)
    inode = (directory / file_name(A)).stat().st_ino
    assert not store.save(_copy(A, b"one", at=now + 60), WEEK)
    assert (directory / file_name(A)).stat().st_ino == inode
    assert store.save(_copy(A, b"two", at=now + 120), WEEK)
    assert (directory / file_name(A)).stat().st_ino != inode
    assert store.save(_copy(A, b"two", at=now + 120 + 3600), WEEK)
    fresh = CacheStore(str(directory), sealer)
    assert fresh.load(A) is not None
    assert not fresh.save(_copy(A, b"two", at=now + 3800), WEEK)


def test_unchanged_copies_are_sealed_again_spread_over_the_last_half_hour() -> None:
    """Copies all sealed at one refresh are not all sealed again at one later refresh:
    each key's age limit lies in the second half of RESEAL_AFTER_S (or max_age/4), never
    past it."""
    keys = [f"/run/secrets/s{i}" for i in range(200)]
    limits = [reseal_after(key, WEEK) for key in keys]
    assert all(RESEAL_AFTER_S / 2 <= limit <= RESEAL_AFTER_S for limit in limits)
    due_at_45_min = sum(limit <= 45 * 60 for limit in limits)
    assert 60 <= due_at_45_min <= 140, due_at_45_min
    assert reseal_after(keys[0], 3600.0) <= 900.0
    assert reseal_after(keys[0], WEEK) == limits[0]  # the same key: the same limit


def test_prune_removes_dropped_entries_and_leftovers_only(
        sealer: Sealer, directory: Path) -> None:
    """An entry no longer in the manifest loses its copy, a crash's temporary file goes,
    any other name stays."""
    store = CacheStore(str(directory), sealer)
    store.save(_copy(A, b"a"), WEEK)
    store.save(_copy(B, b"b"), WEEK)
    (directory / f"{TEMP_PREFIX}deadbeef").write_bytes(b"ciphertext")
    (directory / "README").write_text("not ours")
    assert store.prune([A]) == tuple(sorted([file_name(B), f"{TEMP_PREFIX}deadbeef"]))
    assert sorted(p.name for p in directory.iterdir()) == sorted([file_name(A), "README"])
    assert store.load(B) is None and store.load(A) is not None


def test_another_entrys_copy_is_refused(sealer: Sealer, directory: Path) -> None:
    """A's file copied onto B's name: refused when loading B (its sealing name and the key
    inside are A's), never B's bytes."""
    store = CacheStore(str(directory), sealer)
    store.save(_copy(A, b"a"), WEEK)
    shutil.copy(directory / file_name(A), directory / file_name(B))
    with pytest.raises(SealRefusedError, match="does not match"):
        store.load(B)


def test_an_expired_copy_is_refused(sealer: Sealer, directory: Path) -> None:
    """A copy past its fetch time + max_age cannot be unsealed."""
    store = CacheStore(str(directory), sealer)
    store.save(_copy(A, b"a", at=time.time() - 3600 + 1), 3600)
    time.sleep(2.2)
    with pytest.raises(SealRefusedError, match="time passed"):
        CacheStore(str(directory), sealer).load(A)


def test_another_machines_copy_is_refused(
        sealer: Sealer, directory: Path, tmp_path: Path) -> None:
    """A copy sealed under one host key is refused under another (a disk moved, a key
    regenerated)."""
    CacheStore(str(directory), sealer).save(_copy(A, b"a"), WEEK)
    other = CacheStore(str(directory), private_sealer(key_directory(tmp_path)))
    with pytest.raises(SealRefusedError):
        other.load(A)


def test_a_damaged_copy_is_refused(sealer: Sealer, directory: Path) -> None:
    """A cut file is refused, never unsealed to something."""
    store = CacheStore(str(directory), sealer)
    store.save(_copy(A, b"a"), WEEK)
    path = directory / file_name(A)
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(SealRefusedError):
        CacheStore(str(directory), sealer).load(A)


def test_a_planted_null_key_copy_is_skipped_never_served(
        sealer: Sealer, directory: Path) -> None:
    """A copy someone who can write the directory sealed with systemd-creds' null key
    (under the right name, holding this entry's key and fresh bytes, which systemd-creds
    would decrypt): refused before decrypting, the entry skipped with one line naming it
    and the reason."""
    store = CacheStore(str(directory), sealer)
    store.save(_copy(A, b"ours"), WEEK)
    document = encode(_copy(A, b"planted"))
    planted = null_key_copy(sealer, sealing_name(A), document)
    assert tool_unseals(sealer, sealing_name(A), planted) == document
    (directory / file_name(A)).write_bytes(planted)
    with pytest.raises(SealRefusedError, match="null key") as refused:
        CacheStore(str(directory), sealer).load(A)
    decision = decide(A, VaultUnavailableError("the vault is unreachable"), refused.value,
                      WEEK, time.time())
    assert not decision.serve and decision.copy is None
    assert decision.reason.startswith(f"{A}: sealed copy skipped: ") and \
        "null key" in decision.reason and "\n" not in decision.reason


@pytest.mark.parametrize("shape", ["group", "world", "owner", "symlink", "file", "parent"])
def test_an_unsafe_directory_is_refused(sealer: Sealer, tmp_path: Path, shape: str) -> None:
    """Group- or world-accessible, another user's, a symlink, not a directory, or under a
    directory others may write: CacheError naming it, nothing written."""
    directory = tmp_path / "cache"
    if shape == "symlink":
        (tmp_path / "elsewhere").mkdir(mode=0o700)
        directory.symlink_to(tmp_path / "elsewhere")
    elif shape == "file":
        directory.write_bytes(b"")
    elif shape == "parent":
        os.chmod(tmp_path, 0o777)
        directory.mkdir(mode=0o700)
    else:
        directory.mkdir(mode=0o700)
        os.chmod(directory, {"group": 0o750, "world": 0o701}.get(shape, 0o700))
        if shape == "owner":
            os.chown(directory, 4242, 4242)
    store = CacheStore(str(directory), sealer)
    with pytest.raises(CacheError, match="cache directory"):
        store.save(_copy(A, b"a"), WEEK)
    with pytest.raises(CacheError):
        store.load(A)
    if shape == "symlink":
        assert list((tmp_path / "elsewhere").iterdir()) == []


def test_no_plaintext_in_the_directory_ever(
        sealer: Sealer, directory: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After first writes (a select: entry's expansion of names among them), rotations and
    a crash between the temporary file and the rename (the temporary file left behind), no
    file holds any value, any half of one, in plaintext."""
    store = CacheStore(str(directory), sealer)
    values: List[bytes] = []

    def value(label: str) -> bytes:
        values.append(fresh_value(label).encode() * 3)
        return values[-1]

    store.save(_copy(A, value("a1"), value("a1-key")), WEEK)
    store.save(_copy(B, value("b1")), WEEK)
    # A select: entry's expansion: secret names, no value, sealed all the same.
    store.save(expansion("/run/secrets/app", time.time(), "digest",
                         [value("app-name").decode(), value("app-other").decode()]), WEEK)
    _assert_no_plaintext(directory, values)
    for turn in range(3):
        store.save(_copy(A, value(f"a{turn + 2}"), value("a-key")), WEEK)
        _assert_no_plaintext(directory, values)

    class Crash(BaseException):
        pass

    def crash(*args: object, **kwargs: object) -> None:
        raise Crash()

    monkeypatch.setattr(os, "rename", crash)
    with pytest.raises(Crash):
        store.save(_copy(B, value("b-crash")), WEEK)
    monkeypatch.undo()
    left = [p.name for p in directory.iterdir() if p.name.startswith(TEMP_PREFIX)]
    assert len(left) == 1, "the simulated crash should leave its temporary file"
    _assert_no_plaintext(directory, values)
    assert CacheStore(str(directory), sealer).load(B).items[0][1] == values[2]  # type: ignore[union-attr]
    store.prune([A, B])
    assert not [p for p in directory.iterdir() if p.name.startswith(TEMP_PREFIX)]
    _assert_no_plaintext(directory, values)


class _Clear:
    """A stand-in sealer (no cryptography): these tests are about the file system."""

    def seal(self, name: str, plaintext: bytes, not_after: float) -> bytes:
        return plaintext

    def unseal(self, name: str, ciphertext: bytes) -> bytes:
        return ciphertext


@pytest.mark.parametrize("code", [errno.EACCES, errno.EROFS, errno.EBUSY])
def test_a_copy_that_cannot_be_removed_is_a_cache_error(
        directory: Path, monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    """prune, and a failed replacement's cleanup, turn an unlink refused (read-only, busy,
    not ours) into CacheError, the failure the daemon logs and goes on from; a raw
    OSError would fail the start or the reload."""
    store = CacheStore(str(directory), _Clear())  # type: ignore[arg-type]
    store.save(_copy(A, b"a"), WEEK)

    def refused(*args: object, **kwargs: object) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "unlink", refused)
    with pytest.raises(CacheError, match=os.strerror(code)):
        store.prune([])
    monkeypatch.setattr(os, "rename", refused)
    with pytest.raises(CacheError, match="cannot keep a sealed copy"):
        store.save(_copy(A, b"b"), WEEK)
