"""Managed-identity access tokens: when to ask, and which endpoint to ask.

One GET per resource per token lifetime: :class:`TokenCache` reuses a token
until five minutes before it expires (managed-identity tokens live about
24 h), and renews a long one early, at half-life, keeping the still-valid
token if that renewal fails [protocol.md A5]. So one request serves every
secret in a run. That is all this module decides (*when*); *how* a request is
made is a :class:`~agent.identity.request.RequestFactory` (IMDS:
:mod:`agent.identity.imds`), run by :func:`agent.identity.request.request_token`.

:func:`token_source` is the one place that picks the endpoint and builds its
session: IMDS, Azure Arc (:mod:`agent.identity.arc`) or App Service
(:mod:`agent.identity.app_service`) [protocol.md A1, A7, A8], as
:func:`choose_source` decides from the manifest, the environment and files
only (no request, so ``check`` can say it offline).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Callable, Dict, Mapping, NamedTuple, Optional, Sequence

import requests

from agent.base import transport
from agent.base.errors import IdentityUnavailableError
from agent.base.retry import Backoff, RetryPolicy
from agent.identity.app_service import AppServiceRequestFactory, app_service_settings
from agent.identity.arc import DEFAULT_ARC_ENDPOINT, ArcRequestFactory, tokens_dir
from agent.identity.imds import ImdsRequestFactory, imds_endpoint
from agent.identity.request import AccessToken, RequestFactory, request_token
from agent.identity.selector import Identity

log = logging.getLogger(__name__)

EXPIRY_MARGIN_S = 300.0  # treat a token as expired 5 min early (as MSAL does)
EARLY_RENEW_MIN_LIFETIME_S = 7200.0  # renew tokens this long at half-life (MSAL)
# Files the Azure Connected Machine agent installs: one present means an Arc
# server even when the unit's environment lacks IDENTITY_ENDPOINT (systemd
# units do not inherit /etc/environment, where the agent puts it).
ARC_AGENT_PATHS = ("/opt/azcmagent/bin/himds", "/var/opt/azcmagent")


class SourceChoice(NamedTuple):
    """Which identity endpoint to ask (``imds``, ``arc`` or ``app-service``)
    and why, for the start-up log, ``status`` and ``check``."""

    source: str
    reason: str

    def describe(self) -> str:
        """e.g. ``arc (IDENTITY_ENDPOINT and IMDS_ENDPOINT are set)``."""
        return f"{self.source} ({self.reason})"


def choose_source(requested: str, environ: Mapping[str, str],
                  exists: Callable[[str], bool] = os.path.lexists,
                  arc_paths: Optional[Sequence[str]] = None) -> SourceChoice:
    """The endpoint for the manifest's ``identity.source`` (pure but for
    ``exists``). ``auto`` picks, in order: App Service (IDENTITY_ENDPOINT and
    IDENTITY_HEADER set), Arc (IDENTITY_ENDPOINT and IMDS_ENDPOINT set, or
    one of ``arc_paths`` present; default :data:`ARC_AGENT_PATHS`, read at
    the call so the test harness can pin it), else IMDS."""
    if arc_paths is None:
        arc_paths = ARC_AGENT_PATHS
    if requested != "auto":
        return SourceChoice(requested, "identity.source in the manifest")
    if environ.get("IDENTITY_ENDPOINT") and environ.get("IDENTITY_HEADER"):
        return SourceChoice("app-service", "IDENTITY_ENDPOINT and IDENTITY_HEADER are set")
    if environ.get("IDENTITY_ENDPOINT") and environ.get("IMDS_ENDPOINT"):
        return SourceChoice("arc", "IDENTITY_ENDPOINT and IMDS_ENDPOINT are set")
    for path in arc_paths:
        if exists(path):
            return SourceChoice("arc", f"the Azure Arc agent's {path} exists")
    return SourceChoice("imds", "no App Service or Azure Arc environment found")


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
        self.source = SourceChoice("imds", "default")  # which endpoint; token_source sets it

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

    def abort(self) -> int:
        """Abandon the token request in flight, if any, and refuse new ones (a
        stop): see :func:`agent.base.transport.abort`. Returns how many were out."""
        return transport.abort(self._session)

    @property
    def endpoint(self) -> str:
        """The token URL asked (for ``kv-agent doctor``'s messages)."""
        return self._factory.endpoint


def token_source(
    identity: Identity,
    environ: Mapping[str, str],
    policy: RetryPolicy = RetryPolicy(),
    *,
    on_retry: Optional[Callable[[str, int, float], None]] = None,
    sleep: Callable[[float], None] = time.sleep,
    exists: Callable[[str], bool] = os.path.lexists,
) -> TokenCache:
    """The token cache for ``identity`` on this machine, over a session of
    its own that never uses a proxy (every identity endpoint is local).
    Its ``source`` says which endpoint and why (the caller logs it once).
    Reads ``environ`` once, here. Raises IdentityUnavailableError when the
    manifest names a source whose environment is missing."""
    choice = choose_source(identity.source, environ, exists)
    factory = build_factory(choice.source, identity, environ)
    session = transport.new_session(pool_size=1, target=choice.source)
    session.trust_env = False  # IMDS must never go through a proxy [protocol.md A1]
    cache = TokenCache(session, factory, policy=policy, on_retry=on_retry, sleep=sleep)
    cache.source = choice
    return cache


def build_factory(source: str, identity: Identity, environ: Mapping[str, str]) -> RequestFactory:
    """The request factory for ``source`` (``imds``, ``arc``, ``app-service``)."""
    if source == "app-service":
        endpoint, header = app_service_settings(environ)
        if not endpoint or not header:
            raise IdentityUnavailableError(
                "identity.source is app-service but IDENTITY_ENDPOINT or IDENTITY_HEADER "
                "is not set", "turn on the app's managed identity, or set identity.source "
                "to auto")
        return AppServiceRequestFactory(endpoint, header, identity)
    if source == "arc":
        endpoint = environ.get("IDENTITY_ENDPOINT") or DEFAULT_ARC_ENDPOINT
        return ArcRequestFactory(endpoint, identity, tokens_dir(environ))
    return ImdsRequestFactory(imds_endpoint(environ), identity)
