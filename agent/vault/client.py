"""Key Vault secrets client: GET one secret, many concurrently, or the list.

Where a token may go is the security boundary of this wing:

* only over HTTPS, only to the vault's own URL (built from the manifest, never
  from a response), and never along a redirect;
* only a token for a known Key Vault audience (:mod:`agent.vault.audience`:
  from the vault's DNS suffix, or a 401 challenge checked against it).

The host a token goes to is checked twice: the vault URL must be a strict
host name (:mod:`agent.vault.url`), and before every request the host urllib3
will really connect to must be that host, so parser differences
(``https://evil.example\\.vault.azure.net``) cannot redirect a token.

Every request is bounded in total time and size (:mod:`agent.base.transport`),
every body is untrusted (parse failures are one secret's VaultError, text is
escaped before it can reach a log), transient failures are retried with
backoff, paced per vault (429 honouring Retry-After, one pause per vault
shared by every thread: :mod:`agent.vault.pacing`), and one 401 triggers one
fresh token; one send loop (:meth:`VaultClient._exchange`) does all of that
for every request; a failure's error is worded in :mod:`agent.vault.failures`.
Concurrency is a bounded thread pool over one keep-alive session.
The list's pages and items are parsed in :mod:`agent.vault.listing`.
"""

from __future__ import annotations

import email.utils
import os
import time
from concurrent.futures import ThreadPoolExecutor, wait
from typing import (
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
    VaultError,
    VaultUnavailableError,
)
from agent.base.retry import Backoff, RetryPolicy
from agent.base.untrusted import escape, load_json
from agent.pipeline.sources import SecretAttributes, Source, parse_attributes
from agent.vault.audience import Audiences, check_vault_url
from agent.vault.failures import (
    error_for_status,
    is_retryable,
    json_object,
    list_error,
    request_failed,
)
from agent.vault.listing import (
    LIST_PATH,
    PAGE_SIZE,
    ListLimits,
    Page,
    SecretItem,
    check_advancing,
    check_next_link,
    parse_page,
)
from agent.vault.pacing import RETRY_STATUSES, Pacing, waiting_reason
from agent.vault.url import check_target

API_VERSION = "7.6"  # GA; everything kv-agent uses exists since 7.0 [protocol.md B2]
MAX_CONCURRENCY = 16
ARRIVAL_BATCH = 32  # outcomes fetch_each hands over at once
# A secret is at most 25 KB [protocol.md B7]; larger ones are accepted up to
# this bound (docs/design/limits.md), which applies after any gzip decoding.
MAX_BODY_BYTES = 256 * 1024
TIMEOUT_S: Tuple[float, float] = (5.0, 20.0)  # connect, each read
REQUEST_TOTAL_S = 30.0  # one request, start to last byte (see agent.base.transport)
# After a list that did not advance (EndlessListError), that vault is not listed
# again for this long: its listings fail at once with the same error. A list
# that never ends costs at most MAX_EMPTY_PAGES requests per 30 s, whatever the
# refresh interval (a starting agent with `refresh: 1s` retries every second).
ENDLESS_LIST_HOLD_S = 30.0

# A Date header is 29 characters (RFC 9110 IMF-fixdate); longer is not a date.
MAX_DATE_CHARS = 64
MAX_EPOCH_S = 253402300799  # 9999-12-31T23:59:59Z

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
    content = json_object(body)
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

    Thread-safe: audience discovery is done once per vault under a lock
    (:class:`agent.vault.audience.Audiences`); ``fetch_many`` shares one
    session across a bounded pool; ``pacing`` (:class:`agent.vault.pacing.Pacing`)
    decides when each request to a vault may go: a Retry-After from a vault
    pauses every thread's requests to it; ``is_slow_start`` (the daemon): the
    first request to each vault goes alone, then 2, 4 ... at once; once the
    daemon is ready it has the pacing give way (``pacing.give_way``).
    ``on_retry`` hears (reason, attempt, delay) before each retry sleep, the
    reason worded ``waiting for vault <name>: <cause>`` for STATUS=.
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
        self._environ = environ
        self._tokens = tokens
        self._policy = policy
        self._concurrency = max(1, concurrency)
        self._api_version = api_version
        self._clock = clock
        self._sleep = sleep
        self._on_retry = on_retry
        self._audiences = Audiences(
            lambda vault, url: self._exchange(vault, url, None, None, self._backoff(), ""))
        self.pacing = Pacing(policy, max_in_flight=self._concurrency,
                             probe_timeout_s=REQUEST_TOTAL_S, is_slow_start=is_slow_start,
                             clock=clock, sleep=sleep)
        # Per vault: until when (clock) a list that did not advance is not tried again.
        self._endless: Dict[str, Tuple[float, EndlessListError]] = {}
        self._proxies_by_vault: Dict[str, Dict[str, str]] = {}

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
                self._tokens(self._audiences.get(request.vault, probe), False)
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
        audience = self._audiences.get(request.vault, url)
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
        audience = self._audiences.get(vault, url)
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
            check_advancing(vault, number, empty, len(items), limits)
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
            raise list_error(vault, reply.status, reply.body)
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
        while True:
            paused_by = self.pacing.take_turn(vault, backoff)
            if paused_by is not None:
                return paused_by  # paused past this request's budget: the vault's answer
            token = self._tokens(audience, False) if audience is not None else None
            sent_at = self._clock()
            try:
                reply = self._get(vault, url, token, backoff, params)
            except requests.RequestException as exc:
                self.pacing.answered(vault, sent_at)
                if is_retryable(exc) and backoff.wait(waiting_reason(vault, exc)):
                    continue
                raise request_failed(vault, exc, prefix) from None
            except BaseException:
                self.pacing.answered(vault, sent_at)  # nothing came back: never hold the others
                raise
            retry_after = self.pacing.heard(vault, reply, sent_at)
            if reply.status == 401 and audience is not None and not fresh_token_taken:
                # A revoked or rotated token: ask IMDS for a new one, once.
                self._tokens(audience, True)
                fresh_token_taken = True
                continue
            if reply.status in RETRY_STATUSES:
                if backoff.wait(waiting_reason(vault, reply.status), retry_after):
                    continue
            return reply

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

    # -- probes for `kv-agent doctor` (agent/doctor/checks.py)

    def knock(self, vault: str) -> transport.Reply:
        """One unauthenticated GET of ``vault``'s secret list, sent once, never
        retried, with no token: its answer (normally a 401 with the challenge)
        shows that DNS, TCP and TLS (verified as every request verifies it)
        work. Raises VaultError when the URL is refused (nothing is sent),
        else requests.RequestException as :func:`agent.base.transport.bounded_get`
        does, so the caller can tell a TLS failure from a timeout."""
        check_vault_url(vault)
        return self._get(vault, vault + LIST_PATH, None, self._backoff())

    def probe_secret(self, request: Source) -> "Probed":
        """GET one secret exactly as :meth:`fetch_secret` does (audience,
        token, retries, one fresh token after a 401), but return a refusal
        instead of raising it. Raises VaultError (or IdentityUnavailableError)
        only when no answer came at all."""
        url = secret_url(request.vault, request.name, request.version)
        audience = self._audiences.get(request.vault, url)
        reply = self._exchange(request.vault, url, None, audience, self._backoff(),
                               f"secret '{request.name}': ")
        if reply.status == 200:
            return Probed(200, secret=parse_secret_bundle(request.name, reply.body))
        return Probed(reply.status, body=reply.body,
                      error=error_for_status(request.name, reply.status, reply.body))


# -- probes for `kv-agent doctor` (agent/doctor/checks.py) ------------------------------


class Probed(NamedTuple):
    """A secret GET's final answer, not raised: the Secret of a 200, or for
    any other status its VaultError and the error body (KeyVaultError JSON,
    never a value), whose inner code and message say which fix applies."""

    status: int
    secret: Optional[Secret] = None
    error: Optional[VaultError] = None
    body: bytes = b""
