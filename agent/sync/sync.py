"""The agent: the one place that knows the order of one sync, the pipeline

    manifest entries -> sources -> fetch -> transforms -> outputs -> writer.

:func:`check` validates without any network call. :class:`Sync` performs one
sync: fetch every distinct source once, concurrently (entries naming the same
secret share a fetch); then, entry by entry, turn what arrived into the bytes
of each output (:mod:`agent.pipeline.transforms`) and hand them to the writer: file by
file, or, for the entries of a set (``set:``, a certificate), all of them in
one swap of the set's directory; an output with ``credential:`` goes to the
credential store, in memory (:mod:`agent.sync.credentials`). An entry that
fails keeps its last good files and credentials and never stops the others;
a set member that fails keeps its whole set. Nothing here prints; the CLI
turns a :class:`SyncReport` into output and an exit code.
"""

from __future__ import annotations

import logging
import os
import time
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
)

from agent.base import transport
from agent.base.errors import (
    EndlessListError,
    IdentityRefusedError,
    IdentityUnavailableError,
    KvAgentError,
    SecretNotFoundError,
    SetKeptError,
    VaultForbiddenError,
    VaultThrottledError,
    VaultUnavailableError,
    WriteError,
)
from agent.base.retry import RetryPolicy
from agent.identity.app_service import exposure_warning
from agent.identity.tokens import token_source
from agent.manifest import (
    Accounts,
    Entry,
    Manifest,
    Selection,
    landing_directories,
    load_manifest,
)
from agent.pipeline.credentials import Grant
from agent.pipeline.expiry import Validity, combine, describe, judge
from agent.pipeline.outputs import EntrySet
from agent.pipeline.sources import Source
from agent.pipeline.transforms import Window, transform_with_validity
from agent.sync import credentials
from agent.sync.freshness import (
    EntryWritten,
    Freshness,
    SourceSeen,
    VaultSeen,
    WrittenOutcome,
    plan,
    remember,
    with_sizes,
)
from agent.vault.client import Secret, VaultClient, new_session
from agent.vault.listing import ListLimits, SecretItem
from agent.writer import SET_GRACE_S, FileSpec, Writer
from agent.writer.credentials import CredentialStore
from agent.writer.specs import specs_of

log = logging.getLogger(__name__)


class Interrupted(Exception):
    """Raised out of a retry sleep when the agent is asked to stop."""


_SHORT_CAUSES = (
    (SecretNotFoundError, "404 not found"),
    (VaultForbiddenError, "403 forbidden"),
    (VaultThrottledError, "429 throttled"),
    (VaultUnavailableError, "vault unreachable"),
    (EndlessListError, "list never ends"),
    (IdentityRefusedError, "identity refused"),  # before its base class
    (IdentityUnavailableError, "IMDS unavailable"),
    (WriteError, "write failed"),
)


def short_cause(error: KvAgentError) -> str:
    """A few words for STATUS= lines, where the whole message will not fit."""
    if isinstance(error, SetKeptError):
        return f"set kept: {short_cause(error.cause)}"
    if "SecretDisabled" in error.message:
        return "403 disabled"
    for kind, words in _SHORT_CAUSES:
        if isinstance(error, kind):
            return words
    return "error"


class SecretOutcome(NamedTuple):
    """What happened to one manifest entry in one sync.

    Exactly one of ``version`` (fetched and written) or ``error`` is set;
    ``changed_paths`` lists the entry's files whose content or metadata
    changed, ``changed_credentials`` the ``KV_AGENT_CHANGED`` names of its
    credentials whose bytes changed (:func:`agent.sync.credentials.load`).
    ``validity`` is the window of what was fetched (see
    :mod:`agent.pipeline.expiry`); unknown after a failure.
    """

    entry: Entry
    version: Optional[str] = None
    changed_paths: Tuple[str, ...] = ()
    error: Optional[KvAgentError] = None
    validity: Validity = Validity()
    changed_credentials: Tuple[str, ...] = ()

    @property
    def changed(self) -> bool:
        """Whether any of the entry's files changed on disk, or its credentials in memory."""
        return bool(self.changed_paths or self.changed_credentials)

    def describe(self) -> str:
        """One line for an operator: the secret, its files and credentials, the cause and fix."""
        paths = ", ".join(self.entry.targets)
        if self.error is None:
            return f"secret '{self.entry.name}': {paths} at version {self.version}"
        text = str(self.error)
        if self.entry.transform == "select":  # a listing: name is the selection's label
            text = f"{self.entry.name}: {text}"
        elif f"'{self.entry.name}'" not in text:
            text = f"secret '{self.entry.name}': {text}"
        return f"{text} [{paths} left as it was]"


class SyncReport(NamedTuple):
    """The outcomes of one sync, in manifest order, and its wall time.

    ``swapped`` names the set directories whose previous generation this sync
    swapped out: it now waits out the writer's grace (see
    :meth:`Sync.retire_generations`). ``freshness`` is what the next
    refresh needs to skip unchanged secrets (:mod:`agent.sync.freshness`).
    """

    outcomes: Tuple[SecretOutcome, ...]
    elapsed_s: float
    swapped: Tuple[str, ...] = ()
    # (directory, paths) of each ``select:`` entry whose listing succeeded:
    # the files it covers now. A selection whose listing failed is absent
    # (its files are kept); its outcome is its Selection.entry's.
    selected: Tuple[Tuple[str, Tuple[str, ...]], ...] = ()
    freshness: Freshness = Freshness()

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


def expiry_warnings(outcomes: Sequence[SecretOutcome], warn_before_s: float,
                    now: float) -> List[str]:
    """One line per written entry that is expired, not yet valid, or expires
    within ``warn_before_s`` of epoch second ``now`` (``kv-agent once``; the
    daemon keeps its own record so it says each once, see ExpiryWarnings)."""
    lines = []
    for outcome in outcomes:
        kind = judge(outcome.validity, now, warn_before_s)
        if kind is not None and outcome.error is None:
            lines.append(describe(outcome.entry.name, kind, outcome.validity, now))
    return lines


def check(path: str, accounts: Optional[Accounts] = None) -> Manifest:
    """Validate the manifest and its output directory; no network call.

    Raises ManifestError, or WriteError when the directory is not tmpfs or
    another user could replace what is in it or in a directory below it that
    a file lands in (the writes refuse those files one by one).
    """
    manifest = load_manifest(path, accounts=accounts)
    writer = Writer(manifest.directory)
    writer.check()
    for directory in landing_directories(manifest):
        writer.check_directory(directory)
    return manifest


class Sync:
    """Syncs one manifest's secrets to disk.

    Sessions, environment and retry policies are constructor arguments so
    tests and the daemon can shape them; nothing is created at import. The
    daemon passes its own ``writer``, which outlives a reload: it holds the
    old set generations still waiting out their grace; and its own
    ``credentials_store``, which it declares each manifest to once that
    manifest is current (:func:`agent.sync.credentials.declare`). A Sync that
    makes its own store (``kv-agent once``) declares its manifest itself.
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
        writer: Optional[Writer] = None,
        is_slow_start: bool = False,
        credentials_store: Optional[CredentialStore[Grant]] = None,
    ) -> None:
        self.manifest = manifest
        self.tokens = token_source(manifest.identity, environ, imds_policy,
                                   on_retry=on_retry, sleep=sleep)
        log.info("identity source: %s", self.tokens.source.describe())
        exposure = exposure_warning(self.tokens.source.source, self.tokens.endpoint)
        if exposure is not None:  # once per start (and reload), never per request
            log.warning("%s; %s", exposure.message, exposure.fix)
        self._vault_session = new_session(environ)
        self.vault = VaultClient(
            self._vault_session, lambda resource, force: self._token(resource, force),
            policy=vault_policy, environ=environ, sleep=sleep, on_retry=on_retry,
            is_slow_start=is_slow_start)
        self.writer = writer or Writer(manifest.directory)
        self.give_way = self.vault.pacing.give_way  # the daemon's, once ready: Pacing.give_way
        self._sleep = sleep
        self._warned: Set[str] = set()  # lines logged once: skipped by select, unusable dates
        self.credentials = credentials_store if credentials_store is not None else \
            credentials.declare(CredentialStore(), manifest)

    def _token(self, resource: str, force_refresh: bool) -> str:
        return self.tokens.get_token(resource, force_refresh=force_refresh).token

    def prepare(self) -> None:
        """Create and check the output directory; remove crash leftovers."""
        for leftover in self.writer.prepare():
            log.info("removed leftover temporary file %s", leftover)

    def sync(self, should_stop: Callable[[], bool] = lambda: False,
             freshness: Freshness = Freshness(), fresh_for_s: float = 0.0,
             is_final: bool = False) -> SyncReport:
        """Fetch every source that may have changed, write the entries whose
        source arrived; never raises for a single entry. Raises IdentityUnavailableError when no
        token can be had at all (then no file is touched). When
        ``should_stop`` turns true the remaining writes are abandoned, and
        the requests not yet sent (each write is atomic, so a file or a set
        is either replaced whole or left as it was). Entries are written as
        their sources arrive, while later ones are still being fetched.

        An entry outside any set is written file by file. The entries of a
        set (:attr:`Manifest.sets`) are transformed first, all of them; if
        any fails, the whole set keeps its last good generation and every
        member reports the error; else the set is written by one
        :meth:`Writer.apply_set` (one atomic swap of its directory).

        ``freshness``, the memory of the previous refresh (empty: the initial
        sync, every source fetched), decides which entries need no request at
        all: :func:`agent.sync.freshness.plan` lists the vaults where that is
        cheaper and skips what the list shows unchanged and still on disk.
        ``fresh_for_s`` (the daemon's refresh interval while it is not yet
        ready, else 0): a source fetched less than that ago and still on disk
        needs no request at all, so a failed start retries only what is
        missing (:mod:`agent.sync.freshness`, rule 5). ``is_final`` (``kv-agent
        once``): no refresh follows, so the report's freshness memory is left
        empty (building it takes an ``lstat`` per file, ~10 ms for 1,000).
        """
        started = time.monotonic()
        freshness = credentials.forget_unloaded(freshness, self.credentials)
        listings: Dict[str, Tuple[SecretItem, ...]] = {}
        listed, selected = self._expand_selections(listings, freshness.vaults)
        entries = self.manifest.secrets + tuple(
            entry for one in selected for entry in one[1])

        def list_vault(vault: str, max_pages: int) -> Tuple[SecretItem, ...]:
            # A vault a select: entry listed in full this sync is not listed twice.
            if vault in listings:
                return listings[vault]
            return self.vault.list_secrets(vault, ListLimits(max_pages=max_pages))

        fresh_since = time.time() - fresh_for_s if fresh_for_s > 0 else None
        decided = with_sizes(plan(entries, self.manifest.sets, freshness, list_vault,
                                  fresh_since=fresh_since),
                             {vault: len(items) for vault, items in listings.items()})
        fetch_started = time.time()  # before any GET: the conservative fetch time
        arrivals = _Arrivals(decided.fetch, self.vault.fetch_each(
            [Source(*source) for source in decided.fetch]))
        groups = {key: group for group in self.manifest.sets for key in group.keys}
        by_key = {entry.key: entry for entry in entries}
        outcomes: Dict[str, SecretOutcome] = {}
        swapped: List[str] = []
        try:
            for entry in entries:
                if entry.key in outcomes:
                    continue  # written with its set
                if entry.key in decided.current:  # unchanged in the vault and on disk
                    known = decided.current[entry.key]
                    outcomes[entry.key] = SecretOutcome(entry, version=known.version,
                                                        validity=known.validity)
                    continue
                if should_stop():
                    raise Interrupted()
                group = groups.get(entry.key)
                if group is None:
                    outcomes[entry.key] = self._write(entry, arrivals.get(entry.sources))
                    continue
                members = [by_key[key] for key in group.keys]
                written, was_swapped = self._write_group(
                    group, members, [arrivals.get(member.sources) for member in members])
                outcomes.update((outcome.entry.key, outcome) for outcome in written)
                if was_swapped:
                    swapped.append(group.directory)
            fetched = arrivals.rest()
        finally:
            arrivals.close()
        done = tuple(outcomes[entry.key] for entry in entries)
        memory = Freshness() if is_final else remember(
            freshness, decided, self.manifest.sets,
            [_written(outcome, fetched, fetch_started) for outcome in done])
        return SyncReport(done + listed, time.monotonic() - started, tuple(swapped),
                          tuple((selection.directory, tuple(e.key for e in chosen))
                                for selection, chosen in selected), memory)

    def _expand_selections(
        self, listings: Dict[str, Tuple[SecretItem, ...]], vaults: Mapping[str, VaultSeen],
    ) -> Tuple[Tuple[SecretOutcome, ...], List[Tuple[Selection, Tuple[Entry, ...]]]]:
        """List each vault a ``select:`` entry names (once per vault, kept in
        ``listings`` for the rest of the sync; its pages bounded by the size
        ``vaults`` remembers of it) and expand the selections
        (:mod:`agent.sync.selection`): each selection's outcome (listed, or the
        listing's error), and the entries of those whose listing succeeded. A
        skipped secret is warned about once per Sync. Raises
        IdentityUnavailableError as a fetch would."""
        outcomes: List[SecretOutcome] = []
        selected: List[Tuple[Selection, Tuple[Entry, ...]]] = []
        if not self.manifest.selections:
            return (), selected
        # Only a manifest with select: entries loads the selection code
        # (issue 17, item 21: plain secrets pay for nothing they do not use).
        from agent.sync.selection import expand, explicit_names

        explicit = explicit_names(self.manifest.secrets)
        failed: Dict[str, KvAgentError] = {}
        for selection in self.manifest.selections:
            if selection.vault not in listings and selection.vault not in failed:
                try:
                    listings[selection.vault] = self.vault.list_secrets(
                        selection.vault,
                        ListLimits(known_size=vaults.get(selection.vault, VaultSeen()).size))
                except IdentityUnavailableError:
                    raise
                except KvAgentError as exc:
                    failed[selection.vault] = exc
            if selection.vault in failed:
                outcomes.append(SecretOutcome(selection.entry, error=failed[selection.vault]))
                continue
            expansion = expand(selection, listings[selection.vault], explicit)
            for line in expansion.skipped:
                if line not in self._warned:
                    self._warned.add(line)
                    log.warning("%s", line)
            selected.append((selection, expansion.entries))
            outcomes.append(SecretOutcome(
                selection.entry, version=f"{len(expansion.entries)} matched"))
        return tuple(outcomes), selected

    def _prepare(self, entry: Entry,
                 fetched: "Sequence[Secret | KvAgentError]") -> "_Prepared | SecretOutcome":
        """Transform one entry's fetched sources into the bytes of its
        outputs, or its failed outcome: the first failed source fails the
        entry (a template is whole or left as it was)."""
        secrets: List[Secret] = []
        for one in fetched:
            if isinstance(one, KvAgentError):
                return SecretOutcome(entry, error=one)
            secrets.append(one)
            self._warn_unusable_dates(one)
        try:
            contents, leaf = transform_with_validity(
                entry.transform, secrets, len(entry.outputs.outputs), entry.params,
                entry=entry.name)
            validity = _validity(secrets, leaf)
        except KvAgentError as exc:
            return SecretOutcome(entry, error=exc)
        return _Prepared(entry, secrets[0], contents, validity)

    def _warn_unusable_dates(self, secret: Secret) -> None:
        """Say once per Sync that the vault sent a date the agent cannot use
        (read as no date: agent.pipeline.expiry.usable_epoch)."""
        fields = secret.attributes.unusable_dates
        line = (f"secret '{secret.name}': the vault sent {' and '.join(fields)} outside "
                "1970..9999 or not an integer; read as no date: check the secret's "
                "activation and expiry dates")
        if fields and line not in self._warned:
            self._warned.add(line)
            log.warning("%s", line)

    def _write(self, entry: Entry,
               fetched: "Sequence[Secret | KvAgentError]") -> SecretOutcome:
        """Transform and write one entry outside any set, file by file."""
        prepared = self._prepare(entry, fetched)
        if isinstance(prepared, SecretOutcome):
            return prepared
        try:
            changed = self._write_files(prepared)
        except KvAgentError as exc:
            return SecretOutcome(entry, error=exc)
        return SecretOutcome(entry, version=prepared.secret.version, changed_paths=changed,
                             validity=prepared.validity,
                             changed_credentials=prepared.load(self.credentials))

    def _write_files(self, prepared: "_Prepared") -> Tuple[str, ...]:
        """Write each output of an entry outside any set; the paths that
        changed. Atomic per file (the writer's contract)."""
        changed = []
        for spec in prepared.specs():
            if self.writer.apply(spec).changed:
                _log_written(prepared, spec)
                changed.append(spec.path)
        return tuple(changed)

    def _write_group(self, group: EntrySet, members: Sequence[Entry],
                     fetched: "Sequence[Sequence[Secret | KvAgentError]]",
                     ) -> Tuple[List[SecretOutcome], bool]:
        """Transform every member of ``group``, then write them all with one
        swap of the set's directory, or none: a failing member keeps the whole
        set as it was, and every member reports why. Returns the members'
        outcomes and whether an old generation was swapped out."""
        prepared = [self._prepare(member, sources) for member, sources in zip(members, fetched)]
        failed = [one for one in prepared if isinstance(one, SecretOutcome)]
        if failed:
            kept = _set_kept(group, failed[0])
            return [one if isinstance(one, SecretOutcome) else SecretOutcome(one.entry, error=kept)
                    for one in prepared], False
        ready = [one for one in prepared if isinstance(one, _Prepared)]
        specs = [spec for one in ready for spec in one.specs()]
        existed = os.path.isdir(group.directory)
        try:
            # The set's directory: DIR_MODE (0755) and this process's user
            # (root), the writer's defaults and the shape remove_set expects.
            # Like every directory the writer makes: consumers must traverse
            # it, each file's own owner and mode guards its bytes, and only
            # root may rename or replace anything in it.
            result = self.writer.apply_set(group.directory, specs)
        except KvAgentError as exc:
            return [SecretOutcome(one.entry, error=exc) for one in ready], False
        outcomes = []
        for one in ready:
            # The members whose files differed (for their outcomes and hooks),
            # as the writer found them: a swap gives every file a new inode,
            # changed or not.
            changed = tuple(spec.path for spec in one.specs()
                            if spec.path in result.changed_paths)
            for spec in one.specs():
                if spec.path in changed:
                    _log_written(one, spec)
            outcomes.append(SecretOutcome(one.entry, version=one.secret.version,
                                          changed_paths=changed, validity=one.validity,
                                          changed_credentials=one.load(self.credentials)))
        if result.changed:
            log.info("swapped in the set %s (%s)", group.directory, group.name)
        return outcomes, result.changed and existed

    def retire_generations(self, report: Optional[SyncReport]) -> None:
        """Before a short-lived run exits (``kv-agent once``): remove the old
        generations of the sets this sync swapped, after the writer's grace
        (SET_GRACE_S, ~2 s) so a reader that opened a set's directory just
        before its swap still finds every file. Costs nothing when no set
        was swapped."""
        if report is not None and report.swapped:
            self._sleep(SET_GRACE_S)
        self.writer.retire(everything=True)

    def abort(self) -> int:
        """Stop now (from another thread than the sync's): every vault and
        identity request in flight ends at once, its socket shut down, and
        no new one is sent (:func:`agent.base.transport.abort`). The sync then
        ends with its files as they were (each write is atomic). Returns how
        many requests were in flight."""
        return transport.abort(self._vault_session) + self.tokens.abort()

    def close(self) -> None:
        """Release HTTP connections."""
        self.tokens.close()
        self._vault_session.close()


class _Arrivals:
    """The outcomes of one sync's fetches, taken as they arrive (in the order
    of ``sources``): an entry is written as soon as its own sources are in,
    while later ones are still in flight, instead of after the last one
    (issue 17, item 20: 1,000 writes no longer wait for 1,000 GETs)."""

    def __init__(self, sources: Sequence[Source],
                 outcomes: "Generator[Secret | KvAgentError, None, None]") -> None:
        self._outcomes = outcomes
        self._arriving = zip(sources, outcomes)
        self._fetched: Dict[Source, "Secret | KvAgentError"] = {}

    def get(self, sources: Sequence[Source]) -> "List[Secret | KvAgentError]":
        """The outcome of each of ``sources``, waiting for those not yet in."""
        for source in sources:
            while source not in self._fetched:
                arrived = next(self._arriving, None)
                if arrived is None:
                    raise KeyError(source)  # not among the fetches: a bug
                self._fetched[arrived[0]] = arrived[1]
        return [self._fetched[source] for source in sources]

    def rest(self) -> "Dict[Source, Secret | KvAgentError]":
        """Every outcome, after waiting for those not yet taken."""
        self._fetched.update(self._arriving)
        return self._fetched

    def close(self) -> None:
        """Cancel the fetches not yet sent and wait for those in flight."""
        self._outcomes.close()


class _Prepared(NamedTuple):
    """An entry whose sources arrived and whose outputs' bytes are ready."""

    entry: Entry
    secret: Secret  # the first source: its version is the entry's
    contents: Tuple[bytes, ...]
    validity: Validity

    def specs(self) -> Tuple[FileSpec, ...]:
        """The files (a credential-only output is none)."""
        return specs_of(self.entry.outputs.outputs, self.contents)

    def load(self, store: CredentialStore[Grant]) -> Tuple[str, ...]:
        """The credentials into ``store``, once the entry succeeded: what changed."""
        return credentials.load(store, self.entry, self.contents, self.secret.version)


def _log_written(prepared: _Prepared, spec: FileSpec) -> None:
    entry, fetched = prepared.entry, prepared.secret
    output = next(o for o in entry.outputs.outputs if o.path == spec.path)
    log.info("wrote %s (secret %s, version %s, %s:%s %04o)", output.path, entry.name,
             fetched.version, output.owner, output.group, output.mode)


def _written(outcome: SecretOutcome, fetched: "Mapping[Source, Secret | KvAgentError]",
             fetched_at: float) -> WrittenOutcome:
    """What the freshness memory keeps of one outcome: no value, only versions."""
    seen = tuple((source, SourceSeen(one.version, one.attributes.updated, fetched_at,
                                     one.answered_at))
                 for source in outcome.entry.sources
                 for one in [fetched.get(source)] if isinstance(one, Secret))
    return WrittenOutcome(EntryWritten(outcome.entry, outcome.version, outcome.validity, ()),
                          seen, outcome.error)


def _validity(secrets: Sequence[Secret], leaf: Optional[Window]) -> Validity:
    """The entry's validity window: its sources' nbf/exp and, for a
    certificate, the leaf's notBefore/notAfter (the narrower window counts)."""
    windows = [Validity(s.attributes.nbf, s.attributes.exp) for s in secrets]
    if leaf is not None:
        windows.append(Validity(*leaf))
    return combine(windows)


def _set_kept(group: EntrySet, failed: SecretOutcome) -> SetKeptError:
    """The error of a set's members that did not fail themselves."""
    assert failed.error is not None
    label = (f"the certificate's files in {group.directory}"
             if group.name.startswith("certificate:") else
             f"set '{group.name}' ({group.directory})")
    return SetKeptError(f"{label} kept as it was: secret '{failed.entry.name}' of the set "
                        f"failed: {failed.error.message}", failed.error.hint, failed.error)
