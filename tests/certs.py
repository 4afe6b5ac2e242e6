"""Test certificates: a root, an intermediate and a leaf (RSA or EC), made with cryptography."""

from __future__ import annotations

import base64
import datetime
from typing import List, NamedTuple, Optional

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID

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


def _new_key(kind: str) -> object:
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
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
    """A fresh root, intermediate and leaf; ``kind`` is the leaf's key type (rsa or ec)."""
    root_key, intermediate_key = _new_key("ec"), _new_key("ec")
    root = _certificate(f"Test Root {name}", root_key, None, root_key, True)
    intermediate = _certificate(f"Test Intermediate {name}", intermediate_key, root, root_key,
                                True)
    key = _new_key(kind)
    leaf = _certificate(name, key, intermediate, intermediate_key, False)
    return Pki(root, intermediate, leaf, key)
