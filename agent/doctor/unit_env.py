"""The environment kv-agent.service runs with, for ``kv-agent doctor``.

Run from a root shell, doctor used to check with the shell's environment, not
the agent's: with the vault's CA (``REQUESTS_CA_BUNDLE``) and the identity
endpoint (``KV_AGENT_IMDS_ENDPOINT``) set in a drop-in, it failed twice on a
healthy agent and advised setting what was already set (issue 17, item 27).
A unit's environment is what systemd builds, later sources winning
(systemd.exec(5)):

1. the manager's own environment (``systemctl show-environment``: PATH,
   LANG, ``DefaultEnvironment=`` ...);
2. ``Environment=`` of the unit and its drop-ins;
3. each ``EnvironmentFile=``, in order (``-``: a missing file is skipped).

The shell's environment plays no part, as for the agent, which does not
inherit /etc/environment either.

Parsing follows systemd. ``systemctl show`` prints a list as words separated
by spaces, a word with spaces or special characters quoted, either ``"..."``
(a backslash escapes the next character) or ``$'...'`` (C escapes); an
environment file is read by systemd's rules: ``KEY=VALUE`` lines, ``#`` and
``;`` comments, single and double quotes, backslash escapes and
continuations, names that are not valid ignored. The parsers are pure;
:func:`unit_environment` runs systemctl through an injectable runner.
"""

from __future__ import annotations

import re
import subprocess
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

UNIT = "kv-agent.service"
SYSTEMCTL_TIMEOUT_S = 3.0
MAX_ENV_FILE_BYTES = 1024 * 1024  # systemd's own limit for an environment file is larger
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_FILE_LINE = re.compile(r"(.*) \(ignore_errors=(yes|no)\)\Z")
_C_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v",
              "\\": "\\", "'": "'", '"': '"', "s": " "}
# Inside double quotes in an environment file a backslash escapes only these
# (systemd's SHELL_NEED_ESCAPE); before anything else it stays as it is.
_DOUBLE_QUOTE_ESCAPES = '"\\`$'

Runner = Callable[[Sequence[str]], Optional[str]]  # argv -> stdout, None: no answer


class UnitSettings(NamedTuple):
    """What ``systemctl show`` says of the unit's environment settings."""

    load_state: str
    environment: Tuple[str, ...]  # NAME=value, in order
    files: Tuple[Tuple[str, bool], ...]  # (path, ignore_errors)


class UnitEnvironment(NamedTuple):
    """The unit's environment and where it came from, by variable name only
    (values may be credentials, e.g. IDENTITY_HEADER: never shown)."""

    environ: Dict[str, str]
    from_environment: Tuple[str, ...]  # names set by Environment=
    from_files: Tuple[Tuple[str, Tuple[str, ...]], ...]  # (file, names it set)
    problems: Tuple[str, ...]  # e.g. an EnvironmentFile= that cannot be read


def split_words(text: str) -> List[str]:
    """The words of one ``systemctl show`` list value (see the module docstring)."""
    words: List[str] = []
    i, n = 0, len(text)
    while i < n:
        if text[i] in " \t":
            i += 1
            continue
        word: List[str] = []
        while i < n and text[i] not in " \t":
            if text.startswith("$'", i):
                i = _c_quoted(text, i + 2, word)
            elif text[i] == '"':
                i += 1
                while i < n and text[i] != '"':
                    if text[i] == "\\" and i + 1 < n:
                        i += 1
                    word.append(text[i])
                    i += 1
                i += 1  # the closing quote
            elif text[i] == "\\" and i + 1 < n:
                word.append(text[i + 1])
                i += 2
            else:
                word.append(text[i])
                i += 1
        words.append("".join(word))
    return words


def _c_quoted(text: str, i: int, word: List[str]) -> int:
    """Decode a ``$'...'`` body from ``i`` into ``word``; returns the index after it."""
    n = len(text)
    while i < n and text[i] != "'":
        if text[i] != "\\" or i + 1 >= n:
            word.append(text[i])
            i += 1
            continue
        kind = text[i + 1]
        if kind in _C_ESCAPES:
            word.append(_C_ESCAPES[kind])
            i += 2
        elif kind == "x" and re.match(r"[0-9a-fA-F]{2}", text[i + 2:i + 4]):
            word.append(chr(int(text[i + 2:i + 4], 16)))
            i += 4
        elif kind in "uU":
            width = 4 if kind == "u" else 8
            digits = text[i + 2:i + 2 + width]
            if re.fullmatch(rf"[0-9a-fA-F]{{{width}}}", digits) and int(digits, 16) < 0x110000:
                word.append(chr(int(digits, 16)))
                i += 2 + width
            else:
                word.append(kind)
                i += 2
        elif re.match(r"[0-7]{3}", text[i + 1:i + 4]):
            word.append(chr(int(text[i + 1:i + 4], 8)))
            i += 4
        else:
            word.append(kind)
            i += 2
    return i + 1  # the closing quote


def parse_show(text: str) -> UnitSettings:
    """``systemctl show -p LoadState -p Environment -p EnvironmentFiles`` output
    (one ``EnvironmentFiles=`` line per file: ``PATH (ignore_errors=yes|no)``)."""
    load_state = ""
    environment: List[str] = []
    files: List[Tuple[str, bool]] = []
    for line in text.splitlines():
        key, _, value = line.partition("=")
        if key == "LoadState":
            load_state = value.strip()
        elif key == "Environment":
            environment += [word for word in split_words(value) if "=" in word]
        elif key == "EnvironmentFiles" and value:
            match = _FILE_LINE.match(value)
            files.append((match.group(1), match.group(2) == "yes") if match else (value, False))
    return UnitSettings(load_state, tuple(environment), tuple(files))


def parse_env_file(text: str) -> List[Tuple[str, str]]:
    """The assignments of an environment file, in order, by systemd's rules
    (env-file.c): a name without ``=`` and an invalid name are ignored."""
    found: List[Tuple[str, str]] = []
    state, key, value = "pre-key", "", ""
    trailing = 0  # unescaped whitespace at the end of an unquoted value
    for c in text + "\n":
        if state == "pre-key":
            if c in "#;":
                state = "comment"
            elif not c.isspace():
                state, key = "key", c
        elif state == "key":
            if c in "\n\r":
                state = "pre-key"  # no "=": ignored
            elif c == "=":
                state, value, trailing = "pre-value", "", 0
            else:
                key += c
        elif state == "comment":
            if c == "\\":
                state = "comment-escape"
            elif c in "\n\r":
                state = "pre-key"
        elif state == "comment-escape":
            state = "comment"
        elif state in ("pre-value", "value"):
            if c in "\n\r":
                _assign(found, key, value[:len(value) - trailing] if trailing else value)
                state = "pre-key"
            elif state == "pre-value" and c.isspace():
                pass
            elif c == "'" and state == "pre-value":
                state = "single"
            elif c == '"' and state == "pre-value":
                state = "double"
            elif c == "\\":
                state = "value-escape"
            else:
                state = "value"
                value += c
                trailing = trailing + 1 if c.isspace() else 0
        elif state == "value-escape":
            state = "value"
            if c not in "\n\r":  # backslash-newline continues the line
                value += c
                trailing = 0
        elif state == "single":
            if c == "'":
                state = "pre-value"
            else:
                value += c
        elif state == "double":
            if c == '"':
                state = "pre-value"
            elif c == "\\":
                state = "double-escape"
            else:
                value += c
        elif state == "double-escape":
            state = "double"
            if c in _DOUBLE_QUOTE_ESCAPES:
                value += c
            elif c not in "\n\r":
                value += "\\" + c
    return found


def _assign(found: List[Tuple[str, str]], key: str, value: str) -> None:
    name = key.strip()
    if _NAME.match(name):
        found.append((name, value))


def unit_environment(run: Optional[Runner] = None,
                     read: Optional[Callable[[str], str]] = None) -> Optional[UnitEnvironment]:
    """kv-agent.service's environment, or None when there is no such unit
    (not installed, or no systemd to ask)."""
    run = run or _systemctl
    read = read or _read_env_file
    shown = run(["show", "-p", "LoadState", "-p", "Environment", "-p", "EnvironmentFiles",
                 UNIT])
    if shown is None:
        return None
    settings = parse_show(shown)
    if settings.load_state != "loaded":
        return None
    environ: Dict[str, str] = {}
    for line in (run(["show-environment"]) or "").splitlines():
        environ.update(_assignments(split_words(line)))
    environ.update(_assignments(settings.environment))
    from_files: List[Tuple[str, Tuple[str, ...]]] = []
    problems: List[str] = []
    for path, ignore_errors in settings.files:
        try:
            assigned = parse_env_file(read(path))
        except (OSError, UnicodeDecodeError) as exc:
            if not ignore_errors:
                problems.append(f"EnvironmentFile={path} cannot be read "
                                f"({getattr(exc, 'strerror', None) or exc})")
            continue
        environ.update(assigned)
        from_files.append((path, tuple(dict.fromkeys(name for name, _ in assigned))))
    names = tuple(dict.fromkeys(name for name, _ in _assignments(settings.environment)))
    return UnitEnvironment(environ, names, tuple(from_files), tuple(problems))


def _assignments(words: Sequence[str]) -> List[Tuple[str, str]]:
    pairs = [tuple(word.split("=", 1)) for word in words if "=" in word]
    return [(name, value) for name, value in pairs if _NAME.match(name)]


def _systemctl(argv: Sequence[str]) -> Optional[str]:
    """``systemctl ARGV``'s stdout, None when it fails or gives no answer in time."""
    try:
        done = subprocess.run(["systemctl", *argv], capture_output=True, text=True,
                              timeout=SYSTEMCTL_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def _read_env_file(path: str) -> str:
    with open(path, "rb") as handle:
        return handle.read(MAX_ENV_FILE_BYTES).decode("utf-8")
