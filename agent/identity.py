"""Managed-identity access tokens: when to ask, and which endpoint to ask.

One GET per resource per token lifetime: :class:`TokenCache` reuses a token
until five minutes before it expires (managed-identity tokens live about
24 h), and renews a long one early, at half-life, keeping the still-valid
token if that renewal fails [protocol.md A5]. So one request serves every
secret in a run. That is all this module decides (*when*); *how* a request is
made is a :class:`~agent.token_request.RequestFactory` (IMDS:
:mod:`agent.imds`), run by :func:`agent.token_request.request_token`.

:func:`token_source` is the one place that picks the endpoint and builds its
session; Azure Arc and App Service [protocol.md A7, A8] will each be one more
factory chosen there.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Dict, Mapping, Optional

import requests

from agent import transport
from agent.errors import IdentityUnavailableError
from agent.identity_selector import Identity
from agent.imds import ImdsRequestFactory, imds_endpoint
from agent.retry import Backoff, RetryPolicy
from agent.token_request import AccessToken, RequestFactory, request_token

log = logging.getLogger(__name__)

EXPIRY_MARGIN_S = 300.0  # treat a token as expired 5 min early (as MSAL does)
EARLY_RENEW_MIN_LIFETIME_S = 7200.0  # renew tokens this long at half-life (MSAL)


def with_refresh_on(token: AccessToken, now: float) -> AccessToken:
    """``token`` with its early-renewal time: half-life for a token that
    lives at least EARLY_RENEW_MIN_LIFETIME_S, never for a shorter one; a
    time the endpoint already set is kept (pure)."""
    if token.refresh_on:
        return token
    lifetime = token.expires_on - now
    if lifetime < EARLY_RENEW_MIN_LIFETIME_S:
        return token
    return token._replace(refresh_on=now + lifetime / 2)


class TokenCache:
    """Tokens per resource, fetched through ``factory`` over ``session``.

    Thread-safe: one lock serialises lookups and requests, so callers that
    ask at once cause one request. ``wall`` (epoch s) dates tokens; ``clock``
    and ``sleep`` drive the retry loop; ``on_retry`` hears (reason, attempt,
    delay) before each retry sleep. All are injectable for tests.
    """

    def __init__(
        self,
        session: requests.Session,
        factory: RequestFactory,
        *,
        policy: RetryPolicy = RetryPolicy(),
        wall: Callable[[], float] = time.time,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        on_retry: Optional[Callable[[str, int, float], None]] = None,
    ) -> None:
        self._session = session
        self._factory = factory
        self._policy = policy
        self._wall = wall
        self._clock = clock
        self._sleep = sleep
        self._on_retry = on_retry
        self._lock = threading.Lock()
        self._cache: Dict[str, AccessToken] = {}

    def get_token(self, resource: str, *, force_refresh: bool = False) -> AccessToken:
        """A token for ``resource``: cached unless within 5 min of expiry or
        ``force_refresh`` (after a vault's 401). Raises IdentityUnavailableError."""
        with self._lock:
            now = self._wall()
            cached = self._cache.get(resource)
            if cached and not force_refresh and now < cached.expires_on - EXPIRY_MARGIN_S:
                if not cached.refresh_on or now < cached.refresh_on:
                    return cached
                try:  # early renewal; the still-valid token is the fallback
                    return self._fetch(resource)
                except IdentityUnavailableError as exc:
                    log.warning("early token renewal failed, keeping the current one: %s", exc)
                    return cached
            return self._fetch(resource)

    def _fetch(self, resource: str) -> AccessToken:
        backoff = Backoff(self._policy, clock=self._clock, sleep=self._sleep,
                          on_retry=self._on_retry)
        token = request_token(self._session, self._factory, resource, backoff, self._wall)
        token = with_refresh_on(token, self._wall())
        self._cache[resource] = token
        return token

    def close(self) -> None:
        """Release the endpoint's HTTP connections."""
        self._session.close()


def token_source(
    identity: Identity,
    environ: Mapping[str, str],
    policy: RetryPolicy = RetryPolicy(),
    *,
    on_retry: Optional[Callable[[str, int, float], None]] = None,
    sleep: Callable[[float], None] = time.sleep,
) -> TokenCache:
    """The token cache for ``identity`` on this machine: IMDS at
    ``KV_AGENT_IMDS_ENDPOINT`` or the link-local default, over a session of
    its own that never uses a proxy. Reads ``environ`` once, here."""
    session = transport.new_session(pool_size=1)
    session.trust_env = False  # IMDS must never go through a proxy [protocol.md A1]
    factory = ImdsRequestFactory(imds_endpoint(environ), identity)
    return TokenCache(session, factory, policy=policy, on_retry=on_retry, sleep=sleep)
