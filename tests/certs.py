"""Test certificates: a root, an intermediate and a leaf (RSA, EC or X25519), made with
cryptography; a certificate whose public key cryptography cannot load (SM2); and a small DER
writer that builds PKCS#12 values by hand, hostile ones included (see :func:`pfx`)."""

from __future__ import annotations

import base64
import datetime
import hashlib
import os
from typing import List, NamedTuple, Optional, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa, x25519
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID

from agent.pipeline.pkcs12 import MAX_ITERATIONS, pkcs12_kdf

PKCS12 = "application/x-pkcs12"
PEM = "application/x-pem-file"


class Pki(NamedTuple):
    """A leaf with its key, issued by an intermediate issued by a root."""

    root: x509.Certificate
    intermediate: x509.Certificate
    leaf: x509.Certificate
    key: object  # the leaf's private key

    def pem_blocks(self) -> List[bytes]:
        key = self.key.private_bytes(  # type: ignore[attr-defined]
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption())
        return [key] + [c.public_bytes(serialization.Encoding.PEM)
                        for c in (self.leaf, self.intermediate, self.root)]

    def pem(self, order: Optional[List[int]] = None) -> str:
        """Key, leaf, intermediate, root as PEM text, blocks in ``order`` (indexes)."""
        blocks = self.pem_blocks()
        return b"".join(blocks[i] for i in (order or range(len(blocks)))).decode()

    def pfx(self, password: Optional[bytes] = None, with_key: bool = True) -> str:
        """Standard base64 of a PKCS#12, as Key Vault serves a certificate's secret."""
        encryption = (serialization.BestAvailableEncryption(password) if password
                      else serialization.NoEncryption())
        data = pkcs12.serialize_key_and_certificates(
            b"kv", self.key if with_key else None, self.leaf,  # type: ignore[arg-type]
            [self.intermediate, self.root], encryption)
        return base64.b64encode(data).decode()


    def key_der(self) -> bytes:
        """The leaf's key as unencrypted PKCS#8 DER."""
        return self.key.private_bytes(  # type: ignore[attr-defined,no-any-return]
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption())

    def certificates_der(self) -> List[bytes]:
        """Leaf, intermediate, root as DER."""
        return [c.public_bytes(serialization.Encoding.DER)
                for c in (self.leaf, self.intermediate, self.root)]


def _new_key(kind: str) -> object:
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if kind == "x25519":  # a key-agreement key: no PKCS#12 can hold it
        return x25519.X25519PrivateKey.generate()
    return ec.generate_private_key(ec.SECP256R1())


def _certificate(subject: str, key: object, issuer: Optional[x509.Certificate],
                 issuer_key: object, is_ca: bool) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    public = key.public_key()  # type: ignore[attr-defined]
    builder = (x509.CertificateBuilder()
               .subject_name(name)
               .issuer_name(issuer.subject if issuer else name)
               .public_key(public)
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=30))
               .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False))
    if issuer is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.public_key()),  # type: ignore[arg-type]
            critical=False)
    if not is_ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(subject)]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())  # type: ignore[arg-type]


def make_pki(kind: str = "rsa", name: str = "web.example") -> Pki:
    """A fresh root, intermediate and leaf; ``kind`` is the leaf's key type (rsa, ec, x25519)."""
    root_key, intermediate_key = _new_key("ec"), _new_key("ec")
    root = _certificate(f"Test Root {name}", root_key, None, root_key, True)
    intermediate = _certificate(f"Test Intermediate {name}", intermediate_key, root, root_key,
                                True)
    key = _new_key(kind)
    leaf = _certificate(name, key, intermediate, intermediate_key, False)
    return Pki(root, intermediate, leaf, key)


# ---------------------------------------------------------------------------
# Certificates cryptography cannot load: SM2 (what `openssl genpkey -algorithm SM2` makes)

P256_CURVE = bytes.fromhex("06082a8648ce3d030107")  # OID prime256v1, DER
SM2_CURVE = bytes.fromhex("06082a811ccf5501822d")  # OID 1.2.156.10197.1.301, same length
_ECDSA_SHA256 = bytes.fromhex("300a06082a8648ce3d040302")


def sm2_certificate(name: str = "sm2.example") -> bytes:
    """A signed certificate (DER) whose public key is on the SM2 curve, made at test time:
    a P-256 certificate's curve OID replaced by SM2's, then signed again. cryptography
    parses it, but its ``public_key()`` raises UnsupportedAlgorithm, as for a real one."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    original = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=30))
                .sign(key, hashes.SHA256()))
    tbs = original.tbs_certificate_bytes
    assert tbs.count(P256_CURVE) == 1
    tbs = tbs.replace(P256_CURVE, SM2_CURVE)
    signature = key.sign(tbs, ec.ECDSA(hashes.SHA256()))
    return seq(tbs, _ECDSA_SHA256, der(0x03, b"\0" + signature))


def sm2_pkcs8() -> bytes:
    """A PKCS#8 EC key on the SM2 curve (a P-256 key with its curve OID replaced):
    cryptography refuses to load it."""
    key = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())
    return key.replace(P256_CURVE, SM2_CURVE)


def pem_block(label: str, data: bytes) -> bytes:
    """``data`` as a PEM block with ``label``."""
    text = base64.encodebytes(data).decode().replace("\n", "")
    lines = [text[i:i + 64] for i in range(0, len(text), 64)]
    return (f"-----BEGIN {label}-----\n" + "\n".join(lines) + f"\n-----END {label}-----\n"
            ).encode()


# ---------------------------------------------------------------------------
# A DER writer, and PKCS#12 built by hand (RFC 7292), for values no library would write


def der(tag: int, content: bytes) -> bytes:
    """One DER element."""
    size = len(content)
    if size < 0x80:
        return bytes([tag, size]) + content
    length = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(length)]) + length + content


def seq(*parts: bytes) -> bytes:
    return der(0x30, b"".join(parts))


def integer(value: int) -> bytes:
    return der(0x02, value.to_bytes(value.bit_length() // 8 + 1, "big", signed=True))


def octets(data: bytes) -> bytes:
    return der(0x04, data)


def explicit(data: bytes) -> bytes:
    """[0] EXPLICIT."""
    return der(0xA0, data)


def oid(dotted: str) -> bytes:
    arcs = [int(arc) for arc in dotted.split(".")]
    body = bytearray()
    for arc in [40 * arcs[0] + arcs[1], *arcs[2:]]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        body += bytes(reversed(chunk))
    return der(0x06, bytes(body))


DATA = "1.2.840.113549.1.7.1"
ENCRYPTED_DATA = "1.2.840.113549.1.7.6"
KEY_BAG = "1.2.840.113549.1.12.10.1.1"
SHROUDED_KEY_BAG = "1.2.840.113549.1.12.10.1.2"
CERT_BAG = "1.2.840.113549.1.12.10.1.3"
SAFE_CONTENTS_BAG = "1.2.840.113549.1.12.10.1.6"
PBE_SHA1_3DES = "1.2.840.113549.1.12.1.3"


def key_bag(pkcs8: bytes) -> bytes:
    return seq(oid(KEY_BAG), explicit(pkcs8))


def cert_bag(certificate: bytes) -> bytes:
    return seq(oid(CERT_BAG), explicit(seq(oid("1.2.840.113549.1.9.22.1"),
                                           explicit(octets(certificate)))))


def shrouded_key_bag(pkcs8: bytes, iterations: int = 2048, scheme: str = "pbes2") -> bytes:
    """A pkcs8ShroudedKeyBag encrypted with the empty password."""
    algorithm, ciphertext = encrypt(pkcs8, iterations, scheme)
    return seq(oid(SHROUDED_KEY_BAG), explicit(seq(algorithm, octets(ciphertext))))


def safe_contents_bag(bags: Sequence[bytes]) -> bytes:
    return seq(oid(SAFE_CONTENTS_BAG), explicit(seq(*bags)))


def data_content(bags: Sequence[bytes]) -> bytes:
    """A ContentInfo of type data holding SafeContents."""
    return seq(oid(DATA), explicit(octets(seq(*bags))))


def encrypted_content(bags: Sequence[bytes], iterations: int = 2048,
                      scheme: str = "pbes2") -> bytes:
    """A ContentInfo of type encryptedData holding SafeContents, empty password."""
    algorithm, ciphertext = encrypt(seq(*bags), iterations, scheme)
    return seq(oid(ENCRYPTED_DATA), explicit(seq(
        integer(0), seq(oid(DATA), algorithm, der(0x80, ciphertext)))))


def pfx(contents: Sequence[bytes], mac_iterations: Optional[int] = 2048) -> bytes:
    """A PFX (DER) of ContentInfos, with a MacData of ``mac_iterations`` (its MAC is
    zeros: kv-agent does not verify it) or none."""
    parts = [integer(3), seq(oid(DATA), explicit(octets(seq(*contents))))]
    if mac_iterations is not None:
        digest = seq(seq(oid("1.3.14.3.2.26"), der(0x05, b"")), octets(bytes(20)))
        parts.append(seq(digest, octets(os.urandom(8)), integer(mac_iterations)))
    return seq(*parts)


def encrypt(plain: bytes, iterations: int, scheme: str) -> "tuple[bytes, bytes]":
    """(AlgorithmIdentifier, ciphertext) of ``plain`` under the empty password: PBES2 with
    PBKDF2-SHA256 and AES-256-CBC, or ("pkcs12-3des") PKCS#12's PBE with 3DES. A count above
    kv-agent's bound (refused before any derivation) gets random bytes: deriving a key with
    2^31 iterations would take this test minutes."""
    salt = os.urandom(8)
    block = 16 if scheme == "pbes2" else 8
    pad = block - len(plain) % block
    padded = plain + bytes([pad]) * pad
    iv = os.urandom(block)
    if scheme == "pbes2":
        algorithm = seq(oid("1.2.840.113549.1.5.13"), seq(
            seq(oid("1.2.840.113549.1.5.12"), seq(octets(salt), integer(iterations),
                                                  seq(oid("1.2.840.113549.2.9"),
                                                      der(0x05, b"")))),
            seq(oid("2.16.840.1.101.3.4.1.42"), octets(iv))))
    else:
        algorithm = seq(oid(PBE_SHA1_3DES), seq(octets(salt), integer(iterations)))
    if iterations > MAX_ITERATIONS:
        return algorithm, os.urandom(len(padded))
    if scheme == "pbes2":
        key = hashlib.pbkdf2_hmac("sha256", b"", salt, iterations, 32)
        encryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
    else:
        try:
            from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
        except ImportError:
            from cryptography.hazmat.primitives.ciphers.algorithms import TripleDES
        # The empty password spelled as nothing at all, as OpenSSL reads a PKCS#12
        # without a MAC (kv-agent tries the BMPString spelling, two zero bytes, first).
        key = pkcs12_kdf(b"", salt, 1, iterations, 24)
        iv = pkcs12_kdf(b"", salt, 2, iterations, 8)
        encryptor = Cipher(TripleDES(key), modes.CBC(iv)).encryptor()
    return algorithm, encryptor.update(padded) + encryptor.finalize()


def pfx_value(data: bytes) -> bytes:
    """A PKCS#12 as a Key Vault certificate's secret value (standard base64)."""
    return base64.b64encode(data)
