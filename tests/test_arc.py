"""Azure Arc (HIMDS): the key-file checks, the challenge answered, the selector
echo, and the whole flow through the token cache against the emulator."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List

import pytest
from requests.structures import CaseInsensitiveDict
from secrecy import assert_no_leak

from agent.base import transport
from agent.base.errors import IdentityUnavailableError
from agent.base.retry import RetryPolicy
from agent.emulator import Emulator
from agent.identity.arc import (
    ARC_API_VERSION,
    GROUP_HINT,
    ArcRequestFactory,
    KeyFile,
    KeyFileError,
    read_key_file,
    realm_path,
)
from agent.identity.request import AccessToken, Retry, TokenRequest
from agent.identity.selector import Identity
from agent.identity.tokens import TokenCache, token_source

ENDPOINT = "http://127.0.0.1:9/metadata/identity/oauth2/token"
RESOURCE = "https://vault.azure.net"
NOW = 1_700_000_000.0
KEY = "f" * 64
CLIENT_ID = "11111111-2222-3333-4444-555555555555"


def reply(status: int, content: Any, **headers: str) -> transport.Reply:
    return transport.Reply(status, CaseInsensitiveDict(headers), json.dumps(content).encode())


@pytest.fixture
def tokens_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "tokens"
    directory.mkdir()
    return directory


# -- the key file ------------------------------------------------------------


def _wrong_dir(tokens: Path) -> str:
    other = tokens.parent / "elsewhere"
    other.mkdir()
    (other / "a.key").write_text(KEY)
    return str(other / "a.key")


def _nested(tokens: Path) -> str:
    (tokens / "sub").mkdir()
    (tokens / "sub" / "a.key").write_text(KEY)
    return str(tokens / "sub" / "a.key")


def _dotdot(tokens: Path) -> str:
    (tokens.parent / "a.key").write_text(KEY)
    return str(tokens) + "/../a.key"


def _symlink(tokens: Path) -> str:
    (tokens.parent / "target.key").write_text(KEY)
    os.symlink(tokens.parent / "target.key", tokens / "a.key")
    return str(tokens / "a.key")


def _too_large(tokens: Path) -> str:
    (tokens / "a.key").write_text("k" * 4097)
    return str(tokens / "a.key")


def _not_key(tokens: Path) -> str:
    (tokens / "a.txt").write_text(KEY)
    return str(tokens / "a.txt")


def _directory(tokens: Path) -> str:
    (tokens / "a.key").mkdir()
    return str(tokens / "a.key")


def _missing(tokens: Path) -> str:
    return str(tokens / "a.key")


def _fifo(tokens: Path) -> str:
    os.mkfifo(tokens / "a.key")
    return str(tokens / "a.key")


def _relative(tokens: Path) -> str:
    return "a.key"


def _empty(tokens: Path) -> str:
    (tokens / "a.key").write_text("\n")
    return str(tokens / "a.key")


def _control_characters(tokens: Path) -> str:
    (tokens / "a.key").write_text(KEY[:8] + "\r\nX-Injected: 1")
    return str(tokens / "a.key")


def _nul_byte(tokens: Path) -> str:
    (tokens / "a.key").write_text(KEY)
    return str(tokens / "a\0.key")


def _hard_link(tokens: Path) -> str:
    (tokens.parent / "target.key").write_text(KEY)
    os.link(tokens.parent / "target.key", tokens / "a.key")
    return str(tokens / "a.key")


REFUSALS: Dict[str, Any] = {
    "wrong directory": (_wrong_dir, "is not directly in"),
    "a subdirectory": (_nested, "is not directly in"),
    "dot-dot": (_dotdot, "is not directly in"),
    "relative": (_relative, "is not directly in"),
    "symlink": (_symlink, "is a symlink"),
    "too large": (_too_large, "larger than 4096 bytes"),
    "not .key": (_not_key, "does not end in .key"),
    "a directory": (_directory, "not a regular file"),
    "a fifo": (_fifo, "not a regular file"),
    "missing": (_missing, "does not exist"),
    "empty": (_empty, "does not hold a key"),
    "control characters": (_control_characters, "does not hold a key"),
    "nul byte": (_nul_byte, r"a\\x00\.key contains a NUL byte"),
    "hard link": (_hard_link, "has 2 links"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_key_file_refusals(case: str, tokens_dir: Path) -> None:
    """Every shape of key file HIMDS could not have written is refused, naming why."""
    make, fragment = REFUSALS[case]
    path = make(tokens_dir)
    with pytest.raises(KeyFileError, match=fragment) as caught:
        read_key_file(path, str(tokens_dir))
    assert KEY not in str(caught.value)


def test_key_file_of_exactly_4096_bytes_is_read(tokens_dir: Path) -> None:
    """A regular .key file directly in the directory, 4096 bytes, is read (and masked in repr)."""
    (tokens_dir / "a.key").write_text("k" * 4096)
    key = read_key_file(str(tokens_dir / "a.key"), str(tokens_dir))
    assert key.contents == "k" * 4096 and "k" * 8 not in repr(key)


def test_unreadable_key_file_says_to_join_the_himds_group(
        tokens_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A key file the agent may not read (EACCES: not in the himds group) gives that fix."""
    path = tokens_dir / "a.key"
    path.write_text(KEY)

    def denied(*args: Any) -> int:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("agent.identity.arc.os.open", denied)  # the tests may run as root
    factory = ArcRequestFactory(ENDPOINT, Identity(), str(tokens_dir))
    sent = factory.request(RESOURCE)
    with pytest.raises(IdentityUnavailableError, match="not readable") as caught:
        factory.answer(sent, reply(401, {}, **{"WWW-Authenticate": f"Basic realm={path}"}),
                       RESOURCE, NOW)
    assert caught.value.hint == GROUP_HINT and "himds" in GROUP_HINT


@pytest.mark.parametrize("header, expected", [
    ("Basic realm=/var/opt/azcmagent/tokens/x.key", "/var/opt/azcmagent/tokens/x.key"),
    ("basic Realm=/t/x.key", "/t/x.key"),
    ('Basic realm="/t/x.key"', "/t/x.key"),
    ("Bearer realm=/t/x.key", None),
    ("Basic foo=/t/x.key", None),
    ("Basic realm=", None),
    ("", None),
    (None, None),
])
def test_realm_path(header: Any, expected: Any) -> None:
    """Only a Basic challenge with a realm names a key file."""
    assert realm_path(header) == expected


# -- the factory -------------------------------------------------------------


def test_request_is_imds_shaped_with_arc_api_version() -> None:
    """The first request has Arc's api-version, IMDS's selector names, Metadata: true and
    no Authorization."""
    request = ArcRequestFactory(ENDPOINT, Identity("resource_id", "/sub/x")).request(RESOURCE)
    assert request == TokenRequest(
        ENDPOINT, {"api-version": ARC_API_VERSION, "resource": RESOURCE, "msi_res_id": "/sub/x"},
        {"Metadata": "true"})


def test_challenge_is_answered_with_the_key_file() -> None:
    """A 401 with a Basic realm becomes the same request with Authorization: Basic <contents>."""
    read: List[str] = []

    def read_key(path: str, directory: str) -> KeyFile:
        read.append(path)
        return KeyFile(KEY)

    factory = ArcRequestFactory(ENDPOINT, Identity(), "/t", read_key)
    sent = factory.request(RESOURCE)
    follow_up = factory.answer(
        sent, reply(401, {}, **{"WWW-Authenticate": "Basic realm=/t/a.key"}), RESOURCE, NOW)
    assert isinstance(follow_up, TokenRequest)
    assert follow_up.headers == {"Metadata": "true", "Authorization": f"Basic {KEY}"}
    assert follow_up.params == sent.params and read == ["/t/a.key"]
    assert KEY not in repr(follow_up)
    with pytest.raises(IdentityUnavailableError, match="HTTP 401 again"):
        factory.answer(follow_up, reply(401, {}, **{"WWW-Authenticate": "Basic realm=/t/a.key"}),
                       RESOURCE, NOW)


def test_401_without_a_challenge_is_refused() -> None:
    """A 401 that names no key file is an error naming the header, not a retry."""
    factory = ArcRequestFactory(ENDPOINT, Identity(), "/t")
    with pytest.raises(IdentityUnavailableError, match="without a key-file challenge"):
        factory.answer(factory.request(RESOURCE), reply(401, {}), RESOURCE, NOW)


def test_transient_statuses_retry_and_others_refuse() -> None:
    """429/5xx are Retry with Retry-After; a 400 says which source and what it answered."""
    factory = ArcRequestFactory(ENDPOINT, Identity(), "/t")
    sent = factory.request(RESOURCE)
    assert factory.answer(sent, reply(429, {"error_description": "slow"}, **{"Retry-After": "3"}),
                          RESOURCE, NOW) == Retry(429, "slow", 3.0)
    with pytest.raises(IdentityUnavailableError, match=r"Azure Arc.*HTTP 400 Identity not found"):
        factory.answer(sent, reply(400, {"error_description": "Identity not found"}),
                       RESOURCE, NOW)


@pytest.mark.parametrize("selector, field", [
    ("client_id", "client_id"), ("object_id", "object_id"), ("resource_id", "msi_res_id")])
def test_user_assigned_token_must_echo_the_selector(selector: str, field: str) -> None:
    """A token for another identity (a legacy agent ignoring the selector) is refused;
    the echo is compared case-insensitively."""
    factory = ArcRequestFactory(ENDPOINT, Identity(selector, "ABC-1"), "/t")
    sent = factory.request(RESOURCE)
    body = {"access_token": "tok-" + "x" * 20, "expires_in": "3600", field: "abc-1"}
    assert isinstance(factory.answer(sent, reply(200, body), RESOURCE, NOW), AccessToken)
    with pytest.raises(IdentityUnavailableError, match="legacy Arc agent") as caught:
        factory.answer(sent, reply(200, {**body, field: "other"}), RESOURCE, NOW)
    assert "x" * 20 not in str(caught.value)


# -- against the emulator ----------------------------------------------------


@pytest.fixture
def arc(tokens_dir: Path) -> Iterator[Emulator]:
    with Emulator({"db": "v"}, identity_source="arc", arc_tokens_dir=str(tokens_dir)) as emulator:
        yield emulator


def arc_environ(emulator: Emulator, tokens_dir: Path) -> Dict[str, str]:
    return {"IDENTITY_ENDPOINT": emulator.imds_endpoint, "IMDS_ENDPOINT": emulator.imds_base,
            "KV_AGENT_ARC_TOKENS_DIR": str(tokens_dir)}


def arc_source(emulator: Emulator, tokens_dir: Path, identity: Identity = Identity(),
               sleep: Callable[[float], None] = lambda s: None) -> TokenCache:
    return token_source(identity, arc_environ(emulator, tokens_dir),
                        RetryPolicy(deadline_s=5), sleep=sleep, exists=lambda path: False)


def test_arc_flow_against_the_emulator(arc: Emulator, tokens_dir: Path,
                                       caplog: pytest.LogCaptureFixture) -> None:
    """auto picks Arc; the first GET is challenged, the second carries the key file's
    contents and gets a token that the cache then serves; nothing secret is logged."""
    caplog.set_level(logging.DEBUG)
    tokens = arc_source(arc, tokens_dir)
    try:
        assert tokens.source.source == "arc"
        token = tokens.get_token(RESOURCE)
        assert tokens.get_token(RESOURCE) is token
    finally:
        tokens.close()
    log = arc.imds_log
    assert [record.status for record in log] == [401, 200]
    assert "authorization" not in log[0].headers
    (key_file,) = tokens_dir.iterdir()
    assert log[1].headers["authorization"] == f"Basic {key_file.read_text()}"
    assert log[1].query["api-version"] == ARC_API_VERSION
    assert_no_leak(caplog.text, [key_file.read_text()], [token.token])


def test_arc_user_assigned_against_the_emulator(tokens_dir: Path) -> None:
    """A user-assigned identity is asked for by client_id and its echo accepted."""
    from agent.emulator.secrets_file import IdentityConfig, UserAssignedIdentity

    config = IdentityConfig(system_assigned=False, user_assigned=(
        UserAssignedIdentity(CLIENT_ID, "o" * 8, "/subscriptions/s/x"),))
    with Emulator(identities=config, identity_source="arc",
                  arc_tokens_dir=str(tokens_dir)) as emulator:
        tokens = arc_source(emulator, tokens_dir, Identity("client_id", CLIENT_ID.upper()))
        try:
            tokens.get_token(RESOURCE)
        finally:
            tokens.close()
        assert emulator.imds_log[1].query["client_id"] == CLIENT_ID.upper()


def test_arc_shares_the_cache_retry_and_retry_after(arc: Emulator, tokens_dir: Path) -> None:
    """A 429 with Retry-After from HIMDS is waited out by the shared retry loop."""
    slept: List[float] = []
    arc.inject_fault("imds", 429, retry_after="4")
    tokens = arc_source(arc, tokens_dir, sleep=slept.append)
    try:
        tokens.get_token(RESOURCE)
    finally:
        tokens.close()
    assert [record.status for record in arc.imds_log] == [429, 401, 200]
    assert slept and slept[0] >= 4


@pytest.mark.parametrize("case", ["wrong directory", "symlink", "too large", "not .key",
                                  "a directory", "missing", "nul byte", "hard link"])
def test_emulator_challenge_to_a_bad_key_file_is_refused_and_nothing_sent(
        case: str, arc: Emulator, tokens_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """When HIMDS names a key file the agent must not read, it stops with a clear
    one-line message and never sends an Authorization header."""
    make, fragment = REFUSALS[case]
    arc.arc_api.realm = make(tokens_dir)
    tokens = arc_source(arc, tokens_dir)
    try:
        with pytest.raises(IdentityUnavailableError, match=fragment) as caught:
            tokens.get_token(RESOURCE)
    finally:
        tokens.close()
    message = str(caught.value)
    assert "Azure Arc" in message and "\n" not in message and caught.value.hint
    assert [record.status for record in arc.imds_log] == [401]
    assert not any("authorization" in record.headers for record in arc.imds_log)
    assert_no_leak(message + caplog.text, [KEY], [])
