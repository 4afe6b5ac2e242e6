"""The emulator's certificate-backed secrets (protocol.md B9), checked with cryptography and openssl.

The values are decoded here with ``cryptography`` directly, not with the agent's
certificate code: the emulator is the agent's oracle and must be checked on its own.
"""

from __future__ import annotations

import base64
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from emulator_command import emulator_command
from test_emulator import API_VERSION, token, vault_get

from agent.emulator import CERTIFICATE_ROOT_FILE, Emulator

REPO = Path(__file__).resolve().parents[2]
OPENSSL = shutil.which("openssl")
PEM = "application/x-pem-file"
PKCS12 = "application/x-pkcs12"
CERTIFICATES: dict[str, Any] = {
    "web-pfx": {"certificate": {"sans": ["web.example.test", "www.example.test"]}},
    "web-pem": {"certificate": {"content_type": PEM, "key_type": "ec"}},
    "web-pem-chain-first": {
        "certificate": {"content_type": PEM, "pem_order": "chain-first", "include_root": True}
    },
    "web-shuffled": {"certificate": {"content_type": PEM, "pem_order": "shuffled"}},
    "locked-pfx": {"certificate": {"exportable": False}},
    "locked-pem": {"certificate": {"content_type": PEM, "exportable": False}},
    "expired": {"certificate": {"valid_from_days": -30, "validity_days": 10}},
    "not-yet": {"certificate": {"content_type": PEM, "valid_from_days": 5}},
    "licence": {"value_base64": "AAEC\n/w==", "content_type": "application/octet-stream"},
    "stale": {"value": "old", "expires_in_days": -1, "not_before_in_days": -10},
}


@pytest.fixture(scope="module")
def emulator_secrets() -> dict[str, Any]:
    """The module's one emulator serves every kind of certificate-backed secret."""
    return CERTIFICATES


class Decoded:
    """A certificate secret's value split into key (or None), leaf and issuers, in served order."""

    def __init__(self, content_type: str, value: str) -> None:
        self.key: Any
        self.certificates: list[x509.Certificate]
        if content_type == PKCS12:
            blob = base64.b64decode(value, validate=True)
            key, leaf, extra = pkcs12.load_key_and_certificates(blob, b"")
            self.key = key
            self.certificates = ([leaf] if leaf is not None else []) + list(extra)
            self.blocks = []
        else:
            self.blocks = [line for line in value.splitlines() if line.startswith("-----BEGIN")]
            self.certificates = x509.load_pem_x509_certificates(value.encode())
            self.key = (
                serialization.load_pem_private_key(value.encode(), None)
                if "-----BEGIN PRIVATE KEY-----" in value
                else None
            )
        assert "BEGIN RSA PRIVATE KEY" not in value and "BEGIN EC PRIVATE KEY" not in value

    def leaf(self) -> x509.Certificate:
        """The certificate that is no CA."""
        leaves = [c for c in self.certificates if not _is_ca(c)]
        assert len(leaves) == 1
        return leaves[0]

    def issuers(self) -> list[x509.Certificate]:
        return [c for c in self.certificates if _is_ca(c)]


def _is_ca(certificate: x509.Certificate) -> bool:
    return bool(certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)


def _public_numbers(key: Any) -> Any:
    return key.public_key().public_numbers()


def bundle(emulator: Emulator, name: str) -> dict[str, Any]:
    response = vault_get(emulator, f"/secrets/{name}", token(emulator))
    assert response.status_code == 200, response.text
    body = response.json()
    assert isinstance(body, dict)
    return body


def decoded(emulator: Emulator, name: str) -> Decoded:
    body = bundle(emulator, name)
    return Decoded(body["contentType"], body["value"])


def pem(certificates: list[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certificates)


def openssl_verify(emulator: Emulator, material: Decoded, tmp_path: Path) -> None:
    """``openssl verify -CAfile root -untrusted chain leaf`` accepts the leaf."""
    if OPENSSL is None:
        pytest.skip("openssl is not installed")
    leaf_path, chain_path = tmp_path / "leaf.pem", tmp_path / "chain.pem"
    leaf_path.write_bytes(pem([material.leaf()]))
    chain_path.write_bytes(pem(material.issuers()))
    result = subprocess.run(
        [OPENSSL, "verify", "-CAfile", emulator.certificate_root_path,
         "-untrusted", str(chain_path), str(leaf_path)],
        capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith(": OK")


@pytest.mark.parametrize("name", ["web-pfx", "web-pem", "web-pem-chain-first", "web-shuffled"])
def test_value_holds_a_key_matching_the_leaf_and_a_chain_to_the_root(
    emulator: Emulator, name: str, tmp_path: Path
) -> None:
    """PKCS#12 and PEM values decode to a key matching the leaf and a chain that openssl verifies."""
    material = decoded(emulator, name)

    assert material.key is not None
    assert _public_numbers(material.key) == material.leaf().public_key().public_numbers()
    root = x509.load_pem_x509_certificate(emulator.certificate_root_pem)
    intermediate = [c for c in material.issuers() if c.subject != c.issuer][0]
    material.leaf().verify_directly_issued_by(intermediate)
    intermediate.verify_directly_issued_by(root)
    openssl_verify(emulator, material, tmp_path)


def test_pfx_is_base64_with_an_empty_password_readable_by_openssl(
    emulator: Emulator, tmp_path: Path
) -> None:
    """``openssl pkcs12 -passin pass:`` reads the PKCS#12 value: key, leaf and intermediate."""
    if OPENSSL is None:
        pytest.skip("openssl is not installed")
    body = bundle(emulator, "web-pfx")
    pfx = tmp_path / "web.pfx"
    pfx.write_bytes(base64.b64decode(body["value"], validate=True))

    result = subprocess.run(
        [OPENSSL, "pkcs12", "-in", str(pfx), "-passin", "pass:", "-nodes"],
        capture_output=True, text=True, timeout=30, check=False)

    assert result.returncode == 0, result.stderr
    assert result.stdout.count("BEGIN CERTIFICATE") == 2
    assert "BEGIN PRIVATE KEY" in result.stdout


def test_leaf_carries_the_sans_and_the_key_type(emulator: Emulator) -> None:
    """The leaf names the declared dNSNames; key_type picks RSA 2048 or EC P-256."""
    rsa_leaf = decoded(emulator, "web-pfx").leaf()
    ec_leaf = decoded(emulator, "web-pem").leaf()

    sans = rsa_leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["web.example.test", "www.example.test"]
    assert isinstance(rsa_leaf.public_key(), rsa.RSAPublicKey)
    assert rsa_leaf.public_key().key_size == 2048
    ec_key = ec_leaf.public_key()
    assert isinstance(ec_key, ec.EllipticCurvePublicKey)
    assert ec_key.curve.name == "secp256r1"


def test_pem_orders_differ_and_root_is_included_only_when_asked(emulator: Emulator) -> None:
    """key-first starts with the key then the leaf; chain-first ends with the key, root first."""
    key_first = decoded(emulator, "web-pem")
    chain_first = decoded(emulator, "web-pem-chain-first")

    assert key_first.blocks == ["-----BEGIN PRIVATE KEY-----"] + ["-----BEGIN CERTIFICATE-----"] * 2
    assert not _is_ca(key_first.certificates[0])
    assert chain_first.blocks[-1] == "-----BEGIN PRIVATE KEY-----"
    assert len(chain_first.certificates) == 3
    root = chain_first.certificates[0]
    assert root.subject == root.issuer
    assert root.public_bytes(serialization.Encoding.PEM) == emulator.certificate_root_pem
    assert not _is_ca(chain_first.certificates[-1])


def test_non_exportable_certificates_carry_no_key(emulator: Emulator, tmp_path: Path) -> None:
    """A non-exportable certificate's value has the certificates but no private key (B9)."""
    for name in ("locked-pfx", "locked-pem"):
        body = bundle(emulator, name)
        material = Decoded(body["contentType"], body["value"])

        assert material.key is None, name
        assert "PRIVATE KEY" not in body["value"]
        assert len(material.certificates) == 2
        openssl_verify(emulator, material, tmp_path)


def test_bundle_and_list_item_have_the_b9_shape(emulator: Emulator) -> None:
    """GET gives value, contentType, id, managed, attributes (nbf/exp of the leaf), kid in B9's
    order; the list item has managed and no value or kid."""
    body = bundle(emulator, "web-pfx")
    version = body["id"].rsplit("/", 1)[1]
    leaf = Decoded(body["contentType"], body["value"]).leaf()

    assert list(body) == ["value", "contentType", "id", "managed", "attributes", "kid"]
    assert body["contentType"] == PKCS12
    assert body["managed"] is True
    assert body["id"] == f"{emulator.vault_url}/secrets/web-pfx/{version}"
    assert body["kid"] == f"{emulator.vault_url}/keys/web-pfx/{version}"
    attributes = body["attributes"]
    assert list(attributes) == [
        "enabled", "nbf", "exp", "created", "updated", "recoveryLevel", "recoverableDays"]
    assert attributes["nbf"] == int(leaf.not_valid_before_utc.timestamp())
    assert attributes["exp"] == int(leaf.not_valid_after_utc.timestamp())
    listed = vault_get(emulator, "/secrets", token(emulator)).json()["value"]
    item = next(i for i in listed if i["id"].endswith("/secrets/web-pfx"))
    assert list(item) == ["contentType", "id", "managed", "attributes"]
    assert item["attributes"] == attributes


def test_expired_and_not_yet_valid_certificates_are_still_served(emulator: Emulator) -> None:
    """Azure serves secrets outside nbf/exp; so does the emulator, with the leaf's dates."""
    now = time.time()
    expired, future = bundle(emulator, "expired"), bundle(emulator, "not-yet")

    assert expired["attributes"]["exp"] < now
    assert Decoded(PKCS12, expired["value"]).leaf().not_valid_after_utc.timestamp() < now
    assert future["attributes"]["nbf"] > now
    assert Decoded(PEM, future["value"]).leaf().not_valid_before_utc.timestamp() > now


def test_value_base64_and_relative_dates_are_served_as_declared(emulator: Emulator) -> None:
    """value_base64 is served as its base64 text; *_in_days become nbf/exp around now."""
    licence, stale = bundle(emulator, "licence"), bundle(emulator, "stale")

    assert licence["value"] == "AAEC/w=="
    assert base64.b64decode(licence["value"]) == b"\x00\x01\x02\xff"
    assert licence["contentType"] == "application/octet-stream"
    now = time.time()
    assert now - 86400 - 60 < stale["attributes"]["exp"] < now - 86400 + 60
    assert stale["attributes"]["nbf"] < stale["attributes"]["exp"]
    assert stale["value"] == "old"


def test_rotation_issues_a_new_key_as_a_new_version_under_the_same_root(
    tmp_path: Path,
) -> None:
    """rotate_certificate adds a version with a new key and serial; the root stays the same."""
    with Emulator() as emulator:
        first_version = emulator.add_certificate("rotating", content_type=PEM)
        root = emulator.certificate_root_pem
        first = decoded(emulator, "rotating")

        second_version = emulator.rotate_certificate("rotating")
        second = decoded(emulator, "rotating")

        assert second_version != first_version
        assert bundle(emulator, "rotating")["id"].endswith(f"/{second_version}")
        assert _public_numbers(second.key) != _public_numbers(first.key)
        assert second.leaf().serial_number != first.leaf().serial_number
        assert _public_numbers(second.key) == second.leaf().public_key().public_numbers()
        assert emulator.certificate_root_pem == root
        openssl_verify(emulator, second, tmp_path)
        old = vault_get(emulator, f"/secrets/rotating/{first_version}", token(emulator)).json()
        assert Decoded(PEM, old["value"]).leaf().serial_number == first.leaf().serial_number


def test_rotation_can_change_the_policy_and_refuses_unknown_names() -> None:
    """rotate_certificate(exportable=False) drops the key; an unknown name is a KeyError."""
    with Emulator() as emulator:
        emulator.add_certificate("policy", content_type=PEM)
        emulator.rotate_certificate("policy", exportable=False)

        assert decoded(emulator, "policy").key is None
        with pytest.raises(KeyError, match="add_certificate"):
            emulator.rotate_certificate("never-added")
        with pytest.raises(ValueError, match="pem_order"):
            emulator.rotate_certificate("policy", pem_order="backwards")


def test_official_sdk_reads_certificate_secrets(
    emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """azure-keyvault-secrets reads managed secrets: value, content type, managed and key id."""
    from test_emulator_sdk import aim_sdk_at, secret_client

    aim_sdk_at(emulator, monkeypatch)
    with secret_client(emulator) as client:
        pfx = client.get_secret("web-pfx")
        pem_secret = client.get_secret("web-pem-chain-first")
        listed = {p.name: p for p in client.list_properties_of_secrets()}

    assert pfx.properties.content_type == PKCS12
    assert pfx.properties.managed is True
    assert pfx.properties.key_id == f"{emulator.vault_url}/keys/web-pfx/{pfx.properties.version}"
    assert pfx.properties.expires_on is not None
    assert pfx.value is not None and Decoded(PKCS12, pfx.value).key is not None
    assert pem_secret.value is not None and "BEGIN PRIVATE KEY" in pem_secret.value
    assert listed["web-pfx"].managed is True


@pytest.mark.parametrize(
    ("certificate", "message"),
    [
        ({"key_type": "dsa"}, "certificate: key_type must be one of rsa, ec"),
        ({"pem_order": "random"}, "certificate: pem_order must be one of"),
        ({"content_type": "text/plain"}, "certificate: content_type must be one of"),
        ({"exportable": "no"}, "certificate: exportable must be true or false"),
        ({"sans": "a.example"}, "certificate: sans: must be a non-empty list"),
        ({"validity_days": 0}, "certificate: validity_days must be at least 1"),
        ({"valid_from_days": "soon"}, "certificate: valid_from_days: must be a whole number"),
        ({"colour": "red"}, "certificate: unknown key 'colour'"),
        ("yes", "certificate: expected a mapping"),
        ({"validity_days": 10**9}, "certificate: validity_days: must be within 36500 days"),
        ({"valid_from_days": -(10**9)}, "certificate: valid_from_days: must be within"),
    ],
)
def test_bad_certificate_declarations_name_the_key(certificate: object, message: str) -> None:
    """Each bad certificate: key is refused with one line naming the secret and the key."""
    with pytest.raises(ValueError, match="secret 'web'") as caught:
        Emulator({"web": {"certificate": certificate}})
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"certificate": {}, "value": "x"}, "(with certificate): unknown key 'value'"),
        ({"value_base64": "not base64!"}, "value_base64 is not standard base64"),
        ({"value": "a", "value_base64": "AA=="}, "give value or value_base64, not both"),
        ({"value": "a", "expires_in_days": 1.5}, "expires_in_days: must be a whole number"),
        ({"value": "a", "expires_on": 1, "expires_in_days": 1}, "give expires_on or expires_in_days"),
    ],
)
def test_bad_encoding_and_expiry_declarations_name_the_key(spec: object, message: str) -> None:
    """value_base64 and *_in_days are checked by the emulator itself, one line each."""
    with pytest.raises(ValueError, match="secret 'web'") as caught:
        Emulator({"web": spec})
    assert message in str(caught.value)


def test_generating_a_chain_and_a_leaf_is_fast() -> None:
    """The CA pair and an RSA leaf take well under a second (the suite issues dozens)."""
    started = time.perf_counter()
    emulator = Emulator({"one": {"certificate": {}}})
    elapsed = time.perf_counter() - started
    assert elapsed < 2.0
    assert emulator.certificate_root_pem.startswith(b"-----BEGIN CERTIFICATE-----")


@pytest.mark.integration
def test_emulator_command_serves_a_declared_certificate(tmp_path: Path) -> None:
    """kv-agent emulator --secrets FILE serves a certificate declared in the file, and writes
    its root CA beside the TLS CA in --cert-dir."""
    secrets_file = tmp_path / "secrets.yaml"
    secrets_file.write_text(
        "secrets:\n  web-tls:\n    certificate:\n      content_type: application/x-pem-file\n"
        "      key_type: ec\n      sans: [web.example.test]\n")
    cert_dir = tmp_path / "certs"
    cert_dir.mkdir()
    env = {key: value for key, value in os.environ.items() if not key.lower().endswith("_proxy")}
    with emulator_command(secrets_file, "--cert-dir", str(cert_dir), env=env) as (process,
                                                                                banner):
        with requests.Session() as client:
            client.trust_env = False
            grant = client.get(banner["imds"], headers={"Metadata": "true"}, timeout=5, params={
                "api-version": "2018-02-01", "resource": "https://vault.azure.net"}).json()
            body = client.get(f"{banner['vault']}/secrets/web-tls",
                              params={"api-version": API_VERSION}, verify=banner["ca"],
                              headers={"Authorization": f"Bearer {grant['access_token']}"},
                              timeout=5).json()
        material = Decoded(body["contentType"], body["value"])
        assert body["managed"] is True
        assert _public_numbers(material.key) == material.leaf().public_key().public_numbers()
        root = x509.load_pem_x509_certificate((cert_dir / CERTIFICATE_ROOT_FILE).read_bytes())
        material.issuers()[0].verify_directly_issued_by(root)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0


def test_rest_create_certificate_reissues_with_a_new_key(emulator: Emulator) -> None:
    """POST /certificates/<name>/create re-issues a declared certificate as a new version with
    a new key (how a separate process, e.g. a system test, rotates), answering 202 inProgress
    with a Location; GET .../pending then says completed; unknown names get 404."""
    before = bundle(emulator, "web-shuffled")
    with requests.Session() as client:
        client.trust_env = False
        client.verify = emulator.ca_path
        headers = {"Authorization": f"Bearer {token(emulator)}"}
        created = client.post(
            f"{emulator.vault_url}/certificates/web-shuffled/create",
            params={"api-version": API_VERSION}, headers=headers, json={}, timeout=5)
        pending = client.get(created.headers["Location"], headers=headers, timeout=5)
        missing = client.post(
            f"{emulator.vault_url}/certificates/never-declared/create",
            params={"api-version": API_VERSION}, headers=headers, timeout=5)
    after = bundle(emulator, "web-shuffled")

    assert created.status_code == 202, created.text
    assert created.json()["status"] == "inProgress" and "target" not in created.json()
    assert pending.status_code == 200, pending.text
    assert pending.json()["status"] == "completed"
    assert pending.json()["request_id"] == created.json()["request_id"]
    assert pending.json()["target"] == f"{emulator.vault_url}/certificates/web-shuffled"
    assert after["id"] != before["id"]
    old_key, new_key = Decoded(PEM, before["value"]).key, Decoded(PEM, after["value"]).key
    assert _public_numbers(old_key) != _public_numbers(new_key)
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "CertificateNotFound"


def test_certificate_views_cover_certificates_only(emulator: Emulator) -> None:
    """Only issued certificates are certificates: a plain secret is 404 as a certificate,
    absent from the list, and creating a certificate over it is a 409; a certificate never
    created through the API has no pending operation."""
    with requests.Session() as client:
        client.trust_env = False
        client.verify = emulator.ca_path
        headers = {"Authorization": f"Bearer {token(emulator)}"}
        params = {"api-version": API_VERSION}

        def get(path: str) -> requests.Response:
            return client.get(f"{emulator.vault_url}{path}", params=params, headers=headers,
                              timeout=5)

        listed = get("/certificates").json()
        plain = get("/certificates/licence")
        pending = get("/certificates/web-pfx/pending")
        policy = get("/certificates/web-pem/policy").json()
        over_plain = client.post(f"{emulator.vault_url}/certificates/licence/create",
                                 params=params, headers=headers, timeout=5,
                                 json={"policy": {"issuer": {"name": "Self"}}})

    names = {item["id"].rsplit("/", 1)[1] for item in listed["value"]}
    assert "web-pfx" in names and "licence" not in names and "stale" not in names
    assert plain.status_code == 404 and plain.json()["error"]["code"] == "CertificateNotFound"
    assert pending.status_code == 404
    assert policy["secret_props"] == {"contentType": PEM}
    assert policy["key_props"]["kty"] == "EC" and policy["x509_props"]["subject"] == "CN=web-pem"
    assert over_plain.status_code == 409


def _get_as(emulator: Emulator, name: str, out: str, api_version: str = "2025-07-01"
            ) -> requests.Response:
    return vault_get(emulator, f"/secrets/{name}", token(emulator),
                     params={"api-version": api_version, "outContentType": out})


def test_out_content_type_pem_converts_a_pkcs12_certificate(emulator: Emulator) -> None:
    """outContentType=application/x-pem-file serves a PKCS#12 certificate as PEM: the PKCS#8
    key, then the leaf, then the chain, the same certificate as the stored PKCS#12."""
    stored = decoded(emulator, "web-pfx")
    response = _get_as(emulator, "web-pfx", PEM)

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["contentType"] == PEM and body["managed"] is True
    material = Decoded(PEM, body["value"])
    assert material.blocks == ["-----BEGIN PRIVATE KEY-----"] + [
        "-----BEGIN CERTIFICATE-----"] * len(stored.certificates)
    assert material.certificates == stored.certificates  # leaf first, then the chain
    assert _public_numbers(material.key) == material.leaf().public_key().public_numbers()
    assert body["id"] == bundle(emulator, "web-pfx")["id"]


def test_out_content_type_edges(emulator: Emulator) -> None:
    """A non-exportable PKCS#12 converts to certificates only; PEM asked of PEM and PKCS#12
    of PKCS#12 are served as stored; a plain secret is untouched; PEM to PKCS#12 and an
    unknown type are 400; an api-version before 2025-06-01 ignores the parameter."""
    locked = _get_as(emulator, "locked-pfx", PEM).json()
    assert locked["contentType"] == PEM and Decoded(PEM, locked["value"]).key is None
    assert "-----BEGIN CERTIFICATE-----" in locked["value"]
    assert _get_as(emulator, "web-pem", PEM).json() == bundle(emulator, "web-pem")
    assert _get_as(emulator, "web-pfx", PKCS12).json() == bundle(emulator, "web-pfx")
    assert _get_as(emulator, "licence", PEM).json() == bundle(emulator, "licence")
    for name, out in (("web-pem", PKCS12), ("web-pfx", "text/plain")):
        refused = _get_as(emulator, name, out)
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "BadParameter"
    old = _get_as(emulator, "web-pfx", PEM, api_version="7.6").json()
    assert old["contentType"] == PKCS12


def test_official_sdk_gets_a_pkcs12_certificate_as_pem(
    emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """azure-keyvault-secrets' get_secret(out_content_type=PEM) gets the key and chain as PEM."""
    from test_emulator_sdk import aim_sdk_at, secret_client

    aim_sdk_at(emulator, monkeypatch)
    with secret_client(emulator) as client:
        converted = client.get_secret("web-pfx", out_content_type=PEM)

    assert converted.properties.content_type == PEM and converted.value is not None
    material = Decoded(PEM, converted.value)
    assert material.blocks[0] == "-----BEGIN PRIVATE KEY-----"
    assert _public_numbers(material.key) == material.leaf().public_key().public_numbers()
