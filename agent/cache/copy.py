"""A copy: one entry's last good bytes, and the document sealed for it.

The document holds the entry's key, its fetch time and each target's bytes
(an output's path, or a credential's label, as
:attr:`agent.manifest.Entry.targets` names them). The key is inside what is
sealed, so a copy moved onto another entry's file is caught after
decrypting even if the sealing name were not checked. Pure: JSON, with the
bytes in base64, parsed defensively (a copy is read back from disk).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from dataclasses import dataclass
from typing import Any, Sequence, Tuple

from agent.base.errors import CacheError
from agent.base.untrusted import escape, load_json

FORMAT = 1  # the document's version; a copy of another version is skipped, not guessed at
# An expansion's key (a ``select:`` entry's last good list of secrets): never a path (those
# are absolute) nor a credential's label (``credential:``), so never an entry's key.
EXPANSION_PREFIX = "select:"
# A Key Vault secret name [protocol.md B7]; an expansion holds nothing else.
SECRET_NAME_RE = re.compile(r"^[0-9A-Za-z-]{1,127}$")


@dataclass(frozen=True)
class Copy:
    """``key``'s bytes as fetched at ``fetched_at`` (epoch seconds): ``items``
    are (target, bytes) in the entry's order. The repr names the targets,
    never their bytes."""

    key: str
    fetched_at: float
    items: Tuple[Tuple[str, bytes], ...]

    def __repr__(self) -> str:
        targets = ", ".join(target for target, _ in self.items)
        return f"Copy({self.key!r}, fetched_at={self.fetched_at}, targets=[{targets}])"

    def bytes_of(self, target: str) -> bytes:
        """The bytes kept for ``target``; CacheError when the copy has none
        (the entry gained an output since the copy was sealed)."""
        for name, data in self.items:
            if name == target:
                return data
        raise CacheError(f"{self.key}: the sealed copy holds nothing for {escape(target)}",
                         "it was sealed before this output was added")


def encode(copy: Copy) -> bytes:
    """The document sealed for ``copy``."""
    return json.dumps({
        "format": FORMAT, "key": copy.key, "fetched_at": copy.fetched_at,
        "items": [[target, base64.b64encode(data).decode("ascii")]
                  for target, data in copy.items],
    }, separators=(",", ":")).encode("utf-8")


def decode(document: bytes, key: str) -> Copy:
    """The copy of entry ``key`` in ``document`` (as unsealed). Raises
    CacheError when it is not a copy of this format, or is another entry's."""
    try:
        content = load_json(document)
    except ValueError:
        raise _malformed(key, "not a copy") from None
    if not isinstance(content, dict) or content.get("format") != FORMAT:
        raise _malformed(key, "not a copy of this version")
    if content.get("key") != key:
        raise CacheError(f"{key}: the sealed copy is another entry's "
                         f"({escape(content.get('key'), 200)})", "it is skipped")
    fetched_at = content.get("fetched_at")
    if isinstance(fetched_at, bool) or not isinstance(fetched_at, (int, float)) \
            or not math.isfinite(fetched_at):
        raise _malformed(key, "no fetch time")
    items = content.get("items")
    if not isinstance(items, list):
        raise _malformed(key, "no bytes")
    return Copy(key, float(fetched_at), tuple(_item(key, item) for item in items))


def expansion_key(directory: str) -> str:
    """The key of the expansion of the ``select:`` entry writing into ``directory``."""
    return EXPANSION_PREFIX + directory


def expansion(directory: str, fetched_at: float, selection: str,
              names: Sequence[str]) -> Copy:
    """The expansion of a ``select:`` entry as a copy: the secret names its
    listing of ``fetched_at`` gave, in order, and ``selection``, a digest of
    what chose them (a changed entry's expansion is not served). No value:
    sealed all the same, since names can say much."""
    return Copy(expansion_key(directory), fetched_at,
                (("selection", selection.encode("utf-8")),
                 ("names", "\n".join(names).encode("utf-8"))))


def expansion_names(copy: Copy, selection: str) -> Tuple[str, ...]:
    """The secret names of an expansion sealed for ``selection`` (the same
    digest). Raises CacheError when the entry changed since, or the copy
    holds anything but secret names."""
    if copy.bytes_of("selection") != selection.encode("utf-8"):
        raise CacheError(f"{copy.key}: the select: entry changed since its expansion was "
                         "sealed", "the next good listing seals a new one")
    try:
        names = tuple(name for name in copy.bytes_of("names").decode("ascii").split("\n")
                      if name)
    except UnicodeDecodeError:
        names = ("",)
    if not all(SECRET_NAME_RE.match(name) for name in names):
        raise _malformed(copy.key, "something that is not a secret name")
    return names


def _item(key: str, item: Any) -> Tuple[str, bytes]:
    if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)
            and isinstance(item[1], str)):
        raise _malformed(key, "an unreadable output")
    try:
        return item[0], base64.b64decode(item[1].encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise _malformed(key, "an unreadable output") from None


def _malformed(key: str, what: str) -> CacheError:
    return CacheError(f"{key}: the sealed copy holds {what}", "it is skipped")
