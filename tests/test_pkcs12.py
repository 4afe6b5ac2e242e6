"""PKCS#12 read by the agent: what OpenSSL and cryptography write reads back, and no value
costs more than the bounds, whatever its iteration counts say or hide."""

from __future__ import annotations

import base64
import time
from typing import List

import pkcs12_samples
import pytest
from certs import (
    Pki,
    cert_bag,
    data_content,
    der,
    encrypted_content,
    explicit,
    integer,
    key_bag,
    make_pki,
    octets,
    oid,
    pfx,
    safe_contents_bag,
    seq,
    shrouded_key_bag,
)
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.serialization import pkcs12

from agent.pipeline.pkcs12 import (
    MAX_ITERATIONS,
    MAX_TOTAL_ITERATIONS,
    Contents,
    Pkcs12Error,
    pkcs12_kdf,
    read_pkcs12,
)


@pytest.fixture(scope="module")
def pki() -> Pki:
    return make_pki("ec")


def _public(der_key: bytes) -> bytes:
    key = serialization.load_der_private_key(der_key, None)
    return key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


def _leaf_public(certificate: bytes) -> bytes:
    return x509.load_der_x509_certificate(certificate).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


@pytest.mark.parametrize("sample", ["LEGACY", "MODERN", "NO_MAC"])
def test_reads_what_openssl_wrote(sample: str) -> None:
    """OpenSSL's legacy (RC2-40 and 3DES, as Windows and Key Vault write), default (AES) and
    MAC-less PKCS#12 files give their key and all three certificates, the key the leaf's."""
    contents = read_pkcs12(base64.b64decode("".join(getattr(pkcs12_samples, sample))))
    assert contents.key is not None and len(contents.certificates) == 3
    subjects = [x509.load_der_x509_certificate(c).subject.rfc4514_string()
                for c in contents.certificates]
    assert subjects == ["CN=web.example", "CN=Test Intermediate web.example",
                        "CN=Test Root web.example"]
    assert _public(contents.key) == _leaf_public(contents.certificates[0])


@pytest.mark.parametrize("algorithm", [pkcs12.PBES.PBESv1SHA1And3KeyTripleDESCBC,
                                       pkcs12.PBES.PBESv2SHA256AndAES256CBC])
def test_reads_what_cryptography_wrote_with_a_password(pki: Pki,
                                                       algorithm: pkcs12.PBES) -> None:
    """Given its password, a PKCS#12 cryptography encrypted (3DES with PKCS#12's own key
    derivation, or AES with PBKDF2) reads as cryptography reads it; without, it is refused."""
    encryption = (serialization.PrivateFormat.PKCS12.encryption_builder().kdf_rounds(5000)
                  .key_cert_algorithm(algorithm).hmac_hash(hashes.SHA256()).build(b"pw"))
    data = pkcs12.serialize_key_and_certificates(b"kv", pki.key, pki.leaf,  # type: ignore[arg-type]
                                                 [pki.intermediate, pki.root], encryption)
    contents = read_pkcs12(data, "pw")
    assert contents.key == pki.key_der()
    assert sorted(contents.certificates) == sorted(pki.certificates_der())
    with pytest.raises(Pkcs12Error, match="cannot be read with an empty password"):
        read_pkcs12(data)


def test_pkcs12_key_derivation_matches_the_published_vectors() -> None:
    """RFC 7292 B.2 with SHA-1 gives OpenSSL's test vectors (password "smeg", "queeg")."""
    smeg = "smeg".encode("utf-16-be") + b"\0\0"
    salt = bytes.fromhex("0A58CF64530D823F")
    assert pkcs12_kdf(smeg, salt, 1, 1, 24).hex().upper() == \
        "8AAAE6297B6CB04642AB5B077851284EB7128F1A2A7FBCA3"
    assert pkcs12_kdf(smeg, salt, 2, 1, 8).hex().upper() == "79993DFE048D3B76"
    queeg = "queeg".encode("utf-16-be") + b"\0\0"
    salt = bytes.fromhex("05DEC959ACFF72F7")
    assert pkcs12_kdf(queeg, salt, 1, 1000, 24).hex().upper() == \
        "ED2034E36328830FF09DF1E1A07DD357185DAC0D4F9EB3D4"


def test_rc2_decrypts_the_rfc_2268_vectors() -> None:
    """RC2 (for Windows' and Key Vault's 40-bit RC2 certificates) meets RFC 2268's vectors."""
    from agent.pipeline.pkcs12 import _rc2_decrypt_block, _rc2_key_schedule

    vectors = [("0000000000000000", 63, "0000000000000000", "ebb773f993278eff"),
               ("ffffffffffffffff", 64, "ffffffffffffffff", "278b27e42e2f0d49"),
               ("3000000000000000", 64, "1000000000000001", "30649edf9be7d2c2"),
               ("88", 64, "0000000000000000", "61a8a244adacccf0"),
               ("88bca90e90875a7f0f79c384627bafb2", 128, "0000000000000000",
                "2269552ab0f85ca6")]
    for key, bits, plain, cipher in vectors:
        block = _rc2_decrypt_block(_rc2_key_schedule(bytes.fromhex(key), bits),
                                   bytes.fromhex(cipher))
        assert block.hex() == plain, key


def _layout(pki: Pki, scheme: str) -> List[bytes]:
    """Certificates encrypted, the key shrouded inside a nested safe-contents bag."""
    return [encrypted_content([cert_bag(c) for c in pki.certificates_der()], scheme=scheme),
            data_content([safe_contents_bag([shrouded_key_bag(pki.key_der(), scheme=scheme)])])]


@pytest.mark.parametrize("scheme", ["pbes2", "pkcs12-3des"])
def test_reads_hand_built_layouts_as_openssl_does(pki: Pki, scheme: str) -> None:
    """Nested bags and either empty-password spelling read as OpenSSL reads them."""
    data = pfx(_layout(pki, scheme), mac_iterations=None)  # no MAC: OpenSSL reads it too
    key, leaf, others = pkcs12.load_key_and_certificates(data, None)
    assert key is not None and leaf is not None
    contents = read_pkcs12(data)
    assert contents == Contents(pki.key_der(), tuple(pki.certificates_der()))


def test_reads_ber_as_nss_writes_it(pki: Pki) -> None:
    """Indefinite lengths and OCTET STRINGs in chunks (NSS's pk12util) read like DER."""
    def indefinite(tag: int, *parts: bytes) -> bytes:
        return bytes([tag, 0x80]) + b"".join(parts) + b"\0\0"

    def data_info(inner: bytes) -> bytes:  # ContentInfo (data), its OCTET STRING in chunks
        chunks = [octets(inner[i:i + 100]) for i in range(0, len(inner), 100)]
        return indefinite(0x30, oid("1.2.840.113549.1.7.1"),
                          indefinite(0xA0, indefinite(0x24, *chunks)))

    safe_contents = indefinite(0x30, key_bag(pki.key_der()), cert_bag(pki.certificates_der()[0]))
    data = indefinite(0x30, integer(3), data_info(indefinite(0x30, data_info(safe_contents))))
    assert read_pkcs12(data) == Contents(pki.key_der(), (pki.certificates_der()[0],))


def test_the_mac_count_of_the_reported_value_is_refused_in_milliseconds(pki: Pki) -> None:
    """The 1.1 KB PKCS#12 whose MAC count is 2^26 (~25 s of OpenSSL holding the GIL) is
    refused before any key derivation, naming the count and the bound."""
    data = pfx([data_content([key_bag(pki.key_der()), cert_bag(pki.certificates_der()[0])])],
               mac_iterations=2**26)
    started = time.monotonic()
    with pytest.raises(Pkcs12Error) as caught:
        read_pkcs12(data)
    assert time.monotonic() - started < 0.5
    assert f"MAC iteration count is {2**26:,}, above {MAX_ITERATIONS:,}" in caught.value.message


@pytest.mark.parametrize("scheme", ["pbes2", "pkcs12-3des"])
def test_counts_above_the_bound_are_refused_before_deriving_even_hidden_ones(
        pki: Pki, scheme: str) -> None:
    """A visible encryption count above the bound, or one hidden inside an encrypted part
    (a shrouded key in encrypted contents), is refused before its derivation runs."""
    visible = pfx([encrypted_content([cert_bag(pki.certificates_der()[0])],
                                     iterations=2**31 - 1, scheme=scheme)])
    hidden_key = seq(oid("1.2.840.113549.1.12.10.1.2"), explicit(seq(
        seq(oid("1.2.840.113549.1.12.1.3"), seq(octets(b"salt5678"), integer(2**31 - 1))),
        octets(b"\0" * 64))))
    hidden = pfx([encrypted_content([cert_bag(pki.certificates_der()[0]), hidden_key],
                                    scheme=scheme)])
    for data in (visible, hidden):
        started = time.monotonic()
        with pytest.raises(Pkcs12Error, match=f"encryption iteration count is {2**31 - 1:,}"):
            read_pkcs12(data)
        assert time.monotonic() - started < 0.5


def test_the_total_of_all_derivations_is_bounded(pki: Pki) -> None:
    """Parts each under the bound but together over MAX_TOTAL_ITERATIONS are refused when the
    total would pass it, not after."""
    count = MAX_TOTAL_ITERATIONS // 3 + 1
    parts = [encrypted_content([cert_bag(c)], iterations=count)
             for c in pki.certificates_der()]
    with pytest.raises(Pkcs12Error, match=f"together take more than {MAX_TOTAL_ITERATIONS:,}"):
        read_pkcs12(pfx(parts))
    assert len(read_pkcs12(pfx(parts[:2])).certificates) == 2


@pytest.mark.parametrize("content, fragment", [
    (seq(oid("1.2.840.113549.1.7.2"), explicit(seq())), "public-key protection"),
    (seq(oid("1.2.840.113549.1.7.6"), explicit(seq(integer(0), seq(
        oid("1.2.840.113549.1.7.1"), seq(oid("1.2.840.113549.1.12.1.1"),
                                         seq(octets(b"s"), integer(1))),
        der(0x80, b"\0" * 16))))), "the encryption 1.2.840.113549.1.12.1.1"),
    (seq(oid("1.2.840.113549.1.7.6"), explicit(seq(integer(0), seq(
        oid("1.2.840.113549.1.7.1"), seq(oid("1.2.840.113549.1.5.13"), seq(
            seq(oid("1.3.6.1.4.1.11591.4.11"), seq(octets(b"s"), integer(2**20))),
            seq(oid("2.16.840.1.101.3.4.1.42"), octets(b"\0" * 16)))),
        der(0x80, b"\0" * 16))))), "the key derivation 1.3.6.1.4.1.11591.4.11"),
], ids=["signed", "rc4", "scrypt"])
def test_unsupported_algorithms_are_named(content: bytes, fragment: str) -> None:
    """Public-key protection, RC4 and scrypt are refused, naming what was found."""
    with pytest.raises(Pkcs12Error, match="which kv-agent does not read") as caught:
        read_pkcs12(pfx([content]))
    assert fragment in caught.value.message


def test_two_keys_and_damage_are_refused(pki: Pki) -> None:
    """Two private keys, a truncated value and trailing nonsense in place of bags fail with
    Pkcs12Error, never another exception."""
    two = pfx([data_content([key_bag(pki.key_der()), key_bag(pki.key_der())])])
    with pytest.raises(Pkcs12Error, match="two private keys"):
        read_pkcs12(two)
    whole = pfx(_layout(pki, "pbes2"))
    for cut in range(0, len(whole), 97):
        with pytest.raises(Pkcs12Error):
            read_pkcs12(whole[:cut])
