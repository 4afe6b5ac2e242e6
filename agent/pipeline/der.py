"""DER: a small, bounded reader for the ASN.1 the agent checks before a library sees it.

Why the agent reads ASN.1 itself: OpenSSL spends unbounded CPU, holding
Python's GIL, on some fields of a certificate's secret (a PKCS#12's
iteration counts, an RSA key's size), so a value from the vault could
freeze the whole agent. :mod:`agent.pipeline.pkcs12` and :mod:`agent.pipeline.certificates`
read those fields with this reader first and refuse what costs too much.

The reader takes DER and the BER that PKCS#12 writers emit (NSS writes
indefinite lengths and strings in chunks), and nothing wider:

* tag numbers below 31 (PKCS#12, PKCS#8 and PKCS#1 use no other), lengths
  of at most 4 bytes (no value is 4 GiB);
* at most MAX_DEPTH levels of nesting and, per :class:`Reader`, at most its
  element budget, so the work is linear in the input and bounded whatever
  the input is;
* anything else is a :class:`DerError` (a ValueError), the only exception
  this module raises. Its message never quotes the input.

Pure; imports nothing from the package.
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional, Tuple

MAX_DEPTH = 32  # a PKCS#12 nests about 12 levels; a bag in a bag in a bag, 20
DEFAULT_MAX_ELEMENTS = 20_000  # a PKCS#12 of a key and 20 certificates has ~300

INTEGER = 0x02
BIT_STRING = 0x03
OCTET_STRING = 0x04
NULL = 0x05
OID = 0x06
SEQUENCE = 0x30
SET = 0x31
CONSTRUCTED = 0x20
CONTEXT_0 = 0xA0  # [0], constructed (EXPLICIT, or IMPLICIT of a constructed type)
CONTEXT_0_PRIMITIVE = 0x80  # [0] IMPLICIT of a primitive type (an OCTET STRING)
_MAX_OID_BYTES = 64


class DerError(ValueError):
    """The input is not ASN.1 this reader takes, or it costs too much to read."""


class Element(NamedTuple):
    """One TLV of ``source``: its identifier octet, where its content lies
    (``source[content:end]``), where the whole element ends (``stop``: after
    the end-of-contents octets of an indefinite length) and, when it is
    constructed, its children."""

    tag: int
    source: bytes
    start: int
    content: int
    end: int
    stop: int
    children: Tuple["Element", ...]

    @property
    def is_constructed(self) -> bool:
        return bool(self.tag & CONSTRUCTED)

    def encoded(self) -> bytes:
        """The whole element, header included, as it was in the input."""
        return self.source[self.start:self.stop]

    def octets(self) -> bytes:
        """The content of a string: the bytes of a primitive element, or the
        chunks of a constructed (BER) one joined."""
        if not self.is_constructed:
            return self.source[self.content:self.end]
        return b"".join(child.octets() for child in self.children)

    def child(self, index: int, tag: Optional[int] = None) -> "Element":
        """The ``index``-th child, checked to carry ``tag`` when one is given (an
        OCTET STRING may be constructed: BER's strings in chunks)."""
        if index >= len(self.children):
            raise DerError("an element is missing")
        found = self.children[index]
        is_chunked = tag == OCTET_STRING and found.tag == OCTET_STRING | CONSTRUCTED
        if tag is not None and found.tag != tag and not is_chunked:
            raise DerError(f"expected tag 0x{tag:02x}, found 0x{found.tag:02x}")
        return found

    def integer(self) -> int:
        """An INTEGER's value (two's complement, as DER says)."""
        if self.tag != INTEGER or self.end == self.content:
            raise DerError("not an INTEGER")
        return int.from_bytes(self.source[self.content:self.end], "big", signed=True)

    def oid(self) -> str:
        """An OBJECT IDENTIFIER in dotted form (``1.2.840.113549.1.7.1``)."""
        raw = self.source[self.content:self.end]
        if self.tag != OID or not raw or len(raw) > _MAX_OID_BYTES or raw[-1] & 0x80:
            raise DerError("not an OBJECT IDENTIFIER")
        arcs: List[int] = []
        value = 0
        for byte in raw:
            value = (value << 7) | (byte & 0x7F)
            if not byte & 0x80:
                arcs.append(value)
                value = 0
        first = min(arcs[0] // 40, 2)
        return ".".join(str(arc) for arc in [first, arcs[0] - 40 * first, *arcs[1:]])


class Reader:
    """Parses elements against one budget: every element read, in every
    :meth:`parse` call of this reader, counts once against ``max_elements``."""

    def __init__(self, max_elements: int = DEFAULT_MAX_ELEMENTS) -> None:
        self.left = max_elements

    def parse(self, data: bytes) -> Element:
        """The first element of ``data`` with its whole subtree (bytes after
        it are ignored, as OpenSSL's d2i does). Raises DerError."""
        return self._element(bytes(data), 0, 0)

    def _element(self, data: bytes, offset: int, depth: int) -> Element:
        if depth > MAX_DEPTH:
            raise DerError("nested too deeply")
        self.left -= 1
        if self.left < 0:
            raise DerError("too many elements")
        if offset + 2 > len(data):
            raise DerError("truncated")
        tag, first = data[offset], data[offset + 1]
        if tag & 0x1F == 0x1F:
            raise DerError("a high tag number")
        content = offset + 2
        constructed = bool(tag & CONSTRUCTED)
        if first == 0x80:  # BER's indefinite length: children up to two zero bytes
            if not constructed:
                raise DerError("an indefinite length on a primitive element")
            children, end = self._children_until_eoc(data, content, depth)
            return Element(tag, data, offset, content, end, end + 2, children)
        length = first
        if first > 0x80:
            count = first & 0x7F
            if count > 4 or content + count > len(data):
                raise DerError("a length too long")
            length = int.from_bytes(data[content:content + count], "big")
            content += count
        end = content + length
        if end > len(data):
            raise DerError("truncated")
        children = self._children(data, content, end, depth) if constructed else ()
        return Element(tag, data, offset, content, end, end, children)

    def _children(self, data: bytes, offset: int, end: int,
                  depth: int) -> Tuple[Element, ...]:
        children: List[Element] = []
        while offset < end:
            child = self._element(data, offset, depth + 1)
            if child.stop > end:
                raise DerError("an element overruns its parent")
            children.append(child)
            offset = child.stop
        return tuple(children)

    def _children_until_eoc(self, data: bytes, offset: int,
                            depth: int) -> Tuple[Tuple[Element, ...], int]:
        children: List[Element] = []
        while data[offset:offset + 2] != b"\0\0":
            child = self._element(data, offset, depth + 1)  # raises at the end of data
            children.append(child)
            offset = child.stop
        return tuple(children), offset
