"""``kv-agent doctor``: the chain from manifest to file, checked link by link.

When a secret does not arrive, an operator would otherwise walk the chain by
hand. :func:`diagnose` walks it and returns one :class:`Check` per link, in
the order the agent meets them:

1. the manifest (``check``'s own messages), the output directory (tmpfs,
   writable) and the sets' directories (a file there that is not the
   agent's is kept, and warned about);
2. the identity: which source answers (IMDS, Azure Arc, App Service, as
   :func:`agent.identity.tokens.choose_source` decides) and which identity its
   token is for (client and object id from the token's claims, read without
   verifying; the token itself is never shown);
3. per vault: DNS, the TLS handshake (verified against the CA bundle the
   agent uses), the 401 challenge, and whether the token's audience is the
   one the vault needs;
4. per secret: readable (a 403 gets the exact ``az`` line that grants it,
   chosen by what the 403 says: RBAC or access policy), exists (a 404 gets
   the closest names of the vault's list), enabled, ``nbf``/``exp``; per
   certificate entry, whether its key is exportable; per ``select:`` entry,
   whether the vault may be listed;
5. the running agent: its unit, its last refresh and failing entries
   (status.json).

All of it with the agent's own environment: kv-agent.service's when that
unit exists (:mod:`agent.doctor.unit_env`), not the shell's, and the first check
says which was used (issue 17, item 27).

Every ✗ carries one concrete fix. The network checks reuse the agent's own
code paths (the token cache and request factories, the vault client and its
bounded transport), so what doctor sees is what the agent sees; each request
is bounded (a few seconds), the vaults are checked in parallel with the
identity, and a vault that gives no answer is not asked again, so doctor
ends in seconds even when the network black-holes.

Nothing here prints: the CLI renders the checks (:func:`render`). No value
and no token ever reaches a check: only names, versions, dates and the
services' own words, escaped and bounded.
"""

from __future__ import annotations

import base64
import binascii
import difflib
import ipaddress
import os
import queue
import re
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import (
    Callable,
    Dict,
    List,
    Mapping,
    NamedTuple,
    Optional,
    Sequence,
    Tuple,
    Union,
)
from urllib.parse import urlsplit

import requests

from agent.base import transport
from agent.base.errors import (
    ConfigError,
    IdentityUnavailableError,
    KvAgentError,
    ManifestError,
    PermissionDeniedError,
    VaultError,
    VaultUnavailableError,
    WriteError,
)
from agent.base.hosts import is_loopback_host
from agent.base.retry import RetryPolicy
from agent.base.untrusted import escape, load_json
from agent.doctor.unit_env import UNIT as AGENT_UNIT
from agent.doctor.unit_env import UnitEnvironment, unit_environment
from agent.identity.app_service import exposure_warning
from agent.identity.tokens import TokenCache, choose_source, token_source
from agent.manifest import Entry, Manifest, landing_directories, load_manifest
from agent.pipeline.expiry import EXPIRED, EXPIRING, NOT_YET_VALID, Validity, combine, judge, moment
from agent.pipeline.sources import Source
from agent.pipeline.transforms import certificate_has_key, transform_with_validity
from agent.status.render import is_running
from agent.status.snapshot import STOPPED, parse_snapshot
from agent.status.store import StateStore, state_dir
from agent.sync.selection import matches
from agent.vault.audience import (
    KNOWN_AUDIENCES,
    audience_for_host,
    audience_from_challenge,
    parse_challenge,
)
from agent.vault.client import Probed, Secret, VaultClient, new_session, proxies_for
from agent.vault.failures import parse_error
from agent.vault.listing import SecretItem
from agent.writer import Writer, foreign_in_set

OK = "ok"
WARN = "warn"
FAIL = "fail"

UNIT = "kv-agent.service"
# One short retry window: a transient 5xx or 410 is asked again once or
# twice, and every request is bounded by the transport (at least
# agent.base.retry.MIN_REQUEST_S, 5 s), so a black hole costs about 5 s.
DOCTOR_RETRY = RetryPolicy(deadline_s=2.0)
MAX_PARALLEL_VAULTS = 16  # a manifest names a few; beyond this they queue
DNS_TIMEOUT_S = 3.0
SYSTEMCTL_TIMEOUT_S = 3.0
MAX_TOKEN_CHARS = 16 * 1024  # a managed-identity JWT is ~1.5 KB
MAX_MANIFEST_PROBLEMS = 20
NEAR_NAMES = 3
PUBLIC_AUDIENCE = KNOWN_AUDIENCES["vault.azure.net"]

# What may go into a printed command line: anything else is a placeholder,
# so a hostile answer cannot put shell syntax into a line an operator pastes.
_GUID = re.compile(r"[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}\Z")
_VAULT_NAME = re.compile(r"[0-9A-Za-z-]{3,24}\Z")
_SECRET_NAME = re.compile(r"[0-9A-Za-z-]{1,127}\Z")
_VAULT_ID = re.compile(
    r"/subscriptions/[0-9a-fA-F-]{36}/resourcegroups/[-\w.()]{1,90}"
    r"/providers/microsoft\.keyvault/vaults/[0-9A-Za-z-]{3,24}", re.IGNORECASE)
_ACCESS_POLICY_VAULT = re.compile(r"on key vault '([0-9A-Za-z-]{3,24});")


class Check(NamedTuple):
    """One link of the chain: ``subject`` (``vault kv-prod``, ``secret
    db-password``), the ``name`` of the check (``tls``, ``readable``), its
    ``state`` (OK, WARN or FAIL), one line of ``detail`` and, for a failure
    (sometimes a warning), the one ``fix`` to apply."""

    subject: str
    name: str
    state: str
    detail: str
    fix: Optional[str] = None

    def as_json(self) -> Dict[str, Optional[str]]:
        return {"subject": self.subject, "check": self.name, "state": self.state,
                "detail": self.detail, "fix": self.fix}


class Report(NamedTuple):
    """Every check, in chain order, and how long doctor took."""

    checks: Tuple[Check, ...]
    elapsed_s: float

    @property
    def is_failed(self) -> bool:
        return any(check.state == FAIL for check in self.checks)


class Host(NamedTuple):
    """The machine, as doctor asks it (injectable for tests): whether systemd
    runs, a unit's ``systemctl is-active`` word (None: no answer), a name
    lookup, the wall clock (epoch s) and kv-agent.service's environment
    (None: no such unit)."""

    is_systemd: Callable[[], bool] = lambda: os.path.isdir("/run/systemd/system")
    unit_state: Callable[[str], Optional[str]] = lambda unit: _systemctl_is_active(unit)
    resolve: Callable[[str], List[str]] = lambda host: _resolve(host)
    now: Callable[[], float] = time.time
    unit_environment: Callable[[], Optional[UnitEnvironment]] = lambda: unit_environment()


def diagnose(path: str, environ: Mapping[str, str], host: Host = Host(), *,
             use_unit_env: bool = True) -> Report:
    """Check the whole chain for the manifest at ``path``, with the unit's
    environment when it exists and ``use_unit_env`` (else ``environ``, the
    shell's); never raises for anything foreseeable (each problem is a FAIL
    check)."""
    started = time.monotonic()
    environ, used = agent_environment(environ, host, use_unit_env)
    checks: List[Check] = list(used)
    manifest = _check_manifest(path, checks)
    if manifest is not None:
        checks += check_directory(manifest.directory, landing_directories(manifest))
        checks += check_sets(manifest)
        checks += _Network(manifest, environ, host).run()
    checks += check_agent(environ, host)
    return Report(tuple(checks), time.monotonic() - started)


# -- 0. the environment -------------------------------------------------------------


def agent_environment(shell: Mapping[str, str], host: Host, use_unit_env: bool
                      ) -> Tuple[Mapping[str, str], List[Check]]:
    """The environment to check with, and the checks saying which it is: the
    unit's (what the agent sees) when the unit exists, else the shell's.
    Names only: a value may be a credential (IDENTITY_HEADER)."""
    found = host.unit_environment() if use_unit_env else None
    if found is None:
        why = "--no-unit-env" if not use_unit_env else f"no {AGENT_UNIT} here"
        return shell, [Check("environment", "source", OK, f"this shell's ({why})")]
    parts = []
    if found.from_environment:
        parts.append(f"Environment= sets {', '.join(found.from_environment)}")
    for path, names in found.from_files:
        parts.append(f"{escape(path, 200)} sets {', '.join(names) or 'nothing'}")
    detail = (f"{AGENT_UNIT}'s, as the agent runs: {'; '.join(parts) or 'no variable of its own'}"
              " (not this shell's; --no-unit-env uses it)")
    checks = [Check("environment", "source", OK, escape(detail, 600))]
    checks += [Check("environment", "file", WARN, escape(problem),
                     f"fix the unit's EnvironmentFile= (systemctl cat {AGENT_UNIT}); the "
                     "agent cannot start while it is missing")
               for problem in found.problems]
    return found.environ, checks


# -- 1. manifest and output directory ---------------------------------------------


def _check_manifest(path: str, checks: List[Check]) -> Optional[Manifest]:
    """The manifest, with its check appended; None (and one FAIL per
    problem, worded as ``kv-agent check`` words it) when it is invalid."""
    try:
        manifest = load_manifest(path)
    except ManifestError as exc:
        for problem in exc.problems[:MAX_MANIFEST_PROBLEMS]:
            detail, _, fix = problem.partition("; ")
            checks.append(Check("manifest", "valid", FAIL, detail,
                                fix or f"edit {path} there, then run kv-agent check"))
        return None
    except KvAgentError as exc:
        checks.append(Check("manifest", "valid", FAIL, exc.message,
                            exc.hint or f"fix {path}, then run kv-agent check"))
        return None
    count = len(manifest.secrets)
    selects = f" and {len(manifest.selections)} select" if manifest.selections else ""
    checks.append(Check("manifest", "valid", OK,
                        f"{path}: {count} secret{'s' if count != 1 else ''}{selects}"))
    return manifest


def check_directory(directory: str, landing: Sequence[str] = ()) -> List[Check]:
    """Whether the output directory is on tmpfs, safe from other users with
    each directory below it that files land in (``landing``; the writer's
    own checks), and writable by this process."""
    subject = f"output directory {directory}"
    try:
        writer = Writer(directory)
        writer.check()
        for below in landing:
            writer.check_directory(below)
    except WriteError as exc:
        detail, _, fix = exc.message.partition("; ")
        return [Check(subject, "tmpfs", FAIL, detail, exc.hint or fix or None)]
    checks = [Check(subject, "tmpfs", OK, "on tmpfs or ramfs, safe from other users")]
    existing = directory
    while not os.path.lexists(existing) and existing != os.path.dirname(existing):
        existing = os.path.dirname(existing)
    where = "" if existing == directory else f" (not created yet; judged on {existing})"
    try:
        read_only = bool(os.statvfs(existing).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    if read_only or not os.access(existing, os.W_OK | os.X_OK):
        why = "mounted read-only" if read_only else "not writable by this user"
        return checks + [Check(subject, "writable", FAIL, f"{existing} is {why}{where}",
                               "run kv-agent as root, or choose a writable tmpfs directory "
                               "(for the unit: its ReadWritePaths=)")]
    return checks + [Check(subject, "writable", OK, f"writable{where}")]


def check_sets(manifest: Manifest) -> List[Check]:
    """A warning per file in a set's directory that is not the agent's:
    the agent keeps it (never deletes it) and carries it into each new
    generation, but consumers reading the set see it. Nothing when none."""
    paths = {entry.key: entry.paths for entry in manifest.secrets}
    checks = []
    for group in manifest.sets:
        members = [path for key in group.keys for path in paths.get(key, ())]
        for path in foreign_in_set(group.directory, members):
            checks.append(Check(f"set {group.directory}", "own files", WARN,
                                f"{escape(path)} is not kv-agent's: kept, never deleted",
                                f"move it out of {group.directory} (the set's directory "
                                "holds only its files)"))
    return checks


# -- 2-4. identity, vaults, secrets -------------------------------------------------


class _Identity(NamedTuple):
    """What the identity checks learnt: the cache to ask for more tokens
    (None when it failed) and the identity's object id (None if unknown)."""

    tokens: Optional[TokenCache]
    object_id: Optional[str]
    checks: Tuple[Check, ...]


class _Reach(NamedTuple):
    """A vault's DNS, TLS and challenge checks, and the audience its token
    must have (None when the vault could not be reached or asked)."""

    audience: Optional[str]
    checks: Tuple[Check, ...]


class _Network:
    """The network checks of one manifest: the identity and every vault in
    parallel, then each vault's secrets (vaults in parallel again)."""

    def __init__(self, manifest: Manifest, environ: Mapping[str, str], host: Host) -> None:
        self.manifest = manifest
        self.environ = environ
        self.host = host
        self.vaults = list(dict.fromkeys(
            [source.vault for entry in manifest.secrets for source in entry.sources]
            + [selection.vault for selection in manifest.selections]))
        self.tokens: Optional[TokenCache] = None

    def run(self) -> List[Check]:
        choice = choose_source(self.manifest.identity.source, self.environ)
        try:
            self.tokens = token_source(self.manifest.identity, self.environ, DOCTOR_RETRY)
        except IdentityUnavailableError as exc:
            return [Check("identity", "source", FAIL, f"{choice.describe()}: {exc.message}",
                          exc.hint)]
        exposed = check_endpoint(self.tokens)
        try:
            client = VaultClient(new_session(self.environ), self._token, policy=DOCTOR_RETRY,
                                 environ=self.environ)
        except ConfigError as exc:  # no vault can be reached; the identity still can
            try:
                identity = check_identity(self.tokens, self._first_audience())
            finally:
                self.tokens.close()
            return [*exposed, *identity.checks,
                    Check("vaults", "tls", FAIL, exc.message, exc.hint)]
        try:
            return exposed + self._run(client)
        finally:
            self.tokens.close()

    def _first_audience(self) -> str:
        """The audience the identity check asks a token for: the first vault's."""
        first = (urlsplit(self.vaults[0]).hostname or "") if self.vaults else ""
        return audience_for_host(first) or PUBLIC_AUDIENCE

    def _token(self, resource: str, force_refresh: bool) -> str:
        assert self.tokens is not None
        return self.tokens.get_token(resource, force_refresh=force_refresh).token

    def _run(self, client: VaultClient) -> List[Check]:
        assert self.tokens is not None
        audience = self._first_audience()
        workers = min(len(self.vaults), MAX_PARALLEL_VAULTS) + 1
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="doctor") as pool:
            identity_job = pool.submit(check_identity, self.tokens, audience)
            reach_jobs = [pool.submit(self._reach, client, vault) for vault in self.vaults]
            identity = identity_job.result()
            reaches = [job.result() for job in reach_jobs]
            secret_jobs = [pool.submit(self._vault_secrets, client, vault, reach, identity)
                           for vault, reach in zip(self.vaults, reaches)]
            per_vault = [job.result() for job in secret_jobs]
        checks = list(identity.checks)
        probed: Dict[Source, Probed] = {}
        for reach, (vault_checks, vault_probed) in zip(reaches, per_vault):
            checks += reach.checks
            checks += vault_checks
            probed.update(vault_probed)
        for entry in self.manifest.secrets:
            entry_checks = check_entry(entry, probed, self.host.now(),
                                       self.manifest.warn_before_expiry_s)
            checks += soften(entry_checks) if entry.is_optional else entry_checks
        return checks

    def _reach(self, client: VaultClient, vault: str) -> _Reach:
        return check_vault(client, vault, self.environ, self.host.resolve)

    def _vault_secrets(self, client: VaultClient, vault: str, reach: _Reach,
                       identity: _Identity) -> Tuple[List[Check], Dict[Source, Probed]]:
        """The audience, secret and select checks of one vault; the answers
        for the entry checks."""
        subject = f"vault {_label(vault)}"
        if reach.audience is None:
            return [Check(subject, "secrets", WARN,
                          "not checked: the vault gave no usable answer (above)")], {}
        if identity.tokens is None:
            return [Check(subject, "secrets", WARN,
                          "not checked: no token (identity, above)")], {}
        audience = check_audience(identity.tokens, vault, reach.audience, self.environ)
        if audience.state == FAIL:  # every GET would be refused 401: not asked
            return [audience], {}
        checks = [audience]
        probes = _SecretProbes(client, vault, identity.object_id, self.host.now(),
                               self.manifest.warn_before_expiry_s)
        required = {s for e in self.manifest.secrets if not e.is_optional for s in e.sources}
        for source in dict.fromkeys(s for e in self.manifest.secrets for s in e.sources
                                    if s.vault == vault):
            found = probes.check(source)
            checks += found if source in required else soften(found)
        for selection in self.manifest.selections:
            if selection.vault == vault:
                found = probes.check_listing(selection.label, partial(matches, selection))
                checks += soften(found) if selection.is_optional else found
        return checks, probes.answers


def check_endpoint(tokens: TokenCache) -> List[Check]:
    """A warning when the identity endpoint would get its credential in clear
    over the network (App Service over plain HTTP to another host; the
    agent logs the same at start), else nothing. Sends nothing."""
    exposure = exposure_warning(tokens.source.source, tokens.endpoint)
    if exposure is None:
        return []
    return [Check("identity", "endpoint", WARN, exposure.message, exposure.fix)]


def check_identity(tokens: TokenCache, audience: str) -> _Identity:
    """Which identity source answers, and for which identity (from the
    token's claims; the token itself is never kept in a check)."""
    source = tokens.source.describe()
    try:
        token = tokens.get_token(audience)
    except KvAgentError as exc:
        return _Identity(None, None, (Check("identity", "source", FAIL,
                                            f"{source}: {exc.message}", exc.hint),))
    claims = token_claims(token.token)
    object_id = claims.get("oid")
    client_id = claims.get("appid") or claims.get("azp")
    checks = [Check("identity", "source", OK, f"{source} answers at {tokens.endpoint}")]
    if not object_id:
        checks.append(Check("identity", "principal", WARN,
                            "the token's claims could not be read (not a JWT): "
                            "which identity is unknown"))
        return _Identity(tokens, None, tuple(checks))
    resource_id = claims.get("xms_mirid")
    detail = (f"client id {client_id or '?'}, object id {object_id}"
              + (f", {resource_id}" if resource_id else "")
              + (f", tenant {claims['tid']}" if claims.get("tid") else ""))
    checks.append(Check("identity", "principal", OK, detail))
    return _Identity(tokens, object_id if _GUID.match(object_id) else None, tuple(checks))


def token_claims(token: str) -> Dict[str, str]:
    """The string claims of a JWT's payload (``aud``, ``appid``, ``oid`` ...),
    decoded WITHOUT verifying (doctor only reports them), each escaped and
    bounded; {} for anything that is not a JWT. Never the token itself."""
    parts = token.split(".")
    if len(token) > MAX_TOKEN_CHARS or len(parts) != 3:
        return {}
    try:
        payload = base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4))
        content = load_json(payload)
    except (binascii.Error, ValueError):
        return {}
    if not isinstance(content, dict):
        return {}
    return {key: escape(value, 200) for key, value in content.items()
            if key in ("aud", "appid", "azp", "oid", "tid", "xms_mirid")
            and isinstance(value, str)}


def check_vault(client: VaultClient, vault: str, environ: Mapping[str, str],
                resolve: Callable[[str], List[str]]) -> _Reach:
    """DNS, then one unauthenticated request: the connection, TLS and the
    401 challenge, and from them the audience the vault's token needs."""
    subject = f"vault {_label(vault)}"
    host = urlsplit(vault).hostname or ""
    checks = [_check_dns(subject, host, proxies_for(vault, environ), resolve)]
    if checks[0].state == FAIL:
        return _Reach(None, tuple(checks))
    ca = ca_in_use(environ)
    try:
        reply = client.knock(vault)
    except VaultError as exc:
        return _Reach(None, (*checks, Check(subject, "url", FAIL, exc.message, exc.hint)))
    except requests.exceptions.SSLError as exc:
        return _Reach(None, (*checks, _tls_failure(subject, exc, ca, environ)))
    except requests.RequestException as exc:
        return _Reach(None, (*checks, _connection_failure(subject, vault, exc)))
    checks.append(Check(subject, "tls", OK, f"certificate verified against {ca}"))
    challenge = reply.headers.get("WWW-Authenticate", "")
    if reply.status != 401 or not parse_challenge(challenge):
        code, inner, _ = parse_error(reply.body)
        detail = f" ({inner or code})" if inner or code else ""
        checks.append(Check(subject, "challenge", FAIL,
                            f"no Key Vault challenge to an unauthenticated request "
                            f"(HTTP {reply.status}{detail})",
                            "check that the manifest's vault URL is the Key Vault's "
                            "(https://<name>.vault.azure.net)"))
        return _Reach(None, tuple(checks))
    params = parse_challenge(challenge)
    asked = escape(params.get("resource") or params.get("scope") or "?", 100)
    try:
        audience = audience_for_host(host) or audience_from_challenge(host, challenge)
    except VaultError as exc:
        checks.append(Check(subject, "challenge", FAIL, exc.message, exc.hint))
        return _Reach(None, tuple(checks))
    authority = escape(params.get("authorization") or params.get("authorization_uri") or "?",
                       120)
    checks.append(Check(subject, "challenge", OK,
                        f"401 challenge asks for {asked} (authority {authority})"))
    return _Reach(audience, tuple(checks))


def _check_dns(subject: str, host: str, proxies: Mapping[str, str],
               resolve: Callable[[str], List[str]]) -> Check:
    if is_loopback_host(host) or _is_address(host):
        return Check(subject, "dns", OK, f"{host} is an address, no lookup needed")
    if proxies:
        return Check(subject, "dns", WARN,
                     f"{host} is reached through the proxy {escape(proxies['https'], 100)}, "
                     "which resolves it; not looked up here")
    try:
        addresses = resolve(host)
    except OSError as exc:
        return Check(subject, "dns", FAIL, f"{host} does not resolve ({escape(exc, 100)})",
                     "check the vault name in the manifest; for a private endpoint, the "
                     "privatelink.vaultcore.azure.net DNS zone linked to this network")
    return Check(subject, "dns", OK, f"{host} resolves to {', '.join(addresses[:3])}")


def ca_in_use(environ: Mapping[str, str]) -> str:
    """The CA bundle the agent verifies vaults with, in words."""
    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        if environ.get(name):
            return f"{environ[name]} ({name})"
    # requests' default: certifi's bundle (Debian's and Fedora's packages point
    # it at the system's store).
    return f"the default CA bundle {requests.utils.DEFAULT_CA_BUNDLE_PATH}"


def _tls_failure(subject: str, exc: Exception, ca: str, environ: Mapping[str, str]) -> Check:
    text = str(exc)
    if "hostname" in text.lower() or "doesn't match" in text:
        why = "the certificate is for another host name"
    elif "CERTIFICATE_VERIFY_FAILED" in text:
        why = "the certificate is not signed by a CA in the bundle"
    else:
        why = "the TLS handshake failed"
    if environ.get("REQUESTS_CA_BUNDLE") or environ.get("CURL_CA_BUNDLE"):
        fix = ("point REQUESTS_CA_BUNDLE at the PEM of the CA that signed the vault's "
               "certificate (or unset it for the default bundle)")
    else:
        fix = ("for a private CA (a TLS-inspecting proxy), set REQUESTS_CA_BUNDLE to its PEM "
               "in the unit's environment; else check the vault URL")
    return Check(subject, "tls", FAIL, f"not verified against {ca}: {why}", fix)


def _connection_failure(subject: str, vault: str, exc: Exception) -> Check:
    address = urlsplit(vault).netloc
    cause = transport.describe_failure(exc)
    if isinstance(exc, requests.Timeout):
        return Check(subject, "connection", FAIL,
                     f"no answer from {address}: timed out ({cause})",
                     f"check the network path to {address}: a firewall, NSG or proxy that "
                     "drops packets looks like this")
    return Check(subject, "connection", FAIL, f"cannot connect to {address} ({cause})",
                 f"check the vault URL and that {address} is reachable from this machine "
                 "(firewall, private endpoint, proxy)")


def check_audience(tokens: TokenCache, vault: str, audience: str,
                   environ: Mapping[str, str]) -> Check:
    """Whether the token the agent would send to ``vault`` is for the
    audience it needs (its ``aud`` claim, exactly: a trailing slash counts
    [protocol.md B1])."""
    subject = f"vault {_label(vault)}"
    try:
        token = tokens.get_token(audience)
    except KvAgentError as exc:
        return Check(subject, "audience", FAIL, f"no token for {audience}: {exc.message}",
                     exc.hint)
    found = token_claims(token.token).get("aud")
    if found is None:
        return Check(subject, "audience", WARN,
                     f"the token's audience cannot be read (not a JWT); the vault needs "
                     f"{audience}")
    if found == audience:
        return Check(subject, "audience", OK, f"the token's audience is {audience}, "
                                              "as the vault needs")
    source = tokens.source.source
    endpoint = {"imds": "KV_AGENT_IMDS_ENDPOINT", "arc": "IDENTITY_ENDPOINT",
                "app-service": "IDENTITY_ENDPOINT"}.get(source, "the identity endpoint")
    where = escape(environ.get(endpoint, ""), 100)
    return Check(subject, "audience", FAIL,
                 f"the token is for '{found}', the vault needs '{audience}' "
                 "(it would answer 401 AKV10022)",
                 f"the identity endpoint{f' {where}' if where else ''} ignored "
                 f"resource={audience}: point {endpoint} at the real {source} endpoint "
                 "(or unset it)")


class _SecretProbes:
    """The per-secret checks of one vault; ``answers`` keeps each GET's
    answer for the entry checks, and a vault that stops answering is not
    asked again (each request would wait out its bound)."""

    def __init__(self, client: VaultClient, vault: str, object_id: Optional[str],
                 now: float, warn_before_s: float) -> None:
        self.client = client
        self.vault = vault
        self.object_id = object_id
        self.now = now
        self.warn_before_s = warn_before_s
        self.answers: Dict[Source, Probed] = {}
        self._gone: Optional[str] = None  # why the vault is not asked again
        self._listing: Optional[Union[Tuple[SecretItem, ...], KvAgentError]] = None

    def check(self, source: Source) -> List[Check]:
        subject = _secret_subject(source)
        if self._gone is not None:
            return [Check(subject, "readable", WARN, f"not checked: {self._gone}")]
        try:
            probed = self.client.probe_secret(Source(*source))
        except KvAgentError as exc:
            if isinstance(exc, (VaultUnavailableError, IdentityUnavailableError)):
                self._gone = f"the vault stopped answering ({exc.message})"
            return [Check(subject, "readable", FAIL, exc.message, exc.hint)]
        self.answers[source] = probed
        return judge_answer(source, probed, self.object_id, self.now, self.warn_before_s,
                            self._near_names)

    def check_listing(self, label: str, wanted: Callable[[SecretItem], bool]) -> List[Check]:
        """Whether the vault may be listed (a ``select:`` entry needs it)."""
        subject = label
        listing = self._list()
        if isinstance(listing, KvAgentError):
            return [Check(subject, "listable", FAIL, listing.message,
                          refusal_fix(self.vault, _inner_code(listing.message), b"",
                                      self.object_id, listing.hint))]
        chosen = sum(1 for item in listing if wanted(item))
        return [Check(subject, "listable", OK,
                      f"{chosen} of the vault's {len(listing)} secrets match")]

    def _list(self) -> Union[Tuple[SecretItem, ...], KvAgentError]:
        if self._listing is None:
            if self._gone is not None:
                self._listing = VaultError(f"not listed: {self._gone}")
            else:
                try:
                    self._listing = self.client.list_secrets(self.vault)
                except KvAgentError as exc:
                    self._listing = exc
        return self._listing

    def _near_names(self, name: str) -> Optional[List[str]]:
        """The listed names closest to ``name``; None when the vault may not
        be listed."""
        listing = self._list()
        if isinstance(listing, KvAgentError):
            return None
        names = {item.name.lower(): item.name for item in listing}
        close = difflib.get_close_matches(name.lower(), list(names), n=NEAR_NAMES, cutoff=0.6)
        return [names[one] for one in close]


def judge_answer(source: Source, probed: Probed, object_id: Optional[str], now: float,
                 warn_before_s: float,
                 near_names: Callable[[str], Optional[List[str]]] = lambda name: None,
                 ) -> List[Check]:
    """The checks one secret GET's answer settles (pure but for
    ``near_names``, asked only for a 404): readable, exists, enabled and
    its validity window."""
    subject = _secret_subject(source)
    vault = source.vault
    if probed.secret is not None:
        attributes = probed.secret.attributes
        checks = [Check(subject, "readable", OK, f"readable, version {probed.secret.version}")]
        if attributes.enabled is False:  # served, though: only a disabled *version* is refused
            checks.append(Check(subject, "enabled", WARN, "the vault says disabled"))
        else:
            checks.append(Check(subject, "enabled", OK, "enabled"))
        checks.append(check_validity(subject, source, Validity(attributes.nbf, attributes.exp),
                                     now, warn_before_s))
        return checks
    code, inner, _ = parse_error(probed.body)
    error = probed.error
    assert error is not None
    if probed.status == 404:
        return [_not_found(subject, source, code or inner, near_names)]
    if probed.status == 403 and inner == "SecretDisabled":
        version = f" --version {source.version}" if source.version else ""
        return [Check(subject, "readable", OK, "readable (the identity may get it)"),
                Check(subject, "exists", OK, "exists"),
                Check(subject, "enabled", FAIL,
                      f"{'version ' + source.version if source.version else 'its current version'}"
                      " is disabled (403 SecretDisabled)",
                      f"az keyvault secret set-attributes --vault-name "
                      f"{vault_name(vault, probed.body)} --name {source.name}{version} "
                      "--enabled true")]
    if probed.status == 403:
        detail = f" {inner or code}" if inner or code else ""
        return [Check(subject, "readable", FAIL, f"permission denied (403{detail})",
                      refusal_fix(vault, inner, probed.body, object_id, error.hint))]
    return [Check(subject, "readable", FAIL, error.message, error.hint)]


def _not_found(subject: str, source: Source, code: str,
               near_names: Callable[[str], Optional[List[str]]]) -> Check:
    detail = f" (404 {code})" if code else " (404)"
    if source.version:
        return Check(subject, "exists", FAIL, f"version {source.version} not found{detail}",
                     f"pick an existing version: az keyvault secret list-versions --vault-name "
                     f"{vault_name(source.vault, b'')} --name {source.name}")
    near = near_names(source.name)
    if near:
        return Check(subject, "exists", FAIL,
                     f"not found{detail}; closest names in the vault: {', '.join(near)}",
                     f"if '{near[0]}' is the secret meant, set name: {near[0]} in the manifest")
    said = ("no similar name in the vault" if near is not None
            else "the vault may not be listed, so no similar names")
    return Check(subject, "exists", FAIL, f"not found{detail}; {said}",
                 f"create it: az keyvault secret set --vault-name "
                 f"{vault_name(source.vault, b'')} --name {source.name} --file <value file>")


def check_validity(subject: str, source: Source, validity: Validity, now: float,
                   warn_before_s: float) -> Check:
    """The version's ``nbf``/``exp`` window at ``now``: expired fails (the
    agent still writes it, as Key Vault serves it, but clients may refuse
    it); not yet valid and expiring soon are warnings."""
    kind = judge(validity, now, warn_before_s)
    rotate = (f"rotate it: az keyvault secret set --vault-name "
              f"{vault_name(source.vault, b'')} --name {source.name} --file <new value file>")
    if kind == EXPIRED and validity.expires is not None:
        return Check(subject, "validity", FAIL, f"expired at {moment(validity.expires)}",
                     rotate)
    if kind == NOT_YET_VALID and validity.not_before is not None:
        return Check(subject, "validity", WARN,
                     f"not valid before {moment(validity.not_before)} (written anyway)")
    if kind == EXPIRING and validity.expires is not None:
        days = max(0.0, (validity.expires - now) / 86400.0)
        return Check(subject, "validity", WARN,
                     f"expires at {moment(validity.expires)}, in {days:.1f} days", rotate)
    until = f"valid until {moment(validity.expires)}" if validity.expires else "no expiry set"
    return Check(subject, "validity", OK, until)


def soften(checks: Sequence[Check]) -> List[Check]:
    """The checks of an optional secret: a failure there fails nothing (as
    in the agent), so it is a warning, still with its fix."""
    return [check._replace(state=WARN, detail=f"{check.detail} (optional)")
            if check.state == FAIL else check for check in checks]


def check_entry(entry: Entry, probed: Mapping[Source, Probed], now: float,
                warn_before_s: float) -> List[Check]:
    """For a certificate or template entry whose secrets all arrived: its
    transform, run in memory (nothing is written), and for a certificate
    whether the key is exportable and the leaf's validity."""
    if entry.transform == "raw":
        return []
    secrets = [probed[source].secret for source in entry.sources if source in probed]
    if len(secrets) != len(entry.sources) or any(one is None for one in secrets):
        return []
    fetched = [one for one in secrets if one is not None]
    subject = f"{entry.transform} {entry.name}"
    try:
        _, leaf = transform_with_validity(entry.transform, fetched, len(entry.outputs.outputs),
                                          entry.params, entry=entry.name)
    except KvAgentError as exc:
        name = "key exportable" if "non-exportable" in exc.message else "transform"
        return [Check(subject, name, FAIL, exc.message, exc.hint)]
    if entry.transform != "certificate" or leaf is None:
        return [Check(subject, "transform", OK, f"makes its {len(entry.outputs.outputs)} files")]
    return [_key_check(subject, entry, fetched[0]),
            check_validity(subject, entry.sources[0], combine([Validity(*leaf)]), now,
                           warn_before_s)]


def _key_check(subject: str, entry: Entry, secret: Secret) -> Check:
    """Whether the certificate's value holds its private key (the policy's
    ``exportable``); the transform already failed when a key is asked."""
    try:
        has_key = certificate_has_key(secret, entry.name)
    except KvAgentError as exc:  # the transform read it a moment ago; defensive
        return Check(subject, "key exportable", FAIL, exc.message, exc.hint)
    if has_key:
        return Check(subject, "key exportable", OK, "the value holds the private key")
    return Check(subject, "key exportable", WARN,
                 "the key is not exportable: only cert, chain and fullchain can be written")


def refusal_fix(vault: str, inner: str, body: bytes, object_id: Optional[str],
                fallback: Optional[str]) -> Optional[str]:
    """The one command that grants this identity what a 403 refused, chosen
    by the 403's inner code: an RBAC vault needs the role, an access-policy
    vault (AccessDenied, ForbiddenByPolicy) a policy, a firewall the
    machine's address [protocol.md B5]."""
    assignee = object_id or "<object id of the identity>"
    name = vault_name(vault, body)
    fields = _message_fields(body)
    if inner in ("AccessDenied", "ForbiddenByPolicy"):
        return (f"az keyvault set-policy --name {name} --object-id {assignee} "
                "--secret-permissions get list")
    if inner == "ForbiddenByFirewall":
        address = fields.get("client address", "")
        if _is_address(address):
            return f"az keyvault network-rule add --name {name} --ip-address {address}"
        return fallback
    if inner == "ForbiddenByRbac" or not inner:
        found = _VAULT_ID.match(fields.get("resource", "").strip("'"))
        scope = (f"'{found.group(0)}'" if found
                 else f'"$(az keyvault show --name {name} --query id -o tsv)"')
        return (f'az role assignment create --role "Key Vault Secrets User" '
                f"--assignee {assignee} --scope {scope}")
    return fallback


def vault_name(vault: str, body: bytes) -> str:
    """The vault's name for an ``az`` command: from a 403's message, else
    the first label of a host under a Key Vault domain, else a placeholder."""
    fields = _message_fields(body)
    named = fields.get("vault", "").split(";")[0]
    if _VAULT_NAME.match(named):
        return named
    found = _ACCESS_POLICY_VAULT.search(fields.get("", ""))
    if found:
        return found.group(1)
    host = urlsplit(vault).hostname or ""
    label = host.split(".")[0]
    if audience_for_host(host) and _VAULT_NAME.match(label):
        return label
    return "<vault name>"


def _message_fields(body: bytes) -> Dict[str, str]:
    """A KeyVaultError message's ``Name: value`` lines (lower-case names),
    and the whole message under ''; escaped and bounded."""
    try:
        content = load_json(body) if body else None
    except ValueError:
        return {}
    error = content.get("error") if isinstance(content, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    if not isinstance(message, str):
        return {}
    fields = {"": escape(message, 2000)}
    for line in message[:4000].splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() and len(key) < 40:
            fields.setdefault(key.strip().lower(), escape(value.strip(), 300))
    return fields


def _inner_code(message: str) -> str:
    """The inner code our own refusal message carries in parentheses."""
    for code in ("ForbiddenByRbac", "AccessDenied", "ForbiddenByPolicy", "ForbiddenByFirewall"):
        if f"({code})" in message:
            return code
    return ""


def _secret_subject(source: Source) -> str:
    pinned = f" (version {source.version})" if source.version else ""
    return f"secret {source.name}{pinned}"


def _label(vault: str) -> str:
    return urlsplit(vault).netloc or vault


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return False
    return True


def _resolve(host: str) -> List[str]:
    """The addresses of ``host``, within DNS_TIMEOUT_S: getaddrinfo has no
    timeout of its own, so it runs in a daemon thread left behind on timeout.
    Raises OSError (socket.gaierror, or a timeout)."""
    answers: "queue.Queue[Union[List[str], OSError]]" = queue.Queue(1)

    def lookup() -> None:
        try:
            found = socket.getaddrinfo(host, 443, proto=socket.IPPROTO_TCP)
            answers.put(list(dict.fromkeys(str(info[4][0]) for info in found)))
        except OSError as exc:
            answers.put(exc)

    threading.Thread(target=lookup, name="doctor-dns", daemon=True).start()
    try:
        answer = answers.get(timeout=DNS_TIMEOUT_S)
    except queue.Empty:
        raise OSError(f"no answer within {DNS_TIMEOUT_S:g} s") from None
    if isinstance(answer, OSError):
        raise OSError(answer.strerror or "lookup failed")
    return answer


# -- 5. the running agent ---------------------------------------------------------------


def check_agent(environ: Mapping[str, str], host: Host = Host()) -> List[Check]:
    """The unit's state (when systemd runs) and the running agent's status
    document: its last refresh and its failing entries."""
    return [_check_unit(host)] + _check_status(environ)


def _check_unit(host: Host) -> Check:
    if not host.is_systemd():
        return Check("agent", "unit", WARN,
                     f"systemd is not running here, so {UNIT}'s state is unknown")
    state = host.unit_state(UNIT)
    if state == "active":
        return Check("agent", "unit", OK, f"{UNIT} is active")
    if state == "failed":
        return Check("agent", "unit", FAIL, f"{UNIT} has failed",
                     "read why (journalctl -u kv-agent -n 50), fix it, then "
                     "systemctl restart kv-agent")
    if state is None:
        return Check("agent", "unit", WARN, f"systemctl gave no answer about {UNIT}")
    return Check("agent", "unit", WARN, f"{UNIT} is {escape(state, 40)}",
                 "to keep the files current: systemctl enable --now kv-agent")


def _check_status(environ: Mapping[str, str]) -> List[Check]:
    store = StateStore(state_dir(environ))
    try:
        snapshot = parse_snapshot(store.load())
    except PermissionDeniedError as exc:
        return [Check("agent", "status", WARN, exc.message, "run as root: sudo kv-agent doctor")]
    if snapshot is None:
        return [Check("agent", "status", WARN,
                      f"no status in {store.path}: the agent has not run here")]
    running = snapshot.phase != STOPPED and is_running(snapshot.pid)
    refreshed = snapshot.last_refresh or "never"
    if not running:
        checks = [Check("agent", "status", WARN,
                        f"not running; its last run refreshed at {refreshed}")]
    else:
        checks = [Check("agent", "status", OK,
                        f"running (pid {snapshot.pid}, {snapshot.phase}), last refresh "
                        f"{refreshed}, next {snapshot.next_refresh or '-'}")]
    if snapshot.error:
        checks.append(Check("agent", "refresh", FAIL if running else WARN,
                            f"last refresh failed: {escape(snapshot.error)}",
                            "the checks above say why; it retries on its own"))
    for entry in snapshot.entries:
        if not entry.error:
            continue
        state = FAIL if running and not entry.is_optional else WARN
        checks.append(Check("agent", "entry", state,
                            f"{escape(entry.name, 200)} failing since "
                            f"{entry.error_since or '?'}: {escape(entry.error)}",
                            "fix what the checks above show; the agent retries at its next "
                            "refresh (or now: systemctl reload kv-agent)"))
    return checks


def _systemctl_is_active(unit: str) -> Optional[str]:
    """``systemctl is-active UNIT``'s word (active, inactive, failed...),
    None when systemctl gives none in time."""
    try:
        done = subprocess.run(["systemctl", "is-active", unit], capture_output=True,
                              text=True, timeout=SYSTEMCTL_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    word = done.stdout.strip()
    return word or None


# -- rendering (pure; the CLI prints) -------------------------------------------------

MARKS = {OK: "✓", WARN: "!", FAIL: "✗"}
ASCII_MARKS = {OK: "ok", WARN: "!", FAIL: "FAIL"}


def render(report: Report, marks: Mapping[str, str] = MARKS) -> List[str]:
    """The checklist: one line per check, its fix indented under it, and a
    last line with the counts and the time taken."""
    lines = []
    for check in report.checks:
        lines.append(f"{marks[check.state]} {check.subject}, {check.name}: {check.detail}")
        if check.fix and check.state != OK:
            lines.append(f"    fix: {check.fix}")
    failed = sum(1 for check in report.checks if check.state == FAIL)
    warned = sum(1 for check in report.checks if check.state == WARN)
    lines.append(f"{len(report.checks)} checks: {failed} failed, {warned} warnings "
                 f"({report.elapsed_s:.1f} s)")
    return lines


def as_json(report: Report) -> List[Dict[str, Optional[str]]]:
    """The checks for ``--json``: subject, check, state, detail, fix."""
    return [check.as_json() for check in report.checks]

