"""``kv-agent doctor``: each link of the chain, healthy and broken.

Unit tests drive the pure parts of agent/doctor/ (token claims, what a
secret's answer means, the fix for each 403, validity, the unit and the
status document). Integration tests run the real ``kv-agent doctor`` command
against the emulator over real sockets, one injected failure each, and check
the failing line, its fix, the exit code, the time taken and that no secret
value or token was printed.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Iterator, List, Mapping, Optional, Set

import pytest
import secrecy
from secrecy import fresh_value

from agent.base.errors import VaultForbiddenError
from agent.doctor.identity_links import token_claims
from agent.doctor.machine import Host, agent_environment, check_agent
from agent.doctor.manifest_links import check_directory, check_sets
from agent.doctor.report import FAIL, OK, WARN, Check, Report, render
from agent.doctor.secret_links import check_validity, judge_answer, refusal_fix, vault_name
from agent.doctor.unit_env import UnitEnvironment
from agent.emulator import Emulator, IdentityConfig, generate_certificates
from agent.pipeline.expiry import Validity
from agent.pipeline.sources import SecretAttributes, Source
from agent.status.snapshot import READY, EntryStatus, StatusSnapshot
from agent.vault.client import Probed, Secret

REPO = Path(__file__).resolve().parent.parent
OBJECT_ID = "5a3c1f6e-0000-4000-8000-0000000000b1"  # the emulator's system-assigned identity
VAULT = "https://contoso-kv.vault.azure.net"
RBAC_ID = ("/subscriptions/00000000-0000-0000-0000-000000000000/resourcegroups/rg"
           "/providers/microsoft.keyvault/vaults/contoso-kv")
BLACK_HOLE_LIMIT_S = 10.0

SECRET_VALUES: Set[str] = set()
TOKENS: Set[str] = set()


# -- unit: the pure parts ---------------------------------------------------------------


def _jwt(claims: Mapping[str, object]) -> str:
    def part(value: Mapping[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()
    return f"{part({'alg': 'none'})}.{part(claims)}.c2lnbmF0dXJl"


def _error_body(code: str, message: str, inner: Optional[str] = None) -> bytes:
    error: Dict[str, object] = {"code": code, "message": message}
    if inner:
        error["innererror"] = {"code": inner}
    return json.dumps({"error": error}).encode()


def _refused(status: int, body: bytes) -> Probed:
    return Probed(status, error=VaultForbiddenError("refused", "the agent's hint"), body=body)


def test_token_claims_are_read_escaped_and_bounded_never_the_token() -> None:
    """The payload's identity claims are returned escaped; a non-JWT, an
    oversized token or a payload that is not JSON gives nothing."""
    token = _jwt({"aud": "https://vault.azure.net", "oid": OBJECT_ID, "appid": "a\x1b[2Jb",
                  "exp": 1, "secret": "not kept"})
    claims = token_claims(token)
    assert claims == {"aud": "https://vault.azure.net", "oid": OBJECT_ID, "appid": "a\\x1b[2Jb"}
    assert token_claims("opaque-token") == {}
    assert token_claims("a.!!!.c") == {}
    assert token_claims(_jwt({"aud": "x" * 20000})) == {}
    assert token_claims("e30." + base64.urlsafe_b64encode(b"[1]").decode() + ".x") == {}


@pytest.mark.parametrize("inner, expected", [
    ("ForbiddenByRbac", f'az role assignment create --role "Key Vault Secrets User" '
                        f"--assignee {OBJECT_ID} --scope '{RBAC_ID}'"),
    ("AccessDenied", f"az keyvault set-policy --name contoso-kv --object-id {OBJECT_ID} "
                     "--secret-permissions get list"),
    ("ForbiddenByPolicy", f"az keyvault set-policy --name contoso-kv --object-id {OBJECT_ID} "
                          "--secret-permissions get list"),
    ("ForbiddenByFirewall", "az keyvault network-rule add --name contoso-kv "
                            "--ip-address 10.1.2.3"),
], ids=["rbac", "access-policy", "forbidden-by-policy", "firewall"])
def test_a_403_gets_the_command_its_inner_code_calls_for(inner: str, expected: str) -> None:
    """RBAC gets the role assignment scoped to the vault's resource id from
    the message, an access-policy vault the set-policy line, a firewall the
    network rule for the client address it reported."""
    message = {
        "ForbiddenByRbac": ("Caller is not authorized to perform action on resource.\r\n"
                            f"Resource: '{RBAC_ID}/secrets/db'\r\nVault: contoso-kv;location=x"),
        "AccessDenied": ("The user, group or application 'appid=a;oid=b;iss=c' does not have "
                         "secrets get permission on key vault 'contoso-kv;location=westus'."),
        "ForbiddenByPolicy": "Operation is not allowed.\r\nVault: contoso-kv;location=westus",
        "ForbiddenByFirewall": ("Client address is not authorized.\r\nClient address: "
                                "10.1.2.3\r\nVault: contoso-kv;location=westus"),
    }[inner]
    checks = judge_answer(Source(VAULT, "db"), _refused(403, _error_body("Forbidden", message,
                                                                          inner)),
                          OBJECT_ID, 0.0, 0.0)
    assert [(c.name, c.state) for c in checks] == [("readable", FAIL)]
    assert inner in checks[0].detail
    assert checks[0].fix == expected


def test_a_403_without_a_resource_id_scopes_by_the_vaults_name_and_unknown_ids_are_placeholders(
) -> None:
    """Without a resource id the scope is looked up by name; a hostile
    message cannot put shell syntax into the printed command."""
    body = _error_body("Forbidden", "Resource: '/subscriptions/$(reboot)'\nVault: x;y $(reboot)",
                       "ForbiddenByRbac")
    fix = refusal_fix("https://127.0.0.1:8443", "ForbiddenByRbac", body, None, None)
    assert fix == ('az role assignment create --role "Key Vault Secrets User" --assignee '
                   '<object id of the identity> --scope '
                   '"$(az keyvault show --name <vault name> --query id -o tsv)"')
    assert vault_name(VAULT, b"") == "contoso-kv"
    assert vault_name("https://evil.example.com", b"") == "<vault name>"


def test_disabled_not_found_and_other_answers() -> None:
    """A disabled version fails 'enabled' with the set-attributes line; a
    404 names the closest names, or says why there are none."""
    disabled = judge_answer(Source(VAULT, "db", "abc"), _refused(403, _error_body(
        "Forbidden", "Operation get is not allowed on a disabled secret.", "SecretDisabled")),
        OBJECT_ID, 0.0, 0.0)
    assert [(c.name, c.state) for c in disabled] == [("readable", OK), ("exists", OK),
                                                     ("enabled", FAIL)]
    assert disabled[2].fix == ("az keyvault secret set-attributes --vault-name contoso-kv "
                               "--name db --version abc --enabled true")
    missing = _refused(404, _error_body("SecretNotFound", "A secret with (name/id) db-pasword"))
    near = judge_answer(Source(VAULT, "db-pasword"), missing, OBJECT_ID, 0.0, 0.0,
                        lambda name: ["db-password", "db-passwords"])
    assert near[0].state == FAIL and "db-password, db-passwords" in near[0].detail
    assert near[0].fix is not None and "name: db-password" in near[0].fix
    unlisted = judge_answer(Source(VAULT, "db-pasword"), missing, OBJECT_ID, 0.0, 0.0)
    assert "may not be listed" in unlisted[0].detail
    assert unlisted[0].fix is not None and unlisted[0].fix.startswith("create it: az keyvault")


def test_a_readable_secret_reports_its_version_and_validity() -> None:
    """A 200 is readable, enabled and valid until its exp."""
    secret = Secret("db", "0123", b"value", None, SecretAttributes(enabled=True, exp=2_000_000))
    checks = judge_answer(Source(VAULT, "db"), Probed(200, secret=secret), OBJECT_ID,
                          1_000_000.0, 0.0)
    assert [(c.name, c.state) for c in checks] == [("readable", OK), ("enabled", OK),
                                                   ("validity", OK)]
    assert "value" not in repr(checks)


@pytest.mark.parametrize("validity, state, words", [
    (Validity(None, 900), FAIL, "expired at 1970-01-01T00:15:00Z"),
    (Validity(2000, None), WARN, "not valid before"),
    (Validity(None, 1000 + 86400), WARN, "in 1.0 days"),
    (Validity(None, None), OK, "no expiry set"),
    (Validity(None, 10**7), OK, "valid until"),
], ids=["expired", "not-yet-valid", "expiring", "no-expiry", "valid"])
def test_validity(validity: Validity, state: str, words: str) -> None:
    """Expired fails with the rotate line; not yet valid and expiring warn."""
    check = check_validity("secret db", Source(VAULT, "db"), validity, 1000.0, 14 * 86400.0)
    assert check.state == state and words in check.detail
    if state == FAIL:
        assert check.fix == ("rotate it: az keyvault secret set --vault-name contoso-kv "
                             "--name db --file <new value file>")


@pytest.mark.parametrize("systemd, word, state", [
    (False, None, WARN), (True, "active", OK), (True, "failed", FAIL),
    (True, "inactive", WARN), (True, None, WARN),
])
def test_unit_state(tmp_path: Path, systemd: bool, word: Optional[str], state: str) -> None:
    """Without systemd the unit's state is a warning, not a failure; a
    failed unit fails with the journalctl line."""
    host = Host(is_systemd=lambda: systemd, unit_state=lambda unit: word)
    unit = check_agent({"KV_AGENT_STATE_DIR": str(tmp_path)}, host)[0]
    assert (unit.name, unit.state) == ("unit", state)
    if state == FAIL:
        assert unit.fix is not None and "journalctl -u kv-agent" in unit.fix


def test_a_foreign_directory_a_file_lands_in_fails_the_output_directory(shm_dir: Path) -> None:
    """Another user's 0777 directory below the output directory, where a file lands,
    fails the directory's check with the fix; a missing one passes."""
    if os.geteuid() != 0:
        pytest.skip("chown to another uid needs root (CI runs the suite as root)")
    foreign = shm_dir / "sub"
    foreign.mkdir()
    os.chown(foreign, 1234, 1234)
    os.chmod(foreign, 0o777)
    [failed] = check_directory(str(shm_dir), [str(foreign)])
    assert failed.state == FAIL and f"{foreign} is owned by uid 1234" in failed.detail
    assert failed.fix is not None and f"chown root:root {foreign}" in failed.fix
    assert [c.state for c in check_directory(str(shm_dir), [str(shm_dir / "new")])] == [OK, OK]


def test_status_document_shows_last_refresh_and_failing_entries(tmp_path: Path) -> None:
    """A running agent's failing required entry fails with its error; an
    optional one warns; no status.json is a warning."""
    host = Host(is_systemd=lambda: False)
    assert check_agent({"KV_AGENT_STATE_DIR": str(tmp_path)}, host)[1].state == WARN
    document = StatusSnapshot(
        pid=os.getpid(), phase=READY, saved_at=None, status="1 failing", manifest="m.yaml",
        last_refresh="2026-11-27T20:00:00Z", entries=(
            EntryStatus("db", ("/run/secrets/db",), error="403 forbidden",
                        error_since="2026-11-27T19:00:00Z"),
            EntryStatus("opt", ("/run/secrets/opt",), is_optional=True, error="404"),
        )).as_json()
    (tmp_path / "status.json").write_text(json.dumps(document))
    checks = check_agent({"KV_AGENT_STATE_DIR": str(tmp_path)}, host)
    assert [(c.name, c.state) for c in checks] == [("unit", WARN), ("status", OK),
                                                   ("entry", FAIL), ("entry", WARN)]
    assert "2026-11-27T20:00:00Z" in checks[1].detail
    assert "db failing since 2026-11-27T19:00:00Z: 403 forbidden" in checks[2].detail


def test_a_file_that_is_not_the_agents_in_a_set_is_a_warning(shm_dir: Path) -> None:
    """Each entry of a set's directory that is no member's file is one warning naming it
    (escaped) and the fix; a set holding only its members gives none."""
    from agent.manifest import Accounts, parse_manifest

    manifest = parse_manifest(
        f"vault: {VAULT}\ndirectory: {shm_dir}\nsecrets:\n"
        "  - {name: db-password, path: db/password, set: db}\n"
        "  - {name: db-user, path: db/user, set: db}\n", "m.yaml",
        accounts=Accounts(user=lambda name: 0, group=lambda name: 0), check_filesystem=False)
    (shm_dir / "db").mkdir()
    (shm_dir / "db" / "password").write_text("x")
    assert check_sets(manifest) == []
    (shm_dir / "db" / "notes\nREADY=1").write_text("operator's")
    [check] = check_sets(manifest)
    assert (check.subject, check.name, check.state) == (f"set {shm_dir}/db", "own files", WARN)
    assert check.detail == f"{shm_dir}/db/notes\\x0aREADY=1 is not kv-agent's: kept, never deleted"
    assert check.fix is not None and f"move it out of {shm_dir}/db" in check.fix


def test_the_units_environment_replaces_the_shells_and_is_named() -> None:
    """With kv-agent.service there, doctor checks with the unit's environment (not the
    shell's), names the variables and files it came from, never a value, and warns of an
    unreadable EnvironmentFile=; without the unit, or with --no-unit-env, the shell's."""
    unit = UnitEnvironment(
        {"PATH": "/usr/bin", "REQUESTS_CA_BUNDLE": "/run/kv-agent-emulator/ca.pem",
         "IDENTITY_HEADER": "header-credential"},
        ("REQUESTS_CA_BUNDLE",), (("/etc/kv-agent/env", ("IDENTITY_HEADER",)),),
        ("EnvironmentFile=/etc/kv-agent/more cannot be read (No such file or directory)",))
    shell = {"PATH": "/bin", "HTTPS_PROXY": "http://proxy.invalid:3128"}
    environ, checks = agent_environment(shell, Host(unit_environment=lambda: unit), True)
    assert environ == unit.environ and "HTTPS_PROXY" not in environ
    assert [(c.subject, c.name, c.state) for c in checks] == [
        ("environment", "source", OK), ("environment", "file", WARN)]
    assert checks[0].detail == (
        "kv-agent.service's, as the agent runs: Environment= sets REQUESTS_CA_BUNDLE; "
        "/etc/kv-agent/env sets IDENTITY_HEADER (not this shell's; --no-unit-env uses it)")
    assert "header-credential" not in str(checks)
    for host, use_unit, why in ((Host(unit_environment=lambda: None), True,
                                 "no kv-agent.service here"),
                                (Host(unit_environment=lambda: unit), False, "--no-unit-env")):
        environ, checks = agent_environment(shell, host, use_unit)
        assert environ is shell and checks == [Check("environment", "source", OK,
                                                     f"this shell's ({why})")]


def test_render_puts_one_fix_under_each_failure() -> None:
    """One line per check, the fix indented under a failure, the counts last."""
    report = Report((Check("vault v", "tls", OK, "verified"),
                     Check("secret s", "readable", FAIL, "denied", "grant it"),
                     Check("agent", "unit", WARN, "no systemd")), 1.25)
    assert render(report) == ["✓ vault v, tls: verified", "✗ secret s, readable: denied",
                              "    fix: grant it", "! agent, unit: no systemd",
                              "3 checks: 1 failed, 1 warnings (1.2 s)"]


# -- integration: the real command against the emulator -----------------------------------


class Doctor:
    """Runs ``kv-agent doctor`` against the emulator and a tmpfs directory."""

    def __init__(self, emulator: Emulator, root: Path) -> None:
        self.emulator = emulator
        self.root = root
        # A systemctl that answers nothing, first on PATH: what doctor checks
        # must not depend on whether this machine has a kv-agent.service.
        self.bin = root / "bin"
        fake_systemctl(self.bin, None)

    def put(self, name: str, **attributes: object) -> str:
        value = fresh_value(name)
        SECRET_VALUES.add(value)
        return self.emulator.set_secret(name, value, **attributes)  # type: ignore[arg-type]

    def manifest(self, body: str, vault: Optional[str] = None) -> Path:
        path = self.root / "manifest.yaml"
        path.write_text(f"vault: {vault or self.emulator.vault_url}\n"
                        f"directory: {self.root / 'out'}\nsecrets:\n{body}")
        os.chmod(path, 0o600)
        return path

    def env(self, **extra: str) -> Dict[str, str]:
        env = {key: value for key, value in os.environ.items()
               if "proxy" not in key.lower() and key != "KV_AGENT_MANIFEST"}
        env.update(KV_AGENT_IMDS_ENDPOINT=self.emulator.imds_endpoint,
                   REQUESTS_CA_BUNDLE=self.emulator.ca_path,
                   KV_AGENT_STATE_DIR=str(self.root / "state"),
                   PATH=f"{self.bin}:{os.environ.get('PATH', '/usr/bin:/bin')}")
        env.update(extra)
        return env

    def run(self, manifest: Path, *options: str, env: Optional[Mapping[str, str]] = None
            ) -> "subprocess.CompletedProcess[str]":
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "agent", "doctor", "--manifest",
                               str(manifest), *options], env=dict(env or self.env()), cwd=REPO,
                              capture_output=True, text=True, timeout=60, check=False)
        done.elapsed_s = time.monotonic() - started  # type: ignore[attr-defined]
        for record in self.emulator.vault_log:
            scheme, _, token = record.headers.get("authorization", "").partition(" ")
            if token:
                TOKENS.add(token)
        secrecy.assert_no_leak(done.stdout + done.stderr, SECRET_VALUES, TOKENS)
        assert done.stderr == "", done.stderr
        return done


def fake_systemctl(directory: Path, show: Optional[str], environment: str = "") -> None:
    """A `systemctl` in ``directory`` whose `show` prints ``show`` (None: it fails, as
    without systemd) and whose `show-environment` prints ``environment``."""
    directory.mkdir(exist_ok=True)
    (directory / "show.txt").write_text(show or "")
    (directory / "environment.txt").write_text(environment)
    script = directory / "systemctl"
    answer = "exit 1" if show is None else 'cat "$here/show.txt"'
    script.write_text('#!/bin/sh\nhere=$(dirname "$0")\ncase "$1" in\n'
                      f'  show) {answer} ;;\n'
                      '  show-environment) cat "$here/environment.txt" ;;\n'
                      '  *) exit 1 ;;\nesac\n')
    script.chmod(0o755)


def failures(output: str) -> List[str]:
    """The ✗ lines, each with its fix line."""
    lines = output.splitlines()
    return [f"{line}\n{lines[i + 1]}" for i, line in enumerate(lines) if line.startswith("✗")]


@pytest.fixture
def doctor(emulator: Emulator, shm_dir: Path) -> Iterator[Doctor]:
    emulator.clear_faults()
    emulator.token_audience = None
    yield Doctor(emulator, shm_dir)
    emulator.token_audience = None


def _name(prefix: str) -> str:
    return f"{prefix}-{os.urandom(3).hex()}"


@pytest.mark.integration
def test_healthy_setup_passes_every_check(doctor: Doctor) -> None:
    """Every link passes (the unit and status are warnings without systemd
    or an agent), exit 0, and the output names the identity, never a value."""
    name = _name("db")
    doctor.put(name)
    done = doctor.run(doctor.manifest(f"  - name: {name}\n"))
    assert done.returncode == 0, done.stdout
    assert "✗" not in done.stdout
    for fragment in ("✓ manifest, valid", "✓ output directory", "✓ identity, source: imds",
                     f"object id {OBJECT_ID}", "tls: certificate verified against",
                     "401 challenge asks for https://vault.azure.net",
                     "audience is https://vault.azure.net", f"✓ secret {name}, readable",
                     f"✓ secret {name}, validity: no expiry set"):
        assert fragment in done.stdout, done.stdout


@pytest.mark.integration
def test_doctor_from_a_root_shell_uses_the_units_environment(doctor: Doctor) -> None:
    """From a shell without the agent's variables, doctor passes when kv-agent.service
    sets them (REQUESTS_CA_BUNDLE in Environment=, KV_AGENT_IMDS_ENDPOINT in an
    EnvironmentFile=) and says so; with --no-unit-env it checks the shell's and fails."""
    name = _name("unit")
    doctor.put(name)
    env_file = doctor.root / "kv-agent.env"
    env_file.write_text(f"# the emulator recipe\nKV_AGENT_IMDS_ENDPOINT="
                        f"'{doctor.emulator.imds_endpoint}'\n")
    fake_systemctl(doctor.bin, (
        f"LoadState=loaded\nEnvironment=REQUESTS_CA_BUNDLE={doctor.emulator.ca_path} "
        f"KV_AGENT_STATE_DIR={doctor.root / 'state'}\n"
        f"EnvironmentFiles={env_file} (ignore_errors=no)\n"
        f"EnvironmentFiles={doctor.root / 'absent'} (ignore_errors=yes)\n"),
        "LANG=C.UTF-8\nPATH=/usr/sbin:/usr/bin:/sbin:/bin\n")
    with socket.socket() as probe:  # a loopback port where nothing listens
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}/metadata/identity/oauth2/token"
    shell = {key: value for key, value in doctor.env().items() if key != "REQUESTS_CA_BUNDLE"}
    shell["KV_AGENT_IMDS_ENDPOINT"] = closed  # the shell's: never reached but by --no-unit-env
    manifest = doctor.manifest(f"  - name: {name}\n")
    done = doctor.run(manifest, env=shell)
    assert done.returncode == 0, done.stdout
    assert done.stdout.splitlines()[0] == (
        "✓ environment, source: kv-agent.service's, as the agent runs: Environment= sets "
        f"REQUESTS_CA_BUNDLE, KV_AGENT_STATE_DIR; {env_file} sets KV_AGENT_IMDS_ENDPOINT "
        "(not this shell's; --no-unit-env uses it)")
    assert f"✓ secret {name}, readable" in done.stdout
    alone = doctor.run(manifest, "--no-unit-env", env=shell)
    assert alone.returncode == 1, alone.stdout
    assert alone.stdout.splitlines()[0] == "✓ environment, source: this shell's (--no-unit-env)"
    assert "✗ identity" in alone.stdout and "tls: not verified" in alone.stdout, alone.stdout


@pytest.mark.integration
def test_json_lists_every_check(doctor: Doctor) -> None:
    """--json prints a list of checks with subject, check, state, detail and fix."""
    name = _name("json")
    doctor.put(name)
    done = doctor.run(doctor.manifest(f"  - name: {name}\n"), "--json")
    checks = json.loads(done.stdout)
    assert done.returncode == 0
    assert {tuple(sorted(check)) for check in checks} == {
        ("check", "detail", "fix", "state", "subject")}
    assert {"subject": f"secret {name}", "check": "readable", "state": "ok",
            "detail": checks[[c["subject"] for c in checks].index(f"secret {name}")]["detail"],
            "fix": None} in checks


@pytest.mark.integration
def test_identity_missing_user_assigned(doctor: Doctor) -> None:
    """IMDS answering 400 Identity not found for the manifest's client_id
    fails the identity with the assign command, and no secret is asked."""
    name = _name("noid")
    doctor.put(name)
    path = doctor.manifest(f"  - name: {name}\n")
    path.write_text("identity:\n  client_id: 11111111-2222-4333-8444-555555555555\n"
                    + path.read_text())
    done = doctor.run(path)
    assert done.returncode == 1
    [failure] = failures(done.stdout)
    assert "✗ identity, source: imds" in failure and "Identity not found" in failure
    assert "fix: assign that user-assigned identity to this VM (az vm identity assign" in failure
    assert "secrets: not checked: no token" in done.stdout


@pytest.mark.integration
def test_identity_missing_on_the_vm(shm_dir: Path) -> None:
    """A VM without any managed identity (IMDS: 400 Identity not found)
    fails the identity with the command that enables it."""
    with Emulator({"db": fresh_value("db")}, identities=IdentityConfig(system_assigned=False)
                  ) as bare:
        bare_doctor = Doctor(bare, shm_dir)
        done = bare_doctor.run(bare_doctor.manifest("  - name: db\n"))
    assert done.returncode == 1
    [failure] = failures(done.stdout)
    assert "Identity not found" in failure
    assert "fix: enable the VM's system-assigned identity (az vm identity assign" in failure


@pytest.mark.integration
def test_wrong_audience(doctor: Doctor) -> None:
    """A token for another audience fails the audience check with the
    endpoint to fix, before any secret is asked."""
    name = _name("aud")
    doctor.put(name)
    doctor.emulator.token_audience = "https://management.azure.com"
    done = doctor.run(doctor.manifest(f"  - name: {name}\n"))
    assert done.returncode == 1
    [failure] = failures(done.stdout)
    assert "audience: the token is for 'https://management.azure.com', the vault needs " \
           "'https://vault.azure.net'" in failure
    assert "point KV_AGENT_IMDS_ENDPOINT at the real imds endpoint" in failure


@pytest.mark.integration
@pytest.mark.parametrize("inner, fix", [
    ("ForbiddenByRbac", f'fix: az role assignment create --role "Key Vault Secrets User" '
                        f"--assignee {OBJECT_ID} --scope '/subscriptions/00000000-0000-0000-"
                        "0000-000000000000/resourcegroups/kv-emulator/providers/"
                        "microsoft.keyvault/vaults/kv-emulator'"),
    ("AccessDenied", f"fix: az keyvault set-policy --name kv-emulator --object-id {OBJECT_ID} "
                     "--secret-permissions get list"),
], ids=["rbac", "access-policy"])
def test_forbidden(doctor: Doctor, inner: str, fix: str) -> None:
    """A 403 gets the exact grant for the vault's permission model."""
    name = _name("forbidden")
    doctor.put(name)
    doctor.emulator.forbid_secret(name, inner)
    done = doctor.run(doctor.manifest(f"  - name: {name}\n"))
    assert done.returncode == 1
    [failure] = failures(done.stdout)
    assert f"✗ secret {name}, readable: permission denied (403 {inner})" in failure
    assert failure.endswith(fix), failure


@pytest.mark.integration
def test_not_found_names_the_closest(doctor: Doctor) -> None:
    """A 404 lists the vault's closest names and proposes the first."""
    name = _name("api-key")
    doctor.put(name)
    typo = name.replace("api-key", "api-kye")
    done = doctor.run(doctor.manifest(f"  - name: {typo}\n"))
    assert done.returncode == 1
    [failure] = failures(done.stdout)
    assert f"✗ secret {typo}, exists: not found (404 SecretNotFound); closest names in the " \
           f"vault: {name}" in failure
    assert f"fix: if '{name}' is the secret meant, set name: {name} in the manifest" in failure


@pytest.mark.integration
def test_disabled(doctor: Doctor) -> None:
    """A disabled secret fails 'enabled' with the command that enables it."""
    name = _name("disabled")
    doctor.put(name)
    doctor.emulator.disable_secret(name)
    done = doctor.run(doctor.manifest(f"  - name: {name}\n"))
    assert done.returncode == 1
    [failure] = failures(done.stdout)
    assert f"✗ secret {name}, enabled: its current version is disabled (403 SecretDisabled)" \
           in failure
    # A loopback vault has no name to take from its host: the operator fills it in.
    assert f"fix: az keyvault secret set-attributes --vault-name <vault name> --name {name} " \
           "--enabled true" in failure


@pytest.mark.integration
def test_expired(doctor: Doctor) -> None:
    """An expired secret fails its validity with the rotate line."""
    name = _name("expired")
    doctor.put(name, expires_on=int(time.time()) - 86400)
    done = doctor.run(doctor.manifest(f"  - name: {name}\n"))
    assert done.returncode == 1
    [failure] = failures(done.stdout)
    assert f"✗ secret {name}, validity: expired at " in failure
    assert f"fix: rotate it: az keyvault secret set --vault-name <vault name> --name {name}" \
        in failure


@pytest.mark.integration
def test_certificate_key_not_exportable(doctor: Doctor) -> None:
    """A certificate entry that asks for the key of a non-exportable
    certificate fails 'key exportable' with the policy fix."""
    pytest.importorskip("cryptography")
    name = _name("tls")
    doctor.emulator.add_certificate(name, exportable=False)
    done = doctor.run(doctor.manifest(f"  - name: {name}\n    certificate:\n"
                                      f"      key: tls/{name}.key\n"
                                      f"      cert: tls/{name}.crt\n"))
    assert done.returncode == 1
    [failure] = failures(done.stdout)
    assert f"✗ certificate {name}, key exportable:" in failure
    assert "make the key exportable in the certificate policy" in failure


@pytest.mark.integration
def test_bad_ca(doctor: Doctor, tmp_path: Path) -> None:
    """REQUESTS_CA_BUNDLE naming another CA fails TLS, naming the bundle."""
    other = generate_certificates(str(tmp_path), hostnames=["127.0.0.1"])
    name = _name("ca")
    doctor.put(name)
    done = doctor.run(doctor.manifest(f"  - name: {name}\n"),
                      env=doctor.env(REQUESTS_CA_BUNDLE=other.ca_cert))
    assert done.returncode == 1
    [failure] = failures(done.stdout)
    assert f"tls: not verified against {other.ca_cert} (REQUESTS_CA_BUNDLE): the certificate " \
           "is not signed by a CA in the bundle" in failure
    assert "fix: point REQUESTS_CA_BUNDLE at the PEM of the CA that signed" in failure


@pytest.mark.integration
def test_a_missing_ca_bundle_fails_tls_and_the_identity_is_still_checked(
        doctor: Doctor, tmp_path: Path) -> None:
    """REQUESTS_CA_BUNDLE naming no file: no vault can be reached, and says so with
    the fix, but the identity (over IMDS's plain HTTP) is still checked."""
    name = _name("noca")
    doctor.put(name)
    missing = tmp_path / "gone" / "ca.pem"
    done = doctor.run(doctor.manifest(f"  - name: {name}\n"),
                      env=doctor.env(REQUESTS_CA_BUNDLE=str(missing)))
    assert done.returncode == 1
    [failure] = failures(done.stdout)
    assert f"REQUESTS_CA_BUNDLE={missing} does not exist" in failure
    assert "✓ identity, source: imds" in done.stdout and f"object id {OBJECT_ID}" in done.stdout


@pytest.mark.integration
def test_vault_down(doctor: Doctor) -> None:
    """A vault address where nothing listens fails the connection at once."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    done = doctor.run(doctor.manifest("  - name: db\n", vault=f"https://127.0.0.1:{port}"))
    assert done.returncode == 1
    [failure] = failures(done.stdout)
    assert f"connection: cannot connect to 127.0.0.1:{port} (connection refused)" in failure
    assert done.elapsed_s < BLACK_HOLE_LIMIT_S  # type: ignore[attr-defined]


@pytest.mark.integration
@pytest.mark.parametrize("accepts", [True, False], ids=["accepts-never-answers",
                                                        "never-accepts"])
def test_vault_black_holed(doctor: Doctor, accepts: bool) -> None:
    """A vault that accepts TCP but never answers, or never accepts at all,
    fails 'connection: timed out' and doctor still ends within seconds."""
    with socket.socket() as hole:
        hole.bind(("127.0.0.1", 0))
        hole.listen(0)
        port = hole.getsockname()[1]
        filler = []
        if not accepts:  # fill the backlog so the kernel completes no more handshakes
            for _ in range(4):
                extra = socket.socket()
                extra.setblocking(False)
                extra.connect_ex(("127.0.0.1", port))
                filler.append(extra)
        done = doctor.run(doctor.manifest("  - name: db\n", vault=f"https://127.0.0.1:{port}"))
        for extra in filler:
            extra.close()
    assert done.returncode == 1
    [failure] = failures(done.stdout)
    assert f"connection: no answer from 127.0.0.1:{port}: timed out" in failure
    assert done.elapsed_s < BLACK_HOLE_LIMIT_S, done.elapsed_s  # type: ignore[attr-defined]


@pytest.mark.integration
def test_invalid_manifest_reuses_checks_messages(doctor: Doctor) -> None:
    """An invalid manifest fails with check's own messages, one per problem."""
    path = doctor.manifest("  - name: a_b\n    mod: '0400'\n")
    done = doctor.run(path)
    assert done.returncode == 1
    lines = failures(done.stdout)
    assert any("secrets[0].mod: unknown key" in line and "did you mean 'mode'?" in line
               for line in lines), done.stdout
    assert any("'a_b' is not a Key Vault secret name" in line for line in lines)


@pytest.mark.integration
def test_select_entry_lists_its_vault(doctor: Doctor) -> None:
    """A select: entry's vault is listed, and doctor says how many match."""
    prefix = _name("sel")
    for suffix in ("a", "b"):
        doctor.put(f"{prefix}-{suffix}")
    done = doctor.run(doctor.manifest(f"  - select: {{prefix: \"{prefix}-\"}}\n"
                                      "    directory: selected\n"))
    assert done.returncode == 0, done.stdout
    assert f"✓ select prefix '{prefix}-', listable: 2 of the vault's" in done.stdout


def test_a_vault_name_that_does_not_resolve_fails_dns_and_sends_nothing() -> None:
    """A name the resolver does not know fails 'dns' with the fix, and no
    request is made."""
    import requests

    from agent.doctor.vault_links import check_vault
    from agent.vault.client import VaultClient

    def unknown(host: str) -> List[str]:
        raise OSError("Name or service not known")

    session = requests.Session()
    reach = check_vault(VaultClient(session, lambda resource, force: "unused"),
                        "https://contoso-kv.vault.azure.net", {}, unknown)
    assert reach.audience is None
    [dns] = reach.checks
    assert (dns.name, dns.state) == ("dns", FAIL)
    assert "contoso-kv.vault.azure.net does not resolve" in dns.detail
    assert dns.fix is not None and "privatelink.vaultcore.azure.net" in dns.fix


def test_an_optional_secrets_failure_is_a_warning() -> None:
    """soften turns failures into warnings (fix kept) and leaves the rest."""
    from agent.doctor.report import soften

    checks = [Check("secret s", "readable", FAIL, "denied", "grant it"),
              Check("secret s", "enabled", OK, "enabled")]
    assert soften(checks) == [Check("secret s", "readable", WARN, "denied (optional)",
                                    "grant it"), checks[1]]


@pytest.mark.integration
def test_a_terminal_without_unicode_gets_ascii_marks(doctor: Doctor) -> None:
    """Where stdout cannot encode the marks, 'ok', '!' and 'FAIL' replace them."""
    name = _name("ascii")
    doctor.put(name)
    done = doctor.run(doctor.manifest(f"  - name: {name}\n  - name: {name}-missing\n"),
                      env=doctor.env(PYTHONIOENCODING="ascii"))
    assert done.returncode == 1
    assert f"ok secret {name}, readable" in done.stdout
    assert f"FAIL secret {name}-missing, exists" in done.stdout
    assert "✓" not in done.stdout


@pytest.mark.integration
def test_app_service_identity_source(doctor: Doctor) -> None:
    """Under App Service's variables doctor asks App Service's endpoint, as the agent does."""
    name = _name("appsvc")
    doctor.put(name)
    done = doctor.run(doctor.manifest(f"  - name: {name}\n"), env=doctor.env(
        IDENTITY_ENDPOINT=doctor.emulator.app_service_endpoint,
        IDENTITY_HEADER=doctor.emulator.identity_header))
    assert done.returncode == 0, done.stdout
    assert ("✓ identity, source: app-service (IDENTITY_ENDPOINT and IDENTITY_HEADER are set) "
            f"answers at {doctor.emulator.app_service_endpoint}") in done.stdout
    assert doctor.emulator.identity_header not in done.stdout


FOREIGN_IDENTITY_ENDPOINT = "http://10.1.2.3:8081/msi/token"  # never connected to


@pytest.mark.parametrize("endpoint, warned", [
    (FOREIGN_IDENTITY_ENDPOINT, True), ("http://127.0.0.1:9/MSI/token", False)])
def test_a_cleartext_app_service_endpoint_is_a_warning(endpoint: str, warned: bool) -> None:
    """App Service over plain HTTP to another host is a warning naming the endpoint and the
    fix (nothing sent to find out); a loopback endpoint adds no check."""
    from agent.doctor.identity_links import check_endpoint
    from agent.identity.selector import Identity
    from agent.identity.tokens import token_source

    tokens = token_source(Identity(), {"IDENTITY_ENDPOINT": endpoint, "IDENTITY_HEADER": "h"})
    try:
        checks = check_endpoint(tokens)
    finally:
        tokens.close()
    if not warned:
        assert checks == []
        return
    [check] = checks
    assert (check.subject, check.name, check.state) == ("identity", "endpoint", WARN)
    assert FOREIGN_IDENTITY_ENDPOINT in check.detail and "plain HTTP" in check.detail
    assert check.fix and "IDENTITY_ENDPOINT" in check.fix


def test_doctor_reports_a_cleartext_app_service_endpoint(
        emulator: Emulator, shm_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """diagnose lists the endpoint warning with the identity checks and does not fail for
    it (the identity check itself is stubbed: it would connect to that address)."""
    import agent.doctor.chain as doctor_module
    from agent.doctor.identity_links import IdentityFindings

    def not_asked(tokens: object, audience: str) -> object:
        return IdentityFindings(None, None, (
            Check("identity", "source", WARN, "not asked in this test"),))

    monkeypatch.setattr(doctor_module, "check_identity", not_asked)
    path = Doctor(emulator, shm_dir).manifest("  - name: db\n")
    environ = {"IDENTITY_ENDPOINT": FOREIGN_IDENTITY_ENDPOINT, "IDENTITY_HEADER": "h",
               "REQUESTS_CA_BUNDLE": emulator.ca_path,
               "KV_AGENT_STATE_DIR": str(shm_dir / "state")}
    report = doctor_module.diagnose(str(path), environ, Host(
        is_systemd=lambda: False, unit_state=lambda unit: None,
        resolve=lambda host: ["127.0.0.1"]))
    identity = [check for check in report.checks if check.subject == "identity"]
    assert [(check.name, check.state) for check in identity] == [
        ("endpoint", WARN), ("source", WARN)]
    assert FOREIGN_IDENTITY_ENDPOINT in identity[0].detail and not report.is_failed
