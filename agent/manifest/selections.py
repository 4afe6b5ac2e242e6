"""The manifest's ``select:`` entries: which secrets of a vault, into which directory.

Which secrets a selection covers is known only after listing the vault
(:mod:`agent.sync.selection`); here the filter (a name prefix, tags), the
directory and the owner, group and mode of its files are checked.
"""

from __future__ import annotations

import re
from typing import Any, Callable, List, Optional, Tuple

from agent.manifest.document import YamlMap
from agent.manifest.entries import ownership, resolve_vault
from agent.manifest.model import Accounts, Selection
from agent.manifest.paths import PATH_MAX, Paths
from agent.manifest.problems import Problems, Scope, suggest, unknown_keys
from agent.manifest.quoting import echo
from agent.manifest.values import parse_command

SELECT_KEYS = ("select", "directory", "owner", "group", "mode", "optional", "on_change",
               "vault", "strip_prefix", "include_certificates")
SELECT_FILTER_KEYS = ("prefix", "tags")
SELECT_PREFIX_RE = re.compile(r"^[0-9A-Za-z-]{0,126}$")  # a name's start [protocol.md B7]
MAX_SELECT_TAGS = 15  # Key Vault's own limit on a secret's tags
MAX_TAG_CHARS = 256
SELECTED_NAME_CHARS = 128  # room under a select directory for a name (127) and its slash


def parse_selection(
    problems: Problems, entry: YamlMap, index: int, vault: Optional[str], directory: str,
    accounts: Accounts, check_filesystem: bool,
) -> Optional[Selection]:
    """A ``select:`` entry, every problem reported (see :class:`Selection`)."""
    prefix_key = f"secrets[{index}]"
    before = len(problems.lines)
    unknown_keys(problems, entry, SELECT_KEYS, f"{prefix_key}.")

    def fail(key: str, message: str, hint: str = "") -> None:
        problems.add(f"{prefix_key}.{key}", message, entry.key_lines.get(key, entry.line), hint)

    prefix, tags = _select_filter(fail, entry["select"])
    entry_vault = resolve_vault(fail, entry, vault)
    if "vault" not in entry and not vault:
        fail("vault", "missing", "add vault: at the top or in this entry")
    folder = None
    if "directory" not in entry:
        fail("directory", "missing", "add directory: <folder for the selected secrets' files>")
    else:
        folder = Paths(directory, check_filesystem).resolve(fail, "directory", entry["directory"])
        if folder is not None and len(folder.encode()) > PATH_MAX - SELECTED_NAME_CHARS:
            fail("directory", "too long to hold a secret's name", "shorten it")
    owned = ownership(fail, entry, accounts)
    flags = {}
    for key in ("optional", "strip_prefix", "include_certificates"):
        flags[key] = entry.get(key, False)
        if not isinstance(flags[key], bool):
            fail(key, f"'{echo(flags[key])}' is not true or false", f"write {key}: true")
    on_change: Tuple[str, ...] = ()
    if "on_change" in entry:
        try:
            on_change = parse_command(entry["on_change"])
        except ValueError as exc:
            fail("on_change", str(exc), 'e.g. on_change: ["systemctl", "reload", "app.service"]')
    if len(problems.lines) > before or prefix is None or folder is None or not entry_vault:
        return None
    return Selection(prefix, tags, entry_vault, folder, owned,
                     strip_prefix=flags["strip_prefix"] is True,
                     include_certificates=flags["include_certificates"] is True,
                     is_optional=flags["optional"] is True, on_change=on_change,
                     line=entry.line)


def _select_filter(
    fail: Callable[..., None], value: Any,
) -> Tuple[Optional[str], Tuple[Tuple[str, str], ...]]:
    """``select: {prefix, tags}``: the prefix ('' when absent) and the tags
    as sorted pairs; (None, ()) after a problem."""
    hint = 'e.g. select: {prefix: "app1-", tags: {env: prod}}'
    if not isinstance(value, YamlMap) or not value:
        fail("select", "must be a mapping with prefix, tags or both", hint)
        return None, ()
    inner = Scope(fail, "select")

    for unknown in value:
        if unknown not in SELECT_FILTER_KEYS:
            inner(echo(unknown), "unknown key", suggest(unknown, SELECT_FILTER_KEYS))
    prefix = value.get("prefix", "")
    if isinstance(prefix, (int, float)) and not isinstance(prefix, bool) \
            and "prefix" in value.raw:
        prefix = value.raw["prefix"]  # "2024-" is text, but "2024" a YAML number
    if not isinstance(prefix, str) or not SELECT_PREFIX_RE.match(prefix):
        inner("prefix", f"'{echo(prefix)}' is not the start of a Key Vault secret name",
              "use up to 126 characters of 0-9, a-z, A-Z and '-'")
    tags = value.get("tags")
    pairs: List[Tuple[str, str]] = []
    if "tags" not in value:
        pass
    elif not isinstance(tags, YamlMap) or not tags:
        inner("tags", "must be a mapping of at least one tag name to its value",
              "e.g. tags: {env: prod}")
    else:
        if len(tags) > MAX_SELECT_TAGS:
            inner("tags", f"more than {MAX_SELECT_TAGS} tags (Key Vault's limit)",
                  "match on fewer tags")
        for name, text in tags.items():
            text = tags.raw.get(name, text) if not isinstance(text, str) else text
            if not isinstance(name, str) or not name or len(name) > MAX_TAG_CHARS:
                inner(f"tags.{echo(name)}", "is not a tag name", "use 1-256 characters")
            elif not isinstance(text, str) or len(text) > MAX_TAG_CHARS:
                inner(f"tags.{echo(name)}", f"'{echo(text)}' is not a tag value",
                      "write the value as text, at most 256 characters")
            else:
                pairs.append((name, text))
    if inner.count:
        return None, ()
    return str(prefix), tuple(sorted(pairs))
