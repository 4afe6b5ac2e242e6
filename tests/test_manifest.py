"""Manifest loading and validation: every rule, each with its message."""

from __future__ import annotations

import json
import os
import resource
import select
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Dict, List, Optional

import pytest

from agent.base.errors import EXIT_CONFIG, ManifestError
from agent.manifest import (
    Accounts,
    load_manifest,
    parse_duration,
    parse_expiry_window,
    parse_manifest,
    parse_mode,
    parse_vault_url,
    resolve_path,
)
from agent.pipeline.outputs import EntrySet
from agent.pipeline.sources import Source
from agent.pipeline.transforms import TransformParams

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
    assert (db.primary.path, db.primary.uid, db.primary.gid, db.primary.mode,
            db.is_optional) == ("/run/secrets/db-password", 110, 120, 0o440, False)
    assert (tls.primary.path, tls.primary.uid, tls.primary.gid, tls.primary.mode,
            tls.is_optional) == ("/run/secrets/nginx/tls.key", 111, 121, 0o400, True)
    assert tls.source.version == "0123456789abcdef0123456789abcdef"
    assert db.source.vault == manifest.vault
    with pytest.raises(AttributeError):
        db.primary.mode = 0o777  # type: ignore[misc]


@pytest.mark.parametrize("text, source, selector", [
    ("", "auto", None),
    ("identity:\n  source: arc\n", "arc", None),
    ("identity:\n  source: app-service\n  client_id: 11111111-2222-3333-4444-555555555555\n",
     "app-service", "client_id"),
    ("identity:\n  source: imds\n", "imds", None),
])
def test_identity_source(text: str, source: str, selector: Optional[str]) -> None:
    """identity.source names the endpoint (auto by default) beside an optional selector."""
    manifest = parse_manifest(f"vault: https://kv.vault.azure.net\n{text}secrets: []\n",
                              "m.yaml", accounts=ACCOUNTS, check_filesystem=False)
    assert (manifest.identity.source, manifest.identity.selector) == (source, selector)


def test_defaults_are_safe() -> None:
    """Omitted owner, group, mode and path default to root, root, 0400 and the name."""
    manifest = parse_manifest("vault: https://kv.vault.azure.net\nsecrets:\n  - name: api\n",
                              "m.yaml", accounts=ACCOUNTS, check_filesystem=False)
    (secret,) = manifest.secrets
    assert secret.primary[:4] == ("/run/secrets/api", 0, 0, 0o400)
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
    pytest.param("vault: https://kv.vault.azure.net\nidentity:\n  source: azure-arc\n"
                 "secrets: []\n", 3, ["identity.source", "auto, imds, arc, app-service"],
                 id="identity-source-unknown"),
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
    assert (manifest.secrets[0].primary.uid, manifest.secrets[0].primary.gid) == (61234, 61235)


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
    assert manifest.secrets[0].source.vault == "https://a.vault.azure.net"


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


# ---------------------------------------------------------------------------
# Hostile manifests (issue 9, items 6 and 11): every input yields a Manifest
# or a ManifestError of bounded one-line problems; never a hang, a crash or
# gigabytes of memory. Each case runs in a forked child with a time and
# memory bound, so a regression fails the test instead of hanging the suite.

ISOLATED_TIMEOUT_S = 10.0  # generous: a loaded 2-core machine; a sane parse takes ms
ISOLATED_EXTRA_MEMORY = 512 << 20  # bytes of address space the parse may add
MAX_PROBLEM_CHARS = 400  # a problem line: file, line, key, a short echo, the fix


def _address_space() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def parse_isolated(text: str, *, timeout_s: float = ISOLATED_TIMEOUT_S,
                   accounts: Optional[Accounts] = None,
                   check_filesystem: bool = False) -> Dict[str, object]:
    """Run parse_manifest(text) in a forked child bounded in time and memory.

    Returns {"ok": directory} for a Manifest, {"problems": [...], "code": n}
    for a ManifestError, or {"crash": description} for anything else,
    including a timeout (the child is killed) or a killing signal.
    """

    read_fd, write_fd = os.pipe()
    limit = _address_space() + ISOLATED_EXTRA_MEMORY
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        os.close(read_fd)
        result: Dict[str, object]
        try:
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
            manifest = parse_manifest(text, "m.yaml", accounts=accounts or ACCOUNTS,
                                      check_filesystem=check_filesystem)
            result = {"ok": manifest.directory}
        except ManifestError as exc:
            result = {"problems": list(exc.problems), "code": exc.exit_code}
        except BaseException as exc:  # noqa: B036 - report whatever escaped
            result = {"crash": "".join(traceback.format_exception_only(type(exc), exc))[-2000:]}
        try:
            data = json.dumps(result).encode()
        except BaseException:  # noqa: B036
            data = json.dumps({"crash": "unserialisable result"}).encode()
        with os.fdopen(write_fd, "wb") as pipe:
            pipe.write(data)
        os._exit(0)
    os.close(write_fd)
    chunks: List[bytes] = []
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return {"crash": f"no result within {timeout_s:g} s (hang)"}
            ready, _, _ = select.select([read_fd], [], [], remaining)
            if ready:
                chunk = os.read(read_fd, 1 << 16)
                if not chunk:
                    break
                chunks.append(chunk)
    finally:
        os.close(read_fd)
    _, status = os.waitpid(pid, 0)
    if not chunks:
        return {"crash": f"child died (wait status {status})"}
    return dict(json.loads(b"".join(chunks)))


def assert_bounded_problems(outcome: Dict[str, object]) -> List[str]:
    """The outcome is a valid Manifest or single-line, bounded problems (exit 78)."""
    assert "crash" not in outcome, outcome["crash"]
    if "ok" in outcome:
        return []
    assert outcome["code"] == EXIT_CONFIG
    problems = outcome["problems"]
    assert isinstance(problems, list) and problems
    for problem in problems:
        assert isinstance(problem, str)
        assert len(problem) <= MAX_PROBLEM_CHARS, problem[:1000]
        assert problem.isprintable(), repr(problem[:1000])  # no newline, no escape sequence
    return problems


BASE = "vault: https://kv.vault.azure.net\ndirectory: /dev/shm/kv-agent-hostile\n"
ENTRY = BASE + "secrets:\n  - name: s\n"


def laughs(levels: int = 10, width: int = 9) -> str:
    """A "billion laughs" sequence: ``width ** levels`` leaves from a few lines."""
    lines = ["  - &l0 [" + ", ".join(["lol"] * width) + "]"]
    for level in range(1, levels):
        lines.append(f"  - &l{level} [" + ", ".join([f"*l{level - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


HOSTILE = {
    "refresh-overflows-float": BASE + "refresh: " + "9" * 400 + "\nsecrets: []\n",
    "refresh-over-4300-digits": BASE + "refresh: " + "9" * 5000 + "\nsecrets: []\n",
    "refresh-huge-hex": BASE + "refresh: 0x" + "f" * 20000 + "\nsecrets: []\n",
    "refresh-huge-string": BASE + "refresh: '" + "9" * 5000 + "h'\nsecrets: []\n",
    "refresh-a-year": BASE + "refresh: 8760h\nsecrets: []\n",
    "refresh-invalid-date": BASE + "refresh: 2001-02-30\nsecrets: []\n",
    "billion-laughs-as-refresh": BASE + "refresh:\n" + laughs() + "secrets: []\n",
    "billion-laughs-as-owner": ENTRY + "    owner:\n" + laughs().replace("  - ", "      - "),
    "billion-laughs-as-key": BASE + "secrets: []\n? [" + laughs(6, 6).replace("\n", " ") + "]\n: 1\n",
    "merge-key-bomb": BASE + "secrets: []\n" + "".join(
        f"k{i}: &m{i} {{" + ", ".join(f"<<: *m{i - 1}" if j == 0 and i else f"a{j}: {j}"
                                      for j in range(9)) + "}\n" for i in range(12)),
    "deep-nesting": BASE + "refresh: " + "[" * 900 + "]" * 900 + "\nsecrets: []\n",
    "deep-block-nesting": BASE + "secrets: []\nrefresh:\n" + "".join(
        " " * i + "- \n" for i in range(1, 400)),
    "newline-in-echo": ENTRY + "    on_change: \"a\\nkv-agent: error: forged\"\n",
    "escape-in-echo": ENTRY + "    name: \"\\e[31mred\\e[0m\"\n",
    "nul-in-refresh": BASE + "refresh: \"1\\0\"\nsecrets: []\n",
    "nul-in-owner": ENTRY + "    owner: \"root\\0x\"\n",
    "long-unknown-key": BASE + "secrets: []\n" + "k" * 4000 + ": 1\n",
    "long-name": ENTRY.replace("name: s", "name: " + "s" * 100000),
    "long-path-component": ENTRY + "    path: " + "p" * 256 + "\n",
    "long-path": ENTRY + "    path: " + "/".join(["p" * 200] * 30) + "\n",
    "long-directory-component": BASE.replace("kv-agent-hostile", "d" * 300) + "secrets: []\n",
    "long-owner": ENTRY + "    owner: " + "o" * 100000 + "\n",
    "long-group": ENTRY + "    group: " + "g" * 300 + "\n",
    "long-version": ENTRY + "    version: " + "a" * 100000 + "\n",
    "long-vault": BASE.replace("kv.vault", "k" * 100000 + ".vault") + "secrets: []\n",
    "long-on-change": ENTRY + "    on_change: [\"" + "x" * 100000 + "\"]\n",
    "numeric-version": ENTRY + "    version: " + "1" * 4000 + "\n",
    "float-owner": ENTRY + "    owner: 1e400\n",
    "list-as-directory": BASE.replace("directory: /dev/shm/kv-agent-hostile",
                                      "directory: [" + ", ".join(["x"] * 10000) + "]")
                         + "secrets: []\n",
    "mapping-as-mode": ENTRY + "    mode: {a: [1, 2, {b: c}]}\n",
    "tagged-values": ENTRY + "    optional: !!binary 'aGVsbG8='\n    mode: !!set {a}\n",
    "python-tag": ENTRY + "    owner: !!python/object/apply:os.system ['true']\n",
    "recursive-alias": BASE + "refresh: &r [*r]\nsecrets: []\n",
    "timestamp-directory": BASE.replace("/dev/shm/kv-agent-hostile", "2001-12-14") + "secrets: []\n",
    "non-string-keys": BASE + "secrets: []\n1: a\nnull: b\n[1, 2]: c\n",
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_manifest_is_refused_in_bounded_lines(name: str) -> None:
    """A hostile manifest yields exit-78 problems, each one bounded printable line, promptly."""
    problems = assert_bounded_problems(parse_isolated(HOSTILE[name]))
    assert problems, f"{name} was accepted"


def test_double_slash_directory_does_not_hang() -> None:
    """``directory: //dev/shm/x`` (its own dirname in POSIX) parses promptly to /dev/shm/x."""
    outcome = parse_isolated(BASE.replace("directory: /dev", "directory: //dev")
                             + "secrets:\n  - name: s\n    path: a/b/c\n")
    assert outcome == {"ok": "/dev/shm/kv-agent-hostile"}


def test_owner_and_group_are_bounded_before_any_lookup() -> None:
    """A long or malformed owner/group is refused without ever reaching the NSS lookup."""
    looked_up: List[str] = []

    def lookup(name: str) -> Optional[int]:
        looked_up.append(name)
        return None

    spy = Accounts(user=lookup, group=lookup)
    for value in ("u" * 257, "x" * 100000, "has space", "a:b", "a/b", "-rf", "\u00e9l\u00e8ve"):
        for key in ("owner", "group"):
            problems = assert_bounded_problems(parse_isolated(
                ENTRY + f"    {key}: \"{value}\"\n", accounts=spy))
            assert len(problems) == 1 and f"secrets[0].{key}" in problems[0], problems
    assert looked_up == []


@pytest.mark.parametrize("name", ["postgres", "www-data", "_apt", "svc.app", "MACHINE$",
                                  "user@contoso.com", "a" * 32])
def test_plausible_account_names_are_looked_up(name: str) -> None:
    """Names as useradd, systemd and directory services make them still reach the lookup."""
    seen: List[str] = []
    spy = Accounts(user=lambda n: seen.append(n) or 1000, group=lambda n: 1000)
    manifest = parse_manifest(ENTRY + f"    owner: '{name}'\n", "m.yaml", accounts=spy,
                              check_filesystem=False)
    assert manifest.secrets[0].primary.uid == 1000 and seen == [name]


def test_merge_keys_and_small_aliases_still_work() -> None:
    """Anchors, aliases and merge keys of a reasonable size keep working."""
    text = ("vault: https://kv.vault.azure.net\nsecrets:\n"
            "  - &base {name: a, owner: postgres, group: postgres, mode: \"0440\"}\n"
            "  - <<: *base\n    name: b\n")
    manifest = parse_manifest(text, "m.yaml", accounts=ACCOUNTS, check_filesystem=False)
    assert [(s.name, s.primary.uid, s.primary.mode) for s in manifest.secrets] == [("a", 110, 0o440),
                                                                    ("b", 110, 0o440)]


def test_refresh_has_an_upper_bound() -> None:
    """A refresh beyond 31 days is refused with the range, not overflowed later."""
    problem = one_problem(BASE + "refresh: 745h\nsecrets: []\n")
    assert "refresh" in problem and "31 days" in problem
    assert parse_duration("744h") == 744 * 3600


def test_path_component_over_255_bytes_is_refused_with_a_filesystem(shm_dir: Path) -> None:
    """A path component longer than NAME_MAX is a manifest problem, not ENAMETOOLONG (exit 70)."""
    text = (f"vault: https://kv.vault.azure.net\ndirectory: {shm_dir}\nsecrets:\n"
            f"  - name: s\n    path: {'p' * 300}/x\n")
    problems = assert_bounded_problems(parse_isolated(text, check_filesystem=True))
    assert len(problems) == 1 and "255 bytes" in problems[0], problems


def test_oversized_manifest_file_is_refused_before_parsing(tmp_path: Path) -> None:
    """A manifest file over 1 MiB is refused by size, with the limit in the message."""
    path = write_manifest(tmp_path / "m.yaml", ENTRY + "# " + "x" * (1 << 20) + "\n")
    with pytest.raises(ManifestError, match="1 MiB"):
        load_manifest(path, accounts=ACCOUNTS)


def test_manifest_that_is_not_a_regular_file_is_refused(tmp_path: Path) -> None:
    """A FIFO (or device) as the manifest is refused at once instead of blocking the read."""
    fifo = tmp_path / "m.yaml"
    os.mkfifo(fifo, 0o600)
    outcome: List[str] = []

    def load() -> None:
        try:
            load_manifest(str(fifo), accounts=ACCOUNTS)
        except ManifestError as exc:
            outcome.append(str(exc))

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    thread.join(ISOLATED_TIMEOUT_S)
    if thread.is_alive():  # unblock the stuck open() so the thread can end
        with open(fifo, "wb"):
            pass
        pytest.fail("load_manifest blocked on a FIFO")
    assert outcome and "not a regular file" in outcome[0], outcome


# -- the real command on the known killers


CLI_TIMEOUT_S = 20.0  # a few seconds of work at most; Python start-up under load


def run_check(manifest: Path, timeout_s: float = CLI_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    """``kv-agent check`` on ``manifest``, bounded to 1 GiB of address space."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))

    return subprocess.run(
        [sys.executable, "-m", "agent", "check", "--manifest", str(manifest)],
        capture_output=True, text=True, timeout=timeout_s, preexec_fn=limit,
        cwd=str(Path(__file__).resolve().parent.parent), check=False)


def cli_killers(shm_dir: Path) -> Dict[str, str]:
    base = f"vault: https://kv.vault.azure.net\ndirectory: {shm_dir}/out\n"
    entry = base + "secrets:\n  - name: s\n"
    return {
        "refresh-overflows-float": base + "refresh: " + "9" * 400 + "\nsecrets: []\n",
        "refresh-over-4300-digits": base + "refresh: " + "9" * 5000 + "\nsecrets: []\n",
        "refresh-invalid-date": base + "refresh: 2001-02-30\nsecrets: []\n",
        "billion-laughs": base + "refresh:\n" + laughs() + "secrets: []\n",
        "path-component-over-255-bytes": (
            f"vault: https://kv.vault.azure.net\ndirectory: {shm_dir}\nsecrets:\n"
            f"  - name: s\n    path: {'p' * 300}/x\n"),
        "owner-of-5-MB": entry + "    owner: " + "o" * (5 << 20) + "\n",
        "newline-in-echo": entry + "    on_change: \"a\\nkv-agent: error: forged\"\n",
    }


@pytest.mark.parametrize("killer", ["refresh-overflows-float", "refresh-over-4300-digits",
                                    "refresh-invalid-date", "billion-laughs",
                                    "path-component-over-255-bytes", "owner-of-5-MB",
                                    "newline-in-echo", "fifo"])
def test_check_refuses_known_killers_with_one_line(killer: str, shm_dir: Path,
                                                   tmp_path: Path) -> None:
    """``kv-agent check`` on each known killer exits 78 promptly with one line and no traceback."""

    path = tmp_path / "manifest.yaml"
    if killer == "fifo":
        os.mkfifo(path, 0o600)
    else:
        write_manifest(path, cli_killers(shm_dir)[killer])
    try:
        result = run_check(path)
    except subprocess.TimeoutExpired:
        pytest.fail(f"kv-agent check hung on {killer}")
    lines = result.stderr.splitlines()
    assert result.returncode == 78, (result.returncode, result.stderr[-3000:])
    assert len(lines) == 1 and lines[0].startswith("kv-agent: error: "), result.stderr[-3000:]
    assert len(lines[0]) <= MAX_PROBLEM_CHARS + 20 and "Traceback" not in result.stderr
    assert result.stdout == ""


def test_check_accepts_double_slash_directory_promptly(shm_dir: Path, tmp_path: Path) -> None:
    """``directory: //dev/shm/...`` no longer loops forever: check reads it as /dev/shm/..."""

    path = tmp_path / "manifest.yaml"
    write_manifest(path, f"vault: https://kv.vault.azure.net\ndirectory: /{shm_dir}/out\n"
                         "secrets:\n  - name: s\n    path: a/b\n")
    try:
        result = run_check(path)
    except subprocess.TimeoutExpired:
        pytest.fail("kv-agent check hung on directory: //dev/shm/...")
    assert result.returncode == 0, result.stderr
    assert f"into {shm_dir}/out" in result.stdout


@pytest.mark.parametrize("directory", ["/run", "/dev", "/dev/shm", "/proc/x", "/sys/fs/cgroup/x",
                                       "/dev/kv-agent-secrets", "/tmp", "//run"])
def test_system_directory_is_a_manifest_problem(directory: str) -> None:
    """directory: /run, /dev, /dev/shm itself and kernel trees are refused with exit 78 and the line."""
    problem = one_problem(f"vault: https://kv.vault.azure.net\ndirectory: {directory}\n"
                          "secrets: []\n")
    assert problem.startswith("m.yaml:2: directory: "), problem
    assert "system directory" in problem or "belongs to the kernel" in problem, problem


def test_all_digit_version_is_taken_as_written() -> None:
    """A version of 32 digits (a YAML number) is kept exactly as written, leading zeros too."""
    for digits in ("12345678901234567890123456789012", "01234567012345670123456701234567"):
        manifest = parse_manifest(ENTRY + f"    version: {digits}\n", "m.yaml",
                                  accounts=ACCOUNTS, check_filesystem=False)
        assert manifest.secrets[0].source.version == digits


def test_all_digit_secret_name_is_taken_as_written() -> None:
    """Key Vault allows all-digit names: ``name: 0755`` is the secret '0755', not 493."""
    manifest = parse_manifest("vault: https://kv.vault.azure.net\nsecrets:\n  - name: 0755\n",
                              "m.yaml", accounts=ACCOUNTS, check_filesystem=False)
    assert (manifest.secrets[0].name, manifest.secrets[0].key) == ("0755", "/run/secrets/0755")


def test_comments_do_not_change_the_manifest() -> None:
    """Entries compare without their line numbers: a comment-only edit is the same
    manifest (so a reload keeps sessions and token), a real edit is not."""
    text = "vault: https://kv.vault.azure.net\nsecrets:\n  - name: api\n  - name: db\n"
    before = parse_manifest(text, "m.yaml", accounts=ACCOUNTS, check_filesystem=False)
    after = parse_manifest("# owner: platform team\n\n" + text, "m.yaml", accounts=ACCOUNTS,
                           check_filesystem=False)
    assert after.secrets[0].line == before.secrets[0].line + 2
    assert after == before and not after != before
    assert hash(after.secrets) == hash(before.secrets)
    moved = parse_manifest(text.replace("name: db", "name: db\n    mode: '0440'"), "m.yaml",
                           accounts=ACCOUNTS, check_filesystem=False)
    assert moved != before


ISSUE_11 = """\
vault: https://contoso-kv.vault.azure.net
warn_before_expiry: 36h
secrets:
  - name: license-blob
    path: license.bin
    encoding: base64
  - name: web-tls
    certificate:
      key: web/tls.key
      cert: {path: web/tls.crt, mode: "0444"}
      chain: web/chain.pem
      fullchain: {path: web/fullchain.pem, owner: root, mode: "0444"}
      pfx: web/tls.pfx
    owner: nginx
    group: postgres
    mode: "0440"
  - name: app-env
    template:
      path: app.env
      format: env
      values:
        DB_PASSWORD: db-password
        API_KEY: {name: api-key, version: 0123456789ABCDEF0123456789abcdef, encoding: hex}
        OTHER: {name: x, vault: https://other-kv.vault.azure.net}
  - name: db-password
    path: db/password
    set: db
  - name: db-user
    path: db/user
    set: db
"""


def test_issue_11_manifest_parses_to_sources_params_outputs_and_sets() -> None:
    """Encodings, certificate outputs (with per-output owner and mode over the entry's), a template
    of three sources and a named set parse into the pipeline values the agent and writer use."""
    manifest = parse_manifest(ISSUE_11, "m.yaml", accounts=ACCOUNTS, check_filesystem=False)
    blob, tls, env, password, user = manifest.secrets
    assert manifest.warn_before_expiry_s == 36 * 3600
    assert (blob.transform, blob.params.encodings, blob.paths) == (
        "raw", ("base64",), ("/run/secrets/license.bin",))
    assert tls.transform == "certificate" and tls.params.kinds == (
        "key", "cert", "chain", "fullchain", "pfx")
    assert [(o.path.rsplit("/", 1)[1], o.uid, o.gid, o.mode) for o in tls.outputs.outputs] == [
        ("tls.key", 111, 120, 0o440), ("tls.crt", 111, 120, 0o444), ("chain.pem", 111, 120, 0o440),
        ("fullchain.pem", 0, 120, 0o444), ("tls.pfx", 111, 120, 0o440)]
    assert tls.sources == (Source("https://contoso-kv.vault.azure.net", "web-tls"),)
    assert env.transform == "template" and env.paths == ("/run/secrets/app.env",)
    assert env.params == TransformParams((None, "hex", None), format="env",
                                         keys=("DB_PASSWORD", "API_KEY", "OTHER"))
    assert env.sources == (
        Source("https://contoso-kv.vault.azure.net", "db-password"),
        Source("https://contoso-kv.vault.azure.net", "api-key", "0123456789abcdef" * 2),
        Source("https://other-kv.vault.azure.net", "x"))
    assert env.source == env.sources[0]
    assert (password.set_name, user.set_name) == ("db", "db")
    assert manifest.sets == (  # in the order of each set's first entry
        EntrySet("certificate:/run/secrets/web/tls.key", "/run/secrets/web",
                 ("/run/secrets/web/tls.key",)),
        EntrySet("db", "/run/secrets/db", ("/run/secrets/db/password", "/run/secrets/db/user")),
    )


def test_plain_manifest_has_no_sets_and_the_default_expiry_window() -> None:
    """Without set: or certificate:, nothing changes: no sets, warn 14 days ahead."""
    manifest = parse_manifest(GOOD, "m.yaml", accounts=ACCOUNTS, check_filesystem=False)
    assert manifest.sets == () and manifest.warn_before_expiry_s == 14 * 86400
    assert all(e.transform == "raw" and e.params == TransformParams((None,))
               for e in manifest.secrets)


V = "vault: https://kv.vault.azure.net\n"


@pytest.mark.parametrize("text, fragments", [
    pytest.param(V + "secrets:\n  - name: c\n    certificate: {key: c/k, chian: c/c}\n",
                 ["certificate.chian", "unknown output kind", "did you mean 'chain'"],
                 id="unknown-kind"),
    pytest.param(V + "secrets:\n  - name: c\n    certificate: {}\n",
                 ["certificate", "at least one of key, cert, chain, fullchain, pfx"],
                 id="no-output"),
    pytest.param(V + "secrets:\n  - name: c\n    certificate: {key: c/k, cert: c/k}\n",
                 ["/run/secrets/c/k is written by both 'c'"], id="two-outputs-one-path"),
    pytest.param(V + "secrets:\n  - name: c\n    certificate: {key: c/k, cert: {mode: '0444'}}\n",
                 ["certificate.cert.path", "missing"], id="output-without-path"),
    pytest.param(V + "secrets:\n  - name: c\n    certificate: {key: {path: c/k, mdoe: '0400'}}\n",
                 ["certificate.key.mdoe", "unknown key"], id="output-unknown-key"),
    pytest.param(V + "secrets:\n  - name: c\n    certificate: {key: c/k, cert: d/c}\n",
                 ["certificate of 'c' has files in 2 directories", "one directory"],
                 id="certificate-spans-directories"),
    pytest.param(V + "secrets:\n  - name: c\n    certificate: {key: k, cert: c}\n",
                 ["in the top directory /run/secrets", "a directory of their own"],
                 id="certificate-in-top-directory"),
    pytest.param(V + "secrets:\n  - name: c\n    certificate: {key: web/k}\n"
                 "  - name: other\n    path: web/other\n",
                 ["needs /run/secrets/web to itself", "'other'"], id="stranger-in-set-dir"),
    pytest.param(V + "secrets:\n  - name: c\n    certificate: {key: web/k}\n"
                 "  - name: other\n    path: web/deeper/other\n",
                 ["needs /run/secrets/web to itself"], id="stranger-below-set-dir"),
    pytest.param(V + "secrets:\n  - name: a\n    path: db/a\n    set: db\n"
                 "  - name: b\n    path: b\n    set: db\n",
                 ["set 'db' has files in 2 directories"], id="set-spans-directories"),
    pytest.param(V + "secrets:\n  - name: a\n    path: db/a\n    set: db\n"
                 "  - name: b\n    path: db/b\n",
                 ["set 'db' needs /run/secrets/db to itself", "'b'"], id="set-dir-shared"),
    pytest.param(V + "secrets:\n  - name: c\n    certificate: {key: web/k}\n"
                 "  - select: {prefix: a-}\n    directory: web/more\n",
                 [":5: directory: /run/secrets/web/more of the select prefix 'a-' is inside "
                  "/run/secrets/web, which the certificate of 'c' (line 3) needs to itself",
                  "give the selection a directory outside /run/secrets/web"],
                 id="select-inside-certificate-dir"),
    pytest.param(V + "secrets:\n  - name: a\n    path: db/a\n    set: db\n"
                 "  - select: {prefix: a-}\n    directory: db/x/y\n",
                 ["/run/secrets/db/x/y of the select prefix 'a-' is inside /run/secrets/db, "
                  "which the set 'db' (line 3) needs to itself"], id="select-below-set-dir"),
    pytest.param(V + "secrets:\n  - name: a\n    set: [x]\n", ["set", "is not a set name"],
                 id="bad-set-name"),
    pytest.param(V + "secrets:\n  - name: a\n    encoding: base32\n",
                 ["encoding", "'base32' is not an encoding", "utf-8, base64, hex"],
                 id="unknown-encoding"),
    pytest.param(V + "secrets:\n  - name: c\n    encoding: base64\n    certificate: {key: c/k}\n",
                 ["encoding", "decoded by its content type"], id="encoding-on-certificate"),
    pytest.param(V + "secrets:\n  - name: c\n    path: x\n    certificate: {key: c/k}\n",
                 ["one of path, certificate or template"], id="path-and-certificate"),
    pytest.param(V + "secrets:\n  - name: e\n    template: {path: e, values: {1BAD: a}}\n",
                 ["template.values.1BAD", "not a variable name"], id="env-key-digit"),
    pytest.param(V + "secrets:\n  - name: e\n    template: {path: e, values: {A-B: a}}\n",
                 ["template.values.A-B", "not a variable name"], id="env-key-dash"),
    pytest.param(V + "secrets:\n  - name: e\n    template: {path: e, format: yaml, values: {A: a}}\n",
                 ["template.format", "'yaml' is not a template format", "env, json, raw"],
                 id="unknown-format"),
    pytest.param(V + "secrets:\n  - name: e\n    template: {path: e, values: {A: bad_name}}\n",
                 ["template.values.A", "'bad_name' is not a Key Vault secret name"],
                 id="template-bad-secret"),
    pytest.param(V + "secrets:\n  - name: e\n    template: {path: e, values: {A: {name: a, encoding: rot13}}}\n",
                 ["template.values.A.encoding", "not an encoding"], id="template-bad-encoding"),
    pytest.param(V + "secrets:\n  - name: e\n    template: {path: e, values: {A: {nmae: a}}}\n",
                 ["template.values.A.nmae", "unknown key"], id="template-value-unknown-key"),
    pytest.param(V + "secrets:\n  - name: e\n    template: {path: e, values: {}}\n",
                 ["template.values", "at least one"], id="template-no-values"),
    pytest.param(V + "secrets:\n  - name: e\n    template: {values: {A: a}}\n",
                 ["template.path", "missing"], id="template-no-path"),
    pytest.param(V + "secrets:\n  - name: e\n    template: {path: e, valeus: {A: a}}\n",
                 ["template.valeus", "did you mean 'values'"], id="template-typo"),
    pytest.param(V + "secrets:\n  - name: e\n    version: " + "a" * 32 +
                 "\n    template: {path: e, values: {A: a}}\n",
                 ["version", "a template takes version per value"], id="template-version"),
    pytest.param(V + "warn_before_expiry: 2y\nsecrets: []\n",
                 ["warn_before_expiry", "not a duration", "14d"], id="bad-expiry-window"),
    pytest.param(V + "warn_before_expiry: 400d\nsecrets: []\n",
                 ["warn_before_expiry", "from 0 to 366d"], id="expiry-window-too-long"),
])
def test_issue_11_rules(text: str, fragments: List[str]) -> None:
    """check refuses each mistake in the new syntax with one line naming the key and the fix."""
    problems = parse(text)
    assert problems, text
    joined = "\n".join(problems)
    for fragment in fragments:
        assert fragment in joined, (fragment, problems)


@pytest.mark.parametrize("value, seconds", [("14d", 14 * 86400), ("36h", 36 * 3600),
                                            ("90m", 5400), ("1d12h", 36 * 3600), (0, 0),
                                            ("3600", 3600)])
def test_expiry_windows(value: object, seconds: float) -> None:
    """warn_before_expiry takes days, hours, minutes and seconds."""
    assert parse_expiry_window(value) == seconds


def test_json_and_raw_template_keys_need_not_be_variable_names() -> None:
    """Only env keys must be variable names; json and raw take any non-empty name."""
    for form in ("json", "raw"):
        manifest = parse_manifest(V + "secrets:\n  - name: e\n    template: {path: e, format: "
                                  f"{form}, values: {{a-b.c: a, 1x: b}}}}\n", "m.yaml",
                                  accounts=ACCOUNTS, check_filesystem=False)
        assert manifest.secrets[0].params.keys == ("a-b.c", "1x")


METRICS_BASE = "vault: https://kv.vault.azure.net\nsecrets: []\n"


@pytest.mark.parametrize("text, expected", [
    pytest.param("", None, id="absent"),
    pytest.param("metrics: false\n", None, id="false"),
    pytest.param("metrics: true\n", "/run/kv-agent/metrics/kv-agent.prom", id="true"),
    pytest.param("metrics: /var/lib/node_exporter//kv.prom\n", "/var/lib/node_exporter/kv.prom",
                 id="path"),
])
def test_metrics_key(text: str, expected: Optional[str]) -> None:
    """`metrics:` is off unless given: true is the default path, a path is normalised."""
    manifest = parse_manifest(METRICS_BASE + text, "m.yaml", accounts=ACCOUNTS,
                              check_filesystem=False)
    assert manifest.metrics_path == expected


@pytest.mark.parametrize("text, fragments", [
    pytest.param("metrics: kv.prom\n", ["absolute path", "metrics: true"], id="relative"),
    pytest.param("metrics: 1\n", ["neither true, false nor an absolute path"], id="number"),
    pytest.param("metrics: {path: /x.prom}\n", ["neither true"], id="mapping"),
    pytest.param("metrics: /run/m/kv.txt\n", ["must end in .prom", "textfile collector"],
                 id="not-prom"),
    pytest.param("metrics: /run/m/\n", ["without '..'"], id="directory"),
    pytest.param("metrics: /run/a/../kv.prom\n", ["without '..'"], id="dotdot"),
    pytest.param("metrics: /run/secrets/kv.prom\n", ["inside directory /run/secrets"],
                 id="in-secrets-directory"),
    pytest.param(f"metrics: /run/{'x' * 300}.prom\n", ["longer than 255 bytes"], id="too-long"),
    pytest.param("metric: true\n", ["metric: unknown key", "did you mean 'metrics'"], id="typo"),
])
def test_metrics_key_problems(text: str, fragments: List[str]) -> None:
    """Each wrong `metrics:` is one line with its line number and the fix."""
    problem = one_problem(METRICS_BASE + text)
    assert problem.startswith("m.yaml:3: "), problem
    for fragment in fragments:
        assert fragment in problem, (fragment, problem)
