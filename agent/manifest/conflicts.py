"""What the entries of a manifest may share, checked once all are parsed.

No path twice, no file inside another's, a select directory to its
selection alone, a set's directory to its set alone (:func:`collect_sets`,
which makes the manifest's sets), and no credential ID served to one unit by
two outputs (:func:`check_credential_conflicts`).
"""

from __future__ import annotations

import posixpath
from typing import Dict, List, NamedTuple, Optional, Tuple

from agent.manifest.model import Entry, Selection
from agent.manifest.problems import Problems
from agent.pipeline.credentials import is_glob, may_overlap
from agent.pipeline.outputs import EntrySet

CERTIFICATE_SET_PREFIX = "certificate:"
# Unit patterns compared pairwise for one credential ID, at most: a glob is
# compared with every other pattern of its ID (a literal with a dictionary),
# and a manifest of 100,000 values must still be checked in bounded time.
MAX_GLOB_COMPARISONS = 100_000


def check_path_conflicts(problems: Problems, entries: List[Entry]) -> None:
    """No two outputs may be one path, nor one lie inside another's file."""
    seen: Dict[str, Entry] = {}
    for entry in entries:
        for path in entry.paths:
            other = seen.get(path)
            if other is not None:
                problems.add("path", f"{path} is written by both '{other.name}' "
                             f"(line {other.line}) and '{entry.name}'", entry.line,
                             "give each entry its own path")
                continue
            seen[path] = entry
    for entry in entries:
        for path in entry.paths:
            parent = posixpath.dirname(path)
            # Up to the top, which is its own dirname ("/"; "//" before paths
            # were normalised, and this loop never ended).
            while parent != posixpath.dirname(parent):
                if parent in seen:
                    problems.add("path", f"{path} would be inside {parent}, which "
                                 f"'{seen[parent].name}' writes as a file", entry.line,
                                 "choose paths that do not nest")
                    break
                parent = posixpath.dirname(parent)


def check_selection_conflicts(problems: Problems, entries: List[Entry],
                              selections: List[Selection]) -> None:
    """A select directory belongs to its selection alone: no explicit
    entry's file in it or below it (its files would collide, by name or by
    case, with a selected secret's), none of its parents an entry's file,
    and no other selection's directory in, above or at it."""
    for index, selection in enumerate(selections):
        folder = selection.directory
        inside = folder.lower() + "/"
        for entry in entries:
            for path in entry.paths:
                if path.lower().startswith(inside) or path.lower() == folder.lower():
                    problems.add("directory", f"{path} of '{entry.name}' (line {entry.line}) "
                                 f"is inside {folder}, which the {selection.label} fills",
                                 selection.line, "give the selection a directory of its own")
                elif folder.startswith(path + "/"):
                    problems.add("directory", f"{folder} would be inside {path}, which "
                                 f"'{entry.name}' writes as a file", selection.line,
                                 "choose paths that do not nest")
        for other in selections[:index]:
            a, b = folder.lower() + "/", other.directory.lower() + "/"
            if a.startswith(b) or b.startswith(a):
                problems.add("directory", f"{folder} overlaps {other.directory} of the "
                             f"{other.label} (line {other.line})", selection.line,
                             "give each selection a directory of its own")


def collect_sets(
    problems: Problems, entries: Tuple[Entry, ...], selections: Tuple[Selection, ...],
    directory: str,
) -> Tuple[EntrySet, ...]:
    """The manifest's sets, after checking each lives alone in one directory.

    A set is the entries sharing a ``set:`` name, or a certificate entry on
    its own. Its files must all be in one directory, not the manifest's
    top directory, and no other entry may write into it or below it, nor a
    ``select:`` entry fill a directory below it: the writer swaps that
    directory whole and refuses one holding a subdirectory, so the set would
    never change again. (A select directory at or above a set's is refused
    by the selection rules: the set's files would be inside it.)
    """
    members: Dict[str, List[Entry]] = {}
    for entry in entries:
        if entry.set_name is not None:
            members.setdefault(entry.set_name, []).append(entry)
        elif entry.transform == "certificate" and entry.paths:  # not credentials alone
            members[CERTIFICATE_SET_PREFIX + entry.key] = [entry]
    sets = []
    for name, group in members.items():
        label = f"certificate of '{group[0].name}'" if name.startswith(
            CERTIFICATE_SET_PREFIX) else f"set '{name}'"
        folders = sorted({posixpath.dirname(path) for entry in group for path in entry.paths})
        if len(folders) > 1:
            problems.add("set", f"the {label} has files in {len(folders)} directories "
                         f"({', '.join(folders[:3])}); its files change together",
                         group[0].line, "put all of them in one directory")
            continue
        folder = folders[0]
        if folder == directory:
            problems.add("set", f"the {label} is in the top directory {directory}, which "
                         "holds other files", group[0].line,
                         f"put its files in a directory of their own, e.g. {directory}/"
                         f"{name.rsplit('/', 1)[-1].replace(':', '-') or 'set'}/")
            continue
        keys = {entry.key for entry in group}
        intruder = next((entry for entry in entries if entry.key not in keys and any(
            path.startswith(folder + "/") for path in entry.paths)), None)
        if intruder is not None:
            problems.add("set", f"the {label} needs {folder} to itself, but '{intruder.name}' "
                         f"(line {intruder.line}) writes there", group[0].line,
                         "move one of them to another directory, or give both the same set")
            continue
        selection = next((one for one in selections
                          if one.directory.startswith(folder + "/")), None)
        if selection is not None:
            problems.add("directory", f"{selection.directory} of the {selection.label} is "
                         f"inside {folder}, which the {label} (line {group[0].line}) needs to "
                         "itself: the set would never be rotated again", selection.line,
                         f"give the selection a directory outside {folder}")
            continue
        sets.append(EntrySet(name, folder, tuple(entry.key for entry in group)))
    return tuple(sets)



def check_credential_conflicts(problems: Problems, entries: List[Entry]) -> None:
    """No two outputs may serve one credential ID to one unit: the unit would
    get one of two values, and which would be chance. Two patterns clash
    when a unit could match both (:func:`agent.pipeline.credentials.may_overlap`):
    exactly for unit names, conservatively for two globs, which are told
    apart only by their fixed beginnings or endings. Each output reports its
    first clash only."""
    served = _Served()
    for entry in entries:
        for grant in entry.grants:
            clash = next((found for unit in grant.units
                          for found in [served.clash(grant.id, unit)] if found), None)
            if served.budget < 0:
                problems.add("credential", "too many unit globs share the credential ID "
                             f"'{grant.id}' to check them against each other", entry.line,
                             "give the credentials distinct IDs")
                return
            if clash is not None:
                _report_clash(problems, entry, grant.id, clash)
            served.add(grant.id, grant.units, entry)


class _Clash(NamedTuple):
    unit: str  # the later output's pattern
    pattern: str  # the earlier output's
    other: Entry  # the earlier output's entry


class _Served:
    """The unit patterns served so far, per credential ID: unit names in a
    dictionary, globs in a list, and how many more glob comparisons the check
    may make (MAX_GLOB_COMPARISONS in all)."""

    def __init__(self) -> None:
        self.names: Dict[Tuple[str, str], Entry] = {}
        self.globs: Dict[str, List[Tuple[str, Entry]]] = {}
        self.patterns: Dict[str, List[Tuple[str, Entry]]] = {}
        self.budget = MAX_GLOB_COMPARISONS

    def clash(self, credential_id: str, unit: str) -> Optional[_Clash]:
        """An earlier pattern of ``credential_id`` that ``unit`` may meet."""
        if not is_glob(unit):
            named = self.names.get((credential_id, unit))
            if named is not None:
                return _Clash(unit, unit, named)
            candidates = self.globs.get(credential_id, [])
        else:
            candidates = self.patterns.get(credential_id, [])
        self.budget -= len(candidates)
        if self.budget < 0:
            return None
        return next((_Clash(unit, pattern, other) for pattern, other in candidates
                     if may_overlap(unit, pattern)), None)

    def add(self, credential_id: str, units: Tuple[str, ...], entry: Entry) -> None:
        for unit in units:
            self.patterns.setdefault(credential_id, []).append((unit, entry))
            if is_glob(unit):
                self.globs.setdefault(credential_id, []).append((unit, entry))
            else:
                self.names.setdefault((credential_id, unit), entry)


def _report_clash(problems: Problems, entry: Entry, credential_id: str, clash: _Clash) -> None:
    who = f"two outputs of '{entry.name}'" if clash.other is entry else \
        f"both '{clash.other.name}' (line {clash.other.line}) and '{entry.name}'"
    granted = f"granted the credential '{credential_id}' by {who}"
    if clash.unit == clash.pattern:
        what = f"{clash.unit} is {granted}"
    elif is_glob(clash.unit) and is_glob(clash.pattern):
        what = (f"{clash.unit} and {clash.pattern} may match one unit, {granted} (kv-agent "
                "tells two globs apart only by their fixed beginnings or endings)")
    else:
        what = f"{clash.unit} and {clash.pattern} match one unit, {granted}"
    problems.add("credential", what, entry.line,
                 "give each its own ID, or units that no unit matches twice")
