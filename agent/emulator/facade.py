"""The :class:`Emulator`: both services on loopback, with state and faults under test control.

It wires the parts together (token issuer, secret store, fault queue, the two
handlers, two servers) and is the only class tests and the CLI need.
"""

from __future__ import annotations

import logging
import shutil
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

from agent.emulator.faults import Fault, FaultQueue, fault_response
from agent.emulator.imds import ImdsApi, imds_headers
from agent.emulator.keyvault import VaultApi, vault_headers
from agent.emulator.secrets_file import (
    IdentityConfig,
    VersionSpec,
    check_name,
    check_value,
    parse_secrets,
)
from agent.emulator.server import Answer, Dispatch, LoopbackServer
from agent.emulator.store import SecretStore
from agent.emulator.tls import generate_certificates
from agent.emulator.tokens import TokenIssuer
from agent.emulator.wire import (
    DEFAULT_TENANT_ID,
    FORBIDDEN_INNER_CODES,
    IMDS,
    IMDS_TOKEN_PATH,
    SERVICES,
    STOP_JOIN_TIMEOUT_S,
    VAULT,
    Request,
    Response,
    imds_error,
    keyvault_error_body,
)

if TYPE_CHECKING:  # never imported at run time
    from typing_extensions import Self  # typing.Self is 3.11+

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RequestRecord:
    """One request as a service saw it, for tests to assert on.

    ``headers`` has lower-case names; ``query`` keeps the last value of a
    repeated parameter; ``status`` is 0 when a fault dropped the connection.
    """

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    status: int




class Emulator:
    """IMDS and a Key Vault on loopback, with state and faults under test control.

    Use as a context manager or call :meth:`start` / :meth:`stop`. All state
    methods are thread-safe and may be called while requests are in flight.
    ``latency_s`` (seconds added to every request of both services) and
    ``token_lifetime_s`` may be changed at any time. ``clock`` (epoch seconds)
    dates tokens and secrets, so tests can age them without sleeping.
    """

    def __init__(
        self,
        secrets: Mapping[str, Any] | None = None,
        *,
        host: str = "127.0.0.1",
        imds_port: int = 0,
        vault_port: int = 0,
        vault_hostname: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        ca_cert: str | None = None,
        cert_dir: str | None = None,
        latency_s: float = 0.0,
        tenant_id: str = DEFAULT_TENANT_ID,
        identities: IdentityConfig | None = None,
        clock: Callable[[], float] = time.time,
        empty_pages: bool = False,
    ) -> None:
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("tls_cert and tls_key must be given together")
        self.host = host
        self.latency_s = latency_s
        self._empty_pages = empty_pages
        self._imds_port = imds_port
        self._vault_port = vault_port
        self._vault_hostname = vault_hostname
        self._tls_cert = tls_cert
        self._tls_key = tls_key
        self._ca_cert = ca_cert
        self._cert_dir = cert_dir
        self._issuer = TokenIssuer(tenant_id, identities or IdentityConfig(), clock)
        self._store = SecretStore(clock)
        self._faults = FaultQueue()
        self._log_lock = threading.Lock()
        self._logs: dict[str, list[RequestRecord]] = {IMDS: [], VAULT: []}
        self._servers: list[LoopbackServer] = []
        self._threads: list[threading.Thread] = []
        self._temp_dir: str | None = None
        self._urls: tuple[str, str, str] | None = None  # imds_base, vault_url, ca_path
        self._vault_api: VaultApi | None = None
        self._imds_api = ImdsApi(self._issuer)
        for name, versions in parse_secrets(secrets, "secrets argument").items():
            for spec in versions:
                self._store.add(name, spec)

    # -- lifecycle

    def start(self) -> Self:
        """Bind both servers and serve them from background threads; returns self."""
        if self._servers:
            raise RuntimeError("emulator already started")
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        cert, key, ca_path = self._certificates()
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(cert, key)
        imds = LoopbackServer((self.host, self._imds_port), self._dispatcher(IMDS))
        self._servers.append(imds)
        vault = LoopbackServer(
            (self.host, self._vault_port), self._dispatcher(VAULT), context
        )
        self._servers.append(vault)
        vault_host = self._vault_hostname or self.host
        vault_port = vault.server_port
        vault_url = f"https://{vault_host}" + (
            "" if vault_port == 443 else f":{vault_port}"
        )
        self._vault_api = VaultApi(
            self._store,
            self._issuer,
            vault_url,
            f"https://{vault_host}:{vault_port}",
            vault_host.split(".")[0] if self._vault_hostname else "kv-emulator",
            self._empty_pages,
        )
        self._urls = (f"http://{self.host}:{imds.server_port}", vault_url, ca_path)
        for server, name in ((imds, "imds"), (vault, "vault")):
            thread = threading.Thread(
                target=server.serve_forever,
                kwargs={"poll_interval": 0.05},
                name=f"kv-emulator-{name}",
                daemon=True,
            )
            thread.start()
            self._threads.append(thread)
        logger.debug("emulator serving IMDS at %s and the vault at %s", *self._urls[:2])

    def _certificates(self) -> tuple[str, str, str]:
        """(server cert, server key, CA path): the given files, or freshly generated ones."""
        if self._tls_cert is not None and self._tls_key is not None:
            return self._tls_cert, self._tls_key, self._ca_cert or self._tls_cert
        directory = self._cert_dir
        if directory is None:
            directory = self._temp_dir = tempfile.mkdtemp(prefix="kv-agent-emulator-")
        hostnames = [name for name in (self._vault_hostname, self.host) if name]
        paths = generate_certificates(directory, hostnames=hostnames)
        return paths.server_cert, paths.server_key, paths.ca_cert

    def stop(self) -> None:
        """Stop serving, cut open connections and remove generated certificates. Idempotent."""
        for server, thread in zip(self._servers, self._threads):
            server.shutdown()  # only valid while serve_forever runs, hence the zip
            thread.join(STOP_JOIN_TIMEOUT_S)
        handlers: list[threading.Thread] = []
        for server in self._servers:
            server.server_close()
            handlers += server.close_connections()
        deadline = time.monotonic() + STOP_JOIN_TIMEOUT_S
        for handler in handlers:
            handler.join(max(0.0, deadline - time.monotonic()))
        self._servers = []
        self._threads = []
        self._urls = None
        self._vault_api = None
        if self._temp_dir is not None:
            shutil.rmtree(self._temp_dir, ignore_errors=True)
            self._temp_dir = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- addresses

    def _started_urls(self) -> tuple[str, str, str]:
        if self._urls is None:
            raise RuntimeError("emulator not started")
        return self._urls

    @property
    def imds_base(self) -> str:
        """``http://host:port``, the form AZURE_POD_IDENTITY_AUTHORITY_HOST takes."""
        return self._started_urls()[0]

    @property
    def imds_endpoint(self) -> str:
        """The full token URL, the form KV_AGENT_IMDS_ENDPOINT takes."""
        return self.imds_base + IMDS_TOKEN_PATH

    @property
    def vault_url(self) -> str:
        """``https://host:port`` (no port when 443), as used in secret ids."""
        return self._started_urls()[1]

    @property
    def ca_path(self) -> str:
        """PEM of the CA that signed the vault's certificate (for REQUESTS_CA_BUNDLE)."""
        return self._started_urls()[2]

    @property
    def empty_pages(self) -> bool:
        """Whether lists open with empty pages that carry a nextLink, as Azure's may (B4).

        Off by default; on, every list starts with EMPTY_PAGES_BEFORE_FIRST pages
        ``{"value":[],"nextLink":"..."}``, every page with items has a nextLink and
        the last page is ``{"value":[],"nextLink":null}``, as in the recording
        ``keyvault__js__recording_can_list_secrets_by_page.json``. A client that
        stops at the first empty page then fails here rather than in Azure.
        """
        return self._empty_pages

    @empty_pages.setter
    def empty_pages(self, enabled: bool) -> None:
        self._empty_pages = enabled
        if self._vault_api is not None:
            self._vault_api.empty_pages = enabled

    @property
    def tenant_id(self) -> str:
        """Tenant in token claims and in the vault's 401 challenge."""
        return self._issuer.tenant_id

    @property
    def token_lifetime_s(self) -> int:
        """Lifetime of newly minted tokens; real managed-identity tokens live about 24 h."""
        return self._issuer.lifetime_s

    @token_lifetime_s.setter
    def token_lifetime_s(self, seconds: int) -> None:
        self._issuer.lifetime_s = seconds

    # -- state

    def set_secret(
        self,
        name: str,
        value: str,
        *,
        enabled: bool = True,
        content_type: str | None = None,
        tags: dict[str, str] | None = None,
        not_before: int | None = None,
        expires_on: int | None = None,
    ) -> str:
        """Add a new version of ``name`` (created if missing); returns its 32-hex version id.

        Raises LookupError while ``name`` is soft-deleted (through the REST API),
        as the service answers 409 then.
        """
        check_name(name, "set_secret")
        spec = VersionSpec(
            check_value(value, f"set_secret {name!r}"),
            enabled,
            content_type,
            dict(tags) if tags is not None else None,
            not_before,
            expires_on,
        )
        return self._store.add(name, spec)

    def disable_secret(self, name: str, version: str | None = None) -> None:
        """Disable a version (the latest when None); GET then answers 403 SecretDisabled."""
        self._store.set_enabled(name, version, False)

    def enable_secret(self, name: str, version: str | None = None) -> None:
        """Undo :meth:`disable_secret`."""
        self._store.set_enabled(name, version, True)

    def delete_secret(self, name: str) -> None:
        """Remove a secret and all its versions at once (a delete plus a purge, no soft-deleted
        copy); raises KeyError when there is none. ``DELETE /secrets/<name>`` soft-deletes."""
        self._store.delete(name)

    def forbid_secret(self, name: str, inner_code: str = "AccessDenied") -> None:
        """Make GET of ``name`` (existing or not) answer 403 with that innererror code.

        ``inner_code`` is one of AccessDenied (access-policy vault), ForbiddenByRbac,
        ForbiddenByFirewall or ForbiddenByPolicy; messages follow protocol.md B5.
        """
        if inner_code not in FORBIDDEN_INNER_CODES:
            raise ValueError(
                f"inner_code must be one of {', '.join(FORBIDDEN_INNER_CODES)}"
            )
        self._store.forbid(name, inner_code)

    def allow_secret(self, name: str) -> None:
        """Undo :meth:`forbid_secret`."""
        self._store.forbid(name, None)

    # -- faults

    def inject_fault(
        self,
        service: str,
        status: int | None = None,
        *,
        count: int = 1,
        retry_after: str | None = None,
        drop: bool = False,
        delay_s: float = 0.0,
        path_contains: str | None = None,
        body: bytes | None = None,
    ) -> None:
        """Queue a fault for the next ``count`` requests to ``service`` ("imds" or "vault").

        A matching request first waits ``delay_s``; then ``drop=True`` closes the
        connection without a response, a ``status`` answers with that status and
        the service's realistic error body (or ``body``), plus ``Retry-After``
        when given; with neither it is answered normally (a slow response).
        ``path_contains`` restricts the fault to request paths containing it.
        Faults are used first-in first-out and apply before authentication.
        """
        if service not in SERVICES:
            raise ValueError(f"service must be 'imds' or 'vault', not {service!r}")
        if count < 1:
            raise ValueError("count must be at least 1")
        if status is not None and status < 400 and body is None:
            raise ValueError("a non-error status needs an explicit body")
        if status is None and not drop and delay_s <= 0:
            raise ValueError("a fault needs a status, drop=True or a delay_s")
        self._faults.add(
            Fault(
                service, status, count, retry_after, drop, delay_s, path_contains, body
            )
        )

    def clear_faults(self) -> None:
        """Forget every queued fault."""
        self._faults.clear()

    # -- stats

    @property
    def imds_requests(self) -> int:
        """Requests IMDS answered or dropped since start or :meth:`reset_stats`."""
        with self._log_lock:
            return len(self._logs[IMDS])

    @property
    def vault_requests(self) -> int:
        """Requests the vault answered or dropped since start or :meth:`reset_stats`."""
        with self._log_lock:
            return len(self._logs[VAULT])

    @property
    def imds_log(self) -> list[RequestRecord]:
        """A copy of IMDS's request log, oldest first."""
        with self._log_lock:
            return list(self._logs[IMDS])

    @property
    def vault_log(self) -> list[RequestRecord]:
        """A copy of the vault's request log, oldest first."""
        with self._log_lock:
            return list(self._logs[VAULT])

    def reset_stats(self) -> None:
        """Empty both request logs (and so the request counters)."""
        with self._log_lock:
            for log in self._logs.values():
                log.clear()

    # -- request processing

    def _dispatcher(self, service: str) -> Dispatch:
        def dispatch(request: Request) -> Answer:
            return self._process(service, request)

        return dispatch

    def _process(self, service: str, request: Request) -> Answer:
        """Latency, then a queued fault or the service's answer; records the outcome."""
        latency = self.latency_s
        if latency > 0:
            # Slept in this connection's thread: concurrent requests overlap.
            time.sleep(latency)
        fault = self._faults.take(service, request.path)
        if fault is not None and fault.delay_s > 0:
            time.sleep(fault.delay_s)
        if fault is not None and fault.drop:
            self._record(service, request, 0)
            return None
        if fault is not None and fault.status is not None:
            response = fault_response(service, fault, self._issuer.tenant_id)
        else:
            response = self._answer(service, request)
        is_imds = service == IMDS
        headers = (
            imds_headers(response) if is_imds else vault_headers(request, response)
        )
        self._record(service, request, response.status)
        return response.status, headers, response.body

    def _answer(self, service: str, request: Request) -> Response:
        try:
            if service == IMDS:
                return self._imds_api.handle(request)
            assert self._vault_api is not None
            return self._vault_api.handle(request)
        except Exception:  # an emulator bug must not look like a network failure
            logger.debug(
                "error answering %s %s", request.method, request.path, exc_info=True
            )
            if service == IMDS:
                return imds_error(500, "unknown", "Emulator internal error")
            body = keyvault_error_body(
                "InternalServerError", "Emulator internal error"
            )
            return Response(500, body)

    def _record(self, service: str, request: Request, status: int) -> None:
        record = RequestRecord(
            method=request.method,
            path=request.path,
            query=dict(parse_qsl(request.query, keep_blank_values=True)),
            headers=dict(request.headers),
            status=status,
        )
        with self._log_lock:
            self._logs[service].append(record)
