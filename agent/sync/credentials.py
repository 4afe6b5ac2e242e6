"""Credentials in a sync: what the manifest serves, what lands in the store,
and what the refresh's memory may trust.

An output with ``credential:`` lands in the
:class:`~agent.writer.credentials.CredentialStore` (memory only) instead of,
or as well as, a file. The rules a sync follows:

1. The store's owner declares the grants of the manifest in force
   (:func:`declare`), once that manifest is current: from then on only
   those are served, a credential that left the manifest or changed its
   units is dropped, and a sync of an older manifest loads nothing the new
   one does not declare. (The daemon declares at each install, after the
   new manifest was accepted; a Sync that makes its own store declares its
   manifest itself.)
2. An entry's credentials are loaded only when the whole entry succeeded
   (its files written, its set swapped): a failed fetch or transform keeps
   the last good value, as it keeps the last good file (:func:`load`).
3. A value that did not change is not counted as written and runs no hook;
   a changed one is named for ``KV_AGENT_CHANGED`` once per unit pattern,
   ``credential:<unit pattern>/<ID>``
   (:func:`agent.pipeline.credentials.change_names`).
4. The refresh's memory skips an unchanged entry only if the store still
   holds its values (:func:`forget_unloaded`): a store that lost them (a new
   one, grants declared anew) gets them fetched again.
"""

from __future__ import annotations

import logging
from typing import Dict, Iterable, NamedTuple, Sequence, Tuple

from agent.manifest import Entry, Manifest
from agent.pipeline.credentials import Grant, change_names
from agent.sync.freshness import Freshness
from agent.writer.credentials import CredentialStore

log = logging.getLogger(__name__)


class Served(NamedTuple):
    """What a manifest serves, for ``kv-agent check``: how many credentials
    (outputs with ``credential:``) and how many distinct unit patterns."""

    credentials: int
    unit_patterns: int

    def describe(self) -> str:
        """One line: '2 credentials for 3 unit patterns'."""
        return (f"{self.credentials} credential{'s' if self.credentials != 1 else ''} for "
                f"{self.unit_patterns} unit pattern{'s' if self.unit_patterns != 1 else ''}")


def declared(entries: Iterable[Entry]) -> Dict[str, Tuple[Grant, ...]]:
    """Each entry's grants by its key, for entries that serve any (rule 1)."""
    return {entry.key: entry.grants for entry in entries if entry.grants}


def declare(store: CredentialStore[Grant], manifest: Manifest) -> CredentialStore[Grant]:
    """Make ``manifest``'s credentials the ones ``store`` serves (rule 1);
    returns ``store``."""
    store.declare(declared(manifest.secrets))
    return store


def served(manifest: Manifest) -> Served:
    """How many credentials ``manifest`` serves, to how many unit patterns."""
    grants = [grant for entry in manifest.secrets for grant in entry.grants]
    return Served(len(grants), len({unit for grant in grants for unit in grant.units}))


def load(store: CredentialStore[Grant], entry: Entry, contents: Sequence[bytes],
         version: str) -> Tuple[str, ...]:
    """Hand ``entry``'s credential outputs (``contents`` holds every output's
    bytes, in output order) to ``store``, replacing the entry's values in one
    step; call only once the entry succeeded (rule 2). Returns the
    ``KV_AGENT_CHANGED`` names of the credentials whose bytes changed (rule 3);
    none when the entry serves none."""
    values = [(output.credential, data)
              for output, data in zip(entry.outputs.outputs, contents)
              if output.credential is not None]
    if not values:
        return ()
    changed = store.replace(entry.key, values)
    for grant in changed:
        log.info("holding %s in memory (secret %s, version %s)", grant.label, entry.name,
                 version)
    return tuple(name for grant in changed for name in change_names(grant))


def forget_unloaded(memory: Freshness, store: CredentialStore[Grant]) -> Freshness:
    """``memory`` without the entries whose credentials ``store`` does not
    hold for their very grants, so the refresh fetches them again (rule 4).
    Costs nothing for a manifest without credentials."""
    entries = {key: written for key, written in memory.entries.items()
               if not written.entry.grants or store.holds(key, written.entry.grants)}
    if len(entries) == len(memory.entries):
        return memory
    return memory._replace(entries=entries)


def unloaded(entries: Iterable[Entry], store: CredentialStore[Grant]) -> Tuple[Entry, ...]:
    """The entries of ``entries`` that serve credentials not yet loaded, in
    order: READY waits until none that is not optional is left."""
    serving = [entry for entry in entries if entry.grants]
    missing = set(store.unloaded(entry.key for entry in serving))
    return tuple(entry for entry in serving if entry.key in missing)
