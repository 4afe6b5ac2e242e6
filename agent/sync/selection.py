"""Bulk selection: a ``select:`` entry expanded into plain entries.

Which secrets a :class:`~agent.manifest.Selection` covers is known only
after listing its vault (:meth:`agent.vault.client.VaultClient.list_secrets`):
every secret that is enabled, whose name starts with the prefix and that
carries every tag asked for becomes one ordinary :class:`~agent.manifest.Entry`
(one file, ``<directory>/<name>``, the name minus the prefix with
``strip_prefix``), fetched and written like any other.

Skipped, each said why: a certificate's secret (``managed``) unless
``include_certificates``; a secret an explicit entry of the manifest already
names on the same vault (the explicit entry owns it: a selection never
writes what the operator placed by hand); a name that is the prefix itself
under ``strip_prefix`` (no file name would be left); a name the listing
repeats, in the same or another case (one secret to Key Vault: with
``strip_prefix`` both would write one file, counted twice), after its first
appearance. Names compare case-insensitively, as Key Vault compares them
[protocol.md B7].

Pure values and functions; nothing here does I/O.
"""

from __future__ import annotations

import posixpath
from typing import AbstractSet, Dict, Iterable, List, NamedTuple, Optional, Tuple

from agent.manifest import Entry, Selection
from agent.pipeline.outputs import OutputSet
from agent.pipeline.sources import Source
from agent.vault.listing import SecretItem

MAX_REPEATS_SHOWN = 3  # spellings of a repeated name one skip line shows


class Expansion(NamedTuple):
    """A selection's entries after one listing, in the vault's order, and
    one line per matching secret it skipped."""

    entries: Tuple[Entry, ...]
    skipped: Tuple[str, ...]


def matches(selection: Selection, item: SecretItem) -> bool:
    """Whether the listed ``item`` is enabled and matches the prefix (any
    case) and every tag (exactly) of ``selection``. A secret whose
    ``enabled`` is absent counts as disabled: only what the vault says is
    enabled is taken."""
    if item.attributes.enabled is not True:
        return False
    if not item.name.lower().startswith(selection.prefix.lower()):
        return False
    have = dict(item.attributes.tags or ())
    return all(have.get(name) == value for name, value in selection.tags)


def expand(selection: Selection, items: Iterable[SecretItem],
           explicit: AbstractSet[Tuple[str, str]]) -> Expansion:
    """The entries ``selection`` makes of a vault's listing ``items``.

    ``explicit`` holds (vault, lower-case name) of every secret the
    manifest's explicit entries name: those are skipped, never written twice.
    """
    entries: List[Entry] = []
    skipped: List[str] = []
    names: Dict[str, List[str]] = {}  # lower-case name -> each spelling listed, in order
    for item in items:
        if not matches(selection, item):
            continue
        spellings = names.setdefault(item.name.lower(), [])
        spellings.append(item.name)
        if len(spellings) > 1:
            continue
        why = _skip_reason(selection, item, explicit)
        if why is not None:
            skipped.append(f"{selection.label}: skipped secret '{item.name}': {why}")
            continue
        entries.append(entry_for(selection, item.name))
    skipped.extend(_repeated(selection, spellings)
                   for spellings in names.values() if len(spellings) > 1)
    return Expansion(tuple(entries), tuple(skipped))


def entry_for(selection: Selection, name: str) -> Entry:
    """The entry ``selection`` makes of its secret ``name``: one file,
    ``<directory>/<file name>``, as its defaults say (also how the sealed
    cache rebuilds an expansion it kept: :mod:`agent.daemon.cache_serve`).
    ``name`` must leave a file name (:func:`file_name`)."""
    file = file_name(selection, name)
    assert file is not None  # the caller refused the empty name
    output = selection.defaults._replace(path=posixpath.join(selection.directory, file))
    return Entry(name=name, sources=(Source(selection.vault, name),),
                 outputs=OutputSet((output,)), is_optional=selection.is_optional,
                 on_change=selection.on_change, line=selection.line)


def _repeated(selection: Selection, spellings: List[str]) -> str:
    """The one skip line of a name the listing gave more than once (a few
    repeats shown: a hostile listing may repeat a name thousands of times)."""
    repeats = spellings[1:]
    again = ", ".join(f"'{name}'" for name in repeats[:MAX_REPEATS_SHOWN])
    if len(repeats) > MAX_REPEATS_SHOWN:
        again += f" and {len(repeats) - MAX_REPEATS_SHOWN} more"
    return (f"{selection.label}: skipped secret {again}: the listing already named "
            f"'{spellings[0]}', the same secret (Key Vault names are case-insensitive); "
            "taken once")


def file_name(selection: Selection, name: str) -> Optional[str]:
    """The file name of secret ``name`` under the selection's directory
    (None when stripping the prefix leaves nothing)."""
    if selection.strip_prefix:
        name = name[len(selection.prefix):]
    return name or None


def _skip_reason(selection: Selection, item: SecretItem,
                 explicit: AbstractSet[Tuple[str, str]]) -> Optional[str]:
    if item.attributes.managed is True and not selection.include_certificates:
        return "a certificate's secret (add include_certificates: true to take it)"
    if (selection.vault, item.name.lower()) in explicit:
        return "an explicit entry of the manifest names it; that entry writes it"
    if file_name(selection, item.name) is None:
        return "its name is the prefix itself, which leaves no file name"
    return None


def explicit_names(entries: Iterable[Entry]) -> AbstractSet[Tuple[str, str]]:
    """(vault, lower-case name) of every secret the explicit ``entries`` name."""
    return frozenset((source.vault, source.name.lower())
                     for entry in entries for source in entry.sources)
