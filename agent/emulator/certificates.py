"""Certificate-backed secrets: a stable issuing CA and the leaf certificates it signs.

Key Vault exposes every certificate through a secret of the same name (protocol.md
B9): ``managed: true``, a ``kid`` naming the certificate's key, and a value that is
either standard base64 of a PKCS#12 with an empty password or PEM text holding a
PKCS#8 key and the chain. A non-exportable certificate's value holds no key.

This module is the emulator's own oracle: it builds those values with
``cryptography`` (imported inside the functions, so importing the emulator never
needs it) and shares no code with the agent that parses them. One
:class:`IssuingChain` (root CA, intermediate CA) lives as long as the emulator,
so every rotation of every certificate verifies against the same root.
"""

from __future__ import annotations

import base64
import datetime
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # never imported at run time
    from cryptography import x509

PKCS12 = "application/x-pkcs12"
PEM = "application/x-pem-file"
KEY_TYPES = ("rsa", "ec")  # RSA 2048 or EC P-256, the two common Key Vault policies
# Where the key and the issuers sit in a PEM value: Azure does not document the
# order (B9 "[unverified]"), so tests must be able to ask for each.
PEM_ORDERS = ("key-first", "chain-first", "shuffled")
DEFAULT_SANS = ("localhost",)
_CA_VALIDITY_DAYS = 3650
_SECONDS_PER_DAY = 86400


@dataclass(frozen=True)
class CertificateSpec:
    """How to issue one certificate version; every field has Key Vault's common default.

    ``valid_from_days`` is the leaf's notBefore relative to now (negative: in the
    past; positive: not yet valid); the leaf is valid for ``validity_days`` from
    then, so ``valid_from_days=-30, validity_days=10`` is already expired.
    """

    key_type: str = "rsa"
    content_type: str = PKCS12
    pem_order: str = "key-first"
    exportable: bool = True
    include_root: bool = False
    sans: tuple[str, ...] = DEFAULT_SANS
    validity_days: int = 365
    valid_from_days: int = 0
    seed: int = 0  # shuffled PEM order: which permutation, so a failure reproduces


@dataclass(frozen=True)
class IssuedCertificate:
    """One issued version: the secret value, the leaf's validity (epoch seconds)
    and the leaf itself (DER: the certificate's ``cer``)."""

    value: str
    not_before: int
    expires_on: int
    serial: int
    cer: bytes = b""


def _crypto() -> Any:
    """Import cryptography on first use; a typed error names the fix when it is missing."""
    try:
        import cryptography.x509  # noqa: F401 - loads the submodules used below
        from cryptography.hazmat.primitives.serialization import pkcs12  # noqa: F401
    except ImportError:
        from agent.base.errors import MissingDependencyError

        raise MissingDependencyError(
            "the emulator needs the Python package 'cryptography' to issue certificates",
            "install python3-cryptography or run pip install 'kv-agent[emulator]'",
        ) from None
    import cryptography

    return cryptography


def _name(common_name: str) -> x509.Name:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "kv-agent emulator"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _new_key(key_type: str) -> Any:
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    if key_type == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


class IssuingChain:
    """A root CA and an intermediate CA (both EC P-256: fast), kept for the emulator's life.

    Leaves are signed by the intermediate; the root is self-signed. The keys stay
    in memory only.
    """

    def __init__(self) -> None:
        _crypto()
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes

        now = datetime.datetime.now(datetime.timezone.utc)
        start, end = now - datetime.timedelta(days=1), now + datetime.timedelta(
            days=_CA_VALIDITY_DAYS
        )
        self._root_key = _new_key("ec")
        root_name = _name("kv-agent emulator root CA")
        self.root = (
            self._ca_builder(root_name, root_name, self._root_key, start, end, path_length=1)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(
                    self._root_key.public_key()
                ),
                critical=False,
            )
            .sign(self._root_key, hashes.SHA256())
        )
        self._key = _new_key("ec")
        self.intermediate = (
            self._ca_builder(
                _name("kv-agent emulator intermediate CA"),
                root_name,
                self._key,
                start,
                end,
                path_length=0,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(
                    self._root_key.public_key()
                ),
                critical=False,
            )
            .sign(self._root_key, hashes.SHA256())
        )

    @staticmethod
    def _ca_builder(
        subject: x509.Name,
        issuer: x509.Name,
        key: Any,
        start: datetime.datetime,
        end: datetime.datetime,
        *,
        path_length: int,
    ) -> x509.CertificateBuilder:
        from cryptography import x509

        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True,
                    crl_sign=True, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
        )

    @property
    def root_pem(self) -> bytes:
        """The root CA certificate, PEM: the trust anchor for ``openssl verify -CAfile``."""
        from cryptography.hazmat.primitives.serialization import Encoding

        return bytes(self.root.public_bytes(Encoding.PEM))

    def issue(self, common_name: str, spec: CertificateSpec, now: float) -> IssuedCertificate:
        """Issue a leaf with a NEW key for ``spec`` and build the secret value (B9)."""
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes
        from cryptography.x509.oid import ExtendedKeyUsageOID

        key = _new_key(spec.key_type)
        start = datetime.datetime.fromtimestamp(
            int(now) + spec.valid_from_days * _SECONDS_PER_DAY, datetime.timezone.utc
        )
        end = start + datetime.timedelta(days=spec.validity_days)
        serial = x509.random_serial_number()
        leaf = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(self.intermediate.subject)
            .public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.SubjectAlternativeName([x509.DNSName(san) for san in spec.sans]),
                critical=False,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
            .sign(self._key, hashes.SHA256())
        )
        issuers = [self.intermediate] + ([self.root] if spec.include_root else [])
        exported = key if spec.exportable else None
        if spec.content_type == PKCS12:
            value = _pkcs12_value(common_name, exported, leaf, issuers)
        else:
            value = _pem_value(exported, leaf, issuers, spec.pem_order, spec.seed)
        from cryptography.hazmat.primitives.serialization import Encoding

        return IssuedCertificate(value, int(start.timestamp()), int(end.timestamp()), serial,
                                 leaf.public_bytes(Encoding.DER))


def _pkcs12_value(
    name: str, key: Any, leaf: x509.Certificate, issuers: Sequence[x509.Certificate]
) -> str:
    """Standard base64 of a PKCS#12 with an empty password, as Key Vault serves it (B9)."""
    from cryptography.hazmat.primitives.serialization import NoEncryption, pkcs12

    blob = pkcs12.serialize_key_and_certificates(
        name.encode(), key, leaf, list(issuers), NoEncryption()
    )
    return base64.b64encode(blob).decode("ascii")


def _pem_value(
    key: Any,
    leaf: x509.Certificate,
    issuers: Sequence[x509.Certificate],
    order: str,
    seed: int,
) -> str:
    """PEM text: a PKCS#8 key (when exportable) and the certificates, in ``order``."""
    from cryptography.hazmat.primitives.serialization import Encoding

    certificates = [cert.public_bytes(Encoding.PEM).decode("ascii") for cert in [leaf, *issuers]]
    key_block = [] if key is None else [_pkcs8_pem(key)]
    if order == "key-first":
        blocks = key_block + certificates
    elif order == "chain-first":
        blocks = certificates[:0:-1] + certificates[:1] + key_block  # root..leaf, then key
    else:
        blocks = key_block + certificates
        random.Random(seed).shuffle(blocks)
    return "".join(blocks)


def _pkcs8_pem(key: Any) -> str:
    """The private key as an unencrypted PKCS#8 PEM block (Key Vault's PEM form, B9)."""
    from cryptography.hazmat.primitives.serialization import (
        Encoding,
        NoEncryption,
        PrivateFormat,
    )

    return str(key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()).decode())


def pkcs12_to_pem(value: str) -> str:
    """A PKCS#12 secret value as ``outContentType=application/x-pem-file`` serves it.

    ``value`` is standard base64 of a PKCS#12 with an empty password (B9). The
    PEM text holds the PKCS#8 key first (none for a non-exportable
    certificate), then the leaf, then the other certificates in the PKCS#12's
    order: the layout of Key Vault's own PEM certificates (protocol.md B3, B9;
    the block order of the converted value is [unverified]). Raises ValueError
    when ``value`` is not such a PKCS#12.
    """
    _crypto()
    from cryptography.hazmat.primitives.serialization import Encoding, pkcs12

    try:
        key, leaf, others = pkcs12.load_key_and_certificates(
            base64.b64decode(value, validate=True), b""
        )
    except (ValueError, TypeError) as exc:
        raise ValueError("the value is not a PKCS#12 with an empty password") from exc
    certificates = ([leaf] if leaf is not None else []) + list(others)
    blocks = [] if key is None else [_pkcs8_pem(key)]
    blocks += [certificate.public_bytes(Encoding.PEM).decode("ascii")
               for certificate in certificates]
    return "".join(blocks)
