"""The loopback emulator over real sockets: IMDS and Key Vault as the recordings show them.

Every request goes through ``requests`` to a started :class:`~agent.emulator.Emulator`
(plain HTTP for IMDS, HTTPS with the emulator's throw-away CA for the vault).
Where a real exchange was recorded (``docs/recordings/``, see ``docs/protocol.md``
section C) the emulator's answer is compared with it: same status, same keys in the
same order, same JSON value types, and byte-identical bodies for fixed error texts.
Those tests are skipped, with the reason shown, when the recordings are not on disk.
"""

from __future__ import annotations

import base64
import json
import os
import re
import socket
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from agent.emulator import (
    KV_THROTTLED,
    Emulator,
    IdentityConfig,
    UserAssignedIdentity,
    load_emulator_file,
    load_secrets_file,
)

REPO = Path(__file__).resolve().parents[2]
# Verbatim copies of real, sanitised SDK recordings (tests/recordings/README.md);
# KV_AGENT_RECORDINGS may point at a fuller set; the project's shared/ folder
# (beside the clone, in development and in CI) holds the full one.
RECORDINGS_CANDIDATES = (
    os.environ.get("KV_AGENT_RECORDINGS", ""),
    str(REPO / "tests" / "recordings"),
    str(REPO.parent / "shared" / "docs" / "recordings"),
)

KV_RESOURCE = "https://vault.azure.net"
IMDS_PARAMS = {"api-version": "2018-02-01", "resource": KV_RESOURCE}
METADATA = {"Metadata": "true"}
API_VERSION = "7.6"
VERSION_RE = re.compile(r"^[0-9a-f]{32}$")

BULK = [f"bulk-{index:02d}" for index in range(30)]
SECRETS: dict[str, Any] = {
    "db-password": "hunter2",
    "rotated": {"versions": ["one", "two"], "value": "three"},
    "switched-off": {"value": "hidden", "enabled": False},
    "annotated": {
        "value": "with attributes",
        "content_type": "text/plain",
        "tags": {"env": "test"},
        "not_before": 1_600_000_000,
        "expires_on": 4_100_000_000,
    },
    **{name: f"value of {name}" for name in BULK},
}

UAMI_A = UserAssignedIdentity(
    client_id="aaaaaaaa-0000-4000-8000-00000000000a",
    object_id="aaaaaaaa-0000-4000-8000-0000000000a0",
    msi_res_id="/subscriptions/s/resourcegroups/rg/providers/"
    "Microsoft.ManagedIdentity/userAssignedIdentities/id-a",
)
UAMI_B = UserAssignedIdentity(
    client_id="bbbbbbbb-0000-4000-8000-00000000000b",
    object_id="bbbbbbbb-0000-4000-8000-0000000000b0",
    msi_res_id="/subscriptions/s/resourcegroups/rg/providers/"
    "Microsoft.ManagedIdentity/userAssignedIdentities/id-b",
)


# ---------------------------------------------------------------------------
# Recordings


@dataclass(frozen=True)
class Recorded:
    """One recorded response: status, lower-cased headers and the raw body text."""

    uri: str
    status: int
    headers: dict[str, str]
    body: str

    def json(self) -> Any:
        return json.loads(self.body)


def recordings_dir() -> Path:
    """The recordings directory, or skip the calling test when there is none."""
    for candidate in RECORDINGS_CANDIDATES:
        if candidate and Path(candidate, "README.md").is_file():
            return Path(candidate)
    pytest.skip("docs/recordings not found (set KV_AGENT_RECORDINGS to its path)")


def recorded(filename: str) -> list[Recorded]:
    """The responses of a vcrpy cassette (.yaml) or a test-proxy recording (.json).

    Looks in every candidate directory, so KV_AGENT_RECORDINGS can add files that
    tests/recordings leaves out (those carrying a real tenant id); skips when absent.
    """
    recordings_dir()
    found = [
        Path(candidate, filename)
        for candidate in RECORDINGS_CANDIDATES
        if candidate and Path(candidate, filename).is_file()
    ]
    if not found:
        pytest.skip(f"{filename} not found (set KV_AGENT_RECORDINGS to docs/recordings)")
    path = found[0]
    if path.suffix == ".yaml":
        cassette = yaml.safe_load(path.read_text(encoding="utf-8"))
        return [
            Recorded(
                uri=item["request"]["uri"],
                status=item["response"]["status"]["code"],
                headers={
                    name.lower(): " ".join(values)
                    if isinstance(values, list)
                    else values
                    for name, values in item["response"]["headers"].items()
                },
                body=item["response"]["body"]["string"],
            )
            for item in cassette["interactions"]
        ]
    entries = json.loads(path.read_text(encoding="utf-8"))["Entries"]
    return [
        Recorded(
            uri=entry["RequestUri"],
            status=entry["StatusCode"],
            headers={
                name.lower(): value for name, value in entry["ResponseHeaders"].items()
            },
            # The recorder stores the wire body parsed; the wire form was compact JSON
            # (recordings/README.md: every Content-Length equals the compact length).
            body=compact(entry["ResponseBody"]),
        )
        for entry in entries
    ]


def compact(value: object) -> str:
    """JSON as the real services put it on the wire."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def shape(value: object) -> object:
    """The structure of a JSON value: keys in order, and a type name for every leaf."""
    if isinstance(value, dict):
        return [(key, shape(item)) for key, item in value.items()]
    if isinstance(value, list):
        return [shape(item) for item in value[:1]]
    return type(value).__name__


# ---------------------------------------------------------------------------
# Fixtures and helpers


@pytest.fixture(scope="module")
def emulator_secrets() -> dict[str, Any]:
    """What the module's emulators serve: ``emulator`` for the tests that change no state,
    ``fresh_emulator`` for a test that injects faults or changes secrets."""
    return SECRETS


class FakeClock:
    """A settable epoch clock for the emulator's tokens and secrets."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def imds_get(
    emulator: Emulator,
    params: Mapping[str, str] | None = None,
    headers: Mapping[str, str] | None = None,
) -> requests.Response:
    """One token request; defaults to a well-formed Key Vault token request."""
    return requests.get(
        emulator.imds_endpoint,
        params=dict(IMDS_PARAMS if params is None else params),
        headers=dict(METADATA if headers is None else headers),
        timeout=5,
    )


def token(emulator: Emulator, resource: str = KV_RESOURCE, **selector: str) -> str:
    """An access token from the emulator's IMDS."""
    response = imds_get(emulator, {**IMDS_PARAMS, "resource": resource, **selector})
    assert response.status_code == 200, response.text
    value = response.json()["access_token"]
    assert isinstance(value, str)
    return value


def claims(jwt: str) -> dict[str, Any]:
    """The (unverified) payload of a JWT."""
    payload = jwt.split(".")[1]
    decoded = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    assert isinstance(decoded, dict)
    return decoded


def session(emulator: Emulator, bearer: str | None = None) -> requests.Session:
    """A keep-alive HTTPS session trusting the emulator's CA, ignoring proxy variables."""
    result = requests.Session()
    result.verify = emulator.ca_path
    result.trust_env = False
    if bearer is not None:
        result.headers["Authorization"] = f"Bearer {bearer}"
    return result


def vault_get(
    emulator: Emulator,
    path: str,
    bearer: str | None = None,
    params: Mapping[str, str] | None = None,
    headers: Mapping[str, str] | None = None,
) -> requests.Response:
    """One vault GET of ``path`` with api-version 7.6 unless ``params`` says otherwise."""
    with session(emulator, bearer) as client:
        return client.get(
            emulator.vault_url + path,
            params=dict({"api-version": API_VERSION} if params is None else params),
            headers=dict(headers or {}),
            timeout=5,
        )


def error_of(response: requests.Response) -> dict[str, Any]:
    """The ``error`` object of a KeyVaultError body (protocol.md B5)."""
    body = response.json()
    assert list(body) == ["error"], body
    error = body["error"]
    assert isinstance(error, dict)
    return error


def follow_pages(
    emulator: Emulator, bearer: str, path: str, params: Mapping[str, str]
) -> list[dict[str, Any]]:
    """Every page of a list, following ``nextLink`` verbatim as clients must."""
    pages = []
    with session(emulator, bearer) as client:
        response = client.get(emulator.vault_url + path, params=dict(params), timeout=5)
        while True:
            assert response.status_code == 200, response.text
            page = response.json()
            pages.append(page)
            if page["nextLink"] is None:
                return pages
            assert len(pages) < 100, "nextLink never ends"
            response = client.get(page["nextLink"], timeout=5)


# ---------------------------------------------------------------------------
# IMDS: token responses


@pytest.mark.parametrize(
    "filename", ["imds__py__test_imds_credential.test_system_assigned.yaml"],
)
def test_imds_token_has_the_recorded_shape(emulator: Emulator, filename: str) -> None:
    """A token response has the recorded status, content type, keys in order and string values."""
    real = recorded(filename)[1]
    response = imds_get(
        emulator, {**IMDS_PARAMS, "resource": "https://management.azure.com"}
    )

    assert (response.status_code, real.status) == (200, 200)
    assert response.headers["Content-Type"] == real.headers["content-type"]
    assert response.headers["Server"].startswith("IMDS/")
    assert shape(response.json()) == shape(real.json())
    assert all(isinstance(value, str) for value in response.json().values())


def test_imds_token_values_are_consistent(emulator: Emulator) -> None:
    """The resource is echoed verbatim and the string times agree with the JWT's claims."""
    before = int(time.time())
    body = imds_get(emulator, {**IMDS_PARAMS, "resource": KV_RESOURCE + "/"}).json()
    after = int(time.time())

    assert body["resource"] == KV_RESOURCE + "/"
    assert body["token_type"] == "Bearer"
    payload = claims(body["access_token"])
    assert payload["aud"] == KV_RESOURCE + "/"
    assert int(body["expires_on"]) == payload["exp"]
    assert int(body["not_before"]) == payload["nbf"]
    assert before <= int(body["expires_on"]) - int(body["expires_in"]) <= after
    # Real managed-identity tokens: exp - nbf = 86700 s, ext_expires_in 86399 (A2).
    assert payload["exp"] - payload["nbf"] == 86700
    assert body["ext_expires_in"] == "86399"
    assert payload["iss"] == f"https://sts.windows.net/{emulator.tenant_id}/"
    assert payload["appid"] == body["client_id"]


def test_imds_caches_tokens_so_expires_in_counts_down() -> None:
    """A repeated request returns the same token with a smaller expires_in, as IMDS's cache does."""
    clock = FakeClock()
    with Emulator({}, clock=clock) as emulator:
        first = imds_get(emulator).json()
        clock.now += 100
        second = imds_get(emulator).json()

    assert second["access_token"] == first["access_token"]
    assert int(first["expires_in"]) - int(second["expires_in"]) == 100
    assert second["expires_on"] == first["expires_on"]


def test_imds_missing_metadata_header_matches_recording(emulator: Emulator) -> None:
    """Without Metadata: true the answer is the recorded 400 body, byte for byte."""
    for filename in ("imds__py__test_imds_credential.test_system_assigned.yaml",):
        real = recorded(filename)[0]
        response = imds_get(emulator, headers={})

        assert response.status_code == real.status == 400
        assert response.content == compact(real.json()).encode()
        assert (
            response.headers["Content-Length"] == real.headers["content-length"] == "88"
        )
        assert response.headers["Content-Type"] == real.headers["content-type"]


@pytest.mark.parametrize(
    ("params", "headers", "description"),
    [
        pytest.param(
            {"api-version": "2018-02-01"},
            METADATA,
            "Required query variable 'resource' is missing",
            id="no-resource",
        ),
        pytest.param(
            {"resource": KV_RESOURCE},
            METADATA,
            "Required query variable 'api-version' is missing",
            id="no-api-version",
        ),
        pytest.param(
            {**IMDS_PARAMS, "api-version": "2017-12-01"},
            METADATA,
            "Invalid api-version '2017-12-01'",
            id="api-version-before-identity-category",
        ),
        pytest.param(
            IMDS_PARAMS,
            {"Metadata": "True"},
            "Required metadata header not specified",
            id="metadata-not-lower-case",
        ),
        pytest.param(
            IMDS_PARAMS,
            {**METADATA, "X-Forwarded-For": "10.0.0.1"},
            "Request was forwarded; X-Forwarded-For is not allowed",
            id="forwarded",
        ),
        pytest.param(
            {**IMDS_PARAMS, "client_id": "x", "object_id": "y"},
            METADATA,
            "Only one of client_id, object_id, msi_res_id may be specified",
            id="two-selectors",
        ),
        pytest.param(
            {**IMDS_PARAMS, "client_id": "no-such-identity"},
            METADATA,
            "Identity not found",
            id="unknown-client-id",
        ),
    ],
)
def test_imds_bad_requests_get_oauth_errors(
    emulator: Emulator,
    params: dict[str, str],
    headers: dict[str, str],
    description: str,
) -> None:
    """A malformed token request gets 400 with the OAuth error shape the recordings show."""
    response = imds_get(emulator, params, headers)

    assert response.status_code == 400
    assert response.json() == {
        "error": "invalid_request",
        "error_description": description,
    }


def test_imds_rejects_duplicate_query_parameters(emulator: Emulator) -> None:
    """A repeated query parameter name is refused, as DOC-IMDS says."""
    url = emulator.imds_endpoint + "?api-version=2018-02-01&resource=a&resource=b"
    response = requests.get(url, headers=METADATA, timeout=5)

    assert response.status_code == 400
    assert response.json()["error"] == "invalid_request"


def test_imds_other_methods_and_paths_are_refused(emulator: Emulator) -> None:
    """Only GET of the token path is served: POST gets 405 and another path 404."""
    post = requests.post(
        emulator.imds_endpoint, params=IMDS_PARAMS, headers=METADATA, timeout=5
    )
    other = requests.get(
        emulator.imds_base + "/metadata/instance",
        params=IMDS_PARAMS,
        headers=METADATA,
        timeout=5,
    )

    assert post.status_code == 405
    assert other.status_code == 404
    assert list(post.json()) == list(other.json()) == ["error", "error_description"]


def test_imds_accepts_the_token_path_with_a_trailing_slash(emulator: Emulator) -> None:
    """``.../oauth2/token/``, which msal-node sends when the IMDS host is overridden, gets a token."""
    response = requests.get(
        emulator.imds_endpoint + "/", params=IMDS_PARAMS, headers=METADATA, timeout=5
    )

    assert response.status_code == 200, response.text
    assert claims(response.json()["access_token"])["aud"] == KV_RESOURCE


@pytest.fixture(scope="module")
def two_identities() -> Iterator[Emulator]:
    """A VM with a system-assigned identity and two user-assigned ones."""
    config = IdentityConfig(system_assigned=True, user_assigned=(UAMI_A, UAMI_B))
    with Emulator({}, identities=config) as started:
        yield started


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        ({}, None),
        ({"client_id": UAMI_B.client_id}, UAMI_B),
        ({"client_id": UAMI_A.client_id.upper()}, UAMI_A),
        ({"object_id": UAMI_B.object_id}, UAMI_B),
        ({"msi_res_id": UAMI_A.msi_res_id}, UAMI_A),
    ],
)
def test_imds_selects_the_requested_identity(
    two_identities: Emulator,
    selector: dict[str, str],
    expected: UserAssignedIdentity | None,
) -> None:
    """A selector picks that user-assigned identity; none picks the system-assigned one."""
    body = imds_get(two_identities, {**IMDS_PARAMS, **selector}).json()
    payload = claims(body["access_token"])

    if expected is None:
        assert body["client_id"] not in (UAMI_A.client_id, UAMI_B.client_id)
    else:
        assert body["client_id"] == expected.client_id
        assert payload["oid"] == expected.object_id
        assert payload["xms_mirid"] == expected.msi_res_id
    assert payload["appid"] == body["client_id"]


@pytest.mark.parametrize(
    ("config", "outcome"),
    [
        (IdentityConfig(system_assigned=False), "Identity not found"),
        (
            IdentityConfig(system_assigned=False, user_assigned=(UAMI_A,)),
            UAMI_A.client_id,
        ),
        (
            IdentityConfig(system_assigned=False, user_assigned=(UAMI_A, UAMI_B)),
            (
                "Multiple user assigned identities exist, please specify the clientId / "
                "resourceId of the identity in the token request"
            ),
        ),
    ],
    ids=["no-identity", "one-user-assigned", "several-user-assigned"],
)
def test_imds_without_selector_follows_the_vm_identities(
    config: IdentityConfig, outcome: str
) -> None:
    """With no selector IMDS answers for the only identity, or 400 when there is none or several."""
    with Emulator({}, identities=config) as emulator:
        response = imds_get(emulator)

    if outcome == UAMI_A.client_id:
        assert response.status_code == 200
        assert response.json()["client_id"] == outcome
    else:
        assert response.status_code == 400
        assert response.json() == {
            "error": "invalid_request",
            "error_description": outcome,
        }


# ---------------------------------------------------------------------------
# Key Vault: authentication


KV_RECORDED_HEADERS = (
    "cache-control",
    "pragma",
    "expires",
    "content-type",
    "strict-transport-security",
    "x-content-type-options",
    "x-ms-keyvault-network-info",
    "x-ms-keyvault-region",
    "x-ms-keyvault-service-version",
    "x-ms-request-id",
)


@pytest.mark.parametrize(
    "path",
    [
        "/secrets/db-password/",
        "/secrets/no-such-secret",
        "/secrets",
        "/secrets/x/versions",
    ],
)
def test_vault_challenge_matches_recording(emulator: Emulator, path: str) -> None:
    """Any request without a token gets the recorded 401: same challenge, body and headers."""
    real = recorded("keyvault__js__recording_can_get_a_secret.json")[0]
    response = vault_get(emulator, path, headers={"x-ms-client-request-id": "req-1"})

    assert response.status_code == real.status == 401
    # Recorded with tenant 12345678-...; the authority host is login.windows.net in
    # every real vault recording (protocol.md B6, E8).
    expected = re.sub(
        r"/[0-9a-f-]{36}\"", f'/{emulator.tenant_id}"', real.headers["www-authenticate"]
    )
    assert response.headers["WWW-Authenticate"] == expected
    assert response.content == real.body.encode()
    assert response.headers["Content-Length"] == real.headers["content-length"] == "97"
    for name in KV_RECORDED_HEADERS:
        assert name in response.headers, name
        if name not in (
            "x-ms-keyvault-network-info",
            "x-ms-keyvault-region",
            "x-ms-request-id",
        ):
            assert response.headers[name] == real.headers[name], name
    assert response.headers["x-ms-client-request-id"] == "req-1"


@pytest.mark.parametrize(
    "authorization",
    ["", "Bearer", "Bearer   ", "Basic dXNlcjpwYXNz", "PoP abc"],
    ids=["empty", "bearer-only", "bearer-blank", "basic", "pop"],
)
def test_vault_without_bearer_token_is_challenged(
    emulator: Emulator, authorization: str
) -> None:
    """An Authorization header without a bearer token is the same as none: 401 AKV10000."""
    response = vault_get(
        emulator, "/secrets/db-password", headers={"Authorization": authorization}
    )

    assert response.status_code == 401
    assert "WWW-Authenticate" in response.headers
    assert error_of(response) == {
        "code": "Unauthorized",
        "message": "AKV10000: Request is missing a Bearer or PoP token.",
    }


@pytest.mark.parametrize(
    ("resource", "found"),
    [
        (KV_RESOURCE + "/", "https://vault.azure.net/"),
        ("https://management.azure.com", "https://management.azure.com"),
    ],
)
def test_vault_rejects_a_token_for_another_audience(
    emulator: Emulator, resource: str, found: str
) -> None:
    """A token for another resource, even with a trailing slash, gets 401 AKV10022 and a challenge."""
    response = vault_get(emulator, "/secrets/db-password", token(emulator, resource))

    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer authorization=")
    assert error_of(response) == {
        "code": "Unauthorized",
        "message": f"AKV10022: Invalid audience. Expected https://vault.azure.net, found: {found}.",
    }


def test_vault_rejects_a_forged_or_foreign_token(emulator: Emulator) -> None:
    """A token with a bad signature, or minted by another emulator, gets 401 AKV10046."""
    good = token(emulator)
    header, payload, signature = good.split(".")
    forged = f"{header}.{payload}.{signature[:-4]}AAAA"
    with Emulator({}) as other:
        foreign = token(other)

    for bad in (forged, foreign, "not-a-jwt"):
        response = vault_get(emulator, "/secrets/db-password", bad)
        assert response.status_code == 401
        assert error_of(response) == {
            "code": "Unauthorized",
            "message": "AKV10046: Unable to resolve the key used for signature validation",
        }


def test_vault_rejects_an_expired_token() -> None:
    """A token past its exp gets 401 with a challenge, so clients fetch a new one."""
    clock = FakeClock()
    with Emulator(SECRETS, clock=clock) as emulator:
        emulator.token_lifetime_s = 600
        old = token(emulator)
        assert vault_get(emulator, "/secrets/db-password", old).status_code == 200
        clock.now += 601
        response = vault_get(emulator, "/secrets/db-password", old)

    assert response.status_code == 401
    assert "WWW-Authenticate" in response.headers
    assert error_of(response)["code"] == "Unauthorized"


# ---------------------------------------------------------------------------
# Key Vault: get secret


@pytest.fixture(scope="module")
def bearer(emulator: Emulator) -> str:
    """A valid Key Vault token from the module's emulator."""
    return token(emulator)


def test_vault_get_secret_has_the_recorded_shape(
    emulator: Emulator, bearer: str
) -> None:
    """GET of a secret answers a SecretBundle with the recorded keys, order, types and headers."""
    real = recorded("keyvault__js__recording_can_get_a_secret.json")[2]
    response = vault_get(emulator, "/secrets/db-password/", bearer)

    assert response.status_code == real.status == 200
    assert shape(response.json()) == shape(real.json())
    assert response.json()["value"] == "hunter2"
    for name in KV_RECORDED_HEADERS:
        assert name in response.headers, name
    assert response.headers["Content-Type"] == real.headers["content-type"]


def test_vault_get_secret_with_attributes_keeps_the_wire_key_order(
    emulator: Emulator, bearer: str
) -> None:
    """Optional fields appear in the documented wire order: value, contentType, id, attributes, tags."""
    body = vault_get(emulator, "/secrets/annotated", bearer).json()

    assert list(body) == ["value", "contentType", "id", "attributes", "tags"]
    assert list(body["attributes"]) == [
        "enabled",
        "nbf",
        "exp",
        "created",
        "updated",
        "recoveryLevel",
        "recoverableDays",
    ]
    assert body["contentType"] == "text/plain"
    assert body["tags"] == {"env": "test"}
    assert (body["attributes"]["nbf"], body["attributes"]["exp"]) == (
        1_600_000_000,
        4_100_000_000,
    )


@pytest.mark.parametrize(
    "path", ["/secrets/rotated", "/secrets/rotated/", "/secrets/ROTATED"]
)
def test_vault_get_latest_version(emulator: Emulator, bearer: str, path: str) -> None:
    """All forms of "latest" (with or without a trailing slash, any case) answer the newest value with a versioned id."""
    body = vault_get(emulator, path, bearer).json()

    assert body["value"] == "three"
    prefix, version = body["id"].rsplit("/", 1)
    assert prefix == f"{emulator.vault_url}/secrets/rotated"
    assert VERSION_RE.match(version)


def test_vault_get_pinned_versions(emulator: Emulator, bearer: str) -> None:
    """GET of /secrets/<name>/<version> answers that version's value and id."""
    versions = follow_pages(
        emulator, bearer, "/secrets/rotated/versions", {"api-version": API_VERSION}
    )[0]["value"]
    ids = [item["id"] for item in versions]

    values = []
    for secret_id in ids:
        version = secret_id.rsplit("/", 1)[1]
        body = vault_get(emulator, f"/secrets/rotated/{version}", bearer).json()
        assert body["id"] == secret_id
        values.append(body["value"])
    assert values == ["one", "two", "three"]


@pytest.mark.parametrize(
    ("path", "label"),
    [
        ("/secrets/no-such-secret/", "no-such-secret"),
        (
            "/secrets/rotated/0123456789abcdef0123456789abcdef",
            "rotated/0123456789abcdef0123456789abcdef",
        ),
        ("/secrets/rotated/not-a-version", "rotated/not-a-version"),
    ],
)
def test_vault_missing_secret_matches_recording(
    emulator: Emulator, bearer: str, path: str, label: str
) -> None:
    """A missing secret or version gets the recorded 404 SecretNotFound text with its name/id."""
    real = recorded("keyvault__js__recording_can_get_a_secret_non_existing.json")[1]
    recorded_name = "CRUDSecretName-cangetasecretNonExisting-"
    response = vault_get(emulator, path, bearer)

    assert response.status_code == real.status == 404
    assert response.content == real.body.replace(recorded_name, label).encode()


def test_vault_disabled_secret_matches_recording(
    emulator: Emulator, bearer: str
) -> None:
    """A disabled secret gets the recorded 403 Forbidden/SecretDisabled body, byte for byte."""
    real = recorded("keyvault__js__recording_cant_get_a_disabled_secret.json")[2]
    response = vault_get(emulator, "/secrets/switched-off/", bearer)

    assert response.status_code == real.status == 403
    assert response.content == real.body.encode()
    assert response.headers["Content-Length"] == real.headers["content-length"] == "132"


@pytest.mark.parametrize(
    ("params", "status"),
    [
        ({}, 400),
        ({"api-version": "1.0"}, 400),
        ({"api-version": "7.0"}, 200),
        ({"api-version": "7.4-preview.1"}, 200),
        ({"api-version": "2025-07-01"}, 200),
        ({"api-version": "2026-04-01"}, 200),
    ],
)
def test_vault_api_version_is_required_and_checked(
    emulator: Emulator, bearer: str, params: dict[str, str], status: int
) -> None:
    """api-version has no default: missing or unknown gets 400 BadParameter, known ones work."""
    response = vault_get(emulator, "/secrets/db-password", bearer, params=params)

    assert response.status_code == status
    if status == 400:
        assert error_of(response)["code"] == "BadParameter"


def test_vault_invalid_secret_name_is_a_bad_parameter(
    emulator: Emulator, bearer: str
) -> None:
    """A name outside 0-9a-zA-Z- gets 400 BadParameter with the real wording."""
    response = vault_get(emulator, "/secrets/bad_name", bearer)

    assert response.status_code == 400
    assert error_of(response) == {
        "code": "BadParameter",
        "message": "The request URI contains an invalid name: bad_name",
    }


# ---------------------------------------------------------------------------
# Key Vault: lists and paging


def test_vault_list_secrets_pages_like_the_recording(
    emulator: Emulator, bearer: str
) -> None:
    """maxresults pages carry a :port nextLink with opaque $skiptoken and maxresults, ending in null."""
    real = next(
        item
        for item in recorded("keyvault__js__recording_can_list_secrets_by_page.json")
        if "/secrets?" in item.uri and item.status == 200 and item.json()["value"]
    )
    pages = follow_pages(
        emulator, bearer, "/secrets", {"api-version": API_VERSION, "maxresults": "7"}
    )

    names = [item["id"].rsplit("/", 1)[1] for page in pages for item in page["value"]]
    assert sorted(names) == sorted(SECRETS)
    assert len(names) == len(set(names))
    assert [len(page["value"]) for page in pages[:-1]] == [7] * (len(pages) - 1)
    port = emulator.vault_url.rsplit(":", 1)[1]
    link = re.compile(
        rf"^https://127\.0\.0\.1:{port}/secrets\?api-version=7\.6&\$skiptoken=[A-Za-z0-9_-]+&maxresults=7$"
    )
    assert all(link.match(page["nextLink"]) for page in pages[:-1])
    assert "nextLink" in pages[-1] and pages[-1]["nextLink"] is None
    # Same page and item structure as the real list (no value, unversioned id).
    real_page = real.json()
    assert list(pages[0]) == list(real_page) == ["value", "nextLink"]
    plain = next(item for item in pages[-1]["value"] if "/bulk-" in item["id"])
    assert shape(plain) == shape(real_page["value"][0])
    assert all(item["id"].count("/") == 4 for page in pages for item in page["value"])


def test_vault_list_default_page_is_25(emulator: Emulator, bearer: str) -> None:
    """Without maxresults a page holds 25 items and the nextLink carries no maxresults."""
    pages = follow_pages(emulator, bearer, "/secrets", {"api-version": API_VERSION})

    assert [len(page["value"]) for page in pages] == [25, len(SECRETS) - 25]
    assert "maxresults" not in pages[0]["nextLink"]


def test_vault_list_versions_pages_with_versioned_ids(
    emulator: Emulator, bearer: str
) -> None:
    """/versions lists every version oldest first, one per page with maxresults=1, without values."""
    pages = follow_pages(
        emulator,
        bearer,
        "/secrets/rotated/versions",
        {"api-version": API_VERSION, "maxresults": "1"},
    )

    items = [item for page in pages for item in page["value"]]
    assert len(items) == 3 and len(pages) == 3
    assert all(VERSION_RE.match(item["id"].rsplit("/", 1)[1]) for item in items)
    assert all("value" not in item for item in items)
    assert "/secrets/rotated/versions?api-version=7.6&$skiptoken=" in str(
        pages[0]["nextLink"]
    )
    assert pages[-1]["nextLink"] is None


def test_vault_versions_of_missing_secret_matches_recording(
    emulator: Emulator, bearer: str
) -> None:
    """Listing versions of a missing secret answers the recorded 200 empty list, not 404."""
    real = recorded(
        "keyvault__js__recording_can_list_secret_versions_non_existing.json"
    )[1]
    response = vault_get(emulator, "/secrets/no-such-secret/versions", bearer)

    assert response.status_code == real.status == 200
    assert response.content == real.body.encode()
    assert response.headers["Content-Length"] == real.headers["content-length"] == "28"


@pytest.mark.parametrize("maxresults", ["0", "26", "-1", "abc"])
def test_vault_list_rejects_maxresults_outside_1_to_25(
    emulator: Emulator, bearer: str, maxresults: str
) -> None:
    """maxresults must be 1-25: anything else gets 400 BadParameter."""
    response = vault_get(
        emulator,
        "/secrets",
        bearer,
        params={"api-version": API_VERSION, "maxresults": maxresults},
    )

    assert response.status_code == 400
    assert error_of(response)["code"] == "BadParameter"


def test_vault_list_rejects_a_forged_skiptoken(emulator: Emulator, bearer: str) -> None:
    """A $skiptoken the vault did not issue gets 400 BadParameter."""
    response = vault_get(
        emulator,
        "/secrets",
        bearer,
        params={"api-version": API_VERSION, "$skiptoken": "garbage"},
    )

    assert response.status_code == 400
    assert error_of(response)["code"] == "BadParameter"


def test_vault_paging_survives_changes_between_pages(fresh_emulator: Emulator) -> None:
    """A secret added before the cursor position between pages does not shift or repeat items."""
    bearer = token(fresh_emulator)
    params = {"api-version": API_VERSION, "maxresults": "5"}
    with session(fresh_emulator, bearer) as client:
        first = client.get(
            fresh_emulator.vault_url + "/secrets", params=params, timeout=5
        ).json()
        fresh_emulator.set_secret("aaa-new", "early")
        second = client.get(first["nextLink"], timeout=5).json()

    seen = [item["id"].rsplit("/", 1)[1] for item in first["value"] + second["value"]]
    assert len(seen) == len(set(seen)) == 10
    assert "aaa-new" not in seen


# ---------------------------------------------------------------------------
# Key Vault: state changes


def test_vault_reflects_set_disable_enable_and_delete(fresh_emulator: Emulator) -> None:
    """Changes made through the Python API are visible to the next request."""
    bearer = token(fresh_emulator)
    version = fresh_emulator.set_secret("db-password", "rotated-value")
    body = vault_get(fresh_emulator, "/secrets/db-password", bearer).json()
    assert (body["value"], body["id"].rsplit("/", 1)[1]) == ("rotated-value", version)

    fresh_emulator.disable_secret("db-password")
    assert vault_get(fresh_emulator, "/secrets/db-password", bearer).status_code == 403
    fresh_emulator.enable_secret("db-password")
    assert vault_get(fresh_emulator, "/secrets/db-password", bearer).status_code == 200
    fresh_emulator.delete_secret("db-password")
    assert vault_get(fresh_emulator, "/secrets/db-password", bearer).status_code == 404
    with pytest.raises(KeyError):
        fresh_emulator.delete_secret("db-password")


@pytest.mark.parametrize(
    ("inner_code", "fragment"),
    [
        ("AccessDenied", "does not have secrets get permission"),
        ("ForbiddenByRbac", "Caller is not authorized to perform action on resource."),
        ("ForbiddenByFirewall", "Client address: 127.0.0.1"),
        ("ForbiddenByPolicy", "Operation is not allowed."),
    ],
)
def test_vault_forbidden_secret_carries_the_inner_code(
    fresh_emulator: Emulator, inner_code: str, fragment: str
) -> None:
    """forbid_secret makes GET answer 403 Forbidden with that innererror code, until allow_secret."""
    bearer = token(fresh_emulator)
    fresh_emulator.forbid_secret("db-password", inner_code)
    response = vault_get(fresh_emulator, "/secrets/db-password", bearer)

    assert response.status_code == 403
    error = error_of(response)
    assert (error["code"], error["innererror"]) == ("Forbidden", {"code": inner_code})
    assert fragment in error["message"]
    fresh_emulator.allow_secret("db-password")
    assert vault_get(fresh_emulator, "/secrets/db-password", bearer).status_code == 200


# ---------------------------------------------------------------------------
# Fault injection


def test_vault_throttling_fault_sends_429_with_retry_after(fresh_emulator: Emulator) -> None:
    """An injected 429 answers Throttled with the real message and Retry-After, then service resumes."""
    bearer = token(fresh_emulator)
    fresh_emulator.inject_fault("vault", 429, retry_after="3")
    throttled = vault_get(fresh_emulator, "/secrets/db-password", bearer)
    after = vault_get(fresh_emulator, "/secrets/db-password", bearer)

    assert throttled.status_code == 429
    assert throttled.headers["Retry-After"] == "3"
    assert error_of(throttled) == {"code": "Throttled", "message": KV_THROTTLED}
    assert after.status_code == 200


def test_faults_apply_before_authentication_and_count_down(fresh_emulator: Emulator) -> None:
    """A fault hits the next ``count`` matching requests, even unauthenticated ones, then stops."""
    fresh_emulator.inject_fault("vault", 503, count=2)
    statuses = [vault_get(fresh_emulator, "/secrets/db-password").status_code for _ in range(3)]

    assert statuses == [503, 503, 401]
    assert [record.status for record in fresh_emulator.vault_log] == statuses


@pytest.mark.parametrize("status", [404, 410, 429, 500, 503])
def test_imds_faults_use_the_oauth_error_shape(fresh_emulator: Emulator, status: int) -> None:
    """An injected IMDS error answers the OAuth error JSON with the IMDS content type."""
    fresh_emulator.inject_fault("imds", status, retry_after="1")
    response = imds_get(fresh_emulator)

    assert response.status_code == status
    assert list(response.json()) == ["error", "error_description"]
    assert response.headers["Content-Type"] == "application/json; charset=utf-8"
    assert response.headers["Retry-After"] == "1"
    assert imds_get(fresh_emulator).status_code == 200


def test_fault_path_contains_restricts_the_fault(fresh_emulator: Emulator) -> None:
    """A fault with path_contains leaves other paths and the other service alone."""
    bearer = token(fresh_emulator)
    fresh_emulator.inject_fault("vault", 500, path_contains="/secrets/rotated")

    assert vault_get(fresh_emulator, "/secrets/db-password", bearer).status_code == 200
    assert imds_get(fresh_emulator).status_code == 200
    response = vault_get(fresh_emulator, "/secrets/rotated", bearer)
    assert response.status_code == 500
    assert list(error_of(response)) == ["code", "message"]
    assert vault_get(fresh_emulator, "/secrets/rotated", bearer).status_code == 200


@pytest.mark.parametrize("service", ["imds", "vault"])
def test_dropped_connection_fault_closes_without_answer(
    fresh_emulator: Emulator, service: str
) -> None:
    """drop=True closes the connection without a response and logs status 0."""
    fresh_emulator.inject_fault(service, drop=True)
    with pytest.raises(requests.ConnectionError):
        if service == "imds":
            imds_get(fresh_emulator)
        else:
            vault_get(fresh_emulator, "/secrets/db-password")

    log = fresh_emulator.imds_log if service == "imds" else fresh_emulator.vault_log
    assert [record.status for record in log] == [0]
    assert (
        imds_get(fresh_emulator) if service == "imds" else vault_get(fresh_emulator, "/secrets/x")
    ).status_code in (200, 401)


def test_delay_fault_slows_one_request(fresh_emulator: Emulator) -> None:
    """delay_s without a status answers normally, but only after the delay."""
    fresh_emulator.inject_fault("imds", delay_s=0.2)
    started = time.perf_counter()
    slow = imds_get(fresh_emulator)
    slow_s = time.perf_counter() - started
    started = time.perf_counter()
    imds_get(fresh_emulator)
    fast_s = time.perf_counter() - started

    assert slow.status_code == 200
    assert slow_s >= 0.2
    assert fast_s < 0.2


def test_fault_with_delay_and_status_times_out_a_client(fresh_emulator: Emulator) -> None:
    """A delay longer than the client's read timeout looks like a hung service to the client."""
    fresh_emulator.inject_fault("imds", 500, delay_s=0.5)
    with pytest.raises(requests.ReadTimeout):
        requests.get(
            fresh_emulator.imds_endpoint, params=IMDS_PARAMS, headers=METADATA, timeout=0.1
        )


@pytest.mark.parametrize(
    "kwargs",
    [
        {"service": "storage", "status": 500},
        {"service": "vault", "status": 500, "count": 0},
        {"service": "vault"},
        {"service": "vault", "status": 200},
    ],
    ids=["unknown-service", "zero-count", "no-effect", "success-without-body"],
)
def test_inject_fault_rejects_meaningless_faults(
    emulator: Emulator, kwargs: dict[str, Any]
) -> None:
    """A fault that names no service, hits nothing or does nothing is a ValueError."""
    with pytest.raises(ValueError):
        emulator.inject_fault(**kwargs)


def test_clear_faults_forgets_queued_faults(fresh_emulator: Emulator) -> None:
    """After clear_faults the service answers normally again."""
    fresh_emulator.inject_fault("imds", 500, count=5)
    fresh_emulator.clear_faults()

    assert imds_get(fresh_emulator).status_code == 200


# ---------------------------------------------------------------------------
# Latency and concurrency


def test_latency_is_added_to_every_request(fresh_emulator: Emulator) -> None:
    """latency_s delays each request of both services by at least that long."""
    bearer = token(fresh_emulator)
    fresh_emulator.latency_s = 0.15
    requests_to_time: list[Callable[[], requests.Response]] = [
        lambda: imds_get(fresh_emulator),
        lambda: vault_get(fresh_emulator, "/secrets/db-password", bearer),
    ]
    timings = []
    for request in requests_to_time:
        started = time.perf_counter()
        assert request().status_code == 200
        timings.append(time.perf_counter() - started)

    assert min(timings) >= 0.15
    assert max(timings) < 1.0


def test_latency_is_slept_per_connection_so_requests_overlap(fresh_emulator: Emulator) -> None:
    """Eight concurrent requests with latency_s=0.25 finish in about 0.25 s, not 2 s."""
    fresh_emulator.latency_s = 0.25
    statuses: list[int] = []
    threads = [
        threading.Thread(target=lambda: statuses.append(imds_get(fresh_emulator).status_code))
        for _ in range(8)
    ]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started

    assert statuses == [200] * 8
    assert 0.25 <= elapsed < 1.0


def run_concurrently(
    clients: int,
    total: int,
    request: Callable[[requests.Session], requests.Response],
    make_session: Callable[[], requests.Session],
) -> tuple[float, list[list[float]]]:
    """Start ``clients`` threads together, each on its own keep-alive session, sharing ``total`` requests.

    Returns the wall time and, per client, every request's duration in order
    (the first one includes the connect and the TLS handshake).
    """
    barrier = threading.Barrier(clients + 1)
    durations: list[list[float]] = [[] for _ in range(clients)]
    errors: list[Exception] = []

    def work(index: int) -> None:
        count = total // clients + (1 if index < total % clients else 0)
        with make_session() as client:
            barrier.wait()
            try:
                for _ in range(count):
                    started = time.perf_counter()
                    response = request(client)
                    durations[index].append(time.perf_counter() - started)
                    assert response.status_code == 200, response.text
            except (
                AssertionError,
                requests.RequestException,
            ) as exc:  # re-raised below
                errors.append(exc)

    threads = [threading.Thread(target=work, args=(index,)) for index in range(clients)]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise errors[0]
    return elapsed, durations


def test_concurrent_keepalive_clients_do_not_stall(
    emulator: Emulator, bearer: str
) -> None:
    """16 clients connecting at once and making 100 vault GETs finish well under 1 s, with no stalled request."""
    url = emulator.vault_url + "/secrets/db-password"

    elapsed, durations = run_concurrently(
        16,
        100,
        lambda client: client.get(url, params={"api-version": API_VERSION}, timeout=5),
        lambda: session(emulator, bearer),
    )

    assert sum(len(each) for each in durations) == 100
    # A listen backlog too small for 16 simultaneous SYNs costs a 1 s SYN retransmit;
    # handshakes done in the accept loop serialise; both show up here.
    assert elapsed < 1.0, f"100 requests took {elapsed:.3f} s"
    first = [each[0] for each in durations]
    assert max(first) < 0.5, f"slowest connect+handshake+request {max(first):.3f} s"
    # Requests on an established connection: Nagle + delayed ACK would add 40 ms each.
    later = [duration for each in durations for duration in each[1:]]
    assert max(later) < 0.2, f"slowest keep-alive request {max(later):.3f} s"


def test_a_silent_tls_client_does_not_block_others(
    emulator: Emulator, bearer: str
) -> None:
    """A client that connects but never starts its TLS handshake holds up no other client."""
    host, port = emulator.vault_url.removeprefix("https://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5):
        # The handshake runs in the connection's own thread, not in the accept loop.
        started = time.perf_counter()
        response = vault_get(emulator, "/secrets/db-password", bearer)
        elapsed = time.perf_counter() - started

    assert response.status_code == 200
    assert elapsed < 0.5


def test_an_unparsed_request_body_does_not_corrupt_the_connection(
    emulator: Emulator,
) -> None:
    """A chunked request body is answered with Connection: close, so the next request still parses."""
    with requests.Session() as client:
        client.trust_env = False
        chunked = client.post(
            emulator.imds_endpoint,
            params=IMDS_PARAMS,
            headers=METADATA,
            data=iter([b"abc", b"def"]),  # an iterator body is sent chunked
            timeout=5,
        )
        after = client.get(
            emulator.imds_endpoint, params=IMDS_PARAMS, headers=METADATA, timeout=5
        )

    assert chunked.request.headers["Transfer-Encoding"] == "chunked"
    assert chunked.status_code == 405
    assert chunked.headers["Connection"] == "close"
    assert after.status_code == 200


@pytest.mark.parametrize("service", ["imds", "vault"])
def test_keepalive_requests_have_no_delayed_ack_stall(
    emulator: Emulator, bearer: str, service: str
) -> None:
    """Sequential requests on one keep-alive connection take milliseconds, not Nagle's 40 ms."""
    if service == "imds":
        url, params, headers = emulator.imds_endpoint, IMDS_PARAMS, METADATA
    else:
        url, params, headers = (
            emulator.vault_url + "/secrets/db-password",
            {"api-version": API_VERSION},
            {},
        )
    timings = []
    with session(emulator, bearer if service == "vault" else None) as client:
        for _ in range(25):
            started = time.perf_counter()
            assert (
                client.get(url, params=params, headers=headers, timeout=5).status_code
                == 200
            )
            timings.append(time.perf_counter() - started)

    assert statistics.median(timings[1:]) < 0.02, timings


# ---------------------------------------------------------------------------
# Lifecycle


def test_addresses_exist_only_while_started() -> None:
    """URLs raise before start and after stop; stop is idempotent and removes the generated CA."""
    emulator = Emulator({})
    with pytest.raises(RuntimeError):
        _ = emulator.vault_url
    with emulator:
        ca_path = emulator.ca_path
        assert Path(ca_path).is_file()
        assert (
            emulator.imds_endpoint
            == emulator.imds_base + "/metadata/identity/oauth2/token"
        )
        assert emulator.vault_url.startswith("https://127.0.0.1:")
        with pytest.raises(RuntimeError):
            emulator.start()
    emulator.stop()
    assert not Path(ca_path).exists()
    with pytest.raises(RuntimeError):
        _ = emulator.imds_base


def test_stop_cuts_idle_keepalive_connections() -> None:
    """stop() returns promptly even while a client holds an idle keep-alive connection."""
    with Emulator(SECRETS) as emulator:
        client = session(emulator, token(emulator))
        assert (
            client.get(
                emulator.vault_url + "/secrets/db-password",
                params={"api-version": API_VERSION},
                timeout=5,
            ).status_code
            == 200
        )
        started = time.perf_counter()
    elapsed = time.perf_counter() - started
    client.close()

    assert elapsed < 1.0


# ---------------------------------------------------------------------------
# load_secrets_file


def test_load_secrets_file_round_trips_into_an_emulator(tmp_path: Path) -> None:
    """A valid file loads into a mapping the emulator serves, versions and attributes included."""
    path = tmp_path / "secrets.yaml"
    path.write_text(
        "plain: hello\n"
        "layered:\n"
        "  versions: [old, {value: older-but-disabled, enabled: false}]\n"
        "  value: new\n"
        "  content_type: text/plain\n",
        encoding="utf-8",
    )
    secrets = load_secrets_file(str(path))

    with Emulator(secrets) as emulator:
        bearer = token(emulator)
        assert vault_get(emulator, "/secrets/plain", bearer).json()["value"] == "hello"
        latest = vault_get(emulator, "/secrets/layered", bearer).json()
        versions = follow_pages(
            emulator, bearer, "/secrets/layered/versions", {"api-version": API_VERSION}
        )[0]["value"]
    assert (latest["value"], latest["contentType"]) == ("new", "text/plain")
    assert [item["attributes"]["enabled"] for item in versions] == [True, False, True]


def test_load_secrets_file_of_an_empty_file_is_empty(tmp_path: Path) -> None:
    """An empty file means no secrets."""
    path = tmp_path / "empty.yaml"
    path.write_text("", encoding="utf-8")

    assert load_secrets_file(str(path)) == {}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read secrets file: No such file or directory"),
        ("- a\n- b\n", "expected a mapping of secret name to value, got list"),
        ("just a string\n", "expected a mapping of secret name to value, got str"),
        ("a: [unclosed\n", "invalid YAML"),
        ("flag: yes\n", "value must be a string, got bool (quote it)"),
        ("port: 8080\n", "value must be a string, got int (quote it)"),
        (
            "s: {versions: [2024-01-01]}\n",
            "value must be a string, got date (quote it)",
        ),
        ("s:\n", "must be a string or a mapping, got null"),
        ("bad_name: x\n", "invalid secret name 'bad_name'"),
        ("s: {value: x, colour: red}\n", "unknown key 'colour'"),
        ("s: {enabled: false}\n", "needs a 'value' or a non-empty 'versions' list"),
        ("Dup: a\ndup: b\n", "names are case-insensitive"),
        (b"\xff\xfe: x\n", "not UTF-8 text"),
    ],
    ids=[
        "missing",
        "list",
        "scalar",
        "bad-yaml",
        "bool-value",
        "int-value",
        "date-version",
        "null-value",
        "bad-name",
        "unknown-key",
        "no-value",
        "case-duplicate",
        "not-utf8",
    ],
)
def test_load_secrets_file_errors_are_one_clear_line(
    tmp_path: Path, content: str | bytes | None, message: str
) -> None:
    """A bad secrets file raises ValueError with one line naming the file and the problem."""
    path = tmp_path / "secrets.yaml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content, encoding="utf-8")

    with pytest.raises(ValueError) as caught:
        load_secrets_file(str(path))

    text = str(caught.value)
    assert text.startswith(str(path) + ": ")
    assert message in text
    assert "\n" not in text


# ---------------------------------------------------------------------------
# Key Vault: writes (SetSecret, UpdateSecret, DeleteSecret, deleted secrets)

# The recorded PUT, GET, PATCH and DELETE of keyvault__py__test_secrets_client.
# test_secret_crud_operations.yaml (protocol.md C), request bodies as sent there.
CRUD_SET = {"value": "crud-value"}
CRUD_SET_WITH_ATTRIBUTES = {
    "value": "crud-value",
    "tags": {"foo": "created tag"},
    "contentType": "password",
    "attributes": {"enabled": True, "nbf": 1422864000, "exp": 2527401600},
}
CRUD_UPDATE = {
    "contentType": "text/plain",
    "attributes": {"enabled": False, "exp": 2524723200},
    "tags": {"foo": "updated tag"},
}
# Key order of the recorded DeletedSecretBundle (the DELETE answer).
DELETED_KEYS = [
    "recoveryId",
    "deletedDate",
    "scheduledPurgeDate",
    "contentType",
    "id",
    "attributes",
    "tags",
]


def vault_call(
    emulator: Emulator,
    method: str,
    path: str,
    bearer: str,
    body: object = None,
    *,
    raw: bytes | None = None,
) -> requests.Response:
    """One authenticated vault request with api-version 7.6 and a JSON (or raw) body."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    headers = {"Content-Type": "application/json"} if data is not None else {}
    with session(emulator, bearer) as client:
        return client.request(
            method,
            emulator.vault_url + path,
            params={"api-version": API_VERSION},
            data=data,
            headers=headers,
            timeout=5,
        )


def test_vault_crud_matches_the_recording(fresh_emulator: Emulator) -> None:
    """PUT, GET by version, PATCH and DELETE answer with the recorded statuses, shapes and key order."""
    real = recorded("keyvault__py__test_secrets_client.test_secret_crud_operations.yaml")
    bearer = token(fresh_emulator)

    plain = vault_call(fresh_emulator, "PUT", "/secrets/crud-secret", bearer, CRUD_SET)
    full = vault_call(fresh_emulator, "PUT", "/secrets/crud-secret", bearer, CRUD_SET_WITH_ATTRIBUTES)
    version = full.json()["id"].rsplit("/", 1)[1]
    latest = vault_get(fresh_emulator, "/secrets/crud-secret/", bearer)
    pinned = vault_get(fresh_emulator, f"/secrets/crud-secret/{version}", bearer)
    patched = vault_call(fresh_emulator, "PATCH", f"/secrets/crud-secret/{version}", bearer, CRUD_UPDATE)
    deleted = vault_call(fresh_emulator, "DELETE", "/secrets/crud-secret", bearer)

    ours = [plain, full, latest, pinned, patched, deleted]
    for response, recording in zip(ours, real[1:]):
        assert response.status_code == recording.status == 200
        assert shape(response.json()) == shape(recording.json()), recording.uri
    assert patched.json()["attributes"]["nbf"] == 1422864000  # kept: PATCH overlays
    assert list(deleted.json()) == DELETED_KEYS
    body = deleted.json()
    assert body["recoveryId"] == f"{fresh_emulator.vault_url}/deletedsecrets/crud-secret"
    assert body["scheduledPurgeDate"] - body["deletedDate"] == 90 * 86400


def test_vault_set_update_and_delete_have_the_wire_shapes(fresh_emulator: Emulator) -> None:
    """Without the recordings on disk, the same exchanges still keep the recorded key order."""
    bearer = token(fresh_emulator)

    full = vault_call(fresh_emulator, "PUT", "/secrets/crud-secret", bearer, CRUD_SET_WITH_ATTRIBUTES)
    patched = vault_call(fresh_emulator, "PATCH", "/secrets/crud-secret/", bearer, CRUD_UPDATE)
    deleted = vault_call(fresh_emulator, "DELETE", "/secrets/crud-secret", bearer)

    assert full.status_code == patched.status_code == deleted.status_code == 200
    assert list(full.json()) == ["value", "contentType", "id", "attributes", "tags"]
    assert list(full.json()["attributes"]) == [
        "enabled", "nbf", "exp", "created", "updated", "recoveryLevel", "recoverableDays",
    ]
    assert list(patched.json()) == ["contentType", "id", "attributes", "tags"]
    assert patched.json()["attributes"]["enabled"] is False
    assert list(deleted.json()) == DELETED_KEYS
    assert VERSION_RE.match(full.json()["id"].rsplit("/", 1)[1])


def test_vault_put_adds_a_version_that_readers_see_at_once(fresh_emulator: Emulator) -> None:
    """A PUT of an existing secret makes a new latest version; older versions stay readable."""
    bearer = token(fresh_emulator)
    before = vault_get(fresh_emulator, "/secrets/db-password", bearer).json()

    put = vault_call(fresh_emulator, "PUT", "/secrets/db-password", bearer, {"value": "rotated"})

    after = vault_get(fresh_emulator, "/secrets/db-password", bearer).json()
    old = vault_get(fresh_emulator, "/secrets/db-password/" + before["id"].rsplit("/", 1)[1], bearer)
    assert (put.status_code, after["value"], after["id"]) == (200, "rotated", put.json()["id"])
    assert old.json()["value"] == "hunter2"


def test_vault_soft_delete_recover_and_purge(fresh_emulator: Emulator) -> None:
    """A deleted secret is listed and readable under /deletedsecrets, blocks PUT with 409,
    comes back with every version on recover, and is gone for good after purge."""
    bearer = token(fresh_emulator)
    assert vault_call(fresh_emulator, "DELETE", "/secrets/rotated", bearer).status_code == 200

    gone = vault_get(fresh_emulator, "/secrets/rotated", bearer)
    listed = follow_pages(fresh_emulator, bearer, "/deletedsecrets", {"api-version": API_VERSION})
    one = vault_get(fresh_emulator, "/deletedsecrets/rotated", bearer)
    conflict = vault_call(fresh_emulator, "PUT", "/secrets/rotated", bearer, {"value": "again"})
    with pytest.raises(LookupError, match="recover or purge it first"):
        fresh_emulator.set_secret("rotated", "through the Python API")
    recovered = vault_call(fresh_emulator, "POST", "/deletedsecrets/rotated/recover", bearer)
    versions = follow_pages(fresh_emulator, bearer, "/secrets/rotated/versions", {"api-version": API_VERSION})

    assert gone.status_code == 404
    assert [item["id"] for page in listed for item in page["value"]] == [
        f"{fresh_emulator.vault_url}/secrets/rotated"
    ]
    assert one.status_code == 200 and list(one.json()) == [
        key for key in DELETED_KEYS if key not in ("contentType", "tags")
    ]
    assert "value" not in one.json()
    assert conflict.status_code == 409
    assert conflict.content == (
        b'{"error":{"code":"Conflict","message":"Secret rotated is currently in a deleted but '
        b"recoverable state, and its name cannot be reused; in this state, the secret can only "
        b'be recovered or purged.","innererror":{"code":"ObjectIsDeletedButRecoverable"}}}'
    )
    assert recovered.status_code == 200 and "value" not in recovered.json()
    assert len(versions[0]["value"]) == 3
    assert vault_get(fresh_emulator, "/secrets/rotated", bearer).json()["value"] == "three"

    assert vault_call(fresh_emulator, "DELETE", "/secrets/rotated", bearer).status_code == 200
    purged = vault_call(fresh_emulator, "DELETE", "/deletedsecrets/rotated", bearer)
    assert (purged.status_code, purged.content) == (204, b"")
    assert vault_call(fresh_emulator, "PUT", "/secrets/rotated", bearer, {"value": "new"}).status_code == 200
    assert len(follow_pages(fresh_emulator, bearer, "/secrets/rotated/versions",
                            {"api-version": API_VERSION})[0]["value"]) == 1


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/deletedsecrets/never-deleted"),
        ("POST", "/deletedsecrets/never-deleted/recover"),
        ("DELETE", "/deletedsecrets/never-deleted"),
    ],
)
def test_vault_missing_deleted_secret_is_404(emulator: Emulator, bearer: str, method: str, path: str) -> None:
    """Get, recover and purge of a secret that is not deleted answer 404 'Deleted Secret not found'."""
    response = vault_call(emulator, method, path, bearer)

    assert response.status_code == 404
    assert response.content == (
        b'{"error":{"code":"SecretNotFound","message":"Deleted Secret not found: never-deleted"}}'
    )


@pytest.mark.parametrize(
    ("method", "path"),
    [("DELETE", "/secrets/no-such-secret"), ("PATCH", "/secrets/no-such-secret/")],
)
def test_vault_delete_or_update_of_a_missing_secret_is_404(
    emulator: Emulator, bearer: str, method: str, path: str
) -> None:
    """DELETE or PATCH of a missing secret answers the recorded SecretNotFound."""
    response = vault_call(emulator, method, path, bearer, {} if method == "PATCH" else None)

    assert response.status_code == 404
    assert error_of(response)["code"] == "SecretNotFound"


def test_vault_writes_need_a_token(emulator: Emulator) -> None:
    """A write without a bearer token gets the 401 challenge, as the recording's first PUT."""
    response = vault_call(emulator, "PUT", "/secrets/x", "", {"value": "v"})

    assert response.status_code == 401
    assert "WWW-Authenticate" in response.headers


# Valid JSON nested deeper than the parser's recursion limit, under the 64 KiB cap.
DEEP = b'{"value":"v","tags":' + b"[" * 30_000 + b"]" * 30_000 + b"}"


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"not json",
        b"[]",
        b'"value"',
        b'{"value": 5}',
        b'{"value": "v", "colour": "red"}',
        b'{"value": "v", "value": "w"}',
        b'{"value": "v", "attributes": {"nbf": NaN}}',
        b'{"value": "\\ud800"}',
        b'{"value": "v", "attributes": {"enabled": "yes"}}',
        b'{"value": "v", "attributes": {"exp": 1e400}}',
        b'{"value": "v", "attributes": {"exp": 1.5}}',
        b'{"value": "v", "attributes": {"kid": "x"}}',
        b'{"value": "v", "tags": {"a": 1}}',
        b'{"value": "v", "tags": ["a"]}',
        b'{"value": "v", "contentType": 7}',
        b'{"value": "' + b"x" * (25 * 1024 + 1) + b'"}',
        b"\xff\xfe",
        DEEP,
    ],
    ids=[
        "empty", "not-json", "array", "string", "number-value", "unknown-key",
        "duplicate-key", "nan", "lone-surrogate", "enabled-string", "huge-exp",
        "fractional-exp", "unknown-attribute", "tag-number", "tags-list",
        "content-type-number", "value-over-25k", "not-utf8", "deep-nesting",
    ],
)
def test_vault_put_rejects_bad_bodies_with_400(fresh_emulator: Emulator, raw: bytes) -> None:
    """A body that is not a valid SecretSetParameters object gets 400 BadParameter and changes nothing."""
    bearer = token(fresh_emulator)

    response = vault_call(fresh_emulator, "PUT", "/secrets/db-password", bearer, raw=raw)

    assert response.status_code == 400, response.text
    assert error_of(response)["code"] == "BadParameter"
    assert vault_get(fresh_emulator, "/secrets/db-password", bearer).json()["value"] == "hunter2"


def test_vault_put_refuses_an_oversized_body_without_reading_it(emulator: Emulator, bearer: str) -> None:
    """A body over the 64 KiB cap gets 413 and the connection is closed."""
    response = vault_call(
        emulator, "PUT", "/secrets/x", bearer, raw=b'{"value":"' + b"x" * 70_000 + b'"}'
    )

    assert response.status_code == 413
    assert response.headers["Connection"] == "close"


def test_vault_patch_cannot_change_the_value(emulator: Emulator, bearer: str) -> None:
    """UpdateSecret takes attributes, contentType and tags only: a value is a 400."""
    response = vault_call(emulator, "PATCH", "/secrets/db-password/", bearer, {"value": "x"})

    assert response.status_code == 400


# ---------------------------------------------------------------------------
# Key Vault: empty pages (protocol.md B4)


@pytest.mark.parametrize("path", ["/secrets", "/secrets/rotated/versions", "/deletedsecrets"])
def test_vault_empty_pages_open_and_close_lists_like_the_recording(path: str) -> None:
    """With empty_pages, a list opens with two empty pages that carry a nextLink and ends
    with {"value":[],"nextLink":null}, as the recorded list does; nothing is lost."""
    with Emulator(SECRETS, empty_pages=True) as emulator:
        bearer = token(emulator)
        if path == "/deletedsecrets":
            for name in ("bulk-00", "bulk-01", "bulk-02"):
                vault_call(emulator, "DELETE", f"/secrets/{name}", bearer)
        pages = follow_pages(emulator, bearer, path, {"api-version": API_VERSION, "maxresults": "2"})

    sizes = [len(page["value"]) for page in pages]
    assert sizes[:2] == [0, 0] and pages[0]["nextLink"] is not None
    assert sizes[-1] == 0 and pages[-1]["nextLink"] is None
    assert all(size > 0 for size in sizes[2:-1])
    ids = [item["id"] for page in pages for item in page["value"]]
    expected = {"/secrets": len(SECRETS), "/secrets/rotated/versions": 3, "/deletedsecrets": 3}
    assert len(ids) == len(set(ids)) == expected[path]


def test_vault_empty_pages_match_the_recorded_sequence() -> None:
    """The page sizes follow the recording: empty, empty, items..., then an empty last page."""
    real = [
        item.json()
        for item in recorded("keyvault__js__recording_can_list_secrets_by_page.json")
        if "/secrets?" in item.uri
    ]
    with Emulator({"a": "1", "b": "2"}, empty_pages=True) as emulator:
        pages = follow_pages(
            emulator, token(emulator), "/secrets", {"api-version": API_VERSION, "maxresults": "1"}
        )

    def kinds(pages: list[dict[str, Any]]) -> list[tuple[bool, bool]]:
        return [(bool(page["value"]), page["nextLink"] is not None) for page in pages]

    assert kinds(pages) == [(False, True), (False, True), (True, True), (True, True), (False, False)]
    assert kinds(real)[:2] == kinds(pages)[:2] and kinds(real)[-1] == kinds(pages)[-1]


def test_vault_empty_lists_stay_one_page_with_empty_pages(emulator: Emulator) -> None:
    """Versions of a missing secret stay the recorded single {"value":[],"nextLink":null}."""
    with Emulator({}, empty_pages=True) as empty:
        response = vault_get(empty, "/secrets/missing/versions", token(empty))

    assert response.content == b'{"value":[],"nextLink":null}'


# ---------------------------------------------------------------------------
# The structured secrets file: identities and certificate-backed secrets

STRUCTURED = """\
secrets:
  plain: hello
  tls:
    value: "-----BEGIN PRIVATE KEY-----\\n...\\n"
    content_type: application/x-pem-file
    managed: true
identities:
  system_assigned: false
  user_assigned:
    - client_id: aaaaaaaa-0000-4000-8000-00000000000a
      object_id: aaaaaaaa-0000-4000-8000-0000000000a0
      msi_res_id: /subscriptions/s/resourcegroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/id-a
    - client_id: bbbbbbbb-0000-4000-8000-00000000000b
"""


def test_structured_file_declares_identities_and_certificate_backed_secrets(
    tmp_path: Path,
) -> None:
    """A file with secrets: and identities: gives the emulator those user-assigned identities
    (and no system identity), and a managed secret answers with managed and kid as in B9."""
    path = tmp_path / "secrets.yaml"
    path.write_text(STRUCTURED, encoding="utf-8")
    loaded = load_emulator_file(str(path))

    assert load_secrets_file(str(path)) == loaded.secrets
    assert set(loaded.secrets) == {"plain", "tls"}
    with Emulator(loaded.secrets, identities=loaded.identities) as emulator:
        by_client = imds_get(emulator, {**IMDS_PARAMS, "client_id": UAMI_A.client_id})
        second = imds_get(
            emulator, {**IMDS_PARAMS, "client_id": "bbbbbbbb-0000-4000-8000-00000000000b"}
        )
        by_resource = imds_get(emulator, {**IMDS_PARAMS, "msi_res_id": UAMI_A.msi_res_id})
        unselected = imds_get(emulator)
        bearer = by_client.json()["access_token"]
        tls = vault_get(emulator, "/secrets/tls", bearer).json()
        listed = follow_pages(emulator, bearer, "/secrets", {"api-version": API_VERSION})

    assert by_client.status_code == second.status_code == by_resource.status_code == 200
    assert claims(bearer)["oid"] == UAMI_A.object_id
    assert claims(by_resource.json()["access_token"])["appid"] == UAMI_A.client_id
    assert unselected.status_code == 400  # two user-assigned identities, no system one
    assert list(tls) == ["value", "contentType", "id", "managed", "attributes", "kid"]
    version = tls["id"].rsplit("/", 1)[1]
    assert tls["kid"] == tls["id"].replace("/secrets/tls/", "/keys/tls/")
    assert tls["kid"].endswith(version) and tls["managed"] is True
    (item,) = [i for page in listed for i in page["value"] if i["id"].endswith("/tls")]
    assert item["managed"] is True and "kid" not in item


def test_plain_file_keeps_the_default_identities(tmp_path: Path) -> None:
    """The plain name: value form still loads, with the default system-assigned identity."""
    path = tmp_path / "secrets.yaml"
    path.write_text("db-password: s3cret\nsecrets: also-a-secret\n", encoding="utf-8")

    loaded = load_emulator_file(str(path))

    assert loaded.secrets == {"db-password": "s3cret", "secrets": "also-a-secret"}
    assert loaded.identities == IdentityConfig()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("identities: {system: true}\n", "unknown key 'system'"),
        ("identities: {system_assigned: 'no'}\n", "system_assigned must be true or false"),
        ("identities: {user_assigned: {client_id: x}}\n", "user_assigned must be a list"),
        ("identities: {user_assigned: [{client_id: not-a-guid}]}\n", "client_id must be a GUID"),
        (
            "identities: {user_assigned: [{client_id: aaaaaaaa-0000-4000-8000-00000000000a},"
            " {client_id: AAAAAAAA-0000-4000-8000-00000000000A}]}\n",
            "share a client_id",
        ),
        (
            "identities: {user_assigned: [{client_id: aaaaaaaa-0000-4000-8000-00000000000a,"
            " msi_res_id: id-a}]}\n",
            "msi_res_id must be an ARM id",
        ),
        ("secrets: {s: {value: x, managed: true}}\n", "needs content_type"),
        ("secrets: {s: {value: x, kid: 'https://v/keys/s/1'}}\n", "add managed: true"),
        (
            "secrets: {s: {value: x, managed: true, content_type: application/x-pkcs12,"
            " kid: /keys/s}}\n",
            "kid must be a key URL",
        ),
    ],
    ids=[
        "identities-unknown-key",
        "system-not-bool",
        "user-assigned-not-list",
        "client-id-not-guid",
        "duplicate-client-id",
        "resource-id-not-arm",
        "managed-without-content-type",
        "kid-without-managed",
        "kid-not-url",
    ],
)
def test_structured_file_errors_are_one_clear_line(
    tmp_path: Path, content: str, message: str
) -> None:
    """A bad identities: or certificate entry raises one line naming the file, the key and the fix."""
    path = tmp_path / "secrets.yaml"
    path.write_text(content, encoding="utf-8")

    with pytest.raises(ValueError) as caught:
        load_emulator_file(str(path))

    text = str(caught.value)
    assert text.startswith(str(path) + ": ") and message in text and "\n" not in text


# -- Azure Arc (HIMDS) and App Service (protocol.md A7, A8) -------------------


def test_arc_challenges_with_a_key_file_then_accepts_it(tmp_path: Path) -> None:
    """HIMDS answers 401 with a Basic realm naming a fresh .key file in its tokens
    directory; the request repeated with its contents gets an IMDS-shaped token."""
    params = {"api-version": "2020-06-01", "resource": KV_RESOURCE}
    with Emulator(SECRETS, identity_source="arc", arc_tokens_dir=str(tmp_path)) as arc:
        first = requests.get(arc.imds_endpoint, params=params, headers=METADATA, timeout=5)
        assert first.status_code == 401
        scheme, _, path = first.headers["WWW-Authenticate"].partition(" realm=")
        assert scheme == "Basic" and os.path.dirname(path) == str(tmp_path)
        assert path.endswith(".key") and os.stat(path).st_mode & 0o737 == 0o600  # at most 0640
        key = Path(path).read_text()
        wrong = requests.get(arc.imds_endpoint, params=params,
                             headers={**METADATA, "Authorization": "Basic nope"}, timeout=5)
        assert wrong.status_code == 401
        good = requests.get(arc.imds_endpoint, params=params,
                            headers={**METADATA, "Authorization": f"Basic {key}"}, timeout=5)
        assert good.status_code == 200
        body = good.json()
        assert body["access_token"] and body["expires_in"] and body["client_id"]
        old = requests.get(arc.imds_endpoint, params={**params, "api-version": "2018-02-01"},
                           headers=METADATA, timeout=5)
        assert old.status_code == 400 and "api-version" in old.json()["error_description"]


def test_app_service_checks_its_header_and_api_version() -> None:
    """App Service wants X-IDENTITY-HEADER and api-version 2019-08-01, refuses with
    {statusCode, message}, and answers expires_on without expires_in."""
    params = {"api-version": "2019-08-01", "resource": KV_RESOURCE}
    with Emulator(SECRETS, identity_header="the-header") as emulator:
        assert emulator.identity_header == "the-header"
        url = emulator.app_service_endpoint

        def get(query: Mapping[str, str], header: str | None) -> requests.Response:
            headers = {} if header is None else {"X-IDENTITY-HEADER": header}
            return requests.get(url, params=dict(query), headers=headers, timeout=5)

        assert get(params, None).json() == {
            "statusCode": 401, "message": "X-IDENTITY-HEADER is missing or invalid"}
        assert get(params, "wrong").status_code == 401
        bad = get({**params, "api-version": "2018-02-01"}, "the-header")
        assert bad.status_code == 400 and bad.json()["statusCode"] == 400
        unknown = get({**params, "client_id": "nobody"}, "the-header")
        assert unknown.json() == {"statusCode": 400, "message": (
            "No Managed Identity found for specified ClientId/ResourceId/PrincipalId.")}
        good = get(params, "the-header")
        assert good.status_code == 200
        assert set(good.json()) == {"access_token", "expires_on", "resource", "token_type",
                                    "client_id"}


@pytest.mark.parametrize("name", ["object_id", "principal_id"])
def test_app_service_selects_a_user_assigned_identity_by_object_id(name: str) -> None:
    """object_id (the SDKs' spelling) and principal_id both select that identity; an
    unknown one is refused with App Service's 400, never answered for another identity."""
    params = {"api-version": "2019-08-01", "resource": KV_RESOURCE}
    identities = IdentityConfig(system_assigned=True, user_assigned=(UAMI_A, UAMI_B))
    with Emulator(SECRETS, identities=identities, identity_header="h") as emulator:

        def get(value: str) -> requests.Response:
            return requests.get(emulator.app_service_endpoint, params={**params, name: value},
                                headers={"X-IDENTITY-HEADER": "h"}, timeout=5)

        found = get(UAMI_B.object_id.upper())
        assert found.status_code == 200 and found.json()["client_id"] == UAMI_B.client_id
        assert claims(found.json()["access_token"])["oid"] == UAMI_B.object_id
        unknown = get("dddddddd-0000-4000-8000-0000000000d0")
        assert unknown.json() == {"statusCode": 400, "message": (
            "No Managed Identity found for specified ClientId/ResourceId/PrincipalId.")}
        both = requests.get(emulator.app_service_endpoint, timeout=5,
                            params={**params, "object_id": UAMI_A.object_id,
                                    "principal_id": UAMI_A.object_id},
                            headers={"X-IDENTITY-HEADER": "h"})
        assert both.status_code == 400 and "Only one of" in both.json()["message"]


def test_arc_and_app_service_on_ports_of_their_own(tmp_path: Path) -> None:
    """arc_port and app_service_port serve HIMDS and App Service beside IMDS, each
    on its own port and sharing IMDS's identities; IMDS stays IMDS."""
    params = {"api-version": "2020-06-01", "resource": KV_RESOURCE}
    with Emulator(SECRETS, arc_port=0, app_service_port=0, arc_tokens_dir=str(tmp_path),
                  identity_header="h") as emulator:
        bases = {emulator.imds_base, emulator.arc_base,
                 emulator.app_service_endpoint.rsplit("/MSI", 1)[0]}
        assert len(bases) == 3
        challenge = requests.get(emulator.arc_endpoint, params=params, headers=METADATA,
                                 timeout=5)
        assert challenge.status_code == 401
        key = Path(challenge.headers["WWW-Authenticate"].partition("realm=")[2]).read_text()
        token = requests.get(emulator.arc_endpoint, params=params, timeout=5,
                             headers={**METADATA, "Authorization": f"Basic {key}"})
        assert token.status_code == 200
        imds = requests.get(emulator.imds_endpoint, headers=METADATA, timeout=5,
                            params={**params, "api-version": "2018-02-01"})
        assert imds.status_code == 200
        app = requests.get(emulator.app_service_endpoint, headers={"X-IDENTITY-HEADER": "h"},
                           params={"api-version": "2019-08-01", "resource": KV_RESOURCE},
                           timeout=5)
        assert app.status_code == 200 and "expires_in" not in app.json()
        elsewhere = requests.get(emulator.app_service_endpoint.replace("/MSI/token", "/x"),
                                 timeout=5)
        assert elsewhere.status_code == 404 and elsewhere.json()["statusCode"] == 404
