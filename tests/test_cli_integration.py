"""The real ``kv-agent`` command, run as a subprocess against the emulator.

Every test starts ``python -m agent`` exactly as an operator would, with
``KV_AGENT_IMDS_ENDPOINT`` and ``REQUESTS_CA_BUNDLE`` pointing at a loopback
:class:`~agent.emulator.Emulator`, and writes into a fresh tmpfs directory.
Every run's output is checked for secret values, access tokens and (at the
default level) tracebacks, as the README promises none ever appear.

One emulator serves the whole module; each test uses secret names of its
own, and the ``emu`` fixture clears faults and request logs around it.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import secrets
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Mapping, Optional, Set, Tuple
from urllib.parse import urlsplit

import pytest
import requests
import secrecy
from daemon_harness import (
    AGENT_MAIN,
    FEATURE_MODULES,
    REPORT_MODULES,
    AgentProcess,
    loaded_modules,
    wait_for,
)
from emulator_command import emulator_command
from hostile import HostileServer, answer, loopback_443_server, trickle
from hostile import response as hostile_response
from secrecy import fresh_value

from agent.base.landing import MEMORY_FILESYSTEMS, filesystem_type
from agent.emulator import Emulator, IdentityConfig, UserAssignedIdentity
from agent.emulator.demo import DEMO_SECRETS
from agent.writer import SET_GRACE_S

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent
IMDS_API_VERSION = "2018-02-01"
KEYVAULT_AUDIENCE = "https://vault.azure.net"
RUN_TIMEOUT_S = 60.0
PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")

USER_ASSIGNED = UserAssignedIdentity(
    client_id="7d1c2b3a-1111-4222-8333-444455556666",
    object_id="0f9e8d7c-aaaa-4bbb-8ccc-ddddeeeeffff",
    msi_res_id=("/subscriptions/00000000-0000-0000-0000-000000000000/resourcegroups/kv-test"
                "/providers/Microsoft.ManagedIdentity/userAssignedIdentities/kv-agent-test"),
)

# Everything a run must never print, gathered as the module goes.
SECRET_VALUES: Set[str] = set()
TOKENS: Set[str] = set()
OUTPUTS: List[str] = []


# ---------------------------------------------------------------------------
# Helpers


@dataclass(frozen=True)
class Run:
    """One finished ``kv-agent`` process."""

    argv: Tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    elapsed_s: float

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    @property
    def error_lines(self) -> List[str]:
        return [line for line in self.stderr.splitlines()
                if line.startswith("kv-agent: error:")]


@dataclass(frozen=True)
class FileState:
    """What must not change about a file the agent leaves alone."""

    content: bytes
    inode: int
    mtime_ns: int
    mode: int
    uid: int
    gid: int


def file_state(path: Path) -> FileState:
    """The bytes and identity of ``path`` (not following a symlink)."""
    st = os.lstat(path)
    return FileState(path.read_bytes(), st.st_ino, st.st_mtime_ns, stat.S_IMODE(st.st_mode),
                     st.st_uid, st.st_gid)


def fresh_name(prefix: str) -> str:
    """A Key Vault secret name no other test uses."""
    return f"{prefix}-{secrets.token_hex(4)}"


def line_of(text: str, fragment: str) -> int:
    """The 1-based number of the first line of ``text`` containing ``fragment``."""
    for number, line in enumerate(text.splitlines(), start=1):
        if fragment in line:
            return number
    raise AssertionError(f"{fragment!r} not in the manifest")


def write_private(path: Path, text: str, mode: int = 0o600) -> Path:
    """Write ``text`` to ``path`` with exactly ``mode`` (the umask is undone)."""
    path.write_text(text, encoding="utf-8")
    os.chmod(path, mode)
    return path


def tokens_from(emulator: Emulator) -> Set[str]:
    """Bearer tokens the agent presented to the vault (they came from IMDS)."""
    found = set()
    for record in emulator.vault_log:
        scheme, _, token = record.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and token:
            found.add(token.strip())
    return found


def jwt_claims(token: str) -> Dict[str, object]:
    """The (unverified) claims of a JWT."""
    payload = token.split(".")[1]
    padded = payload + "=" * (-len(payload) % 4)
    decoded: Dict[str, object] = json.loads(base64.urlsafe_b64decode(padded))
    return decoded


def assert_no_leak(text: str, *, allow_traceback: bool = False) -> None:
    """No secret value, no token (nor a part of one) and no traceback in ``text``."""
    secrecy.assert_no_leak(text, SECRET_VALUES, TOKENS, allow_traceback=allow_traceback)


def base_environ() -> Dict[str, str]:
    """This process's environment without proxies or a manifest default."""
    env = dict(os.environ)
    for name in PROXY_VARIABLES:
        env.pop(name, None)
        env.pop(name.upper(), None)
    env.pop("KV_AGENT_MANIFEST", None)
    return env


class Harness:
    """Runs ``kv-agent`` against one emulator and one tmpfs directory."""

    def __init__(self, emulator: Emulator, root: Path) -> None:
        self.emulator = emulator
        self.root = root
        self.directory = root / "secrets"

    def env(self, **extra: str) -> Dict[str, str]:
        """The environment that points kv-agent at the emulator, plus ``extra``."""
        env = base_environ()
        env["KV_AGENT_IMDS_ENDPOINT"] = self.emulator.imds_endpoint
        env["REQUESTS_CA_BUNDLE"] = self.emulator.ca_path
        env.update(extra)
        return env

    def put(self, name: str, value: str) -> str:
        """Store a new version of ``name`` in the vault; returns its version id."""
        SECRET_VALUES.add(value)
        return self.emulator.set_secret(name, value)

    def manifest(self, entries: str, *, header: str = "", filename: str = "manifest.yaml",
                 mode: int = 0o600, directory: Optional[Path] = None) -> Path:
        """Write a manifest for the emulator's vault; ``entries`` is the YAML
        list under ``secrets:`` (already indented)."""
        text = (f"vault: {self.emulator.vault_url}\n"
                f"directory: {directory or self.directory}\n"
                f"{header}"
                f"secrets:\n{entries}")
        return write_private(self.root / filename, text, mode)

    def run(self, *argv: str, env: Optional[Mapping[str, str]] = None) -> Run:
        """Run ``kv-agent ARGV``; checks its output for leaks before returning."""
        command = (sys.executable, "-m", "agent", *argv)
        started = time.monotonic()
        done = subprocess.run(command, env=dict(env if env is not None else self.env()),
                              cwd=REPO, capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
                              check=False)
        result = Run(tuple(argv), done.returncode, done.stdout, done.stderr,
                     time.monotonic() - started)
        TOKENS.update(tokens_from(self.emulator))
        OUTPUTS.append(result.output)
        assert_no_leak(result.output, allow_traceback="--debug" in argv)
        return result


# ---------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def emulator_identities() -> IdentityConfig:
    """The module's emulator is a VM with a system-assigned identity and one
    user-assigned identity."""
    return IdentityConfig(system_assigned=True, user_assigned=(USER_ASSIGNED,))


@pytest.fixture(scope="module", autouse=True)
def _outputs_checked_at_the_end() -> Iterator[None]:
    """On teardown (after the module's emulator stopped), every output of the
    module is checked again against every value and token seen by then."""
    yield
    for output in OUTPUTS:
        assert_no_leak(output, allow_traceback=True)


@pytest.fixture
def emu(emulator: Emulator) -> Iterator[Emulator]:
    """The module's emulator with no faults, no latency and empty request logs."""
    emulator.clear_faults()
    emulator.latency_s = 0.0
    emulator.reset_stats()
    yield emulator
    TOKENS.update(tokens_from(emulator))
    emulator.clear_faults()
    emulator.latency_s = 0.0


@pytest.fixture
def kv(emu: Emulator, shm_dir: Path) -> Harness:
    """A harness over the emulator and a fresh tmpfs directory."""
    return Harness(emu, shm_dir)


def entry(name: str, **keys: str) -> str:
    """One ``secrets:`` list item in YAML (values written as given)."""
    lines = [f"  - name: {name}"] + [f"    {key}: {value}" for key, value in keys.items()]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
# once


@pytest.mark.parametrize("debug", [False, True], ids=["default", "debug"])
def test_once_writes_every_secret_byte_for_byte_with_owner_group_and_mode(
    kv: Harness, debug: bool
) -> None:
    """Every file (a pinned version too) holds the secret's exact UTF-8 bytes with the manifest's
    owner, group and mode, and a re-run touches nothing."""
    cases = {
        fresh_name("plain"): (fresh_value("no-newline"), {}, (0, 0, 0o400)),
        fresh_name("newline"): (fresh_value("trailing-newline") + "\n",
                                {"owner": "1234", "group": "5678", "mode": '"0440"'},
                                (1234, 5678, 0o440)),
        fresh_name("multi"): ("first line\r\n" + fresh_value("second-line") + "\n\n",
                              {"owner": "nobody", "group": "nogroup", "mode": '"0640"',
                               "path": "app/nested/multi"},
                              (65534, 65534, 0o640)),
        fresh_name("unicode"): ("  p\u00e4ssw\u00f6rd \u2713 " + fresh_value("spaced") + "  ",
                                {"owner": "1234", "mode": '"0600"'}, (1234, 0, 0o600)),
    }
    body = ""
    for name, (value, keys, _) in cases.items():
        kv.put(name, value)
        body += entry(name, **keys)
    pinned, pinned_value = fresh_name("pinned"), fresh_value("pinned-old")
    pinned_version = kv.put(pinned, pinned_value)
    kv.put(pinned, fresh_value("pinned-new"))
    body += entry(pinned, version=pinned_version)
    cases[pinned] = (pinned_value, {}, (0, 0, 0o400))
    manifest = kv.manifest(body)
    prefix = ("--debug",) if debug else ()

    first = kv.run(*prefix, "once", "--manifest", str(manifest))

    assert first.returncode == 0, first.stderr
    states = {}
    for name, (value, keys, (uid, gid, mode)) in cases.items():
        path = kv.directory / keys.get("path", name)
        state = file_state(path)
        assert state.content == value.encode("utf-8")
        assert (state.uid, state.gid, state.mode) == (uid, gid, mode)
        states[path] = state

    again = kv.run(*prefix, "once", "--manifest", str(manifest))

    assert again.returncode == 0, again.stderr
    assert {path: file_state(path) for path in states} == states


def test_once_failures_name_each_secret_and_keep_its_file(kv: Harness) -> None:
    """A disabled, a forbidden and a deleted secret each get one error line with its fix and keep
    their files, while a rotated secret is still written."""
    names = {kind: fresh_name(kind) for kind in ("rotated", "disabled", "forbidden", "deleted")}
    for name in names.values():
        kv.put(name, fresh_value(name))
    manifest = kv.manifest("".join(entry(name, mode='"0440"', owner="1234")
                                   for name in names.values()))
    assert kv.run("once", "--manifest", str(manifest)).returncode == 0
    before = {kind: file_state(kv.directory / name) for kind, name in names.items()}

    rotated_value = fresh_value("rotated-new")
    kv.put(names["rotated"], rotated_value)
    kv.emulator.disable_secret(names["disabled"])
    kv.emulator.forbid_secret(names["forbidden"])
    kv.emulator.delete_secret(names["deleted"])
    result = kv.run("once", "--manifest", str(manifest))

    assert result.returncode == 1
    assert (kv.directory / names["rotated"]).read_bytes() == rotated_value.encode()
    for kind in ("disabled", "forbidden", "deleted"):
        assert file_state(kv.directory / names[kind]) == before[kind], kind
    assert len(result.error_lines) == 3, result.stderr
    expected = {
        "disabled": ("disabled", "enable it in the vault"),
        "forbidden": ("403", "Key Vault Secrets User"),
        "deleted": ("not found", "recover a deleted secret"),
    }
    for kind, fragments in expected.items():
        (line,) = [line for line in result.error_lines if f"'{names[kind]}'" in line]
        for fragment in fragments:
            assert fragment in line, line
        assert "left as it was" in line, line


def rotate_through_the_vault_api(emulator: Emulator, name: str, value: str) -> None:
    """PUT a new version over HTTPS, as a user would with curl or an SDK (issue 9 item 24)."""
    SECRET_VALUES.add(value)
    with requests.Session() as client:
        client.trust_env = False
        grant = client.get(emulator.imds_endpoint, headers={"Metadata": "true"}, timeout=5,
                           params={"api-version": IMDS_API_VERSION, "resource": KEYVAULT_AUDIENCE})
        bearer = grant.json()["access_token"]
        TOKENS.add(bearer)
        put = client.put(f"{emulator.vault_url}/secrets/{name}", params={"api-version": "7.6"},
                         json={"value": value}, headers={"Authorization": f"Bearer {bearer}"},
                         verify=emulator.ca_path, timeout=5)
    assert put.status_code == 200, put.status_code


def test_once_picks_up_a_secret_rotated_through_the_vault_api(kv: Harness) -> None:
    """A version written with an HTTP PUT to the emulator is what the next once writes."""
    name = fresh_name("rest-rotated")
    kv.put(name, fresh_value("before"))
    manifest = kv.manifest(entry(name))
    assert kv.run("once", "--manifest", str(manifest)).returncode == 0

    rotated = fresh_value("after")
    rotate_through_the_vault_api(kv.emulator, name, rotated)
    result = kv.run("once", "--manifest", str(manifest))

    assert result.returncode == 0, result.stderr
    assert (kv.directory / name).read_bytes() == rotated.encode()


def test_once_with_plain_secrets_loads_no_certificate_or_select_code(kv: Harness) -> None:
    """`kv-agent once` with plain secrets imports neither the certificate nor the select:
    code, nor cryptography (issue 17, item 21: it costs start-up time and RSS)."""
    name = fresh_name("plain-only")
    kv.put(name, fresh_value("plain"))
    manifest = kv.manifest(entry(name))
    done = subprocess.run([sys.executable, "-c", REPORT_MODULES + AGENT_MAIN, "-q", "once",
                           "--manifest", str(manifest)], env=kv.env(), cwd=REPO,
                          capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False)
    OUTPUTS.append(done.stdout + done.stderr)
    assert done.returncode == 0, done.stderr
    loaded = loaded_modules(done.stdout)
    assert {"agent.sync.sync", "agent.writer", "requests"} <= set(loaded)
    assert [module for module in loaded if module.split(".")[0] == "cryptography"
            or module in FEATURE_MODULES] == []


def test_run_picks_up_a_secret_rotated_through_the_vault_api(kv: Harness) -> None:
    """A running agent writes a version PUT over HTTP at its next refresh."""
    name = fresh_name("rest-running")
    first = fresh_value("first")
    kv.put(name, first)
    manifest = kv.manifest(entry(name), header="refresh: 1s\nrefresh_jitter: 0%\n")
    target = kv.directory / name
    agent = AgentProcess(["run", "--manifest", str(manifest)], kv.env())
    try:
        wait_for(lambda: target.exists() and target.read_bytes() == first.encode(), 20,
                 "the first write", lambda: agent.stderr)
        rotated = fresh_value("rotated")
        rotate_through_the_vault_api(kv.emulator, name, rotated)
        wait_for(lambda: target.read_bytes() == rotated.encode(), 20,
                 "the rotated value", lambda: agent.stderr)
        code, _ = agent.stop()
    finally:
        agent.kill()
    OUTPUTS.append(agent.stdout + agent.stderr)
    assert code == 0
    assert_no_leak(agent.stdout + agent.stderr)


def test_once_with_debug_on_failures_prints_no_value_or_token(kv: Harness) -> None:
    """With --debug, failing secrets are named but no value, token or traceback is printed."""

    good, missing, forbidden = fresh_name("good"), fresh_name("missing"), fresh_name("denied")
    kv.put(good, fresh_value("good"))
    kv.put(forbidden, fresh_value("denied"))
    kv.emulator.forbid_secret(forbidden, "ForbiddenByRbac")
    manifest = kv.manifest(entry(good) + entry(missing) + entry(forbidden))

    result = kv.run("--debug", "once", "--manifest", str(manifest))

    assert result.returncode == 1
    assert "Traceback" not in result.output
    assert (kv.directory / good).exists()
    assert not (kv.directory / missing).exists()
    assert {name for name in (missing, forbidden)
            if any(f"'{name}'" in line for line in result.error_lines)} == {missing, forbidden}


def test_once_reports_optional_failures_but_exits_zero(kv: Harness) -> None:
    """A missing optional secret is reported on stderr as a warning and the run exits 0."""
    present, absent = fresh_name("present"), fresh_name("absent")
    kv.put(present, fresh_value("present"))
    manifest = kv.manifest(entry(present) + entry(absent, optional="true"))

    result = kv.run("once", "--manifest", str(manifest))

    assert result.returncode == 0, result.stderr
    assert result.error_lines == []
    assert any("warning" in line and f"'{absent}'" in line for line in result.stderr.splitlines())
    assert (kv.directory / present).exists()
    assert not (kv.directory / absent).exists()


def test_once_write_failure_fails_only_that_secret(kv: Harness) -> None:
    """A target path occupied by a directory fails that secret with exit 1 while the others are
    written."""
    blocked, fine = fresh_name("blocked"), fresh_name("fine")
    kv.put(blocked, fresh_value("blocked"))
    kv.put(fine, fresh_value("fine"))
    (kv.directory / blocked).mkdir(parents=True)
    manifest = kv.manifest(entry(blocked) + entry(fine))

    result = kv.run("once", "--manifest", str(manifest))

    assert result.returncode == 1
    assert (kv.directory / blocked).is_dir()
    assert (kv.directory / fine).exists()
    assert len(result.error_lines) == 1 and f"'{blocked}'" in result.error_lines[0], result.stderr


def test_once_many_secrets_make_one_imds_request(kv: Harness) -> None:
    """Thirty secrets cost one IMDS request with api-version, the Key Vault resource and Metadata:
    true, and no Authorization header."""
    names = [fresh_name(f"bulk{index}") for index in range(30)]
    for name in names:
        kv.put(name, fresh_value(name))
    manifest = kv.manifest("".join(entry(name) for name in names))

    result = kv.run("once", "--manifest", str(manifest))

    assert result.returncode == 0, result.stderr
    assert kv.emulator.imds_requests == 1
    (record,) = kv.emulator.imds_log
    assert record.query == {"api-version": IMDS_API_VERSION, "resource": KEYVAULT_AUDIENCE}
    assert record.headers.get("metadata") == "true"
    assert "authorization" not in record.headers
    fetched = {record.path for record in kv.emulator.vault_log if record.status == 200}
    assert fetched == {f"/secrets/{name}" for name in names}
    assert all((kv.directory / name).exists() for name in names)


@pytest.mark.parametrize("selector,param,value", [
    ("client_id", "client_id", USER_ASSIGNED.client_id),
    ("object_id", "object_id", USER_ASSIGNED.object_id),
    ("resource_id", "msi_res_id", USER_ASSIGNED.msi_res_id),
])
def test_once_user_assigned_identity_selects_it_at_imds(
    kv: Harness, selector: str, param: str, value: str
) -> None:
    """The manifest's identity selector becomes the matching IMDS query parameter and the vault
    sees that identity's token."""
    name = fresh_name("uami")
    kv.put(name, fresh_value("uami"))
    manifest = kv.manifest(entry(name), header=f"identity:\n  {selector}: {value}\n")

    result = kv.run("once", "--manifest", str(manifest))

    assert result.returncode == 0, result.stderr
    (record,) = kv.emulator.imds_log
    assert record.query == {"api-version": IMDS_API_VERSION, "resource": KEYVAULT_AUDIENCE,
                            param: value}
    assert "authorization" not in record.headers
    (token,) = tokens_from(kv.emulator)
    assert jwt_claims(token)["appid"] == USER_ASSIGNED.client_id


# ---------------------------------------------------------------------------
# Retries and unavailability


def test_once_retries_imds_500_and_429_then_succeeds(kv: Harness) -> None:
    """IMDS answering 500 and then 429 is retried until it issues a token, and the run (at debug
    level) exits 0."""
    name = fresh_name("imds-retry")
    kv.put(name, fresh_value("imds-retry"))
    kv.emulator.inject_fault("imds", 500)
    kv.emulator.inject_fault("imds", 429)
    manifest = kv.manifest(entry(name))

    result = kv.run("--debug", "once", "--manifest", str(manifest))

    assert result.returncode == 0, result.stderr
    assert [record.status for record in kv.emulator.imds_log] == [500, 429, 200]
    assert (kv.directory / name).exists()


@pytest.mark.parametrize("target", ["challenge", "secret"])
def test_once_honours_vault_retry_after(kv: Harness, target: str) -> None:
    """A vault 429 with Retry-After: 1, on the first (challenge) request or on a secret's GET, is
    waited out and the run succeeds."""
    first, second = fresh_name("ra-first"), fresh_name("ra-second")
    kv.put(first, fresh_value("ra-first"))
    kv.put(second, fresh_value("ra-second"))
    kv.emulator.inject_fault("vault", 429, retry_after="1",
                             path_contains=None if target == "challenge" else second)
    manifest = kv.manifest(entry(first) + entry(second))

    result = kv.run("once", "--manifest", str(manifest))

    assert result.returncode == 0, result.stderr
    assert 429 in [record.status for record in kv.emulator.vault_log]
    assert result.elapsed_s >= 0.95
    assert (kv.directory / first).exists() and (kv.directory / second).exists()


def test_once_sleeps_a_retry_after_past_its_budget_to_the_deadline_then_tries_once_more(
        kv: Harness) -> None:
    """Issue 17 item 9: a 503 whose Retry-After (10 s) outlasts `--retry-for 5` is slept up
    to the budget and the final attempt is made; the vault, back after 3 s, answers it and
    the file is written (it exited 69 at once)."""
    name = fresh_name("ra-past-budget")
    value = fresh_value("ra-past-budget")
    kv.put(name, value)
    manifest = kv.manifest(entry(name))
    kv.emulator.inject_fault("vault", 503, retry_after="10", for_s=3.0, path_contains=name)

    result = kv.run("once", "--retry-for", "5", "--manifest", str(manifest))

    assert result.returncode == 0, result.output
    assert 4.5 <= result.elapsed_s < 15, result.elapsed_s
    statuses = [record.status for record in kv.emulator.vault_log if name in record.path]
    assert statuses.count(503) == 1 and statuses[-1] == 200, statuses  # (a 401: the challenge)
    assert (kv.directory / name).read_text() == value


def test_once_outlasts_a_vault_unavailable_for_most_of_its_budget(kv: Harness) -> None:
    """Issue 17 item 9, as found: 503 with Retry-After: 2 for 9 s and `once --retry-for 15`
    writes the file (it exited 69 after 6.4 s), within the budget plus one final attempt."""
    name = fresh_name("ra-9s")
    value = fresh_value("ra-9s")
    kv.put(name, value)
    manifest = kv.manifest(entry(name))
    kv.emulator.inject_fault("vault", 503, retry_after="2", for_s=9.0)

    result = kv.run("once", "--retry-for", "15", "--manifest", str(manifest))

    assert result.returncode == 0, result.output
    assert 9.0 <= result.elapsed_s < 15 + 5 + 5, result.elapsed_s
    assert (kv.directory / name).read_text() == value


def test_once_unknown_user_assigned_identity_fails_clearly_and_touches_nothing(
    kv: Harness,
) -> None:
    """IMDS refusing an identity that is not assigned exits 69 with how to assign it and leaves
    every file as it was."""
    name = fresh_name("assigned")
    kv.put(name, fresh_value("assigned"))
    good = kv.manifest(entry(name, mode='"0440"'))
    assert kv.run("once", "--manifest", str(good)).returncode == 0
    before = file_state(kv.directory / name)
    kv.put(name, fresh_value("assigned-rotated"))
    unknown = "99999999-9999-4999-8999-999999999999"
    manifest = kv.manifest(entry(name, mode='"0440"'), filename="unassigned.yaml",
                           header=f"identity:\n  client_id: {unknown}\n")
    kv.emulator.reset_stats()

    result = kv.run("once", "--manifest", str(manifest))

    assert result.returncode == 69
    assert [record.status for record in kv.emulator.imds_log] == [400]
    assert kv.emulator.imds_log[0].query.get("client_id") == unknown
    assert len(result.error_lines) == 1, result.stderr
    assert unknown in result.stderr and "az vm identity assign" in result.stderr
    assert file_state(kv.directory / name) == before


def test_once_system_identity_refused_by_imds_exits_69(kv: Harness) -> None:
    """IMDS answering 400 for the system-assigned identity exits 69 with how to enable it, also
    with --debug."""
    name = fresh_name("system")
    kv.put(name, fresh_value("system"))
    manifest = kv.manifest(entry(name))

    for prefix in ((), ("--debug",)):
        kv.emulator.inject_fault("imds", 400)
        result = kv.run(*prefix, "once", "--manifest", str(manifest))

        assert result.returncode == 69
        (line,) = result.error_lines
        assert "system-assigned identity" in line and "az vm identity assign" in line
        assert not (kv.directory / name).exists()


def test_once_unreachable_imds_gives_up_after_retry_for(kv: Harness) -> None:
    """IMDS on a closed loopback port with --retry-for 1 exits 69 within seconds, saying IMDS did
    not answer."""
    name = fresh_name("no-imds")
    kv.put(name, fresh_value("no-imds"))
    manifest = kv.manifest(entry(name))
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}/metadata/identity/oauth2/token"

    result = kv.run("once", "--retry-for", "1", "--manifest", str(manifest),
                    env=kv.env(KV_AGENT_IMDS_ENDPOINT=endpoint))

    assert result.returncode == 69
    assert result.elapsed_s < 10
    assert len(result.error_lines) == 1, result.stderr
    assert "IMDS" in result.error_lines[0] and "connection refused" in result.error_lines[0]
    assert kv.emulator.imds_requests == 0
    assert not (kv.directory / name).exists()


# ---------------------------------------------------------------------------
# check and --manifest


def test_check_valid_manifest_exits_zero_without_network(kv: Harness) -> None:
    """check accepts a valid manifest, exits 0 and makes no request at all."""
    names = [fresh_name("checked") for _ in range(3)]
    manifest = kv.manifest("".join(entry(name, owner="1234", mode='"0440"') for name in names))

    result = kv.run("check", "--manifest", str(manifest))

    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout and "3 secrets" in result.stdout
    assert (kv.emulator.imds_requests, kv.emulator.vault_requests) == (0, 0)
    assert not kv.directory.exists()


def test_check_counts_the_credentials_it_would_serve(kv: Harness) -> None:
    """check prints one line: how many credentials for how many unit patterns (issue 19)."""
    manifest = kv.manifest(
        "  - name: cred-a\n    credential: {units: [app.service, 'worker@*.service']}\n"
        "  - name: cred-b\n    path: b\n    credential: {id: b, units: [app.service]}\n")

    result = kv.run("check", "--manifest", str(manifest))

    assert result.returncode == 0, result.stderr
    assert f"{manifest}: credentials: 2 credentials for 2 unit patterns, served by kv-agent " \
        "run" in result.stdout.splitlines()
    plain = kv.run("check", "--manifest", str(kv.manifest(entry("plain"), filename="p.yaml")))
    assert "credentials" not in plain.stdout


def test_once_fetches_a_credential_only_entry_says_run_serves_it_and_writes_no_file(
        kv: Harness) -> None:
    """once has no socket: a credential-only entry is fetched and checked, reported as served
    by kv-agent run only, and leaves no file; a missing one fails the run as any entry does."""
    name, other = fresh_name("cred-once"), fresh_name("cred-file")
    kv.put(name, fresh_value("cred-once"))
    kv.put(other, fresh_value("cred-file"))
    manifest = kv.manifest(f"  - name: {name}\n    credential: {{units: [app.service]}}\n"
                           f"  - name: {other}\n    path: f\n"
                           f"    credential: {{id: f, units: [app.service]}}\n")

    result = kv.run("once", "--manifest", str(manifest))

    assert result.returncode == 0, result.stderr
    assert f"secret '{name}': credential:app.service/{name} fetched and checked; a credential " \
        "is served by kv-agent run only, and this entry writes no file" in result.stderr
    assert f"secret '{other}': credential:app.service/f fetched and checked; a credential " \
        "is served by kv-agent run only\n" in result.stderr
    assert "2 secrets: 1 written, 0 unchanged, 0 failed, 1 credential only" in result.stderr
    assert sorted(path.name for path in kv.directory.iterdir()) == ["f"]

    missing = kv.run("once", "--manifest", str(kv.manifest(
        f"  - name: {fresh_name('cred-none')}\n    credential: {{units: [app.service]}}\n",
        filename="missing.yaml")))
    assert missing.returncode == 1
    assert "left as it was]" in missing.error_lines[0] and "credential:app.service/" in \
        missing.error_lines[0]


def test_manifest_defaults_to_kv_agent_manifest_variable(kv: Harness) -> None:
    """Without --manifest, check and once use the manifest named by KV_AGENT_MANIFEST."""
    name = fresh_name("from-env")
    value = fresh_value("from-env")
    kv.put(name, value)
    manifest = kv.manifest(entry(name))
    env = kv.env(KV_AGENT_MANIFEST=str(manifest))

    checked = kv.run("check", env=env)
    synced = kv.run("once", env=env)

    assert checked.returncode == 0, checked.stderr
    assert str(manifest) in checked.stdout
    assert synced.returncode == 0, synced.stderr
    assert (kv.directory / name).read_bytes() == value.encode()


# Each case: (manifest text after the vault line, the line's marker, the key, the words).
INVALID_MANIFESTS = {
    "unknown-key": ("directory: {directory}\nsecrest:\n  - name: one\n",
                    "secrest:", "secrest", ("unknown key", "did you mean 'secrets'?")),
    "unquoted-mode": ("directory: {directory}\nsecrets:\n  - name: one\n    mode: 0440\n",
                      "mode: 0440", "secrets[0].mode",
                      ('0440 must be a quoted octal string; write mode: "0440"',)),
    "path-escapes": ("directory: {directory}\nsecrets:\n  - name: one\n    path: ../escaped\n",
                     "path: ../escaped", "secrets[0].path",
                     ("'../escaped' contains '..'", "inside")),
    "absolute-path-outside": (("directory: {directory}\nsecrets:\n  - name: one\n"
                               "    path: /etc/kv-agent-escaped\n"),
                              "path: /etc/kv-agent-escaped", "secrets[0].path",
                              ("is outside", "use a path inside it")),
    "unknown-user": (("directory: {directory}\nsecrets:\n  - name: one\n"
                      "    owner: kv-agent-no-such-user\n"),
                     "owner: kv-agent-no-such-user", "secrets[0].owner",
                     ("unknown user 'kv-agent-no-such-user'", "useradd", "numeric id")),
}


@pytest.mark.parametrize("case", sorted(INVALID_MANIFESTS))
def test_invalid_manifest_is_refused_by_check_and_once_with_file_line_key_and_fix(
    kv: Harness, case: str
) -> None:
    """check and once refuse an invalid manifest with exit 78 and a line naming file, line, key and
    fix, making no request."""
    template, marker, key, words = INVALID_MANIFESTS[case]
    text = f"vault: {kv.emulator.vault_url}\n" + template.format(directory=kv.directory)
    manifest = write_private(kv.root / "manifest.yaml", text)
    prefix = f"kv-agent: error: {manifest}:{line_of(text, marker)}: {key}: "

    for command in ("check", "once"):
        result = kv.run(command, "--manifest", str(manifest))

        assert result.returncode == 78, (command, result.stderr)
        (line,) = [line for line in result.error_lines if line.startswith(prefix)]
        for word in words:
            assert word in line, line
    assert (kv.emulator.imds_requests, kv.emulator.vault_requests) == (0, 0)
    assert not kv.directory.exists()


def test_missing_manifest_is_refused_by_check_and_once(kv: Harness) -> None:
    """A manifest path that does not exist gives exit 78 and one line saying so, with no request."""
    missing = kv.root / "absent.yaml"

    for command in ("check", "once"):
        result = kv.run(command, "--manifest", str(missing))

        assert result.returncode == 78, result.stderr
        (line,) = result.error_lines
        assert f"{missing}: no such file" in line
    assert (kv.emulator.imds_requests, kv.emulator.vault_requests) == (0, 0)


def test_http_vault_is_refused_with_its_line(kv: Harness) -> None:
    """A plain-http vault URL is refused by check with exit 78, naming the vault key and https."""
    text = (f"directory: {kv.directory}\n"
            f"vault: http://127.0.0.1:{kv.emulator.vault_url.rsplit(':', 1)[1]}\n"
            "secrets:\n  - name: one\n")
    manifest = write_private(kv.root / "manifest.yaml", text)

    result = kv.run("check", "--manifest", str(manifest))

    assert result.returncode == 78
    (line,) = result.error_lines
    assert line.startswith(f"kv-agent: error: {manifest}:2: vault: "), line
    assert "is not https" in line and "https://" in line.split("is not https", 1)[1]
    assert (kv.emulator.imds_requests, kv.emulator.vault_requests) == (0, 0)


def test_group_writable_manifest_is_refused(kv: Harness) -> None:
    """A manifest writable by its group is refused by check and once with exit 78 and the chmod
    fix."""
    manifest = kv.manifest(entry(fresh_name("unsafe")), mode=0o620)

    for command in ("check", "once"):
        result = kv.run(command, "--manifest", str(manifest))

        assert result.returncode == 78, result.stderr
        (line,) = result.error_lines
        assert str(manifest) in line and "writable by group or others" in line
        assert f"chmod go-w {manifest}" in line
    assert (kv.emulator.imds_requests, kv.emulator.vault_requests) == (0, 0)


def test_non_tmpfs_directory_is_refused_with_exit_73(kv: Harness, tmp_path: Path) -> None:
    """check and once refuse an output directory that is not on tmpfs with exit 73, making no
    request."""
    directory = tmp_path / "not-tmpfs" / "secrets"
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if filesystem_type(fd) in MEMORY_FILESYSTEMS:
            pytest.skip(f"{tmp_path} is on a memory file system here")
    finally:
        os.close(fd)
    manifest = kv.manifest(entry(fresh_name("disk")), directory=directory)

    for command in ("check", "once"):
        result = kv.run(command, "--manifest", str(manifest))

        assert result.returncode == 73, (command, result.stderr)
        assert len(result.error_lines) == 1, result.stderr
        assert "tmpfs" in result.error_lines[0]
        if command == "check":
            assert not directory.exists(), "check created the directory"
    assert (kv.emulator.imds_requests, kv.emulator.vault_requests) == (0, 0)
    # once's Writer.prepare() makes the (empty) root before refusing it; no file lands.
    assert not directory.exists() or not any(directory.iterdir())


# ---------------------------------------------------------------------------
# emulator and demo commands


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_emulator_command_serves_once_and_stops_cleanly_on_signal(
    kv: Harness, signum: signal.Signals
) -> None:
    """kv-agent emulator prints its endpoints and CA, serves a real once run, and exits 0 on the
    signal."""
    name, value = fresh_name("served"), fresh_value("served")
    SECRET_VALUES.add(value)
    secrets_file = write_private(kv.root / "secrets.yaml", f"{name}: {json.dumps(value)}\n")
    with emulator_command(secrets_file, env=base_environ(),
                          on_line=OUTPUTS.append) as (process, banner):
        assert set(banner) == {"imds", "vault", "ca"}, banner
        assert banner["imds"].startswith("http://127.0.0.1:")
        assert banner["vault"].startswith("https://127.0.0.1:")
        assert os.path.exists(banner["ca"])
        manifest = write_private(kv.root / "manifest.yaml",
                                 f"vault: {banner['vault']}\ndirectory: {kv.directory}\n"
                                 f"secrets:\n{entry(name)}")
        env = kv.env(KV_AGENT_IMDS_ENDPOINT=banner["imds"], REQUESTS_CA_BUNDLE=banner["ca"])

        result = kv.run("once", "--manifest", str(manifest), env=env)

        assert result.returncode == 0, result.stderr
        assert (kv.directory / name).read_bytes() == value.encode()
        process.send_signal(signum)
        assert process.wait(timeout=15) == 0
        assert process.stderr is not None
        errors = process.stderr.read()
        OUTPUTS.append(errors)
        assert_no_leak(errors)
        assert not os.path.exists(banner["ca"]), "the generated CA was not removed"


def test_emulator_command_says_ready_to_systemd_once_it_serves(kv: Harness,
                                                              tmp_path: Path) -> None:
    """Under systemd (NOTIFY_SOCKET, as kv-agent-emulator.service runs it) the emulator
    sends READY=1 after its listeners are bound and its CA is written, so units ordered
    after it find both."""
    from daemon_harness import NotifySocket, wait_for

    secrets_file = write_private(kv.root / "secrets.yaml", "ready-check: value\n")
    directory = Path(tempfile.mkdtemp(prefix="kvn-", dir="/tmp"))  # sun_path is short
    notify = NotifySocket(str(directory / "notify"))
    seen_ca: List[bool] = []
    notify.on_datagram(lambda message: seen_ca.append(
        message.has("READY", "1") and (tmp_path / "certs" / "ca.pem").is_file()))
    try:
        with emulator_command(secrets_file, "--cert-dir", str(tmp_path / "certs"),
                              env={**base_environ(), "NOTIFY_SOCKET": notify.path}
                              ) as (process, banner):
            ready = wait_for(lambda: notify.with_key("READY", "1"), 15, "READY=1")
            assert seen_ca == [True], notify.describe()
            assert banner["vault"] in ready[0].fields["STATUS"]
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=15) == 0
    finally:
        notify.close()
        directory.rmdir()


def test_emulator_command_serves_declared_identities_and_empty_pages(kv: Harness) -> None:
    """A secrets file with secrets: and identities: gives kv-agent emulator a user-assigned
    identity that once selects by client_id, and --empty-pages serves lists with empty pages."""
    name, value = fresh_name("declared"), fresh_value("declared")
    SECRET_VALUES.add(value)
    client_id = "5e1f0a2b-3c4d-4e5f-8a6b-7c8d9e0f1a2b"
    secrets_file = write_private(
        kv.root / "secrets.yaml",
        f"secrets:\n  {name}: {json.dumps(value)}\n"
        f"identities:\n  system_assigned: false\n  user_assigned:\n"
        f"    - client_id: {client_id}\n")
    with emulator_command(secrets_file, "--empty-pages", env=base_environ(),
                          on_line=OUTPUTS.append) as (process, banner):
        manifest = write_private(kv.root / "manifest.yaml",
                                 f"vault: {banner['vault']}\ndirectory: {kv.directory}\n"
                                 f"identity:\n  client_id: {client_id}\n"
                                 f"secrets:\n{entry(name)}")
        env = kv.env(KV_AGENT_IMDS_ENDPOINT=banner["imds"], REQUESTS_CA_BUNDLE=banner["ca"])

        result = kv.run("once", "--manifest", str(manifest), env=env)

        assert result.returncode == 0, result.stderr
        assert (kv.directory / name).read_bytes() == value.encode()
        with requests.Session() as client:
            client.trust_env = False
            grant = client.get(banner["imds"], headers={"Metadata": "true"}, timeout=5,
                               params={"api-version": IMDS_API_VERSION,
                                       "resource": KEYVAULT_AUDIENCE, "client_id": client_id})
            TOKENS.add(grant.json()["access_token"])
            page = client.get(f"{banner['vault']}/secrets", params={"api-version": "7.6"},
                              headers={"Authorization": f"Bearer {grant.json()['access_token']}"},
                              verify=banner["ca"], timeout=5).json()
        assert page["value"] == [] and page["nextLink"] is not None
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0


def exported(lines: List[str], heading: str) -> Dict[str, str]:
    """The NAME=value pairs the banner's block under ``heading`` tells a user to
    export, up to its ``kv-agent once`` line."""
    start = next(index for index, line in enumerate(lines) if line.startswith(heading))
    pairs: Dict[str, str] = {}
    for line in lines[start + 1:]:
        pairs.update(word.split("=", 1) for word in line.split() if re.match(r"[A-Z_]+=", word))
        if "kv-agent once" in line:
            return pairs
    raise AssertionError(f"no 'kv-agent once' line under {heading!r}: {lines}")


def test_emulator_command_serves_azure_arc(kv: Harness, tmp_path: Path) -> None:
    """kv-agent emulator --arc-port --arc-tokens-dir serves HIMDS on its own port and
    prints the environment an Arc server sets; kv-agent once, given exactly that
    environment and identity source auto, picks Arc, answers the key-file challenge
    and writes the secret, printing neither the key nor the token."""
    name, value = fresh_name("arccli"), fresh_value("arccli")
    SECRET_VALUES.add(value)
    secrets_file = write_private(kv.root / "secrets.yaml", f"{name}: {json.dumps(value)}\n")
    tokens_dir = tmp_path / "tokens"
    lines: List[str] = []
    with emulator_command(secrets_file, "--arc-port", "0", "--arc-tokens-dir", str(tokens_dir),
                          env=base_environ(), on_line=lines.append) as (process, banner):
        arc = exported(lines, "Azure Arc (HIMDS):")
        assert set(arc) == {"IDENTITY_ENDPOINT", "IMDS_ENDPOINT", "KV_AGENT_ARC_TOKENS_DIR",
                            "REQUESTS_CA_BUNDLE"}, lines
        assert arc["IDENTITY_ENDPOINT"] == arc["IMDS_ENDPOINT"] + "/metadata/identity/oauth2/token"
        assert arc["IMDS_ENDPOINT"] != banner["imds"].rsplit("/metadata", 1)[0]  # its own port
        assert arc["KV_AGENT_ARC_TOKENS_DIR"] == str(tokens_dir)
        # The SDKs read key files only in the real directory (issue 17 item 19).
        assert any("SDKs" in line and "--arc-tokens-dir /var/opt/azcmagent/tokens" in line
                   for line in lines), lines
        manifest = write_private(kv.root / "manifest.yaml",
                                 f"vault: {banner['vault']}\ndirectory: {kv.directory}\n"
                                 f"secrets:\n{entry(name)}")
        env = kv.env(**arc)
        del env["KV_AGENT_IMDS_ENDPOINT"]

        result = kv.run("once", "--manifest", str(manifest), env=env)

        assert result.returncode == 0, result.stderr
        assert (kv.directory / name).read_bytes() == value.encode()
        assert result.output.count("identity source: arc (IDENTITY_ENDPOINT") == 1
        keys = [path.read_text() for path in tokens_dir.iterdir()]
        assert len(keys) == 1 and all(path.name.endswith(".key") for path in tokens_dir.iterdir())
        assert_no_leak(result.output)
        secrecy.assert_no_leak(result.output, keys, TOKENS)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0


def test_emulator_command_serves_app_service(kv: Harness) -> None:
    """kv-agent emulator --app-service-port --identity-header serves App Service's
    endpoint on its own port and prints IDENTITY_ENDPOINT and IDENTITY_HEADER;
    kv-agent once with identity source app-service and that environment writes the
    secret; the header never appears in the agent's output."""
    name, value = fresh_name("appcli"), fresh_value("appcli")
    SECRET_VALUES.add(value)
    secrets_file = write_private(kv.root / "secrets.yaml", f"{name}: {json.dumps(value)}\n")
    header = "hdr-" + secrets.token_hex(12)
    lines: List[str] = []
    with emulator_command(secrets_file, "--app-service-port", "0", "--identity-header", header,
                          env=base_environ(), on_line=lines.append) as (process, banner):
        app = exported(lines, "App Service:")
        assert set(app) == {"IDENTITY_ENDPOINT", "IDENTITY_HEADER", "REQUESTS_CA_BUNDLE"}, lines
        assert app["IDENTITY_HEADER"] == header and app["IDENTITY_ENDPOINT"].endswith("/MSI/token")
        manifest = write_private(kv.root / "manifest.yaml",
                                 f"vault: {banner['vault']}\ndirectory: {kv.directory}\n"
                                 f"identity:\n  source: app-service\nsecrets:\n{entry(name)}")
        env = kv.env(**app)
        del env["KV_AGENT_IMDS_ENDPOINT"]

        result = kv.run("once", "--manifest", str(manifest), env=env)

        assert result.returncode == 0, result.stderr
        assert (kv.directory / name).read_bytes() == value.encode()
        assert result.output.count("identity source: app-service (identity.source") == 1
        assert header not in result.output
        assert_no_leak(result.output)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0


@pytest.mark.parametrize("argv", [["--arc-tokens-dir", "/tmp/x"], ["--identity-header", "h"]],
                         ids=["arc-tokens-dir", "identity-header"])
def test_emulator_command_option_needs_its_port(kv: Harness, argv: List[str]) -> None:
    """--arc-tokens-dir without --arc-port, or --identity-header without
    --app-service-port, is a usage error (2) naming both options."""
    result = kv.run("emulator", "--secrets", "/dev/null", *argv)
    assert result.returncode == 2
    assert f"{argv[0]} needs --" in result.stderr and "Traceback" not in result.output


def test_demo_exits_zero_and_prints_no_secret_value(kv: Harness) -> None:
    """kv-agent demo in a new tmpfs directory exits 0 and prints no secret value."""
    SECRET_VALUES.update(DEMO_SECRETS.values())
    SECRET_VALUES.add("demo-only-rotated-value")
    directory = kv.root / "demo"

    result = kv.run("demo", "--directory", str(directory))

    assert result.returncode == 0, result.output
    assert "kv-agent demo: done" in result.stdout
    assert "UNEXPECTED" not in result.stdout
    assert (directory / "secrets" / "db-password").read_bytes() == b"demo-only-rotated-value"


# ---------------------------------------------------------------------------
# Issue 9: untrusted network input


@pytest.mark.parametrize("vault", [
    "https://evil.example\\.vault.azure.net",
    "https://evil.example;.vault.azure.net",
    "https://evil.example%23.vault.azure.net",
    "https://evil.example@contoso.vault.azure.net",
    "https://evil.example\t.vault.azure.net",
    "https://127.1",
])
def test_check_refuses_vault_hosts_the_http_library_reads_differently(
    kv: Harness, vault: str
) -> None:
    """Item 1: a vault host with '\\', ';', '%', '@', whitespace or a non-canonical address is a
    manifest error (exit 78) naming the line and the fix."""
    manifest = write_private(kv.root / "m.yaml", (
        f"vault: {json.dumps(vault)}\ndirectory: {kv.directory}\nsecrets:\n  - name: x\n"))

    result = kv.run("check", "--manifest", str(manifest))

    assert result.returncode == 78, result.output
    assert len(result.error_lines) == 1, result.stderr
    assert ":1: vault:" in result.error_lines[0]
    assert "vault.azure.net" in result.error_lines[0]


def test_once_never_sends_the_token_to_a_host_behind_a_backslash(kv: Harness) -> None:
    """Item 1: with vault 'https://IP\\.vault.azure.net' (urllib3 connects to IP:443), `once`
    exits 78 and the hostile TLS server there never receives an Authorization header."""
    name = fresh_name("hostile")
    body = json.dumps({"value": "planted-by-evil", "id": f"https://x/secrets/{name}/1"}).encode()
    try:
        server, ip = loopback_443_server(answer(hostile_response(200, body)))
    except PermissionError:
        pytest.skip("binding port 443 on loopback needs root")
    manifest = write_private(kv.root / "m.yaml", (
        f"vault: 'https://{ip}\\.vault.azure.net'\ndirectory: {kv.directory}\n"
        f"secrets:\n  - name: {name}\n"))
    with server:
        result = kv.run("once", "--manifest", str(manifest),
                        env=kv.env(REQUESTS_CA_BUNDLE=server.ca_path))
    assert result.returncode == 78, result.output
    assert not server.saw_authorization and server.connections == 0
    assert kv.emulator.imds_requests == 0
    assert not (kv.directory / name).exists()


def test_once_malformed_answers_fail_only_their_secret(kv: Harness) -> None:
    """Item 3: a lone surrogate in a value, deep JSON in a 200 and an error body, and a
    non-object body each fail their own secret (exit 1, no traceback); the good one is written."""
    good = fresh_name("good")
    kv.put(good, fresh_value("good"))
    bad = {fresh_name("surrogate"): (200, b'{"value": "ab\\ud800cd", "id": "https://x/s/1"}'),
           fresh_name("deep"): (200, b"[" * 100_000 + b"]" * 100_000),
           fresh_name("deep-error"): (400, b'{"error": ' + b"[" * 100_000 + b"]" * 100_000
                                      + b"}"),
           fresh_name("list"): (200, b'["value"]')}
    for name, (status, body) in bad.items():
        kv.put(name, fresh_value(name))
        kv.emulator.inject_fault("vault", status, body=body, path_contains=name, count=100)
    manifest = kv.manifest(entry(good) + "".join(entry(name) for name in bad))

    result = kv.run("once", "--manifest", str(manifest))

    assert result.returncode == 1, result.output
    assert (kv.directory / good).exists()
    assert len(result.error_lines) == len(bad), result.stderr
    for name in bad:
        assert any(f"'{name}'" in line for line in result.error_lines)
        assert not (kv.directory / name).exists()
    assert "\\ud800" not in result.stderr


FORGED = "\n kv-agent: error: forged\x1b[31mRED\x1b[0m\u202e"


def test_vault_and_imds_text_cannot_forge_log_lines(kv: Harness) -> None:
    """Item 7: a version (from the id) and error texts holding a newline, a fake
    'kv-agent: error:' line and ANSI escapes reach stderr escaped: no forged line, no ESC."""
    first, forged_id, forged_error = (fresh_name("plain"), fresh_name("forged-id"),
                                      fresh_name("forged-error"))
    for name in (first, forged_id, forged_error):
        kv.put(name, fresh_value(name))
    kv.emulator.inject_fault("vault", 200, path_contains=forged_id, body=json.dumps(
        {"value": "v", "id": f"https://x/secrets/{forged_id}/1{FORGED}"}).encode())
    kv.emulator.inject_fault("vault", 400, path_contains=forged_error, body=json.dumps(
        {"error": {"code": f"Bad{FORGED}", "message": f"\x1b[2Jboom{FORGED}"}}).encode())
    manifest = kv.manifest(entry(first) + entry(forged_id) + entry(forged_error))

    vault_run = kv.run("once", "--manifest", str(manifest))
    kv.emulator.inject_fault("imds", 400, body=json.dumps(
        {"error": "invalid_request", "error_description": f"nope{FORGED}"}).encode())
    imds_run = kv.run("once", "--manifest", str(manifest))

    assert vault_run.returncode == 1 and imds_run.returncode == 69
    for run in (vault_run, imds_run):
        assert "\x1b" not in run.stderr and "\u202e" not in run.stderr
        lines = run.stderr.splitlines()
        assert not [line for line in lines if re.match(r"\s*kv-agent: error: forged", line)]
        assert all(line.startswith("kv-agent: ") for line in lines), run.stderr
    assert "\\x1b" in vault_run.stderr and "\\x1b" in imds_run.stderr


def test_log_formatter_never_starts_a_forged_line() -> None:
    """Item 7, defence in depth: whatever a log record holds, every continuation line is
    indented and control characters are escaped."""
    from agent.base.logs import LineFormatter

    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "text%s", (FORGED,), None)
    for journal in (False, True):
        lines = LineFormatter(journal).format(record).split("\n")
        assert lines[0] in ("kv-agent: error: text", "<3>error: text")
        assert all(line.startswith(("  ", "<3>  ")) for line in lines[1:])
        assert "\x1b" not in "".join(lines) and "\u202e" not in "".join(lines)


def test_once_retry_for_10_ends_despite_a_trickling_vault(kv: Harness) -> None:
    """Item 4: a vault sending one byte every 2 s cannot keep `once --retry-for 10` alive:
    it exits 69 within 25 s, saying the vault was too slow."""
    name = fresh_name("trickle")
    slow = hostile_response(401, b"", {"WWW-Authenticate": 'Bearer resource="https://vault'
                                       '.azure.net"'})
    with HostileServer(trickle(slow, 2.0), give_up_s=55) as server:
        manifest = write_private(kv.root / "m.yaml", (
            f"vault: {server.url}\ndirectory: {kv.directory}\nsecrets:\n  - name: {name}\n"))
        result = kv.run("once", "--retry-for", "10", "--manifest", str(manifest),
                        env=kv.env(REQUESTS_CA_BUNDLE=server.ca_path))
    assert result.returncode == 69, result.output
    assert result.elapsed_s < 25, result.elapsed_s
    (line,) = result.error_lines
    assert "too slow" in line and "no complete answer" in line
    assert not server.saw_authorization


def test_once_429_storm_with_retry_after_zero_is_not_a_hot_loop(kv: Harness) -> None:
    """Item 5: a vault answering every request 429 with Retry-After: 0 (or a past date) gets a
    handful of requests per second, not thousands."""
    name = fresh_name("storm")
    kv.put(name, fresh_value("storm"))
    kv.emulator.inject_fault("vault", 429, retry_after="0", count=20_000, path_contains=name)
    manifest = kv.manifest(entry(name))

    result = kv.run("once", "--retry-for", "4", "--manifest", str(manifest))

    requests_made = kv.emulator.vault_requests
    assert requests_made <= 12, f"{requests_made} requests in {result.elapsed_s:.1f} s"
    assert result.returncode == 1, result.output
    assert "throttled" in result.stderr


def test_once_challenge_failing_with_500_is_unavailable(kv: Harness) -> None:
    """Item 8: 500s on the unauthenticated first request exit 69 (unavailable), not
    'not a Key Vault' with exit 1."""
    name = fresh_name("challenge-500")
    kv.put(name, fresh_value("challenge-500"))
    kv.emulator.inject_fault("vault", 500, count=1000)
    manifest = kv.manifest(entry(name))

    result = kv.run("once", "--retry-for", "2", "--manifest", str(manifest))

    assert result.returncode == 69, result.output
    (line,) = result.error_lines
    assert "kept failing (HTTP 500" in line and "not a Key Vault" not in line


def test_once_missing_ca_bundle_is_a_config_error(kv: Harness) -> None:
    """Item 8: REQUESTS_CA_BUNDLE naming a missing file exits 78 with one line naming the
    variable and the fix, before any request."""
    name = fresh_name("ca")
    manifest = kv.manifest(entry(name))
    missing = str(kv.root / "missing-ca.pem")

    result = kv.run("once", "--manifest", str(manifest), env=kv.env(REQUESTS_CA_BUNDLE=missing))

    assert result.returncode == 78, result.output
    assert result.error_lines == [f"kv-agent: error: REQUESTS_CA_BUNDLE={missing} does not "
                                  "exist; point REQUESTS_CA_BUNDLE at a PEM CA bundle, or "
                                  "unset it"]
    assert kv.emulator.imds_requests == 0 and kv.emulator.vault_requests == 0


# Proxies: the vault honours them, IMDS never does


class RecordingProxy:
    """A loopback HTTP proxy that records the request line of every request it
    is asked to carry: CONNECT is tunnelled, an absolute-form request (what a
    client sends a proxy for plain http) is forwarded in origin form. Both
    reach only loopback targets, so the proxy is honest but never a way out."""

    def __init__(self) -> None:
        self.requests: List[str] = []
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self._stopped = threading.Event()
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._thread = threading.Thread(target=self._accept, name="proxy", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stopped.set()
        self._thread.join(5)
        self._listener.close()

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except socket.timeout:
                continue
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        with client:
            head = b""
            while b"\r\n\r\n" not in head and len(head) < 65536:
                chunk = client.recv(4096)
                if not chunk:
                    return
                head += chunk
            line, _, rest = head.partition(b"\r\n")
            method, target, version = line.decode("latin-1").split(" ", 2)
            with self._lock:
                self.requests.append(f"{method} {target}")
            if method == "CONNECT":
                host, _, port = target.rpartition(":")
                forward = (host.strip("[]"), int(port))
                client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                first = rest.partition(b"\r\n\r\n")[2]  # the client's first TLS bytes, if any
            else:
                parts = urlsplit(target)
                path = parts.path + (f"?{parts.query}" if parts.query else "")
                forward = (parts.hostname or "", parts.port or 80)
                first = f"{method} {path} {version}\r\n".encode("latin-1") + rest
            if forward[0] not in ("127.0.0.1", "localhost", "::1"):
                return  # the recorded request line fails the test; nothing leaves loopback
            with socket.create_connection(forward, timeout=10) as upstream:
                if first:
                    upstream.sendall(first)
                _pump(client, upstream)


def _pump(a: socket.socket, b: socket.socket) -> None:
    """Copy bytes both ways until either side closes."""
    sockets = [a, b]
    while True:
        readable, _, _ = select.select(sockets, [], [], 10)
        if not readable:
            return
        for source in readable:
            data = source.recv(65536)
            if not data:
                return
            (b if source is a else a).sendall(data)


@pytest.fixture
def proxy() -> Iterator[RecordingProxy]:
    started = RecordingProxy()
    yield started
    started.close()


def test_once_reaches_imds_directly_whatever_the_proxy_variables(
    kv: Harness, proxy: RecordingProxy
) -> None:
    """With http_proxy, https_proxy and all_proxy (both cases) naming a proxy, once reaches IMDS
    directly and only the vault through the proxy (kv-agent(8): proxy variables apply to the vault
    only)."""
    name = fresh_name("proxied")
    value = fresh_value("proxied")
    kv.put(name, value)
    manifest = kv.manifest(entry(name))
    variables = {variable: proxy.url for base in ("http_proxy", "https_proxy", "all_proxy")
                 for variable in (base, base.upper())}

    result = kv.run("once", "--manifest", str(manifest), env=kv.env(**variables))

    imds = urlsplit(kv.emulator.imds_endpoint)
    vault = urlsplit(kv.emulator.vault_url)
    assert not [line for line in proxy.requests if f":{imds.port}" in line], (
        f"IMDS was asked through the proxy: {proxy.requests}")
    assert result.returncode == 0, result.stderr
    assert kv.emulator.imds_requests == 1
    assert proxy.requests and set(proxy.requests) == {f"CONNECT {vault.hostname}:{vault.port}"}
    assert (kv.directory / name).read_bytes() == value.encode()


# ---------------------------------------------------------------------------
# issue 11: encodings, templates and certificates, end to end


def owner_and_mode(path: Path) -> Tuple[int, int, int]:
    """(mode, uid, gid) of ``path``."""
    state = file_state(path)
    return state.mode, state.uid, state.gid


def put_typed(kv: Harness, name: str, value: str, content_type: str) -> str:
    """Store ``value`` with a content type (a certificate's secret, as Key Vault serves it)."""
    SECRET_VALUES.add(value)
    return kv.emulator.set_secret(name, value, content_type=content_type)


def test_once_writes_encodings_and_templates_and_rewrites_a_template_only_on_change(
    kv: Harness
) -> None:
    """base64 and hex values are decoded; env, json and raw templates hold their secrets exactly
    (the env file sourced by sh gives back each value); a re-run touches nothing and a rotated
    input rewrites only the templates that use it."""
    blob = bytes(range(256))
    names = {kind: fresh_name(kind) for kind in ("b64", "hex", "password", "user")}
    kv.put(names["b64"], base64.b64encode(blob).decode())
    kv.put(names["hex"], blob.hex())
    password = fresh_value("pw") + " $HOME `id` \"q\" 'q' \\ \n second line é"
    user = fresh_value("user")
    kv.put(names["password"], password)
    kv.put(names["user"], user)
    body = (entry(names["b64"], path="license.bin", encoding="base64")
            + entry(names["hex"], path="blob.bin", encoding="hex", mode='"0440"', owner="1234")
            + f"  - name: app-env\n    mode: \"0440\"\n    group: \"5678\"\n"
              f"    template:\n      path: app/app.env\n      format: env\n"
              f"      values:\n        DB_PASSWORD: {names['password']}\n"
              f"        DB_USER: {{name: {names['user']}}}\n"
            + f"  - name: app-json\n    template:\n      path: app.json\n      format: json\n"
              f"      values: {{user: {names['user']}}}\n"
            + f"  - name: app-raw\n    template:\n      path: app.raw\n      format: raw\n"
              f"      values: {{a: {names['user']}, b: {names['password']}}}\n")
    manifest = kv.manifest(body)

    first = kv.run("once", "--manifest", str(manifest))

    assert first.returncode == 0, first.stderr
    directory = kv.directory
    assert (directory / "license.bin").read_bytes() == blob
    assert owner_and_mode(directory / "blob.bin") == (0o440, 1234, 0)
    assert (directory / "blob.bin").read_bytes() == blob
    env = directory / "app" / "app.env"
    assert owner_and_mode(env) == (0o440, 0, 5678)
    for variable, value in (("DB_PASSWORD", password), ("DB_USER", user)):
        done = subprocess.run(["sh", "-c", f'. ./app.env; printf %s "${variable}"'],
                              cwd=env.parent, capture_output=True, timeout=10, check=True)
        assert done.stdout.decode() == value
    assert json.loads((directory / "app.json").read_bytes()) == {"user": user}
    assert (directory / "app.raw").read_bytes() == (user + password).encode()
    paths = [directory / p for p in ("license.bin", "blob.bin", "app/app.env", "app.json",
                                     "app.raw")]
    before = {path: file_state(path) for path in paths}

    again = kv.run("once", "--manifest", str(manifest))
    assert again.returncode == 0, again.stderr
    assert {path: file_state(path) for path in paths} == before

    kv.put(names["password"], fresh_value("pw-rotated"))
    rotated = kv.run("once", "--manifest", str(manifest))
    assert rotated.returncode == 0, rotated.stderr
    changed = {path.name for path in paths if file_state(path) != before[path]}
    assert changed == {"app.env", "app.raw"}


def test_once_bad_encoding_and_env_value_fail_only_their_entry(kv: Harness) -> None:
    """A value that is not base64 fails its entry, and the template using it, each with one line
    naming the secret; the other files are written and the run exits 1."""
    bad, good = fresh_name("notb64"), fresh_name("fine")
    kv.put(bad, fresh_value("not base64 at all!"))
    kv.put(good, fresh_value("fine"))
    manifest = kv.manifest(entry(bad, encoding="base64") + entry(good)
                           + f"  - name: env\n    template: {{path: app.env, values: "
                             f"{{X: {{name: {bad}, encoding: base64}}}}}}\n")

    result = kv.run("once", "--manifest", str(manifest))

    assert result.returncode == 1
    assert (kv.directory / good).exists()
    assert not (kv.directory / bad).exists() and not (kv.directory / "app.env").exists()
    assert len(result.error_lines) == 2, result.stderr
    assert all(f"secret '{bad}': the value is not valid base64" in line
               for line in result.error_lines)


@pytest.mark.parametrize("source", ["pfx", "pem"])
def test_once_splits_a_certificate_into_its_files_with_owners_and_modes(
    kv: Harness, source: str
) -> None:
    """A PKCS#12 or PEM certificate secret becomes key, cert, chain, fullchain and pfx files, each
    with its owner and mode, which openssl reads and verifies against the root."""
    certs = pytest.importorskip("certs")
    pki = certs.make_pki("ec" if source == "pem" else "rsa")
    name = fresh_name("web-tls")
    if source == "pfx":
        put_typed(kv, name, pki.pfx(), certs.PKCS12)
    else:
        put_typed(kv, name, pki.pem(order=[3, 0, 2, 1]), certs.PEM)
    manifest = kv.manifest(
        f"  - name: {name}\n    owner: \"1234\"\n    group: \"5678\"\n    mode: \"0440\"\n"
        f"    certificate:\n      key: web/tls.key\n"
        f"      cert: {{path: web/tls.crt, mode: \"0444\"}}\n      chain: web/chain.pem\n"
        f"      fullchain: {{path: web/fullchain.pem, owner: \"0\", mode: \"0444\"}}\n"
        f"      pfx: web/tls.pfx\n")

    checked = kv.run("check", "--manifest", str(manifest))
    assert checked.returncode == 0 and "OK: 1 secret" in checked.stdout
    assert "in 1 set" in checked.stdout
    result = kv.run("once", "--manifest", str(manifest))

    assert result.returncode == 0, result.stderr
    web = kv.directory / "web"
    expected = {"tls.key": (0o440, 1234, 5678), "tls.crt": (0o444, 1234, 5678),
                "chain.pem": (0o440, 1234, 5678), "fullchain.pem": (0o444, 0, 5678),
                "tls.pfx": (0o440, 1234, 5678)}
    assert {path.name: owner_and_mode(path) for path in web.iterdir()} == expected
    assert (web / "fullchain.pem").read_bytes() == (
        (web / "tls.crt").read_bytes() + (web / "chain.pem").read_bytes())
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command is not installed")
    root = kv.root / "root.pem"
    root.write_bytes(pki.root.public_bytes(certs.serialization.Encoding.PEM))

    def run_openssl(*argv: str) -> str:
        done = subprocess.run([openssl, *argv], capture_output=True, text=True, timeout=30,
                              check=False)
        assert done.returncode == 0, (argv, done.stderr)
        return done.stdout

    assert run_openssl("pkey", "-in", str(web / "tls.key"), "-pubout") == run_openssl(
        "x509", "-in", str(web / "tls.crt"), "-noout", "-pubkey")
    assert run_openssl("verify", "-CAfile", str(root), "-untrusted", str(web / "chain.pem"),
                       str(web / "tls.crt")).strip().endswith("OK")
    assert run_openssl("pkcs12", "-in", str(web / "tls.pfx"), "-passin", "pass:",
                       "-nokeys").count("BEGIN CERTIFICATE") == 3


def test_once_non_exportable_certificate_names_the_policy_and_keeps_the_files(
    kv: Harness
) -> None:
    """A certificate whose value has no key fails an entry asking for key with the fix, while an
    entry asking only for the chain is written; an unknown content type is refused."""
    certs = pytest.importorskip("certs")
    pki = certs.make_pki("ec")
    public, plain = fresh_name("public-only"), fresh_name("plain")
    put_typed(kv, public, pki.pem(order=[1, 2, 3]), certs.PEM)
    put_typed(kv, plain, pki.pem(), "text/plain")
    manifest = kv.manifest(
        f"  - name: {public}\n    certificate: {{key: a/k, cert: a/c}}\n"
        f"  - name: {public}\n    certificate: {{fullchain: b/fullchain.pem}}\n"
        f"  - name: {plain}\n    certificate: {{cert: c/c}}\n")

    result = kv.run("once", "--manifest", str(manifest))

    assert result.returncode == 1
    assert (kv.directory / "b" / "fullchain.pem").exists()
    assert not (kv.directory / "a").exists() and not (kv.directory / "c").exists()
    (non_exportable, unknown) = result.error_lines
    assert "non-exportable" in non_exportable and "exportable in the certificate policy" in \
        non_exportable
    assert "content type 'text/plain' is not a certificate's" in unknown


def test_check_refuses_a_set_that_shares_its_directory(kv: Harness) -> None:
    """check exits 78 naming the set, the intruding entry and the fix, with no network."""
    manifest = kv.manifest("  - name: a\n    path: db/a\n    set: db\n"
                           "  - name: b\n    path: db/b\n")
    result = kv.run("check", "--manifest", str(manifest))
    assert result.returncode == 78
    assert "set 'db' needs" in result.stderr and "to itself" in result.stderr
    assert (kv.emulator.imds_requests, kv.emulator.vault_requests) == (0, 0)


def test_once_warns_about_expiry_and_waits_out_the_grace_only_after_a_swap(
    kv: Harness
) -> None:
    """once writes an expired certificate and logs that it expired; a run that swapped the
    set waits out the grace before it exits, and leaves no old generation behind."""
    name = fresh_name("old-tls")
    kv.emulator.add_certificate(name, key_type="ec", validity_days=10, valid_from_days=-30)
    manifest = kv.manifest(f"  - name: {name}\n    certificate: {{key: old/tls.key, "
                           f"cert: old/tls.crt}}\n")

    first = kv.run("once", "--manifest", str(manifest))
    kv.emulator.rotate_certificate(name)
    second = kv.run("once", "--manifest", str(manifest))

    for result in (first, second):
        assert result.returncode == 0, result.stderr
        assert f"secret '{name}' expired at" in result.stderr and "still written" in \
            result.stderr
    assert (kv.directory / "old" / "tls.key").exists()
    assert second.elapsed_s >= SET_GRACE_S  # (no sleep without a swap: test_sync.py)
    assert not [n for n in os.listdir(kv.directory) if n.startswith(".kv-agent-set-")]


# ---------------------------------------------------------------------------
# identity sources (Azure Arc, App Service)


@pytest.mark.parametrize("header, extra, expected", [
    ("", {}, "would use imds (no App Service or Azure Arc environment found)"),
    ("", {"IDENTITY_ENDPOINT": "http://127.0.0.1:9/MSI/token",
          "IDENTITY_HEADER": "hdr-" + "z" * 20},
     "would use app-service (IDENTITY_ENDPOINT and IDENTITY_HEADER are set)"),
    ("", {"IDENTITY_ENDPOINT": "http://127.0.0.1:9/t", "IMDS_ENDPOINT": "http://127.0.0.1:9"},
     "would use arc (IDENTITY_ENDPOINT and IMDS_ENDPOINT are set)"),
    ("identity:\n  source: imds\n",
     {"IDENTITY_ENDPOINT": "http://127.0.0.1:9/t", "IMDS_ENDPOINT": "http://127.0.0.1:9"},
     "would use imds (identity.source in the manifest)"),
], ids=["imds", "app-service", "arc", "explicit"])
def test_check_says_which_identity_source_and_why(
        kv: Harness, header: str, extra: Dict[str, str], expected: str) -> None:
    """check names the identity source it would use and why, offline (no request), and
    never prints the App Service header."""
    manifest = kv.manifest(entry(fresh_name("src")), header=header)
    result = kv.run("check", "--manifest", str(manifest), env=kv.env(**extra))
    assert result.returncode == 0, result.stderr
    assert f"identity: {expected}" in result.stdout
    assert "z" * 20 not in result.output
    assert (kv.emulator.imds_requests, kv.emulator.vault_requests) == (0, 0)


@pytest.mark.parametrize("setting, expected, drop_in", [
    ("true", "written to /run/kv-agent/metrics/kv-agent.prom after every refresh", False),
    ("/var/lib/prometheus/node-exporter/kv-agent.prom",
     "written to /var/lib/prometheus/node-exporter/kv-agent.prom after every refresh", True),
], ids=["default", "elsewhere"])
def test_check_says_where_metrics_go_and_when_the_unit_needs_a_drop_in(
        kv: Harness, setting: str, expected: str, drop_in: bool) -> None:
    """check names the metrics file, and a path outside /run/kv-agent names the drop-in
    the sandboxed unit needs to write there."""
    manifest = kv.manifest(entry(fresh_name("met")), header=f"metrics: {setting}\n")
    result = kv.run("check", "--manifest", str(manifest))
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if ": metrics: " in line)
    assert expected in line
    assert ("examples/metrics-path.conf" in line) is drop_in
    assert (kv.emulator.imds_requests, kv.emulator.vault_requests) == (0, 0)


def test_once_through_azure_arc(shm_dir: Path, tmp_path: Path) -> None:
    """kv-agent once on an Arc server: challenged, answers with the key file, writes the
    secret, logs the source once, and prints neither the key nor the token."""
    tokens_dir = tmp_path / "tokens"
    with Emulator({}, identity_source="arc", arc_tokens_dir=str(tokens_dir)) as arc:
        harness = Harness(arc, shm_dir)
        name, value = fresh_name("arc"), fresh_value("arc")
        harness.put(name, value)
        manifest = harness.manifest(entry(name))
        env = harness.env(IDENTITY_ENDPOINT=arc.imds_endpoint, IMDS_ENDPOINT=arc.imds_base,
                          KV_AGENT_ARC_TOKENS_DIR=str(tokens_dir))
        del env["KV_AGENT_IMDS_ENDPOINT"]
        result = harness.run("once", "--manifest", str(manifest), env=env)
        TOKENS.update(tokens_from(arc))
        assert result.returncode == 0, result.stderr
        assert (harness.directory / name).read_bytes() == value.encode()
        assert result.output.count("identity source: arc (IDENTITY_ENDPOINT") == 1
        assert [record.status for record in arc.imds_log] == [401, 200]
        keys = [path.read_text() for path in tokens_dir.iterdir()]
        secrecy.assert_no_leak(result.output, keys, TOKENS)


def test_once_through_app_service_refusal_is_one_line(shm_dir: Path) -> None:
    """A stale IDENTITY_HEADER fails once with which source, what it answered and the fix."""
    with Emulator({}) as emulator:
        harness = Harness(emulator, shm_dir)
        name = fresh_name("app")
        harness.put(name, fresh_value("app"))
        manifest = harness.manifest(entry(name))
        env = harness.env(IDENTITY_ENDPOINT=emulator.app_service_endpoint,
                          IDENTITY_HEADER="stale-" + "q" * 20)
        result = harness.run("once", "--manifest", str(manifest), env=env)
        assert result.returncode != 0
        assert "App Service identity" in result.stderr and "HTTP 401" in result.stderr
        assert "restart the app" in result.stderr and "q" * 20 not in result.output
        assert emulator.imds_requests == 1
