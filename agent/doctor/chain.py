"""``kv-agent doctor``: the chain from manifest to file, checked link by link.

When a secret does not arrive, an operator would otherwise walk the chain by
hand. :func:`diagnose` walks it and returns one
:class:`~agent.doctor.report.Check` per link, in the order the agent meets
them (each link's checks live in their own module):

1. the manifest (``check``'s own messages), the output directory (tmpfs,
   writable) and the sets' directories (a file there that is not the
   agent's is kept, and warned about) (:mod:`agent.doctor.manifest_links`);
2. the identity: which source answers (IMDS, Azure Arc, App Service, as
   :func:`agent.identity.tokens.choose_source` decides) and which identity its
   token is for (client and object id from the token's claims, read without
   verifying; the token itself is never shown)
   (:mod:`agent.doctor.identity_links`);
3. per vault: DNS, the TLS handshake (verified against the CA bundle the
   agent uses), the 401 challenge (:mod:`agent.doctor.vault_links`), and
   whether the token's audience is the one the vault needs
   (:func:`agent.doctor.identity_links.check_audience`);
4. per secret: readable (a 403 gets the exact ``az`` line that grants it,
   chosen by what the 403 says: RBAC or access policy), exists (a 404 gets
   the closest names of the vault's list), enabled, ``nbf``/``exp``; per
   certificate entry, whether its key is exportable; per ``select:`` entry,
   whether the vault may be listed (:mod:`agent.doctor.secret_links`);
5. the running agent: its unit, its last refresh and failing entries
   (status.json) (:mod:`agent.doctor.machine`);
6. for a manifest with credentials: the agent's socket, and whether each
   granted unit that exists loads its credentials from it
   (``LoadCredential=``, read over D-Bus) (:mod:`agent.doctor.credential_links`).
7. for a manifest with ``cache:``: the sealed cache's directory, its copies,
   and whether the running agent serves from it now, and why
   (:mod:`agent.doctor.cache_links`; no copy is decrypted).

All of it with the agent's own environment: kv-agent.service's when that
unit exists (:mod:`agent.doctor.unit_env`), not the shell's, and the first check
says which was used (issue 17, item 27).

Every ✗ carries one concrete fix. The network checks reuse the agent's own
code paths (the token cache and request factories, the vault client and its
bounded transport), so what doctor sees is what the agent sees; each request
is bounded (a few seconds), the vaults are checked in parallel with the
identity, and a vault that gives no answer is not asked again, so doctor
ends in seconds even when the network black-holes.

Nothing here prints: the CLI renders the checks
(:func:`agent.doctor.report.render`). No value and no token ever reaches a
check: only names, versions, dates and the services' own words, escaped and
bounded.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Dict, List, Mapping, Optional, Tuple
from urllib.parse import urlsplit

from agent.base.errors import ConfigError, IdentityUnavailableError
from agent.base.retry import RetryPolicy
from agent.doctor.cache_links import check_cache
from agent.doctor.credential_links import check_credentials
from agent.doctor.identity_links import (
    IdentityFindings,
    check_audience,
    check_endpoint,
    check_identity,
)
from agent.doctor.machine import Host, agent_environment, check_agent
from agent.doctor.manifest_links import check_directory, check_manifest, check_sets
from agent.doctor.report import FAIL, WARN, Check, Report, soften, vault_label
from agent.doctor.secret_links import SecretProbes, check_entry
from agent.doctor.vault_links import VaultReach, check_vault
from agent.identity.tokens import TokenCache, choose_source, token_source
from agent.manifest import Manifest, landing_directories
from agent.pipeline.sources import Source
from agent.sync.selection import matches
from agent.vault.audience import KNOWN_AUDIENCES, audience_for_host
from agent.vault.client import Probed, VaultClient, new_session

# One short retry window: a transient 5xx or 410 is asked again once or
# twice, and every request is bounded by the transport (at least
# agent.base.retry.MIN_REQUEST_S, 5 s), so a black hole costs about 5 s.
DOCTOR_RETRY = RetryPolicy(deadline_s=2.0)
MAX_PARALLEL_VAULTS = 16  # a manifest names a few; beyond this they queue
PUBLIC_AUDIENCE = KNOWN_AUDIENCES["vault.azure.net"]


def diagnose(path: str, environ: Mapping[str, str], host: Host = Host(), *,
             use_unit_env: bool = True) -> Report:
    """Check the whole chain for the manifest at ``path``, with the unit's
    environment when it exists and ``use_unit_env`` (else ``environ``, the
    shell's); never raises for anything foreseeable (each problem is a FAIL
    check)."""
    started = time.monotonic()
    environ, used = agent_environment(environ, host, use_unit_env)
    checks: List[Check] = list(used)
    manifest = check_manifest(path, checks)
    if manifest is not None:
        checks += check_directory(manifest.directory, landing_directories(manifest))
        checks += check_sets(manifest)
        checks += _Network(manifest, environ, host).run()
    checks += check_agent(environ, host)
    if manifest is not None:
        checks += check_credentials(manifest, environ, host)
        checks += check_cache(manifest, environ)
    return Report(tuple(checks), time.monotonic() - started)


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

    def _reach(self, client: VaultClient, vault: str) -> VaultReach:
        return check_vault(client, vault, self.environ, self.host.resolve)

    def _vault_secrets(self, client: VaultClient, vault: str, reach: VaultReach,
                       identity: IdentityFindings) -> Tuple[List[Check], Dict[Source, Probed]]:
        """The audience, secret and select checks of one vault; the answers
        for the entry checks."""
        subject = f"vault {vault_label(vault)}"
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
        probes = SecretProbes(client, vault, identity.object_id, self.host.now(),
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
