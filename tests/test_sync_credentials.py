"""Credentials in one sync (agent.sync.credentials) against the in-process emulator: an output
with credential: lands in the memory store, never on disk; a rotation replaces it; a failure
keeps the last good value; an unchanged one counts for nothing."""

from __future__ import annotations

import os
from pathlib import Path

from test_sync import environ, manifest

from agent.base.errors import SecretNotFoundError
from agent.emulator import Emulator
from agent.pipeline.credentials import Grant
from agent.sync import credentials
from agent.sync.sync import Sync
from agent.writer.credentials import NOT_LOADED, UNKNOWN_ID, CredentialStore


def files_under(directory: Path) -> list:
    """Every file below ``directory`` but a set's old generation waiting out its grace."""
    found = (str(Path(root, name).relative_to(directory))
             for root, _, names in os.walk(directory) for name in names)
    return sorted(path for path in found if not path.startswith(".kv-agent-"))


def test_a_credential_only_entry_fills_the_store_and_writes_no_file(
        emulator: Emulator, shm_dir: Path) -> None:
    """credential: without path: the value is in the store for granted units, the directory
    stays empty, and a rotation is served from the next sync on."""
    emulator.set_secret("cred-db", "first")
    store = CredentialStore[Grant]()
    agent = Sync(manifest(emulator, shm_dir,
                          "  - name: cred-db\n"
                          "    credential: {id: db, units: [app.service, 'worker@*.service']}\n"),
                 environ=environ(emulator), credentials_store=store)
    credentials.declare(store, agent.manifest)  # as the daemon does once it is current
    try:
        agent.prepare()
        first = agent.sync()
        emulator.set_secret("cred-db", "second")
        second = agent.sync()
    finally:
        agent.close()
    assert files_under(shm_dir) == []
    (outcome,) = first.outcomes
    assert outcome.error is None and outcome.changed_paths == ()
    assert outcome.changed_credentials == ("credential:app.service/db",
                                           "credential:worker@*.service/db")
    assert first.changed == 1 and second.changed == 1
    assert store.value_for("app.service", "db") == b"second"
    assert store.value_for("worker@2.service", "db") == b"second"
    assert store.value_for("other.service", "db") is None
    assert store.loaded() == frozenset({"credential:app.service,worker@*.service/db"})


def test_an_unchanged_credential_is_not_counted_as_written(
        emulator: Emulator, shm_dir: Path) -> None:
    """A second sync of the same version changes nothing and names no credential."""
    emulator.set_secret("cred-steady", "same")
    agent = Sync(manifest(emulator, shm_dir, "  - name: cred-steady\n"
                                              "    credential: {units: [app.service]}\n"),
                 environ=environ(emulator))
    try:
        first, second = agent.sync(), agent.sync()
    finally:
        agent.close()
    assert first.changed == 1 and second.changed == 0
    assert second.outcomes[0].changed_credentials == ()
    assert agent.credentials.value_for("app.service", "cred-steady") == b"same"


def test_a_failed_fetch_keeps_the_last_good_credential(
        emulator: Emulator, shm_dir: Path) -> None:
    """A secret that disappears fails its entry; the store still serves the last good value,
    and the failure names the credential left as it was."""
    emulator.set_secret("cred-going", "kept")
    agent = Sync(manifest(emulator, shm_dir, "  - name: cred-going\n"
                                              "    credential: {units: [app.service]}\n"),
                 environ=environ(emulator))
    try:
        agent.sync()
        emulator.delete_secret("cred-going")
        report = agent.sync()
    finally:
        agent.close()
    (failed,) = report.failures
    assert isinstance(failed.error, SecretNotFoundError)
    assert "[credential:app.service/cred-going left as it was]" in failed.describe()
    assert agent.credentials.value_for("app.service", "cred-going") == b"kept"


def test_a_path_and_a_credential_write_the_file_and_fill_the_store(
        emulator: Emulator, shm_dir: Path) -> None:
    """With path: beside credential:, the same bytes go to the file and to the store."""
    emulator.set_secret("cred-both", "both ways")
    agent = Sync(manifest(emulator, shm_dir, "  - name: cred-both\n    path: both\n"
                                              "    credential: {units: [app.service]}\n"),
                 environ=environ(emulator))
    try:
        (outcome,) = agent.sync().outcomes
    finally:
        agent.close()
    assert (shm_dir / "both").read_text() == "both ways"
    assert outcome.changed_paths == (str(shm_dir / "both"),)
    assert outcome.changed_credentials == ("credential:app.service/cred-both",)
    assert agent.credentials.value_for("app.service", "cred-both") == b"both ways"


def test_a_certificate_key_as_a_credential_and_its_chain_as_a_file(
        emulator: Emulator, shm_dir: Path) -> None:
    """key: {credential} and fullchain: {path}: only the chain is on disk (its set swapped in),
    the key is in the store; a rotation replaces both together."""
    emulator.add_certificate("cred-tls", key_type="ec")
    agent = Sync(manifest(emulator, shm_dir,
                          "  - name: cred-tls\n    certificate:\n"
                          "      key: {credential: {id: tls.key, units: [nginx.service]}}\n"
                          "      fullchain: web/fullchain.pem\n"),
                 environ=environ(emulator))
    try:
        first = agent.sync()
        key = agent.credentials.value_for("nginx.service", "tls.key")
        chain = (shm_dir / "web" / "fullchain.pem").read_bytes()
        emulator.rotate_certificate("cred-tls")
        second = agent.sync()
    finally:
        agent.close()
    assert files_under(shm_dir) == ["web/fullchain.pem"]
    assert key is not None and key.startswith(b"-----BEGIN PRIVATE KEY-----")
    assert not first.failures and not second.failures
    assert second.outcomes[0].changed_credentials == ("credential:nginx.service/tls.key",)
    assert agent.credentials.value_for("nginx.service", "tls.key") not in (None, key)
    assert (shm_dir / "web" / "fullchain.pem").read_bytes() != chain


def test_a_refresh_skips_an_unchanged_credential_only_while_the_store_holds_it(
        emulator: Emulator, shm_dir: Path) -> None:
    """The refresh's memory (here a start's retry, rule 5 of agent.sync.freshness) skips a
    credential only if the store still holds the value: a store that lost it (grants declared
    anew) gets it fetched again."""
    for name in ("cred-list-a", "cred-list-b"):
        emulator.set_secret(name, f"value of {name}")
    entries = ("  - name: cred-list-a\n    credential: {units: [a.service]}\n"
               "  - name: cred-list-b\n    credential: {units: [b.service]}\n")
    agent = Sync(manifest(emulator, shm_dir, entries), environ=environ(emulator))
    try:
        first = agent.sync()
        emulator.reset_stats()
        agent.sync(freshness=first.freshness, fresh_for_s=900.0)
        gets_while_held = [r.path for r in emulator.vault_log if "/secrets/cred-list" in r.path]
        agent.credentials.declare({})  # as a fresh store: nothing held
        credentials.declare(agent.credentials, agent.manifest)
        emulator.reset_stats()
        again = agent.sync(freshness=first.freshness, fresh_for_s=900.0)
    finally:
        agent.close()
    assert gets_while_held == []
    assert sorted(r.path.rsplit("/", 1)[-1] for r in emulator.vault_log
                  if "/secrets/cred-list" in r.path) == ["cred-list-a", "cred-list-b"]
    assert agent.credentials.value_for("a.service", "cred-list-a") == b"value of cred-list-a"
    assert again.changed == 2


def test_a_sync_of_a_replaced_manifest_loads_nothing_it_no_longer_declares(
        emulator: Emulator, shm_dir: Path) -> None:
    """Two Syncs on one store (a reload): the grants declared last are the ones served; the
    old Sync's late values for a credential that left the manifest are ignored."""
    emulator.set_secret("cred-old", "old value")
    store = CredentialStore[Grant]()
    old = Sync(manifest(emulator, shm_dir, "  - name: cred-old\n"
                                            "    credential: {units: [app.service]}\n"),
               environ=environ(emulator), credentials_store=store)
    credentials.declare(store, old.manifest)
    new = Sync(manifest(emulator, shm_dir, "  - {name: cred-old, path: plain}\n"),
               environ=environ(emulator), credentials_store=store)
    credentials.declare(store, new.manifest)  # the reload was accepted
    try:
        (outcome,) = old.sync().outcomes
    finally:
        old.close()
        new.close()
    assert outcome.error is None and outcome.changed_credentials == ()
    assert store.lookup("app.service", "cred-old").value is None
    assert store.loaded() == frozenset()


def test_a_given_store_serves_nothing_until_its_owner_declares_the_manifest(
        emulator: Emulator, shm_dir: Path) -> None:
    """A Sync given a store (the daemon's) declares nothing itself: a manifest a reload then
    rejects never changes what is served. Its own store (once) it declares."""
    emulator.set_secret("cred-undeclared", "v")
    store = CredentialStore[Grant]()
    text = "  - name: cred-undeclared\n    credential: {units: [app.service]}\n"
    given = Sync(manifest(emulator, shm_dir, text), environ=environ(emulator),
                 credentials_store=store)
    own = Sync(manifest(emulator, shm_dir, text), environ=environ(emulator))
    try:
        (outcome,) = given.sync().outcomes
        own.sync()
    finally:
        given.close()
        own.close()
    assert outcome.error is None and outcome.changed_credentials == ()
    assert store.lookup("app.service", "cred-undeclared").refusal == UNKNOWN_ID
    assert own.credentials.value_for("app.service", "cred-undeclared") == b"v"


def test_the_ready_gate_and_the_check_line_read_the_manifest_and_store(
        emulator: Emulator, shm_dir: Path) -> None:
    """unloaded() lists entries whose credentials are not in memory yet; served() counts them."""
    emulator.set_secret("cred-ready", "v")
    agent = Sync(manifest(emulator, shm_dir,
                          "  - name: cred-ready\n    credential: {units: [a.service, b.service]}\n"
                          "  - name: cred-absent\n    optional: true\n"
                          "    credential: {units: ['b@*.service']}\n"
                          "  - {name: cred-ready, path: file}\n"),
                 environ=environ(emulator))
    entries = agent.manifest.secrets
    assert [e.name for e in credentials.unloaded(entries, agent.credentials)] == \
        ["cred-ready", "cred-absent"]
    assert agent.credentials.lookup("a.service", "cred-ready").refusal == NOT_LOADED
    try:
        agent.sync()
    finally:
        agent.close()
    assert [e.name for e in credentials.unloaded(entries, agent.credentials)] == ["cred-absent"]
    assert credentials.served(agent.manifest).describe() == \
        "2 credentials for 3 unit patterns"
