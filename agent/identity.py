"""Managed-identity access tokens from the Instance Metadata Service (IMDS).

One GET per resource per token lifetime: tokens are cached and reused until
five minutes before expiry (managed-identity tokens live about 24 h), and long
tokens are renewed early at half-life, keeping the old one if renewal fails
[protocol.md A5]. So one IMDS call serves every secret in a run.

IMDS is plain HTTP on a link-local address and must never go through a proxy
[protocol.md A1], so this module uses its own session with ``trust_env`` off.
It never sends an Authorization header, and a token never appears in a
message, a log line or a ``repr``.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from datetime import datetime, timezone
from typing import Any, Callable, Dict, Mapping, NamedTuple, Optional, Tuple

import requests

from agent import transport
from agent.errors import IdentityUnavailableError
from agent.retry import Backoff, RetryPolicy, parse_retry_after
from agent.untrusted import escape, load_json

log = logging.getLogger(__name__)

DEFAULT_IMDS_ENDPOINT = "http://169.254.169.254/metadata/identity/oauth2/token"
IMDS_ENDPOINT_ENV = "KV_AGENT_IMDS_ENDPOINT"
IMDS_API_VERSION = "2018-02-01"  # what every SDK pins for tokens [protocol.md A1]
EXPIRY_MARGIN_S = 300.0  # treat a token as expired 5 min early (as MSAL does)
EARLY_RENEW_MIN_LIFETIME_S = 7200.0  # renew tokens this long at half-life
RETRY_STATUSES = frozenset({404, 408, 410, 429}) | frozenset(range(500, 600))
MAX_BODY_BYTES = 64 * 1024
TIMEOUT_S: Tuple[float, float] = (2.0, 10.0)  # connect, each read (IMDS answers locally)
REQUEST_TOTAL_S = 15.0  # one request, start to last byte (see agent.transport)
# Managed-identity tokens live ~24 h [protocol.md A2]; an expiry further out
# (a "1e300" from a broken or hostile endpoint) is clamped to this.
MAX_TOKEN_LIFETIME_S = 7 * 86400.0

# manifest key -> IMDS query parameter [protocol.md A1]
SELECTOR_PARAMS = {"client_id": "client_id", "object_id": "object_id",
                   "resource_id": "msi_res_id"}


class Identity(NamedTuple):
    """Which managed identity to ask IMDS for.

    ``selector`` is the manifest's key (``client_id``, ``object_id`` or
    ``resource_id``) and ``value`` its value; both are None for the
    system-assigned identity.
    """

    selector: Optional[str] = None
    value: Optional[str] = None

    def describe(self) -> str:
        """A short operator-facing name, e.g. ``user-assigned client_id=...``."""
        if self.selector is None:
            return "the system-assigned identity"
        return f"the user-assigned identity {self.selector}={self.value}"


class AccessToken(NamedTuple):
    """A bearer token for ``resource``, valid until ``expires_on`` (epoch s)."""

    token: str
    expires_on: float
    resource: str
    refresh_on: float = 0.0  # epoch s after which to renew early; 0: never

    def __repr__(self) -> str:
        return f"AccessToken(token=****, resource={self.resource!r}, expires_on={self.expires_on})"


def imds_endpoint(environ: Mapping[str, str]) -> str:
    """The token URL: ``KV_AGENT_IMDS_ENDPOINT`` or the link-local default."""
    return environ.get(IMDS_ENDPOINT_ENV) or DEFAULT_IMDS_ENDPOINT


def build_params(resource: str, identity: Identity) -> Dict[str, str]:
    """Query parameters for one token request (pure)."""
    params = {"api-version": IMDS_API_VERSION, "resource": resource}
    if identity.selector is not None and identity.value is not None:
        params[SELECTOR_PARAMS[identity.selector]] = identity.value
    return params


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
    lifetime = expires_on - now
    refresh_on = now + lifetime / 2 if lifetime >= EARLY_RENEW_MIN_LIFETIME_S else 0.0
    resource_text = content.get("resource")
    return AccessToken(token, expires_on,
                       escape(resource_text) if isinstance(resource_text, str) and resource_text
                       else resource, refresh_on)


def _error_description(body: bytes) -> str:
    """IMDS's own words for a refusal, e.g. 'Identity not found': escaped and
    capped (untrusted text on its way to a log), whatever the body holds."""
    try:
        content = load_json(body)
    except ValueError:
        return escape(" ".join(body[:200].decode("utf-8", "replace").split()))
    if not isinstance(content, dict):
        return ""
    text = content.get("error_description") or content.get("error") or ""
    return escape(" ".join(text.split()) if isinstance(text, str) else "")


def _assign_hint(identity: Identity) -> str:
    if identity.selector is None:
        return ("enable the VM's system-assigned identity "
                "(az vm identity assign -g <group> -n <vm>)")
    return ("assign that user-assigned identity to this VM (az vm identity assign -g <group> "
            "-n <vm> --identities <resource id>) and check the id in the manifest")


class TokenSource:
    """Fetches and caches IMDS tokens for one identity; thread-safe.

    ``session`` should not trust the environment (no proxy for IMDS); clock,
    sleep and wall time are injectable for tests.
    """

    def __init__(
        self,
        session: requests.Session,
        identity: Identity,
        *,
        endpoint: str = DEFAULT_IMDS_ENDPOINT,
        policy: RetryPolicy = RetryPolicy(),
        wall: Callable[[], float] = time.time,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        on_retry: Optional[Callable[[str, int, float], None]] = None,
    ) -> None:
        self._session = session
        self._identity = identity
        self._endpoint = endpoint
        self._policy = policy
        self._wall = wall
        self._clock = clock
        self._sleep = sleep
        self._on_retry = on_retry
        self._lock = threading.Lock()
        self._cache: Dict[str, AccessToken] = {}
        self.requests_made = 0

    def get_token(self, resource: str, *, force_refresh: bool = False) -> AccessToken:
        """A token for ``resource``: cached unless within 5 min of expiry or
        ``force_refresh``. Raises IdentityUnavailableError."""
        with self._lock:
            now = self._wall()
            cached = self._cache.get(resource)
            if cached and not force_refresh and now < cached.expires_on - EXPIRY_MARGIN_S:
                if not cached.refresh_on or now < cached.refresh_on:
                    return cached
                try:  # early renewal; the still-valid token is the fallback
                    return self._store(resource, self._request(resource))
                except IdentityUnavailableError as exc:
                    log.warning("early token renewal failed, keeping the current one: %s", exc)
                    return cached
            return self._store(resource, self._request(resource))

    def invalidate(self, resource: str) -> None:
        """Forget the cached token for ``resource`` (e.g. after a 401)."""
        with self._lock:
            self._cache.pop(resource, None)

    def _store(self, resource: str, token: AccessToken) -> AccessToken:
        self._cache[resource] = token
        return token

    def _request(self, resource: str) -> AccessToken:
        params = build_params(resource, self._identity)
        backoff = Backoff(self._policy, clock=self._clock, sleep=self._sleep,
                          on_retry=self._on_retry)
        while True:
            self.requests_made += 1
            try:
                status, headers, body = transport.bounded_get(
                    self._session, self._endpoint, params=params,
                    headers={"Metadata": "true"}, timeout=TIMEOUT_S,
                    total_s=backoff.request_budget(REQUEST_TOTAL_S), max_bytes=MAX_BODY_BYTES)
            except requests.RequestException as exc:
                cause = transport.describe_failure(exc)
                if not isinstance(exc, transport.ResponseTooLargeError) and backoff.wait(
                        f"waiting for IMDS: {cause}"):
                    continue
                raise IdentityUnavailableError(
                    f"IMDS at {self._endpoint} gave no usable answer ({cause}) "
                    f"after {backoff.attempts} attempts",
                    "check that this is an Azure VM with a managed identity, "
                    f"or set {IMDS_ENDPOINT_ENV}",
                ) from None
            if status == 200:
                try:
                    return parse_token_response(body, resource, self._wall())
                except ValueError as exc:
                    raise IdentityUnavailableError(
                        f"IMDS returned an unusable token response: {exc}",
                        "retry later; if it persists, check the IMDS endpoint",
                    ) from None
            if status in RETRY_STATUSES:
                retry_after = parse_retry_after(headers.get("Retry-After"))
                if backoff.wait(f"waiting for IMDS: HTTP {status}", retry_after):
                    continue
                raise IdentityUnavailableError(
                    f"IMDS kept answering HTTP {status} ({_error_description(body)}) "
                    f"after {backoff.attempts} attempts", "retry later")
            if status == 400:
                raise IdentityUnavailableError(
                    f"IMDS refused a token for {self._identity.describe()}: "
                    f"{_error_description(body)}", _assign_hint(self._identity))
            raise IdentityUnavailableError(
                f"IMDS answered HTTP {status}: {_error_description(body)}",
                "check the IMDS endpoint and identity configuration")
