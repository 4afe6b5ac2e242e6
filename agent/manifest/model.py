"""The validated manifest: frozen values, and their defaults in one place.

A :class:`Manifest` holds :class:`Entry` values (what to fetch, how to turn
it into bytes, which files) and :class:`Selection` values (``select:``
entries, expanded after each listing). Each is a frozen dataclass; a line
number serves messages only and is left out of equality
(``field(compare=False)``).
"""

from __future__ import annotations

import grp
import posixpath
import pwd
from dataclasses import dataclass, field
from typing import Callable, Optional, Tuple

from agent.cache.policy import CachePolicy
from agent.identity.selector import Identity
from agent.pipeline.credentials import Grant
from agent.pipeline.outputs import EntrySet, Output, OutputSet
from agent.pipeline.sources import Source
from agent.pipeline.transforms import DEFAULT_TRANSFORM, TransformParams

DEFAULT_DIRECTORY = "/run/secrets"
# `metrics: true`: node_exporter's --collector.textfile.directory=/run/kv-agent/metrics
DEFAULT_METRICS_PATH = "/run/kv-agent/metrics/kv-agent.prom"
DEFAULT_REFRESH_S = 15 * 60.0
DEFAULT_MODE = 0o400
DEFAULT_WARN_BEFORE_EXPIRY_S = 14 * 86400.0
DEFAULT_JITTER = 0.10  # +-10% of the interval, so a fleet does not refresh in step


@dataclass(frozen=True)
class Entry:
    """One manifest entry: the :class:`~agent.pipeline.sources.Source` values to fetch
    (one, or a template's one per value, in order), the transform that turns
    them into bytes with its parameters, and the
    :class:`~agent.pipeline.outputs.OutputSet` those bytes become, in order:
    files, systemd credentials (:attr:`grants`), or both.

    ``name`` is the entry's ``name:`` as the manifest gives it, for messages
    (for a template, a label; for the others, the secret). ``set_name`` is
    the :class:`~agent.pipeline.outputs.EntrySet` the entry belongs to, if any.
    ``line`` (where the entry starts) serves messages only and is left out
    of equality: a manifest that only gained a comment is the same manifest,
    and a reload keeps its sessions and token.
    """

    name: str
    sources: Tuple[Source, ...]
    outputs: OutputSet
    transform: str = DEFAULT_TRANSFORM
    params: TransformParams = TransformParams()
    set_name: Optional[str] = None
    is_optional: bool = False
    on_change: Tuple[str, ...] = ()  # argv run (no shell) after a file changes
    line: Optional[int] = field(default=None, compare=False)

    @property
    def source(self) -> Source:
        """The first source: the entry's own secret (a template's first value)."""
        return self.sources[0]

    @property
    def primary(self) -> Output:
        """The first output (its ``path`` is empty for a credential alone)."""
        return self.outputs.outputs[0]

    @property
    def key(self) -> str:
        """What the daemon's state, ledger and status.json know the entry by:
        its first file's path, unique in a manifest (two entries may not
        share a path) and stable across edits that do not move that file.
        An entry that writes no file (only credentials) is known by its first
        grant's label, ``credential:<units>/<ID>``: never a path (paths are
        absolute), and unique too (two entries may not serve one ID to one
        unit, so two with one ID differ in their units)."""
        paths = self.outputs.paths
        return paths[0] if paths else self.outputs.grants[0].label

    @property
    def paths(self) -> Tuple[str, ...]:
        """The entry's files; none for an entry that only serves credentials."""
        return self.outputs.paths

    @property
    def grants(self) -> Tuple[Grant, ...]:
        """The credentials the entry serves, in output order."""
        return self.outputs.grants

    @property
    def targets(self) -> Tuple[str, ...]:
        """Where its bytes go, for messages: each file, then each credential's label."""
        return self.paths + tuple(grant.label for grant in self.grants)


@dataclass(frozen=True)
class Selection:
    """A ``select:`` entry: every enabled secret of ``vault`` whose name
    starts with ``prefix`` (case-insensitively, as Key Vault compares names
    [protocol.md B7]) and that carries every tag of ``tags``, written to
    ``directory``/<name> (minus the prefix with ``strip_prefix``) as
    ``defaults`` says (owner, group, mode; its path is unused).

    Which secrets these are is known only after listing the vault: the
    agent expands a selection into plain :class:`Entry` values at each sync
    (:mod:`agent.sync.selection`). ``line`` is left out of equality, as for Entry.
    """

    prefix: str
    tags: Tuple[Tuple[str, str], ...]
    vault: str
    directory: str
    defaults: Output
    strip_prefix: bool = False
    include_certificates: bool = False
    is_optional: bool = False
    on_change: Tuple[str, ...] = ()
    line: Optional[int] = field(default=None, compare=False)

    @property
    def label(self) -> str:
        """How messages and status name the selection."""
        tags = ",".join(f"{name}={value}" for name, value in self.tags)
        return f"select prefix '{self.prefix}'" + (f" tags {tags}" if tags else "")

    @property
    def entry(self) -> Entry:
        """The selection as one pseudo-entry, known by its directory: what
        a sync reports about its listing (listed, or why not), so that
        ``once``, STATUS= and status.json show it like any entry."""
        return Entry(name=self.label, sources=(Source(self.vault, self.label),),
                     outputs=OutputSet((self.defaults._replace(path=self.directory),)),
                     transform="select", is_optional=self.is_optional, line=self.line)


@dataclass(frozen=True)
class Manifest:
    """A validated manifest. ``source`` is the file it came from."""

    source: str
    vault: str
    directory: str
    refresh_interval_s: float
    identity: Identity
    secrets: Tuple[Entry, ...]
    refresh_jitter: float = DEFAULT_JITTER  # fraction of the interval, either way
    # Entries whose files change together, each in a directory of its own.
    sets: Tuple[EntrySet, ...] = ()
    warn_before_expiry_s: float = DEFAULT_WARN_BEFORE_EXPIRY_S
    # ``select:`` entries, expanded after each listing (agent.sync.selection).
    selections: Tuple[Selection, ...] = ()
    # Where the running agent writes Prometheus metrics (agent.daemon.metrics); None: off.
    metrics_path: Optional[str] = None
    # The sealed cache of the last good secrets (agent.cache); None: no cache (the default).
    cache: Optional[CachePolicy] = None


def landing_directories(manifest: Manifest) -> Tuple[str, ...]:
    """Every directory a file of ``manifest`` is written into, as the writer
    opens them: an explicit file's directory, a select entry's directory,
    and for a set the parent of its directory (the set's own directory is
    swapped whole, never written into). Sorted, each once. Pure: ``check``
    and ``doctor`` judge each with :meth:`agent.writer.Writer.check_directory`."""
    in_sets = {key for group in manifest.sets for key in group.keys}
    found = {posixpath.dirname(group.directory) for group in manifest.sets}
    found.update(posixpath.dirname(path) for entry in manifest.secrets
                 if entry.key not in in_sets for path in entry.paths)
    found.update(selection.directory for selection in manifest.selections)
    return tuple(sorted(found))


@dataclass(frozen=True)
class Accounts:
    """Resolves user and group names; replaceable in tests.

    Each lookup returns the numeric id, or None when the name is unknown.
    """

    user: Callable[[str], Optional[int]]
    group: Callable[[str], Optional[int]]

    @classmethod
    def system(cls) -> "Accounts":
        """Lookups through NSS (``getpwnam``/``getgrnam``)."""
        return cls(user=_getpwnam_uid, group=_getgrnam_gid)


def _getpwnam_uid(name: str) -> Optional[int]:
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        return None


def _getgrnam_gid(name: str) -> Optional[int]:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None
