"""The agent: the one place that knows the order of one sync, the pipeline

    manifest entries -> sources -> fetch -> transforms -> outputs -> writer.

:func:`check` validates without any network call. :class:`Agent` performs one
sync: fetch every distinct source once, concurrently (entries naming the same
secret share a fetch); then, entry by entry, turn what arrived into the bytes
of each output (:mod:`agent.transforms`) and hand them to the writer. An entry
that fails keeps its last good files and never stops the others. Nothing here
prints; the CLI turns a :class:`SyncReport` into output and an exit code.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, List, Mapping, NamedTuple, Optional, Sequence, Tuple

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
from agent.manifest import Accounts, Entry, Manifest, load_manifest
from agent.outputs import OutputSet
from agent.retry import RetryPolicy
from agent.sources import unique_sources
from agent.transforms import apply_transform
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
    ``changed_paths`` lists the entry's files whose content or metadata changed.
    """

    entry: Entry
    version: Optional[str] = None
    changed_paths: Tuple[str, ...] = ()
    error: Optional[KvAgentError] = None

    @property
    def changed(self) -> bool:
        """Whether any of the entry's files changed on disk."""
        return bool(self.changed_paths)

    def describe(self) -> str:
        """One line for an operator: the secret, its files, the cause and fix."""
        paths = ", ".join(self.entry.paths)
        if self.error is None:
            return f"secret '{self.entry.name}': {paths} at version {self.version}"
        text = str(self.error)
        if f"'{self.entry.name}'" not in text:
            text = f"secret '{self.entry.name}': {text}"
        return f"{text} [{paths} left as it was]"


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
        vault_policy: RetryPolicy = RetryPolicy(),
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
        """Fetch every source, write the entries whose source arrived; never
        raises for a single entry. Raises IdentityUnavailableError when no
        token can be had at all (then no file is touched). When
        ``should_stop`` turns true the remaining writes are abandoned (each
        write is atomic, so a file is either replaced whole or left as it was)."""
        started = time.monotonic()
        entries = self.manifest.secrets
        sources = unique_sources(source for entry in entries for source in entry.sources)
        fetched = dict(zip(sources, self.vault.fetch_many(
            [SecretRequest(*source) for source in sources])))
        outcomes = []
        for entry in entries:
            if should_stop():
                raise Interrupted()
            outcomes.append(self._write(entry, [fetched[source] for source in entry.sources]))
        return SyncReport(tuple(outcomes), time.monotonic() - started)

    def _write(self, entry: Entry,
               fetched: "Sequence[Secret | KvAgentError]") -> SecretOutcome:
        """Transform and write one entry from its fetched sources; the first
        failed source fails the entry (a template is whole or left as it was)."""
        secrets: List[Secret] = []
        for one in fetched:
            if isinstance(one, KvAgentError):
                return SecretOutcome(entry, error=one)
            secrets.append(one)
        try:
            contents = apply_transform(entry.transform, secrets, len(entry.outputs.outputs),
                                       entry.params)
            changed = self._write_set(entry, secrets[0], contents)
        except KvAgentError as exc:
            return SecretOutcome(entry, error=exc)
        return SecretOutcome(entry, version=secrets[0].version, changed_paths=changed)

    def _write_set(self, entry: Entry, fetched: Secret,
                   contents: Tuple[bytes, ...]) -> Tuple[str, ...]:
        """Write each output of ``entry``; the paths that changed. Atomic per
        file (the writer's contract); today every set has one file."""
        outputs: OutputSet = entry.outputs
        changed = []
        for output, data in zip(outputs.outputs, contents):
            spec = FileSpec(output.path, data, output.uid, output.gid, output.mode)
            if self.writer.apply(spec).changed:
                log.info("wrote %s (secret %s, version %s, %s:%s %04o)", output.path, entry.name,
                         fetched.version, output.owner, output.group, output.mode)
                changed.append(output.path)
        return tuple(changed)

    def close(self) -> None:
        """Release HTTP connections."""
        self.tokens.close()
        self._vault_session.close()
