"""Text and JSON that came from the network, made safe to keep and to log.

A vault or IMDS controls every byte of its answers: the version in a secret's
``id``, error codes and messages, header values. Any of it may end up in a log
line, an error message, ``STATUS=`` or ``status.json``. Without care a newline
there forges a whole ``kv-agent: error: ...`` line, an ANSI escape repaints the
operator's terminal, a bidi override reverses what a line appears to say, and a
lone surrogate (``"\\ud800"``, valid JSON) raises UnicodeEncodeError wherever
the text is later encoded.

So every piece of network text passes :func:`escape` where it enters the
agent, and every network body is parsed with :func:`load_json`, whose only
failure is ValueError. This module imports nothing from the package, so the
lowest modules can use it.
"""

from __future__ import annotations

import binascii
import json
import re
from typing import Any

DEFAULT_LIMIT = 300  # characters kept of one piece of network text

# C0 controls and DEL, C1 controls, the Unicode line/paragraph separators,
# bidi embeddings/overrides/isolates, the BOM, and surrogates (only a lone one
# can occur in a str: JSON "\ud800" decodes to it).
_UNSAFE = re.compile(
    "[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069\ufeff\ud800-\udfff]")


def _escaped(match: "re.Match[str]") -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape(text: object, limit: int = DEFAULT_LIMIT) -> str:
    """``text`` as one printable line: control characters, separators, bidi
    controls and lone surrogates become ``\\xNN`` / ``\\uNNNN``, and at most
    ``limit`` characters of the input are kept (``...`` marks a cut).

    Pure and total: any object is first turned into ``str``; the result is
    always encodable as UTF-8 and never contains a line break or an ESC.
    """
    raw = text if isinstance(text, str) else str(text)
    cut = limit > 0 and len(raw) > limit
    if cut:
        raw = raw[:limit]
    return _UNSAFE.sub(_escaped, raw) + ("..." if cut else "")


def load_json(body: bytes) -> Any:
    """Parse a response body as JSON; raises ValueError for anything unusable.

    ``json.loads`` also raises RecursionError for deeply nested input (a
    256 KiB body can nest 100,000 levels) and TypeError/UnicodeDecodeError
    for odd bytes; those would escape handlers that expect ValueError, so
    they are turned into ValueError here. The message never quotes the body.
    """
    try:
        return json.loads(body)
    except RecursionError:
        raise ValueError("the response is nested too deeply") from None
    except (ValueError, TypeError):
        raise ValueError("the response is not JSON") from None


def strict_base64(text: bytes) -> bytes:
    """Standard base64 with padding; whitespace and line breaks are ignored.

    Raises ValueError for anything else: a2b_base64 alone skips stray
    characters, so only the canonical spelling of what it decoded is
    accepted (``strict_mode=`` needs Python 3.11).
    """
    compact = b"".join(text.split())
    data = binascii.a2b_base64(compact)
    if binascii.b2a_base64(data, newline=False) != compact:
        raise ValueError("not canonical base64")
    return data
