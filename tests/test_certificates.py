"""Certificates: PKCS#12 and PEM secrets split into key, cert, chain, fullchain and pfx files."""

from __future__ import annotations

import base64
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, NamedTuple, Optional, Tuple

import pytest
from certs import PEM, PKCS12, Pki, make_pki
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12

from agent.certificates import MAX_CERTIFICATES, split_certificate
from agent.sources import SecretAttributes
from agent.transforms import TransformError, TransformParams, apply_transform

KINDS = ("key", "cert", "chain", "fullchain", "pfx")
REPO = Path(__file__).resolve().parent.parent
OPENSSL = shutil.which("openssl")


class Fetched(NamedTuple):
    name: str
    value: bytes
    content_type: Optional[str] = None
    attributes: SecretAttributes = SecretAttributes()


@pytest.fixture(scope="module", params=["rsa", "ec"])
def pki(request: pytest.FixtureRequest) -> Pki:
    return make_pki(request.param)


def source_value(pki: Pki, kind: str) -> Tuple[bytes, str]:
    """The secret's value and content type: PKCS#12, or PEM with the blocks shuffled."""
    if kind == "pfx":
        return pki.pfx().encode(), PKCS12
    return pki.pem(order=[2, 3, 0, 1]).encode(), PEM  # intermediate, root, key, leaf


def split(value: bytes, content_type: Optional[str], kinds: Tuple[str, ...] = KINDS,
          name: str = "web-tls") -> Dict[str, bytes]:
    return dict(zip(kinds, split_certificate(name, value, content_type, kinds)))


def pem(*certificates: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certificates)


@pytest.mark.parametrize("source", ["pfx", "pem"])
def test_every_output_from_pfx_and_shuffled_pem(pki: Pki, source: str) -> None:
    """The key matches the leaf, the chain is intermediate then root, fullchain is cert + chain,
    and the pfx holds the same key and chain with an empty password."""
    files = split(*source_value(pki, source))
    assert files["key"].startswith(b"-----BEGIN PRIVATE KEY-----\n")  # PKCS#8, unencrypted
    key = serialization.load_pem_private_key(files["key"], password=None)
    assert key.public_key().public_numbers() == pki.leaf.public_key().public_numbers()  # type: ignore[union-attr]
    assert files["cert"] == pem(pki.leaf)
    assert files["chain"] == pem(pki.intermediate, pki.root)
    assert files["fullchain"] == files["cert"] + files["chain"]
    pfx_key, leaf, others = pkcs12.load_key_and_certificates(files["pfx"], None)
    assert pfx_key is not None and leaf == pki.leaf and others == [pki.intermediate, pki.root]
    assert pfx_key.public_key().public_numbers() == key.public_key().public_numbers()  # type: ignore[union-attr]


@pytest.mark.parametrize("order", [[0, 1, 2, 3], [3, 2, 1, 0], [1, 3, 0, 2], [2, 0, 3, 1]])
def test_chain_order_does_not_depend_on_block_order(pki: Pki, order: list) -> None:  # type: ignore[type-arg]
    """Whatever order the PEM blocks come in, the chain is leaf's issuer first, root last."""
    files = split(pki.pem(order).encode(), PEM, ("cert", "chain"))
    assert files == {"cert": pem(pki.leaf), "chain": pem(pki.intermediate, pki.root)}


def test_certificates_outside_the_chain_are_dropped(pki: Pki) -> None:
    """An unrelated certificate in the bundle is not served in the chain."""
    stranger = make_pki("ec", "other.example")
    value = (pki.pem() + stranger.pem_blocks()[3].decode()).encode()
    assert split(value, PEM, ("fullchain",))["fullchain"] == pem(pki.leaf, pki.intermediate,
                                                                  pki.root)


def test_without_a_key_cert_chain_and_fullchain_still_work(pki: Pki) -> None:
    """A non-exportable certificate (no key in the value) still yields cert, chain, fullchain."""
    for value, content_type in ((pki.pfx(with_key=False).encode(), PKCS12),
                                (pki.pem([3, 1, 2]).encode(), PEM)):
        files = split(value, content_type, ("cert", "chain", "fullchain"))
        assert files["fullchain"] == pem(pki.leaf, pki.intermediate, pki.root)


def _refusal(value: bytes, content_type: Optional[str], kinds: Tuple[str, ...] = KINDS) -> str:
    with pytest.raises(TransformError) as caught:
        split_certificate("web-tls", value, content_type, kinds)
    text = str(caught.value)
    assert "secret 'web-tls'" in text and "\n" not in text
    return text


def test_no_private_key_names_the_policy_and_the_fix(pki: Pki) -> None:
    """Asking for key or pfx of a non-exportable certificate says why and what to do."""
    for value, content_type in ((pki.pfx(with_key=False).encode(), PKCS12),
                                (pki.pem([1, 2, 3]).encode(), PEM)):
        for kinds in (("key",), ("cert", "pfx")):
            text = _refusal(value, content_type, kinds)
            assert "non-exportable" in text and "exportable in the certificate policy" in text
            assert "cert, chain and fullchain" in text


def test_refusals_name_the_secret_and_never_the_value(pki: Pki) -> None:
    """A key matching no certificate, an encrypted key, a PKCS#12 with a password, an unknown
    content type, damaged values and too many certificates each fail with one clear line."""
    other = make_pki("ec", "other.example")
    encrypted_key = pki.key.private_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pw"))
    legacy_encrypted = pki.key.private_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.BestAvailableEncryption(b"pw"))
    leaf_pem = pki.pem_blocks()[1]
    many = b"".join([leaf_pem] * (MAX_CERTIFICATES + 1))
    cases = {
        "matches none": (other.pem_blocks()[0] + b"".join(pki.pem_blocks()[1:]), PEM),
        "is encrypted": (encrypted_key + leaf_pem, PEM),
        "legacy encrypted": (legacy_encrypted + leaf_pem, PEM),
        "empty password": (pki.pfx(password=b"secret-pw").encode(), PKCS12),
        "not a certificate's": (pki.pem().encode(), "text/plain"),
        "none": (pki.pem().encode(), None),
        "not base64": (b"%%%", PKCS12),
        "or it is damaged": (base64.b64encode(b"not a pkcs12"), PKCS12),
        "no certificate": (pki.pem_blocks()[0], PEM),
        f"more than {MAX_CERTIFICATES}": (many, PEM),
    }
    for fragment, (value, content_type) in cases.items():
        text = _refusal(value, content_type)
        wanted = "encrypted" if fragment == "legacy encrypted" else fragment
        assert wanted in text, (fragment, text)
        excerpt = value.decode(errors="replace")[40:80]
        assert "PRIVATE" not in text and (not excerpt or excerpt not in text)


def test_transform_certificate_uses_the_entry_kinds(pki: Pki) -> None:
    """apply_transform('certificate') fills the entry's outputs in its kinds' order."""
    value, content_type = source_value(pki, "pem")
    data = apply_transform("certificate", [Fetched("web-tls", value, content_type)], 2,
                           TransformParams(kinds=("chain", "cert")))
    assert data == (pem(pki.intermediate, pki.root), pem(pki.leaf))


def _openssl(*argv: str) -> str:
    assert OPENSSL is not None
    done = subprocess.run([OPENSSL, *argv], capture_output=True, text=True, timeout=30,
                          check=False)
    assert done.returncode == 0, (argv, done.stderr)
    return done.stdout + done.stderr


@pytest.mark.skipif(OPENSSL is None, reason="the openssl command is not installed")
@pytest.mark.parametrize("source", ["pfx", "pem"])
def test_openssl_reads_every_output(pki: Pki, source: str, tmp_path: Path) -> None:
    """openssl reads the key, the certificate, verifies the leaf against the root through the
    chain, and opens the pfx with an empty password (certificates and key)."""
    for kind, data in split(*source_value(pki, source)).items():
        (tmp_path / kind).write_bytes(data)
    root = tmp_path / "root.pem"
    root.write_bytes(pem(pki.root))
    files = {kind: str(tmp_path / kind) for kind in KINDS}
    _openssl("pkey", "-in", files["key"], "-noout")
    assert "web.example" in _openssl("x509", "-in", files["cert"], "-noout", "-subject")
    assert _openssl("verify", "-CAfile", str(root), "-untrusted", files["chain"],
                    files["cert"]).startswith(f"{files['cert']}: OK")
    assert _openssl("verify", "-CAfile", str(root), "-untrusted", files["fullchain"],
                    files["cert"]).startswith(f"{files['cert']}: OK")
    certificates = _openssl("pkcs12", "-in", files["pfx"], "-passin", "pass:", "-nokeys")
    assert certificates.count("BEGIN CERTIFICATE") == 3
    keys = _openssl("pkcs12", "-in", files["pfx"], "-passin", "pass:", "-nocerts", "-nodes")
    assert "BEGIN PRIVATE KEY" in keys
    # The key file and the certificate hold one public key.
    assert _openssl("pkey", "-in", files["key"], "-pubout") == _openssl(
        "x509", "-in", files["cert"], "-noout", "-pubkey")


PLAIN_PATH = """
import sys
from agent.manifest import Accounts, parse_manifest
from agent.transforms import apply_transform
import agent.agent, agent.cli, agent.daemon
text = '''vault: https://kv.vault.azure.net
secrets:
  - name: a
  - name: b
    encoding: base64
  - name: env
    template: {path: app.env, values: {A: a, B: b}}
'''
manifest = parse_manifest(text, accounts=Accounts(lambda n: 0, lambda n: 0),
                          check_filesystem=False)
class F:
    name, value, content_type, attributes = "a", b"YQ==", None, None
for entry in manifest.secrets:
    apply_transform(entry.transform, [F()] * len(entry.sources), 1, entry.params)
print(sorted(m for m in sys.modules if m.split(".")[0] == "cryptography"))
"""


def test_a_plain_secret_manifest_never_imports_cryptography() -> None:
    """Parsing a manifest of plain, encoded and template entries and transforming them, with
    the agent, the CLI and the daemon loaded, leaves cryptography unimported."""
    done = subprocess.run([sys.executable, "-c", PLAIN_PATH], cwd=REPO, capture_output=True,
                          text=True, timeout=60, check=True)
    assert done.stdout.strip() == "[]", done.stdout


def test_without_cryptography_a_certificate_entry_fails_in_one_line() -> None:
    """A package built without cryptography fails the certificate entry with the package to
    install, never a traceback."""
    script = ("import sys; sys.modules['cryptography'] = None\n"
              "from agent.transforms import TransformError, TransformParams, apply_transform\n"
              "class F:\n    name, value, content_type, attributes = 'web-tls', b'x', "
              "'application/x-pem-file', None\n"
              "try:\n    apply_transform('certificate', [F()], 1, TransformParams(kinds=('cert',)))\n"
              "except TransformError as exc:\n    print(exc)\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                          text=True, timeout=60, check=True)
    assert done.stdout.startswith("secret 'web-tls': certificates need the cryptography package")
    assert "install python3-cryptography" in done.stdout
