"""Fidelity: the official Azure JavaScript SDK against the emulator.

``@azure/identity`` (``ManagedIdentityCredential``, msal-node underneath),
``@azure/keyvault-secrets`` (``SecretClient``) and ``@azure/keyvault-certificates``
(``CertificateClient``), pinned by ``tests/js/package.json``
and ``package-lock.json``, are installed by this module itself with ``npm ci`` into
a cache directory (``KV_AGENT_JS_CACHE``, else ``~/.cache/kv-agent-tests/js``), one
sub-directory per lock-file digest, so a warm run reinstalls nothing. The tests skip,
saying why, only when ``node`` or ``npm`` is absent.

One node process runs a list of steps (``tests/js/drive.mjs``) and answers with one
JSON result per step. It is aimed at the emulator the way a user would aim it:
``AZURE_POD_IDENTITY_AUTHORITY_HOST`` (msal-node's IMDS host override),
``NODE_EXTRA_CA_CERTS`` (the emulator's CA) and, for a vault at
``https://127.0.0.1:<port>``, ``disableChallengeResourceVerification``.
``tests/js/loopback-only.mjs`` is loaded first: any connection or lookup beyond
loopback is refused and fails the test through conftest's network-guard log.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from sdk_environment import AWAY_FROM_THE_EMULATOR

from agent.emulator import Emulator, IdentityConfig, UserAssignedIdentity

JS_DIR = Path(__file__).resolve().parents[1] / "js"
JS_FILES = ("package.json", "package-lock.json", "drive.mjs", "loopback-only.mjs")
NPM_TIMEOUT_S = 300
NODE_TIMEOUT_S = 60
# What would send the SDK elsewhere than the emulator, plus node's own trust and options.
FOREIGN_ENVIRONMENT = (*AWAY_FROM_THE_EMULATOR, "NODE_OPTIONS", "NODE_EXTRA_CA_CERTS")

BULK = [f"bulk-{index:02d}" for index in range(27)]  # more than one default page of 25
SECRETS: dict[str, Any] = {
    "db-password": "hunter2",
    "rotated": {"versions": ["one", "two"], "value": "three"},
    "switched-off": {"value": "hidden", "enabled": False},
    **{name: f"value of {name}" for name in BULK},
}


def _cache_root() -> Path:
    configured = os.environ.get("KV_AGENT_JS_CACHE")
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "kv-agent-tests" / "js"


def _install(npm: str) -> Path:
    """The directory holding node_modules for the committed lock file, installing it once.

    ``npm ci`` runs in a temporary sibling that is renamed into place only when it
    succeeded, so an interrupted install is never mistaken for a finished one and
    two concurrent runs cannot see a half-filled directory.
    """
    lock = (JS_DIR / "package-lock.json").read_bytes()
    digest = hashlib.sha256((JS_DIR / "package.json").read_bytes() + lock).hexdigest()
    target = _cache_root() / digest[:16]
    if not all((target / "node_modules" / "@azure" / package).is_dir()
               for package in ("keyvault-secrets", "keyvault-certificates")):
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".install-", dir=target.parent))
        try:
            for name in ("package.json", "package-lock.json"):
                shutil.copy2(JS_DIR / name, staging / name)
            result = subprocess.run(
                [npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund"],
                cwd=staging,
                capture_output=True,
                text=True,
                timeout=NPM_TIMEOUT_S,
                check=False,
            )
            if result.returncode != 0:
                pytest.fail(f"npm ci failed in {staging}:\n{result.stderr[-2000:]}")
            try:
                staging.rename(target)
            except OSError:  # another run finished first: use its copy
                pass
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    for name in ("drive.mjs", "loopback-only.mjs"):
        shutil.copy2(JS_DIR / name, target / name)  # cheap; keeps edits live
    return target


@pytest.fixture(scope="session")
def js_dir() -> Path:
    """A directory with the pinned JS SDK installed and the driver beside it."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node and npm are needed to run the JavaScript SDK (not installed)")
    return _install(npm)


def run_js(
    js_dir: Path,
    emulator: Emulator,
    steps: list[dict[str, Any]],
    *,
    verify_challenge_resource: bool = False,
    credential: Mapping[str, str] | None = None,
    extra_env: Mapping[str, str] | None = None,
) -> list[dict[str, Any]]:
    """Run ``steps`` in one node process against ``emulator``; one result per step."""
    env = {
        name: value
        for name, value in os.environ.items()
        if name not in FOREIGN_ENVIRONMENT
    }
    env["AZURE_POD_IDENTITY_AUTHORITY_HOST"] = emulator.imds_base
    env["NODE_EXTRA_CA_CERTS"] = emulator.ca_path
    env.update(extra_env or {})
    plan: dict[str, Any] = {
        "vaultUrl": emulator.vault_url,
        "verifyChallengeResource": verify_challenge_resource,
        "steps": steps,
    }
    if credential is not None:
        plan["credential"] = dict(credential)  # ManagedIdentityCredential's options
    result = subprocess.run(
        ["node", "--import", "./loopback-only.mjs", "drive.mjs"],
        cwd=js_dir,
        input=json.dumps(plan),
        capture_output=True,
        text=True,
        env=env,
        timeout=NODE_TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    answers = json.loads(result.stdout)
    assert isinstance(answers, list) and len(answers) == len(steps)
    return answers


def ok(answer: dict[str, Any]) -> Any:
    """The value of a step that must have succeeded."""
    assert "ok" in answer, answer
    return answer["ok"]


def error(answer: dict[str, Any]) -> dict[str, Any]:
    """The error of a step that must have failed, without its message."""
    return {key: value for key, value in error_with_message(answer).items() if key != "message"}


def error_with_message(answer: dict[str, Any]) -> dict[str, Any]:
    """The error of a step that must have failed: name, statusCode, code, innerCode, message."""
    assert "error" in answer, answer
    failure = answer["error"]
    assert isinstance(failure, dict)
    return failure


@pytest.fixture(scope="module")
def emulator_secrets() -> dict[str, Any]:
    """What the one emulator the read-only tests share serves."""
    return SECRETS


@pytest.fixture
def emu(emulator: Emulator) -> Emulator:
    """The shared emulator with empty request logs."""
    emulator.reset_stats()
    return emulator


def test_js_sdk_gets_a_secret_through_imds_and_the_challenge(
    js_dir: Path, emu: Emulator
) -> None:
    """ManagedIdentityCredential gets a token from the emulator's IMDS and SecretClient reads a secret."""
    (answer,) = run_js(js_dir, emu, [{"op": "get", "name": "db-password"}])

    secret = ok(answer)
    assert (secret["value"], secret["name"], secret["enabled"]) == (
        "hunter2",
        "db-password",
        True,
    )
    assert len(secret["version"]) == 32
    # msal-node asks for ".../token/" (trailing slash) once the host is overridden.
    assert [(r.path, r.status) for r in emu.imds_log] == [
        ("/metadata/identity/oauth2/token/", 200)
    ]
    assert [r.status for r in emu.vault_log] == [401, 200]


def test_js_sdk_app_service_user_assigned_by_object_id(js_dir: Path) -> None:
    """On App Service, objectId gets that identity's token; an unknown one is refused (400),
    never answered with the system-assigned identity's token."""
    chosen = UserAssignedIdentity(
        client_id="cccccccc-0000-4000-8000-00000000000c",
        object_id="cccccccc-0000-4000-8000-0000000000c0",
        msi_res_id="/subscriptions/s/resourcegroups/rg/providers/"
        "Microsoft.ManagedIdentity/userAssignedIdentities/id-c",
    )
    identities = IdentityConfig(system_assigned=True, user_assigned=(chosen,))
    with Emulator(SECRETS, identities=identities) as emulator:
        app_service = {"IDENTITY_ENDPOINT": emulator.app_service_endpoint,
                       "IDENTITY_HEADER": emulator.identity_header}
        (found,) = run_js(js_dir, emulator, [{"op": "get", "name": "db-password"}],
                          credential={"objectId": chosen.object_id}, extra_env=app_service)
        assert ok(found)["value"] == "hunter2"
        (app,) = emulator.imds_log
        assert app.path == "/MSI/token" and app.query["object_id"] == chosen.object_id
        bearer = emulator.vault_log[-1].headers["authorization"].split(" ", 1)[1]
        payload = bearer.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        assert claims["oid"] == chosen.object_id

        emulator.reset_stats()
        (refused,) = run_js(js_dir, emulator, [{"op": "get", "name": "db-password"}],
                            credential={"objectId": "dddddddd-0000-4000-8000-0000000000d0"},
                            extra_env=app_service)
        assert "No Managed Identity found" in error_with_message(refused)["message"]
        assert [record.status for record in emulator.imds_log][-1] == 400
        assert not any("authorization" in record.headers for record in emulator.vault_log)


def test_js_sdk_gets_pinned_versions(js_dir: Path, emu: Emulator) -> None:
    """listPropertiesOfSecretVersions yields every version and getSecret(version) its own value."""
    (listed,) = run_js(js_dir, emu, [{"op": "versions", "name": "rotated"}])
    versions = [item["version"] for page in ok(listed) for item in page]
    answers = run_js(
        js_dir,
        emu,
        [{"op": "get", "name": "rotated", "version": v} for v in versions]
        + [{"op": "get", "name": "rotated"}],
    )

    values = [ok(answer)["value"] for answer in answers]
    assert values == ["one", "two", "three", "three"]


@pytest.mark.parametrize("max_page_size", [None, 1, 7])
def test_js_sdk_lists_every_secret_across_pages(
    js_dir: Path, emu: Emulator, max_page_size: int | None
) -> None:
    """listPropertiesOfSecrets().byPage() follows nextLink to the end and sees every secret once."""
    step: dict[str, Any] = {"op": "list"}
    if max_page_size is not None:
        step["maxPageSize"] = max_page_size
    (answer,) = run_js(js_dir, emu, [step])

    pages = ok(answer)
    names = [item["name"] for page in pages for item in page]
    assert sorted(names) == sorted(SECRETS)
    assert len(pages) >= 2
    assert all(item["version"] is None for page in pages for item in page)


def test_js_sdk_disabled_and_missing_secrets_raise_rest_errors(
    js_dir: Path, emu: Emulator
) -> None:
    """A disabled secret is a 403 Forbidden/SecretDisabled RestError, a missing one 404 SecretNotFound."""
    disabled, missing, versions_of_missing = run_js(
        js_dir,
        emu,
        [
            {"op": "get", "name": "switched-off"},
            {"op": "get", "name": "no-such-secret"},
            {"op": "versions", "name": "no-such-secret"},
        ],
    )

    assert error(disabled) == {
        "name": "RestError",
        "statusCode": 403,
        "code": "Forbidden",
        "innerCode": "SecretDisabled",
    }
    assert error(missing) == {
        "name": "RestError",
        "statusCode": 404,
        "code": "SecretNotFound",
        "innerCode": None,
    }
    assert ok(versions_of_missing) == [[]]


@pytest.mark.parametrize("max_page_size", [None, 1, 7])
def test_js_sdk_lists_everything_across_empty_pages(
    js_dir: Path, max_page_size: int | None
) -> None:
    """With empty pages on, byPage() follows a nextLink past pages without items and loses nothing."""
    step: dict[str, Any] = {"op": "list"}
    if max_page_size is not None:
        step["maxPageSize"] = max_page_size
    with Emulator(SECRETS, empty_pages=True) as emulator:
        listed, versions = run_js(
            js_dir, emulator, [step, {**step, "op": "versions", "name": "rotated"}]
        )

    pages = ok(listed)
    assert [len(page) for page in pages[:2]] == [0, 0]
    assert sorted(item["name"] for page in pages for item in page) == sorted(SECRETS)
    assert len([item for page in ok(versions) for item in page]) == 3


def test_js_sdk_set_update_delete_recover_purge(js_dir: Path) -> None:
    """SecretClient's write operations work end to end against the emulator's write API."""
    with Emulator(SECRETS) as emulator:
        answers = run_js(
            js_dir,
            emulator,
            [
                {"op": "set", "name": "written", "value": "first",
                 "contentType": "text/plain", "tags": {"env": "test"},
                 "notBefore": 1_600_000_000, "expiresOn": 2_000_000_000},
                {"op": "set", "name": "written", "value": "second"},
                {"op": "versions", "name": "written"},
                {"op": "delete", "name": "written"},
                {"op": "getDeleted", "name": "written"},
                {"op": "listDeleted"},
                {"op": "set", "name": "written", "value": "third"},
                {"op": "recover", "name": "written"},
                {"op": "get", "name": "written"},
                {"op": "delete", "name": "written"},
                {"op": "purge", "name": "written"},
                {"op": "getDeleted", "name": "written"},
                {"op": "set", "name": "written", "value": "fourth"},
            ],
        )
        (
            first, second, versions, deleted, fetched, listed, conflict,
            recovered, after_recover, _, purged, gone, fourth,
        ) = answers
        (update,) = run_js(
            js_dir,
            emulator,
            [{"op": "update", "name": "written", "version": ok(fourth)["version"],
              "enabled": False, "tags": {"env": "prod"}}],
        )
        (disabled,) = run_js(js_dir, emulator, [{"op": "get", "name": "written"}])

    assert (ok(first)["value"], ok(first)["contentType"]) == ("first", "text/plain")
    assert (ok(first)["notBefore"], ok(first)["expiresOn"]) == (1_600_000_000, 2_000_000_000)
    assert ok(second)["version"] != ok(first)["version"]
    assert len(ok(versions)[0]) == 2
    assert ok(deleted)["recoveryId"] == f"{emulator_url(deleted)}/deletedsecrets/written"
    assert ok(deleted)["scheduledPurgeDate"] - ok(deleted)["deletedOn"] == 90 * 86400
    assert ok(fetched)["name"] == "written"
    assert [item["name"] for page in ok(listed) for item in page] == ["written"]
    assert error(conflict)["statusCode"] == 409 and error(conflict)["code"] == "Conflict"
    assert ok(recovered)["name"] == "written"
    assert ok(after_recover)["value"] == "second"
    assert ok(purged) is None
    assert error(gone)["statusCode"] == 404
    assert ok(fourth)["value"] == "fourth"
    assert (ok(update)["enabled"], ok(update)["tags"]) == (False, {"env": "prod"})
    assert error(disabled)["innerCode"] == "SecretDisabled"


def emulator_url(answer: dict[str, Any]) -> str:
    """The vault URL a bundle's id starts with."""
    return str(answer["ok"]["id"]).split("/secrets/", 1)[0]


def test_js_sdk_verifies_the_challenge_of_a_vault_azure_net_name(js_dir: Path) -> None:
    """Under a *.vault.azure.net name (resolved to loopback as a hosts entry would) the JS SDK's
    default challenge-resource check passes; it compares host names only, so any port works."""
    hostname = "kv-emulator.vault.azure.net"
    with Emulator(SECRETS, vault_hostname=hostname) as emulator:
        resolve = {"KV_TEST_RESOLVE": f"{hostname}=127.0.0.1"}
        verified, listed = run_js(
            js_dir,
            emulator,
            [{"op": "get", "name": "db-password"}, {"op": "list", "maxPageSize": 10}],
            verify_challenge_resource=True,
            extra_env=resolve,
        )
        assert emulator.vault_url.startswith(f"https://{hostname}:")

    assert ok(verified)["value"] == "hunter2"
    assert sorted(item["name"] for page in ok(listed) for item in page) == sorted(SECRETS)


def test_js_sdk_check_refuses_the_default_loopback_vault_url(js_dir: Path, emu: Emulator) -> None:
    """At https://127.0.0.1:<port> the JS SDK's default check refuses the challenge, hence the name
    (or disableChallengeResourceVerification)."""
    (answer,) = run_js(
        js_dir, emu, [{"op": "get", "name": "db-password"}], verify_challenge_resource=True
    )

    failure = error_with_message(answer)
    assert failure["statusCode"] is None
    assert "does not match the requested domain" in failure["message"]
    assert emu.imds_requests == 0


def test_js_sdk_gets_a_pkcs12_certificate_as_pem(js_dir: Path) -> None:
    """getSecret(outContentType: application/x-pem-file) gets a PKCS#12 certificate's key and
    chain as PEM, the key first."""
    with Emulator({"web": {"certificate": {}}}) as emulator:
        stored, converted = run_js(js_dir, emulator, [
            {"op": "get", "name": "web"},
            {"op": "get", "name": "web", "outContentType": "application/x-pem-file"}])

    assert ok(stored)["contentType"] == "application/x-pkcs12"
    pem = ok(converted)
    assert pem["contentType"] == "application/x-pem-file"
    blocks = [line for line in pem["value"].splitlines() if line.startswith("-----BEGIN")]
    assert blocks == ["-----BEGIN PRIVATE KEY-----"] + ["-----BEGIN CERTIFICATE-----"] * 2


def test_js_sdk_creates_a_certificate_and_reads_it_back(js_dir: Path) -> None:
    """beginCreateCertificate polls GET .../pending until completed and returns the
    certificate; getCertificate, its version, its policy, its operation and both lists
    agree, and a declared certificate created again under a new policy takes it."""
    with Emulator({"declared": {"certificate": {}}, "plain": "not a certificate"}) as emulator:
        answers = run_js(js_dir, emulator, [
            {"op": "createCertificate", "name": "made-by-js", "policy": "default"},
            {"op": "getCertificate", "name": "made-by-js"},
            {"op": "getCertificatePolicy", "name": "made-by-js"},
            {"op": "getCertificateOperation", "name": "made-by-js"},
            {"op": "listCertificates"},
            {"op": "listCertificateVersions", "name": "made-by-js"},
            {"op": "get", "name": "made-by-js"},
            {"op": "createCertificate", "name": "declared", "policy": {
                "issuerName": "Self", "subject": "CN=declared", "keyType": "EC",
                "contentType": "application/x-pem-file"}},
        ])
        created, fetched, policy, operation, listed, versions, secret, recreated = [
            ok(answer) for answer in answers]
        pending = [record for record in emulator.vault_log if record.path.endswith("/pending")]
        (version,) = run_js(js_dir, emulator, [
            {"op": "getCertificateVersion", "name": "made-by-js",
             "version": fetched["version"]}])

    assert created["id"] == fetched["id"] == ok(version)["id"]
    assert created["cer"] == fetched["cer"] and fetched["cer"]
    assert fetched["secretId"] == secret["id"]
    assert fetched["keyId"] == secret["id"].replace("/secrets/", "/keys/")
    assert fetched["policy"]["issuerName"] == "Self"
    assert (policy["keyType"], policy["keySize"], policy["contentType"]) == (
        "RSA", 2048, "application/x-pkcs12")
    assert operation == {"status": "completed",
                         "target": fetched["id"].rsplit("/", 1)[0]}
    assert sorted(name for page in listed for name in page) == ["declared", "made-by-js"]
    assert [item["version"] for item in versions] == [fetched["version"]]
    assert pending and all(record.status == 200 for record in pending)
    assert recreated["policy"]["keyType"] == "EC"
    assert recreated["policy"]["contentType"] == "application/x-pem-file"
