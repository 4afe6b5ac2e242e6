"""Key Vault secrets client: GET one secret, many concurrently, or the list.

Where a token may go is the security boundary of this module:

* only over HTTPS, only to the vault's own URL (built from the manifest, never
  from a response), and never along a redirect;
* only a token for a known Key Vault audience. The audience comes from the
  vault's DNS suffix for the known clouds; for any other host from the 401
  challenge, and then only if the challenge names a known Key Vault audience
  and the host lies under it [protocol.md B6]. A vault on a loopback address
  (the local emulator) is exempt from the domain check only.

The host a token goes to is checked twice: the vault URL must be a strict
host name (:mod:`agent.vault.url`), and before every request the host urllib3
will really connect to must be that host, so parser differences
(``https://evil.example\\.vault.azure.net``) cannot redirect a token.

Every request is bounded in total time and size (:mod:`agent.base.transport`),
every body is untrusted (parse failures are one secret's VaultError, text is
escaped before it can reach a log), transient failures are retried with
backoff (429 honouring Retry-After, one :class:`agent.base.retry.Pause` per vault
shared by every thread), and one 401 triggers one fresh token; one send loop
(:meth:`VaultClient._exchange`) does all of that for every request.
Concurrency is a bounded thread pool over one keep-alive session.
The list's pages and items are parsed in :mod:`agent.vault.listing`.
"""

from __future__ import annotations

import email.utils
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from typing import (
    Any,
    Callable,
    Dict,
    Generator,
    List,
    Mapping,
    NamedTuple,
    Optional,
    Sequence,
    Set,
    Tuple,
    Union,
)
from urllib.parse import quote, urlsplit

import requests

from agent.base import transport
from agent.base.errors import (
    ConfigError,
    EndlessListError,
    KvAgentError,
    ListTooLongError,
    SecretNotFoundError,
    VaultError,
    VaultForbiddenError,
    VaultThrottledError,
    VaultUnavailableError,
)
from agent.base.hosts import is_loopback_host
from agent.base.retry import Backoff, Pause, RetryPolicy, parse_retry_after
from agent.base.untrusted import escape, load_json
from agent.pipeline.sources import SecretAttributes, Source, parse_attributes
from agent.vault.listing import (
    LIST_PATH,
    PAGE_SIZE,
    ListLimits,
    Page,
    SecretItem,
    check_next_link,
    page_bound,
    parse_page,
)
from agent.vault.url import check_target, normalize_vault_url

API_VERSION = "7.6"  # GA; everything kv-agent uses exists since 7.0 [protocol.md B2]
MAX_CONCURRENCY = 16
ARRIVAL_BATCH = 32  # outcomes fetch_each hands over at once
# A secret is at most 25 KB [protocol.md B7]; larger ones are accepted up to
# this bound (docs/design/limits.md), which applies after any gzip decoding.
MAX_BODY_BYTES = 256 * 1024
TIMEOUT_S: Tuple[float, float] = (5.0, 20.0)  # connect, each read
REQUEST_TOTAL_S = 30.0  # one request, start to last byte (see agent.base.transport)
RETRY_STATUSES = frozenset({408, 429}) | frozenset(range(500, 600))
# Answers that pause every request of the agent to that vault (agent.base.retry.Pause),
# with or without Retry-After: throttled, or unavailable as a whole.
PAUSE_STATUSES = frozenset({429, 503})
# After a list that did not advance (EndlessListError), that vault is not listed
# again for this long: its listings fail at once with the same error. A list
# that never ends costs at most MAX_EMPTY_PAGES requests per 30 s, whatever the
# refresh interval (a starting agent with `refresh: 1s` retries every second).
ENDLESS_LIST_HOLD_S = 30.0

# A Date header is 29 characters (RFC 9110 IMF-fixdate); longer is not a date.
MAX_DATE_CHARS = 64
MAX_EPOCH_S = 253402300799  # 9999-12-31T23:59:59Z

# Vault DNS suffix -> token resource, per cloud [protocol.md B1].
KNOWN_AUDIENCES: Dict[str, str] = {
    "vault.azure.net": "https://vault.azure.net",
    "vault.usgovcloudapi.net": "https://vault.usgovcloudapi.net",
    "vault.azure.cn": "https://vault.azure.cn",
    "vault.microsoftazure.de": "https://vault.microsoftazure.de",
}

# A token provider: (resource, force_refresh) -> bearer token text.
TokenProvider = Callable[[str, bool], str]


class Secret(NamedTuple):
    """One fetched secret version. ``value`` is the UTF-8 bytes of the string
    Key Vault returned, exactly; it never appears in ``repr``. ``answered_at``
    is the vault's own clock when it answered (its ``Date`` header, epoch
    seconds; None when it sent no usable one): :mod:`agent.sync.freshness` judges
    against it whether the version is settled, whatever the VM's clock says."""

    name: str
    version: str
    value: bytes
    content_type: Optional[str] = None
    attributes: SecretAttributes = SecretAttributes()
    answered_at: Optional[float] = None

    def __repr__(self) -> str:
        return f"Secret(name={self.name!r}, version={self.version!r}, value=****)"


FetchOutcome = Union[Secret, KvAgentError]


def audience_for_host(host: str) -> Optional[str]:
    """The token resource for a vault host under a known cloud suffix."""
    host = host.lower().rstrip(".")
    for suffix, resource in KNOWN_AUDIENCES.items():
        if host.endswith("." + suffix):
            return resource
    return None


def parse_challenge(header: str) -> Dict[str, str]:
    """Parameters of a ``WWW-Authenticate: Bearer k="v", ...`` header (lower-
    cased keys); empty when it is not a Bearer challenge [protocol.md B6]."""
    scheme, _, rest = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return {}
    params: Dict[str, str] = {}
    for item in rest.split(","):
        key, sep, value = item.strip().partition("=")
        if sep:
            params[key.strip().lower()] = value.strip().strip('"')
    return params


def audience_from_challenge(host: str, header: str) -> str:
    """Choose the token resource a 401 challenge asks for, if it is safe.

    The resource must be a known Key Vault audience, and (except on loopback)
    the vault host must lie under it, so a server can never make the agent
    fetch a token for something else. Raises VaultError otherwise.
    """
    params = parse_challenge(header)
    resource = params.get("resource") or params.get("scope", "").removesuffix("/.default")
    resource = resource.rstrip("/")
    if resource not in KNOWN_AUDIENCES.values():
        raise VaultError(
            f"vault {host} asked for a token for '{escape(resource, 100) or '?'}', "
            "which is not a Key Vault audience; no token was sent",
            "check the vault URL in the manifest")
    if not is_loopback_host(host) and not host.lower().endswith(
        "." + urlsplit(resource).hostname  # type: ignore[operator]
    ):
        raise VaultError(
            f"vault {host} is not under {urlsplit(resource).hostname}, the domain of the "
            "token it asked for; no token was sent",
            "use the vault's own https://<name>.vault.azure.net URL")
    return resource


def secret_url(vault: str, name: str, version: Optional[str]) -> str:
    """``{vault}/secrets/{name}[/{version}]`` with both parts URL-quoted."""
    url = f"{vault}/secrets/{quote(name, safe='')}"
    return f"{url}/{quote(version, safe='')}" if version else url


def parse_secret_bundle(name: str, body: bytes, answered_at: Optional[float] = None) -> Secret:
    """A Secret from a 200 SecretBundle (``answered_at``: see Secret); raises
    VaultError (never quoting the body, which holds the value) when the shape
    is wrong, the JSON is not JSON or nested too deeply, or the value cannot
    be UTF-8 (a lone surrogate). The version and content type are escaped:
    they reach logs."""
    content = _json_object(body)
    value = content.get("value")
    if not isinstance(value, str):
        raise VaultError(f"secret '{name}': the vault's response has no usable value",
                         "retry later") from None
    try:
        data = value.encode("utf-8")
    except UnicodeEncodeError:
        raise VaultError(
            f"secret '{name}': the vault's value is not valid Unicode (a lone surrogate)",
            "set the secret's value again in the vault") from None
    raw_id = content.get("id")
    version = raw_id.rstrip("/").rsplit("/", 1)[-1] if isinstance(raw_id, str) else ""
    content_type = content.get("contentType")
    return Secret(name, escape(version, 64), data,
                  escape(content_type, 100) if isinstance(content_type, str) else None,
                  parse_attributes(content), answered_at)


def parse_http_date(value: Optional[str]) -> Optional[float]:
    """Epoch seconds of an HTTP ``Date`` header (``Sun, 06 Nov 1994 08:49:37
    GMT``; the obsolete forms too), or None when it is absent, longer than a
    date can be, unparsable, or outside 1970 to 9999. Never raises: it comes
    from the network."""
    if not value or len(value) > MAX_DATE_CHARS:
        return None
    try:
        parts = email.utils.parsedate_tz(value)
        seconds = email.utils.mktime_tz(parts) if parts is not None else None
    except (TypeError, ValueError, OverflowError, IndexError):
        return None
    if seconds is None or not 0 <= seconds <= MAX_EPOCH_S:
        return None
    return float(seconds)


def _json_object(body: bytes) -> Dict[str, Any]:
    """The body as a JSON object, or {} when it is anything else."""
    try:
        content = load_json(body)
    except ValueError:
        return {}
    return content if isinstance(content, dict) else {}


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""


def parse_error(body: bytes) -> Tuple[str, str, str]:
    """(code, inner code, first line of message) of a KeyVaultError body,
    each escaped and bounded; empty strings for whatever is missing or odd."""
    error = _json_object(body).get("error")
    if not isinstance(error, dict):
        return "", "", ""
    inner = error.get("innererror")
    inner_code = _text(inner.get("code")) if isinstance(inner, dict) else ""
    lines = _text(error.get("message")).strip().splitlines()
    return (escape(_text(error.get("code")), 100), escape(inner_code, 100),
            escape(lines[0], 300) if lines else "")


def error_for_status(name: str, status: int, body: bytes) -> VaultError:
    """The per-secret error for a final non-200 status, worded with the fix."""
    if status == 404:
        code, inner, _ = parse_error(body)
        detail = f" ({inner or code})" if inner or code else ""
        return SecretNotFoundError(
            f"secret '{name}': not found in the vault (404{detail})",
            "check the name and version in the manifest, or recover a deleted secret")
    return _refusal(f"secret '{name}':", status, body, permission="get",
                    fallback="check the manifest entry")


def _refusal(prefix: str, status: int, body: bytes, *, permission: str,
             fallback: str) -> VaultError:
    """The error for a final non-200 answer to a GET of a secret or of the list,
    ``prefix`` naming what was asked for; ``permission`` is the access-policy
    permission that request needs ('get' or 'list')."""
    code, inner, message = parse_error(body)
    detail = f" ({inner or code})" if inner or code else ""
    if status == 403:
        if inner == "SecretDisabled":
            return VaultForbiddenError(
                f"{prefix} this version is disabled (403 SecretDisabled)",
                "enable it in the vault, or pin an enabled version")
        if inner == "ForbiddenByFirewall":
            return VaultForbiddenError(
                f"{prefix} the vault's firewall refused this VM (403{detail})",
                "allow this VM's network or private endpoint in the vault's networking")
        return VaultForbiddenError(
            f"{prefix} permission denied (403{detail})",
            "grant this VM's identity the 'Key Vault Secrets User' role on the vault, "
            f"or a '{permission}' secret access policy")
    if status == 401:
        return VaultError(f"{prefix} the vault rejected the identity's token (401{detail}: "
                          f"{message})", "check the vault's tenant and the token audience")
    if status == 429:
        return VaultThrottledError(
            f"{prefix} throttled by the vault (429)",
            "the vault's request limit was reached; fewer refreshes or fewer agents")
    if status >= 500 or status == 408:
        return VaultUnavailableError(f"{prefix} the vault kept failing (HTTP {status}{detail})",
                                     "retry later")
    if 300 <= status < 400:
        return VaultError(f"{prefix} the vault answered with a redirect (HTTP {status}); "
                          "not followed, a token never leaves the vault's URL",
                          "use the vault's canonical URL in the manifest")
    return VaultError(f"{prefix} HTTP {status}{detail} {message}".rstrip(), fallback)


def _request_failed(vault: str, exc: Exception, prefix: str) -> VaultError:
    """The error for a request that got no usable HTTP answer."""
    if isinstance(exc, requests.exceptions.SSLError):
        return VaultUnavailableError(
            f"{prefix}TLS with vault {vault} failed (certificate not trusted or wrong host)",
            "check the vault URL; for a private CA set REQUESTS_CA_BUNDLE")
    if isinstance(exc, (transport.ResponseTooLargeError, transport.BadResponseError)):
        return VaultError(f"{prefix}vault {vault} sent an unusable response: "
                          f"{transport.describe_failure(exc)}",
                          "check that the manifest's vault URL is a Key Vault")
    if isinstance(exc, transport.AbortedError):
        return VaultUnavailableError(f"{prefix}request to vault {vault} {exc}",
                                     "none: its file is kept as it was")
    if isinstance(exc, transport.DeadlineExceededError):
        return VaultUnavailableError(
            f"{prefix}vault {vault} too slow: {transport.describe_failure(exc)}",
            "check the network path to the vault; retry later")
    return VaultUnavailableError(
        f"{prefix}vault {vault} unreachable ({transport.describe_failure(exc)})",
        "check DNS, network and firewall")


def _is_retryable(exc: Exception) -> bool:
    """Connection failures and timeouts are worth another try; a TLS failure
    or a bad body will be the same next time."""
    return not isinstance(exc, (requests.exceptions.SSLError, transport.ResponseTooLargeError,
                                transport.BadResponseError, transport.AbortedError))


def vault_label(vault: str) -> str:
    """A short name for STATUS=: the first DNS label (``contoso-kv``), or
    ``host:port`` for an IP literal or localhost (the emulator)."""
    parts = urlsplit(vault)
    host = parts.hostname or ""
    if is_loopback_host(host) or ":" in host or host.replace(".", "").isdigit():
        return parts.netloc
    return host.split(".")[0]


def ca_bundle(environ: Mapping[str, str]) -> Union[str, bool]:
    """The CA bundle to verify the vault with, by requests' convention:
    ``REQUESTS_CA_BUNDLE``, then ``CURL_CA_BUNDLE``, else the default store.

    Raises ConfigError (exit 78: fix the configuration, do not retry) naming
    the variable when it points at nothing, so a typo is one clear line, not
    a TLS failure per secret.
    """
    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        path = environ.get(name)
        if path:
            if not os.path.exists(path):
                raise ConfigError(f"{name}={path} does not exist",
                                  f"point {name} at a PEM CA bundle, or unset it")
            return path
    return True


def proxies_for(url: str, environ: Mapping[str, str]) -> Dict[str, str]:
    """The proxy for ``url`` by the usual variables (``https_proxy``,
    ``all_proxy``, upper case too), unless ``no_proxy`` names its host."""
    host = (urlsplit(url).hostname or "").lower()
    no_proxy = environ.get("no_proxy") or environ.get("NO_PROXY") or ""
    for entry in (e.strip().lower().lstrip(".") for e in no_proxy.split(",")):
        if entry == "*" or (entry and (host == entry or host.endswith("." + entry))):
            return {}
    for name in ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        if environ.get(name):
            return {"https": environ[name]}
    return {}


def new_session(environ: Mapping[str, str], pool_size: int = MAX_CONCURRENCY
                ) -> requests.Session:
    """A keep-alive session whose pool fits the fetch concurrency, whose
    requests :func:`agent.base.transport.bounded_get` bounds in total time, and
    whose retries are ours (urllib3's are off) so Retry-After and budgets
    are honoured.

    ``trust_env`` is off and the environment is read once, here and in
    :func:`proxies_for`: requests would otherwise consult ~/.netrc on every
    request and, finding the vault's host there, replace our bearer header
    with Basic credentials; it also saves a fifth of each request's CPU.
    """
    session = transport.new_session(pool_size, target="vault")
    session.verify = ca_bundle(environ)
    return session


class VaultClient:
    """Fetches secrets from Key Vault with tokens from ``tokens``.

    Thread-safe: audience discovery is done once per vault under a lock;
    ``fetch_many`` shares one session across a bounded pool; a Retry-After
    from a vault pauses every thread's requests to it (:class:`Pause`).
    ``is_slow_start`` (the daemon): the first request to each vault goes
    alone, then 2, 4 ... at once, so a fleet booting into a saturated vault
    does not send it 16 requests per VM before hearing its first 429.
    ``gives_way`` (set by the daemon once it is ready): a request that the
    vault's pause holds back (a 429 or 503 said wait) ends at once, unsent, as
    that answer, instead of waiting the pause out: its file is kept, the
    refresh fails and the lifecycle retries it later (agent.daemon.lifecycle). An
    agent holding every file loses nothing by waiting, and a fleet of them
    that found the vault unavailable then waits outside the refresh, spread
    by the lifecycle, instead of every agent inside it sending its secrets
    the moment the vault answers again (issue 12, fleet: per-secret refresh
    after an outage, 53 windows over the limit before). ``on_retry``
    hears (reason, attempt, delay) before each retry sleep, the reason worded
    ``waiting for vault <name>: <cause>`` for STATUS=.
    """

    def __init__(
        self,
        session: requests.Session,
        tokens: TokenProvider,
        *,
        policy: RetryPolicy = RetryPolicy(deadline_s=60.0),
        concurrency: int = MAX_CONCURRENCY,
        api_version: str = API_VERSION,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        environ: Mapping[str, str] = {},
        on_retry: Optional[Callable[[str, int, float], None]] = None,
        is_slow_start: bool = False,
    ) -> None:
        self._session = session
        self._is_slow_start = is_slow_start
        self._environ = environ
        self._tokens = tokens
        self._policy = policy
        self._concurrency = max(1, concurrency)
        self._api_version = api_version
        self._clock = clock
        self._sleep = sleep
        self._on_retry = on_retry
        self._audiences: Dict[str, str] = {}
        self._audience_lock = threading.Lock()
        # Per vault: its Retry-After pause, and the throttled reply that set it.
        self._pauses: Dict[str, Pause] = {}
        self._paused_by: Dict[str, transport.Reply] = {}
        self._pause_lock = threading.Lock()  # not the audience's: its challenge sends
        # Per vault: until when (clock) a list that did not advance is not tried again.
        self._endless: Dict[str, Tuple[float, EndlessListError]] = {}
        self._proxies_by_vault: Dict[str, Dict[str, str]] = {}
        self.gives_way = False  # see the class docstring

    def fetch_many(self, requests_: Sequence[Source]) -> List[FetchOutcome]:
        """Fetch every request concurrently (bounded); one outcome per request,
        in order: a Secret or the KvAgentError for that secret. See
        :meth:`fetch_each`."""
        return list(self.fetch_each(requests_))

    def fetch_each(self, requests_: Sequence[Source]
                   ) -> Generator[FetchOutcome, None, None]:
        """As :meth:`fetch_many`, one outcome at a time and in order, a batch
        of them (ARRIVAL_BATCH) as soon as the batch arrived: the caller
        writes the first secrets while later ones are in flight (a batch, not
        each: one wake-up per outcome cost more CPU than the overlap saved).
        Closing the generator early cancels the requests not yet sent and
        waits for those in flight.

        Each vault's audience and token are settled first, one vault at a time,
        so the fan-out starts with a cached token (one IMDS call per run) and
        an IMDS outage surfaces once, as IdentityUnavailableError, not once per
        thread. A vault whose challenge fails fails only its own secrets.
        """
        vault_errors: Dict[str, KvAgentError] = {}
        for request in requests_:
            if request.vault in vault_errors or request.vault in self._audiences:
                continue
            try:
                probe = secret_url(request.vault, request.name, request.version)
                self._tokens(self._audience(request.vault, probe), False)
            except VaultError as exc:
                vault_errors[request.vault] = exc

        def outcome(request: Source) -> FetchOutcome:
            if request.vault in vault_errors:
                return vault_errors[request.vault]
            try:
                return self.fetch_secret(request)
            except KvAgentError as exc:
                return exc

        if len(requests_) <= 1:
            yield from (outcome(request) for request in requests_)
            return
        workers = min(self._concurrency, len(requests_))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fetch") as pool:
            futures = [pool.submit(outcome, request) for request in requests_]
            try:
                for start in range(0, len(futures), ARRIVAL_BATCH):
                    batch = futures[start:start + ARRIVAL_BATCH]
                    wait(batch)
                    yield from (future.result() for future in batch)
            finally:
                for future in futures:
                    future.cancel()  # those not yet started, when closed early

    def fetch_secret(self, request: Source) -> Secret:
        """GET one secret. Raises a VaultError subclass naming the secret."""
        url = secret_url(request.vault, request.name, request.version)
        audience = self._audience(request.vault, url)
        reply = self._exchange(request.vault, url, None, audience, self._backoff(),
                               f"secret '{request.name}': ")
        if reply.status == 200:
            return parse_secret_bundle(request.name, reply.body,
                                       parse_http_date(reply.headers.get("Date")))
        raise error_for_status(request.name, reply.status, reply.body)

    def list_secrets(self, vault: str, limits: ListLimits = ListLimits()
                     ) -> Tuple[SecretItem, ...]:
        """Every secret's properties (never a value) on ``vault``, in the
        vault's order, following ``nextLink`` verbatim until it is null.

        Empty pages with a nextLink are not the end [protocol.md B4]. A
        nextLink is followed only to the vault itself
        (:func:`agent.vault.listing.check_next_link`), each at most once. The
        listing is bounded by ``limits`` (pages, items, total seconds); going
        past one is an error, never a silently shorter list. A list that does
        not advance (``max_empty_pages`` empty pages in a row, or more pages
        than :func:`agent.vault.listing.page_bound` allows) is EndlessListError,
        and the same error, without a request, for ENDLESS_LIST_HOLD_S after
        it. Raises a VaultError subclass naming the vault.
        """
        held = self._endless.get(vault)
        if held is not None and self._clock() < held[0]:
            raise held[1]  # it did not end a moment ago: no request (ENDLESS_LIST_HOLD_S)
        try:
            return self._list_pages(vault, limits)
        except EndlessListError as exc:
            self._endless[vault] = (self._clock() + ENDLESS_LIST_HOLD_S, exc)
            raise

    def _list_pages(self, vault: str, limits: ListLimits) -> Tuple[SecretItem, ...]:
        """The listing itself (see :meth:`list_secrets`)."""
        url = vault + LIST_PATH
        params: Mapping[str, str] = {"api-version": self._api_version,
                                     "maxresults": str(PAGE_SIZE)}
        audience = self._audience(vault, url)
        deadline = self._clock() + limits.deadline_s
        items: List[SecretItem] = []
        followed: Set[str] = set()
        empty = 0  # empty pages in a row
        for number in range(1, limits.max_pages + 1):
            page = self._list_page(vault, url, params, audience, number, deadline, limits)
            items.extend(page.items)
            if len(items) > limits.max_items:
                raise ListTooLongError(
                    f"listing vault {vault}: more than {limits.max_items} secrets",
                    "list a smaller vault, or raise the limit")
            if page.next_link is None:
                return tuple(items)
            empty = 0 if page.items else empty + 1
            _check_advancing(vault, number, empty, len(items), limits)
            if page.next_link in followed:
                raise VaultError(f"listing vault {vault}: page {number}'s nextLink repeats an "
                                 "earlier page (a paging loop)", "retry later")
            followed.add(page.next_link)
            url, params = page.next_link, {}  # the nextLink carries its own query
        raise ListTooLongError(f"listing vault {vault}: more than {limits.max_pages} pages",
                               "list a smaller vault, or raise the limit")

    def _list_page(self, vault: str, url: str, params: Mapping[str, str], audience: str,
                   number: int, deadline: float, limits: ListLimits) -> Page:
        """Page ``number`` of the list, its nextLink (if any) checked safe to
        follow; retried within what is left of the listing's deadline."""
        prefix = f"listing vault {vault}: "
        left = deadline - self._clock()
        if left <= 0:
            raise VaultUnavailableError(
                f"{prefix}not done after {limits.deadline_s:g} s ({number - 1} pages)",
                "retry later")
        backoff = self._backoff(min(self._policy.deadline_s, left))
        reply = self._exchange(vault, url, params, audience, backoff, prefix)
        if reply.status != 200:
            raise _list_error(vault, reply.status, reply.body)
        try:
            page = parse_page(load_json(reply.body))
            if page.next_link is not None:
                check_next_link(page.next_link, vault)
        except ValueError as exc:
            raise VaultError(f"{prefix}page {number} is unusable: {exc}; nothing more was sent",
                             "check that the vault URL is a Key Vault") from None
        return page

    def _backoff(self, deadline_s: Optional[float] = None) -> Backoff:
        policy = self._policy if deadline_s is None else self._policy._replace(
            deadline_s=deadline_s)
        return Backoff(policy, clock=self._clock, sleep=self._sleep, on_retry=self._on_retry)

    @staticmethod
    def _reason(vault: str, failure: Union[int, Exception]) -> str:
        """``waiting for vault contoso-kv: connection refused`` (or ``HTTP 503``)."""
        cause = (f"HTTP {failure}" if isinstance(failure, int)
                 else transport.describe_failure(failure))
        return f"waiting for vault {vault_label(vault)}: {cause}"

    def _exchange(self, vault: str, url: str, params: Optional[Mapping[str, str]],
                  audience: Optional[str], backoff: Backoff, prefix: str) -> transport.Reply:
        """GET ``url`` until an answer that is not transient: the one send loop.

        With an ``audience`` the request carries its token, and one 401 gets
        one fresh token; without, it is sent unauthenticated (to elicit the
        challenge). Connection failures, 408, 429 and 5xx are retried within
        ``backoff``, honouring Retry-After [protocol.md B8]; the last reply is
        returned for the caller to judge. A request that got no usable answer
        raises its VaultError, ``prefix`` naming what was asked.
        """
        fresh_token_taken = False
        pause = self._pause(vault)
        while True:
            paused_by = (None if self._wait_for(vault, pause, backoff)
                         else self._paused_by.get(vault))
            if paused_by is not None:
                return paused_by  # paused past this request's budget: the vault's answer
            token = self._tokens(audience, False) if audience is not None else None
            sent_at = self._clock()
            try:
                reply = self._get(vault, url, token, backoff, params)
            except requests.RequestException as exc:
                pause.answered(sent_at)
                if _is_retryable(exc) and backoff.wait(self._reason(vault, exc)):
                    continue
                raise _request_failed(vault, exc, prefix) from None
            except BaseException:
                pause.answered(sent_at)  # nothing came back: never hold the others
                raise
            retry_after = self._heard(vault, pause, reply, sent_at)
            if reply.status == 401 and audience is not None and not fresh_token_taken:
                # A revoked or rotated token: ask IMDS for a new one, once.
                self._tokens(audience, True)
                fresh_token_taken = True
                continue
            if reply.status in RETRY_STATUSES:
                if backoff.wait(self._reason(vault, reply.status), retry_after):
                    continue
            return reply

    def _paused_reason(self, vault: str) -> str:
        """``waiting for vault contoso-kv: HTTP 503`` for the answer that paused it."""
        paused_by = self._paused_by.get(vault)
        return self._reason(vault, paused_by.status if paused_by is not None else 429)

    def _heard(self, vault: str, pause: Pause, reply: transport.Reply,
               sent_at: float) -> Optional[float]:
        """Tell the vault's pause about ``reply`` to a request sent at
        ``sent_at``: a 429 or 503 (or any Retry-After) pauses every thread of
        this agent, not only this one. Returns the seconds this request waits
        before it is sent again (at least the pause), None when nothing said."""
        retry_after = (parse_retry_after(reply.headers.get("Retry-After"))
                       if reply.status in RETRY_STATUSES else None)
        if retry_after is None and reply.status not in PAUSE_STATUSES:
            pause.answered(sent_at)
            return None
        self._paused_by[vault] = reply
        now = self._clock()
        pause.throttled(now, min(retry_after or 0.0, self._policy.max_retry_after_s))
        return max(retry_after or 0.0, pause.remaining(now))

    def _pause(self, vault: str) -> Pause:
        """The vault's shared Retry-After pause (made on first use)."""
        pause = self._pauses.get(vault)
        if pause is None:
            with self._pause_lock:
                pause = self._pauses.setdefault(vault, Pause(
                    REQUEST_TOTAL_S, self._policy, max_in_flight=self._concurrency,
                    is_slow_start=self._is_slow_start))
        return pause

    def _wait_for(self, vault: str, pause: Pause, backoff: Backoff) -> bool:
        """Sleep while the vault's pause holds this request back (another
        thread's probe is out, or Retry-After has not passed). False when the
        vault said wait and this client gives way, or when the wait would
        outlast the request's budget and its policy does not keep the final
        attempt (the running agent): it ends as throttled, unsent (or, held
        back only by the slow start, is sent at once). With the final attempt
        kept (``kv-agent once``) a pause past the budget is slept up to the
        deadline and the request is sent then, as the final attempt."""
        while True:
            delay = pause.admit(self._clock())
            if delay <= 0:
                return True
            if self.gives_way and pause.remaining(self._clock()) > 0:
                return False
            if delay > backoff.time_left():
                return backoff.wait_to_deadline(self._paused_reason(vault))
            if pause.remaining(self._clock()) > 0:
                self._sleep(delay)  # the vault said wait: a sleep a stop cuts short
            else:
                pause.wait(delay)  # another request is out: its answer wakes this one
                self._sleep(0)  # (and a stop is still noticed)

    def _get(self, vault: str, url: str, token: Optional[str], backoff: Backoff,
             params: Optional[Mapping[str, str]] = None) -> transport.Reply:
        """One bounded GET of ``url`` on ``vault``, with the token if given,
        and ``params`` (default: the api-version; ``{}`` for a nextLink,
        which carries its own query).

        First checks that urllib3 will connect to exactly the vault's host
        and port: nothing is sent otherwise (issue 9, item 1).
        """
        try:
            check_target(url, vault)
        except ValueError as exc:
            raise VaultError(f"{exc}; nothing was sent",
                             "write the vault as https://<name>.vault.azure.net") from None
        headers = {"Accept": "application/json"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        # bounded_get never follows a redirect: it would carry the token elsewhere.
        return transport.bounded_get(
            self._session, url,
            params={"api-version": self._api_version} if params is None else params,
            headers=headers, timeout=TIMEOUT_S, total_s=backoff.request_budget(REQUEST_TOTAL_S),
            max_bytes=MAX_BODY_BYTES, proxies=self._proxies(vault))

    def _proxies(self, vault: str) -> Dict[str, str]:
        """:func:`proxies_for` the vault, worked out once per vault: every URL
        sent goes to the vault's own host (check_target), and the proxy
        variables are read once (they were six lookups a request)."""
        known = self._proxies_by_vault.get(vault)
        if known is None:
            known = self._proxies_by_vault.setdefault(vault, proxies_for(vault, self._environ))
        return known

    def _audience(self, vault: str, probe_url: str) -> str:
        """The token resource for ``vault``; discovered once per vault (from
        the 401 to an unauthenticated GET of ``probe_url`` when the host is
        not under a known cloud), after checking that the vault URL is a
        strict, normalised one."""
        with self._audience_lock:
            known = self._audiences.get(vault)
            if known is not None:
                return known
            _check_vault_url(vault)
            host = urlsplit(vault).hostname or ""
            audience = audience_for_host(host) or self._challenge(vault, host, probe_url)
            self._audiences[vault] = audience
            return audience

    def _challenge(self, vault: str, host: str, probe_url: str) -> str:
        """Elicit the 401 challenge with an unauthenticated request. Retry-After
        is honoured here too: this is the run's first vault request, so a
        throttled vault usually answers it first [protocol.md B8]."""
        reply = self._exchange(vault, probe_url, None, None, self._backoff(), "")
        if reply.status in RETRY_STATUSES:
            raise _challenge_failed(vault, reply.status, reply.body)
        challenge = reply.headers.get("WWW-Authenticate", "")
        if reply.status != 401 or not challenge:
            raise VaultError(
                f"vault {vault} did not send a Key Vault authentication challenge "
                f"(HTTP {reply.status})", "check that the manifest's vault URL is a Key Vault")
        return audience_from_challenge(host, challenge)

    # -- probes for `kv-agent doctor` (agent/doctor/checks.py)

    def knock(self, vault: str) -> transport.Reply:
        """One unauthenticated GET of ``vault``'s secret list, sent once, never
        retried, with no token: its answer (normally a 401 with the challenge)
        shows that DNS, TCP and TLS (verified as every request verifies it)
        work. Raises VaultError when the URL is refused (nothing is sent),
        else requests.RequestException as :func:`agent.base.transport.bounded_get`
        does, so the caller can tell a TLS failure from a timeout."""
        _check_vault_url(vault)
        return self._get(vault, vault + LIST_PATH, None, self._backoff())

    def probe_secret(self, request: Source) -> "Probed":
        """GET one secret exactly as :meth:`fetch_secret` does (audience,
        token, retries, one fresh token after a 401), but return a refusal
        instead of raising it. Raises VaultError (or IdentityUnavailableError)
        only when no answer came at all."""
        url = secret_url(request.vault, request.name, request.version)
        audience = self._audience(request.vault, url)
        reply = self._exchange(request.vault, url, None, audience, self._backoff(),
                               f"secret '{request.name}': ")
        if reply.status == 200:
            return Probed(200, secret=parse_secret_bundle(request.name, reply.body))
        return Probed(reply.status, body=reply.body,
                      error=error_for_status(request.name, reply.status, reply.body))


def _check_vault_url(vault: str) -> None:
    """Refuse a vault URL that is not strict and normalised (one built
    outside the manifest, say); raises VaultError, nothing is sent."""
    try:
        normalized = normalize_vault_url(vault)
    except ValueError as exc:
        raise VaultError(f"vault URL refused, no request sent: {exc}") from None
    if normalized != vault:
        raise VaultError(f"vault URL {vault!r} is not in its normal form {normalized}; "
                         "no request sent", "write the vault URL as the manifest does")


def _challenge_failed(vault: str, status: int, body: bytes) -> VaultError:
    """The vault kept failing (5xx, 408, 429) before it sent a challenge."""
    if status == 429:
        return VaultThrottledError(
            f"vault {vault}: throttled (429) before it sent its challenge",
            "the vault's request limit was reached; fewer refreshes or fewer agents")
    code, inner, _ = parse_error(body)
    detail = f" ({inner or code})" if inner or code else ""
    return VaultUnavailableError(f"vault {vault} kept failing (HTTP {status}{detail})",
                                 "retry later")


def _check_advancing(vault: str, number: int, empty: int, items: int,
                     limits: ListLimits) -> None:
    """Raise EndlessListError when the listing, at page ``number`` with
    ``empty`` empty pages in a row and ``items`` secrets so far, still has a
    nextLink but has stopped advancing (issue 17, item 8)."""
    if empty >= limits.max_empty_pages:
        raise EndlessListError(
            f"listing vault {vault}: {empty} empty pages in a row, each with a new nextLink "
            "(a list that does not advance); nothing more was sent", "retry later")
    bound = page_bound(limits.known_size, items)
    if bound is not None and number >= bound:
        raise EndlessListError(
            f"listing vault {vault}: {number} pages brought {items} secrets (the vault held "
            f"{limits.known_size} at its last listing), and the list still does not end; "
            "nothing more was sent", "retry later")


def _list_error(vault: str, status: int, body: bytes) -> VaultError:
    """The error for a final non-200 answer to a list request."""
    return _refusal(f"listing vault {vault}:", status, body, permission="list",
                    fallback="check that the manifest's vault URL is a Key Vault")


# -- probes for `kv-agent doctor` (agent/doctor/checks.py) ------------------------------


class Probed(NamedTuple):
    """A secret GET's final answer, not raised: the Secret of a 200, or for
    any other status its VaultError and the error body (KeyVaultError JSON,
    never a value), whose inner code and message say which fix applies."""

    status: int
    secret: Optional[Secret] = None
    error: Optional[VaultError] = None
    body: bytes = b""
