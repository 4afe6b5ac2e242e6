"""The :class:`Emulator`: both services on loopback, with state and faults under test control.

It wires the parts together (token issuer, secret store, fault queue, the two
handlers, two servers) and is the only class tests and the CLI need.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

from agent.emulator.certificate_wire import CreateRequest
from agent.emulator.certificates import PKCS12, CertificateSpec, IssuingChain
from agent.emulator.faults import Fault, FaultQueue, endless_page, fault_response
from agent.emulator.identity_sources import APP_SERVICE_TOKEN_PATH, AppServiceApi, ArcApi
from agent.emulator.imds import ImdsApi, imds_headers
from agent.emulator.keyvault import VaultApi, vault_headers
from agent.emulator.secrets_file import (
    IdentityConfig,
    VersionSpec,
    check_name,
    check_value,
    parse_certificate,
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

# The identity endpoints that may have a port of their own (protocol.md A7, A8).
ARC = "arc"
APP_SERVICE = "app-service"

if TYPE_CHECKING:  # never imported at run time
    from typing_extensions import Self  # typing.Self is 3.11+

logger = logging.getLogger(__name__)

# Written beside the TLS CA when certificates exist: the trust anchor of every
# certificate-backed secret (`openssl verify -CAfile`), stable across rotations.
CERTIFICATE_ROOT_FILE = "certificates-root.pem"


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
    dates tokens, secrets and every answer's ``Date`` header, so tests can age
    them without sleeping, or set the vault's clock apart from the host's.
    ``arc_port`` and ``app_service_port`` (0: any) give Azure Arc's HIMDS and
    App Service's endpoint ports of their own beside IMDS, sharing its
    identities (:attr:`arc_endpoint`, :attr:`app_service_endpoint`).
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
        identity_source: str = "imds",
        arc_tokens_dir: str | None = None,
        identity_header: str | None = None,
        arc_port: int | None = None,
        app_service_port: int | None = None,
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
        # The identity port serves IMDS, or Azure Arc's HIMDS in its place
        # ("arc"); App Service's endpoint is on it too, at its own path.
        if identity_source not in ("imds", "arc"):
            raise ValueError(f"identity_source must be 'imds' or 'arc', not {identity_source!r}")
        self._identity_source = identity_source
        # Ports of their own for HIMDS and App Service (None: none), as on a
        # real Arc server (40342) or App Service: the CLI's --arc-port and
        # --app-service-port. Their requests count as IMDS's (imds_log).
        self._own_ports = {ARC: arc_port, APP_SERVICE: app_service_port}
        self._own_bases: dict[str, str] = {}
        self._arc_tokens_dir = arc_tokens_dir
        self._arc_api: ArcApi | None = None
        self._app_service_api = AppServiceApi(
            self._issuer, identity_header or os.urandom(16).hex())
        self._clock = clock
        self._chain: IssuingChain | None = None  # made on the first certificate
        self._chain_lock = threading.Lock()
        # Each certificate's policy by lower-case name, for rotate_certificate.
        self._policies: dict[str, VersionSpec] = {}
        self._root_path: str | None = None
        self._issued = 0
        self._issue_lock = threading.Lock()
        for name, versions in parse_secrets(secrets, "secrets argument", clock()).items():
            for spec in versions:
                self._add_version(name, spec)

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
        imds = LoopbackServer(
            (self.host, self._imds_port), self._dispatcher(IMDS), clock=self._clock
        )
        self._servers.append(imds)
        vault = LoopbackServer(
            (self.host, self._vault_port), self._dispatcher(VAULT), context, self._clock
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
            create_certificate=self._create_certificate,
            certificate_policy=self.certificate_policy,
        )
        self._urls = (f"http://{self.host}:{imds.server_port}", vault_url, ca_path)
        named = [(imds, "imds"), (vault, "vault")]
        for source, port in self._own_ports.items():
            if port is not None:
                server = LoopbackServer((self.host, port), self._dispatcher(IMDS, source))
                self._servers.append(server)
                self._own_bases[source] = f"http://{self.host}:{server.server_port}"
                named.append((server, source))
        if self._chain is not None:
            self._write_certificate_root()
        for server, name in named:
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
        directory = self._files_dir()
        hostnames = [name for name in (self._vault_hostname, self.host) if name]
        paths = generate_certificates(directory, hostnames=hostnames)
        return paths.server_cert, paths.server_key, paths.ca_cert

    def _files_dir(self) -> str:
        """``cert_dir``, or a temporary directory removed by :meth:`stop`."""
        if self._cert_dir is not None:
            return self._cert_dir
        if self._temp_dir is None:
            self._temp_dir = tempfile.mkdtemp(prefix="kv-agent-emulator-")
        return self._temp_dir

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
        self._own_bases = {}
        self._vault_api = None
        self._root_path = None
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
    def token_audience(self) -> str | None:
        """A fault: IMDS mints every token for this audience (its ``aud``),
        whatever ``resource`` the request names; the response still echoes
        the requested resource, so only the token's claims tell. The vault
        then answers 401 AKV10022 (protocol.md B1). None (the default): the
        requested resource, as IMDS does."""
        return self._imds_api.audience

    @token_audience.setter
    def token_audience(self, audience: str | None) -> None:
        self._imds_api.audience = audience

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

    # -- certificates (protocol.md B9)

    def add_certificate(
        self,
        name: str,
        *,
        key_type: str = "rsa",
        content_type: str = PKCS12,
        pem_order: str = "key-first",
        exportable: bool = True,
        include_root: bool = False,
        sans: tuple[str, ...] | list[str] = ("localhost",),
        validity_days: int = 365,
        valid_from_days: int = 0,
        enabled: bool = True,
        tags: dict[str, str] | None = None,
    ) -> str:
        """Issue a certificate and store it as Key Vault does; returns the new version id.

        The secret is ``managed``, its ``kid`` is ``<vault>/keys/<name>/<version>``,
        its value a PKCS#12 (base64, empty password) or PEM text holding a new key
        (unless ``exportable=False``), the leaf, the intermediate and, with
        ``include_root``, the root; ``nbf``/``exp`` are the leaf's validity. The
        arguments mean what the secrets file's ``certificate:`` keys mean
        (:func:`load_emulator_file`) and are checked the same way (ValueError).
        Generating an RSA key takes tens of milliseconds.
        """
        check_name(name, "add_certificate")
        fields = {
            "key_type": key_type,
            "content_type": content_type,
            "pem_order": pem_order,
            "exportable": exportable,
            "include_root": include_root,
            "sans": list(sans),
            "validity_days": validity_days,
            "valid_from_days": valid_from_days,
        }
        certificate = parse_certificate(fields, f"add_certificate {name!r}")
        spec = VersionSpec(
            "",
            enabled,
            certificate.content_type,
            dict(tags) if tags is not None else None,
            managed=True,
            certificate=certificate,
        )
        return self._add_version(name, spec)

    def rotate_certificate(self, name: str, **changes: Any) -> str:
        """Re-issue ``name`` with a NEW key from the same CA, as a new version; returns its id.

        ``changes`` override the policy's fields for this and later rotations
        (e.g. ``exportable=False``, ``pem_order="chain-first"``). Raises KeyError
        when ``name`` was never added as a certificate.
        """
        policy = self._policies.get(name.lower())
        if policy is None or policy.certificate is None:
            raise KeyError(f"no certificate {name!r} in the emulator (add_certificate first)")
        certificate = policy.certificate
        if changes:
            fields = {**dataclasses.asdict(certificate), **changes}
            fields["sans"] = list(fields["sans"])
            fields.pop("seed")
            certificate = parse_certificate(fields, f"rotate_certificate {name!r}")
        return self._add_version(name, dataclasses.replace(policy, certificate=certificate))

    def _create_certificate(self, name: str, request: CreateRequest) -> str | None:
        """REST create (``POST /certificates/<name>/create``): issue ``name`` again
        (new key, new version) under the request's policy, which replaces the
        current one, or under the current one; None when there is neither.
        Raises ValueError for a policy the emulator cannot issue."""
        current = self._policies.get(name.lower())
        if request.fields is None:
            if current is None or current.certificate is None:
                return None
            certificate = current.certificate
        else:
            old = current.certificate if current and current.certificate else None
            # The emulator's own knobs (PEM order, root, start) survive a new policy.
            kept = {} if old is None else {"pem_order": old.pem_order,
                                           "include_root": old.include_root,
                                           "valid_from_days": old.valid_from_days}
            certificate = parse_certificate({**kept, **request.fields},
                                            f"certificate {name!r} policy")
        base = current or VersionSpec("", managed=True)
        spec = dataclasses.replace(
            base, certificate=certificate,
            enabled=base.enabled if request.enabled is None else request.enabled,
            tags=base.tags if request.tags is None else dict(request.tags))
        return self._add_version(name, spec)

    def certificate_policy(self, name: str) -> CertificateSpec | None:
        """The policy ``name`` is issued under (None: not a certificate of the emulator's)."""
        with self._issue_lock:
            current = self._policies.get(name.lower())
        return None if current is None else current.certificate

    @property
    def certificate_root_pem(self) -> bytes:
        """The root CA of every certificate-backed secret (PEM); the same across rotations."""
        return self._issuing_chain().root_pem

    @property
    def certificate_root_path(self) -> str:
        """``certificates-root.pem`` beside the TLS CA (``cert_dir`` or a temporary dir).

        Written at start when the secrets include a certificate, else on first use;
        for ``openssl verify -CAfile``. Valid until :meth:`stop`.
        """
        self._started_urls()
        return self._write_certificate_root()

    def _issuing_chain(self) -> IssuingChain:
        with self._chain_lock:
            if self._chain is None:
                self._chain = IssuingChain()
            return self._chain

    def _write_certificate_root(self) -> str:
        if self._root_path is None:
            path = os.path.join(self._files_dir(), CERTIFICATE_ROOT_FILE)
            with open(path, "wb") as stream:
                stream.write(self._issuing_chain().root_pem)
            self._root_path = path
        return self._root_path

    def _add_version(self, name: str, spec: VersionSpec) -> str:
        """Store one version; a declared certificate is issued first (new key, new leaf)."""
        if spec.certificate is None:
            return self._store.add(name, spec)
        # Each issue gets its own seed, so "shuffled" PEM values differ between versions.
        chain = self._issuing_chain()
        # Serialised: the REST re-issue runs in a request thread, tests in theirs.
        with self._issue_lock:
            self._issued += 1
            certificate = dataclasses.replace(spec.certificate, seed=self._issued)
            issued = chain.issue(name, certificate, self._clock())
            version = self._store.add(
                name,
                dataclasses.replace(
                    spec,
                    value=issued.value,
                    content_type=certificate.content_type,
                    not_before=issued.not_before,
                    expires_on=issued.expires_on,
                    certificate=None,
                    cer=issued.cer,
                ),
            )
            self._policies[name.lower()] = spec
        return version

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
        for_s: float | None = None,
        endless_pages: bool = False,
    ) -> None:
        """Queue a fault for the next ``count`` requests to ``service`` ("imds" or "vault").

        A matching request first waits ``delay_s``; then ``drop=True`` closes the
        connection without a response, a ``status`` answers with that status and
        the service's realistic error body (or ``body``), plus ``Retry-After``
        when given; ``endless_pages=True`` answers every list request (``GET
        /secrets`` with a token, the vault only) with an empty page whose
        nextLink is always a new one, so the list never ends; with none of these it is answered
        normally (a slow response). ``for_s``: the fault hits every matching
        request for that many seconds from now instead of ``count`` of them.
        ``path_contains`` restricts the fault to request paths containing it.
        Faults are used first-in first-out and apply before authentication.
        """
        if service not in SERVICES:
            raise ValueError(f"service must be 'imds' or 'vault', not {service!r}")
        if count < 1:
            raise ValueError("count must be at least 1")
        if status is not None and status < 400 and body is None:
            raise ValueError("a non-error status needs an explicit body")
        if endless_pages and (service != VAULT or status is not None or drop):
            raise ValueError("endless_pages is a vault fault of its own (no status, no drop)")
        if status is None and not drop and delay_s <= 0 and not endless_pages:
            raise ValueError("a fault needs a status, drop=True, endless_pages or a delay_s")
        until = None if for_s is None else time.monotonic() + for_s
        self._faults.add(
            Fault(
                service, status, count, retry_after, drop, delay_s, path_contains, body,
                until, endless_pages,
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

    def _dispatcher(self, service: str, source: str | None = None) -> Dispatch:
        """``source`` (ARC, APP_SERVICE) pins an identity port to that endpoint."""
        def dispatch(request: Request) -> Answer:
            return self._process(service, request, source)

        return dispatch

    def _process(self, service: str, request: Request, source: str | None = None) -> Answer:
        """Latency, then a queued fault or the service's answer; records the outcome."""
        latency = self.latency_s
        if latency > 0:
            # Slept in this connection's thread: concurrent requests overlap.
            time.sleep(latency)
        fault = self._faults.take(service, request.path, "authorization" in request.headers)
        if fault is not None and fault.delay_s > 0:
            time.sleep(fault.delay_s)
        if fault is not None and fault.drop:
            self._record(service, request, 0)
            return None
        if fault is not None and fault.endless_pages:
            assert self._vault_api is not None
            response = endless_page(self._vault_api.link_base)
        elif fault is not None and fault.status is not None:
            response = fault_response(service, fault, self._issuer.tenant_id)
        else:
            response = self._answer(service, request, source)
        is_imds = service == IMDS
        headers = (
            imds_headers(response) if is_imds else vault_headers(request, response)
        )
        self._record(service, request, response.status)
        return response.status, headers, response.body

    def _answer(self, service: str, request: Request, source: str | None) -> Response:
        try:
            if service == IMDS:
                return self._identity_api(request, source).handle(request)
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

    def _identity_api(self, request: Request,
                      source: str | None) -> ImdsApi | ArcApi | AppServiceApi:
        if source == ARC:
            return self.arc_api
        if source == APP_SERVICE or request.path == APP_SERVICE_TOKEN_PATH:
            return self._app_service_api
        if self._identity_source == "arc":
            return self.arc_api
        return self._imds_api

    # -- Azure Arc and App Service (protocol.md A7, A8)

    @property
    def arc_api(self) -> ArcApi:
        """HIMDS's rules; its ``tokens_dir`` holds the key files, its
        ``realm`` (None) overrides the path challenges name."""
        if self._arc_api is None:
            directory = self._arc_tokens_dir or os.path.join(self._files_dir(), "tokens")
            self._arc_api = ArcApi(self._issuer, directory)
        return self._arc_api

    @property
    def arc_base(self) -> str:
        """``http://host:port`` of HIMDS, the form IMDS_ENDPOINT takes on an Arc
        server: its own port (``arc_port``), else IMDS's when it plays HIMDS."""
        self._started_urls()
        if ARC in self._own_bases:
            return self._own_bases[ARC]
        if self._identity_source == "arc":
            return self.imds_base
        raise RuntimeError("the emulator serves no Azure Arc endpoint (give arc_port)")

    @property
    def arc_endpoint(self) -> str:
        """HIMDS's token URL, the form IDENTITY_ENDPOINT takes on an Arc server."""
        return self.arc_base + IMDS_TOKEN_PATH

    @property
    def app_service_endpoint(self) -> str:
        """App Service's token URL, the form IDENTITY_ENDPOINT takes: on its own
        port (``app_service_port``), else on IMDS's."""
        self._started_urls()
        base = self._own_bases.get(APP_SERVICE, self.imds_base)
        return base + APP_SERVICE_TOKEN_PATH

    @property
    def identity_header(self) -> str:
        """The X-IDENTITY-HEADER value App Service expects (IDENTITY_HEADER)."""
        return self._app_service_api.header

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
