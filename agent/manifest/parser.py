"""Read and validate a manifest into a frozen :class:`~agent.manifest.model.Manifest`.

The order: the file's owner, mode and size (:mod:`agent.manifest.file`);
the text's cost (:func:`~agent.manifest.document.check_shape`); the YAML,
with line numbers; then the top-level settings, every entry, and what the
entries may share (paths, directories, credential IDs). Every problem is
collected and all are raised at once, each on one line naming the file, the
line, the key and the fix.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import yaml

from agent.manifest.conflicts import (
    check_credential_conflicts,
    check_path_conflicts,
    check_selection_conflicts,
    collect_sets,
)
from agent.manifest.document import MAX_MANIFEST_BYTES, LineLoader, YamlMap, check_shape
from agent.manifest.entries import parse_entry
from agent.manifest.file import read_manifest_text
from agent.manifest.model import (
    DEFAULT_JITTER,
    DEFAULT_REFRESH_S,
    DEFAULT_WARN_BEFORE_EXPIRY_S,
    Accounts,
    Entry,
    Manifest,
    Selection,
)
from agent.manifest.problems import Problems, unknown_keys
from agent.manifest.quoting import echo
from agent.manifest.selections import parse_selection
from agent.manifest.settings import (
    parse_identity,
    top_cache,
    top_directory,
    top_metrics,
    top_number,
    top_vault,
)
from agent.manifest.values import MAX_JITTER, parse_duration, parse_expiry_window, parse_jitter

TOP_KEYS = ("vault", "directory", "refresh", "refresh_jitter", "identity", "secrets",
            "warn_before_expiry", "metrics", "cache")


def load_manifest(
    source: str, *, accounts: Optional[Accounts] = None, euid: Optional[int] = None,
    check_filesystem: bool = True,
) -> Manifest:
    """Read, check and validate ``source``; raise ManifestError listing every
    problem. ``check_filesystem`` also rejects symlinked parents on disk."""
    text = read_manifest_text(source, euid)
    return parse_manifest(text, source, accounts=accounts, check_filesystem=check_filesystem)


def parse_manifest(
    text: str, source: str = "<manifest>", *, accounts: Optional[Accounts] = None,
    check_filesystem: bool = True,
) -> Manifest:
    """Validate manifest text; pure apart from account lookups and, when
    ``check_filesystem``, lstat() of existing parents.

    Whatever ``text`` holds, this returns a Manifest or raises ManifestError
    whose problems are single printable lines of bounded length, in bounded
    time and memory (tests/test_manifest_fuzz.py checks it).
    """
    accounts = accounts or Accounts.system()
    problems = Problems(source)
    if len(text) > MAX_MANIFEST_BYTES:
        problems.add("", f"larger than {MAX_MANIFEST_BYTES >> 20} MiB", None,
                     "a manifest needs far less; is this the right file?")
        problems.raise_if_any()
    too_costly = check_shape(text)
    if too_costly is not None:
        problems.add("", too_costly[0], too_costly[1])
        problems.raise_if_any()
    try:
        data = yaml.load(text, Loader=LineLoader)  # noqa: S506 - SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        reason = getattr(exc, "problem", None) or "invalid YAML"
        problems.add("", f"not valid YAML: {reason}", mark.line + 1 if mark else None,
                     "fix the syntax (indentation, quotes, colons)")
        problems.raise_if_any()
    except (ValueError, OverflowError, TypeError, RecursionError) as exc:
        # SafeLoader's own constructors, e.g. the date 2001-02-30 (ValueError).
        problems.add("", f"a value YAML cannot build: {echo(str(exc))}", None,
                     "quote the value to make it a string")
        problems.raise_if_any()
    if not isinstance(data, YamlMap):
        problems.add("", "the top level must be a mapping with vault, directory and secrets",
                     None, "see the README for an example")
        problems.raise_if_any()
    unknown_keys(problems, data, TOP_KEYS, "")

    vault = top_vault(problems, data)
    directory = top_directory(problems, data)
    refresh = top_number(problems, data, "refresh", parse_duration, DEFAULT_REFRESH_S,
                         "write a positive duration such as 90, 90s, 15m, 1h or 1h30m")
    jitter = top_number(problems, data, "refresh_jitter", parse_jitter, DEFAULT_JITTER,
                        f"write a percentage from 0% to {MAX_JITTER:.0%}, "
                        "e.g. refresh_jitter: 10%")
    warn = top_number(problems, data, "warn_before_expiry", parse_expiry_window,
                      DEFAULT_WARN_BEFORE_EXPIRY_S,
                      "write a duration up to 366d such as 14d, 36h or 90m")
    identity = parse_identity(problems, data.get("identity"), data.key_lines.get("identity"))
    secrets, selections = _parse_secrets(problems, data, vault, directory, accounts,
                                         check_filesystem)
    sets = collect_sets(problems, secrets, selections, directory)
    metrics = top_metrics(problems, data, directory)
    cache = top_cache(problems, data, directory)
    problems.raise_if_any()
    return Manifest(source, vault or "", directory, refresh, identity, secrets, jitter,
                    sets, warn, selections, metrics, cache)


def _parse_secrets(
    problems: Problems, data: YamlMap, vault: Optional[str], directory: str,
    accounts: Accounts, check_filesystem: bool,
) -> Tuple[Tuple[Entry, ...], Tuple[Selection, ...]]:
    entries = data.get("secrets")
    line = data.key_lines.get("secrets", data.line)
    if entries is None:
        problems.add("secrets", "missing", line, "add a list of secrets (see README)")
        return (), ()
    if not isinstance(entries, list):
        problems.add("secrets", "must be a list of entries, each starting with '- name:'", line)
        return (), ()
    parsed: List[Entry] = []
    selections: List[Selection] = []
    for index, entry in enumerate(entries):
        if isinstance(entry, YamlMap) and "select" in entry:
            selection = parse_selection(problems, entry, index, vault, directory, accounts,
                                        check_filesystem)
            if selection is not None:
                selections.append(selection)
            continue
        secret = parse_entry(problems, entry, index, line, vault, directory, accounts,
                             check_filesystem)
        if secret is not None:
            parsed.append(secret)
    check_path_conflicts(problems, parsed)
    check_credential_conflicts(problems, parsed)
    check_selection_conflicts(problems, parsed, selections)
    return tuple(parsed), tuple(selections)
