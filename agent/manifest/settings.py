"""The manifest's top-level settings: vault, directory, metrics, the numbers, identity.

Each is parsed with its problem reported at its line; a setting in error
falls back (to its default, or to none) so that the entries are still
checked and every problem of the file is reported at once.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Optional, Tuple

from agent.base.landing import system_directory_problem
from agent.cache.policy import (
    DEFAULT_CACHE_AFTER_S,
    DEFAULT_CACHE_DIRECTORY,
    DEFAULT_CACHE_MAX_AGE_S,
    MAX_CACHE_AFTER_S,
    MAX_CACHE_MAX_AGE_S,
    MIN_CACHE_AFTER_S,
    MIN_CACHE_MAX_AGE_S,
    CachePolicy,
)
from agent.identity.selector import SOURCES, Identity
from agent.manifest.document import YamlMap
from agent.manifest.model import DEFAULT_DIRECTORY, DEFAULT_METRICS_PATH
from agent.manifest.paths import check_path_length, normalise_path
from agent.manifest.problems import Problems, unknown_keys
from agent.manifest.quoting import echo
from agent.manifest.values import parse_duration, parse_expiry_window, parse_vault_value

METRICS_SUFFIX = ".prom"  # the textfile collector reads only these
IDENTITY_KEYS = ("client_id", "object_id", "resource_id")
IDENTITY_SOURCE_KEY = "source"
CACHE_KEYS = ("after", "max_age", "directory")
GUID_RE = re.compile(r"^[0-9A-Fa-f]{8}-(?:[0-9A-Fa-f]{4}-){3}[0-9A-Fa-f]{12}$")
RESOURCE_ID_RE = re.compile(
    r"^/subscriptions/[^/]+/resourcegroups/[^/]+/providers/"
    r"microsoft\.managedidentity/userassignedidentities/[^/]+$",
    re.IGNORECASE,
)


def top_vault(problems: Problems, data: YamlMap) -> Optional[str]:
    """The top-level ``vault:``, normalised; missing is a problem unless every
    entry names its own."""
    if "vault" not in data:
        entries = data.get("secrets")
        if not isinstance(entries, list) or not entries or not all(
            isinstance(entry, dict) and "vault" in entry for entry in entries
        ):
            problems.add("vault", "missing", data.line,
                         "add vault: https://<name>.vault.azure.net")
        return None
    try:
        return parse_vault_value(data["vault"])
    except ValueError as exc:
        problems.add("vault", str(exc), data.key_lines.get("vault"))
        return None


def top_directory(problems: Problems, data: YamlMap) -> str:
    """``directory:``, normalised: absolute, without '..', not a system directory."""
    value = data.get("directory", DEFAULT_DIRECTORY)
    line = data.key_lines.get("directory")
    if not isinstance(value, str) or not value.startswith("/"):
        problems.add("directory", f"'{echo(value)}' must be an absolute path", line,
                     f"e.g. directory: {DEFAULT_DIRECTORY}")
        return DEFAULT_DIRECTORY
    if ".." in value.split("/") or "\0" in value:
        problems.add("directory", f"'{echo(value)}' must not contain '..'", line)
        return DEFAULT_DIRECTORY
    normal = normalise_path(value)
    if normal == "/":
        problems.add("directory", "'/' is not a secrets directory", line,
                     f"e.g. directory: {DEFAULT_DIRECTORY}")
        return DEFAULT_DIRECTORY
    try:
        check_path_length(normal)
    except ValueError as exc:
        problems.add("directory", str(exc), line)
        return DEFAULT_DIRECTORY
    shared = system_directory_problem(normal)  # the writer refuses it too, but with no line
    if shared:
        problems.add("directory", shared, line)
    return normal


def top_metrics(problems: Problems, data: YamlMap, directory: str) -> Optional[str]:
    """``metrics``: absent or false (off), true (DEFAULT_METRICS_PATH) or an
    absolute path of a ``.prom`` file, outside the secrets directory (which
    holds only the manifest's files)."""
    value = data.get("metrics", False)
    if value is False or value is None:
        return None
    if value is True:
        return DEFAULT_METRICS_PATH
    line = data.key_lines.get("metrics")
    hint = f"write metrics: true (for {DEFAULT_METRICS_PATH}) or an absolute path"
    if not isinstance(value, str) or not value.startswith("/"):
        problems.add("metrics", f"'{echo(value)}' is neither true, false nor an absolute path",
                     line, hint)
        return None
    if ".." in value.split("/") or "\0" in value or value.endswith("/"):
        problems.add("metrics", f"'{echo(value)}' must be a file's path without '..'", line,
                     hint)
        return None
    path = normalise_path(value)
    try:
        check_path_length(path)
    except ValueError as exc:
        problems.add("metrics", str(exc), line)
        return None
    if not path.endswith(METRICS_SUFFIX) or path.endswith("/" + METRICS_SUFFIX):
        problems.add("metrics", f"'{echo(value)}' must end in {METRICS_SUFFIX}: "
                     "node_exporter's textfile collector reads only those", line,
                     f"e.g. metrics: {DEFAULT_METRICS_PATH}")
        return None
    if path.startswith(directory.rstrip("/") + "/"):
        problems.add("metrics", f"'{echo(value)}' is inside directory {directory}, which "
                     "holds only the secrets' files", line, f"e.g. metrics: {DEFAULT_METRICS_PATH}")
        return None
    return path


def top_number(problems: Problems, data: YamlMap, key: str, parse: Callable[[Any], float],
               default: float, hint: str) -> float:
    """An optional top-level number: parsed, or the default plus a problem."""
    if key not in data:
        return default
    try:
        return parse(data[key])
    except ValueError as exc:
        problems.add(key, f"'{echo(data[key])}': {exc}", data.key_lines.get(key), hint)
        return default


def parse_identity(problems: Problems, value: Any, line: Optional[int]) -> Identity:
    """``identity:``: at most one selector (client_id, object_id or resource_id),
    and the source; absent, the system-assigned identity."""
    if value is None:
        return Identity()
    if not isinstance(value, YamlMap):
        problems.add("identity", "must be a mapping with one of client_id, object_id, "
                     "resource_id", line, "or remove it for the system-assigned identity")
        return Identity()
    unknown_keys(problems, value, IDENTITY_KEYS + (IDENTITY_SOURCE_KEY,), "identity.")
    source = _identity_source(problems, value)
    given = [key for key in IDENTITY_KEYS if key in value]
    if len(given) > 1:
        problems.add("identity", f"{' and '.join(given)} given; IMDS takes one", value.line,
                     "keep one selector")
        return Identity(source=source)
    if not given:
        return Identity(source=source)
    key = given[0]
    text = value[key].strip() if isinstance(value[key], str) else echo(value[key])
    pattern = RESOURCE_ID_RE if key == "resource_id" else GUID_RE
    if not pattern.match(text):
        example = ("/subscriptions/<sub>/resourceGroups/<rg>/providers/"
                   "Microsoft.ManagedIdentity/userAssignedIdentities/<name>"
                   if key == "resource_id" else "a GUID like 00000000-0000-0000-0000-000000000000")
        problems.add(f"identity.{key}", f"'{echo(text)}' is not valid", value.key_lines.get(key),
                     f"expected {example}")
        return Identity(source=source)
    return Identity(key, text, source)


def _identity_source(problems: Problems, value: YamlMap) -> str:
    """``identity.source``: auto (the default), imds, arc or app-service."""
    raw = value.get(IDENTITY_SOURCE_KEY, "auto")
    if raw in SOURCES:
        return str(raw)
    problems.add(f"identity.{IDENTITY_SOURCE_KEY}", f"'{echo(raw)}' is not a source",
                 value.key_lines.get(IDENTITY_SOURCE_KEY), f"use one of {', '.join(SOURCES)}")
    return "auto"


def top_cache(problems: Problems, data: YamlMap, directory: str) -> Optional[CachePolicy]:
    """``cache:``: absent (or null), no cache; else a mapping of ``after``
    (1s .. 10m), ``max_age`` (1h .. 90d) and ``directory`` (absolute, apart
    from the secrets directory), each defaulted."""
    value = data.get("cache")
    if value is None:
        return None
    if not isinstance(value, YamlMap):
        problems.add("cache", "must be a mapping with after, max_age and directory",
                     data.key_lines.get("cache"), "e.g. cache: {after: 30s, max_age: 7d}")
        return None
    unknown_keys(problems, value, CACHE_KEYS, "cache.")
    after = _cache_duration(problems, value, "after", parse_duration, DEFAULT_CACHE_AFTER_S,
                            (MIN_CACHE_AFTER_S, MAX_CACHE_AFTER_S), "from 1s to 10m, e.g. 30s")
    max_age = _cache_duration(problems, value, "max_age", parse_expiry_window,
                              DEFAULT_CACHE_MAX_AGE_S, (MIN_CACHE_MAX_AGE_S, MAX_CACHE_MAX_AGE_S),
                              "from 1h to 90d, e.g. 7d")
    return CachePolicy(after, max_age, _cache_directory(problems, value, directory))


def _cache_duration(problems: Problems, value: YamlMap, key: str, parse: Callable[[Any], float],
                    default: float, bounds: Tuple[float, float], hint: str) -> float:
    if key not in value:
        return default
    line = value.key_lines.get(key)
    try:
        seconds = parse(value[key])
    except ValueError as exc:
        problems.add(f"cache.{key}", f"'{echo(value[key])}': {exc}", line, f"write {hint}")
        return default
    if not bounds[0] <= seconds <= bounds[1]:
        problems.add(f"cache.{key}", f"'{echo(value[key])}' is out of range", line,
                     f"write {hint}")
        return default
    return seconds


def _cache_directory(problems: Problems, value: YamlMap, secrets: str) -> str:
    """``cache.directory``: absolute, without '..', not a system directory,
    neither inside the secrets directory nor holding it."""
    raw = value.get("directory", DEFAULT_CACHE_DIRECTORY)
    line = value.key_lines.get("directory")
    hint = f"e.g. directory: {DEFAULT_CACHE_DIRECTORY}"
    if not isinstance(raw, str) or not raw.startswith("/") or ".." in raw.split("/") \
            or "\0" in raw:
        problems.add("cache.directory", f"'{echo(raw)}' must be an absolute path without '..'",
                     line, hint)
        return DEFAULT_CACHE_DIRECTORY
    path = normalise_path(raw)
    try:
        check_path_length(path)
    except ValueError as exc:
        problems.add("cache.directory", str(exc), line)
        return DEFAULT_CACHE_DIRECTORY
    shared = system_directory_problem(path)
    inside = (path + "/").startswith(secrets.rstrip("/") + "/") or \
        (secrets + "/").startswith(path.rstrip("/") + "/")
    if shared:
        problems.add("cache.directory", shared, line)
        return DEFAULT_CACHE_DIRECTORY
    if inside:
        problems.add("cache.directory", f"'{echo(raw)}' overlaps directory {secrets}, which "
                     "holds only the secrets' files", line, hint)
        return DEFAULT_CACHE_DIRECTORY
    return path
