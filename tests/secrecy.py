"""The one check that no secret value or token reached some output.

Every test that runs the agent (in-process or as ``kv-agent``) passes what it
captured through :func:`assert_no_leak` with the values it stored and the
tokens the emulator issued. The README promises that no secret value and no
token ever appears in a log line, a message or an error, at any log level.
"""

from __future__ import annotations

import re
import secrets
from typing import Iterable

# Any JWT (header.payload.signature, base64url): a token's shape must never be printed.
JWT_RE = re.compile(r"eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}")
MIN_FRAGMENT = 12  # a line of a multi-line value this long is checked on its own too


def fresh_value(label: str) -> str:
    """A secret value that cannot occur by chance in any output."""
    return f"{label}-{secrets.token_hex(16)}"


def assert_no_leak(text: str, values: Iterable[str], tokens: Iterable[str], *,
                   allow_traceback: bool = False) -> None:
    """No secret value (nor a long line of one), no token (nor a part of one),
    nothing token-shaped and, unless allowed, no traceback in ``text``."""
    for value in values:
        lines = {line.strip() for line in value.splitlines()}
        for fragment in {value} | {line for line in lines if len(line) >= MIN_FRAGMENT}:
            assert fragment not in text, "a secret value was printed"
    for token in tokens:
        for part in (token, token[-20:], *token.split(".")[1:]):
            assert part not in text, "an access token (or part of one) was printed"
    assert not JWT_RE.search(text), "something shaped like a token was printed"
    if not allow_traceback:
        assert "Traceback" not in text, text
