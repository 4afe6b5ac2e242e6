"""PKCS#12, read by the agent itself with bounded work.

A certificate's secret in Key Vault is a PKCS#12 with an empty password.
OpenSSL's reader (what ``cryptography``'s ``load_key_and_certificates``
runs) does unbounded work on such a value, holding Python's GIL all along:
it derives the MAC key and each encrypted part's key with whatever
iteration count the value states (2^26 took ~25 s; 2^31 - 1, 13 minutes,
up to four times over as it tries two spellings of the empty password), it
checks an RSA key of any size (8,192 bits: 4 s; larger, minutes), and a
count can hide inside an encrypted part where nobody can check it first.
A value from the vault must not freeze the agent, so this module reads the
PKCS#12 (RFC 7292) itself:

1. The envelope is read with :mod:`agent.pipeline.der` (bounded depth and elements).
2. The MAC is not verified: with an empty password anyone can compute it,
   so it proves nothing that TLS to the vault does not. Its iteration count
   is still checked (a count above MAX_ITERATIONS is not a real PKCS#12).
3. Every encrypted part states its key derivation: PBES2 with PBKDF2
   (``hashlib.pbkdf2_hmac``, which releases the GIL) or a PKCS#12 PBE
   (RFC 7292 appendix B.2, in Python: it gives the GIL up between
   bytecodes). Each count is at most MAX_ITERATIONS, and every derivation
   run for one value together at most MAX_TOTAL_ITERATIONS, checked
   before each runs, counts found inside decrypted parts included.
4. Ciphers: AES-CBC and 3DES-CBC from ``cryptography``; RC2-CBC (what
   Windows, and so Key Vault, and OpenSSL 1.x use for the certificates)
   here, as ``cryptography`` has it only from version 43.
5. Bags: key, shrouded key, certificate and nested safe contents; CRL and
   secret bags are ignored. Two keys are refused (which one is meant?).

The result is DER: the key as PKCS#8 and the certificates, for
:mod:`agent.pipeline.certificates` to load. Errors are :class:`Pkcs12Error`, whose
message never quotes the value.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Callable, List, NamedTuple, Optional, Tuple

from agent.pipeline.der import (
    CONTEXT_0,
    INTEGER,
    OCTET_STRING,
    OID,
    SEQUENCE,
    DerError,
    Element,
    Reader,
)

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.ciphers import BlockCipherAlgorithm

# Real counts are 2,000 (Windows, .NET, so Key Vault) to 2,048 (OpenSSL),
# 10,000 to 50,000 (Java); 600,000 is OWASP's advice for PBKDF2-SHA256. A
# million leaves room above all of those; a derivation that long costs
# ~0.3 s (PBKDF2) to ~1 s (PKCS#12's, in Python) of CPU, and the total
# bound keeps a value's whole read within a few seconds of CPU, never
# holding the GIL for long.
MAX_ITERATIONS = 1_000_000
MAX_TOTAL_ITERATIONS = 2_000_000

_DATA = "1.2.840.113549.1.7.1"
_ENCRYPTED_DATA = "1.2.840.113549.1.7.6"
_KEY_BAG = "1.2.840.113549.1.12.10.1.1"
_SHROUDED_KEY_BAG = "1.2.840.113549.1.12.10.1.2"
_CERT_BAG = "1.2.840.113549.1.12.10.1.3"
_SAFE_CONTENTS_BAG = "1.2.840.113549.1.12.10.1.6"
_X509_CERTIFICATE = "1.2.840.113549.1.9.22.1"
_PBES2 = "1.2.840.113549.1.5.13"
_PBKDF2 = "1.2.840.113549.1.5.12"
_HMAC_SHA1 = "1.2.840.113549.2.7"
_PRFS = {_HMAC_SHA1: "sha1", "1.2.840.113549.2.8": "sha224",
         "1.2.840.113549.2.9": "sha256", "1.2.840.113549.2.10": "sha384",
         "1.2.840.113549.2.11": "sha512"}
# PBES2 ciphers: (name, key bytes).
_PBES2_CIPHERS = {"2.16.840.1.101.3.4.1.2": ("aes", 16), "2.16.840.1.101.3.4.1.22": ("aes", 24),
                  "2.16.840.1.101.3.4.1.42": ("aes", 32), "1.2.840.113549.3.7": ("3des", 24)}
# PKCS#12 PBEs with SHA-1 (RFC 7292 appendix C): (cipher, key bytes). The two
# RC4 ones are left out: nothing writes them any more.
_PKCS12_PBES = {"1.2.840.113549.1.12.1.3": ("3des", 24), "1.2.840.113549.1.12.1.4": ("3des", 16),
                "1.2.840.113549.1.12.1.5": ("rc2", 16), "1.2.840.113549.1.12.1.6": ("rc2", 5)}


class Pkcs12Error(ValueError):
    """The PKCS#12 cannot be read; ``message`` says why, ``hint`` what to do."""

    def __init__(self, message: str, hint: str) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class Contents(NamedTuple):
    """What a PKCS#12 holds: its key (PKCS#8 DER) if any, and its certificates (DER)."""

    key: Optional[bytes]
    certificates: Tuple[bytes, ...]


def read_pkcs12(der: bytes, password: str = "") -> Contents:
    """The key and certificates of PKCS#12 ``der`` (see the module docstring).

    ``password`` is Key Vault's empty one but for tests. Raises Pkcs12Error
    for anything it cannot read: damaged, a password, an unsupported
    algorithm, an iteration count above the bounds, two keys.
    """
    try:
        return _Pkcs12Reader(password).read(der)
    except DerError:
        raise Pkcs12Error("the PKCS#12 is damaged (its ASN.1 does not parse)",
                          "store the certificate through Key Vault's certificate API") from None


class _Pkcs12Reader:
    """One read: the element budget, the iteration budget, what was found."""

    def __init__(self, password: str) -> None:
        self._der = Reader()
        self._password = password
        self._iterations_left = MAX_TOTAL_ITERATIONS
        self._key: Optional[bytes] = None
        self._certificates: List[bytes] = []

    def read(self, der: bytes) -> Contents:
        pfx = self._der.parse(der)  # PFX: version, authSafe, macData
        if pfx.tag != SEQUENCE:
            raise DerError("not a SEQUENCE")
        pfx.child(0, INTEGER)
        if len(pfx.children) > 2:  # MacData: DigestInfo, salt, iterations DEFAULT 1
            mac = pfx.child(2, SEQUENCE)
            if len(mac.children) > 2:
                _check_count(mac.child(2, INTEGER).integer(), "MAC")
        authenticated_safe = self._der.parse(_data_content(pfx.child(1, SEQUENCE)))
        for content_info in authenticated_safe.children:
            kind = content_info.child(0, OID).oid()
            if kind == _DATA:
                self._safe_contents(self._der.parse(_data_content(content_info)))
            elif kind == _ENCRYPTED_DATA:
                self._safe_contents(self._encrypted_data(content_info))
            else:
                raise _unsupported("a content that is neither data nor password-encrypted "
                                   "(public-key protection)")
        return Contents(self._key, tuple(self._certificates))

    def _encrypted_data(self, content_info: Element) -> Element:
        """EncryptedData: version, EncryptedContentInfo (type, algorithm, [0] content)."""
        encrypted = content_info.child(1, CONTEXT_0).child(0, SEQUENCE)
        info = encrypted.child(1, SEQUENCE)
        if len(info.children) < 3 or info.children[2].tag & 0xDF != 0x80:
            raise DerError("no encrypted content")
        return self._decrypt(info.child(1, SEQUENCE), info.children[2].octets())

    def _safe_contents(self, contents: Element) -> None:
        for bag in contents.children:
            kind = bag.child(0, OID).oid()
            value = bag.child(1, CONTEXT_0).child(0)
            if kind == _KEY_BAG:
                self._add_key(value.encoded())
            elif kind == _SHROUDED_KEY_BAG:  # EncryptedPrivateKeyInfo: algorithm, data
                key = self._decrypt(value.child(0, SEQUENCE), value.child(1, OCTET_STRING).octets())
                self._add_key(key.encoded())
            elif kind == _CERT_BAG and value.child(0, OID).oid() == _X509_CERTIFICATE:
                self._certificates.append(value.child(1, CONTEXT_0).child(0, OCTET_STRING).octets())
            elif kind == _SAFE_CONTENTS_BAG:  # nesting is bounded by the reader's depth
                self._safe_contents(value)

    def _add_key(self, pkcs8: bytes) -> None:
        if self._key is not None:
            raise Pkcs12Error("the PKCS#12 holds two private keys",
                              "store one key with its certificates")
        self._key = pkcs8

    # -- decryption --------------------------------------------------------------------

    def _decrypt(self, algorithm: Element, ciphertext: bytes) -> Element:
        """The DER that ``ciphertext`` decrypts to under ``algorithm`` (an
        AlgorithmIdentifier) and the password; a wrong password shows as bad
        padding or a plaintext that does not parse."""
        oid = algorithm.child(0, OID).oid()
        attempts: List[Callable[[], bytes]]
        if oid == _PBES2:
            attempts = [self._pbes2(algorithm.child(1, SEQUENCE), ciphertext)]
        elif oid in _PKCS12_PBES:
            attempts = self._pkcs12_pbe(oid, algorithm.child(1, SEQUENCE), ciphertext)
        else:
            raise _unsupported(f"the encryption {oid}")
        for attempt in attempts:
            plain = attempt()
            if plain:
                try:
                    return self._der.parse(plain)
                except DerError:
                    continue
        raise Pkcs12Error("the PKCS#12 cannot be read with an empty password "
                          "(it has a password, or it is damaged)",
                          "import the certificate into Key Vault without a password")

    def _pbes2(self, params: Element, ciphertext: bytes) -> Callable[[], bytes]:
        """PBES2 (RFC 8018): PBKDF2 params (salt, count, key length?, prf?) and a cipher."""
        kdf, scheme = params.child(0, SEQUENCE), params.child(1, SEQUENCE)
        if kdf.child(0, OID).oid() != _PBKDF2:
            raise _unsupported(f"the key derivation {kdf.child(0, OID).oid()}")
        kdf_params = kdf.child(1, SEQUENCE)
        salt = kdf_params.child(0, OCTET_STRING).octets()
        count = _check_count(kdf_params.child(1, INTEGER).integer(), "encryption")
        prf = _HMAC_SHA1
        for extra in kdf_params.children[2:]:
            if extra.tag == SEQUENCE:
                prf = extra.child(0, OID).oid()
        cipher = _PBES2_CIPHERS.get(scheme.child(0, OID).oid())
        if prf not in _PRFS or cipher is None:
            raise _unsupported(f"the PBES2 algorithms {prf}, {scheme.child(0, OID).oid()}")
        name, size = cipher
        iv = scheme.child(1, OCTET_STRING).octets()
        password = self._password.encode("utf-8")

        def attempt() -> bytes:
            self._spend(count)
            key = hashlib.pbkdf2_hmac(_PRFS[prf], password, salt, count, size)
            return _cbc_decrypt(name, key, iv, ciphertext)
        return attempt

    def _pkcs12_pbe(self, oid: str, params: Element,
                    ciphertext: bytes) -> List[Callable[[], bytes]]:
        """A PKCS#12 PBE (salt, count). The empty password has two spellings
        (RFC 7292 B.1: a BMPString with its two-byte terminator, or nothing
        at all); OpenSSL tries both, and so does this."""
        name, size = _PKCS12_PBES[oid]
        salt = params.child(0, OCTET_STRING).octets()
        count = _check_count(params.child(1, INTEGER).integer(), "encryption")
        spellings = [(self._password.encode("utf-16-be") + b"\0\0")]
        if not self._password:
            spellings.append(b"")

        def attempt_with(password: bytes) -> Callable[[], bytes]:
            def attempt() -> bytes:
                self._spend(count * 2)  # the key, then the IV
                key = pkcs12_kdf(password, salt, 1, count, size)
                iv = pkcs12_kdf(password, salt, 2, count, 8)
                return _cbc_decrypt(name, key, iv, ciphertext)
            return attempt
        return [attempt_with(one) for one in spellings]

    def _spend(self, count: int) -> None:
        self._iterations_left -= count
        if self._iterations_left < 0:
            raise _too_costly(f"its key derivations together take more than "
                              f"{MAX_TOTAL_ITERATIONS:,} iterations")


def _data_content(content_info: Element) -> bytes:
    """The OCTET STRING of a ContentInfo of type data ([0] EXPLICIT)."""
    if content_info.child(0, OID).oid() != _DATA:
        raise _unsupported("a content that is not data (public-key integrity mode)")
    return content_info.child(1, CONTEXT_0).child(0, OCTET_STRING).octets()


def _check_count(count: int, what: str) -> int:
    if count < 1:
        raise DerError("an iteration count below 1")
    if count > MAX_ITERATIONS:
        raise _too_costly(f"its {what} iteration count is {count:,}, above {MAX_ITERATIONS:,}")
    return count


def _too_costly(reason: str) -> Pkcs12Error:
    return Pkcs12Error(f"the PKCS#12 is refused: {reason} (real ones use 2,000 to 600,000; "
                       "more would hold the agent's CPU for seconds to minutes)",
                       "export the certificate again with default settings")


def _unsupported(what: str) -> Pkcs12Error:
    return Pkcs12Error(f"the PKCS#12 uses {what}, which kv-agent does not read",
                       "export it with AES (PBES2) or 3DES, as Key Vault and OpenSSL do")


def pkcs12_kdf(password: bytes, salt: bytes, purpose: int, iterations: int,
               size: int) -> bytes:
    """RFC 7292 appendix B.2 with SHA-1 (u = 20, v = 64): ``size`` bytes of
    key (``purpose`` 1), IV (2) or MAC key (3) material."""
    v = 64
    diversifier = bytes([purpose]) * v
    block = bytearray(_fill(salt, v) + _fill(password, v))
    sha1 = hashlib.sha1
    out = b""
    while True:
        digest = sha1(diversifier + bytes(block)).digest()
        for _ in range(iterations - 1):
            digest = sha1(digest).digest()
        out += digest
        if len(out) >= size:
            return out[:size]
        addend = int.from_bytes(_fill(digest, v), "big") + 1
        for offset in range(0, len(block), v):
            total = (int.from_bytes(block[offset:offset + v], "big") + addend) % (1 << (8 * v))
            block[offset:offset + v] = total.to_bytes(v, "big")


def _fill(data: bytes, v: int) -> bytes:
    """``data`` repeated to the next multiple of ``v`` bytes (empty stays empty)."""
    if not data:
        return b""
    length = v * -(-len(data) // v)
    return (data * -(-length // len(data)))[:length]


def _cbc_decrypt(name: str, key: bytes, iv: bytes, ciphertext: bytes) -> bytes:
    """The plaintext, PKCS#7 padding removed; b"" when the padding is wrong
    (the sign of a wrong password)."""
    block = 16 if name == "aes" else 8
    if not ciphertext or len(ciphertext) % block or len(iv) != block:
        return b""
    if name == "rc2":
        plain = _rc2_cbc_decrypt(key, iv, ciphertext)
    else:
        from cryptography.hazmat.primitives.ciphers import Cipher, modes

        cipher = Cipher(_algorithm(name, key), modes.CBC(iv))
        decryptor = cipher.decryptor()
        plain = decryptor.update(ciphertext) + decryptor.finalize()
    pad = plain[-1]
    if not 1 <= pad <= block or plain[-pad:] != bytes([pad]) * pad:
        return b""
    return plain[:-pad]


def _algorithm(name: str, key: bytes) -> "BlockCipherAlgorithm":
    """AES or TripleDES (in ``cryptography``'s decrepit module from 43 on)."""
    if name == "aes":
        from cryptography.hazmat.primitives.ciphers.algorithms import AES

        return AES(key)
    try:
        from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
    except ImportError:  # cryptography < 43 (Debian 12 ships 38)
        from cryptography.hazmat.primitives.ciphers.algorithms import TripleDES
    return TripleDES(key)


# -- RC2 (RFC 2268) --------------------------------------------------------------------

_PITABLE = bytes.fromhex(
    "d978f9c419ddb5ed28e9fd794aa0d89dc67e37832b76538e624c6488448bfba2"
    "179a59f587b34f1361456d8d09817d32bd8f40eb86b77b0bf09521225c6b4e82"
    "54d66593ce60b21c7356c014a78cf1dc1275ca1f3bbee4d1423dd430a33cb626"
    "6fbf0eda4669075727f21d9bbc944303f811c7f690ef3ee706c3d52fc8661ed7"
    "08e8eade8052eef784aa72ac354d6a2a961ad2715a1549744b9fd05e0418a4ec"
    "c2e0416e0f51cbcc2491af50a1f47039997c3a8523b8b47afc02365b25559731"
    "2d5dfa98e38a92ae05df2910676cbac9d300e6cfe19ea82c6316013f58e289a9"
    "0d38341bab33ffb0bb480c5fb9b1cd2ec5f3db47e5a59c770aa62068fe7fc1ad")
_RC2_SHIFTS = (1, 2, 3, 5)


def _rc2_key_schedule(key: bytes, effective_bits: int) -> List[int]:
    """The 64 16-bit subkeys of RFC 2268 section 2."""
    t, t8 = len(key), (effective_bits + 7) // 8
    mask = 255 % (1 << (8 + effective_bits - 8 * t8))
    expanded = bytearray(128)
    expanded[:t] = key
    for i in range(t, 128):
        expanded[i] = _PITABLE[(expanded[i - 1] + expanded[i - t]) & 255]
    expanded[128 - t8] = _PITABLE[expanded[128 - t8] & mask]
    for i in range(127 - t8, -1, -1):
        expanded[i] = _PITABLE[expanded[i + 1] ^ expanded[i + t8]]
    return [expanded[2 * i] | expanded[2 * i + 1] << 8 for i in range(64)]


def _rc2_decrypt_block(subkeys: List[int], block: bytes) -> bytes:
    """RFC 2268 section 4: five r-mixing rounds, r-mashing, six, r-mashing, five."""
    r = [block[0] | block[1] << 8, block[2] | block[3] << 8,
         block[4] | block[5] << 8, block[6] | block[7] << 8]
    j = 63
    for rounds in (5, -1, 6, -1, 5):
        if rounds < 0:  # r-mashing
            for i in (3, 2, 1, 0):
                r[i] = (r[i] - subkeys[r[i - 1] & 63]) & 0xFFFF
            continue
        for _ in range(rounds):
            for i in (3, 2, 1, 0):
                shift = _RC2_SHIFTS[i]
                word = ((r[i] >> shift) | (r[i] << (16 - shift))) & 0xFFFF
                word -= subkeys[j] + (r[i - 1] & r[i - 2]) + (~r[i - 1] & r[i - 3])
                r[i] = word & 0xFFFF
                j -= 1
    return bytes((r[0] & 255, r[0] >> 8, r[1] & 255, r[1] >> 8,
                  r[2] & 255, r[2] >> 8, r[3] & 255, r[3] >> 8))


def _rc2_cbc_decrypt(key: bytes, iv: bytes, ciphertext: bytes) -> bytes:
    """RC2-CBC with effective key bits = the key's length in bits (PKCS#12's RC2)."""
    subkeys = _rc2_key_schedule(key, 8 * len(key))
    out = bytearray()
    previous = iv
    for offset in range(0, len(ciphertext), 8):
        chunk = ciphertext[offset:offset + 8]
        plain = _rc2_decrypt_block(subkeys, chunk)
        out += bytes(a ^ b for a, b in zip(plain, previous))
        previous = chunk
    return bytes(out)

