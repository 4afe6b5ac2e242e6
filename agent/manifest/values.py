"""The manifest's scalar values, each parsed by one pure function.

Each parser returns the value or raises ValueError whose text is the
problem and its fix (``what; fix``); the caller adds the file, line and
key. Text is bounded before any conversion: a 400-digit number overflows a
float and a 5,000-digit one exceeds Python's int-from-text limit.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Optional, Tuple

from agent.manifest.quoting import echo
from agent.vault.url import normalize_vault_url

MIN_REFRESH_S = 1.0
MAX_REFRESH_S = 31 * 24 * 3600.0  # a month; longer waits overflow nothing but help no one
DURATION_RE = re.compile(r"^(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$", re.ASCII)
MAX_DURATION_CHARS = 20
MODE_RE = re.compile(r"^[0-7]{3,4}$")
MAX_WARN_BEFORE_EXPIRY_S = 366 * 86400.0
EXPIRY_WINDOW_RE = re.compile(r"^(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$", re.ASCII)
MAX_JITTER = 0.5
MAX_ID = 2**32 - 2  # (uid_t)-1 means "unchanged" to chown(2)

# User and group names are bounded and plain BEFORE any lookup: NSS modules
# are C code that trusts its input (a 50 MB name aborted the process inside
# nss-systemd). 256 is LOGIN_NAME_MAX; the characters are what useradd,
# systemd and directory services (user@domain, MACHINE$) produce.
MAX_ACCOUNT_NAME_CHARS = 256
ACCOUNT_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.@\\-]*\$?", re.ASCII)
MAX_VAULT_CHARS = 256  # https:// + a 24-character name + the longest cloud suffix


def parse_duration(value: Any) -> float:
    """Parse ``90``, ``"90s"``, ``"15m"``, ``"1h"`` or ``"1h30m"`` to seconds.

    Raises ValueError unless the result is a whole number of seconds from 1
    to MAX_REFRESH_S. Integers are compared before any float conversion and
    text is bounded before int(): a 400-digit number overflows a float and a
    5,000-digit one exceeds Python's int-from-text limit.
    """
    if isinstance(value, bool):
        raise ValueError("not a duration")
    if isinstance(value, int):
        seconds = value
    elif isinstance(value, str) and len(value.strip()) <= MAX_DURATION_CHARS:
        match = DURATION_RE.match(value.strip())
        if value.strip().isascii() and value.strip().isdigit():
            seconds = int(value.strip())
        elif match and any(match.groups()):
            hours, minutes, secs = (int(g) if g else 0 for g in match.groups())
            seconds = hours * 3600 + minutes * 60 + secs
        else:
            raise ValueError("not a duration")
    else:
        raise ValueError("not a duration")
    if seconds < MIN_REFRESH_S:
        raise ValueError("must be at least 1 second")
    if seconds > MAX_REFRESH_S:
        raise ValueError(f"must be at most 31 days ({int(MAX_REFRESH_S) // 3600}h)")
    return float(seconds)


def parse_expiry_window(value: Any) -> float:
    """Parse ``warn_before_expiry``: ``14d``, ``36h``, ``90m``, ``1d12h``
    (or a number of seconds) to seconds, from 0 to MAX_WARN_BEFORE_EXPIRY_S.
    Text is bounded before int(), as in :func:`parse_duration`."""
    if isinstance(value, bool):
        raise ValueError("not a duration")
    if isinstance(value, int):
        seconds = value
    elif isinstance(value, str) and len(value.strip()) <= MAX_DURATION_CHARS:
        text = value.strip()
        match = EXPIRY_WINDOW_RE.match(text)
        if text.isascii() and text.isdigit():
            seconds = int(text)
        elif match and any(match.groups()):
            days, hours, minutes, secs = (int(g) if g else 0 for g in match.groups())
            seconds = ((days * 24 + hours) * 60 + minutes) * 60 + secs
        else:
            raise ValueError("not a duration")
    else:
        raise ValueError("not a duration")
    if not 0 <= seconds <= MAX_WARN_BEFORE_EXPIRY_S:
        raise ValueError("must be from 0 to 366d")
    return float(seconds)


def parse_mode(value: Any, raw: Optional[str]) -> int:
    """Parse a quoted octal string such as ``"0440"`` into an int.

    An unquoted YAML ``0440`` is an integer (octal, 288) and ``440`` a decimal
    one; both are refused with the quoted spelling in the message because the
    number YAML produced is not what the operator meant.
    """
    if not isinstance(value, str):
        text = (raw if raw is not None else echo(value)).strip()
        suggestion = text.zfill(4) if MODE_RE.match(text) else "0440"
        raise ValueError(f"{echo(text)} must be a quoted octal string; "
                         f"write mode: \"{suggestion}\"")
    text = value.strip()
    if not MODE_RE.match(text):
        raise ValueError(f"'{echo(value)}' is not an octal mode; write e.g. mode: \"0440\"")
    mode = int(text, 8)
    if mode > 0o777:
        raise ValueError(
            f"'{value}' sets setuid, setgid or sticky bits; "
            f"use permission bits only, e.g. \"{mode & 0o777:04o}\""
        )
    return mode


def parse_vault_url(value: Any) -> str:
    """Normalise a vault URL to ``https://host[:port]``; refuse anything else.

    Tokens go only to this host, so it must be exact: https, a host of DNS
    letters, digits, '-' and '.' (or an IP literal), no path, query, fragment
    or credentials, and the host urllib3 will connect to must be this very
    host (see :mod:`agent.vault.url`, issue 9 item 1).
    """
    if not isinstance(value, str) or not value.strip():
        raise ValueError("must be a URL such as https://contoso-kv.vault.azure.net")
    return normalize_vault_url(value)


def parse_vault_value(value: Any) -> str:
    """parse_vault_url, given only a string of a vault URL's length at most."""
    if isinstance(value, str) and len(value) > MAX_VAULT_CHARS:
        raise ValueError(f"'{echo(value)}' is longer than {MAX_VAULT_CHARS} characters; "
                         "write https://<name>.vault.azure.net")
    if not isinstance(value, str):
        raise ValueError(f"'{echo(value)}' is not a URL such as "
                         "https://contoso-kv.vault.azure.net")
    return parse_vault_url(value)


def parse_account(
    value: Any, lookup: Callable[[str], Optional[int]], kind: str
) -> Tuple[int, str]:
    """A numeric id is taken as given (``DynamicUser=`` ids need not be in
    passwd); a name must be plain and at most MAX_ACCOUNT_NAME_CHARS (checked
    before the lookup, which is C code that trusts its input) and resolve."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(f"must be a {kind} name or numeric id, not '{echo(value)}'")
    if isinstance(value, int):
        if not 0 <= value <= MAX_ID:
            raise ValueError(f"{echo(value)} is out of range (0 to {MAX_ID})")
        return value, str(value)
    text = value.strip()
    if text.isascii() and text.isdigit():
        number = int(text) if len(text) <= 10 else MAX_ID + 1
        if number > MAX_ID:
            raise ValueError(f"{echo(text)} is out of range (0 to {MAX_ID})")
        return number, text
    if len(text) > MAX_ACCOUNT_NAME_CHARS or not ACCOUNT_NAME_RE.fullmatch(text):
        raise ValueError(
            f"'{echo(text)}' is not a valid {kind} name: at most {MAX_ACCOUNT_NAME_CHARS} "
            "letters, digits and . _ - @ (not first), or a numeric id")
    resolved = lookup(text)
    if resolved is None:
        fix = "useradd" if kind == "user" else "groupadd"
        raise ValueError(f"unknown {kind} '{echo(text)}'; create it ({fix}) or use a numeric id")
    return resolved, text


def parse_jitter(value: Any) -> float:
    """Parse ``10%`` or ``0.1`` into a fraction in [0, MAX_JITTER]."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError("not a percentage")
    if isinstance(value, int) and not -100 <= value <= 100:  # str() of a huge int may fail
        raise ValueError(f"must be between 0% and {MAX_JITTER:.0%}")
    text = str(value).strip()
    try:
        fraction = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise ValueError("not a percentage") from None
    if not 0 <= fraction <= MAX_JITTER:
        raise ValueError(f"must be between 0% and {MAX_JITTER:.0%}")
    return fraction


def parse_command(value: Any) -> Tuple[str, ...]:
    """Parse ``on_change``: a non-empty list of strings, run without a shell.

    A plain string is refused rather than split: splitting would need shell
    quoting rules, and running it through a shell would invite injection.
    """
    if isinstance(value, str):
        raise ValueError(f"'{echo(value)}' must be a list of arguments, not a string; "
                         f"write on_change: {echo(value.split())}")
    if not isinstance(value, list) or not value or not all(
            isinstance(arg, str) and arg and "\0" not in arg for arg in value):
        raise ValueError("must be a non-empty list of non-empty strings")
    return tuple(value)
