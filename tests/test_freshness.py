"""Unit tests of the list-based refresh decision (agent.sync.freshness), with plain values."""

from __future__ import annotations

import logging
import mmap
import os
import time
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import pytest

from agent.base.errors import ListTooLongError, VaultForbiddenError, VaultUnavailableError
from agent.manifest import Accounts, Entry, parse_manifest
from agent.pipeline.expiry import Validity
from agent.pipeline.sources import SecretAttributes, Source
from agent.sync.freshness import (
    MAX_VERIFIED_BYTES,
    SETTLED_S,
    EntryWritten,
    FileStamp,
    Freshness,
    SourceSeen,
    VaultSeen,
    WrittenOutcome,
    file_stamp,
    forget_forbidden,
    is_on_disk,
    is_writable_by_others,
    list_budget,
    listing_pages,
    plan,
    remember,
)
from agent.vault.listing import SecretItem

VAULT = "https://contoso-kv.vault.azure.net"
ACCOUNTS = Accounts(user=lambda name: {"root": 0}.get(name),
                    group=lambda name: {"root": 0}.get(name))
PIN = "0123456789abcdef0123456789abcdef"
UPDATED = 1_700_000_000
FETCHED = UPDATED + 3600.0


def entries(text: str) -> Tuple[Entry, ...]:
    manifest = parse_manifest(f"vault: {VAULT}\ndirectory: /run/secrets\nsecrets:\n{text}",
                              "m.yaml", accounts=ACCOUNTS, check_filesystem=False)
    return manifest.secrets


def stamp_of(path: str) -> FileStamp:
    return FileStamp(hash(path) & 0xFFFF, 1, 10, 5, 0, 0, 0o400)


def item(name: str, updated: int = UPDATED, enabled: bool = True) -> SecretItem:
    return SecretItem(name, f"{VAULT}/secrets/{name}", None, None,
                      SecretAttributes(enabled=enabled, updated=updated))


class FakeVault:
    """A list call that records its calls and answers items or raises."""

    def __init__(self, items: Sequence[SecretItem] = (), error: Optional[Exception] = None
                 ) -> None:
        self.items, self.error = list(items), error
        self.calls: List[Tuple[str, int]] = []

    def __call__(self, vault: str, max_pages: int) -> Sequence[SecretItem]:
        self.calls.append((vault, max_pages))
        if self.error is not None:
            raise self.error
        return self.items


def memory_after_write(written: Sequence[Entry], vault_size: Optional[int] = None
                       ) -> Freshness:
    """The memory of a refresh that wrote every entry at UPDATED, fetched at FETCHED."""
    return Freshness(
        sources={source: SourceSeen(source.version or "v1", UPDATED, FETCHED)
                 for entry in written for source in entry.sources},
        entries={entry.key: EntryWritten(entry, "v1", Validity(),
                                         tuple((p, stamp_of(p)) for p in entry.paths))
                 for entry in written},
        vaults={} if vault_size is None else {VAULT: VaultSeen(vault_size)})


MANY = "".join(f"  - name: s{number}\n" for number in range(10))


@pytest.mark.parametrize("seen, remembered, budget", [
    (None, 10, 9),                       # never listed: at most one page below the GETs
    (VaultSeen(100), 10, 9),             # 4 pages < 10 GETs: list
    (VaultSeen(5000), 10, None),         # 200 pages >= 10 GETs: per secret
    (VaultSeen(1000), 1000, 999),        # 40 pages < 1000 GETs
    (VaultSeen(250), 10, None),          # 10 pages = 10 GETs: no gain, per secret
    (VaultSeen(10), 1, None),            # one GET is never beaten
    (VaultSeen(10, is_forbidden=True), 10, None),
])
def test_list_budget_follows_the_cheaper_mode(seen: Optional[VaultSeen], remembered: int,
                                              budget: Optional[int]) -> None:
    """The vault is listed only when ⌈size ÷ 25⌉ is below the GETs it saves."""
    assert list_budget(seen, remembered) == budget


def test_listing_pages_is_the_ceiling_of_size_over_25() -> None:
    """A list costs ⌈secrets ÷ 25⌉ requests, at least one."""
    assert [listing_pages(n) for n in (0, 1, 25, 26, 1000, 5000)] == [1, 1, 1, 2, 40, 200]


def test_initial_sync_fetches_everything_without_listing() -> None:
    """With no memory every source is fetched and no vault is listed."""
    listed = entries(MANY)
    vault = FakeVault([item(f"s{n}") for n in range(10)])
    decided = plan(listed, (), Freshness(), vault, stamp=stamp_of)
    assert vault.calls == [] and not decided.current
    assert decided.fetch == tuple(entry.source for entry in listed)


def test_unchanged_secrets_need_no_get() -> None:
    """After a write, a list showing the same updated and the files as written fetch nothing."""
    listed = entries(MANY)
    vault = FakeVault([item(f"s{n}") for n in range(10)] + [item("other")])
    decided = plan(listed, (), memory_after_write(listed), vault, stamp=stamp_of)
    assert vault.calls == [(VAULT, 9)]
    assert decided.fetch == () and set(decided.current) == {e.key for e in listed}
    assert decided.vaults[VAULT] == VaultSeen(11)


def test_while_starting_only_what_is_missing_is_fetched_without_listing() -> None:
    """Rule 5: a failed start's next attempt GETs only the sources it has not written,
    with no list, when what it wrote was fetched since ``fresh_since``; older ones count
    as usual (listed, and fetched when the file is gone)."""
    listed = entries(MANY)
    memory = memory_after_write(listed[:7])  # s7, s8, s9 failed
    vault = FakeVault([item(f"s{n}") for n in range(10)])

    def stamp(path: str) -> Optional[FileStamp]:
        return None if path.endswith("s2") else stamp_of(path)

    decided = plan(listed, (), memory, vault, stamp=stamp, fresh_since=FETCHED - 1)
    assert vault.calls == []
    assert decided.fetch == tuple(Source(VAULT, f"s{n}") for n in (2, 7, 8, 9))
    later = plan(listed, (), memory, vault, stamp=stamp, fresh_since=FETCHED + 1)
    assert vault.calls == [(VAULT, 6)]
    assert later.fetch == decided.fetch


def test_a_changed_updated_fetches_that_secret_only() -> None:
    """A secret whose updated moved (a rotation) is fetched; the rest are not."""
    listed = entries(MANY)
    vault = FakeVault([item(f"s{n}", UPDATED + (n == 3)) for n in range(10)])
    decided = plan(listed, (), memory_after_write(listed), vault, stamp=stamp_of)
    assert decided.fetch == (Source(VAULT, "s3"),)


def test_a_missing_or_changed_file_is_fetched_again() -> None:
    """A file gone, or with another inode, owner, mode, size or ctime, is fetched and rewritten."""
    listed = entries(MANY)
    vault = FakeVault([item(f"s{n}") for n in range(10)])

    def stamp(path: str) -> Optional[FileStamp]:
        if path.endswith("s1"):
            return None
        if path.endswith("s2"):
            return stamp_of(path)._replace(ctime_ns=6)  # edited behind the agent's back
        return stamp_of(path)

    decided = plan(listed, (), memory_after_write(listed), vault, stamp=stamp)
    assert decided.fetch == (Source(VAULT, "s1"), Source(VAULT, "s2"))


def test_deleted_and_disabled_secrets_are_fetched_to_report_as_before() -> None:
    """A secret gone from the list or disabled in it is fetched (its error, its kept file)."""
    listed = entries(MANY)
    vault = FakeVault([item(f"s{n}", enabled=n != 4) for n in range(10) if n != 5])
    decided = plan(listed, (), memory_after_write(listed), vault, stamp=stamp_of)
    assert decided.fetch == (Source(VAULT, "s4"), Source(VAULT, "s5"))


def test_a_version_fetched_in_the_second_of_its_write_is_confirmed_once_more() -> None:
    """updated has one-second resolution: a fetch within SETTLED_S of it is not trusted."""
    listed = entries(MANY)
    memory = memory_after_write(listed)
    recent = Source(VAULT, "s0")
    memory = memory._replace(sources={**memory.sources,
                                      recent: SourceSeen("v1", UPDATED, UPDATED + SETTLED_S)})
    vault = FakeVault([item(f"s{n}") for n in range(10)])
    assert plan(listed, (), memory, vault, stamp=stamp_of).fetch == (recent,)


@pytest.mark.parametrize("fetched_at, answered_at, is_current", [
    (UPDATED + 90.0, UPDATED + 0.0, False),  # the VM 90 s ahead: not settled on the vault's
    (UPDATED + 90.0, None, True),  # no usable Date: the VM's clock, as before
    (UPDATED - 600.0, UPDATED + 3600.0, True),  # the VM 10 min behind: settled all the same
])
def test_settled_is_judged_on_the_vaults_clock(fetched_at: float,
                                               answered_at: Optional[float],
                                               is_current: bool) -> None:
    """Whether a version fetched near its write is settled is read on the vault's clock
    (the Date of the GET's answer), whatever the VM's clock says (issue 17 item 12)."""
    listed = entries(MANY)
    memory = memory_after_write(listed)
    near = Source(VAULT, "s0")
    memory = memory._replace(sources={**memory.sources,
                                      near: SourceSeen("v1", UPDATED, fetched_at, answered_at)})
    vault = FakeVault([item(f"s{n}") for n in range(10)])
    fetch = plan(listed, (), memory, vault, stamp=stamp_of).fetch
    assert fetch == (() if is_current else (near,))


def test_pinned_versions_cost_no_request_once_written() -> None:
    """A pinned version, once written, is neither listed nor fetched; only its file is checked."""
    listed = entries(f"  - {{name: a, version: {PIN}}}\n  - {{name: b, version: {PIN}}}\n")
    vault = FakeVault()
    memory = memory_after_write(listed)
    decided = plan(listed, (), memory, vault, stamp=stamp_of)
    assert vault.calls == [] and decided.fetch == ()
    gone = plan(listed, (), memory, vault,
                stamp=lambda p: None if p.endswith("/a") else stamp_of(p))
    assert gone.fetch == (Source(VAULT, "a", PIN),) and vault.calls == []


def test_a_large_vault_keeps_per_secret_gets() -> None:
    """10 secrets of a 5,000-secret vault are fetched one by one, with no list request."""
    listed = entries(MANY)
    vault = FakeVault()
    decided = plan(listed, (), memory_after_write(listed, vault_size=5000), vault,
                   stamp=stamp_of)
    assert vault.calls == [] and len(decided.fetch) == 10


def test_a_list_past_its_budget_switches_to_gets_for_good() -> None:
    """A vault never listed that turns out larger than the GETs saved is fetched per secret."""
    listed = entries(MANY)
    vault = FakeVault(error=ListTooLongError("listing vault: more than 9 pages"))
    decided = plan(listed, (), memory_after_write(listed), vault, stamp=stamp_of)
    assert len(decided.fetch) == 10
    assert list_budget(decided.vaults[VAULT], 10) is None


def test_a_forbidden_list_falls_back_and_is_logged_once(caplog: pytest.LogCaptureFixture
                                                        ) -> None:
    """403 on the list: per-secret GETs, one warning with the fix, no list at the next refresh."""
    listed = entries(MANY)
    vault = FakeVault(error=VaultForbiddenError(f"listing vault {VAULT}: permission denied"))
    with caplog.at_level(logging.INFO, logger="agent.sync.freshness"):
        first = plan(listed, (), memory_after_write(listed), vault, stamp=stamp_of)
        again = memory_after_write(listed)._replace(vaults=first.vaults)
        second = plan(listed, (), again, vault, stamp=stamp_of)
    assert len(first.fetch) == len(second.fetch) == 10 and len(vault.calls) == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "'list' secret permission" in warnings[0]
    assert list_budget(forget_forbidden(again).vaults[VAULT], 10) == 9


def test_another_list_failure_falls_back_for_this_refresh_only() -> None:
    """A list that keeps failing (5xx) fetches every secret this time and lists again next time."""
    listed = entries(MANY)
    vault = FakeVault(error=VaultUnavailableError("listing vault: HTTP 503"))
    decided = plan(listed, (), memory_after_write(listed), vault, stamp=stamp_of)
    assert len(decided.fetch) == 10 and list_budget(decided.vaults[VAULT], 10) == 9


def test_a_set_is_fetched_whole_when_one_member_changed() -> None:
    """Every member of a set is fetched when one changed: a set is written whole."""
    listed = entries("  - {name: k, path: db/k, set: db}\n  - {name: c, path: db/c, set: db}\n"
                     "  - {name: x}\n")
    manifest = parse_manifest(f"vault: {VAULT}\ndirectory: /run/secrets\nsecrets:\n"
                              "  - {name: k, path: db/k, set: db}\n"
                              "  - {name: c, path: db/c, set: db}\n  - {name: x}\n",
                              "m.yaml", accounts=ACCOUNTS, check_filesystem=False)
    memory = memory_after_write(listed)._replace(
        sets={group.directory: group for group in manifest.sets})
    vault = FakeVault([item("k", UPDATED + 1), item("c"), item("x")])
    decided = plan(listed, manifest.sets, memory, vault, stamp=stamp_of)
    assert decided.fetch == (Source(VAULT, "k"), Source(VAULT, "c"))


def test_remember_keeps_successes_only_and_no_value() -> None:
    """A failed entry is forgotten (fetched again next time); a written one gets its stamps."""
    listed = entries("  - {name: a}\n  - {name: b}\n")
    decided = plan(listed, (), Freshness(), FakeVault(), stamp=stamp_of)
    outcomes = [
        WrittenOutcome(EntryWritten(listed[0], "v2", Validity(), ()),
                       ((listed[0].source, SourceSeen("v2", UPDATED, FETCHED)),)),
        WrittenOutcome(EntryWritten(listed[1], None, Validity(), ()),
                       error=VaultUnavailableError("x")),
    ]
    memory = remember(Freshness(), decided, (), outcomes, stamp=stamp_of)
    assert set(memory.entries) == {listed[0].key}
    assert memory.entries[listed[0].key].stamps == (
        (listed[0].paths[0], stamp_of(listed[0].paths[0])),)
    assert dict(memory.sources) == {listed[0].source: SourceSeen("v2", UPDATED, FETCHED)}
    assert "value" not in repr(memory)


# ---------------------------------------------------------------------------
# The local check on real files (tmpfs)


CLOCK_REALTIME_COARSE = getattr(time, "CLOCK_REALTIME_COARSE", 5)  # linux/time.h


def wait_for_a_new_ctime(stamp: FileStamp) -> None:
    """Until a change now gets another ctime than ``stamp``'s: the kernel
    takes ctime from its coarse clock, which may not have ticked yet."""
    deadline = time.monotonic() + 2.0
    while time.clock_gettime_ns(CLOCK_REALTIME_COARSE) <= stamp.ctime_ns:
        assert time.monotonic() < deadline, "the coarse clock did not move"
        time.sleep(0.002)


def written_file(directory: Path, mode: int, content: bytes = b"the-value-0123") -> str:
    path = directory / "s"
    path.write_bytes(content)
    os.chmod(path, mode)
    return str(path)


def test_a_same_size_in_place_write_is_seen_by_its_ctime_alone(shm_dir: Path) -> None:
    """A write(2) in place of the same size keeps inode, size, owner and mode: only
    the stamp's ctime tells the file changed, and the entry is no longer on disk."""
    path = written_file(shm_dir, 0o440)  # only root and the agent may write: no digest
    before = file_stamp(path, euid=os.geteuid())
    assert before is not None and before.digest is None
    [entry] = parse_manifest(f"vault: {VAULT}\ndirectory: {shm_dir}\nsecrets:\n  - name: s\n",
                             "m.yaml", accounts=ACCOUNTS, check_filesystem=False).secrets
    written = EntryWritten(entry, "v1", Validity(), ((path, before),))
    assert is_on_disk(written, entry, file_stamp)
    wait_for_a_new_ctime(before)
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, b"THE", 0)
    finally:
        os.close(fd)
    after = file_stamp(path, euid=os.geteuid())
    assert after is not None and after != before
    assert after == before._replace(ctime_ns=after.ctime_ns)
    assert not is_on_disk(written, entry, file_stamp)


def test_an_edit_through_a_writable_mapping_is_seen_by_content(shm_dir: Path) -> None:
    """A file others may write is verified by content: a store through a shared mapping
    to a page already faulted in (tmpfs moves no ctime for it) changes its stamp."""
    path = written_file(shm_dir, 0o660)
    fd = os.open(path, os.O_RDWR)
    try:
        mapped = mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    try:
        assert mapped[0:1] == b"t"  # a read faults the page in: later stores move no ctime
        before = file_stamp(path, euid=os.geteuid())
        assert before is not None and before.digest is not None
        assert file_stamp(path, euid=os.geteuid()) == before  # the same bytes: the same stamp
        wait_for_a_new_ctime(before)
        mapped[0:3] = b"THE"
        after = file_stamp(path, euid=os.geteuid())
    finally:
        mapped.close()
    assert after is not None and after != before
    assert "****" in repr(after) and repr(after.digest) not in repr(after)


@pytest.mark.parametrize("uid, mode, euid, expected", [
    (0, 0o400, 0, False),      # the default: read-only
    (0, 0o440, 0, False),
    (0, 0o644, 0, False),      # only root writes it
    (1001, 0o400, 0, False),   # a service's read-only file: chmod would move ctime
    (1001, 0o440, 0, False),
    (1001, 0o600, 0, True),    # the service's user may write it in place
    (0, 0o660, 0, True),       # the group may
    (0, 0o642, 0, True),       # others may
    (1000, 0o600, 1000, False),  # the agent's own user (kv-agent not run as root)
    (0, 0o600, 1000, False),   # root's, under an agent of another user
])
def test_writable_by_others_is_any_write_bit_for_someone_but_root_and_the_agent(
        uid: int, mode: int, euid: int, expected: bool) -> None:
    """Verified by content: a file whose group, others or (another user as) owner may write it."""
    assert is_writable_by_others(uid, mode, euid) is expected


def test_a_file_others_may_write_and_too_large_to_verify_has_no_stamp(shm_dir: Path) -> None:
    """Over MAX_VERIFIED_BYTES a file others may write gets no stamp (fetched every refresh)."""
    path = written_file(shm_dir, 0o660, b"x" * (MAX_VERIFIED_BYTES + 1))
    assert file_stamp(path, euid=os.geteuid()) is None
    os.chmod(path, 0o640)
    assert file_stamp(path, euid=os.geteuid()) is not None
