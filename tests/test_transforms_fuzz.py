"""Fuzzed values through every transform (issue 17, item 1): whatever the vault sends, a
transform returns one bytes per output or raises TransformError, and never through the
bug path (an exception the transform did not expect).

Inputs are random and mutated: PEM bundles assembled from a pool of blocks (RSA, EC,
X25519 and SM2 keys and certificates, encrypted and damaged ones), their DER mutated
inside the armour; PKCS#12 values written by OpenSSL, cryptography and by hand (PBES2,
PKCS#12 3DES, nested bags), mutated as DER and as base64; base64 and hex text; template
values. Deterministic (``derandomize``), so a failure reproduces; bounded for CI at about
30 s in all on a loaded 2-core machine.
"""

from __future__ import annotations

import base64
import binascii
from typing import List, Optional, Sequence, Tuple

import pkcs12_samples
import pytest
from certs import (
    PEM,
    PKCS12,
    cert_bag,
    data_content,
    encrypted_content,
    key_bag,
    make_pki,
    pem_block,
    pfx,
    safe_contents_bag,
    shrouded_key_bag,
    sm2_certificate,
    sm2_pkcs8,
)
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.pipeline.sources import SecretAttributes
from agent.pipeline.transforms import (
    CERTIFICATE_KINDS,
    ENCODINGS,
    TEMPLATE_FORMATS,
    TransformError,
    TransformParams,
    apply_transform,
)


def _fuzz(examples: int) -> settings:
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


class Fetched:
    """A fetched secret as a transform sees it."""

    def __init__(self, name: str, value: bytes, content_type: Optional[str]) -> None:
        self.name, self.value, self.content_type = name, value, content_type
        self.attributes = SecretAttributes()


def _run(transform: str, materials: Sequence[Fetched], outputs: int,
         params: TransformParams) -> None:
    """The property: one bytes per output, or a TransformError that is not a bug."""
    try:
        data = apply_transform(transform, materials, outputs, params)
    except TransformError as exc:
        assert "failed unexpectedly" not in exc.message, exc.message
        assert "\n" not in str(exc)
        return
    assert len(data) == outputs and all(isinstance(one, bytes) for one in data)


# ---------------------------------------------------------------------------
# Seeds


def _pem_pool() -> List[bytes]:
    rsa, ec, x25519 = make_pki("rsa"), make_pki("ec", "ec.example"), make_pki("x25519", "x.ex")
    encrypted = ec.key.private_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pw"))
    traditional = rsa.key.private_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption())
    return (rsa.pem_blocks() + ec.pem_blocks() + x25519.pem_blocks()
            + [encrypted, traditional, pem_block("CERTIFICATE", sm2_certificate()),
               pem_block("PRIVATE KEY", sm2_pkcs8()), pem_block("CERTIFICATE", b"\x30\x03abc"),
               b"-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n"])


def _pkcs12_seeds() -> List[bytes]:
    ec, x25519 = make_pki("ec", "p12.example"), make_pki("x25519", "x12.example")
    chain = [cert_bag(c) for c in ec.certificates_der()]
    seeds = [base64.b64decode("".join(getattr(pkcs12_samples, name)))
             for name in ("LEGACY", "MODERN", "NO_MAC")]
    seeds.append(pkcs12.serialize_key_and_certificates(
        b"kv", ec.key, ec.leaf, [ec.intermediate, ec.root],  # type: ignore[arg-type]
        serialization.NoEncryption()))
    seeds.append(pfx([encrypted_content(chain, iterations=16),
                      data_content([shrouded_key_bag(ec.key_der(), iterations=16)])]))
    seeds.append(pfx([encrypted_content(chain, iterations=16, scheme="pkcs12-3des"),
                      data_content([safe_contents_bag([key_bag(ec.key_der())])])],
                     mac_iterations=None))
    seeds.append(pfx([data_content([key_bag(x25519.key_der()), cert_bag(sm2_certificate())]
                                   + [cert_bag(c) for c in x25519.certificates_der()])]))
    return seeds


def _pkcs12_items() -> List[Tuple[str, bytes]]:
    rsa, x25519 = make_pki("rsa", "items.example"), make_pki("x25519", "xi.example")
    return ([("key", rsa.key_der()), ("key", x25519.key_der()), ("key", sm2_pkcs8()),
             ("cert", sm2_certificate())]
            + [("cert", c) for c in rsa.certificates_der() + x25519.certificates_der()])


PEM_POOL = _pem_pool()
PKCS12_SEEDS = _pkcs12_seeds()
PKCS12_ITEMS = _pkcs12_items()


@st.composite
def mutated(draw: st.DrawFn, data: bytes, steps: int = 6) -> bytes:
    """``data`` after up to ``steps`` byte-level edits: flips, inserts, deletes, cuts,
    duplicated slices, and DER length bytes set to extremes."""
    out = bytearray(data)
    for _ in range(draw(st.integers(0, steps))):
        if not out:
            out += draw(st.binary(min_size=1, max_size=16))
            continue
        at = draw(st.integers(0, len(out) - 1))
        edit = draw(st.sampled_from(["flip", "set", "insert", "delete", "cut", "dup",
                                     "length"]))
        if edit == "flip":
            out[at] ^= 1 << draw(st.integers(0, 7))
        elif edit == "set":
            out[at] = draw(st.sampled_from([0x00, 0x30, 0x80, 0x84, 0xA0, 0xFF, 0x24, 0x04]))
        elif edit == "insert":
            out[at:at] = draw(st.binary(max_size=32))
        elif edit == "delete":
            del out[at:at + draw(st.integers(1, 64))]
        elif edit == "cut":
            del out[at:]
        elif edit == "dup":
            out[at:at] = out[at:at + draw(st.integers(1, 256))]
        else:
            out[at:at + 1] = draw(st.sampled_from([b"\x80", b"\x84\xff\xff\xff\xff",
                                                   b"\x82\x00\x00", b"\x81\x7f"]))
    return bytes(out)


@st.composite
def pem_values(draw: st.DrawFn) -> bytes:
    """A bundle of pool blocks in any order and number, some with their DER mutated."""
    blocks = draw(st.lists(st.sampled_from(PEM_POOL), max_size=8))
    out = []
    for block in blocks:
        if draw(st.booleans()):
            lines = block.strip().split(b"\n")
            try:
                inner = base64.b64decode(b"".join(lines[1:-1]))
            except (binascii.Error, ValueError):
                inner = b""
            label = lines[0][11:-5].decode(errors="replace")
            block = pem_block(label, draw(mutated(inner, 3)))
        out.append(block)
    return draw(mutated(b"".join(out), 2))


@st.composite
def rebuilt_pkcs12(draw: st.DrawFn) -> bytes:
    """A well-formed PKCS#12 around mutated keys and certificates, in plain, encrypted
    (PBES2 or PKCS#12 3DES) and nested bags: the envelope holds, what it carries does not."""
    bags = []
    for item in draw(st.lists(st.sampled_from(PKCS12_ITEMS), min_size=1, max_size=5)):
        kind, data = item
        data = draw(mutated(data, 2))
        bag = key_bag(data) if kind == "key" else cert_bag(data)
        if kind == "key" and draw(st.booleans()):
            bag = shrouded_key_bag(data, iterations=draw(st.integers(1, 8)),
                                   scheme=draw(st.sampled_from(["pbes2", "pkcs12-3des"])))
        bags.append(safe_contents_bag([bag]) if draw(st.integers(0, 5)) == 0 else bag)
    if draw(st.booleans()):
        content = encrypted_content(bags, iterations=draw(st.integers(1, 8)),
                                    scheme=draw(st.sampled_from(["pbes2", "pkcs12-3des"])))
    else:
        content = data_content(bags)
    return pfx([content], mac_iterations=draw(st.sampled_from([None, 1, 2048])))


@st.composite
def pkcs12_values(draw: st.DrawFn) -> bytes:
    """A PKCS#12 seed mutated as DER, or one rebuilt around mutated contents, as Key
    Vault's base64 (itself sometimes mutated)."""
    if draw(st.booleans()):
        der = draw(rebuilt_pkcs12())
    else:
        der = draw(mutated(draw(st.sampled_from(PKCS12_SEEDS)), 3))
    text = base64.b64encode(der)
    return draw(mutated(text, 2)) if draw(st.integers(0, 9)) == 0 else text


kinds = st.lists(st.sampled_from(CERTIFICATE_KINDS), min_size=1, max_size=5)
content_types = st.one_of(
    st.sampled_from([PKCS12, PEM, "application/x-pkcs12; charset=utf-8", " Application/X-PEM-File",
                     "text/plain", ""]),
    st.none(), st.text(max_size=20))


# ---------------------------------------------------------------------------
# The properties


@_fuzz(1200)
@given(pem_values(), kinds)
def test_certificate_from_fuzzed_pem(value: bytes, chosen: List[str]) -> None:
    """Any PEM bundle, mutated or not: files or a TransformError."""
    _run("certificate", [Fetched("web-tls", value, PEM)], len(chosen),
         TransformParams(kinds=tuple(chosen)))


@_fuzz(2000)
@given(pkcs12_values(), kinds)
def test_certificate_from_fuzzed_pkcs12(value: bytes, chosen: List[str]) -> None:
    """Any mutated PKCS#12 (OpenSSL's, cryptography's, hand-built): files or a TransformError."""
    _run("certificate", [Fetched("web-tls", value, PKCS12)], len(chosen),
         TransformParams(kinds=tuple(chosen)))


@_fuzz(500)
@given(st.binary(max_size=4096), content_types, kinds)
def test_certificate_from_random_bytes(value: bytes, content_type: Optional[str],
                                       chosen: List[str]) -> None:
    """Random bytes as a certificate's value: a TransformError, never anything else."""
    _run("certificate", [Fetched("web-tls", value, content_type)], len(chosen),
         TransformParams(kinds=tuple(chosen)))


encoded = st.one_of(
    st.binary(max_size=512),
    st.binary(max_size=256).map(base64.b64encode).flatmap(lambda text: mutated(text, 3)),
    st.binary(max_size=256).map(lambda data: data.hex().encode()).flatmap(
        lambda text: mutated(text, 3)),
    st.text(max_size=64).map(lambda text: text.encode("utf-8", "surrogatepass")),
)
encodings = st.one_of(st.none(), st.sampled_from(ENCODINGS))


@_fuzz(1500)
@given(encoded, encodings, st.integers(1, 2))
def test_raw_from_fuzzed_text(value: bytes, encoding: Optional[str], outputs: int) -> None:
    """raw with any encoding over random, base64 and hex text: its file or a TransformError."""
    _run("raw", [Fetched("s", value, None)], outputs, TransformParams((encoding,)))


@_fuzz(1000)
@given(st.lists(st.tuples(encoded, encodings), min_size=1, max_size=4),
       st.sampled_from(TEMPLATE_FORMATS))
def test_template_from_fuzzed_values(values: List[Tuple[bytes, Optional[str]]],
                                     form: str) -> None:
    """env, json and raw templates of any values and encodings: one file or a TransformError."""
    materials = [Fetched(f"v{n}", value, None) for n, (value, _) in enumerate(values)]
    params = TransformParams(encodings=tuple(e for _, e in values), format=form,
                             keys=tuple(f"K{n}" for n in range(len(values))))
    _run("template", materials, 1, params)


@pytest.mark.parametrize("transform", ["raw", "template", "certificate", "select", ""])
def test_every_transform_name_is_covered(transform: str) -> None:
    """Every registered transform is fuzzed above; an unknown name is a TransformError."""
    from agent.pipeline.transforms import TRANSFORMS

    assert set(TRANSFORMS) == {"raw", "template", "certificate"}
    _run(transform, [Fetched("s", b"x", None)], 1, TransformParams(kinds=("cert",)))
