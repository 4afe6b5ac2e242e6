"""The bounded DER reader: DER and PKCS#12's BER in, DerError (and nothing else) for the rest."""

from __future__ import annotations

import time

import pytest
from certs import der, integer, octets, oid, seq

from agent.pipeline.der import MAX_DEPTH, DerError, Reader


def test_reads_der_elements_integers_and_oids() -> None:
    """A SEQUENCE's children, an INTEGER (negative too) and an OID read back as written."""
    element = Reader().parse(seq(integer(3), integer(-129), oid("1.2.840.113549.1.7.1"),
                                 octets(b"abc")) + b"trailing")
    assert [child.tag for child in element.children] == [0x02, 0x02, 0x06, 0x04]
    assert element.child(0).integer() == 3 and element.child(1).integer() == -129
    assert element.child(2).oid() == "1.2.840.113549.1.7.1"
    assert element.child(3).octets() == b"abc"
    assert element.encoded() == seq(integer(3), integer(-129), oid("1.2.840.113549.1.7.1"),
                                     octets(b"abc"))


def test_reads_ber_indefinite_lengths_and_chunked_strings() -> None:
    """An indefinite-length SEQUENCE and a constructed OCTET STRING in chunks (as NSS writes
    PKCS#12) read as their DER equivalents."""
    chunked = b"\x24\x80" + octets(b"ab") + octets(b"cd") + b"\0\0"
    element = Reader().parse(b"\x30\x80" + integer(7) + chunked + b"\0\0")
    assert element.child(0).integer() == 7 and element.child(1).octets() == b"abcd"


@pytest.mark.parametrize("data", [
    b"", b"\x30", b"\x30\x05\x02\x01", b"\x04\x85\x01\x00\x00\x00\x00",  # truncated, too long
    b"\x1f\x81\x00\x00",  # a high tag number
    b"\x04\x80abc\0\0",  # an indefinite length on a primitive
    b"\x30\x80\x02\x01\x01",  # no end-of-contents
    seq(der(0x02, b"\x01\x02\x03\x04\x05"), b"\x04\x09abc"),  # a child overruns its parent
], ids=repr)
def test_malformed_input_is_a_der_error(data: bytes) -> None:
    """Truncation, oversized lengths, high tags and overruns are DerError."""
    with pytest.raises(DerError):
        Reader().parse(data)


def test_depth_and_element_budget_bound_the_work() -> None:
    """Nesting beyond MAX_DEPTH and more elements than the budget are refused at once,
    whatever the size of the input."""
    deep = b"\x30\x80" * 100_000 + b"\0\0" * 100_000  # 400 KB of nesting
    started = time.monotonic()
    with pytest.raises(DerError, match="nested too deeply"):
        Reader().parse(deep)
    flat = seq(*[integer(1)] * 5000)
    with pytest.raises(DerError, match="too many elements"):
        Reader(1000).parse(flat)
    reader = Reader(3000)
    reader.parse(seq(*[integer(1)] * 2000))
    with pytest.raises(DerError, match="too many elements"):  # the budget spans parses
        reader.parse(seq(*[integer(1)] * 2000))
    assert time.monotonic() - started < 1.0
    nested = integer(1)
    for _ in range(MAX_DEPTH):
        nested = seq(nested)
    assert Reader().parse(nested).child(0).tag == 0x30


def test_accessors_refuse_the_wrong_type() -> None:
    """integer(), oid() and child() raise DerError for the wrong tag or a missing child."""
    element = Reader().parse(seq(octets(b"x")))
    with pytest.raises(DerError):
        element.child(0).integer()
    with pytest.raises(DerError):
        element.child(0).oid()
    with pytest.raises(DerError):
        element.child(1)
    with pytest.raises(DerError):
        element.child(0, 0x02)
