"""Managed-identity tokens: the IMDS request factory (request shape, errors, retries)
and the token cache (when to ask), each through the other's real code."""

from __future__ import annotations

import json
import math
import time
from typing import Any, Dict, List, Optional, Tuple

import pytest
import requests
from fakes import FakeClock, FakeSession, json_reply, refused
from hostile import HostileServer, trickle
from hostile import response as hostile_response
from hypothesis import given, settings
from hypothesis import strategies as st
from requests.structures import CaseInsensitiveDict

from agent.base import transport
from agent.base.errors import IdentityRefusedError, IdentityUnavailableError
from agent.base.retry import MIN_REQUEST_S, RetryPolicy
from agent.identity.imds import DEFAULT_IMDS_ENDPOINT, ImdsRequestFactory, imds_endpoint
from agent.identity.request import (
    MAX_TOKEN_LIFETIME_S,
    AccessToken,
    Answer,
    RequestFactory,
    Retry,
    TokenRequest,
    parse_expires_on,
    parse_token_response,
)
from agent.identity.selector import Identity
from agent.identity.tokens import TokenCache, token_source, with_refresh_on

ENDPOINT = "http://127.0.0.1:9/metadata/identity/oauth2/token"
RESOURCE = "https://vault.azure.net"
TOKEN = "eyJ0eXAi.secret-token-text.sig"
NOW = 1_700_000_000.0


def token_body(**overrides: Any) -> Dict[str, Any]:
    """An IMDS 200 body as the real service sends it: numbers as strings."""
    body = {"access_token": TOKEN, "client_id": "c", "expires_in": "86399",
            "expires_on": str(int(NOW) + 86399), "ext_expires_in": "86399",
            "not_before": str(int(NOW)), "resource": RESOURCE, "token_type": "Bearer"}
    body.update(overrides)
    return body


def source(session: FakeSession, identity: Identity = Identity(), *, wall: Any = None,
           clock: FakeClock = None, deadline: float = 30) -> TokenCache:  # type: ignore[assignment]
    clock = clock or FakeClock()
    return TokenCache(session, ImdsRequestFactory(ENDPOINT, identity),  # type: ignore[arg-type]
                      policy=RetryPolicy(deadline_s=deadline), wall=wall or (lambda: NOW),
                      clock=clock, sleep=clock.sleep)


def test_request_shape_system_assigned() -> None:
    """GET with api-version, resource and Metadata: true; never Authorization."""
    session = FakeSession(json_reply(200, token_body()))
    token = source(session).get_token(RESOURCE)
    assert token.token == TOKEN and token.expires_on == NOW + 86399
    (sent,) = session.sent
    assert sent.url == ENDPOINT
    assert sent.params == {"api-version": "2018-02-01", "resource": RESOURCE}
    assert sent.headers == {"Metadata": "true"}
    assert "Authorization" not in sent.headers


@pytest.mark.parametrize("selector, param", [
    ("client_id", "client_id"), ("object_id", "object_id"), ("resource_id", "msi_res_id"),
])
def test_user_assigned_parameters(selector: str, param: str) -> None:
    """Each manifest selector maps to its IMDS query parameter."""
    session = FakeSession(json_reply(200, token_body()))
    source(session, Identity(selector, "the-id")).get_token(RESOURCE)
    assert session.sent[0].params[param] == "the-id"
    assert len(session.sent[0].params) == 3


def test_token_is_cached_across_calls() -> None:
    """One IMDS request serves every later call until near expiry."""
    session = FakeSession(json_reply(200, token_body()))
    tokens = source(session)
    for _ in range(50):
        tokens.get_token(RESOURCE)
    assert len(session.sent) == 1


def test_token_renewed_five_minutes_before_expiry() -> None:
    """A token with under five minutes left is replaced."""
    wall = [NOW]
    session = FakeSession(json_reply(200, token_body(expires_on=str(int(NOW) + 600),
                                                      expires_in="600")),
                          json_reply(200, token_body()))
    tokens = source(session, wall=lambda: wall[0])
    tokens.get_token(RESOURCE)
    wall[0] = NOW + 299
    tokens.get_token(RESOURCE)
    assert len(session.sent) == 1
    wall[0] = NOW + 301
    tokens.get_token(RESOURCE)
    assert len(session.sent) == 2


def test_long_token_renewed_at_half_life_keeping_old_on_failure() -> None:
    """A 24 h token is renewed after 12 h; if IMDS then fails, the valid one is kept."""
    wall = [NOW]
    session = FakeSession(json_reply(200, token_body()),
                          json_reply(400, {"error": "invalid_request",
                                           "error_description": "Identity not found"}))
    tokens = source(session, wall=lambda: wall[0])
    first = tokens.get_token(RESOURCE)
    wall[0] = NOW + 12.5 * 3600
    assert tokens.get_token(RESOURCE) is first
    assert len(session.sent) == 2


def test_force_refresh_bypasses_cache() -> None:
    """force_refresh asks IMDS again (used after a vault 401)."""
    session = FakeSession(json_reply(200, token_body()), json_reply(200, token_body()))
    tokens = source(session)
    tokens.get_token(RESOURCE)
    tokens.get_token(RESOURCE, force_refresh=True)
    assert len(session.sent) == 2


@pytest.mark.parametrize("content, expected", [
    ({"expires_on": "1700003600"}, 1700003600),
    ({"expires_on": 1700003600}, 1700003600),
    ({"expires_on": "1700003600.0"}, 1700003600),
    ({"expires_in": "3600"}, NOW + 3600),
    ({"expires_in": 3600}, NOW + 3600),
    ({"expires_on": "", "expires_in": "60"}, NOW + 60),
    ({"expires_on": "11/14/2023 22:13:20 +00:00"}, 1700000000),
    ({"expires_on": "11/14/2023 10:13:20 PM +00:00"}, 1700000000),
])
def test_expiry_formats(content: Dict[str, Any], expected: float) -> None:
    """expires_on/expires_in parse from strings, numbers and App Service dates."""
    assert parse_expires_on(content, NOW) == expected


@pytest.mark.parametrize("body", [
    b"not json", b"[]", b'{"expires_in": "60"}', b'{"access_token": "", "expires_in": "1"}',
    b'{"access_token": "eyJ.secret-token-text", "expires_in": "soon"}',
    b'{"access_token": "eyJ.secret-token-text"}',
])
def test_unusable_responses_never_quote_the_token(body: bytes) -> None:
    """A malformed 200 is an error whose text holds no token."""
    session = FakeSession((200, {}, body))
    with pytest.raises(IdentityUnavailableError) as caught:
        source(session).get_token(RESOURCE)
    assert "secret-token-text" not in str(caught.value)


def test_access_token_repr_masks_the_token() -> None:
    """repr() of a token never shows it."""
    text = repr(parse_token_response(b'{"access_token": "secret-token-text", '
                                     b'"expires_in": "3600"}', RESOURCE, NOW))
    assert "secret-token-text" not in text and "****" in text
    assert "secret-token-text" not in repr(AccessToken("secret-token-text", 1.0, RESOURCE))


@pytest.mark.parametrize("status", [404, 410, 429, 500, 503])
def test_transient_statuses_are_retried(status: int) -> None:
    """404, 410, 429 and 5xx are retried with backoff, then succeed."""
    clock = FakeClock()
    session = FakeSession(json_reply(status, {"error": "x"}), json_reply(200, token_body()))
    source(session, clock=clock).get_token(RESOURCE)
    assert len(session.sent) == 2 and len(clock.sleeps) == 1


def test_connection_errors_are_retried() -> None:
    """Connection refused (IMDS not up yet) is retried."""
    clock = FakeClock()
    session = FakeSession(refused(), requests.Timeout("t"), json_reply(200, token_body()))
    source(session, clock=clock).get_token(RESOURCE)
    assert len(session.sent) == 3


def test_retry_after_is_honoured() -> None:
    """A 429 with Retry-After waits exactly that long."""
    clock = FakeClock()
    session = FakeSession(json_reply(429, {"error": "x"}, **{"Retry-After": "7"}),
                          json_reply(200, token_body()))
    source(session, clock=clock).get_token(RESOURCE)
    assert clock.sleeps == [7.0]


def test_retries_are_bounded_in_time() -> None:
    """A dead IMDS ends in IdentityUnavailableError once the budget is spent."""
    clock = FakeClock()
    session = FakeSession(*[refused() for _ in range(100)])
    with pytest.raises(IdentityUnavailableError, match="connection refused") as caught:
        source(session, clock=clock, deadline=30).get_token(RESOURCE)
    assert sum(clock.sleeps) <= 30 + 1e-9
    assert "KV_AGENT_IMDS_ENDPOINT" in str(caught.value)


@pytest.mark.parametrize("identity, fragment", [
    (Identity(), "az vm identity assign -g <group> -n <vm>)"),
    (Identity("client_id", "abc"), "--identities"),
])
def test_400_is_not_retried_and_says_how_to_assign(identity: Identity, fragment: str) -> None:
    """400 (no identity) fails at once with IMDS's words and how to assign one."""
    session = FakeSession(json_reply(400, {"error": "invalid_request",
                                           "error_description": "Identity not found"}))
    with pytest.raises(IdentityRefusedError) as caught:
        source(session, identity).get_token(RESOURCE)
    assert len(session.sent) == 1
    assert "Identity not found" in str(caught.value) and fragment in str(caught.value)


MULTIPLE = ("Multiple user assigned identities exist, please specify the clientId / "
            "resourceId of the identity in the token request")


@pytest.mark.parametrize("answer", [
    json_reply(400, {"error": "invalid_request", "error_description": "Identity not found"}),
    json_reply(400, {"error": "invalid_request", "error_description": MULTIPLE}),
    json_reply(403, {"error": "access_denied", "error_description": "no"}),
    json_reply(405, {}),
], ids=["identity not found", "multiple identities", "403", "405"])
def test_an_imds_4xx_is_an_answer_not_an_outage(answer: Any) -> None:
    """A final 4xx from IMDS is IdentityRefusedError (the sealed cache never hides it),
    still an IdentityUnavailableError for everything else, with exit code 69."""
    with pytest.raises(IdentityRefusedError) as caught:
        source(FakeSession(answer)).get_token(RESOURCE)
    assert isinstance(caught.value, IdentityUnavailableError)
    assert caught.value.exit_code == 69


@pytest.mark.parametrize("answers", [
    [refused() for _ in range(100)],
    [json_reply(503, {"error": "x"}) for _ in range(100)],
    [json_reply(410, {"error": "gone"}) for _ in range(100)],
    [json_reply(200, {"access_token": ""})],
], ids=["refused", "503", "410", "unusable 200"])
def test_no_answer_from_imds_is_an_outage_not_a_refusal(answers: List[Any]) -> None:
    """Connection refused, 5xx or 410 past the budget, a 200 without a token: unavailable,
    never IdentityRefusedError (the sealed cache may stand in for these)."""
    clock = FakeClock()
    with pytest.raises(IdentityUnavailableError) as caught:
        source(FakeSession(*answers), clock=clock, deadline=30).get_token(RESOURCE)
    assert not isinstance(caught.value, IdentityRefusedError)


def test_oversized_body_is_refused() -> None:
    """A response beyond the size bound is not buffered without limit."""
    clock = FakeClock()
    session = FakeSession(*[(200, {}, b"x" * (200 * 1024)) for _ in range(3)])
    with pytest.raises(IdentityUnavailableError, match="too large"):
        source(session, clock=clock, deadline=1).get_token(RESOURCE)


def test_endpoint_from_environment() -> None:
    """KV_AGENT_IMDS_ENDPOINT overrides the link-local default."""
    assert imds_endpoint({}) == DEFAULT_IMDS_ENDPOINT
    assert imds_endpoint({"KV_AGENT_IMDS_ENDPOINT": ENDPOINT}) == ENDPOINT


def test_concurrent_callers_share_one_request() -> None:
    """Sixteen threads asking at once cause one IMDS request."""
    import threading

    session = FakeSession(json_reply(200, token_body()))
    tokens = source(session)
    threads = [threading.Thread(target=tokens.get_token, args=(RESOURCE,)) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(session.sent) == 1


# ---------------------------------------------------------------------------
# Issue 9: untrusted IMDS answers


@pytest.mark.parametrize("body", [
    b'{"access_token": "eyJ.secret-token-text", "expires_on": "1e400"}',
    b'{"access_token": "eyJ.secret-token-text", "expires_on": 1e400}',
    b'{"access_token": "eyJ.secret-token-text", "expires_in": "inf"}',
    b'{"access_token": "eyJ.secret-token-text", "expires_in": "-inf"}',
    b'{"access_token": "eyJ.secret-token-text", "expires_in": "nan"}',
    b'{"access_token": "eyJ.secret-token-text", "expires_in": NaN}',
    b'{"access_token": "eyJ.secret-token-text", "expires_in": Infinity}',
    b'{"access_token": "eyJ.secret-token-text", "expires_in": [1]}',
    b'{"access_token": "eyJ.secret-token-text", "expires_on": {"a": 1}}',
    b'{"access_token": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
    b"[" * 50_000 + b"]" * 50_000,
    b'{"access_token": "eyJ.secret-token-text\\ud800", "expires_in": "60"}',
])
def test_absurd_expiry_and_shapes_are_a_clear_error(body: bytes) -> None:
    """Item 9: infinite, NaN, non-numeric expiries and deep JSON give IdentityUnavailableError
    (or a usable, sanely bounded token), never another exception."""
    try:
        token = source(FakeSession((200, {}, body))).get_token(RESOURCE)
    except IdentityUnavailableError as exc:
        assert "secret-token-text" not in str(exc)
    else:
        assert NOW <= token.expires_on <= NOW + MAX_TOKEN_LIFETIME_S


@pytest.mark.parametrize("content, expected", [
    ({"expires_in": "1e300"}, NOW + MAX_TOKEN_LIFETIME_S),
    ({"expires_on": str(10 ** 30)}, NOW + MAX_TOKEN_LIFETIME_S),
    ({"expires_in": "-3600"}, NOW),
    ({"expires_on": "5"}, NOW),
])
def test_expiry_is_clamped_to_a_sane_range(content: Dict[str, Any], expected: float) -> None:
    """Item 9: an expiry in the past means 'now' (use once); one years away is cut to a week."""
    assert parse_expires_on(content, NOW) == expected


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
    | st.sampled_from(["1e400", "inf", "-inf", "nan", "1e308", "-5", float("inf"), 1e308]),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(expires_on=JSON_VALUES, expires_in=JSON_VALUES,
       numeric=st.one_of(st.floats(), st.integers()).map(str))
def test_parse_expires_on_property(expires_on: Any, expires_in: Any, numeric: str) -> None:
    """Item 9: over arbitrary JSON values, the expiry is finite and within [now, now + a week],
    or ValueError."""
    for content in ({"expires_on": expires_on, "expires_in": expires_in},
                    {"expires_in": expires_in}, {"expires_on": numeric},
                    {"expires_in": numeric}):
        try:
            value = parse_expires_on(content, NOW)
        except ValueError:
            continue
        assert math.isfinite(value) and NOW <= value <= NOW + MAX_TOKEN_LIFETIME_S


@settings(max_examples=300, deadline=None)
@given(content=JSON_VALUES, token=JSON_VALUES, raw=st.binary(max_size=64))
def test_parse_token_response_property(content: Any, token: Any, raw: bytes) -> None:
    """Item 9: any JSON document or bytes yields an AccessToken or ValueError, nothing else."""
    bodies = [json.dumps(content).encode(), raw,
              json.dumps({"access_token": token, "expires_in": content}).encode(),
              json.dumps({"access_token": "t", "expires_on": content,
                          "resource": token}).encode()]
    for body in bodies:
        try:
            parsed = parse_token_response(body, RESOURCE, NOW)
        except ValueError:
            continue
        assert isinstance(parsed, AccessToken) and math.isfinite(parsed.expires_on)
        parsed.resource.encode("utf-8")


def test_imds_error_text_is_escaped() -> None:
    """Item 7: IMDS's error_description reaches messages without control characters."""
    body = {"error": "invalid_request",
            "error_description": "nope\n kv-agent: error: forged\x1b[31m\u202e"}
    with pytest.raises(IdentityUnavailableError) as caught:
        source(FakeSession(json_reply(400, body))).get_token(RESOURCE)
    text = str(caught.value)
    assert "\x1b" not in text and "\n" not in text and "\u202e" not in text
    assert "\\x1b" in text


def test_trickling_imds_is_cut_at_the_total_deadline() -> None:
    """Item 4: IMDS sending its headers one byte a second cannot outlast the retry budget
    plus one bounded final attempt."""
    slow = hostile_response(200, json.dumps(token_body()).encode())
    with HostileServer(trickle(slow, 1.0), tls=False, give_up_s=40) as server:
        factory = ImdsRequestFactory(f"http://127.0.0.1:{server.port}/token", Identity())
        tokens = TokenCache(transport.new_session(1), factory, policy=RetryPolicy(deadline_s=3))
        started = time.monotonic()
        with pytest.raises(IdentityUnavailableError, match="no complete answer"):
            tokens.get_token(RESOURCE)
        elapsed = time.monotonic() - started
    assert elapsed < 3 + MIN_REQUEST_S + 3


# ---------------------------------------------------------------------------
# Issue 10: when (the token cache) apart from how (the request factory)


class ScriptedFactory(RequestFactory):
    """A fake request factory: each reply's meaning comes from a script of
    answers (a token, a follow-up request, a Retry, or an error to raise)."""

    name = "the fake endpoint"
    endpoint = "http://127.0.0.1:9/token"

    def __init__(self, *answers: Any) -> None:
        self.answers = list(answers)
        self.asked: List[str] = []

    def request(self, resource: str) -> TokenRequest:
        self.asked.append(resource)
        return TokenRequest(self.endpoint, {"resource": resource}, {})

    def answer(self, sent: TokenRequest, reply: transport.Reply, resource: str,
               now: float) -> Answer:
        answer = self.answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer  # type: ignore[no-any-return]


def fake_token(lifetime_s: float, resource: str = RESOURCE, now: float = NOW) -> AccessToken:
    return AccessToken(f"token-{lifetime_s}", now + lifetime_s, resource)


def cache(factory: RequestFactory, wall: Any = None, replies: int = 10,
          clock: Optional[FakeClock] = None) -> Tuple[TokenCache, FakeSession]:
    clock = clock or FakeClock()
    session = FakeSession(*[(200, {}, b"{}") for _ in range(replies)])
    tokens = TokenCache(session, factory, policy=RetryPolicy(deadline_s=30),  # type: ignore[arg-type]
                        wall=wall or (lambda: NOW), clock=clock, sleep=clock.sleep)
    return tokens, session


def test_cache_keeps_one_token_per_resource() -> None:
    """Each resource gets its own token, asked for once and then served from the cache."""
    factory = ScriptedFactory(fake_token(86400), fake_token(86400, "https://vault.azure.cn"))
    tokens, _ = cache(factory)
    for _ in range(3):
        assert tokens.get_token(RESOURCE).resource == RESOURCE
        assert tokens.get_token("https://vault.azure.cn").resource == "https://vault.azure.cn"
    assert factory.asked == [RESOURCE, "https://vault.azure.cn"]


def test_cache_margin_is_five_minutes_on_the_injected_wall_clock() -> None:
    """A token is reused until 300 s before it expires, measured on the injected clock."""
    wall = [NOW]
    factory = ScriptedFactory(fake_token(1000), fake_token(1000, now=NOW + 700))
    tokens, _ = cache(factory, wall=lambda: wall[0])
    first = tokens.get_token(RESOURCE)
    wall[0] = NOW + 699
    assert tokens.get_token(RESOURCE) is first
    wall[0] = NOW + 700
    assert tokens.get_token(RESOURCE) is not first
    assert len(factory.asked) == 2


def test_short_token_is_never_renewed_early() -> None:
    """A token living under two hours has no half-life renewal: only the margin applies."""
    wall = [NOW]
    factory = ScriptedFactory(fake_token(3600))
    tokens, _ = cache(factory, wall=lambda: wall[0])
    first = tokens.get_token(RESOURCE)
    assert first.refresh_on == 0
    wall[0] = NOW + 3000
    assert tokens.get_token(RESOURCE) is first


def test_half_life_renewal_replaces_the_token_when_it_succeeds() -> None:
    """At half-life a long token is renewed, and the new token is served from then on."""
    wall = [NOW]
    renewed = fake_token(86400, now=NOW + 43300)
    factory = ScriptedFactory(fake_token(86400), renewed)
    tokens, _ = cache(factory, wall=lambda: wall[0])
    first = tokens.get_token(RESOURCE)
    assert first.refresh_on == NOW + 43200
    wall[0] = NOW + 43199
    assert tokens.get_token(RESOURCE) is first
    wall[0] = NOW + 43300
    assert tokens.get_token(RESOURCE).token == renewed.token
    assert tokens.get_token(RESOURCE).token == renewed.token
    assert len(factory.asked) == 2


def test_failed_half_life_renewal_keeps_the_valid_token(caplog: pytest.LogCaptureFixture) -> None:
    """A renewal that fails serves the still-valid token and logs one warning without it."""
    wall = [NOW]
    factory = ScriptedFactory(fake_token(86400), IdentityUnavailableError("endpoint down"))
    tokens, _ = cache(factory, wall=lambda: wall[0])
    first = tokens.get_token(RESOURCE)
    wall[0] = NOW + 50000
    with caplog.at_level("WARNING"):
        assert tokens.get_token(RESOURCE) is first
    assert "endpoint down" in caplog.text and first.token not in caplog.text


def test_expired_token_failure_is_raised_not_hidden() -> None:
    """Past the margin there is nothing valid to fall back on: the error reaches the caller."""
    wall = [NOW]
    factory = ScriptedFactory(fake_token(86400), IdentityUnavailableError("endpoint down"))
    tokens, _ = cache(factory, wall=lambda: wall[0])
    tokens.get_token(RESOURCE)
    wall[0] = NOW + 86400 - 299
    with pytest.raises(IdentityUnavailableError, match="endpoint down"):
        tokens.get_token(RESOURCE)


def test_endpoint_refresh_on_is_kept() -> None:
    """An endpoint that says when to renew is believed; the cache computes it otherwise."""
    token = AccessToken("t", NOW + 86400, RESOURCE, refresh_on=NOW + 60)
    assert with_refresh_on(token, NOW) is token
    assert with_refresh_on(token._replace(refresh_on=0), NOW).refresh_on == NOW + 43200
    assert with_refresh_on(AccessToken("t", NOW + 7199, RESOURCE), NOW).refresh_on == 0


def test_concurrent_callers_for_a_slow_endpoint_share_one_request() -> None:
    """Callers that arrive while a request is in flight wait for it instead of asking again."""
    import threading

    class SlowFactory(ScriptedFactory):
        def answer(self, *args: Any) -> Answer:
            time.sleep(0.05)
            return super().answer(*args)

    factory = SlowFactory(fake_token(86400))
    tokens, _ = cache(factory)
    got: List[AccessToken] = []
    threads = [threading.Thread(target=lambda: got.append(tokens.get_token(RESOURCE)))
               for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(factory.asked) == 1 and len(set(got)) == 1


def test_follow_up_request_is_sent_at_once_with_its_headers() -> None:
    """A factory may answer a challenge with a follow-up request (Azure Arc's key file):
    it is sent at once, without a backoff sleep, and its headers never show in a repr."""
    answered = TokenRequest("http://127.0.0.1:9/token", {"resource": RESOURCE},
                            {"Authorization": "Basic key-file-secret"})
    clock = FakeClock()
    factory = ScriptedFactory(answered, fake_token(86400))
    tokens, session = cache(factory, clock=clock)
    assert tokens.get_token(RESOURCE).token == "token-86400"
    assert [sent.headers for sent in session.sent] == [{}, {"Authorization": "Basic key-file-secret"}]
    assert clock.sleeps == []
    assert "key-file-secret" not in repr(answered) and "Authorization" in repr(answered)


def test_retry_answers_back_off_then_name_the_endpoint() -> None:
    """A Retry answer sleeps (Retry-After first) and, once the budget is spent, fails
    naming the endpoint, the status and its words."""
    clock = FakeClock()
    factory = ScriptedFactory(*[Retry(503, "busy", retry_after=7.0) for _ in range(20)])
    tokens, _ = cache(factory, clock=clock, replies=20)
    with pytest.raises(IdentityUnavailableError,
                       match=r"the fake endpoint kept answering HTTP 503 \(busy\)"):
        tokens.get_token(RESOURCE)
    assert clock.sleeps[0] == 7.0 and sum(clock.sleeps) <= 30


def test_imds_factory_request_shape() -> None:
    """The IMDS factory builds a GET of the endpoint with api-version, resource, the
    selector's IMDS name and Metadata: true, and nothing else (pure, no I/O)."""
    request = ImdsRequestFactory(ENDPOINT, Identity("resource_id", "/sub/x")).request(RESOURCE)
    assert request == TokenRequest(
        ENDPOINT, {"api-version": "2018-02-01", "resource": RESOURCE, "msi_res_id": "/sub/x"},
        {"Metadata": "true"})
    assert ImdsRequestFactory(ENDPOINT, Identity()).request(RESOURCE).params == {
        "api-version": "2018-02-01", "resource": RESOURCE}


def reply(status: int, content: Any, **headers: str) -> transport.Reply:
    return transport.Reply(status, CaseInsensitiveDict(headers), json.dumps(content).encode())


def test_imds_factory_answers() -> None:
    """200 is a token; 404/410/429/5xx are Retry with Retry-After and IMDS's words; 400 and
    other statuses raise at once with the fix."""
    factory = ImdsRequestFactory(ENDPOINT, Identity())
    sent = factory.request(RESOURCE)
    token = factory.answer(sent, reply(200, token_body()), RESOURCE, NOW)
    assert isinstance(token, AccessToken) and token.token == TOKEN and token.refresh_on == 0
    assert factory.answer(sent, reply(429, {"error": "x", "error_description": "slow down"},
                                      **{"Retry-After": "7"}), RESOURCE, NOW) == \
        Retry(429, "slow down", 7.0)
    assert factory.answer(sent, reply(410, {}), RESOURCE, NOW) == Retry(410, "", None)
    with pytest.raises(IdentityUnavailableError, match="system-assigned") as caught:
        factory.answer(sent, reply(400, {"error_description": "Identity not found"}),
                       RESOURCE, NOW)
    assert caught.value.hint and "az vm identity assign" in caught.value.hint
    with pytest.raises(IdentityUnavailableError, match="HTTP 403"):
        factory.answer(sent, reply(403, {}), RESOURCE, NOW)


def test_token_source_asks_imds_at_the_configured_endpoint_without_a_proxy(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """token_source() is the agent's one way in: IMDS at KV_AGENT_IMDS_ENDPOINT, over a
    session that ignores the process's proxy variables, with a cache in front."""
    from agent.emulator import Emulator

    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    for name in ("http_proxy", "HTTP_PROXY", "all_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")  # nothing listens there
    with Emulator({"db": "v"}) as emulator:
        tokens = token_source(Identity(), {"KV_AGENT_IMDS_ENDPOINT": emulator.imds_endpoint},
                              RetryPolicy(deadline_s=2))
        try:
            first = tokens.get_token(RESOURCE)
            assert tokens.get_token(RESOURCE) is first
        finally:
            tokens.close()
        assert emulator.imds_requests == 1


def test_endless_challenges_are_bounded() -> None:
    """A factory that keeps answering with follow-up requests is stopped after a few."""
    follow_up = TokenRequest("http://127.0.0.1:9/token", {}, {"Authorization": "Basic k"})
    factory = ScriptedFactory(*[follow_up for _ in range(10)])
    tokens, session = cache(factory)
    with pytest.raises(IdentityUnavailableError, match="kept challenging"):
        tokens.get_token(RESOURCE)
    assert len(session.sent) == 4


# -- which source ----------------------------------------------------------

ARC_FILE = "/opt/azcmagent/bin/himds"
SOURCE_TABLE = [
    # (manifest source, environment, Arc agent files present, expected source)
    ("auto", {}, (), "imds"),
    ("auto", {"IDENTITY_ENDPOINT": "e", "IDENTITY_HEADER": "h"}, (), "app-service"),
    ("auto", {"IDENTITY_ENDPOINT": "e", "IDENTITY_HEADER": "h", "IMDS_ENDPOINT": "i"},
     (ARC_FILE,), "app-service"),
    ("auto", {"IDENTITY_ENDPOINT": "e", "IMDS_ENDPOINT": "i"}, (), "arc"),
    ("auto", {}, (ARC_FILE,), "arc"),
    ("auto", {}, ("/var/opt/azcmagent",), "arc"),
    ("auto", {"IDENTITY_ENDPOINT": "e"}, (), "imds"),  # half an environment is neither
    ("auto", {"IDENTITY_HEADER": "h"}, (), "imds"),
    ("auto", {"IMDS_ENDPOINT": "i"}, (), "imds"),
    ("imds", {"IDENTITY_ENDPOINT": "e", "IDENTITY_HEADER": "h"}, (ARC_FILE,), "imds"),
    ("arc", {}, (), "arc"),
    ("app-service", {}, (ARC_FILE,), "app-service"),
]


@pytest.mark.parametrize("requested, environ, present, expected", SOURCE_TABLE)
def test_choose_source_table(requested: str, environ: Dict[str, str], present: Tuple[str, ...],
                             expected: str) -> None:
    """auto picks App Service, then Arc (environment or agent files), then IMDS; an
    explicit source wins; the reason names what decided it."""
    from agent.identity.tokens import choose_source

    choice = choose_source(requested, environ, exists=lambda path: path in present)
    assert choice.source == expected
    if requested != "auto":
        assert choice.reason == "identity.source in the manifest"
    elif expected == "arc" and present and "IMDS_ENDPOINT" not in environ:
        assert present[0] in choice.reason
    assert choice.describe().startswith(expected + " (")


@pytest.mark.parametrize("requested, environ, factory_name", [
    ("auto", {}, "ImdsRequestFactory"),
    ("auto", {"IDENTITY_ENDPOINT": "http://127.0.0.1:9/t", "IDENTITY_HEADER": "h"},
     "AppServiceRequestFactory"),
    ("auto", {"IDENTITY_ENDPOINT": "http://127.0.0.1:9/t", "IMDS_ENDPOINT": "x"},
     "ArcRequestFactory"),
    ("arc", {}, "ArcRequestFactory"),
])
def test_token_source_builds_the_chosen_factory(requested: str, environ: Dict[str, str],
                                                factory_name: str) -> None:
    """token_source exposes its choice as .source and asks that endpoint (Arc without
    IDENTITY_ENDPOINT asks the agent's local default)."""
    tokens = token_source(Identity(source=requested), environ, exists=lambda path: False)
    try:
        assert type(tokens._factory).__name__ == factory_name
        assert tokens.source.source in factory_name.lower().replace("appservice", "app-service")
        if requested == "arc":
            assert tokens._factory.endpoint == "http://localhost:40342/metadata/identity/oauth2/token"
    finally:
        tokens.close()


@pytest.mark.parametrize("source", ["imds", "arc", "app-service"])
def test_a_200_without_a_usable_token_is_a_refusal_naming_the_source(source: str) -> None:
    """Every source reads a 200 through RequestFactory.token: no token in it is a
    refusal naming the source and its own fix, never quoting the body."""
    from agent.identity.app_service import AppServiceRequestFactory
    from agent.identity.arc import ArcRequestFactory

    factory = {
        "imds": lambda: ImdsRequestFactory(ENDPOINT, Identity()),
        "arc": lambda: ArcRequestFactory(ENDPOINT, Identity(), "/t"),
        "app-service": lambda: AppServiceRequestFactory(ENDPOINT, "hdr-" + "x" * 20, Identity()),
    }[source]()
    body = json.dumps({"token_type": "Bearer", "access_tokn": "eyJsecret"}).encode()
    reply = transport.Reply(200, CaseInsensitiveDict(), body)
    with pytest.raises(IdentityUnavailableError) as caught:
        factory.answer(factory.request(RESOURCE), reply, RESOURCE, NOW)
    assert caught.value.message.startswith(f"{factory.name} returned an unusable token response")
    assert caught.value.hint == factory.unusable_hint and "retry later" in caught.value.hint
    assert "eyJsecret" not in caught.value.message + caught.value.hint


@pytest.mark.parametrize("status, is_refused", [(400, True), (401, True), (403, True),
                                                (404, True), (200, False), (500, False)])
def test_the_send_loop_alone_judges_a_refusal_by_the_replys_status(
        status: int, is_refused: bool) -> None:
    """Every source's final error after a 4xx reply is an IdentityRefusedError, decided once
    in request_token (a source need not remember: Arc's 401 without a challenge was
    missed when each did); after any other reply it stays an outage."""
    error = IdentityUnavailableError("the fake endpoint said no", "the fix")
    clock = FakeClock()
    session = FakeSession((status, {}, b"{}"))
    tokens = TokenCache(session, ScriptedFactory(error),  # type: ignore[arg-type]
                        policy=RetryPolicy(deadline_s=30), wall=lambda: NOW, clock=clock,
                        sleep=clock.sleep)
    with pytest.raises(IdentityUnavailableError) as caught:
        tokens.get_token(RESOURCE)
    assert isinstance(caught.value, IdentityRefusedError) is is_refused
    assert (caught.value.message, caught.value.hint) == ("the fake endpoint said no", "the fix")
