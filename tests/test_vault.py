"""Key Vault client: where tokens go, errors per secret, retries, concurrency."""

from __future__ import annotations

import json
import threading
import time
import tracemalloc
from typing import Any, Dict, List, Optional, Tuple

import pytest
import requests
from fakes import FakeClock, FakeResponse, FakeSession, json_reply, refused
from hostile import HostileServer, answer, gzip_bomb, loopback_443_server, trickle
from hostile import response as hostile_response

from agent.base.errors import (
    EXIT_CONFIG,
    IdentityUnavailableError,
    KvAgentError,
    SecretNotFoundError,
    VaultError,
    VaultForbiddenError,
    VaultThrottledError,
    VaultUnavailableError,
)
from agent.base.retry import MIN_REQUEST_S, REFRESH_RETRY, Backoff, RetryPolicy
from agent.pipeline.sources import Source
from agent.vault.audience import (
    KNOWN_AUDIENCES,
    audience_for_host,
    audience_from_challenge,
    parse_challenge,
)
from agent.vault.client import (
    ARRIVAL_BATCH,
    Secret,
    VaultClient,
    ca_bundle,
    new_session,
    parse_http_date,
    proxies_for,
    secret_url,
)
from agent.vault.url import vault_label

VAULT = "https://contoso.vault.azure.net"
LOCAL = "https://127.0.0.1:8443"
CHALLENGE = ('Bearer authorization="https://login.windows.net/00000000-0000-0000-0000-'
             '000000000000", resource="https://vault.azure.net"')
VERSION = "41cce6796d81438f9dad0d96bf85d50d"


def bundle(value: str = "s3cr3t", name: str = "db",
           vault: str = VAULT) -> Tuple[int, Dict[str, str], bytes]:
    return json_reply(200, {"value": value, "id": f"{vault}/secrets/{name}/{VERSION}",
                            "attributes": {"enabled": True}})


def error(status: int, code: str, inner: Optional[str] = None, **headers: str) -> Any:
    body: Dict[str, Any] = {"error": {"code": code, "message": f"{code} happened"}}
    if inner:
        body["error"]["innererror"] = {"code": inner}
    return json_reply(status, body, **headers)


class Tokens:
    """A token provider that records what was asked."""

    def __init__(self) -> None:
        self.calls: List[Tuple[str, bool]] = []

    def __call__(self, resource: str, force: bool) -> str:
        self.calls.append((resource, force))
        return f"token-{len(self.calls)}"


def client(session: Any, tokens: Optional[Tokens] = None, deadline: float = 30,
           clock: Optional[FakeClock] = None) -> VaultClient:
    clock = clock or FakeClock()
    return VaultClient(session, tokens or Tokens(), policy=RetryPolicy(deadline_s=deadline),
                       clock=clock, sleep=clock.sleep)


@pytest.mark.parametrize("host, audience", [
    ("contoso.vault.azure.net", "https://vault.azure.net"),
    ("Contoso.Vault.Azure.Net.", "https://vault.azure.net"),
    ("kv.vault.usgovcloudapi.net", "https://vault.usgovcloudapi.net"),
    ("kv.vault.azure.cn", "https://vault.azure.cn"),
    ("kv.vault.microsoftazure.de", "https://vault.microsoftazure.de"),
    ("vault.azure.net.evil.com", None),
    ("evilvault.azure.net", None),
    ("127.0.0.1", None),
])
def test_audience_from_dns_suffix(host: str, audience: Optional[str]) -> None:
    """Known cloud suffixes map to their audience; look-alikes do not."""
    assert audience_for_host(host) == audience


def test_known_cloud_vault_needs_no_challenge() -> None:
    """A *.vault.azure.net vault gets the public audience without a 401 round trip."""
    session = FakeSession(bundle())
    tokens = Tokens()
    secret = client(session, tokens).fetch_secret(Source(VAULT, "db"))
    assert secret[:4] == ("db", VERSION, b"s3cr3t", None)
    assert tokens.calls == [("https://vault.azure.net", False)]
    (sent,) = session.sent
    assert sent.url == f"{VAULT}/secrets/db"
    assert sent.params == {"api-version": "7.6"}
    assert sent.headers["Authorization"] == "Bearer token-1"


def test_loopback_vault_uses_the_challenge() -> None:
    """On loopback the first request is unauthenticated and the challenge names the audience."""
    session = FakeSession(error(401, "Unauthorized", **{"WWW-Authenticate": CHALLENGE}),
                          bundle(vault=LOCAL))
    tokens = Tokens()
    client(session, tokens).fetch_secret(Source(LOCAL, "db"))
    assert "Authorization" not in session.sent[0].headers
    assert session.sent[1].headers["Authorization"] == "Bearer token-1"
    assert tokens.calls == [("https://vault.azure.net", False)]


@pytest.mark.parametrize("challenge", [
    'Bearer authorization="https://login.windows.net/t", resource="https://management.azure.com"',
    'Bearer authorization="https://login.windows.net/t", resource="https://vault.azure.net.evil"',
    'Basic realm="x"',
    "",
])
def test_untrusted_challenge_gets_no_token(challenge: str) -> None:
    """A challenge for anything but a Key Vault audience is refused; no token is fetched."""
    headers = {"WWW-Authenticate": challenge} if challenge else {}
    session = FakeSession((401, headers, b""))
    tokens = Tokens()
    with pytest.raises(VaultError):
        client(session, tokens).fetch_secret(Source(LOCAL, "db"))
    assert tokens.calls == []


def test_unknown_host_is_refused_even_with_a_vault_challenge() -> None:
    """A non-loopback host outside the audience's domain never gets a token."""
    with pytest.raises(VaultError, match="not under vault.azure.net"):
        audience_from_challenge("kv.example.com", CHALLENGE)
    assert audience_from_challenge("127.0.0.1", CHALLENGE) == "https://vault.azure.net"
    assert audience_from_challenge("localhost", CHALLENGE.replace(
        'resource="https://vault.azure.net"', 'scope="https://vault.azure.net/.default"')
    ) == "https://vault.azure.net"


def test_parse_challenge() -> None:
    """Bearer parameters parse with quotes stripped and keys lower-cased."""
    assert parse_challenge(CHALLENGE) == {
        "authorization": "https://login.windows.net/00000000-0000-0000-0000-000000000000",
        "resource": "https://vault.azure.net"}
    assert parse_challenge('Basic realm="x"') == {}


def test_version_and_names_are_quoted_in_the_url() -> None:
    """A pinned version is a path segment; names cannot inject path parts."""
    assert secret_url(VAULT, "db", VERSION) == f"{VAULT}/secrets/db/{VERSION}"
    assert secret_url(VAULT, "a/b", None) == f"{VAULT}/secrets/a%2Fb"


def test_value_is_returned_byte_for_byte() -> None:
    """Unicode, newlines and trailing spaces survive as UTF-8 bytes, nothing added."""
    value = "pässwörd\n  with trailing  \n"
    secret = client(FakeSession(bundle(value))).fetch_secret(Source(VAULT, "db"))
    assert secret.value == value.encode("utf-8")
    assert "pässwörd" not in repr(secret)


def test_401_gets_one_fresh_token() -> None:
    """A 401 with a token forces one new token, then succeeds."""
    session = FakeSession(error(401, "Unauthorized"), bundle())
    tokens = Tokens()
    client(session, tokens).fetch_secret(Source(VAULT, "db"))
    assert tokens.calls == [("https://vault.azure.net", False), ("https://vault.azure.net", True),
                            ("https://vault.azure.net", False)]


def test_second_401_is_an_error() -> None:
    """Two 401s in a row end with an error naming the secret."""
    session = FakeSession(error(401, "Unauthorized"), error(401, "Unauthorized"))
    with pytest.raises(VaultError, match="'db'.*401"):
        client(session).fetch_secret(Source(VAULT, "db"))
    assert len(session.sent) == 2


@pytest.mark.parametrize("reply, kind, fragments", [
    (error(404, "SecretNotFound"), SecretNotFoundError, ["'db'", "not found", "check the name"]),
    (error(403, "Forbidden", "SecretDisabled"), VaultForbiddenError, ["disabled", "enable it"]),
    (error(403, "Forbidden", "AccessDenied"), VaultForbiddenError,
     ["permission denied", "Key Vault Secrets User", "access policy"]),
    (error(403, "Forbidden", "ForbiddenByRbac"), VaultForbiddenError, ["Key Vault Secrets User"]),
    (error(403, "Forbidden", "ForbiddenByFirewall"), VaultForbiddenError, ["firewall"]),
    (error(400, "BadParameter"), VaultError, ["'db'", "400", "BadParameter"]),
])
def test_per_secret_errors_name_secret_and_fix(reply: Any, kind: type,
                                               fragments: List[str]) -> None:
    """403 and 404 are per-secret errors worded with the fix, not retried."""
    session = FakeSession(reply)
    with pytest.raises(kind) as caught:
        client(session).fetch_secret(Source(VAULT, "db"))
    for fragment in fragments:
        assert fragment in str(caught.value)
    assert len(session.sent) == 1


@pytest.mark.parametrize("value, expected", [
    ("Sun, 06 Nov 1994 08:49:37 GMT", 784111777.0),
    ("Sunday, 06-Nov-94 08:49:37 GMT", 784111777.0),
    ("Sun, 06 Nov 1994 10:49:37 +0200", 784111777.0),
    (None, None), ("", None), ("soon", None), ("Sun, 06 Nov", None),
    ("Fri, 31 Dec 99999 23:59:59 GMT", None), ("Thu, 01 Jan 1900 00:00:00 GMT", None),
    ("Sun, 06 Nov 1994 08:49:37 GMT" + " " * 100, None),
])
def test_a_date_header_parses_defensively(value: Optional[str],
                                          expected: Optional[float]) -> None:
    """The vault's Date header gives epoch seconds; absent, junk, overlong or out-of-range
    dates give None, never an exception."""
    assert parse_http_date(value) == expected


def test_a_fetched_secret_carries_the_vaults_date() -> None:
    """fetch_secret keeps the Date of the vault's answer (its clock) on the Secret."""
    status, headers, body = bundle()
    session = FakeSession((status, {**headers, "Date": "Sun, 06 Nov 1994 08:49:37 GMT"}, body))
    assert client(session).fetch_secret(Source(VAULT, "db")).answered_at == 784111777.0


def test_redirect_is_not_followed() -> None:
    """A 3xx is an error; the token never travels to the Location."""
    session = FakeSession((302, {"Location": "https://evil.example/steal"}, b""))
    with pytest.raises(VaultError, match="redirect"):
        client(session).fetch_secret(Source(VAULT, "db"))
    assert [s.url for s in session.sent] == [f"{VAULT}/secrets/db"]


def test_429_honours_retry_after() -> None:
    """Throttling waits Retry-After seconds, then succeeds."""
    clock = FakeClock()
    session = FakeSession(error(429, "Throttled", **{"Retry-After": "3"}), bundle())
    client(session, clock=clock).fetch_secret(Source(VAULT, "db"))
    assert clock.sleeps == [3.0]


def test_429_without_retry_after_backs_off_then_gives_up() -> None:
    """Persistent throttling ends in VaultThrottledError within the budget (30 s: the
    pause after a second 429 in a row is a 10-s window, agent.vault.pacing.PAUSE_BASE_S)."""
    clock = FakeClock()
    session = FakeSession(*[error(429, "Throttled") for _ in range(50)])
    with pytest.raises(VaultThrottledError):
        client(session, clock=clock, deadline=30).fetch_secret(Source(VAULT, "db"))
    assert 1 < len(clock.sleeps) and sum(clock.sleeps) <= 30 + 1e-9


def test_a_retry_after_pauses_the_other_requests_to_that_vault() -> None:
    """While one request waits out a 429's Retry-After, another request to the same
    vault is not sent before that time either (one pause per vault, not per thread),
    and the first one sent after it (the probe) ends the pause for all."""
    clock = FakeClock()
    session = FakeSession(error(429, "Throttled", **{"Retry-After": "20"}), bundle(name="b"),
                          bundle())
    sent_at: List[float] = []
    original = session.get

    def get(*args: Any, **kwargs: Any) -> Any:
        sent_at.append(clock.now)
        return original(*args, **kwargs)

    session.get = get
    vault = VaultClient(session, Tokens(), policy=RetryPolicy(deadline_s=30), clock=clock,
                        sleep=clock.sleep, on_retry=lambda *_: other.append(
                            vault.fetch_secret(Source(VAULT, "b"))))
    other: List[Secret] = []
    assert vault.fetch_secret(Source(VAULT, "db")).value == b"s3cr3t"
    assert other[0].name == "b"
    start = sent_at[0]
    assert [at - start for at in sent_at] == [0.0, 20.0, 40.0]  # b waited for db's pause
    assert clock.sleeps == [20.0, 20.0]


@pytest.mark.parametrize("status, code", [(429, "Throttled"), (503, "ServiceUnavailable")])
def test_a_429_or_503_without_retry_after_pauses_the_other_requests_too(
        status: int, code: str) -> None:
    """Key Vault's 429 may carry no Retry-After, an unavailable vault's 503 neither:
    either still pauses this agent's other requests to the vault for the backoff step,
    not only the one that got it."""
    clock = FakeClock()
    session = FakeSession(error(status, code), bundle(name="b"), bundle())
    sent_at: List[float] = []
    original = session.get

    def get(*args: Any, **kwargs: Any) -> Any:
        sent_at.append(clock.now)
        return original(*args, **kwargs)

    session.get = get
    other: List[Secret] = []
    vault = VaultClient(session, Tokens(), policy=RetryPolicy(deadline_s=30), clock=clock,
                        sleep=clock.sleep, on_retry=lambda *_: other.append(
                            vault.fetch_secret(Source(VAULT, "b"))))
    vault.fetch_secret(Source(VAULT, "db"))
    assert other and sent_at[1] - sent_at[0] >= 0.25  # b waited out db's pause


@pytest.mark.parametrize("is_slow_start", [False, True])
def test_a_slow_start_client_sends_its_first_request_alone(is_slow_start: bool) -> None:
    """With is_slow_start (the daemon) the first request to a vault is alone in flight,
    and the rest follow once it is answered; without, the first wave goes at once."""
    lock = threading.Lock()
    in_flight = [0]
    seen: List[int] = []

    class Session(FakeSession):
        def get(self, *args: Any, **kwargs: Any) -> Any:
            with lock:
                in_flight[0] += 1
                seen.append(in_flight[0])
            time.sleep(0.05)
            try:
                return super().get(*args, **kwargs)
            finally:
                with lock:
                    in_flight[0] -= 1

    session = Session(*[bundle(name=f"s{n}") for n in range(8)])
    vault = VaultClient(session, Tokens(), policy=RetryPolicy(deadline_s=30),
                        is_slow_start=is_slow_start)
    outcomes = vault.fetch_many([Source(VAULT, f"s{n}") for n in range(8)])
    assert all(isinstance(outcome, Secret) for outcome in outcomes)
    assert (seen[0] == 1 and max(seen[:2]) == 1) is is_slow_start


def test_a_slow_start_wait_past_the_budget_sends_rather_than_fails() -> None:
    """Held back by the slow start alone (no vault said wait) past its tiny budget, a
    request is sent anyway, never failed without an answer of the vault's."""

    class Slow(FakeSession):
        def get(self, *args: Any, **kwargs: Any) -> Any:
            time.sleep(0.3)
            return super().get(*args, **kwargs)

    session = Slow(bundle(name="a"), bundle(name="b"))
    vault = VaultClient(session, Tokens(), policy=RetryPolicy(deadline_s=0.1),
                        is_slow_start=True)
    outcomes = vault.fetch_many([Source(VAULT, "a"), Source(VAULT, "b")])
    assert all(isinstance(outcome, Secret) for outcome in outcomes), outcomes


def test_a_refresh_request_whose_budget_ends_within_the_pause_is_not_sent() -> None:
    """In the running agent (REFRESH_RETRY), a Retry-After longer than another request's
    budget ends that request as throttled (429) without sending it: the vault said not
    before, and the lifecycle retries the refresh later."""
    clock = FakeClock()
    session = FakeSession(error(429, "Throttled", **{"Retry-After": "50"}), bundle())
    vault = VaultClient(session, Tokens(), policy=REFRESH_RETRY, clock=clock,
                        sleep=clock.sleep)
    with pytest.raises(VaultThrottledError):
        vault.fetch_secret(Source(VAULT, "db"))
    with pytest.raises(VaultThrottledError):
        vault.fetch_secret(Source(VAULT, "other"))
    assert [sent.url for sent in session.sent] == [f"{VAULT}/secrets/db"]
    assert clock.sleeps == []


def test_once_sleeps_a_pause_past_its_budget_to_the_deadline_then_sends_once() -> None:
    """With the final attempt kept (kv-agent once), a Retry-After longer than the time
    left is slept up to the deadline and the request is sent then, once (issue 17,
    item 9): the vault that is back by then answers it."""
    clock = FakeClock()
    session = FakeSession(error(503, "ServiceUnavailable", **{"Retry-After": "50"}),
                          bundle())
    vault = client(session, clock=clock, deadline=15)
    assert vault.fetch_secret(Source(VAULT, "db")).value == b"s3cr3t"
    assert clock.sleeps == [15.0]
    assert len(session.sent) == 2


def test_a_second_request_held_by_a_pause_past_its_budget_is_sent_at_its_deadline() -> None:
    """Held back before its first send by another request's pause that outlasts its
    budget, a once request sleeps to its own deadline and is sent then, not failed."""
    clock = FakeClock()
    session = FakeSession(error(429, "Throttled", **{"Retry-After": "50"}), bundle(),
                          bundle(name="other"))
    vault = client(session, clock=clock, deadline=30)
    assert vault.fetch_secret(Source(VAULT, "db")).value == b"s3cr3t"
    paused_at = clock.now
    vault.pacing.pause(VAULT).throttled(paused_at, 50.0)
    assert vault.fetch_secret(Source(VAULT, "other")).name == "other"
    assert clock.now - paused_at == pytest.approx(30.0)


@pytest.mark.parametrize("failure", [error(500, "InternalError"), error(503, "Unavailable"),
                                     refused(), requests.Timeout("t")])
def test_transient_failures_are_retried(failure: Any) -> None:
    """5xx, refused connections and timeouts are retried."""
    session = FakeSession(failure, bundle())
    assert client(session).fetch_secret(Source(VAULT, "db")).value == b"s3cr3t"


def test_tls_failure_is_not_retried() -> None:
    """A certificate problem fails at once with the CA hint."""
    session = FakeSession(requests.exceptions.SSLError("certificate verify failed"))
    with pytest.raises(VaultUnavailableError, match="REQUESTS_CA_BUNDLE"):
        client(session).fetch_secret(Source(VAULT, "db"))
    assert len(session.sent) == 1


def test_oversized_response_is_refused() -> None:
    """A body beyond the bound fails the secret instead of filling memory."""
    session = FakeSession(*[(200, {}, b"x" * (512 * 1024)) for _ in range(50)])
    with pytest.raises(VaultError):
        client(session, deadline=1).fetch_secret(Source(VAULT, "db"))


def test_unusable_bundle_never_quotes_the_body() -> None:
    """A 200 without a string value is an error that does not echo the body."""
    session = FakeSession((200, {}, b'{"value": 5, "note": "s3cr3t"}'))
    with pytest.raises(VaultError) as caught:
        client(session).fetch_secret(Source(VAULT, "db"))
    assert "s3cr3t" not in str(caught.value)


class RoutingSession:
    """Thread-safe fake answering by secret name, with a per-request delay."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.lock = threading.Lock()
        self.urls: List[str] = []
        self.active = 0
        self.peak = 0

    def get(self, url: str, **kwargs: Any) -> FakeResponse:
        with self.lock:
            self.urls.append(url)
            self.active += 1
            self.peak = max(self.peak, self.active)
        time.sleep(self.delay_s)
        with self.lock:
            self.active -= 1
        name = url.rsplit("/", 1)[-1]
        if name.startswith("missing"):
            return FakeResponse(*error(404, "SecretNotFound"))
        body = {"value": f"v-{name}", "id": f"{VAULT}/secrets/{name}/{VERSION}"}
        return FakeResponse(200, {}, json.dumps(body).encode())


def test_fetch_many_is_concurrent_bounded_and_ordered() -> None:
    """100 fetches overlap (at most 16 at once), keep order, and one failure stays local."""
    session = RoutingSession(delay_s=0.02)
    names = [f"s{i}" for i in range(100)]
    names[37] = "missing-37"
    tokens = Tokens()
    started = time.monotonic()
    outcomes = client(session, tokens).fetch_many([Source(VAULT, n) for n in names])
    elapsed = time.monotonic() - started
    assert session.peak == 16
    assert elapsed < 100 * 0.02 / 3  # far from one request after another
    assert isinstance(outcomes[37], SecretNotFoundError)
    assert [o.value for i, o in enumerate(outcomes) if i != 37] == [  # type: ignore[union-attr]
        f"v-{n}".encode() for i, n in enumerate(names) if i != 37]
    assert all(resource == KNOWN_AUDIENCES["vault.azure.net"] for resource, _ in tokens.calls)


def test_fetch_each_hands_over_a_batch_while_a_later_request_is_unanswered() -> None:
    """The first ARRIVAL_BATCH outcomes come out of fetch_each, in order, while a later
    request is still unanswered (the agent writes them meanwhile: issue 17, item 20)."""
    release = threading.Event()

    class Holding(RoutingSession):
        def get(self, url: str, **kwargs: Any) -> FakeResponse:
            if url.endswith("/held"):
                release.wait(5.0)
            return super().get(url, **kwargs)

    names = [f"s{i}" for i in range(ARRIVAL_BATCH)] + ["held"]
    outcomes = client(Holding()).fetch_each([Source(VAULT, n) for n in names])
    try:
        first = [next(outcomes) for _ in range(ARRIVAL_BATCH)]
        was_held = not release.is_set()
    finally:
        release.set()
    rest = list(outcomes)
    assert was_held
    assert [o.value for o in first + rest] == [  # type: ignore[union-attr]
        f"v-{n}".encode() for n in names]


def test_closing_fetch_each_early_sends_no_more_requests() -> None:
    """Closing fetch_each after its first batch (a stop) cancels the requests not yet
    sent: far fewer than all are sent."""
    session = RoutingSession(delay_s=0.01)
    outcomes = client(session).fetch_each([Source(VAULT, f"s{i}") for i in range(400)])
    assert next(outcomes).value == b"v-s0"  # type: ignore[union-attr]
    outcomes.close()
    sent = len(session.urls)
    time.sleep(0.1)
    assert len(session.urls) == sent < 200


def test_fetch_many_settles_the_token_before_fanning_out() -> None:
    """An IMDS failure surfaces once, before any vault request."""
    session = RoutingSession()

    def no_token(resource: str, force: bool) -> str:
        raise IdentityUnavailableError("IMDS down")

    with pytest.raises(IdentityUnavailableError):
        VaultClient(session, no_token).fetch_many(  # type: ignore[arg-type]
            [Source(VAULT, f"s{i}") for i in range(10)])
    assert session.urls == []


def test_failing_vault_fails_only_its_own_secrets() -> None:
    """A vault whose challenge is untrusted fails its secrets; others still arrive."""

    class Mixed(RoutingSession):
        def get(self, url: str, **kwargs: Any) -> FakeResponse:
            if url.startswith(LOCAL):
                return FakeResponse(401, {"WWW-Authenticate": 'Bearer resource="https://x"'}, b"")
            return super().get(url, **kwargs)

    outcomes = client(Mixed()).fetch_many(
        [Source(LOCAL, "a"), Source(VAULT, "b"), Source(LOCAL, "c")])
    assert isinstance(outcomes[0], VaultError) and isinstance(outcomes[2], VaultError)
    assert isinstance(outcomes[1], Secret)


# --- session settings read once from the environment


def test_ca_bundle_follows_requests_convention(tmp_path: Any) -> None:
    """REQUESTS_CA_BUNDLE wins over CURL_CA_BUNDLE; with neither, the default store."""
    first, second = tmp_path / "a.pem", tmp_path / "b.pem"
    first.write_text("x")
    second.write_text("y")
    assert ca_bundle({"REQUESTS_CA_BUNDLE": str(first), "CURL_CA_BUNDLE": str(second)}) \
        == str(first)
    assert ca_bundle({"CURL_CA_BUNDLE": str(second)}) == str(second)
    assert ca_bundle({}) is True


def test_missing_ca_bundle_is_one_clear_config_error() -> None:
    """A CA bundle variable naming a missing file is a configuration error (exit 78) naming
    the variable and the fix."""
    with pytest.raises(KvAgentError, match="REQUESTS_CA_BUNDLE=/nonexistent.pem does not exist"
                       ) as caught:
        ca_bundle({"REQUESTS_CA_BUNDLE": "/nonexistent.pem"})
    assert caught.value.exit_code == EXIT_CONFIG
    assert "unset it" in str(caught.value) and "\n" not in str(caught.value)


def test_session_ignores_netrc_and_environment() -> None:
    """The vault session never reads ~/.netrc, whose Basic credentials would replace the token."""
    session = new_session({})
    assert session.trust_env is False
    assert session.verify is True


@pytest.mark.parametrize("environ, expected", [
    ({}, {}),
    ({"https_proxy": "http://proxy:3128"}, {"https": "http://proxy:3128"}),
    ({"HTTPS_PROXY": "http://proxy:3128"}, {"https": "http://proxy:3128"}),
    ({"ALL_PROXY": "http://proxy:3128"}, {"https": "http://proxy:3128"}),
    ({"https_proxy": "http://p:1", "no_proxy": "vault.azure.net"}, {}),
    ({"https_proxy": "http://p:1", "NO_PROXY": ".azure.net,other"}, {}),
    ({"https_proxy": "http://p:1", "no_proxy": "*"}, {}),
    ({"https_proxy": "http://p:1", "no_proxy": "zure.net"}, {"https": "http://p:1"}),
    ({"http_proxy": "http://p:1"}, {}),
])
def test_proxies_for_vault(environ: Dict[str, str], expected: Dict[str, str]) -> None:
    """The vault's proxy comes from https_proxy/all_proxy unless no_proxy covers its host."""
    assert proxies_for(VAULT + "/secrets/db", environ) == expected


def test_the_proxy_variables_are_read_once_per_vault_not_per_request() -> None:
    """Five GETs to one vault each go through the proxy the variables name, read once
    for the vault rather than at every request (issue 17, item 20: CPU per secret)."""
    class CountingEnviron(Dict[str, str]):
        reads = 0

        def get(self, key: str, default: Any = None) -> Any:
            if "proxy" in key.lower():
                CountingEnviron.reads += 1
            return super().get(key, default)

    environ = CountingEnviron(https_proxy="http://proxy.example:3128")
    session = FakeSession(*[bundle(name=f"s{n}") for n in range(5)])
    vault = VaultClient(session, Tokens(), environ=environ)
    for n in range(5):
        vault.fetch_secret(Source(VAULT, f"s{n}"))
    assert [sent.kwargs["proxies"] for sent in session.sent] == \
        [{"https": "http://proxy.example:3128"}] * 5
    assert CountingEnviron.reads <= 6  # one pass over the variables


# ---------------------------------------------------------------------------
# Issue 9: untrusted network input


def real_client(ca_path: str, tokens: Tokens, deadline: float = 30,
                on_retry: Any = None) -> VaultClient:
    """A VaultClient with a real session (real sockets, real clock)."""
    return VaultClient(new_session({"REQUESTS_CA_BUNDLE": ca_path}), tokens,
                       policy=RetryPolicy(deadline_s=deadline), on_retry=on_retry)


@pytest.mark.parametrize("crafted", [
    "https://{ip}\\.vault.azure.net",
    "https://{ip}\\@contoso.vault.azure.net",
    "https://{ip}\\.vault.azure.net/",
])
def test_token_never_reaches_a_host_the_url_check_did_not_see(crafted: str) -> None:
    """Item 1: a vault URL whose host urllib3 parses differently (a backslash) is refused
    before any request; the hostile server it points at never gets an Authorization header."""
    body = json.dumps({"value": "planted", "id": f"{VAULT}/secrets/db/{VERSION}"}).encode()
    try:
        server, ip = loopback_443_server(answer(hostile_response(200, body)))
    except PermissionError:
        pytest.skip("binding port 443 on loopback needs root")
    tokens = Tokens()
    with server:
        with pytest.raises(VaultError, match="no request sent|nothing was sent"):
            real_client(server.ca_path, tokens).fetch_secret(
                Source(crafted.format(ip=ip), "db"))
        # fetch_many (the daemon's path) refuses it too.
        (outcome,) = real_client(server.ca_path, tokens).fetch_many(
            [Source(crafted.format(ip=ip), "db")])
        assert isinstance(outcome, VaultError)
    assert not server.saw_authorization and server.connections == 0
    assert tokens.calls == []


def test_every_request_is_checked_against_where_urllib3_connects() -> None:
    """Item 1: even with a vetted audience cached, a request whose URL urllib3 would send
    elsewhere is refused without a request."""
    session = FakeSession()
    vault_client = client(session)
    with pytest.raises(VaultError, match="would go to evil.example"):
        vault_client._get(VAULT, "https://evil.example\\.vault.azure.net/secrets/db",
                          "token", Backoff(RetryPolicy()))
    assert session.sent == []


SURROGATE_BODY = b'{"value": "ab\\ud800cd", "id": "https://contoso.vault.azure.net/secrets/db/1"}'
DEEP = b"[" * 100_000 + b"]" * 100_000


@pytest.mark.parametrize("reply", [
    pytest.param((200, {}, SURROGATE_BODY), id="lone-surrogate-value"),
    pytest.param((200, {}, DEEP), id="deep-200"),
    pytest.param((200, {}, b'{"value": ' + DEEP + b"}"), id="deep-value"),
    pytest.param((400, {}, DEEP), id="deep-400"),
    pytest.param((400, {}, b'{"error": ' + DEEP + b"}"), id="deep-error"),
    pytest.param((200, {}, b'["value", "x"]'), id="list-200"),
    pytest.param((200, {}, b'"value"'), id="string-200"),
    pytest.param((200, {}, b'{"value": "ok", "id": ["a"], "contentType": {"x": 1}}'),
                 id="odd-id"),
    pytest.param((404, {}, b'{"error": "SecretNotFound"}'), id="error-string"),
    pytest.param((403, {}, b'{"error": {"code": 5, "innererror": "x", "message": ["m"]}}'),
                 id="odd-error-types"),
    pytest.param((400, {}, b'{"error": {"code": "C", "message": "\\ud800"}}'),
                 id="surrogate-message"),
    pytest.param((400, {}, b"\xff\xfe\x00garbage"), id="not-utf8"),
])
def test_malformed_responses_are_one_secrets_error(reply: Any) -> None:
    """Item 3: surrogates, deep nesting, non-objects and odd types in 200 and error bodies
    fail only their own secret, as a VaultError; others still arrive (the daemon's path)."""

    class Mixed(RoutingSession):
        def get(self, url: str, **kwargs: Any) -> FakeResponse:
            if url.endswith("/bad"):
                return FakeResponse(*reply)
            return super().get(url, **kwargs)

    outcomes = client(Mixed()).fetch_many(
        [Source(VAULT, "good"), Source(VAULT, "bad"), Source(VAULT, "ok")])
    assert isinstance(outcomes[0], Secret) and isinstance(outcomes[2], Secret)
    if isinstance(outcomes[1], Secret):  # a usable value with odd metadata
        assert outcomes[1].value == b"ok"
        return
    assert isinstance(outcomes[1], VaultError)
    text = str(outcomes[1])
    assert "ab\\ud800" not in text and "\ud800cd" not in text  # no part of the value
    text.encode("utf-8")  # always encodable


def test_network_text_in_versions_and_errors_is_escaped() -> None:
    """Item 7: the version from the id and the vault's error text carry no control characters."""
    forged = "\n kv-agent: error: forged\x1b[31m\u202e"
    bundle_body = json.dumps({"value": "v", "id": f"{VAULT}/secrets/db/1{forged}"}).encode()
    secret = client(FakeSession((200, {}, bundle_body))).fetch_secret(Source(VAULT, "db"))
    error_body = json.dumps({"error": {"code": f"Bad{forged}",
                                       "message": f"\x1b[2Jboom{forged}"}}).encode()
    with pytest.raises(VaultError) as caught:
        client(FakeSession((400, {}, error_body))).fetch_secret(Source(VAULT, "db"))
    for text in (secret.version, str(caught.value)):
        assert not any(ord(c) < 32 or 0x7f <= ord(c) < 0xa0 for c in text), repr(text)
        assert "\u202e" not in text
    assert "\\x1b" in str(caught.value)


def test_oversized_body_is_too_large_not_unreachable() -> None:
    """Item 8: a body over the cap fails at once as 'too large', not 'unreachable ... DNS'."""
    session = FakeSession(*[(200, {}, b"x" * (512 * 1024)) for _ in range(50)])
    with pytest.raises(VaultError) as caught:
        client(session, deadline=10).fetch_secret(Source(VAULT, "db"))
    assert "too large" in str(caught.value)
    assert "DNS" not in str(caught.value) and "unreachable" not in str(caught.value)
    assert len(session.sent) == 1


def test_gzip_bomb_is_too_large_and_never_inflated_in_memory() -> None:
    """Item 8: a gzip body that inflates to 64 MB is refused as 'too large' while
    using a few MB at most."""
    tokens = Tokens()
    challenge = hostile_response(401, b"", {"WWW-Authenticate": CHALLENGE})
    with HostileServer(answer(challenge), answer(gzip_bomb(64 * 1024 * 1024))) as server:
        tracemalloc.start()
        try:
            with pytest.raises(VaultError) as caught:
                real_client(server.ca_path, tokens).fetch_secret(Source(server.url, "db"))
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert "too large" in str(caught.value) and "DNS" not in str(caught.value)
    assert peak < 8 * 1024 * 1024


def test_5xx_on_the_challenge_is_unavailable_not_a_wrong_vault() -> None:
    """Item 8: a vault failing its unauthenticated first request is unavailable (exit 69)."""
    session = FakeSession(*[error(500, "InternalError") for _ in range(100)])
    with pytest.raises(VaultUnavailableError) as caught:
        client(session, deadline=5).fetch_secret(Source(LOCAL, "db"))
    assert caught.value.exit_code == 69
    assert "not a Key Vault" not in str(caught.value)


def test_retry_after_zero_storm_backs_off() -> None:
    """Item 5: Retry-After: 0 (and a past date) waits at least the normal backoff step."""
    clock = FakeClock()
    past = "Wed, 21 Oct 2015 07:28:00 GMT"
    session = FakeSession(*[error(429, "Throttled", **{"Retry-After": ra})
                            for ra in ["0", past, "-5", "0", past, "0"] * 20])
    with pytest.raises(VaultThrottledError):
        client(session, clock=clock, deadline=20).fetch_secret(Source(VAULT, "db"))
    assert min(clock.sleeps) >= 0.25
    assert len(session.sent) <= 10


def test_trickled_body_is_cut_at_the_total_deadline() -> None:
    """Item 4: a vault sending its body one byte a second cannot hold a request (or the
    retry budget) open beyond the deadline plus one bounded final attempt."""
    tokens = Tokens()
    challenge = hostile_response(401, b"", {"WWW-Authenticate": CHALLENGE})
    body = json.dumps({"value": "x" * 200, "id": f"{VAULT}/secrets/db/1"}).encode()
    slow = hostile_response(200, body)
    with HostileServer(answer(challenge), trickle(slow, 1.0, prefix=len(slow) - len(body)),
                       give_up_s=15) as server:
        started = time.monotonic()
        with pytest.raises(VaultUnavailableError, match="too slow"):
            real_client(server.ca_path, tokens, deadline=3).fetch_secret(
                Source(server.url, "db"))
        elapsed = time.monotonic() - started
    assert elapsed < 3 + MIN_REQUEST_S + 3


def test_vault_retries_are_reported_with_the_vaults_name() -> None:
    """Item 16: each retry is announced as 'waiting for vault <name>: <cause>'."""
    heard: List[Tuple[str, int]] = []
    clock = FakeClock()
    session = FakeSession(refused(), error(503, "Unavailable"), bundle())
    VaultClient(session, Tokens(), policy=RetryPolicy(deadline_s=30), clock=clock,
                sleep=clock.sleep,
                on_retry=lambda reason, attempt, delay: heard.append((reason, attempt))
                ).fetch_secret(Source("https://contoso-kv.vault.azure.net", "db"))
    assert heard == [("waiting for vault contoso-kv: connection refused", 1),
                     ("waiting for vault contoso-kv: HTTP 503", 2)]
    assert vault_label("https://127.0.0.1:8443") == "127.0.0.1:8443"
    assert vault_label("https://[::1]:8443") == "[::1]:8443"


# --- guards the mutation check relies on (tests/mutations)


def test_secret_repr_never_shows_the_value() -> None:
    """repr() and str() of a Secret name it but never show its value."""
    secret = Secret("db", VERSION, b"plain-ascii-s3cr3t", "text/plain")
    for text in (repr(secret), str(secret), f"{secret}", repr([secret])):
        assert "plain-ascii-s3cr3t" not in text and "****" in text and "'db'" in text


def test_valid_bundle_over_the_size_cap_is_refused() -> None:
    """A well-formed 200 SecretBundle larger than the body cap fails the secret, not memory."""
    value = "v" * (300 * 1024)
    session = FakeSession(*[bundle(value) for _ in range(50)])
    with pytest.raises(VaultError):
        client(session, deadline=1).fetch_secret(Source(VAULT, "db"))


@pytest.mark.parametrize("gives_way", [False, True])
def test_a_client_that_gives_way_ends_held_back_requests_unsent(gives_way: bool) -> None:
    """With gives_way (the daemon, once ready: every file is on disk), a request that a
    503's pause holds back ends at once as that 503, unsent, its file kept, so a fleet
    that found its vault unavailable waits in the lifecycle's spread-out retries rather
    than inside each refresh (issue 12, fleet outage); without, it waits the pause out
    and is sent. The request that got the 503 still probes and succeeds."""
    clock = FakeClock()
    session = FakeSession(error(503, "ServiceUnavailable"), bundle(name="b"), bundle())
    other: List[Any] = []

    def fetch_other(*_: Any) -> None:
        try:
            other.append(vault.fetch_secret(Source(VAULT, "b")))
        except VaultError as exc:
            other.append(exc)

    vault = VaultClient(session, Tokens(), policy=RetryPolicy(deadline_s=30), clock=clock,
                        sleep=clock.sleep, on_retry=fetch_other)
    vault.pacing.give_way(gives_way)
    assert vault.fetch_secret(Source(VAULT, "db")).value == b"s3cr3t"
    if gives_way:
        assert isinstance(other[0], VaultError) and "503" in str(other[0])
        assert [sent.url for sent in session.sent] == [f"{VAULT}/secrets/db"] * 2
    else:
        assert isinstance(other[0], Secret) and other[0].name == "b"
        assert len(session.sent) == 3
