"""How a token is asked for: the seam between *when* and *how*.

:mod:`agent.identity.tokens` decides **when** to ask (cache, expiry margin, early
renewal). This module is **how** one request is carried out, whatever the
endpoint: a :class:`RequestFactory` knows one endpoint's protocol (IMDS
today, :mod:`agent.identity.imds`), and :func:`request_token` is the one send loop that
runs it: a bounded GET (:func:`agent.base.transport.bounded_get`), retries with
backoff and Retry-After, and a follow-up request sent at once when the
factory answers a challenge. This is azure-identity's split of
``ManagedIdentityClient`` and its ``request_factory`` [style.md anchor 4].

The managed-identity endpoints share one response shape (IMDS, Azure Arc and
App Service all answer ``{"access_token", "expires_on"|"expires_in", ...}``
[protocol.md A2, A7, A8]), so its parsing lives here too. A token never
appears in a message, a log line or a ``repr``.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone
from typing import Any, Callable, Mapping, NamedTuple, Optional, Tuple, Union

import requests

from agent.base import transport
from agent.base.errors import IdentityRefusedError, IdentityUnavailableError
from agent.base.retry import Backoff
from agent.base.untrusted import escape, load_json

# Managed-identity tokens live ~24 h [protocol.md A2]; an expiry further out
# (a "1e300" from a broken or hostile endpoint) is clamped to this.
MAX_TOKEN_LIFETIME_S = 7 * 86400.0
# Follow-up requests (challenges answered) one token may take; Arc needs one.
MAX_FOLLOW_UPS = 3


class AccessToken(NamedTuple):
    """A bearer token for ``resource``, valid until ``expires_on`` (epoch s).

    ``refresh_on`` (epoch s) is when to renew early, 0 for never; endpoints
    leave it 0 and the cache (:mod:`agent.identity.tokens`) decides.
    """

    token: str
    expires_on: float
    resource: str
    refresh_on: float = 0.0

    def __repr__(self) -> str:
        return f"AccessToken(token=****, resource={self.resource!r}, expires_on={self.expires_on})"


class RequestLimits(NamedTuple):
    """Bounds of one request to a local identity endpoint (policy as data)."""

    timeout_s: Tuple[float, float] = (2.0, 10.0)  # connect, each read (it answers locally)
    request_total_s: float = 15.0  # one request, start to last byte (see agent.base.transport)
    max_body_bytes: int = 64 * 1024


class TokenRequest(NamedTuple):
    """One GET to send: URL, query parameters and headers.

    Headers may carry a credential (Azure Arc's key-file contents), so
    ``repr`` names the headers without their values.
    """

    url: str
    params: Mapping[str, str]
    headers: Mapping[str, str]

    def __repr__(self) -> str:
        return f"TokenRequest(url={self.url!r}, headers={sorted(self.headers)})"


class Retry(NamedTuple):
    """A transient refusal: back off (at least ``retry_after`` s) and ask again.

    ``status`` and ``detail`` (the endpoint's own words, escaped) make the
    message when the retry budget runs out.
    """

    status: int
    detail: str = ""
    retry_after: Optional[float] = None


# What a factory makes of one reply: the token (done), a follow-up request
# to send at once (a challenge answered), or a transient refusal.
Answer = Union[AccessToken, TokenRequest, Retry]


class RequestFactory:
    """How to ask one identity endpoint for a token (the interface; IMDS is
    :class:`agent.identity.imds.ImdsRequestFactory`).

    A factory builds requests and interprets replies; it never sends, sleeps
    or caches, so each is unit-testable without a socket. Two endpoints the
    interface is shaped for:

    * Azure Arc [protocol.md A7]: :meth:`request` sends no credential; to
      its 401 with ``WWW-Authenticate: Basic realm=<key file>``,
      :meth:`answer` returns the same request with ``Authorization: Basic
      <file contents>`` (a :class:`TokenRequest`, sent at once; the file is
      checked first: under ``/var/opt/azcmagent/tokens``, ``.key``, at most
      4096 bytes), and raises if a request that already carried it gets 401
      again. Its selectors are IMDS's; its ``api-version`` is 2020-06-01.
    * App Service [protocol.md A8]: :meth:`request` adds the
      ``X-IDENTITY-HEADER`` taken from the environment when the factory was
      built (``api-version`` 2019-08-01, selectors ``client_id``,
      ``principal_id``, ``mi_res_id``); :meth:`answer` parses the same token
      shape (its ``expires_on`` may be a date: :func:`parse_expires_on`).
    """

    name = "the identity endpoint"  # for "waiting for <name>: ..." (STATUS=)
    endpoint = ""  # the token URL, for messages
    unreachable_hint = "check the identity endpoint"  # when it gives no answer at all
    unusable_hint = "retry later; if it persists, check the identity endpoint"
    limits = RequestLimits()

    def request(self, resource: str) -> TokenRequest:
        """The first request for a token for ``resource``."""
        raise NotImplementedError

    def answer(self, sent: TokenRequest, reply: transport.Reply, resource: str,
               now: float) -> Answer:
        """What ``reply`` (to ``sent``) means; raises IdentityUnavailableError
        for a final refusal, worded with the fix (:func:`request_token` makes
        it an IdentityRefusedError when the reply was a 4xx). ``now`` is
        epoch seconds."""
        raise NotImplementedError

    def token(self, body: bytes, resource: str, now: float) -> AccessToken:
        """A 200's token; a body that holds none is a refusal naming this
        endpoint and its fix (never quoting the body: it may hold a token)."""
        try:
            return parse_token_response(body, resource, now)
        except ValueError as exc:
            raise IdentityUnavailableError(
                f"{self.name} returned an unusable token response: {exc}",
                self.unusable_hint) from None


def refusal(status: int, error: IdentityUnavailableError) -> IdentityUnavailableError:
    """``error``, raised by a factory's answer to a reply of ``status``, as it
    must travel: after a 4xx, an IdentityRefusedError (the endpoint answered:
    no such identity, a refused key file, a challenge it cannot meet; the
    sealed cache must not hide it); after any other status, unchanged (it
    gave no usable answer). Decided here, once, for every identity source."""
    if 400 <= status < 500 and not isinstance(error, IdentityRefusedError):
        return IdentityRefusedError(error.message, error.hint)
    return error


def request_token(session: requests.Session, factory: RequestFactory, resource: str,
                  backoff: Backoff, wall: Callable[[], float]) -> AccessToken:
    """Ask ``factory``'s endpoint for a token: the one send loop.

    Every GET is bounded in time and size; connection failures and
    :class:`Retry` answers are retried within ``backoff``'s budget, a
    follow-up :class:`TokenRequest` is sent at once (at most MAX_FOLLOW_UPS
    of them, so a factory cannot loop forever). An oversized body is
    not retried (it will be as large next time). Raises
    IdentityUnavailableError naming the endpoint and the fix.
    """
    request = factory.request(resource)
    limits = factory.limits
    follow_ups = 0
    while True:
        try:
            reply = transport.bounded_get(
                session, request.url, params=request.params, headers=request.headers,
                timeout=limits.timeout_s, total_s=backoff.request_budget(limits.request_total_s),
                max_bytes=limits.max_body_bytes)
        except requests.RequestException as exc:
            cause = transport.describe_failure(exc)
            if not isinstance(exc, transport.ResponseTooLargeError) and backoff.wait(
                    f"waiting for {factory.name}: {cause}"):
                continue
            raise IdentityUnavailableError(
                f"{factory.name} at {factory.endpoint} gave no usable answer ({cause}) "
                f"after {backoff.attempts} attempts", factory.unreachable_hint) from None
        try:
            answer = factory.answer(request, reply, resource, wall())
        except IdentityUnavailableError as exc:
            raise refusal(reply.status, exc) from None
        if isinstance(answer, AccessToken):
            return answer
        if isinstance(answer, TokenRequest):
            follow_ups += 1
            if follow_ups > MAX_FOLLOW_UPS:
                raise IdentityUnavailableError(
                    f"{factory.name} at {factory.endpoint} kept challenging "
                    f"({follow_ups} follow-up requests)", factory.unreachable_hint)
            request = answer
            continue
        if backoff.wait(f"waiting for {factory.name}: HTTP {answer.status}", answer.retry_after):
            continue
        raise IdentityUnavailableError(
            f"{factory.name} kept answering HTTP {answer.status} ({answer.detail}) "
            f"after {backoff.attempts} attempts", "retry later")


# -- the shared response shape ---------------------------------------------


def parse_token_response(body: bytes, resource: str, now: float) -> AccessToken:
    """Build an AccessToken from a 200 body; raise ValueError (never quoting
    the body, which holds the token) when it is not a usable token."""
    content = load_json(body)
    if not isinstance(content, dict):
        raise ValueError("the response is not a JSON object")
    token = content.get("access_token")
    if not isinstance(token, str) or not token:
        raise ValueError("the response has no access_token")
    expires_on = parse_expires_on(content, now)
    resource_text = content.get("resource")
    return AccessToken(token, expires_on,
                       escape(resource_text) if isinstance(resource_text, str) and resource_text
                       else resource)


def parse_expires_on(content: Mapping[str, Any], now: float) -> float:
    """Absolute expiry in epoch seconds from an IMDS-shaped token response.

    IMDS sends numbers as strings; stubs send numbers; App Service sends a
    date string [protocol.md A2, A6]. ``expires_on`` wins, else
    ``now + expires_in``. The result is clamped to ``[now, now +
    MAX_TOKEN_LIFETIME_S]``: an expiry in the past means "use once, do not
    cache", one absurdly far away is not trusted. Raises ValueError when
    neither parses as a finite number or date ("1e400", "inf", "nan", a list).
    """
    expires_on = _expiry(content, now)
    return min(max(expires_on, now), now + MAX_TOKEN_LIFETIME_S)


def _expiry(content: Mapping[str, Any], now: float) -> float:
    raw_on = content.get("expires_on")
    if raw_on not in (None, ""):
        seconds = _finite_number(raw_on)
        if seconds is None and isinstance(raw_on, str):
            seconds = _parse_date(raw_on)
        if seconds is not None:
            return seconds
    raw_in = content.get("expires_in")
    if raw_in not in (None, ""):
        seconds = _finite_number(raw_in)
        if seconds is not None:
            return now + seconds
    raise ValueError("no usable expires_on or expires_in")


def _finite_number(value: object) -> Optional[float]:
    """A whole number of seconds from a JSON number or numeric string;
    None for anything else, infinities and NaN included."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        number = float(value.strip() if isinstance(value, str) else value)
    except (ValueError, OverflowError):
        return None
    return float(int(number)) if math.isfinite(number) else None


def _parse_date(text: str) -> Optional[float]:
    text = text.strip().replace(" +00:00", "")[:64]
    for fmt in ("%m/%d/%Y %H:%M:%S", "%m/%d/%Y %I:%M:%S %p"):
        try:
            return datetime.strptime(text, fmt).replace(tzinfo=timezone.utc).timestamp()
        except ValueError:
            continue
    return None


def error_description(body: bytes) -> str:
    """The endpoint's own words for a refusal, e.g. 'Identity not found':
    escaped and capped (untrusted text on its way to a log), whatever the
    body holds."""
    try:
        content = load_json(body)
    except ValueError:
        return escape(" ".join(body[:200].decode("utf-8", "replace").split()))
    if not isinstance(content, dict):
        return ""
    text = content.get("error_description") or content.get("error") or ""
    return escape(" ".join(text.split()) if isinstance(text, str) else "")
