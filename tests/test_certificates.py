"""Certificates: PKCS#12 and PEM secrets split into key, cert, chain, fullchain and pfx files."""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, NamedTuple, Optional, Tuple

import pytest
from certs import (
    PEM,
    PKCS12,
    Pki,
    cert_bag,
    data_content,
    der,
    encrypted_content,
    integer,
    key_bag,
    make_pki,
    octets,
    oid,
    pem_block,
    pfx,
    pfx_value,
    seq,
    shrouded_key_bag,
    sm2_certificate,
    sm2_pkcs8,
)
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs12

from agent.pipeline.certificates import MAX_CERTIFICATES, split_certificate
from agent.pipeline.pkcs12 import MAX_ITERATIONS
from agent.pipeline.sources import SecretAttributes
from agent.pipeline.transforms import TransformError, TransformParams, apply_transform

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


@pytest.mark.parametrize("source", ["pfx", "pem"])
def test_fullchain_key_is_the_vm_extensions_file(pki: Pki, source: str) -> None:
    """fullchain_key is the leaf, the intermediate, the root, then the PKCS#8 key, each block
    ending in one newline: the file the Key Vault VM extension for Linux documents (learn.
    microsoft.com/azure/virtual-machines/extensions/key-vault-linux, "Certificate Installation
    on Linux")."""
    [extension_file] = split_certificate("web-tls", *source_value(pki, source), ("fullchain_key",))
    key = pki.key.private_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())
    assert extension_file == pem(pki.leaf, pki.intermediate, pki.root) + key
    assert extension_file.count(b"-----BEGIN PRIVATE KEY-----\n") == 1
    assert extension_file.endswith(b"-----END PRIVATE KEY-----\n")
    with pytest.raises(TransformError, match="non-exportable"):
        split_certificate("web-tls", pki.pfx(with_key=False).encode(), PKCS12,
                          ("fullchain_key",))


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
        "is damaged": (base64.b64encode(b"not a pkcs12"), PKCS12),
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
from agent.pipeline.transforms import apply_transform
import agent.sync.sync, agent.cli, agent.daemon.service
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
              "from agent.pipeline.transforms import TransformError, TransformParams, apply_transform\n"
              "class F:\n    name, value, content_type, attributes = 'web-tls', b'x', "
              "'application/x-pem-file', None\n"
              "try:\n    apply_transform('certificate', [F()], 1, TransformParams(kinds=('cert',)))\n"
              "except TransformError as exc:\n    print(exc)\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                          text=True, timeout=60, check=True)
    assert done.stdout.startswith("secret 'web-tls': certificates need the cryptography package")
    assert "install python3-cryptography" in done.stdout


# ---------------------------------------------------------------------------
# Issue 17: a value from the vault never takes the agent down


def _x509(data: bytes) -> x509.Certificate:
    return x509.load_der_x509_certificate(data)


@pytest.mark.parametrize("source", ["pfx", "pem"])
def test_a_certificate_whose_key_cryptography_cannot_load_is_dropped(pki: Pki,
                                                                      source: str) -> None:
    """An SM2 certificate next to a good key, leaf and chain is dropped like any certificate
    outside the chain; it used to raise UnsupportedAlgorithm out of the transform."""
    sm2 = sm2_certificate()
    if source == "pem":
        value = (pki.pem() + pem_block("CERTIFICATE", sm2).decode()).encode()
        content_type = PEM
    else:
        value = pfx_value(pfx([data_content(
            [key_bag(pki.key_der()), cert_bag(sm2)]
            + [cert_bag(c) for c in pki.certificates_der()])]))
        content_type = PKCS12
    files = split(value, content_type)
    assert files["fullchain"] == pem(pki.leaf, pki.intermediate, pki.root)
    assert files["chain"] == pem(pki.intermediate, pki.root)


def test_an_sm2_key_is_refused_as_a_type_kv_agent_does_not_support() -> None:
    """An SM2 leaf with its SM2 key fails the entry with one line naming the fix."""
    value = pem_block("PRIVATE KEY", sm2_pkcs8()) + pem_block("CERTIFICATE", sm2_certificate())
    text = _refusal(value, PEM, ("key", "cert"))
    assert "of a type kv-agent does not support" in text and "RSA or EC key" in text


def test_an_x25519_leaf_writes_key_and_cert_but_refuses_a_pfx() -> None:
    """An X25519 leaf's key and cert are written; asking for its pfx (PKCS#12 holds no X25519
    key) fails that entry with one line instead of a TypeError."""
    x = make_pki("x25519")
    for value, content_type in ((x.pem().encode(), PEM),
                                (pfx_value(pfx([data_content(
                                    [key_bag(x.key_der())]
                                    + [cert_bag(c) for c in x.certificates_der()])])), PKCS12)):
        files = split(value, content_type, ("key", "cert", "chain"))
        assert files["cert"] == pem(x.leaf) and files["chain"] == pem(x.intermediate, x.root)
        text = _refusal(value, content_type, ("cert", "pfx"))
        assert "X25519PrivateKey key cannot be written to a pfx" in text
        assert "ask for key and cert instead of pfx" in text


def _fake_rsa_pkcs8(bits: int) -> bytes:
    """A PKCS#8 RSA key with a ``bits``-bit modulus and nonsense elsewhere (kv-agent must
    refuse it by its size before cryptography tries to validate it)."""
    modulus = (1 << (bits - 1)) | int.from_bytes(os.urandom(bits // 8), "big") | 1
    modulus &= (1 << bits) - 1
    pkcs1 = seq(integer(0), integer(modulus), integer(65537), *[integer(3)] * 6)
    return seq(integer(0), seq(oid("1.2.840.113549.1.1.1"), der(0x05, b"")), octets(pkcs1))


def test_an_rsa_key_above_4096_bits_is_refused_before_it_is_loaded(pki: Pki) -> None:
    """An RSA key of 8,192 bits (4 s of GIL-holding validation, more beyond) is refused by its
    size, in PEM and in a PKCS#12, before cryptography loads it."""
    big = _fake_rsa_pkcs8(8192)
    leaf = pki.pem_blocks()[1]
    pem_value = pem_block("PRIVATE KEY", big) + leaf
    pfx_data = pfx_value(pfx([data_content([key_bag(big), cert_bag(pki.certificates_der()[0])])]))
    for value, content_type in ((pem_value, PEM), (pfx_data, PKCS12)):
        started = time.monotonic()
        text = _refusal(value, content_type)
        assert "the RSA key has 8192 bits, more than 4096" in text
        assert time.monotonic() - started < 0.5


def test_pem_is_scanned_in_linear_time() -> None:
    """250 KB of BEGIN lines (~30 s for the old pattern) is scanned in well under a second."""
    value = b"-----BEGIN CERTIFICATE-----\n" * (250_000 // 28)
    started = time.monotonic()
    assert "no certificate in the PEM value" in _refusal(value, PEM)
    assert time.monotonic() - started < 0.5


def test_pem_blocks_keep_the_old_scanner_rules(pki: Pki) -> None:
    """A BEGIN without a line break, a BEGIN without its END and an END of another label are
    skipped; every complete block in between is read."""
    blocks = pki.pem_blocks()
    value = (b"-----BEGIN CERTIFICATE----- no line break\n" + blocks[1]
             + b"-----BEGIN CERTIFICATE-----\nunfinished\n" + blocks[0]
             + b"-----END RSA PRIVATE KEY-----\n" + blocks[2] + blocks[3])
    files = split(value, PEM, ("key", "cert", "chain"))
    assert files["cert"] == pem(pki.leaf) and files["chain"] == pem(pki.intermediate, pki.root)


def test_the_reported_pkcs12_mac_count_is_refused_at_once(pki: Pki) -> None:
    """The 1.1 KB PKCS#12 with a MAC iteration count of 2^26 (~25 s of OpenSSL holding the GIL
    per fetch) fails its entry at once, naming the count."""
    value = pfx_value(pfx([data_content([key_bag(pki.key_der()),
                                         cert_bag(pki.certificates_der()[0])])],
                          mac_iterations=2**26))
    started = time.monotonic()
    text = _refusal(value, PKCS12)
    assert time.monotonic() - started < 0.5
    assert "MAC iteration count is 67,108,864" in text


class _GilWatch:
    """A thread that wakes every 5 ms: the longest gap between its wake-ups is the longest
    time another thread held the GIL (what would keep the agent's loop from answering
    SIGTERM or the watchdog)."""

    def __init__(self) -> None:
        self.longest = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        last = time.monotonic()
        while not self._stop.wait(0.005):
            now = time.monotonic()
            self.longest = max(self.longest, now - last)
            last = now

    def __enter__(self) -> "_GilWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()


FREEZE_LIMIT_S = 2.0  # the bound on how long one value may hold the loop


@pytest.fixture(scope="module")
def rsa4096() -> Pki:
    """A leaf with a 4,096-bit RSA key (Key Vault's largest): its validation on load is the
    longest the GIL is held for a value kv-agent accepts."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=4096)
    base = make_pki("ec", "big.example")
    leaf = (x509.CertificateBuilder().subject_name(base.leaf.subject)
            .issuer_name(base.leaf.issuer).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(base.leaf.not_valid_before_utc)
            .not_valid_after(base.leaf.not_valid_after_utc)
            .sign(ec.generate_private_key(ec.SECP256R1()), hashes.SHA256()))
    return Pki(base.root, base.intermediate, leaf, key)


def _worst_values(pki: Pki, rsa4096: Pki) -> Dict[str, Tuple[bytes, str]]:
    """The costliest values to read that we could build, each at most the vault's 256 KiB."""
    cap = 256 * 1024
    chain = [cert_bag(c) for c in pki.certificates_der()]
    return {
        "250 KB of BEGIN lines": (b"-----BEGIN CERTIFICATE-----\n" * (cap // 28), PEM),
        "BEGIN and END lines, mismatched": (
            b"-----BEGIN CERTIFICATE-----\n-----END PRIVATE KEY-----\n" * (cap // 54), PEM),
        "a bundle and 200 KB of junk between its blocks": (
            b"".join(block + b"x" * 40_000 for block in pki.pem_blocks()), PEM),
        "ASN.1 nested 64k deep": (pfx_value(b"\x30\x80" * (cap // 6)), PKCS12),
        "100k tiny ASN.1 elements": (pfx_value(seq(*[b"\x05\x00"] * 60_000)), PKCS12),
        "MAC count 2^31 - 1": (pfx_value(pfx([data_content(chain)],
                                              mac_iterations=2**31 - 1)), PKCS12),
        "PBES2 at the bounds (1M + 1M iterations)": (pfx_value(pfx([
            encrypted_content(chain, iterations=MAX_ITERATIONS),
            data_content([shrouded_key_bag(pki.key_der(), iterations=MAX_ITERATIONS)])])),
            PKCS12),
        "PKCS#12 3DES at the bound, the second password spelling": (pfx_value(pfx([
            encrypted_content(chain, iterations=MAX_ITERATIONS // 2, scheme="pkcs12-3des"),
            data_content([key_bag(pki.key_der())])])), PKCS12),
        "a 4096-bit RSA key": (b"".join(rsa4096.pem_blocks()), PEM),
    }


def test_no_value_holds_the_gil_for_more_than_2_s(pki: Pki, rsa4096: Pki) -> None:
    """Each of the costliest values we could build (PEM scanner, ASN.1 depth and size,
    iteration counts at and beyond the bounds, the largest RSA key) keeps the GIL, and so
    the agent's loop, for under 2 s; the figures are printed (pytest -s)."""
    figures = []
    for label, (value, content_type) in _worst_values(pki, rsa4096).items():
        assert len(value) <= 256 * 1024 + 1024, label
        started = time.monotonic()
        with _GilWatch() as watch:
            try:
                split_certificate("worst", value, content_type, KINDS)
            except TransformError:
                pass
        figures.append((label, time.monotonic() - started, watch.longest))
    for label, elapsed, longest in figures:
        print(f"{label}: {elapsed:.3f} s in all, GIL held at most {longest:.3f} s")
    assert all(longest < FREEZE_LIMIT_S for _, _, longest in figures), figures
    assert all(elapsed < 10.0 for _, elapsed, _ in figures), figures


def test_a_certificate_of_an_unknown_x509_version_is_refused_not_a_bug(pki: Pki) -> None:
    """A certificate whose version field is not v1-v3 (cryptography raises InvalidVersion,
    which is no ValueError; the fuzz test found it) is refused as one that does not parse."""
    der = pki.leaf.public_bytes(serialization.Encoding.DER)
    assert der.count(b"\xa0\x03\x02\x01\x02") == 1  # [0] EXPLICIT INTEGER 2: v3
    bad = der.replace(b"\xa0\x03\x02\x01\x02", b"\xa0\x03\x02\x01\x07")
    block = (b"-----BEGIN CERTIFICATE-----\n" + base64.encodebytes(bad)
             + b"-----END CERTIFICATE-----\n")
    text = _refusal(pki.pem_blocks()[0] + block, PEM, ("cert",))
    assert "does not parse" in text
