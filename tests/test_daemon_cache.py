"""agent.daemon.cache: after a refresh, the daemon seals each good entry's bytes (its
files as on disk, its credentials as held), and each select: entry's expansion beside
its entries' copies; failed entries and a manifest since replaced are not saved; a cache problem is logged once and never raised;
install prunes the copies of entries the manifest lost. Unit tests with a stand-in
sealer (reversible, not cryptography: the real tool is tests/test_cache_*.py's)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, List, Tuple

import pytest

from agent.base.errors import (
    CacheError,
    KvAgentError,
    SealRefusedError,
    SealTimeoutError,
    VaultForbiddenError,
    VaultUnavailableError,
)
from agent.cache.copy import expansion, expansion_key, expansion_names
from agent.cache.store import CacheStore
from agent.daemon.cache import SealedCache
from agent.daemon.cache_serve import Serving, Units, fingerprint
from agent.daemon.entries import EntryTable
from agent.manifest import Accounts, Manifest, parse_manifest
from agent.pipeline.credentials import Grant
from agent.sync.sync import SecretOutcome, SyncReport
from agent.writer.credentials import CredentialStore

ACCOUNTS = Accounts(user=lambda name: 0, group=lambda name: 0)
WEEK = 7 * 86400.0


class StandInSealer:
    """Seals by reversing and tagging with the name: enough to round trip and to see
    that no plaintext reaches the directory; ``refuse`` makes every seal fail."""

    def __init__(self) -> None:
        self.refuse = False
        self.stuck = False  # every call times out, as a TPM2 that does not answer
        self.sealed: List[str] = []
        self.calls: List[str] = []  # every call's name, failed or not

    def seal(self, name: str, plaintext: bytes, not_after: float) -> bytes:
        self._call(name)
        if self.refuse:
            raise SealRefusedError(f"credential '{name}': no usable key", None)
        self.sealed.append(name)
        return name.encode() + b"|" + bytes(b ^ 0x5A for b in plaintext)

    def unseal(self, name: str, ciphertext: bytes) -> bytes:
        self._call(name)
        tag, _, body = ciphertext.partition(b"|")
        if tag != name.encode():
            raise SealRefusedError(f"credential '{name}': another name", None)
        return bytes(b ^ 0x5A for b in body)

    def _call(self, name: str) -> None:
        self.calls.append(name)
        if self.stuck:
            raise SealTimeoutError(f"cannot seal credential '{name}': no answer in 10 s",
                                   "check the TPM2")


def manifest(tmp_path: Path, names: Tuple[str, ...] = ("db", "api"), cache: bool = True,
             credential: bool = False) -> Manifest:
    text = f"vault: https://kv.vault.azure.net\ndirectory: {tmp_path / 'out'}\nsecrets:\n"
    for name in names:
        text += f"  - name: {name}\n    path: {name}\n"
        if credential:
            text += "    credential: {units: [app.service]}\n"
    if cache:
        text += f"cache: {{directory: {tmp_path / 'cache'}}}\n"
    return parse_manifest(text, "m.yaml", accounts=ACCOUNTS, check_filesystem=False)


def fixture(tmp_path: Path, **keys: Any) -> Tuple[SealedCache, StandInSealer, Manifest]:
    sealer = StandInSealer()
    cache = SealedCache(sealer)  # type: ignore[arg-type]
    current = manifest(tmp_path, **keys)
    cache.install(current)
    (tmp_path / "out").mkdir(exist_ok=True)
    return cache, sealer, current


def report(*outcomes: SecretOutcome) -> SyncReport:
    return SyncReport(outcomes, 0.1)


def test_each_good_entry_is_sealed_with_its_files_bytes(tmp_path: Path) -> None:
    """A refresh that wrote db and failed api: db's copy holds db's file, api has none;
    no file in the cache directory holds the value."""
    cache, sealer, current = fixture(tmp_path)
    db, api = current.secrets
    Path(db.paths[0]).write_bytes(b"db-value-0123456789")
    now = time.time()
    outcome_error = VaultUnavailableError("the vault is unreachable", None)
    cache.save(report(SecretOutcome(db, version="v1"), SecretOutcome(api, error=outcome_error)),
               CredentialStore(), now)
    assert len(sealer.sealed) == 1
    store = CacheStore(str(tmp_path / "cache"), sealer)  # type: ignore[arg-type]
    copy = store.load(db.key)
    assert copy is not None and copy.items == ((db.paths[0], b"db-value-0123456789"),)
    assert copy.fetched_at == now
    assert store.load(api.key) is None
    for path in (tmp_path / "cache").iterdir():
        assert b"db-value" not in path.read_bytes()


def test_an_unchanged_entry_is_not_sealed_again(tmp_path: Path) -> None:
    cache, sealer, current = fixture(tmp_path, names=("db",))
    db = current.secrets[0]
    Path(db.paths[0]).write_bytes(b"same")
    now = time.time()
    cache.save(report(SecretOutcome(db, version="v1")), CredentialStore(), now)
    cache.save(report(SecretOutcome(db, version="v1")), CredentialStore(), now + 60)
    assert len(sealer.sealed) == 1


def test_credentials_are_sealed_as_the_store_holds_them(tmp_path: Path) -> None:
    cache, sealer, current = fixture(tmp_path, names=("db",), credential=True)
    db = current.secrets[0]
    Path(db.paths[0]).write_bytes(b"file-bytes")
    credentials: CredentialStore[Grant] = CredentialStore()
    credentials.declare({db.key: db.grants})
    credentials.replace(db.key, [(db.grants[0], b"cred-bytes")])
    cache.save(report(SecretOutcome(db, version="v1")), credentials, time.time())
    copy = CacheStore(str(tmp_path / "cache"), sealer).load(db.key)  # type: ignore[arg-type]
    assert copy is not None
    assert copy.items == ((db.paths[0], b"file-bytes"), (db.grants[0].label, b"cred-bytes"))


def test_an_entry_of_another_manifest_is_not_saved(tmp_path: Path) -> None:
    """A refresh of a manifest a reload replaced: its entries are not the current ones."""
    cache, sealer, current = fixture(tmp_path, names=("db",))
    other = manifest(tmp_path, names=("other",)).secrets[0]
    Path(other.paths[0]).write_bytes(b"x")
    cache.save(report(SecretOutcome(other, version="v1")), CredentialStore(), time.time())
    assert sealer.sealed == []


def test_no_cache_key_saves_nothing(tmp_path: Path) -> None:
    cache, sealer, current = fixture(tmp_path, cache=False)
    db = current.secrets[0]
    Path(db.paths[0]).write_bytes(b"x")
    cache.save(report(SecretOutcome(db, version="v1")), CredentialStore(), time.time())
    assert sealer.sealed == [] and not (tmp_path / "cache").exists()


def test_a_cache_problem_is_logged_once_and_never_raised(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cache, sealer, current = fixture(tmp_path, names=("db",))
    db = current.secrets[0]
    Path(db.paths[0]).write_bytes(b"x")
    sealer.refuse = True
    with caplog.at_level(logging.WARNING, logger="agent.daemon.cache"):
        for at in range(3):
            cache.save(report(SecretOutcome(db, version="v1")), CredentialStore(),
                       time.time() + at)
    assert sealer.sealed == []
    lines = [r.getMessage() for r in caplog.records if "sealed cache" in r.getMessage()]
    assert len(lines) == 1 and "no usable key" in lines[0]


def test_a_missing_file_is_a_problem_not_a_crash(tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    cache, sealer, current = fixture(tmp_path, names=("db",))
    with caplog.at_level(logging.WARNING, logger="agent.daemon.cache"):
        cache.save(report(SecretOutcome(current.secrets[0], version="v1")),
                   CredentialStore(), time.time())
    assert sealer.sealed == []
    assert "cannot read" in caplog.text


def test_install_prunes_the_copies_of_dropped_entries(tmp_path: Path) -> None:
    cache, sealer, current = fixture(tmp_path)
    for entry in current.secrets:
        Path(entry.paths[0]).write_bytes(entry.name.encode())
    cache.save(report(*(SecretOutcome(e, version="v1") for e in current.secrets)),
               CredentialStore(), time.time())
    assert len(list((tmp_path / "cache").iterdir())) == 2
    cache.install(manifest(tmp_path, names=("db",)))
    store = CacheStore(str(tmp_path / "cache"), sealer)  # type: ignore[arg-type]
    assert len(list((tmp_path / "cache").iterdir())) == 1
    assert store.load(current.secrets[0].key) is not None
    assert store.load(current.secrets[1].key) is None


def test_served_entries_show_in_the_status_rows_and_the_metrics(tmp_path: Path) -> None:
    """The daemon's rows carry what the cache serves: each served entry's copy time in
    status.json's row, and the gauge's 1/0 only while the manifest has ``cache:``."""
    cache, _, current = fixture(tmp_path)
    table = EntryTable()
    table.install(current)
    db, api = (entry.key for entry in current.secrets)
    assert cache.from_cache() == {}
    cache.served[db] = 1_795_518_000.0
    rows = table.statuses(1_795_518_000.0 + 60, True, lambda path: None, cache.served)
    assert [row.from_cache for row in rows] == ["2026-11-24T11:00:00Z", None]
    metrics = {row.entry: row.from_cache for row in table.metrics(cache.from_cache())}
    assert metrics == {db: True, api: False}
    cache.install(manifest(tmp_path, cache=False))
    assert cache.from_cache() is None
    assert {row.from_cache for row in table.metrics(cache.from_cache())} == {None}


def select_manifest(tmp_path: Path, prefix: str = "app-") -> Manifest:
    text = (f"vault: https://kv.vault.azure.net\ndirectory: {tmp_path / 'out'}\nsecrets:\n"
            "  - name: db\n    path: db\n"
            f"  - select: {{prefix: {prefix}}}\n    directory: app\n    strip_prefix: true\n"
            f"cache: {{directory: {tmp_path / 'cache'}}}\n")
    return parse_manifest(text, "m.yaml", accounts=ACCOUNTS, check_filesystem=False)


def listed(current: Manifest, *names: str) -> SyncReport:
    """A refresh of ``current`` whose select: entry listed ``names``, each written."""
    from agent.sync.selection import entry_for

    [selection] = current.selections
    entries = [entry_for(selection, name) for name in names]
    for one in entries:
        Path(one.paths[0]).parent.mkdir(parents=True, exist_ok=True)
        Path(one.paths[0]).write_bytes(f"value of {one.name}".encode())
    return SyncReport((SecretOutcome(current.secrets[0], version="v1"),
                       *(SecretOutcome(one, version="v1") for one in entries),
                       SecretOutcome(selection.entry, version=f"{len(names)} matched")),
                      0.1, selected=((selection.directory, tuple(e.key for e in entries)),))


def test_a_select_entrys_expansion_is_sealed_beside_its_entries_copies(tmp_path: Path) -> None:
    """The names its listing gave (no value), and each selected secret's copy; a new
    start (another SealedCache) reads the expansion to keep them when it prunes; a
    listing without a secret prunes that secret's copy."""
    sealer = StandInSealer()
    cache = SealedCache(sealer)  # type: ignore[arg-type]
    current = select_manifest(tmp_path)
    cache.install(current)
    (tmp_path / "out").mkdir()
    Path(current.secrets[0].paths[0]).write_bytes(b"db-value")
    cache.save(listed(current, "app-one", "app-two"), CredentialStore(), time.time())
    assert len(sealer.sealed) == 4
    store = CacheStore(str(tmp_path / "cache"), sealer)  # type: ignore[arg-type]
    [selection] = current.selections
    sealed = store.load(expansion_key(selection.directory))
    assert sealed is not None
    assert expansion_names(sealed, fingerprint(selection)) == ("app-one", "app-two")
    two = str(tmp_path / "out" / "app" / "two")
    assert store.load(two) is not None
    restarted = SealedCache(sealer)  # type: ignore[arg-type]
    restarted.install(current)
    assert len(list((tmp_path / "cache").iterdir())) == 4
    restarted.save(listed(current, "app-one"), CredentialStore(), time.time())
    assert store.load(two) is None and len(list((tmp_path / "cache").iterdir())) == 3
    for path in (tmp_path / "cache").iterdir():
        assert b"app-one" not in path.read_bytes() and b"value of" not in path.read_bytes()


def test_an_expansion_for_a_changed_select_entry_is_refused(tmp_path: Path) -> None:
    """Sealed for prefix app-, read for prefix ap-: the entry changed, the expansion is
    not served; names that are not Key Vault names are refused too."""
    current, changed = select_manifest(tmp_path), select_manifest(tmp_path, prefix="ap-")
    copy = expansion("/d", 0.0, fingerprint(current.selections[0]), ["app-one"])
    with pytest.raises(CacheError, match="changed since"):
        expansion_names(copy, fingerprint(changed.selections[0]))
    bad = expansion("/d", 0.0, "x", ["../../etc/passwd"])
    with pytest.raises(CacheError, match="not a secret name"):
        expansion_names(bad, "x")
    units = Units.of(current)
    with pytest.raises(CacheError, match="does not select"):
        units.expanded(current.selections[0], ["other-one"])


def test_a_stuck_tpm2_stops_the_save_at_the_first_timeout(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A timeout concerns the whole machine: the save stops at the first (each call may
    hold the main thread 10 s, under WatchdogSec=), with one line."""
    cache, sealer, current = fixture(tmp_path, names=("db", "api", "web"))
    for entry in current.secrets:
        Path(entry.paths[0]).write_bytes(entry.name.encode())
    sealer.stuck = True
    with caplog.at_level(logging.WARNING, logger="agent.daemon.cache"):
        cache.save(report(*(SecretOutcome(e, version="v1") for e in current.secrets)),
                   CredentialStore(), time.time())
    assert len(sealer.calls) == 1
    assert [r.getMessage() for r in caplog.records if "no answer" in r.getMessage()] != []


def _serving(tmp_path: Path, sealer: StandInSealer, current: Manifest,
             cause: KvAgentError) -> Tuple[Serving, List[str]]:
    """Serving every entry of ``current``, each missing for ``cause``; the lines said."""
    said: List[str] = []
    store = CacheStore(str(tmp_path / "cache"), sealer)  # type: ignore[arg-type]
    causes = {entry.key: cause for entry in current.secrets}
    # Nothing is written in these tests: no writer, ledger or table is reached.
    serving = Serving(Units.of(current), store, WEEK, causes, time.time(),
                      None, CredentialStore(), None, None,  # type: ignore[arg-type]
                      said.append)
    return serving, said


def _sealed_all(tmp_path: Path, cache: SealedCache, current: Manifest) -> None:
    for entry in current.secrets:
        Path(entry.paths[0]).write_bytes(entry.name.encode())
    cache.save(report(*(SecretOutcome(e, version="v1") for e in current.secrets)),
               CredentialStore(), time.time())


def test_a_stuck_tpm2_stops_the_serving_at_the_first_timeout(tmp_path: Path) -> None:
    """Serving at start stops at the first timeout too, with one line, serving nothing."""
    cache, sealer, current = fixture(tmp_path, names=("db", "api", "web"))
    _sealed_all(tmp_path, cache, current)
    sealer.stuck, sealer.calls = True, []
    serving, said = _serving(tmp_path, sealer, current,
                             VaultUnavailableError("the vault is unreachable", None))
    assert serving.run([entry.key for entry in current.secrets]) == {}
    assert len(sealer.calls) == 1
    assert len(said) == 1 and "no answer" in said[0]


def test_an_answer_is_refused_without_decrypting_the_copy(tmp_path: Path) -> None:
    """A 403 is an answer: the entry is not served, and its copy is never unsealed."""
    cache, sealer, current = fixture(tmp_path, names=("db", "api"))
    _sealed_all(tmp_path, cache, current)
    sealer.calls = []
    serving, said = _serving(tmp_path, sealer, current,
                             VaultForbiddenError("the vault refused: forbidden", None))
    assert serving.run([entry.key for entry in current.secrets]) == {}
    assert sealer.calls == []
    assert len(said) == 2 and all("an answer is not an outage" in line for line in said)


def test_a_refresh_of_a_replaced_manifest_is_not_saved(tmp_path: Path) -> None:
    """A reload during the refresh: its listing is paired with no new select: entry's
    fingerprint, and nothing is sealed; why entries are missing is still noted."""
    sealer = StandInSealer()
    cache = SealedCache(sealer)  # type: ignore[arg-type]
    old = select_manifest(tmp_path)
    cache.install(old)
    (tmp_path / "out").mkdir()
    Path(old.secrets[0].paths[0]).write_bytes(b"db-value")
    result = listed(old, "app-one")
    cache.install(select_manifest(tmp_path, prefix="ap-"))  # the reload
    cache.refreshed(result, CredentialStore(), time.time(), is_current=False)
    assert sealer.sealed == []
    cache.refreshed(VaultUnavailableError("the vault is unreachable", None),
                    CredentialStore(), time.time(), is_current=False)
    assert cache._causes  # noqa: SLF001 - the bookkeeping kept
