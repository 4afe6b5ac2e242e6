"""Which host a vault URL names, and where the HTTP library will really connect.

A bearer token must reach the vault and nothing else, so the host that the
agent *checks* (its audience, the challenge domain) must be the host that
urllib3 *connects to*. Parsers disagree on odd URLs: for
``https://evil.example\\.vault.azure.net`` :func:`urllib.parse.urlsplit` sees a
host under ``vault.azure.net`` while urllib3 ends the host at the backslash and
connects to ``evil.example`` (issue 9, item 1). Two rules close that gap:

1. :func:`normalize_vault_url` accepts a host only when, after IDNA encoding,
   it is DNS letters, digits, ``-`` and ``.`` (or an IPv4/IPv6 literal, for a
   loopback emulator), with an optional numeric port; nothing else may appear
   in the authority (no ``\\``, ``;``, ``%``, ``#``, ``@``, whitespace...).
2. :func:`check_target` asks urllib3's own parser where a request URL goes and
   refuses it unless that is exactly the validated host and port. The vault
   client calls it before every request, so even a URL built outside the
   manifest cannot send a token elsewhere.

Raises ValueError with a one-line reason; callers turn it into their error.
:func:`vault_label` is the vault's short name in STATUS= lines.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from typing import Optional, Tuple
from urllib.parse import urlsplit

from urllib3.exceptions import LocationParseError
from urllib3.util import parse_url

from agent.base.hosts import is_loopback_host

EXAMPLE = "https://<name>.vault.azure.net"
_LABEL = re.compile(r"[a-z0-9-]{1,63}\Z")
_AUTHORITY = re.compile(r"(?P<host>\[[0-9a-fA-F:.]+\]|[^\[\]:]+)(?::(?P<port>[0-9]{1,5}))?\Z")
_UNSAFE_CHARS = re.compile(r"[\s\x00-\x1f\x7f\\;%#@?]")
_NUMERIC_LABEL = re.compile(r"(?:0x[0-9a-f]*|[0-9]+)\Z")


def normalize_vault_url(value: str) -> str:
    """``https://host[:port]`` for a vault URL, or ValueError.

    The host is lower-cased and IDNA-encoded, the default port 443 dropped, a
    trailing ``/`` allowed; a path, query, fragment or credentials are refused.
    Idempotent: a normalised URL normalises to itself.
    """
    text = value.strip()
    if _UNSAFE_CHARS.search(text.replace("https://", "", 1).rstrip("/")):
        raise ValueError(f"{text!r} has characters no vault host can contain "
                         f"(whitespace, \\ ; % # @ ?); write {EXAMPLE}")
    parts = urlsplit(text)
    if parts.scheme.lower() != "https":
        raise ValueError(f"{text!r} is not https; tokens are only ever sent over TLS: "
                         f"write {EXAMPLE}")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"{text!r} must be the vault's base URL with no path")
    match = _AUTHORITY.match(parts.netloc)
    if match is None:
        raise ValueError(f"{text!r} has no valid host[:port]; write {EXAMPLE}")
    host = _normalize_host(match.group("host"), text)
    port = int(match.group("port")) if match.group("port") else 443
    if not 0 < port < 65536:
        raise ValueError(f"{text!r} has an invalid port")
    url = f"https://{host}" + ("" if port == 443 else f":{port}")
    check_target(url, url)
    return url


def _normalize_host(raw: str, text: str) -> str:
    """A lower-case ASCII host: a bracketed IPv6 literal, an IPv4 literal or DNS labels."""
    if raw.startswith("["):
        try:
            address = ipaddress.IPv6Address(raw[1:-1])
        except ValueError:
            raise ValueError(f"{text!r} has an invalid IPv6 address") from None
        return f"[{address.compressed}]"
    try:
        host = raw.lower().encode("idna").decode("ascii")
    except UnicodeError:
        raise ValueError(f"{text!r} has a host name that is not valid IDNA") from None
    labels = host[:-1].split(".") if host.endswith(".") else host.split(".")
    if len(host) > 253 or not all(_LABEL.match(label) for label in labels):
        raise ValueError(f"{text!r}: a host may contain only letters, digits, '-' and '.'; "
                         f"write {EXAMPLE}")
    if _NUMERIC_LABEL.match(labels[-1]):
        # Resolvers read "127.1" or "0x7f.1" as IPv4 addresses: accept only
        # the one canonical dotted-quad spelling of an address.
        try:
            return str(ipaddress.IPv4Address(host))
        except ValueError:
            raise ValueError(f"{text!r} is not a valid IPv4 address or host name; "
                             f"write {EXAMPLE}") from None
    return host


def target(url: str) -> Tuple[str, str, Optional[int]]:
    """(scheme, host, port) that urllib3, and so requests, will connect to
    for ``url`` (port None when the scheme's default). ValueError when it
    cannot parse the URL at all."""
    try:
        parsed = parse_url(url)
    except LocationParseError:
        raise ValueError(f"{url!r} is not a URL the HTTP library can parse") from None
    return (parsed.scheme or "").lower(), (parsed.host or "").lower(), parsed.port


def check_target(url: str, vault: str) -> None:
    """Raise ValueError unless a request for ``url`` would connect, over
    https, to exactly the host and port of the vault URL ``vault``."""
    scheme, host, port = target(url)
    expected_host, expected_port = _vault_target(vault)
    if scheme != "https" or host != expected_host or (port or 443) != expected_port:
        raise ValueError(f"a request for vault {vault} would go to {host or '?'}"
                         f":{port or 443} instead")


@functools.lru_cache(maxsize=64)
def _vault_target(vault: str) -> Tuple[str, int]:
    """The host (an IPv6 literal in brackets, as urllib3 gives it) and port
    of the vault URL ``vault``; kept, as the vault is the same for every
    request (``url`` is parsed at each)."""
    expected = urlsplit(vault)
    expected_host = (expected.hostname or "").lower()
    if ":" in expected_host:
        expected_host = f"[{expected_host}]"
    return expected_host, expected.port or 443


def vault_label(vault: str) -> str:
    """A short name for STATUS=: the first DNS label (``contoso-kv``), or
    ``host:port`` for an IP literal or localhost (the emulator)."""
    parts = urlsplit(vault)
    host = parts.hostname or ""
    if is_loopback_host(host) or ":" in host or host.replace(".", "").isdigit():
        return parts.netloc
    return host.split(".")[0]
