"""Manifest loading and validation: every rule, each with its message."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Optional

import pytest

from agent.errors import EXIT_CONFIG, ManifestError
from agent.manifest import (
    Accounts,
    load_manifest,
    parse_duration,
    parse_manifest,
    parse_mode,
    parse_vault_url,
    resolve_path,
)

USERS: Dict[str, int] = {"root": 0, "postgres": 110, "nginx": 111}
GROUPS: Dict[str, int] = {"root": 0, "postgres": 120, "ssl-cert": 121}
ACCOUNTS = Accounts(user=USERS.get, group=GROUPS.get)

GOOD = """\
vault: https://contoso-kv.vault.azure.net
directory: /run/secrets
refresh: 15m
identity:
  client_id: 11111111-2222-3333-4444-555555555555
secrets:
  - name: db-password
    path: db-password
    owner: postgres
    group: postgres
    mode: "0440"
  - name: tls-key
    path: /run/secrets/nginx/tls.key
    owner: "111"
    group: ssl-cert
    mode: "0400"
    version: 0123456789abcdef0123456789ABCDEF
    optional: true
"""


def parse(text: str) -> List[str]:
    """The problem lines for ``text`` (empty when valid)."""
    try:
        parse_manifest(text, "m.yaml", accounts=ACCOUNTS, check_filesystem=False)
    except ManifestError as exc:
        assert exc.exit_code == EXIT_CONFIG
        return list(exc.problems)
    return []


def one_problem(text: str) -> str:
    problems = parse(text)
    assert len(problems) == 1, problems
    return problems[0]


def entry(**fields: str) -> str:
    """A manifest with one secret entry made of ``fields`` (YAML text values)."""
    lines = "\n".join(f"    {key}: {value}" for key, value in fields.items())
    return f"vault: https://kv.vault.azure.net\nsecrets:\n  - name: s\n{lines}\n"


def test_good_manifest_parses_to_frozen_values() -> None:
    """A valid manifest yields absolute paths, resolved ids and parsed modes."""
    manifest = parse_manifest(GOOD, "m.yaml", accounts=ACCOUNTS, check_filesystem=False)
    assert manifest.vault == "https://contoso-kv.vault.azure.net"
    assert manifest.refresh_interval_s == 900
    assert manifest.identity.selector == "client_id"
    db, tls = manifest.secrets
    assert (db.path, db.uid, db.gid, db.mode, db.is_optional) == (
        "/run/secrets/db-password", 110, 120, 0o440, False)
    assert (tls.path, tls.uid, tls.gid, tls.mode, tls.is_optional) == (
        "/run/secrets/nginx/tls.key", 111, 121, 0o400, True)
    assert tls.version == "0123456789abcdef0123456789abcdef"
    assert db.vault == manifest.vault
    with pytest.raises(AttributeError):
        db.mode = 0o777  # type: ignore[misc]


def test_defaults_are_safe() -> None:
    """Omitted owner, group, mode and path default to root, root, 0400 and the name."""
    manifest = parse_manifest("vault: https://kv.vault.azure.net\nsecrets:\n  - name: api\n",
                              "m.yaml", accounts=ACCOUNTS, check_filesystem=False)
    (secret,) = manifest.secrets
    assert (secret.path, secret.uid, secret.gid, secret.mode) == ("/run/secrets/api", 0, 0, 0o400)
    assert manifest.identity.selector is None
    assert manifest.directory == "/run/secrets"


@pytest.mark.parametrize("text, line, fragments", [
    pytest.param("vault: https://kv.vault.azure.net\nsecrets:\n  - name: a\n   path: b: c\n",
                 4, ["not valid YAML", "fix the syntax"], id="not-yaml"),
    pytest.param("- a\n- b\n", None, ["top level must be a mapping"], id="top-level-list"),
    pytest.param("vault: https://kv.vault.azure.net\nsecrest: []\nsecrets: []\n", 2,
                 ["secrest", "unknown key", "did you mean 'secrets'"], id="unknown-top-key"),
    pytest.param("directory: /run/secrets\nsecrets: []\n", 1, ["vault: missing", "https://"],
                 id="missing-vault"),
    pytest.param("vault: http://kv.vault.azure.net\nsecrets: []\n", 1, ["not https", "TLS"],
                 id="http-vault"),
    pytest.param("vault: https://kv.vault.azure.net/secrets\nsecrets: []\n", 1, ["no path"],
                 id="vault-with-path"),
    pytest.param("vault: https://kv.vault.azure.net\nrefresh: 0\nsecrets: []\n", 2,
                 ["refresh", "at least 1 second", "15m"], id="zero-refresh"),
    pytest.param("vault: https://kv.vault.azure.net\nrefresh: -5m\nsecrets: []\n", 2,
                 ["refresh", "positive duration"], id="negative-refresh"),
    pytest.param("vault: https://kv.vault.azure.net\nrefresh: soon\nsecrets: []\n", 2,
                 ["refresh", "positive duration"], id="word-refresh"),
    pytest.param("vault: https://kv.vault.azure.net\ndirectory: run/secrets\nsecrets: []\n",
                 2, ["directory", "absolute"], id="relative-directory"),
    pytest.param("vault: https://kv.vault.azure.net\n", 1, ["secrets: missing"],
                 id="missing-secrets"),
    pytest.param("vault: https://kv.vault.azure.net\nsecrets: {a: 1}\n", 2,
                 ["secrets", "must be a list"], id="secrets-not-list"),
    pytest.param("vault: https://kv.vault.azure.net\nvault: https://b.vault.azure.net\n"
                 "secrets: []\n", 2, ["vault", "given twice"], id="duplicate-key"),
    pytest.param("vault: https://kv.vault.azure.net\nidentity:\n  client_id: nope\n"
                 "secrets: []\n", 3, ["identity.client_id", "GUID"], id="bad-client-id"),
    pytest.param("vault: https://kv.vault.azure.net\nidentity:\n"
                 "  client_id: 11111111-2222-3333-4444-555555555555\n"
                 "  object_id: 11111111-2222-3333-4444-555555555555\nsecrets: []\n", 3,
                 ["client_id and object_id", "one"], id="two-selectors"),
    pytest.param("vault: https://kv.vault.azure.net\nidentity:\n  resource_id: /x\n"
                 "secrets: []\n", 3, ["identity.resource_id", "userAssignedIdentities"],
                 id="bad-resource-id"),
    pytest.param("vault: https://kv.vault.azure.net\nidentity:\n  clientid: x\n"
                 "secrets: []\n", 3, ["identity.clientid", "did you mean 'client_id'"],
                 id="identity-typo"),
])
def test_top_level_rules(text: str, line: Optional[int], fragments: List[str]) -> None:
    """Each top-level mistake is one line naming the file, line, key and fix."""
    problem = one_problem(text)
    assert problem.startswith(f"m.yaml:{line}:" if line else "m.yaml:"), problem
    for fragment in fragments:
        assert fragment in problem, (fragment, problem)


@pytest.mark.parametrize("fields, fragments", [
    pytest.param({"nmae": "x"}, ["secrets[0].nmae", "did you mean 'name'"], id="unknown-key"),
    pytest.param({"mode": "0440"}, ['secrets[0].mode', '0440', 'mode: "0440"', "quoted"],
                 id="unquoted-octal-mode"),
    pytest.param({"mode": "440"}, ['440', 'mode: "0440"', "quoted"], id="unquoted-decimal-mode"),
    pytest.param({"mode": '"4755"'}, ["setuid", '"0755"'], id="setuid"),
    pytest.param({"mode": '"1777"'}, ["sticky"], id="sticky"),
    pytest.param({"mode": '"0999"'}, ["not an octal mode"], id="not-octal"),
    pytest.param({"mode": '"rw-r-----"'}, ["not an octal mode"], id="symbolic-mode"),
    pytest.param({"path": "../etc/shadow"}, ["secrets[0].path", "'..'"], id="dotdot"),
    pytest.param({"path": "a/../../x"}, ["'..'"], id="nested-dotdot"),
    pytest.param({"path": "/etc/shadow"}, ["outside /run/secrets"], id="absolute-elsewhere"),
    pytest.param({"path": "/run/secretsX/a"}, ["outside /run/secrets"], id="prefix-trick"),
    pytest.param({"path": "/run/secrets"}, ["outside /run/secrets"], id="the-directory"),
    pytest.param({"path": "sub/"}, ["ends with '/'"], id="trailing-slash"),
    pytest.param({"path": ".kv-agent-x"}, ["reserved"], id="reserved-name"),
    pytest.param({"owner": "nosuchuser"}, ["secrets[0].owner", "unknown user", "useradd"],
                 id="unknown-user"),
    pytest.param({"group": "nosuchgroup"}, ["secrets[0].group", "unknown group"],
                 id="unknown-group"),
    pytest.param({"owner": "4294967295"}, ["out of range"], id="uid-minus-one"),
    pytest.param({"version": "latest"}, ["secrets[0].version", "32-character"],
                 id="bad-version"),
    pytest.param({"optional": "maybe"}, ["secrets[0].optional", "true or false"],
                 id="bad-optional"),
    pytest.param({"vault": "http://other.vault.azure.net"}, ["secrets[0].vault", "https"],
                 id="entry-http-vault"),
])
def test_entry_rules(fields: Dict[str, str], fragments: List[str]) -> None:
    """Each mistake in an entry is one line with its key path and the fix."""
    problem = one_problem(entry(**fields))
    assert problem.startswith("m.yaml:"), problem
    for fragment in fragments:
        assert fragment in problem, (fragment, problem)


@pytest.mark.parametrize("name", ["bad_name", "has space", "x" * 128, "", "ünï"])
def test_bad_secret_names(name: str) -> None:
    """Names outside 1-127 of [0-9a-zA-Z-] are refused with the rule."""
    text = f"vault: https://kv.vault.azure.net\nsecrets:\n  - name: '{name}'\n    path: p\n"
    assert "0-9, a-z, A-Z and '-'" in one_problem(text)


def test_numeric_owner_need_not_exist() -> None:
    """A numeric uid/gid is taken as given (DynamicUser= services)."""
    manifest = parse_manifest(entry(owner="61234", group='"61235"'), "m.yaml",
                              accounts=ACCOUNTS, check_filesystem=False)
    assert (manifest.secrets[0].uid, manifest.secrets[0].gid) == (61234, 61235)


def test_two_entries_one_path() -> None:
    """Two entries writing one path are refused, naming both."""
    text = ("vault: https://kv.vault.azure.net\nsecrets:\n  - name: a\n    path: x\n"
            "  - name: b\n    path: /run/secrets/x\n")
    problem = one_problem(text)
    assert "written by both 'a'" in problem and "'b'" in problem


def test_nested_paths_conflict() -> None:
    """A file may not be another entry's parent directory."""
    text = ("vault: https://kv.vault.azure.net\nsecrets:\n  - name: a\n    path: x\n"
            "  - name: b\n    path: x/y\n")
    assert "would be inside /run/secrets/x" in one_problem(text)


def test_all_problems_reported_at_once() -> None:
    """Several mistakes give several lines, in file order, in one error."""
    text = ("vault: https://kv.vault.azure.net\nsecrest: 1\nsecrets:\n"
            "  - name: a_b\n    mode: 0440\n")
    problems = parse(text)
    assert len(problems) == 3
    assert [p.split(":")[1] for p in problems] == ["2", "4", "5"]


def test_per_entry_vault_makes_top_vault_optional() -> None:
    """When every entry names its vault, the top-level vault may be omitted."""
    text = "secrets:\n  - name: a\n    vault: https://a.vault.azure.net/\n"
    manifest = parse_manifest(text, "m.yaml", accounts=ACCOUNTS, check_filesystem=False)
    assert manifest.secrets[0].vault == "https://a.vault.azure.net"


@pytest.mark.parametrize("value, seconds", [
    (90, 90), ("90", 90), ("90s", 90), ("15m", 900), ("1h", 3600), ("1h30m", 5400),
    ("2h0m5s", 7205),
])
def test_durations(value: object, seconds: float) -> None:
    """Durations accept plain seconds and h/m/s combinations."""
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", [0, "0s", "", "1d", "m", True, 1.5, "-1"])
def test_bad_durations(value: object) -> None:
    """Zero, negative, fractional and unknown units are refused."""
    with pytest.raises(ValueError):
        parse_duration(value)


@pytest.mark.parametrize("text, mode", [("0440", 0o440), ("440", 0o440), ("0777", 0o777),
                                        ("000", 0)])
def test_modes(text: str, mode: int) -> None:
    """Quoted octal strings up to 0777 parse."""
    assert parse_mode(text, None) == mode


@pytest.mark.parametrize("url, normal", [
    ("https://KV.vault.azure.net/", "https://kv.vault.azure.net"),
    ("https://kv.vault.azure.net:443", "https://kv.vault.azure.net"),
    ("https://127.0.0.1:8443", "https://127.0.0.1:8443"),
])
def test_vault_urls_are_normalised(url: str, normal: str) -> None:
    """Vault URLs normalise to scheme, lower-case host and non-default port."""
    assert parse_vault_url(url) == normal


@pytest.mark.parametrize("url", ["https://user:pw@kv.vault.azure.net", "https://kv?x=1",
                                 "ftp://kv", "https://", "https://kv:99999"])
def test_bad_vault_urls(url: str) -> None:
    """Credentials, queries, other schemes, no host and bad ports are refused."""
    with pytest.raises(ValueError):
        parse_vault_url(url)


def test_resolve_path_keeps_inside() -> None:
    """Relative and absolute-inside paths resolve; escapes do not."""
    assert resolve_path("/run/secrets", "a/./b") == "/run/secrets/a/b"
    assert resolve_path("/run/secrets", "/run/secrets/a") == "/run/secrets/a"
    with pytest.raises(ValueError):
        resolve_path("/run/secrets", "a/../../b")


# -- on-disk checks ---------------------------------------------------------


def write_manifest(path: Path, text: str, mode: int = 0o600) -> str:
    path.write_text(text)
    os.chmod(path, mode)
    return str(path)


def test_symlinked_parent_is_refused(tmp_path: Path) -> None:
    """A symlink among the existing parents inside directory is refused."""
    root = tmp_path / "secrets"
    root.mkdir()
    (root / "sub").symlink_to(tmp_path)
    text = (f"vault: https://kv.vault.azure.net\ndirectory: {root}\nsecrets:\n"
            "  - name: a\n    path: sub/a\n")
    with pytest.raises(ManifestError) as caught:
        load_manifest(write_manifest(tmp_path / "m.yaml", text), accounts=ACCOUNTS)
    assert "is a symlink" in caught.value.problems[0]


@pytest.mark.parametrize("mode", [0o620, 0o602, 0o666])
def test_writable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    """A manifest writable by group or others is refused, with the chmod fix."""
    path = write_manifest(tmp_path / "m.yaml", GOOD, mode)
    with pytest.raises(ManifestError, match="chmod go-w"):
        load_manifest(path, accounts=ACCOUNTS)


def test_foreign_owner_is_refused(tmp_path: Path) -> None:
    """A manifest owned by another user than root or the agent's is refused."""
    path = write_manifest(tmp_path / "m.yaml", GOOD)
    if os.geteuid() == 0:
        os.chown(path, 4321, -1)
        with pytest.raises(ManifestError, match="owned by uid 4321"):
            load_manifest(path, accounts=ACCOUNTS)
    else:  # a file we own is fine for our own agent, but not for another user's
        with pytest.raises(ManifestError, match="owned by uid"):
            load_manifest(path, accounts=ACCOUNTS, euid=os.geteuid() + 1)


def test_readable_manifest_loads(tmp_path: Path) -> None:
    """A 0644 root-or-own manifest is fine (readability is not a risk)."""
    path = write_manifest(tmp_path / "m.yaml", GOOD, 0o644)
    assert len(load_manifest(path, accounts=ACCOUNTS, check_filesystem=False).secrets) == 2


@pytest.mark.parametrize("setup, fragment", [
    ("missing", "no such file"), ("directory", "is a directory"), ("binary", "not UTF-8"),
])
def test_unreadable_manifest(tmp_path: Path, setup: str, fragment: str) -> None:
    """Missing, directory and non-text manifests give one clear line."""
    path = tmp_path / "m.yaml"
    if setup == "directory":
        path.mkdir()
    elif setup == "binary":
        path.write_bytes(b"\xff\xfe\x00")
        os.chmod(path, 0o600)
    with pytest.raises(ManifestError, match=fragment):
        load_manifest(str(path), accounts=ACCOUNTS)


def test_symlink_to_manifest_is_followed(tmp_path: Path) -> None:
    """A symlinked manifest (symlink-swap publishing) is read through the link."""
    real = write_manifest(tmp_path / "real.yaml", GOOD)
    link = tmp_path / "manifest.yaml"
    link.symlink_to(real)
    assert load_manifest(str(link), accounts=ACCOUNTS, check_filesystem=False).secrets


# --- daemon keys: on_change and refresh_jitter


def test_on_change_is_an_argv_list() -> None:
    """on_change parses to an argv tuple, run later without a shell."""
    manifest = parse_manifest(GOOD.replace('    mode: "0440"\n',
                                           '    mode: "0440"\n'
                                           '    on_change: ["systemctl", "reload", "pg.service"]\n',
                                           1),
                              "m.yaml", accounts=ACCOUNTS, check_filesystem=False)
    assert manifest.secrets[0].on_change == ("systemctl", "reload", "pg.service")
    assert manifest.secrets[1].on_change == ()


def test_on_change_string_is_refused_with_list_form() -> None:
    """A shell-style string is refused, and the message shows the list form."""
    problem = one_problem(entry(on_change="systemctl reload pg"))
    assert "secrets[0].on_change" in problem
    assert "['systemctl', 'reload', 'pg']" in problem


def test_on_change_empty_list_is_refused() -> None:
    """An empty or non-string argv is refused."""
    assert "non-empty list" in one_problem(entry(on_change="[]"))
    assert "non-empty list" in one_problem(entry(on_change="[1, 2]"))


def test_refresh_jitter() -> None:
    """refresh_jitter takes a percentage or fraction up to 50%, default 10%."""
    base = "vault: https://a.vault.azure.net\nsecrets:\n  - name: x\n"
    assert parse_manifest(base, accounts=ACCOUNTS, check_filesystem=False).refresh_jitter == 0.1
    for text, value in (("0%", 0.0), ("25%", 0.25), ("0.2", 0.2)):
        manifest = parse_manifest(f"refresh_jitter: {text}\n" + base, accounts=ACCOUNTS,
                                  check_filesystem=False)
        assert manifest.refresh_jitter == value
    for bad in ("80%", "-1%", "lots", "true"):
        problems = parse(f"refresh_jitter: {bad}\n" + base)
        assert len(problems) == 1 and "refresh_jitter" in problems[0], problems
