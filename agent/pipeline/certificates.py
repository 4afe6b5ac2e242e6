"""Certificates: a Key Vault certificate's secret split into the files servers read.

A certificate in Key Vault is read through its secret, whose value is either
``application/x-pkcs12`` (standard base64 of a PKCS#12 with an empty
password) or ``application/x-pem-file`` (PEM text: a PKCS#8 key and the
certificates, in no guaranteed order). :func:`split_certificate` parses
either, orders the chain itself and serialises the kinds an entry asks for:

* ``key``: the private key, PEM PKCS#8, unencrypted;
* ``cert``: the leaf, PEM;
* ``chain``: the issuers (intermediates, then the root if present), PEM;
  empty for a self-signed leaf;
* ``fullchain``: the leaf, then the issuers (nginx's ``ssl_certificate``);
* ``pfx``: PKCS#12, binary, with an empty password and no encryption (see
  :func:`_pfx`);
* ``fullchain_key``: the leaf, the issuers, then the key (PKCS#8), in one
  file: the layout the Key Vault VM extension for Linux documents for the
  file it writes ("Certificate Installation on Linux": leaf first, each
  issuer after the one it certifies, the private key at the end), so a
  consumer of that file reads the same bytes from kv-agent's.

The chain is ordered, never trusted to be: the leaf is the certificate whose
public key is the private key's; each next one is the certificate whose
subject is the current one's issuer (and whose subject key identifier is the
current one's authority key identifier, when both are present), until a
self-signed certificate or no issuer. Certificates outside that chain (an
old intermediate, a cross-signed root left in a bundle) are dropped with a
debug log: served, they would make a client build or a reviewer read a path
that is not the one this key belongs to.

This module (with :mod:`agent.pipeline.pkcs12`, which it alone imports) is the only
part of the agent that imports ``cryptography``, and :mod:`agent.pipeline.transforms`
imports it only for a certificate entry: a plain-secret manifest never loads
it. Pure apart from a debug log line.

Parsing is bounded in size and in CPU, since a value from the vault must not
freeze the agent (OpenSSL holds Python's GIL while it works): the value is
at most the vault client's body cap; at most MAX_CERTIFICATES certificates
are read; a PKCS#12 is read by :mod:`agent.pipeline.pkcs12` (iteration counts bounded
before any key derivation runs); PEM is scanned in one linear pass; a
private key is checked before ``cryptography`` loads it (RSA at most
MAX_RSA_BITS: loading validates the key's primes, 4 s for 8,192 bits; only
RSA, EC and the Edwards/Montgomery curves). A certificate whose public key
``cryptography`` cannot load (SM2, an unknown algorithm) is never the key's
leaf, and is dropped like any certificate outside the chain. Errors are
TransformError naming the secret and the fix, never quoting the value.
"""

from __future__ import annotations

import binascii
import datetime
import logging
import re
from typing import TYPE_CHECKING, Iterator, List, NamedTuple, Optional, Sequence, Tuple

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.serialization import pkcs12

from agent.base.errors import TransformError
from agent.base.untrusted import escape, strict_base64
from agent.pipeline.der import INTEGER, OCTET_STRING, OID, SEQUENCE, DerError, Reader
from agent.pipeline.expiry import usable_epoch
from agent.pipeline.pkcs12 import Pkcs12Error, read_pkcs12

if TYPE_CHECKING:  # the name is cryptography 40's; Debian 12 ships 38
    from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

log = logging.getLogger(__name__)

PKCS12 = "application/x-pkcs12"
PEM = "application/x-pem-file"
MAX_CERTIFICATES = 20  # a leaf, a few intermediates and a root; more is not a certificate
# Key Vault's largest RSA key. Loading a key validates it (its primes), which
# holds the GIL: 0.3 s for 4,096 bits, 4 s for 8,192, minutes beyond.
MAX_RSA_BITS = 4096
# One marker line's head; every match is at most ~57 bytes, so a scan is
# linear (a pattern spanning BEGIN to END took ~30 s on 250 KB of BEGIN lines).
_PEM_MARKER_RE = re.compile(rb"-----(BEGIN|END) ([A-Z0-9 ]{1,40})-----")
_KEY_BLOCKS = (b"PRIVATE KEY", b"RSA PRIVATE KEY", b"EC PRIVATE KEY")
_RSA_KEYS = ("1.2.840.113549.1.1.1", "1.2.840.113549.1.1.10")  # rsaEncryption, RSASSA-PSS
# EC (any named curve cryptography knows), Ed25519, Ed448, X25519, X448.
_OTHER_KEYS = ("1.2.840.10045.2.1", "1.3.101.112", "1.3.101.113", "1.3.101.110",
               "1.3.101.111")


class Bundle(NamedTuple):
    """What a certificate's secret holds: maybe a key, and its certificates."""

    key: Optional[PrivateKeyTypes]
    certificates: Tuple[x509.Certificate, ...]


class Chain(NamedTuple):
    """The leaf, then its issuers in order (intermediates, then the root)."""

    leaf: x509.Certificate
    issuers: Tuple[x509.Certificate, ...]


class CertificateFiles(NamedTuple):
    """The bytes of each requested kind, and the leaf's validity (epoch seconds)."""

    pieces: Tuple[bytes, ...]
    not_before: Optional[int]  # None: outside 1970..9999 (agent.pipeline.expiry.usable_epoch)
    not_after: Optional[int]


def split_certificate(name: str, value: bytes, content_type: Optional[str],
                      kinds: Sequence[str]) -> Tuple[bytes, ...]:
    """The bytes of each of ``kinds`` (key, cert, chain, fullchain, pfx), in order
    (see :func:`read_certificate`)."""
    return read_certificate(name, value, content_type, kinds).pieces


def read_certificate(name: str, value: bytes, content_type: Optional[str],
                     kinds: Sequence[str]) -> CertificateFiles:
    """The bytes of each of ``kinds`` (key, cert, chain, fullchain, pfx), in order,
    with the leaf's notBefore and notAfter from the same parse (parsing a
    PKCS#12 with its key costs milliseconds: once per version is enough).

    Raises TransformError for an unknown content type, a value that does not
    parse, a PKCS#12 with a password, an encrypted key, no key when key or
    pfx is asked (a non-exportable certificate), or a key matching no certificate.
    """
    bundle = read_bundle(name, value, content_type)
    needs_key = any(kind in ("key", "pfx", "fullchain_key") for kind in kinds)
    if bundle.key is None and needs_key:
        raise TransformError(
            f"secret '{name}': no private key in the value: the certificate's policy makes "
            "the key non-exportable",
            "make the key exportable in the certificate policy (a new version), or ask "
            "only for cert, chain and fullchain, which need no key")
    chain = order_chain(name, bundle)
    pieces = []
    for kind in kinds:
        if kind == "key":
            assert bundle.key is not None  # checked above
            pieces.append(_pkcs8(bundle.key))
        elif kind == "cert":
            pieces.append(_pem((chain.leaf,)))
        elif kind == "chain":
            pieces.append(_pem(chain.issuers))
        elif kind == "fullchain":
            pieces.append(_pem((chain.leaf, *chain.issuers)))
        elif kind == "pfx":
            assert bundle.key is not None
            pieces.append(_pfx(name, bundle.key, chain))
        elif kind == "fullchain_key":
            assert bundle.key is not None
            pieces.append(_pem((chain.leaf, *chain.issuers)) + _pkcs8(bundle.key))
        else:
            raise TransformError(f"secret '{name}': unknown certificate output '{kind}'",
                                 "use key, cert, chain, fullchain, pfx or fullchain_key")
    return CertificateFiles(tuple(pieces), _epoch(chain.leaf, "not_valid_before"),
                            _epoch(chain.leaf, "not_valid_after"))


def _epoch(certificate: x509.Certificate, field: str) -> Optional[int]:
    """A validity bound as epoch seconds: ``<field>_utc`` (cryptography 42 and
    later) or the naive UTC ``<field>`` that Debian 12's 38 has; None when it
    is before 1970 (GeneralizedTime goes back to the year 1), as for any date
    :func:`agent.pipeline.expiry.usable_epoch` refuses."""
    aware = getattr(certificate, field + "_utc", None)
    if aware is None:
        aware = getattr(certificate, field).replace(tzinfo=datetime.timezone.utc)
    return usable_epoch(int(aware.timestamp()))


def read_bundle(name: str, value: bytes, content_type: Optional[str]) -> Bundle:
    """Parse the secret's value by its content type (see the module docstring)."""
    kind = (content_type or "").split(";")[0].strip().lower()
    if kind == PKCS12:
        return _read_pkcs12(name, value)
    if kind == PEM:
        return _read_pem(name, value)
    shown = escape(content_type, 80) if content_type else "none"
    raise TransformError(
        f"secret '{name}': content type '{shown}' is not a certificate's "
        f"({PKCS12} or {PEM})",
        "point certificate: at a Key Vault certificate's name, or use path: for a plain secret")


def _read_pkcs12(name: str, value: bytes) -> Bundle:
    try:
        der = strict_base64(value)
    except (binascii.Error, ValueError):
        raise TransformError(f"secret '{name}': the PKCS#12 value is not base64",
                             "store the certificate through Key Vault's certificate API") from None
    try:
        contents = read_pkcs12(der)
    except Pkcs12Error as exc:
        raise TransformError(f"secret '{name}': {exc.message}", exc.hint) from None
    _check_count(name, len(contents.certificates))
    certificates = []
    for data in contents.certificates:
        try:
            certificates.append(_parsed(x509.load_der_x509_certificate(data)))
        except (ValueError, x509.InvalidVersion):  # InvalidVersion is no ValueError
            raise TransformError(f"secret '{name}': a certificate in the PKCS#12 does not parse",
                                 "store a valid certificate") from None
    if not certificates:
        raise TransformError(f"secret '{name}': no certificate in the PKCS#12 value",
                             "store the certificate with its chain")
    key = None if contents.key is None else _load_key(name, contents.key, b"PRIVATE KEY")
    return Bundle(key, tuple(certificates))


def _read_pem(name: str, value: bytes) -> Bundle:
    key: Optional[PrivateKeyTypes] = None
    certificates: List[x509.Certificate] = []
    for label, text, body in _pem_blocks(value):
        if label == b"CERTIFICATE":
            _check_count(name, len(certificates) + 1)
            try:
                certificates.append(_parsed(x509.load_pem_x509_certificate(text)))
            except (ValueError, x509.InvalidVersion):
                raise TransformError(f"secret '{name}': a CERTIFICATE block does not parse",
                                     "store a valid certificate") from None
        elif label == b"ENCRYPTED PRIVATE KEY" or b"ENCRYPTED" in body[:200]:
            raise _encrypted(name)
        elif label in _KEY_BLOCKS:
            if key is not None:
                raise TransformError(f"secret '{name}': the PEM holds two private keys",
                                     "store one key with its certificates")
            try:
                der = strict_base64(body)
            except (binascii.Error, ValueError):
                raise _unreadable_key(name) from None
            key = _load_key(name, der, label)
    if not certificates:
        raise TransformError(f"secret '{name}': no certificate in the PEM value",
                             "store the certificate with its chain")
    return Bundle(key, tuple(certificates))


def _parsed(certificate: x509.Certificate) -> x509.Certificate:
    """``certificate``, after reading the fields the chain and the expiry use:
    cryptography parses names and times lazily, so a damaged name would
    raise ValueError later, wherever it is first read (the fuzz test found
    one in order_chain)."""
    _ = (certificate.subject, certificate.issuer,  # read now, for their ValueError
         _epoch(certificate, "not_valid_before"), _epoch(certificate, "not_valid_after"))
    return certificate


def _pem_blocks(value: bytes) -> Iterator[Tuple[bytes, bytes, bytes]]:
    """Each ``-----BEGIN X-----`` line break ... ``-----END X-----`` block of
    ``value``, in order, as (label, the whole block, its body), in one pass
    over the marker lines: a BEGIN without its END is skipped, as is an END
    without its BEGIN."""
    label: Optional[bytes] = None
    start = body = 0
    for marker in _PEM_MARKER_RE.finditer(value):
        if marker.group(1) == b"BEGIN":
            after = value[marker.end():marker.end() + 2]
            is_line = after[:1] == b"\n" or after == b"\r\n"
            label = marker.group(2) if is_line else None
            start, body = marker.start(), marker.end()
        elif label is not None and marker.group(2) == label:
            yield label, value[start:marker.end()], value[body:marker.start()]
            label = None


def _load_key(name: str, der: bytes, label: bytes) -> PrivateKeyTypes:
    """The private key of ``der`` (PKCS#8 for ``PRIVATE KEY``, PKCS#1 for
    ``RSA PRIVATE KEY``, SEC1 for ``EC PRIVATE KEY``), after checking what
    loading it would cost (see MAX_RSA_BITS)."""
    try:
        rsa_bits = _rsa_bits(der, label)
    except DerError:
        raise _unreadable_key(name) from None
    if rsa_bits is not None and rsa_bits > MAX_RSA_BITS:
        raise TransformError(f"secret '{name}': the RSA key has {rsa_bits} bits, more than "
                             f"{MAX_RSA_BITS} (Key Vault's largest)",
                             f"use an RSA key of at most {MAX_RSA_BITS} bits, or an EC key")
    try:
        return serialization.load_der_private_key(der, password=None)
    except TypeError:  # "Password was not given but private key is encrypted"
        raise _encrypted(name) from None
    except (ValueError, UnsupportedAlgorithm):
        raise _unreadable_key(name) from None


def _rsa_bits(der: bytes, label: bytes) -> Optional[int]:
    """The modulus size of an RSA key, None for another supported key type.
    Raises DerError for a key that does not parse or whose type is not supported."""
    key = Reader(1000).parse(der)
    if label == b"EC PRIVATE KEY":
        return None
    if label == b"PRIVATE KEY":  # PKCS#8: version, algorithm, key (PKCS#1 for RSA)
        algorithm = key.child(1, SEQUENCE).child(0, OID).oid()
        if algorithm in _OTHER_KEYS:
            return None
        if algorithm not in _RSA_KEYS:
            raise DerError("an unsupported key type")
        key = Reader(1000).parse(key.child(2, OCTET_STRING).octets())
    return key.child(1, INTEGER).integer().bit_length()  # RSAPrivateKey: version, n, ...


def _unreadable_key(name: str) -> TransformError:
    return TransformError(f"secret '{name}': the private key does not parse or is of a type "
                          "kv-agent does not support",
                          "store an unencrypted PKCS#8 RSA or EC key")


def _encrypted(name: str) -> TransformError:
    return TransformError(f"secret '{name}': the private key is encrypted",
                          "store it unencrypted (Key Vault protects it); kv-agent has no "
                          "password to give")


def _check_count(name: str, count: int) -> None:
    if count > MAX_CERTIFICATES:
        raise TransformError(f"secret '{name}': more than {MAX_CERTIFICATES} certificates",
                             "store the leaf and its chain only")


def order_chain(name: str, bundle: Bundle) -> Chain:
    """The leaf and its issuers in order (see the module docstring).

    Without a key (a non-exportable certificate), the leaf is the one
    certificate that issued none of the others. Raises TransformError when the
    key matches no certificate, or no single leaf can be told.
    """
    certificates = list({c.fingerprint(hashes.SHA256()): c for c in bundle.certificates}.values())
    if bundle.key is not None:
        wanted = _spki(bundle.key.public_key())
        leaves = [c for c in certificates if _certificate_spki(c) == wanted]
        if not leaves:
            raise TransformError(f"secret '{name}': the private key matches none of the "
                                 f"{len(certificates)} certificates",
                                 "store the key with its own certificate")
    else:
        leaves = [c for c in certificates
                  if not any(_issued(other, c) for other in certificates if other is not c)]
        if len(leaves) != 1:
            raise TransformError(f"secret '{name}': no single leaf among the certificates",
                                 "store one certificate with its chain")
    leaf = leaves[0]
    issuers: List[x509.Certificate] = []
    current, left = leaf, [c for c in certificates if c is not leaf]
    while left and current.subject != current.issuer:
        following = next((c for c in left if _issued(current, c)), None)
        if following is None:
            break
        issuers.append(following)
        left.remove(following)
        current = following
    for dropped in left:
        log.debug("secret %s: dropped a certificate outside the chain: %s", name,
                  _subject_text(dropped))
    return Chain(leaf, tuple(issuers))


def _subject_text(certificate: x509.Certificate) -> str:
    """The subject as RFC 4514 text, escaped, for a log line; "?" when it cannot be written."""
    try:
        return escape(certificate.subject.rfc4514_string(), 200)
    except ValueError:
        return "?"


def _issued(child: x509.Certificate, issuer: x509.Certificate) -> bool:
    """Whether ``issuer`` is ``child``'s issuer by name and, where both carry
    one, by key identifier (names alone repeat across re-keyed CAs)."""
    if child.issuer != issuer.subject:
        return False
    authority = _authority_key_id(child)
    subject = _subject_key_id(issuer)
    if authority is not None and subject is not None:
        return authority == subject
    return True


def _authority_key_id(certificate: x509.Certificate) -> Optional[bytes]:
    try:
        extension = certificate.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)
    except (x509.ExtensionNotFound, ValueError):
        return None
    return extension.value.key_identifier


def _subject_key_id(certificate: x509.Certificate) -> Optional[bytes]:
    try:
        extension = certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    except (x509.ExtensionNotFound, ValueError):
        return None
    return extension.value.digest


def _certificate_spki(certificate: x509.Certificate) -> Optional[bytes]:
    """The certificate's public key as DER, or None when ``cryptography``
    cannot load it (SM2, an unknown algorithm): such a certificate cannot be
    the leaf of a key that loaded."""
    try:
        return _spki(certificate.public_key())
    except (ValueError, UnsupportedAlgorithm):
        return None


def _spki(public_key: object) -> bytes:
    return public_key.public_bytes(  # type: ignore[attr-defined,no-any-return]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _pkcs8(key: PrivateKeyTypes) -> bytes:
    """The private key as PEM PKCS#8 (``BEGIN PRIVATE KEY``), unencrypted."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _pem(certificates: Sequence[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certificates)


def _pfx(name: str, key: PrivateKeyTypes, chain: Chain) -> bytes:
    """PKCS#12 with an empty password and no encryption: the file's owner and
    mode on tmpfs protect it, and a password everyone knows adds nothing;
    unencrypted, it is read by OpenSSL (``-passin pass:``), Java and .NET alike.
    PKCS#12 takes RSA, EC, DSA, Ed25519 and Ed448 keys only: an X25519 leaf's
    pfx is refused (its key and cert files can still be written)."""
    try:
        return pkcs12.serialize_key_and_certificates(
            name.encode("ascii"), key, chain.leaf, list(chain.issuers) or None,  # type: ignore[arg-type]
            serialization.NoEncryption())
    except (TypeError, ValueError, UnsupportedAlgorithm):
        raise TransformError(f"secret '{name}': a {type(key).__name__.lstrip('_')} key cannot "
                             "be written to a pfx (PKCS#12) file",
                             "ask for key and cert instead of pfx, or use an RSA or EC "
                             "key") from None
