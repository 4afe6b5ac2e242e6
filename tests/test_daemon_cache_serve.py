"""The sealed cache end to end (issue 20): `kv-agent run` against the emulator, sealing
with the real systemd-creds in a private mount namespace (tests/sealing.py: the agent's
Sealer gets the namespace prefix through a prelude; never the machine's host key).

A daemon writes and caches; a "reboot" (tmpfs and its ledger gone) with IMDS down is
READY after `after` with the cached files and the cache in STATUS; with a 403 it is
not; with an expired copy it is not; the first good refresh replaces the files; no
plaintext in the cache directory after each step."""

from __future__ import annotations

import base64
import json
import shutil
import time
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, Optional, Tuple

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sealing import key_directory, private_sealer, skip_without_sealing
from test_daemon import (  # noqa: F401 - fixtures
    Running,
    StartAgent,
    Vault,
    certificate_entry,
    entry,
    read,
    short_dir,
    start_agent,
    vault,
)

from agent.cache.store import file_name

pytestmark = pytest.mark.integration

AFTER = "2s"


@pytest.fixture
def prelude(tmp_path: Path) -> Iterator[str]:
    """Code run first in the agent's process: its Sealer's default command is the
    private namespace's."""
    skip_without_sealing()
    command = private_sealer(key_directory(tmp_path)).command
    yield ("import agent.cache.seal as _seal\n"
           f"_seal.Sealer.__init__.__defaults__ = ({command!r}, 10.0, _seal.ENVIRONMENT)\n")


def _assert_no_plaintext(directory: Path, values: Iterable[str]) -> None:
    """Each value, its halves and its base64's first half (a prefix whatever follows
    the value in its file): the unsealed document holds a value in base64."""
    for path in directory.iterdir():
        data = path.read_bytes()
        for value in values:
            raw = value.encode()
            encoded = base64.b64encode(raw)
            for part in (raw, raw[: len(raw) // 2], raw[len(raw) // 2:],
                         encoded[: len(encoded) // 2]):
                assert part not in data, f"{path.name} holds a value in plaintext"


def _first_boot(start_agent: StartAgent, vault: Vault, cache: Path,  # noqa: F811
                prelude: str, shm_dir: Path, metrics: Optional[Path] = None,
                **cache_keys: Any) -> Running:
    """Start, fetch and cache both secrets, stop; then "reboot": the files and the
    state (ledger) on tmpfs are gone, the cache directory stays."""
    more = {"metrics": str(metrics)} if metrics is not None else {}
    run = start_agent([entry("alpha"), entry("beta")], refresh="60s", prelude=prelude,
                      state_dir=shm_dir / "state-boot1",
                      cache={"after": AFTER, "directory": str(cache), **cache_keys}, **more)
    run.wait_ready()
    run.wait(lambda: cache.is_dir() and len(list(cache.iterdir())) == 2, "two sealed copies")
    _assert_no_plaintext(cache, vault.values)
    run.stop()
    shutil.rmtree(run.directory)
    return run


def _from_cache(metrics: Path) -> Dict[str, float]:
    """kv_agent_secret_from_cache by entry, as Prometheus' parser reads the file."""
    return {sample.labels["entry"]: sample.value
            for family in text_string_to_metric_families(metrics.read_text())
            if family.name == "kv_agent_secret_from_cache" for sample in family.samples}


def _second_boot(start_agent: StartAgent, run: Running, shm_dir: Path,  # noqa: F811
                 prelude: str) -> Running:
    return start_agent(manifest=run.manifest, prelude=prelude, fast_retry=True,
                       state_dir=shm_dir / "state-boot2")


def _served_in_an_outage(start_agent: StartAgent, vault: Vault,  # noqa: F811
                         first: Running, shm_dir: Path, prelude: str) -> Tuple[Running, Any]:
    """IMDS gone (410 to every request), the agent starts again: its READY
    datagram, sent no sooner than ``cache.after`` (2 s)."""
    vault.emulator.inject_fault("imds", 410, count=100_000)
    began = time.monotonic()
    second = _second_boot(start_agent, first, shm_dir, prelude)
    ready = second.wait_ready()
    assert time.monotonic() - began >= 2.0, "served before cache.after"
    return second, ready


def test_imds_down_at_boot_serves_the_sealed_copies_then_the_vault_takes_over(
        start_agent: StartAgent, vault: Vault, shm_dir: Path, tmp_path: Path,  # noqa: F811
        prelude: str) -> None:
    values = {name: vault.put(name) for name in ("alpha", "beta")}
    cache, metrics = tmp_path / "cache", shm_dir / "metrics" / "kv-agent.prom"
    first = _first_boot(start_agent, vault, cache, prelude, shm_dir, metrics=metrics)
    assert set(_from_cache(metrics).values()) == {0.0}
    second, ready = _served_in_an_outage(start_agent, vault, first, shm_dir, prelude)
    assert {name: read(second.directory / name) for name in values} == values
    assert (second.directory / "alpha").stat().st_mode & 0o777 == 0o440
    status = ready.fields["STATUS"]
    assert status.startswith("serving 2 of 2 from the sealed cache of "), status
    assert second.status_json()["cache"].startswith("serving 2 of 2")
    assert "from the sealed cache" in second.status_cli().stdout
    assert all(row["from_cache"] for row in second.status_json()["secrets"])
    assert second.status_cli().stdout.count("(from the sealed cache, ") == 2
    second.wait(lambda: set(_from_cache(metrics).values()) == {1.0}, "the gauge at 1")
    _assert_no_plaintext(cache, vault.values)
    # IMDS returns, the secret rotated meanwhile: the first good refresh replaces it.
    rotated = vault.put("alpha")
    vault.emulator.clear_faults()
    second.wait_content("alpha", rotated)
    second.wait_status_json(lambda d: "cache" not in d, "the cache no longer in use")
    assert "from_cache" not in second.status_json()["secrets"][0]
    second.wait(lambda: set(_from_cache(metrics).values()) == {0.0}, "the gauge back at 0")
    second.wait(lambda: "from the sealed cache" not in second.notes.statuses()[-1],
                "STATUS back to normal")
    _assert_no_plaintext(cache, list(vault.values) + [rotated])
    second.stop()


@pytest.mark.parametrize("refusal", ["permission-denied", "endpoint-403"])
def test_a_403_is_an_answer_never_hidden_by_the_cache(
        start_agent: StartAgent, vault: Vault, shm_dir: Path, tmp_path: Path,  # noqa: F811
        prelude: str, refusal: str) -> None:
    """Each secret's GET refused (403 AccessDenied, after the challenge: the role was
    taken away), or every request to the vault answered 403 (no challenge): either is
    an answer, and the copies stay unserved."""
    vault.put("alpha")
    vault.put("beta")
    cache = tmp_path / "cache"
    first = _first_boot(start_agent, vault, cache, prelude, shm_dir)
    if refusal == "permission-denied":
        for name in ("alpha", "beta"):
            vault.emulator.forbid_secret(name)
    else:
        vault.emulator.inject_fault("vault", 403, count=100_000)
    second = _second_boot(start_agent, first, shm_dir, prelude)
    second.wait(lambda: second.process.lines("not served from the sealed cache: the vault "
                                             "answered"), "the refusal to serve logged")
    time.sleep(1.0)
    assert not second.readies()
    assert not (second.directory / "alpha").exists()
    _assert_no_plaintext(cache, vault.values)
    second.stop()


@pytest.mark.parametrize("description", [
    "Identity not found",
    "Multiple user assigned identities exist, please specify the clientId / resourceId of "
    "the identity in the token request",
], ids=["identity not found", "multiple identities"])
def test_an_imds_400_is_an_answer_never_hidden_by_the_cache(
        start_agent: StartAgent, vault: Vault, shm_dir: Path, tmp_path: Path,  # noqa: F811
        prelude: str, description: str) -> None:
    """The identity was taken from the VM (or a second one assigned) while it was down:
    IMDS answers 400 at the restart. That is an answer, so the copies stay unserved and
    the agent is not READY."""
    vault.put("alpha")
    vault.put("beta")
    cache = tmp_path / "cache"
    first = _first_boot(start_agent, vault, cache, prelude, shm_dir)
    body = json.dumps({"error": "invalid_request", "error_description": description})
    vault.emulator.inject_fault("imds", 400, count=100_000, body=body.encode())
    began = time.monotonic()
    second = _second_boot(start_agent, first, shm_dir, prelude)
    second.wait(lambda: second.process.lines("not served from the sealed cache: the identity "
                                             "endpoint answered"), "the refusal to serve logged")
    assert time.monotonic() - began >= 2.0, "judged before cache.after"
    assert any(description in line for line in second.process.lines("the identity endpoint"))
    time.sleep(1.0)
    assert not second.readies()
    assert not (second.directory / "alpha").exists()
    assert "cache" not in second.status_json()
    _assert_no_plaintext(cache, vault.values)
    second.stop()


def _files(directory: Path) -> Dict[str, Tuple[bytes, int, bool]]:
    """Every file under ``directory`` (relative path -> bytes, mode, whether its
    directory is a real one), reserved names aside."""
    return {str(path.relative_to(directory)): (path.read_bytes(), path.stat().st_mode & 0o7777,
                                               not path.parent.is_symlink())
            for path in sorted(directory.rglob("*"))
            if path.is_file() and ".kv-agent" not in str(path)}


def test_sets_are_served_whole_from_their_sealed_copies(
        start_agent: StartAgent, vault: Vault, shm_dir: Path, tmp_path: Path,  # noqa: F811
        prelude: str) -> None:
    """A certificate's key and cert, and a `set:` of two secrets: with IMDS down at the
    restart, each set is swapped in whole from its members' copies after `after`, byte
    for byte and mode for mode as the vault's refresh wrote them, recorded in the ledger
    as a set; READY, the cache in STATUS; the first good refresh takes over."""
    vault.emulator.add_certificate("web-tls", key_type="ec")
    values = [vault.put("db-password"), vault.put("db-user")]
    cache = tmp_path / "cache"
    entries = [certificate_entry(),
               entry("db-password", path="db/password", set="db"),
               entry("db-user", path="db/user", set="db", mode="0400")]
    first = start_agent(entries, refresh="60s", prelude=prelude,
                        state_dir=shm_dir / "state-boot1",
                        cache={"after": AFTER, "directory": str(cache)})
    first.wait_ready()
    first.wait(lambda: cache.is_dir() and len(list(cache.iterdir())) == 3, "three copies")
    before = _files(first.directory)
    assert sorted(before) == ["db/password", "db/user", "web/tls.crt", "web/tls.key"]
    sets_before = first.status_json()["sets"]
    first.stop()
    shutil.rmtree(first.directory)
    second, ready = _served_in_an_outage(start_agent, vault, first, shm_dir, prelude)
    assert _files(second.directory) == before
    assert ready.fields["STATUS"].startswith("serving 3 of 3 from the sealed cache of ")
    document = second.status_json()
    assert document["sets"] == sets_before
    assert set(document["written"]) == {str(second.directory / name) for name in before}
    assert all(row["from_cache"] for row in document["secrets"])
    _assert_no_plaintext(cache, list(vault.values) + values)
    vault.emulator.clear_faults()
    rotated = vault.put("db-user")
    second.wait_content("db/user", rotated)
    second.wait_status_json(lambda d: "cache" not in d, "the cache no longer in use")
    assert read(second.directory / "db" / "password") == values[0]
    second.stop()


def test_a_set_with_one_unservable_copy_is_not_served_at_all(
        start_agent: StartAgent, vault: Vault, shm_dir: Path, tmp_path: Path,  # noqa: F811
        prelude: str) -> None:
    """One member's copy gone (or not this machine's): the set is skipped whole, with one
    line naming the set and the reason; its other member is not written alone."""
    vault.put("db-password")
    vault.put("db-user")
    cache = tmp_path / "cache"
    first = start_agent([entry("db-password", path="db/password", set="db"),
                         entry("db-user", path="db/user", set="db")], refresh="60s",
                        prelude=prelude, state_dir=shm_dir / "state-boot1",
                        cache={"after": AFTER, "directory": str(cache)})
    first.wait_ready()
    first.wait(lambda: cache.is_dir() and len(list(cache.iterdir())) == 2, "two copies")
    first.stop()
    shutil.rmtree(first.directory)
    (cache / file_name(str(first.directory / "db" / "user"))).unlink()
    vault.emulator.inject_fault("imds", 410, count=100_000)
    second = _second_boot(start_agent, first, shm_dir, prelude)
    lines = second.wait(lambda: second.process.lines("set 'db'"), "the set's skip logged")
    assert "none of it" in lines[0] and "no sealed copy" in lines[0], lines
    time.sleep(1.0)
    assert not second.readies()
    assert not (second.directory / "db").exists()
    second.stop()


SELECT = {"select": {"prefix": "app-"}, "directory": "app", "strip_prefix": True,
          "mode": "0440"}


def _select_first_boot(start_agent: StartAgent, vault: Vault, cache: Path,  # noqa: F811
                       prelude: str, shm_dir: Path) -> Running:
    """A plain entry and a select: entry of two secrets: fetched, sealed (three copies
    and the expansion), stopped; then the "reboot"."""
    first = start_agent([entry("alpha"), SELECT], refresh="60s", prelude=prelude,
                        state_dir=shm_dir / "state-boot1",
                        cache={"after": AFTER, "directory": str(cache)})
    first.wait_ready()
    first.wait(lambda: cache.is_dir() and len(list(cache.iterdir())) == 4,
               "three copies and the expansion")
    return first


def test_a_select_entry_is_served_from_its_sealed_expansion(
        start_agent: StartAgent, vault: Vault, shm_dir: Path, tmp_path: Path,  # noqa: F811
        prelude: str) -> None:
    """With IMDS down at the restart, the select: entry's last good expansion stands in
    for its listing: each of its secrets' files from its copy, as the listing wrote them,
    READY after `after`, the cache in STATUS; no name or value in plaintext in the cache
    directory. IMDS back, the listing takes over: a secret added meanwhile is written."""
    names = ["app-first-service", "app-second-service"]
    values = [vault.put("alpha")] + [vault.put(name) for name in names]
    cache = tmp_path / "cache"
    first = _select_first_boot(start_agent, vault, cache, prelude, shm_dir)
    before = _files(first.directory)
    assert sorted(before) == ["alpha", "app/first-service", "app/second-service"]
    first.stop()
    shutil.rmtree(first.directory)
    second, ready = _served_in_an_outage(start_agent, vault, first, shm_dir, prelude)
    assert _files(second.directory) == before
    assert ready.fields["STATUS"].startswith("serving 4 of 4 from the sealed cache of "), \
        ready.fields["STATUS"]
    rows = {row["name"]: row for row in second.status_json()["secrets"]}
    assert sorted(rows) == ["alpha", *names, "select prefix 'app-'"]
    assert all(row["from_cache"] for row in rows.values())
    assert second.process.lines("served from its sealed expansion")
    _assert_no_plaintext(cache, values + names)
    vault.emulator.clear_faults()
    added = vault.put("app-third-service")
    second.wait_content("app/third-service", added)
    second.wait_status_json(lambda d: "cache" not in d, "the cache no longer in use")
    second.wait(lambda: len(list(cache.iterdir())) == 5, "the new secret's copy")
    _assert_no_plaintext(cache, values + names + [added, "app-third-service"])
    second.stop()


def test_a_select_entry_with_one_unservable_copy_is_not_served_at_all(
        start_agent: StartAgent, vault: Vault, shm_dir: Path, tmp_path: Path,  # noqa: F811
        prelude: str) -> None:
    """One selected secret's copy gone: none of the select: entry is written (one line
    naming it and why); the agent is not READY, as when its listing fails."""
    vault.put("alpha")
    vault.put("app-first-service")
    vault.put("app-second-service")
    cache = tmp_path / "cache"
    first = _select_first_boot(start_agent, vault, cache, prelude, shm_dir)
    first.stop()
    (cache / file_name(str(first.directory / "app" / "second-service"))).unlink()
    shutil.rmtree(first.directory)
    vault.emulator.inject_fault("imds", 410, count=100_000)
    second = _second_boot(start_agent, first, shm_dir, prelude)
    lines = second.wait(lambda: second.process.lines("select prefix 'app-'"), "the skip")
    assert "none of it" in lines[0] and "app/second-service: no sealed copy" in lines[0], lines
    time.sleep(1.0)
    assert not second.readies()
    assert not (second.directory / "app").exists()
    assert read(second.directory / "alpha") is not None  # the plain entry is served
    second.stop()


def test_an_expired_copy_is_not_served(
        start_agent: StartAgent, vault: Vault, shm_dir: Path, tmp_path: Path,  # noqa: F811
        prelude: str) -> None:
    """max_age 1h, and the copies' fetch time an hour and more behind: sealed with
    --not-after in the past, systemd-creds refuses them (or the age does)."""
    vault.put("alpha")
    vault.put("beta")
    cache = tmp_path / "cache"
    first = _first_boot(start_agent, vault, cache, prelude, shm_dir, max_age="1h")
    vault.emulator.inject_fault("imds", 410, count=100_000)
    hour_later = prelude + (
        "import time as _time\n_real = _time.time\n"
        "_time.time = lambda: _real() + 3700.0\n")
    second = start_agent(manifest=first.manifest, prelude=hour_later, fast_retry=True,
                         state_dir=shm_dir / "state-boot2")
    second.wait(lambda: second.process.lines("sealed copy skipped"), "the skip logged")
    time.sleep(1.0)
    assert not second.readies()
    assert not (second.directory / "alpha").exists()
    second.stop()
