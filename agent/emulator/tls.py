"""The vault's TLS material: a throw-away CA and the server certificate it signs.

Only this module needs ``cryptography`` (the ``emulator`` extra, the
``kv-agent-emulator`` package's dependency), and only when it generates: an
emulator given pre-made PEM files runs without it.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # never imported at run time
    from cryptography import x509  # optional: the ``emulator`` extra


@dataclass(frozen=True)
class CertificatePaths:
    """PEM files written by :func:`generate_certificates`."""

    ca_cert: str
    server_cert: str
    server_key: str




def generate_certificates(
    directory: str, *, hostnames: Sequence[str] = (), valid_days: int = 7
) -> CertificatePaths:
    """Create a throw-away CA and a server certificate it signs, as PEM files.

    Writes ``ca.pem``, ``server.pem`` and ``server.key`` (mode 0600) into
    ``directory``. The server certificate names IP 127.0.0.1 and DNS localhost,
    plus ``hostnames`` (IP literals become IP SANs). The CA key is never written:
    nothing can be signed with this CA afterwards. EC P-256 keeps generation in
    the millisecond range. Needs ``cryptography`` (the ``emulator`` extra),
    imported here only so loading pre-made files works without it.
    """
    import datetime

    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    except ImportError:
        from agent.base.errors import MissingDependencyError

        raise MissingDependencyError(
            "the emulator needs the Python package 'cryptography' to make its test CA",
            "install python3-cryptography (Debian, Ubuntu, RHEL, Azure Linux) or run "
            "pip install 'kv-agent[emulator]', or pass --tls-cert/--tls-key",
        ) from None

    now = datetime.datetime.now(datetime.timezone.utc)
    not_before = now - datetime.timedelta(hours=1)  # tolerate clock skew
    not_after = now + datetime.timedelta(days=valid_days)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, "kv-agent emulator test CA")]
    )
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    sans: list[x509.GeneralName] = [
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.DNSName("localhost"),
    ]
    for name in hostnames:
        san = _san_for(name)
        if san not in sans:
            sans.append(san)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kv-agent emulator")])
        )
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )

    os.makedirs(directory, mode=0o700, exist_ok=True)
    paths = CertificatePaths(
        ca_cert=os.path.join(directory, "ca.pem"),
        server_cert=os.path.join(directory, "server.pem"),
        server_key=os.path.join(directory, "server.key"),
    )
    pem = serialization.Encoding.PEM
    _write_file(paths.ca_cert, ca_cert.public_bytes(pem), 0o644)
    _write_file(paths.server_cert, server_cert.public_bytes(pem), 0o644)
    key_pem = server_key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    _write_file(paths.server_key, key_pem, 0o600)
    return paths


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    """KeyUsage for a CA (sign certificates) or an ECDSA TLS server (sign handshakes)."""
    from cryptography import x509

    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _san_for(name: str) -> x509.GeneralName:
    from cryptography import x509

    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _write_file(path: str, data: bytes, mode: int) -> None:
    """Write with ``mode`` from the start, so a private key is never briefly world-readable."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as stream:
        stream.write(data)
    os.chmod(path, mode)  # O_CREAT's mode is filtered by the umask
