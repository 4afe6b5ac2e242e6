"""Fidelity: the official Azure SDK (azure-identity, azure-keyvault-secrets) against the emulator.

``ManagedIdentityCredential`` picks its source from the environment
(protocol.md A6): every variable that would select App Service, Arc, Cloud
Shell, Service Fabric or workload identity is removed, so it takes the IMDS
path, and ``AZURE_POD_IDENTITY_AUTHORITY_HOST`` (the IMDS host override, read
by azure-identity's ``imds._get_request`` and MSAL's ``_obtain_token_on_azure_vm``)
points it at the emulator. The vault is reached at ``https://127.0.0.1:<port>``,
whose host is not a sub-domain of ``vault.azure.net``, hence
``verify_challenge_resource=False``. conftest's network guard fails any test
in which the SDK tries a host other than loopback (such as 169.254.169.254).
"""

from __future__ import annotations

import base64
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from azure.core.exceptions import (
    ClientAuthenticationError,
    HttpResponseError,
    ResourceExistsError,
    ResourceNotFoundError,
)
from azure.identity import CredentialUnavailableError, ManagedIdentityCredential
from azure.keyvault.secrets import SecretClient
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding
from sdk_environment import AWAY_FROM_THE_EMULATOR

from agent.emulator import Emulator, IdentityConfig, UserAssignedIdentity

# What would send the SDK elsewhere than the emulator, plus MSAL's own managed-identity
# configuration and requests' CA bundles.
FOREIGN_ENVIRONMENT = (*AWAY_FROM_THE_EMULATOR, "MY_MANAGED_IDENTITY_CONFIG",
                       "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE")

USER_ASSIGNED = UserAssignedIdentity(
    client_id="cccccccc-0000-4000-8000-00000000000c",
    object_id="cccccccc-0000-4000-8000-0000000000c0",
    msi_res_id="/subscriptions/s/resourcegroups/rg/providers/"
    "Microsoft.ManagedIdentity/userAssignedIdentities/id-c",
)
BULK = [f"bulk-{index:02d}" for index in range(31)]  # more than one default page of 25
SECRETS: dict[str, Any] = {
    "db-password": "hunter2",
    "rotated": {"versions": ["one", "two"], "value": "three"},
    "switched-off": {"value": "hidden", "enabled": False},
    **{name: f"value of {name}" for name in BULK},
}


@pytest.fixture(scope="module")
def emulator_secrets() -> dict[str, Any]:
    """What the module's emulators serve (``fresh`` starts one per test)."""
    return SECRETS


@pytest.fixture(scope="module")
def emulator_identities() -> IdentityConfig:
    """The module's emulator, not changed by the tests that use it, is a VM with both
    identity kinds."""
    return IdentityConfig(system_assigned=True, user_assigned=(USER_ASSIGNED,))


@pytest.fixture
def emu(emulator: Emulator, monkeypatch: pytest.MonkeyPatch) -> Emulator:
    """The module's emulator with empty request logs and the SDK's environment aimed at it."""
    aim_sdk_at(emulator, monkeypatch)
    emulator.reset_stats()
    return emulator


@pytest.fixture
def fresh(fresh_emulator: Emulator, monkeypatch: pytest.MonkeyPatch) -> Emulator:
    """A new emulator, for a test that injects faults, with the SDK's environment aimed at it."""
    aim_sdk_at(fresh_emulator, monkeypatch)
    return fresh_emulator


def aim_sdk_at(emulator: Emulator, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ManagedIdentityCredential take the IMDS path to the emulator, and nothing else."""
    for name in FOREIGN_ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AZURE_POD_IDENTITY_AUTHORITY_HOST", emulator.imds_base)


@contextmanager
def secret_client(
    emulator: Emulator, **credential_kwargs: Any
) -> Iterator[SecretClient]:
    """A SecretClient for the emulator's vault using a fresh ManagedIdentityCredential."""
    with ManagedIdentityCredential(**credential_kwargs) as credential:
        client = SecretClient(
            vault_url=emulator.vault_url,
            credential=credential,
            verify_challenge_resource=False,
            connection_verify=emulator.ca_path,
        )
        with client:
            yield client


def jwt_claims(authorization: str) -> dict[str, Any]:
    """The payload of the bearer token in an Authorization header."""
    payload = authorization.split(" ", 1)[1].split(".")[1]
    decoded = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    assert isinstance(decoded, dict)
    return decoded


def test_sdk_gets_a_secret_through_imds_and_the_challenge(emu: Emulator) -> None:
    """The SDK asks IMDS for a vault token, answers the 401 challenge and reads the secret."""
    with secret_client(emu) as client:
        secret = client.get_secret("db-password")

    assert secret.value == "hunter2"
    assert secret.name == "db-password"
    assert secret.properties.vault_url == emu.vault_url
    assert secret.properties.enabled is True
    assert (
        secret.properties.version is not None and len(secret.properties.version) == 32
    )
    (imds,) = emu.imds_log
    assert imds.query == {
        "api-version": "2018-02-01",
        "resource": "https://vault.azure.net",
    }
    assert imds.headers["metadata"] == "true"
    first, second = emu.vault_log
    assert (first.status, "authorization" in first.headers) == (401, False)
    assert second.status == 200
    assert (
        jwt_claims(second.headers["authorization"])["aud"] == "https://vault.azure.net"
    )


def test_sdk_gets_pinned_versions(emu: Emulator) -> None:
    """get_secret(name, version) returns each listed version's own value."""
    with secret_client(emu) as client:
        versions = list(client.list_properties_of_secret_versions("rotated"))
        values = {
            item.version: client.get_secret("rotated", item.version).value
            for item in versions
        }
        latest = client.get_secret("rotated")

    assert sorted(str(value) for value in values.values()) == ["one", "three", "two"]
    assert values[latest.properties.version] == "three"


def test_sdk_lists_secret_properties_across_pages(emu: Emulator) -> None:
    """list_properties_of_secrets follows nextLink over several pages and sees every secret once."""
    with secret_client(emu) as client:
        names = [
            str(item.name)
            for item in client.list_properties_of_secrets(max_page_size=10)
        ]

    assert sorted(names) == sorted(SECRETS)
    lists = [
        record
        for record in emu.vault_log
        if record.path == "/secrets" and record.status == 200
    ]
    assert len(lists) == 4  # 34 secrets, 10 a page
    assert all("$skiptoken" in record.query for record in lists[1:])


def test_sdk_lists_with_the_default_page_size(emu: Emulator) -> None:
    """Without max_page_size the vault's default page of 25 still yields every secret."""
    with secret_client(emu) as client:
        names = {item.name for item in client.list_properties_of_secrets()}

    assert names == set(SECRETS)
    assert len([record for record in emu.vault_log if record.path == "/secrets"]) >= 2


def test_sdk_missing_secret_raises_resource_not_found(emu: Emulator) -> None:
    """A missing secret surfaces as ResourceNotFoundError carrying SecretNotFound."""
    with secret_client(emu) as client, pytest.raises(ResourceNotFoundError) as caught:
        client.get_secret("no-such-secret")

    assert caught.value.status_code == 404
    assert (
        caught.value.error is not None and caught.value.error.code == "SecretNotFound"
    )


def test_sdk_disabled_secret_raises_forbidden(emu: Emulator) -> None:
    """A disabled secret surfaces as HttpResponseError 403 Forbidden with SecretDisabled inside."""
    with secret_client(emu) as client, pytest.raises(HttpResponseError) as caught:
        client.get_secret("switched-off")

    assert caught.value.status_code == 403
    error = caught.value.error
    assert error is not None and error.code == "Forbidden"
    assert error.innererror == {"code": "SecretDisabled"}


def test_sdk_user_assigned_identity_by_client_id(emu: Emulator) -> None:
    """ManagedIdentityCredential(client_id=...) gets a token for that user-assigned identity."""
    with secret_client(emu, client_id=USER_ASSIGNED.client_id) as client:
        assert client.get_secret("db-password").value == "hunter2"

    (imds,) = emu.imds_log
    assert imds.query["client_id"] == USER_ASSIGNED.client_id
    claims = jwt_claims(emu.vault_log[-1].headers["authorization"])
    assert (claims["appid"], claims["oid"]) == (
        USER_ASSIGNED.client_id,
        USER_ASSIGNED.object_id,
    )


def test_sdk_user_assigned_identity_by_resource_id(emu: Emulator) -> None:
    """identity_config resource_id is sent as msi_res_id and selects that identity."""
    with secret_client(
        emu, identity_config={"resource_id": USER_ASSIGNED.msi_res_id}
    ) as client:
        assert client.get_secret("db-password").value == "hunter2"

    (imds,) = emu.imds_log
    assert imds.query["msi_res_id"] == USER_ASSIGNED.msi_res_id
    claims = jwt_claims(emu.vault_log[-1].headers["authorization"])
    assert claims["xms_mirid"] == USER_ASSIGNED.msi_res_id


def test_sdk_unknown_identity_is_unavailable(emu: Emulator) -> None:
    """An unknown client_id gets IMDS's 400, which the SDK reports as an unavailable credential."""
    unknown = "dddddddd-0000-4000-8000-00000000000d"
    with (
        secret_client(emu, client_id=unknown) as client,
        pytest.raises(ClientAuthenticationError) as caught,
    ):
        client.get_secret("db-password")

    assert isinstance(caught.value, CredentialUnavailableError)
    assert "Identity not found" in str(caught.value)
    assert [record.status for record in emu.imds_log] == [400]


def aim_sdk_at_app_service(emulator: Emulator, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ManagedIdentityCredential take the App Service path to the emulator."""
    monkeypatch.setenv("IDENTITY_ENDPOINT", emulator.app_service_endpoint)
    monkeypatch.setenv("IDENTITY_HEADER", emulator.identity_header)


def test_sdk_app_service_user_assigned_by_object_id(
    emu: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On App Service, identity_config object_id gets that identity's token, not the
    system-assigned one."""
    aim_sdk_at_app_service(emu, monkeypatch)
    with secret_client(emu, identity_config={"object_id": USER_ASSIGNED.object_id}) as client:
        assert client.get_secret("db-password").value == "hunter2"

    (app,) = emu.imds_log
    assert app.path == "/MSI/token" and app.query["object_id"] == USER_ASSIGNED.object_id
    claims = jwt_claims(emu.vault_log[-1].headers["authorization"])
    assert claims["oid"] == USER_ASSIGNED.object_id


def test_sdk_app_service_unknown_object_id_is_refused(
    emu: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On App Service, an unknown object_id is refused (400), never answered with another
    identity's token."""
    aim_sdk_at_app_service(emu, monkeypatch)
    unknown = "dddddddd-0000-4000-8000-0000000000d0"
    with (
        secret_client(emu, identity_config={"object_id": unknown}) as client,
        pytest.raises(ClientAuthenticationError, match="No Managed Identity found"),
    ):
        client.get_secret("db-password")

    assert [record.status for record in emu.imds_log] == [400]
    assert not any("authorization" in record.headers for record in emu.vault_log)


def test_sdk_retries_vault_429_after_retry_after(fresh: Emulator) -> None:
    """The SDK waits the vault's Retry-After on a 429 and then succeeds."""
    # Faults apply before authentication, so the challenge request is the one throttled.
    fresh.inject_fault(
        "vault", 429, retry_after="1", path_contains="/secrets/db-password"
    )
    with secret_client(fresh) as client:
        started = time.monotonic()
        assert client.get_secret("db-password").value == "hunter2"
        elapsed = time.monotonic() - started

    assert [record.status for record in fresh.vault_log] == [429, 401, 200]
    # azure-core's first retry has no backoff of its own: the wait is Retry-After's.
    assert 1.0 <= elapsed < 5.0


def test_sdk_retries_a_dropped_vault_connection(fresh: Emulator) -> None:
    """A connection the vault drops without answering is retried by the SDK's pipeline."""
    fresh.inject_fault("vault", drop=True, path_contains="/secrets/db-password")
    with secret_client(fresh) as client:
        assert client.get_secret("db-password").value == "hunter2"

    assert [record.status for record in fresh.vault_log] == [0, 401, 200]


def test_sdk_retries_a_transient_imds_error(fresh: Emulator) -> None:
    """An IMDS 500 with Retry-After: 0 is retried by the credential, which then gets a token."""
    fresh.inject_fault("imds", 500, retry_after="0")
    with secret_client(fresh) as client:
        assert client.get_secret("db-password").value == "hunter2"

    assert [record.status for record in fresh.imds_log] == [500, 200]


def test_sdk_lists_everything_across_empty_pages(fresh: Emulator) -> None:
    """With empty pages on, both lists still yield every item: the SDK follows a nextLink past
    a page without items, as it must in Azure."""
    fresh.empty_pages = True
    with secret_client(fresh) as client:
        names = [str(item.name) for item in client.list_properties_of_secrets(max_page_size=5)]
        versions = list(client.list_properties_of_secret_versions("rotated", max_page_size=1))

    assert sorted(names) == sorted(SECRETS)
    assert len(versions) == 3
    pages = [r for r in fresh.vault_log if r.path == "/secrets" and r.status == 200]
    assert len(pages) == 2 + 7 + 1  # two empty, seven of items, the empty last one


def test_sdk_set_update_delete_recover_purge(fresh: Emulator) -> None:
    """SecretClient's write operations work end to end: set, update, soft delete, get and list
    deleted, recover, delete again, purge, and set anew."""
    with secret_client(fresh) as client:
        created = client.set_secret(
            "written", "first", content_type="text/plain", tags={"env": "test"}
        )
        rotated = client.set_secret("written", "second")
        updated = client.update_secret_properties(
            "written", rotated.properties.version, enabled=False, tags={"env": "prod"}
        )
        disabled = pytest.raises(HttpResponseError, client.get_secret, "written")
        client.update_secret_properties("written", enabled=True)  # latest, via ".../written/"
        deleted = client.begin_delete_secret("written", _polling_interval=0.05).result()
        fetched = client.get_deleted_secret("written")
        listed = [item.name for item in client.list_deleted_secrets()]
        with pytest.raises(ResourceExistsError) as conflict:
            client.set_secret("written", "third")
        recovered = client.begin_recover_deleted_secret("written", _polling_interval=0.05).result()
        value_after_recover = client.get_secret("written").value
        client.begin_delete_secret("written", _polling_interval=0.05).result()
        client.purge_deleted_secret("written")
        with pytest.raises(ResourceNotFoundError):
            client.get_deleted_secret("written")
        fresh_start = client.set_secret("written", "fourth")
        versions = list(client.list_properties_of_secret_versions("written"))

    assert (created.value, created.properties.content_type) == ("first", "text/plain")
    assert created.properties.tags == {"env": "test"}
    assert rotated.properties.version != created.properties.version
    assert (updated.enabled, updated.tags) == (False, {"env": "prod"})
    assert disabled.value.status_code == 403
    assert deleted.name == fetched.name == "written"
    assert deleted.recovery_id == f"{fresh.vault_url}/deletedsecrets/written"
    assert deleted.deleted_date is not None and deleted.scheduled_purge_date is not None
    assert listed == ["written"]
    assert conflict.value.status_code == 409
    assert conflict.value.error is not None
    assert conflict.value.error.code == "Conflict"
    assert recovered.name == "written" and value_after_recover == "second"
    assert fresh_start.value == "fourth" and len(versions) == 1


def test_sdk_bad_set_is_a_400(emu: Emulator) -> None:
    """A value over Key Vault's 25 KB limit is refused with 400 BadParameter, as the service does."""
    with secret_client(emu) as client, pytest.raises(HttpResponseError) as caught:
        client.set_secret("too-big", "x" * (25 * 1024 + 1))

    assert caught.value.status_code == 400
    assert caught.value.error is not None and caught.value.error.code == "BadParameter"


# ---------------------------------------------------------------------------
# The SDK's own challenge-resource check, under a *.vault.azure.net name (item 26)

VAULT_HOSTNAME = "kv-emulator.vault.azure.net"


def resolve_to_loopback(monkeypatch: pytest.MonkeyPatch, hostname: str) -> None:
    """Answer lookups of ``hostname`` with 127.0.0.1, as a hosts entry would; no DNS is asked."""
    real = socket.getaddrinfo

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(host, str) and host.lower() == hostname:
            host = "127.0.0.1"
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


def start_named(monkeypatch: pytest.MonkeyPatch, vault_port: int) -> Emulator:
    """An emulator serving https://kv-emulator.vault.azure.net[:port] on a loopback address of
    its own (so port 443 does not collide with other tests), with that name resolved to it."""
    host = f"127.0.{os.getpid() % 250 + 1}.{vault_port % 250 + 2}"
    emulator = Emulator(SECRETS, host=host, vault_port=vault_port, vault_hostname=VAULT_HOSTNAME)
    try:
        emulator.start()
    except PermissionError:
        pytest.skip(f"binding {host}:{vault_port} needs root or CAP_NET_BIND_SERVICE")
    aim_sdk_at(emulator, monkeypatch)
    real = socket.getaddrinfo

    def getaddrinfo(name: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(name, str) and name.lower() == VAULT_HOSTNAME:
            name = host  # as a hosts entry "127.0.x.y kv-emulator.vault.azure.net" would
        return real(name, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return emulator


@contextmanager
def verifying_client(emulator: Emulator) -> Iterator[SecretClient]:
    """A SecretClient with the SDK's default challenge-resource verification left on."""
    with ManagedIdentityCredential() as credential:
        client = SecretClient(
            vault_url=emulator.vault_url, credential=credential, connection_verify=emulator.ca_path
        )
        with client:
            yield client


def test_sdk_verifies_the_challenge_of_a_vault_azure_net_name_on_port_443(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Under a *.vault.azure.net name on port 443 the SDK's default check passes, so SDK code
    runs against the emulator unchanged."""
    emulator = start_named(monkeypatch, 443)
    try:
        with verifying_client(emulator) as client:
            secret = client.get_secret("db-password")
            names = {item.name for item in client.list_properties_of_secrets(max_page_size=10)}
    finally:
        emulator.stop()

    assert secret.value == "hunter2"
    assert secret.properties.vault_url == f"https://{VAULT_HOSTNAME}"
    assert names == set(SECRETS)  # nextLinks carry :443, the same authority for the SDK


def test_sdk_check_counts_the_port_so_another_port_needs_the_switch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """azure-keyvault-secrets compares host and port: at *.vault.azure.net:<other port> its
    check refuses, and verify_challenge_resource=False is the way (docs/how-to/emulator.md says so)."""
    emulator = start_named(monkeypatch, 0)
    try:
        with verifying_client(emulator) as client, pytest.raises(ValueError, match="challenge"):
            client.get_secret("db-password")
        with secret_client(emulator) as client:
            value = client.get_secret("db-password").value
    finally:
        emulator.stop()

    assert value == "hunter2"


def test_sdk_check_refuses_the_default_loopback_vault_url(emu: Emulator) -> None:
    """At https://127.0.0.1:<port> the SDK's default check refuses the challenge, hence the name."""
    with ManagedIdentityCredential() as credential:
        client = SecretClient(
            vault_url=emu.vault_url, credential=credential, connection_verify=emu.ca_path
        )
        with client, pytest.raises(ValueError, match="challenge resource"):
            client.get_secret("db-password")

    assert emu.imds_requests == 0


# ---------------------------------------------------------------------------
# azure-keyvault-certificates: create (its poller), reads and the policy (issue 17 item 18)


@contextmanager
def certificate_client(emulator: Emulator) -> Iterator[Any]:
    """A CertificateClient for the emulator's vault using a fresh ManagedIdentityCredential."""
    from azure.keyvault.certificates import CertificateClient

    with ManagedIdentityCredential() as credential:
        client = CertificateClient(vault_url=emulator.vault_url, credential=credential,
                                   verify_challenge_resource=False,
                                   connection_verify=emulator.ca_path)
        with client:
            yield client


def leaf_and_key(value: str) -> tuple[Any, Any]:
    """The leaf certificate and private key of a PKCS#12 secret value (empty password)."""
    from cryptography.hazmat.primitives.serialization import pkcs12

    key, leaf, _ = pkcs12.load_key_and_certificates(base64.b64decode(value), b"")
    return leaf, key


def test_sdk_creates_a_certificate_and_reads_it_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """begin_create_certificate(...).result() returns the certificate (not None), and
    get_certificate, its version, its policy, its operation and both lists agree with the
    secret that holds its key."""
    from azure.keyvault.certificates import CertificatePolicy

    with Emulator({"declared": {"certificate": {}}, "plain": "not a certificate"}) as emulator:
        aim_sdk_at(emulator, monkeypatch)
        with certificate_client(emulator) as client, secret_client(emulator) as secrets:
            started = time.monotonic()
            created = client.begin_create_certificate(
                "made-by-sdk", CertificatePolicy.get_default()).result()
            elapsed = time.monotonic() - started
            fetched = client.get_certificate("made-by-sdk")
            version = client.get_certificate_version("made-by-sdk", fetched.properties.version)
            policy = client.get_certificate_policy("made-by-sdk")
            operation = client.get_certificate_operation("made-by-sdk")
            listed = sorted(item.name for item in client.list_properties_of_certificates())
            versions = list(client.list_properties_of_certificate_versions("made-by-sdk"))
            secret = secrets.get_secret("made-by-sdk")

    assert created is not None and created.name == "made-by-sdk" and elapsed < 5
    assert created.id == fetched.id == version.id and fetched.cer == created.cer
    assert fetched.secret_id == secret.id and fetched.key_id == secret.properties.key_id
    leaf, key = leaf_and_key(secret.value or "")
    assert fetched.cer == leaf.public_bytes(Encoding.DER)
    assert key.public_key().public_numbers() == leaf.public_key().public_numbers()
    assert fetched.properties.x509_thumbprint == leaf.fingerprint(hashes.SHA1())
    assert fetched.properties.expires_on is not None and fetched.properties.enabled is True
    assert fetched.policy is not None and fetched.policy.issuer_name == "Self"
    assert (policy.key_type, policy.key_size, policy.exportable) == ("RSA", 2048, True)
    assert policy.content_type == "application/x-pkcs12" and policy.validity_in_months == 12
    assert operation.status == "completed" and operation.target == fetched.id.rsplit("/", 1)[0]
    assert listed == ["declared", "made-by-sdk"]
    assert [item.version for item in versions] == [fetched.properties.version]


def test_sdk_create_with_a_policy_replaces_the_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Creating an existing certificate with another policy issues a new version under it
    (an EC key in PEM here); a policy the emulator cannot issue is a 400 naming the field."""
    from azure.keyvault.certificates import CertificateContentType, CertificatePolicy, KeyType

    with Emulator({"web": {"certificate": {}}}) as emulator:
        aim_sdk_at(emulator, monkeypatch)
        with certificate_client(emulator) as client, secret_client(emulator) as secrets:
            first = client.get_certificate("web")
            ec = CertificatePolicy(issuer_name="Self", subject="CN=web", key_type=KeyType.ec,
                                   content_type=CertificateContentType.pem,
                                   san_dns_names=["web.example.test"])
            second = client.begin_create_certificate("web", ec).result()
            pem = secrets.get_secret("web")
            with pytest.raises(HttpResponseError, match="key_size") as caught:
                client.begin_create_certificate("web", CertificatePolicy(
                    issuer_name="Self", subject="CN=web", key_size=4096))

    assert second.properties.version != first.properties.version
    assert second.policy is not None and second.policy.key_type == "EC"
    assert second.policy.san_dns_names == ["web.example.test"]
    assert pem.properties.content_type == "application/x-pem-file"
    assert pem.value is not None and pem.value.startswith("-----BEGIN PRIVATE KEY-----")
    assert caught.value.status_code == 400
