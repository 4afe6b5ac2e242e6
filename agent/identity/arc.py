"""Azure Arc's HIMDS as a token request factory [protocol.md A7].

An Arc-enabled server (on-premises or another cloud) has no IMDS; its
Connected Machine agent serves the same token API on
``http://localhost:40342`` and proves the caller may have a token with a
key-file challenge:

1. GET as IMDS does (``api-version=2020-06-01``, ``Metadata: true``, the
   selectors ``client_id``, ``object_id``, ``msi_res_id``), no credential.
2. HIMDS answers 401 with ``WWW-Authenticate: Basic realm=<key file>``; it
   has just written that file, readable only by root and the ``himds`` group.
3. The same GET again with ``Authorization: Basic <file contents>`` (sent
   as-is, not base64 of user:password).

The realm is untrusted: a process that answers on port 40342 could name any
file (``/etc/shadow``) and receive its contents. So the path is accepted only
if it is a regular file directly in the tokens directory, ends in ``.key``,
is at most 4,096 bytes and is not a symlink (checked with ``lstat``, opened
with ``O_NOFOLLOW`` and checked again with ``fstat``, so a swap between the
checks is caught) — azure-identity's and MSAL's checks, plus the symlink
ones. A path with a NUL byte is refused before any system call (Python
raises ValueError for it), and the opened file must have exactly one link:
a hard link in the tokens directory to a file elsewhere passes every path
check (it is a regular file, not a symlink) but is that other file. The
file's contents never reach a message, a log line or a ``repr``.

A user-assigned identity's selector must be echoed in the token response: a
legacy Arc agent ignores it and answers with the system-assigned identity,
which would give the wrong identity's access silently.
"""

from __future__ import annotations

import os
import re
import stat
from typing import Callable, Mapping, NamedTuple, Optional

from agent.base import transport
from agent.base.errors import IdentityUnavailableError
from agent.base.retry import parse_retry_after
from agent.base.untrusted import escape, load_json
from agent.identity.imds import RETRY_STATUSES, SELECTOR_PARAMS
from agent.identity.request import (
    AccessToken,
    Answer,
    RequestFactory,
    Retry,
    TokenRequest,
    error_description,
)
from agent.identity.selector import Identity

ARC_API_VERSION = "2020-06-01"  # azure-identity's and MSAL's [protocol.md A7]
DEFAULT_ARC_ENDPOINT = "http://localhost:40342/metadata/identity/oauth2/token"
DEFAULT_TOKENS_DIR = "/var/opt/azcmagent/tokens"
TOKENS_DIR_ENV = "KV_AGENT_ARC_TOKENS_DIR"  # tests only: a key-file directory of their own
KEY_SUFFIX = ".key"
MAX_KEY_BYTES = 4096
PRINTABLE_KEY_RE = re.compile(r"[\x20-\x7e]+")
# manifest selector -> the field the response must echo [protocol.md A7]
ECHO_FIELDS = {"client_id": "client_id", "object_id": "object_id",
               "resource_id": "msi_res_id"}

GROUP_HINT = ("give kv-agent the himds group: run `kv-agent-himds install` and restart "
              "kv-agent (it adds SupplementaryGroups=himds to the unit; needed when the Arc "
              "agent was installed after kv-agent), or usermod -aG himds <user> when "
              "kv-agent runs as another user")


class KeyFileError(ValueError):
    """The realm's key file was refused; the message names the path and why."""


class KeyFile(NamedTuple):
    """The challenge's secret; never shown."""

    contents: str

    def __repr__(self) -> str:
        return "KeyFile(****)"


def read_key_file(path: str, tokens_dir: str) -> KeyFile:
    """Read the challenge file at ``path`` if it is one HIMDS could have written.

    Refused (KeyFileError, message naming the path and the rule): a path
    with a NUL byte, not directly in ``tokens_dir``, not ending in ``.key``,
    missing, a symlink, not a regular file (a directory, a FIFO), over
    MAX_KEY_BYTES, not readable, or (on the open file) with a link count
    other than 1. Checked before a byte is read, and again on the open file.
    """
    shown = escape(path)
    if "\0" in path:  # os.lstat would raise ValueError, not OSError
        raise KeyFileError(f"{shown} contains a NUL byte")
    if not _is_directly_in(path, tokens_dir):
        raise KeyFileError(f"{shown} is not directly in {tokens_dir}")
    if not path.endswith(KEY_SUFFIX):
        raise KeyFileError(f"{shown} does not end in {KEY_SUFFIX}")
    try:
        _check_file(os.lstat(path), shown)
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise KeyFileError(f"{shown} does not exist") from None
    except PermissionError:
        raise KeyFileError(f"{shown} is not readable by this user") from None
    except OSError as exc:  # ELOOP: a symlink swapped in after lstat
        raise KeyFileError(f"{shown} could not be opened ({exc.strerror})") from None
    try:
        _check_open_file(os.fstat(fd), shown)
        data = os.read(fd, MAX_KEY_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_KEY_BYTES:
        raise KeyFileError(f"{shown} is larger than {MAX_KEY_BYTES} bytes")
    text = data.decode("latin-1").strip()
    # Printable ASCII only: anything else could not go into a header, and the
    # HTTP library's refusal would quote the value (the key) in its message.
    if not PRINTABLE_KEY_RE.fullmatch(text):
        raise KeyFileError(f"{shown} does not hold a key (empty, or not printable ASCII)")
    return KeyFile(text)


def _is_directly_in(path: str, directory: str) -> bool:
    """``path`` names an entry of ``directory`` itself: absolute, no ``..``
    (a path through a subdirectory or out of it is refused, pure)."""
    if not os.path.isabs(path) or ".." in path.split("/"):
        return False
    return os.path.dirname(os.path.normpath(path)) == os.path.normpath(directory)


def _check_file(info: os.stat_result, shown: str) -> None:
    if stat.S_ISLNK(info.st_mode):
        raise KeyFileError(f"{shown} is a symlink")
    if not stat.S_ISREG(info.st_mode):
        raise KeyFileError(f"{shown} is not a regular file")
    if info.st_size > MAX_KEY_BYTES:
        raise KeyFileError(f"{shown} is larger than {MAX_KEY_BYTES} bytes")


def _check_open_file(info: os.stat_result, shown: str) -> None:
    """The lstat checks again, on the file actually opened, plus its link
    count: HIMDS writes a fresh file, so a second name means a hard link to a
    file it did not write (/etc/shadow through a link in a writable dir)."""
    _check_file(info, shown)
    if info.st_nlink != 1:
        raise KeyFileError(f"{shown} has {info.st_nlink} links (a hard link to another "
                           "file); HIMDS writes a file with one")


def realm_path(header: Optional[str]) -> Optional[str]:
    """The key file a ``WWW-Authenticate: Basic realm=<path>`` names, or None
    for any other shape (pure)."""
    if not header:
        return None
    scheme, _, rest = header.strip().partition(" ")
    name, sep, path = rest.strip().partition("=")
    if scheme.lower() != "basic" or name.strip().lower() != "realm" or not sep:
        return None
    path = path.strip().strip('"')
    return path or None


class ArcRequestFactory(RequestFactory):
    """HIMDS token requests for one identity at ``endpoint``; key files are
    read from ``tokens_dir`` only (``read_key`` is injectable for tests)."""

    name = "Azure Arc (HIMDS)"
    unusable_hint = "retry later; if it persists, restart the Arc agent"
    unreachable_hint = ("check that the Azure Connected Machine agent is running "
                        "(azcmagent show) or set identity.source in the manifest")

    def __init__(self, endpoint: str, identity: Identity, tokens_dir: str = DEFAULT_TOKENS_DIR,
                 read_key: Callable[[str, str], KeyFile] = read_key_file) -> None:
        self.endpoint = endpoint
        self.identity = identity
        self.tokens_dir = tokens_dir
        self._read_key = read_key

    def request(self, resource: str) -> TokenRequest:
        """IMDS's request with Arc's api-version; no credential yet."""
        params = self.identity.token_params(ARC_API_VERSION, resource, SELECTOR_PARAMS)
        return TokenRequest(self.endpoint, params, headers={"Metadata": "true"})

    def answer(self, sent: TokenRequest, reply: transport.Reply, resource: str,
               now: float) -> Answer:
        """200: the token (its selector echoed); 401 to a first request: the
        same request with the key file's contents; 401 again, a refused key
        file or any other 4xx: IdentityUnavailableError with the fix;
        404/408/410/429/5xx: retry."""
        status, body = reply.status, reply.body
        if status == 200:
            return self._token(body, resource, now)
        if status == 401:
            return self._answer_challenge(sent, reply)
        if status in RETRY_STATUSES:
            return Retry(status, error_description(body),
                         parse_retry_after(reply.headers.get("Retry-After")))
        raise IdentityUnavailableError(
            f"{self.name} at {self.endpoint} refused a token for "
            f"{self.identity.describe()}: HTTP {status} {error_description(body)}",
            "check the identity is assigned to this Arc server (az connectedmachine show)")

    def _answer_challenge(self, sent: TokenRequest, reply: transport.Reply) -> TokenRequest:
        if "Authorization" in sent.headers:
            raise IdentityUnavailableError(
                f"{self.name} at {self.endpoint} refused the key file it named "
                f"(HTTP 401 again: {error_description(reply.body)})",
                "restart the Arc agent (systemctl restart himdsd) and retry")
        header = reply.headers.get("WWW-Authenticate")
        path = realm_path(header)
        if path is None:
            raise IdentityUnavailableError(
                f"{self.name} at {self.endpoint} answered 401 without a key-file challenge "
                f"(WWW-Authenticate: {escape(header or '')!s})",
                "check that identity endpoint is the Arc agent's (IDENTITY_ENDPOINT)")
        try:
            key = self._read_key(path, self.tokens_dir)
        except KeyFileError as exc:
            raise IdentityUnavailableError(
                f"{self.name} key-file challenge refused: {exc}", _key_hint(exc)) from None
        headers = dict(sent.headers)
        headers["Authorization"] = f"Basic {key.contents}"
        return TokenRequest(sent.url, sent.params, headers)

    def _token(self, body: bytes, resource: str, now: float) -> AccessToken:
        token = self.token(body, resource, now)
        self._check_echo(body)
        return token

    def _check_echo(self, body: bytes) -> None:
        """A user-assigned token must name the identity asked for [protocol.md A7]."""
        selector, wanted = self.identity.selector, self.identity.value
        if selector is None or wanted is None:
            return
        field = ECHO_FIELDS[selector]
        content = load_json(body)
        echoed = content.get(field) if isinstance(content, Mapping) else None
        if not isinstance(echoed, str) or echoed.lower() != wanted.lower():
            raise IdentityUnavailableError(
                f"{self.name} answered {field}={escape(echoed or 'nothing')!s} for "
                f"{self.identity.describe()}: a legacy Arc agent ignores the selector",
                "upgrade the Azure Connected Machine agent (azcmagent version) "
                "or use the system-assigned identity")


def _key_hint(exc: KeyFileError) -> str:
    if "not readable" in str(exc):
        return GROUP_HINT
    return ("the endpoint is not the Arc agent, or the agent is misconfigured: "
            f"check IDENTITY_ENDPOINT and {DEFAULT_TOKENS_DIR}")


def tokens_dir(environ: Mapping[str, str]) -> str:
    """Where HIMDS writes key files: the Linux agent's directory, or
    KV_AGENT_ARC_TOKENS_DIR (tests)."""
    return environ.get(TOKENS_DIR_ENV) or DEFAULT_TOKENS_DIR
