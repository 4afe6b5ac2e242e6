"""Bulk selection (``select:`` entries): offline validation, expansion of a
listing, and end to end through ``Sync.sync``, ``kv-agent once`` and
``kv-agent run`` against the emulator."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest
from secrecy import fresh_value
from test_daemon import (  # noqa: F401 - fixtures
    Running,
    StartAgent,
    Vault,
    manifest_text,
    read,
    replace_file,
    short_dir,
    start_agent,
    vault,
    write_file,
)

from agent.base.errors import ManifestError
from agent.emulator import Emulator
from agent.manifest import Accounts, Manifest, Selection, parse_manifest
from agent.pipeline.outputs import Output
from agent.pipeline.sources import SecretAttributes
from agent.sync.selection import expand, explicit_names
from agent.sync.sync import Sync
from agent.vault.listing import SecretItem

ACCOUNTS = Accounts(user=lambda name: {"root": 0, "app1": 1001}.get(name),
                    group=lambda name: {"root": 0}.get(name))
VAULT = "https://contoso-kv.vault.azure.net"
REPO = Path(__file__).resolve().parent.parent


def parse(entries: str, directory: str = "/dev/shm/kv") -> Manifest:
    text = f"vault: {VAULT}\ndirectory: {directory}\nsecrets:\n{entries}"
    return parse_manifest(text, "m.yaml", accounts=ACCOUNTS, check_filesystem=False)


def problems(entries: str) -> List[str]:
    with pytest.raises(ManifestError) as caught:
        parse(entries)
    return list(caught.value.problems)


# ---------------------------------------------------------------------------
# The manifest


def test_the_issue_syntax_parses_into_a_selection() -> None:
    """The issue's example gives one Selection: prefix, tags, directory under the manifest's, owner and mode."""
    manifest = parse('  - select: {prefix: "app1-", tags: {env: prod}}\n'
                     "    directory: app1\n    owner: app1\n    mode: \"0400\"\n"
                     "    strip_prefix: true\n    optional: true\n"
                     "    on_change: [systemctl, reload, app1]\n")
    assert manifest.secrets == ()
    [selection] = manifest.selections
    assert (selection.prefix, selection.tags, selection.vault, selection.directory) == (
        "app1-", (("env", "prod"),), VAULT, "/dev/shm/kv/app1")
    assert (selection.defaults.uid, selection.defaults.mode) == (1001, 0o400)
    assert selection.strip_prefix and selection.is_optional and not selection.include_certificates
    assert selection.on_change == ("systemctl", "reload", "app1")


@pytest.mark.parametrize("entries, expected", [
    ("  - select: {prefix: a-}\n    directory: a\n    strip_prefx: true\n",
     "secrets[0].strip_prefx: unknown key; did you mean 'strip_prefix'?"),
    ("  - select: {prefx: a-}\n    directory: a\n",
     "secrets[0].select.prefx: unknown key; did you mean 'prefix'?"),
    ("  - select: {prefix: a_b}\n    directory: a\n",
     "secrets[0].select.prefix: 'a_b' is not the start of a Key Vault secret name"),
    ("  - select: {tags: [env, prod]}\n    directory: a\n",
     "secrets[0].select.tags: must be a mapping of at least one tag name to its value"),
    ("  - select: {tags: {env: [prod]}}\n    directory: a\n",
     "secrets[0].select.tags.env:"),
    ("  - select: app1-\n    directory: a\n",
     "secrets[0].select: must be a mapping with prefix, tags or both"),
    ("  - select: {prefix: a-}\n",
     "secrets[0].directory: missing"),
    ("  - select: {prefix: a-}\n    directory: ../elsewhere\n",
     "secrets[0].directory: '../elsewhere' contains '..'"),
    ("  - select: {prefix: a-}\n    directory: /etc/app\n",
     "secrets[0].directory: '/etc/app' is outside /dev/shm/kv"),
    ("  - select: {prefix: a-}\n    directory: a\n    include_certificates: yes please\n",
     "secrets[0].include_certificates: 'yes please' is not true or false"),
    ("  - name: a-one\n    path: A/one\n  - select: {prefix: a-}\n    directory: a\n",
     "/dev/shm/kv/A/one of 'a-one' (line 4) is inside /dev/shm/kv/a"),
    ("  - name: one\n    path: a\n  - select: {prefix: a-}\n    directory: a/b\n",
     "/dev/shm/kv/a/b would be inside /dev/shm/kv/a, which 'one' writes as a file"),
    ("  - select: {prefix: a-}\n    directory: a\n  - select: {prefix: b-}\n    directory: a/b\n",
     "/dev/shm/kv/a/b overlaps /dev/shm/kv/a"),
])
def test_check_refuses_each_bad_select_entry(entries: str, expected: str) -> None:
    """Every rule of a select entry is checked offline, one line naming the key and the fix."""
    found = problems(entries)
    assert any(expected in line for line in found), found


def test_a_manifest_of_select_entries_alone_needs_no_top_vault_if_each_has_one() -> None:
    """A select entry's own vault: is used; without any vault the entry says so."""
    text = (f"directory: /dev/shm/kv\nsecrets:\n  - select: {{prefix: a-}}\n"
            f"    directory: a\n    vault: {VAULT}\n")
    manifest = parse_manifest(text, "m.yaml", accounts=ACCOUNTS, check_filesystem=False)
    assert manifest.selections[0].vault == VAULT


# ---------------------------------------------------------------------------
# Expansion


def item(name: str, *, enabled: bool = True, tags: Dict[str, str] | None = None,
         managed: bool | None = None) -> SecretItem:
    return SecretItem(name, f"{VAULT}/secrets/{name}", None, None, SecretAttributes(
        enabled=enabled, tags=tuple((tags or {}).items()), managed=managed))


def selection(**changes: Any) -> Selection:
    base = Selection("app1-", (("env", "prod"),), VAULT, "/dev/shm/kv/app1",
                     Output("", 0, 0, 0o400), line=3)
    return dataclasses.replace(base, **changes)


LISTING = (
    item("app1-db", tags={"env": "prod", "team": "x"}),
    item("APP1-Api", tags={"env": "prod"}),                    # any case
    item("app1-old", enabled=False, tags={"env": "prod"}),     # disabled
    item("app1-dev", tags={"env": "dev"}),                     # other tag value
    item("app1-untagged"),                                     # no tags
    item("app2-db", tags={"env": "prod"}),                     # other prefix
    item("app1-tls", tags={"env": "prod"}, managed=True),      # a certificate
)


def test_expansion_keeps_enabled_secrets_matching_prefix_and_every_tag() -> None:
    """Prefix (any case) and every tag must match; disabled and certificates' secrets are left out."""
    expansion = expand(selection(), LISTING, frozenset())
    assert [(e.name, e.paths) for e in expansion.entries] == [
        ("app1-db", ("/dev/shm/kv/app1/app1-db",)), ("APP1-Api", ("/dev/shm/kv/app1/APP1-Api",))]
    assert [line for line in expansion.skipped if "app1-tls" in line and
            "include_certificates: true" in line]


def test_expansion_strips_the_prefix_and_includes_certificates_on_request() -> None:
    """strip_prefix names files without the prefix; include_certificates takes managed secrets."""
    expansion = expand(selection(strip_prefix=True, include_certificates=True, tags=()),
                       LISTING + (item("app1-"),), frozenset())
    assert [e.key.rsplit("/", 1)[1] for e in expansion.entries] == [
        "db", "Api", "dev", "untagged", "tls"]
    assert any("leaves no file name" in line for line in expansion.skipped)


def test_expansion_skips_secrets_an_explicit_entry_names_whatever_the_case() -> None:
    """A matching secret an explicit entry names (case-insensitively) is skipped with a reason."""
    manifest = parse("  - name: App1-DB\n    path: db\n")
    expansion = expand(selection(), LISTING, explicit_names(manifest.secrets))
    assert [e.name for e in expansion.entries] == ["APP1-Api"]
    assert any("'app1-db'" in line and "explicit entry" in line for line in expansion.skipped)


def test_expansion_takes_a_name_listed_twice_in_any_case_once_with_one_skip_line() -> None:
    """A name the listing repeats, in the same or another case, is one secret: one entry, one skip line."""
    listing = (item("app1-db", tags={"env": "prod"}), item("APP1-DB", tags={"env": "prod"}),
               item("app1-db", tags={"env": "prod"}))
    expansion = expand(selection(strip_prefix=True), listing, frozenset())
    assert [(e.name, e.paths) for e in expansion.entries] == [
        ("app1-db", ("/dev/shm/kv/app1/db",))]
    [line] = expansion.skipped
    assert "'APP1-DB'" in line and "'app1-db'" in line and "case-insensitive" in line


def test_expanded_entries_carry_the_selections_owner_mode_hook_and_optional() -> None:
    """Each selected file takes the select entry's owner, mode, on_change and optional."""
    chosen = selection(defaults=Output("", 1001, 0, 0o440, "app1"), is_optional=True,
                       on_change=("true",))
    [first, _] = expand(chosen, LISTING, frozenset()).entries
    assert (first.primary.uid, first.primary.mode, first.is_optional, first.on_change) == (
        1001, 0o440, True, ("true",))


# ---------------------------------------------------------------------------
# Through Sync.sync and kv-agent once


def agent_environ(emulator: Emulator) -> Dict[str, str]:
    return {"KV_AGENT_IMDS_ENDPOINT": emulator.imds_endpoint,
            "REQUESTS_CA_BUNDLE": emulator.ca_path, "NO_PROXY": "127.0.0.1"}


def test_sync_writes_every_matching_secret_and_reports_the_listing(
        fresh_emulator: Emulator, shm_dir: Path) -> None:
    """One sync lists the vault, writes each match under the directory and reports the listing."""
    fresh_emulator.set_secret("app1-db", "db value", tags={"env": "prod"})
    fresh_emulator.set_secret("app1-api", "api value", tags={"env": "prod"})
    fresh_emulator.set_secret("app1-off", "off value", tags={"env": "prod"}, enabled=False)
    fresh_emulator.set_secret("other", "other value", tags={"env": "prod"})
    text = (f"vault: {fresh_emulator.vault_url}\ndirectory: {shm_dir}\nsecrets:\n"
            "  - select: {prefix: app1-, tags: {env: prod}}\n    directory: app1\n"
            "    strip_prefix: true\n")
    manifest = parse_manifest(text, "m.yaml", accounts=ACCOUNTS, check_filesystem=False)
    agent = Sync(manifest, environ=agent_environ(fresh_emulator))
    try:
        agent.prepare()
        report = agent.sync()
    finally:
        agent.close()
    assert sorted(os.listdir(shm_dir / "app1")) == ["api", "db"]
    assert (shm_dir / "app1" / "db").read_text() == "db value"
    assert not report.failures
    listing = [o for o in report.outcomes if o.entry.transform == "select"]
    assert [o.version for o in listing] == ["2 matched"]
    [(folder, paths)] = report.selected
    assert folder == str(shm_dir / "app1")
    assert sorted(paths) == [str(shm_dir / "app1" / "api"), str(shm_dir / "app1" / "db")]


def test_sync_writes_a_case_colliding_name_once_and_warns_once(
        fresh_emulator: Emulator, shm_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A listing naming one secret twice in different cases (strip_prefix: one file)
    fetches, writes and counts that file once, and warns once over two syncs."""
    fresh_emulator.set_secret("app1-db", "db value")
    text = (f"vault: {fresh_emulator.vault_url}\ndirectory: {shm_dir}\nsecrets:\n"
            "  - select: {prefix: app1-}\n    directory: app1\n    strip_prefix: true\n")
    manifest = parse_manifest(text, "m.yaml", accounts=ACCOUNTS, check_filesystem=False)
    agent = Sync(manifest, environ=agent_environ(fresh_emulator))
    listed = agent.vault.list_secrets

    def list_twice(url: str, *args: Any) -> Tuple[SecretItem, ...]:
        items = listed(url, *args)
        return items + tuple(one._replace(name="APP1-" + one.name[5:]) for one in items)

    agent.vault.list_secrets = list_twice  # type: ignore[method-assign,assignment]
    try:
        agent.prepare()
        with caplog.at_level(logging.WARNING):
            first = agent.sync()
            second = agent.sync()
    finally:
        agent.close()
    assert os.listdir(shm_dir / "app1") == ["db"]
    assert [o.version for o in first.outcomes if o.entry.transform == "select"] == ["1 matched"]
    assert (len(first.outcomes), first.changed, second.changed) == (2, 1, 0)
    assert not [fetched for fetched in fresh_emulator.vault_log if "APP1-db" in fetched.path]
    warnings = [r.getMessage() for r in caplog.records if "APP1-db" in r.getMessage()]
    assert len(warnings) == 1 and "case-insensitive" in warnings[0]


def test_sync_reports_a_listing_failure_and_writes_nothing_of_the_selection(
        fresh_emulator: Emulator, shm_dir: Path) -> None:
    """A listing refused (403) fails the select entry, leaves no selected report and keeps explicit entries."""
    fresh_emulator.set_secret("app1-db", "db value")
    fresh_emulator.set_secret("plain", "plain value")
    # The listing is the sync's first request (the emulator's fault paths carry no query).
    fresh_emulator.inject_fault("vault", 403, count=1)
    text = (f"vault: {fresh_emulator.vault_url}\ndirectory: {shm_dir}\nsecrets:\n"
            "  - name: plain\n  - select: {prefix: app1-}\n    directory: app1\n")
    manifest = parse_manifest(text, "m.yaml", accounts=ACCOUNTS, check_filesystem=False)
    agent = Sync(manifest, environ=agent_environ(fresh_emulator))
    try:
        agent.prepare()
        report = agent.sync()
    finally:
        agent.close()
    [failure] = report.failures
    assert failure.entry.transform == "select" and "select prefix 'app1-'" in failure.describe()
    assert report.selected == ()
    assert (shm_dir / "plain").read_text() == "plain value"
    assert not (shm_dir / "app1").exists()


def run_cli(args: List[str], emulator: Emulator) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if "proxy" not in key.lower()}
    env.update(agent_environ(emulator))
    return subprocess.run([sys.executable, "-m", "agent", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=60, check=False)


def test_once_writes_the_selection_and_check_refuses_an_explicit_file_inside_it(
        fresh_emulator: Emulator, shm_dir: Path, tmp_path: Path) -> None:
    """kv-agent once writes every matching secret (a new one at the next run) and
    removes none that stops matching; check refuses a collision at load."""
    fresh_emulator.set_secret("app1-db", "db value", tags={"env": "prod"})
    manifest = tmp_path / "m.yaml"
    body = (f"vault: {fresh_emulator.vault_url}\ndirectory: {shm_dir}\nsecrets:\n"
            "  - select: {prefix: app1-, tags: {env: prod}}\n    directory: app1\n"
            "    mode: \"0440\"\n")
    write_file(manifest, body)
    checked = run_cli(["check", "--manifest", str(manifest)], fresh_emulator)
    assert checked.returncode == 0 and "0 secrets and 1 select entry into" in checked.stdout
    first = run_cli(["once", "--manifest", str(manifest)], fresh_emulator)
    assert first.returncode == 0, first.stderr
    assert os.listdir(shm_dir / "app1") == ["app1-db"]
    assert oct(os.stat(shm_dir / "app1" / "app1-db").st_mode & 0o777) == "0o440"
    fresh_emulator.set_secret("app1-new", "new value", tags={"env": "prod"})
    second = run_cli(["once", "--manifest", str(manifest)], fresh_emulator)
    assert second.returncode == 0, second.stderr
    assert sorted(os.listdir(shm_dir / "app1")) == ["app1-db", "app1-new"]
    assert "db value" not in first.stderr + second.stderr
    # once removes nothing (docs/how-to/bulk-selection.md: only the running agent has the record of
    # its files): a secret that stops matching keeps its file.
    fresh_emulator.set_secret("app1-new", "new value", tags={"env": "dev"})
    third = run_cli(["once", "--manifest", str(manifest)], fresh_emulator)
    assert third.returncode == 0, third.stderr
    assert sorted(os.listdir(shm_dir / "app1")) == ["app1-db", "app1-new"]
    write_file(manifest, body + "  - name: app1-db\n    path: app1/db\n")
    refused = run_cli(["check", "--manifest", str(manifest)], fresh_emulator)
    assert refused.returncode == 78
    assert "is inside" in refused.stderr and "give the selection a directory of its own" \
        in refused.stderr


def test_once_exits_1_naming_the_selection_when_the_listing_is_forbidden(
        fresh_emulator: Emulator, shm_dir: Path, tmp_path: Path) -> None:
    """A listing refused with 403 makes once exit 1 with one line naming the select entry."""
    fresh_emulator.set_secret("app1-db", "db value")
    fresh_emulator.inject_fault("vault", 403, count=20)
    manifest = tmp_path / "m.yaml"
    write_file(manifest, f"vault: {fresh_emulator.vault_url}\ndirectory: {shm_dir}\nsecrets:\n"
               "  - select: {prefix: app1-}\n    directory: app1\n")
    done = run_cli(["once", "--manifest", str(manifest)], fresh_emulator)
    assert done.returncode == 1, done.stderr
    assert "select prefix 'app1-'" in done.stderr and "Traceback" not in done.stderr


# ---------------------------------------------------------------------------
# Through kv-agent run


def select_entry(**keys: Any) -> Dict[str, Any]:
    return {"select": {"prefix": "app1-", "tags": {"env": "prod"}}, "directory": "app1",
            "mode": "0440", **keys}


def put(store: Vault, name: str, *, env: str = "prod") -> str:
    """A new version of ``name`` tagged env=``env``; its value (leak-checked)."""
    value = fresh_value(name)
    store.values.add(value)
    store.emulator.set_secret(name, value, tags={"env": env})
    return value


def files(run: Running) -> List[str]:
    folder = run.directory / "app1"
    return sorted(os.listdir(folder)) if folder.exists() else []


def test_run_follows_the_selection_new_disabled_deleted_retagged_and_foreign(
        start_agent: StartAgent, vault: Vault) -> None:  # noqa: F811
    """The running agent adds a new match at the next refresh, removes the file of a secret
    disabled, deleted or retagged, and leaves a file someone else replaced."""
    for name in ("app1-a", "app1-b", "app1-c", "app1-d", "app1-e"):
        put(vault, name)
    run = start_agent([select_entry()])
    run.wait_ready()
    assert files(run) == ["app1-a", "app1-b", "app1-c", "app1-d", "app1-e"]
    status = run.status_cli()
    assert status.returncode == 0, status.stdout + status.stderr
    assert "select prefix 'app1-' tags env=prod" in status.stdout
    put(vault, "app1-new")
    run.wait(lambda: "app1-new" in files(run), "the new matching secret's file")
    replace_file(run.directory / "app1" / "app1-e", "operator's own file")
    vault.emulator.disable_secret("app1-a")
    vault.emulator.delete_secret("app1-b")
    put(vault, "app1-c", env="dev")
    vault.emulator.disable_secret("app1-e")
    run.wait(lambda: files(run) == ["app1-d", "app1-e", "app1-new"],
             "the files of secrets that stopped matching to go")
    # The four changes may straddle a refresh: e's may be judged one refresh after the rest.
    run.wait(lambda: run.process.lines("not removing " + str(run.directory / "app1" / "app1-e")),
             "the replaced file to be named and left")
    assert files(run) == ["app1-d", "app1-e", "app1-new"]
    assert read(run.directory / "app1" / "app1-e") == "operator's own file"
    run.stop()


def test_run_keeps_every_selected_file_while_the_listing_fails_and_reports_it_once(
        start_agent: StartAgent, vault: Vault) -> None:  # noqa: F811
    """While listing fails (403), no selected file is removed and the error is logged once;
    a failing listing at start holds READY back."""
    put(vault, "app1-a")
    put(vault, "app1-b")
    run = start_agent([select_entry()])
    run.wait_ready()
    vault.emulator.inject_fault("vault", 403, count=1000)
    vault.emulator.disable_secret("app1-a")
    run.wait(lambda: len(run.process.lines("select prefix 'app1-'")) >= 1,
             "the listing error in the log")
    time.sleep(3)  # three more 1 s refreshes, all failing
    assert files(run) == ["app1-a", "app1-b"]
    assert len(run.process.lines("select prefix 'app1-'")) == 1
    run.stop()
    vault.emulator.clear_faults()


def test_run_is_not_ready_without_a_listing_and_skips_an_explicit_entrys_secret(
        start_agent: StartAgent, vault: Vault) -> None:  # noqa: F811
    """No READY=1 while a required select entry cannot list; a matching secret an explicit
    entry names is skipped with one warning, and the explicit file is its own."""
    put(vault, "app1-a")
    value = put(vault, "app1-db")
    # The first sync's first request is the listing (fault paths carry no query).
    vault.emulator.inject_fault("vault", 403, count=1)
    run = start_agent([{"name": "app1-db", "path": "db", "mode": "0440"}, select_entry()],
                      fast_retry=True)
    at_ready: List[List[str]] = []
    run.notes.on_datagram(lambda message: at_ready.append(files(run))
                          if message.has("READY", "1") and not at_ready else None)
    run.wait_ready()
    assert run.process.lines("select prefix 'app1-'")  # the first listing failed
    assert at_ready == [["app1-a"]] and files(run) == ["app1-a"]
    assert read(run.directory / "db") == value
    assert len(run.process.lines("skipped secret 'app1-db'")) == 1
    run.stop()


def test_a_required_select_on_a_list_that_never_ends_costs_few_list_requests(
        start_agent: StartAgent, vault: Vault) -> None:  # noqa: F811
    """A starting agent whose required select entry meets a list that never ends (empty
    pages, each with a new nextLink) stops each listing after a few pages, says why, and
    stays under 300 list requests a minute even retrying every second (issue 17 item 8:
    ~13,000)."""
    put(vault, "app1-a")
    vault.emulator.inject_fault("vault", endless_pages=True, count=1_000_000)
    started = time.monotonic()
    run = start_agent([select_entry()])
    run.wait(lambda: (run.state_dir / "status.json").exists() and
             "select prefix" in run.status_json()["status"], "the failing listing in STATUS")
    time.sleep(max(0.0, started + 8.0 - time.monotonic()))
    lists = sum(1 for record in vault.emulator.vault_log if record.path == "/secrets")
    elapsed = time.monotonic() - started
    assert lists <= 300 * elapsed / 60, f"{lists} list requests in {elapsed:.1f} s"
    assert not run.readies()
    assert "empty pages in a row" in json.dumps(run.status_json())
    assert len(run.process.lines("empty pages in a row")) == 1  # said once
    assert files(run) == []
    run.stop()


def test_a_select_entry_dropped_by_a_reload_loses_its_files(
        start_agent: StartAgent, vault: Vault) -> None:  # noqa: F811
    """Removing the select entry from the manifest removes the files it wrote."""
    put(vault, "app1-a")
    vault.put("plain")
    run = start_agent([select_entry(), {"name": "plain", "path": "plain"}])
    run.wait_ready()
    assert files(run) == ["app1-a"]
    write_file(run.manifest, manifest_text(vault.url, run.directory,
                                           [{"name": "plain", "path": "plain"}]))
    run.process.send_signal(signal.SIGHUP)
    run.wait(lambda: not (run.directory / "app1").exists(), "the selection's files to go")
    run.stop()


def test_a_restart_keeps_selected_files_until_a_listing_and_then_drops_the_stale_one(
        start_agent: StartAgent, vault: Vault, shm_dir: Path) -> None:  # noqa: F811
    """After a restart the selection's files stay while listing fails (no READY); the first
    successful listing removes the file of a secret disabled while the agent was down."""
    put(vault, "app1-a")
    put(vault, "app1-b")
    state = shm_dir / "state"
    first = start_agent([select_entry()], state_dir=state)
    first.wait_ready()
    first.stop()
    vault.emulator.disable_secret("app1-b")
    vault.emulator.inject_fault("vault", 403, count=1000)
    second = start_agent(state_dir=state)
    second.wait(lambda: second.process.lines("select prefix 'app1-'"), "the listing error")
    time.sleep(1.5)
    assert files(second) == ["app1-a", "app1-b"] and not second.readies()
    vault.emulator.clear_faults()
    second.wait_ready()
    second.wait(lambda: files(second) == ["app1-a"], "the disabled secret's file to go")
    second.stop()
