"""The agent: the one place that knows the order manifest -> identity ->
vault -> writer.

:func:`check` validates without any network call. :class:`Agent` performs one
sync: fetch every secret concurrently, then write the ones that arrived, one
by one. A secret that fails keeps its last good file and never stops the
others. Nothing here prints; the CLI turns a :class:`SyncReport` into output
and an exit code.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Mapping, NamedTuple, Optional, Tuple

from agent.errors import (
    IdentityUnavailableError,
    KvAgentError,
    SecretNotFoundError,
    VaultForbiddenError,
    VaultThrottledError,
    VaultUnavailableError,
    WriteError,
)
from agent.identity import token_source
from agent.manifest import Accounts, Manifest, SecretFile, load_manifest
from agent.retry import RetryPolicy
from agent.vault import Secret, SecretRequest, VaultClient, new_session
from agent.writer import FileSpec, Writer

log = logging.getLogger(__name__)


class Interrupted(Exception):
    """Raised out of a retry sleep when the agent is asked to stop."""


_SHORT_CAUSES = (
    (SecretNotFoundError, "404 not found"),
    (VaultForbiddenError, "403 forbidden"),
    (VaultThrottledError, "429 throttled"),
    (VaultUnavailableError, "vault unreachable"),
    (IdentityUnavailableError, "IMDS unavailable"),
    (WriteError, "write failed"),
)


def short_cause(error: KvAgentError) -> str:
    """A few words for STATUS= lines, where the whole message will not fit."""
    if "SecretDisabled" in error.message:
        return "403 disabled"
    for kind, words in _SHORT_CAUSES:
        if isinstance(error, kind):
            return words
    return "error"


class SecretOutcome(NamedTuple):
    """What happened to one manifest entry in one sync.

    Exactly one of ``version`` (fetched and written) or ``error`` is set;
    ``changed`` says whether the file on disk changed.
    """

    entry: SecretFile
    version: Optional[str] = None
    changed: bool = False
    error: Optional[KvAgentError] = None

    def describe(self) -> str:
        """One line for an operator: the secret, its file, the cause and fix."""
        if self.error is None:
            return f"secret '{self.entry.name}': {self.entry.path} at version {self.version}"
        text = str(self.error)
        if f"'{self.entry.name}'" not in text:
            text = f"secret '{self.entry.name}': {text}"
        return f"{text} [{self.entry.path} left as it was]"


class SyncReport(NamedTuple):
    """The outcomes of one sync, in manifest order, and its wall time."""

    outcomes: Tuple[SecretOutcome, ...]
    elapsed_s: float

    @property
    def failures(self) -> Tuple[SecretOutcome, ...]:
        """Failed entries that are not optional: these fail the run."""
        return tuple(o for o in self.outcomes if o.error and not o.entry.is_optional)

    @property
    def optional_failures(self) -> Tuple[SecretOutcome, ...]:
        return tuple(o for o in self.outcomes if o.error and o.entry.is_optional)

    @property
    def changed(self) -> int:
        return sum(1 for o in self.outcomes if o.changed)


def check(path: str, accounts: Optional[Accounts] = None) -> Manifest:
    """Validate the manifest and its output directory; no network call.

    Raises ManifestError (or WriteError when the directory is not tmpfs).
    """
    manifest = load_manifest(path, accounts=accounts)
    Writer(manifest.directory).check()
    return manifest


class Agent:
    """Syncs one manifest's secrets to disk.

    Sessions, environment and retry policies are constructor arguments so
    tests and the daemon can shape them; nothing is created at import.
    """

    def __init__(
        self,
        manifest: Manifest,
        *,
        environ: Mapping[str, str],
        imds_policy: RetryPolicy = RetryPolicy(),
        vault_policy: RetryPolicy = RetryPolicy(deadline_s=60.0),
        on_retry: Optional[Callable[[str, int, float], None]] = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.manifest = manifest
        self.tokens = token_source(manifest.identity, environ, imds_policy,
                                   on_retry=on_retry, sleep=sleep)
        self._vault_session = new_session(environ)
        self.vault = VaultClient(
            self._vault_session, lambda resource, force: self._token(resource, force),
            policy=vault_policy, environ=environ, sleep=sleep, on_retry=on_retry)
        self.writer = Writer(manifest.directory)

    def _token(self, resource: str, force_refresh: bool) -> str:
        return self.tokens.get_token(resource, force_refresh=force_refresh).token

    def prepare(self) -> None:
        """Create and check the output directory; remove crash leftovers."""
        for leftover in self.writer.prepare():
            log.info("removed leftover temporary file %s", leftover)

    def sync(self, should_stop: Callable[[], bool] = lambda: False) -> SyncReport:
        """Fetch every secret, write those that arrived; never raises for a
        single secret. Raises IdentityUnavailableError when no token can be
        had at all (then no file is touched). When ``should_stop`` turns true
        the remaining writes are abandoned (each write is atomic, so a file is
        either replaced whole or left as it was)."""
        started = time.monotonic()
        entries = self.manifest.secrets
        fetched = self.vault.fetch_many(
            [SecretRequest(e.vault, e.name, e.version) for e in entries])
        outcomes = []
        for entry, result in zip(entries, fetched):
            if should_stop():
                raise Interrupted()
            outcomes.append(self._write(entry, result))
        return SyncReport(tuple(outcomes), time.monotonic() - started)

    def _write(self, entry: SecretFile, fetched: "Secret | KvAgentError") -> SecretOutcome:
        if isinstance(fetched, KvAgentError):
            return SecretOutcome(entry, error=fetched)
        spec = FileSpec(entry.path, fetched.value, entry.uid, entry.gid, entry.mode)
        try:
            result = self.writer.apply(spec)
        except KvAgentError as exc:
            return SecretOutcome(entry, error=exc)
        if result.changed:
            log.info("wrote %s (secret %s, version %s, %s:%s %04o)", entry.path, entry.name,
                     fetched.version, entry.owner, entry.group, entry.mode)
        return SecretOutcome(entry, version=fetched.version, changed=result.changed)

    def close(self) -> None:
        """Release HTTP connections."""
        self.tokens.close()
        self._vault_session.close()
