"""``credential:``: an output served as a systemd credential, each problem reported.

On a plain or template entry, ``credential: {id: ..., units: [...]}`` (``id``
defaults to the entry's name); on a certificate's output, the same mapping
beside or instead of its ``path:``. ``units`` is required and never empty:
there is no "any unit". The rules for IDs, unit names and globs are systemd's
(:mod:`agent.pipeline.credentials`); what entries may share is checked with
the other conflicts (:func:`agent.manifest.conflicts.check_credential_conflicts`).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from agent.manifest.document import YamlMap
from agent.manifest.problems import Scope, suggest
from agent.manifest.quoting import echo
from agent.pipeline.credentials import (
    MAX_UNIT_AND_ID,
    SUN_PATH_MAX,
    Grant,
    credential_id_problem,
    is_glob,
    unit_pattern_problem,
)

CREDENTIAL_KEYS = ("id", "units")
CREDENTIAL_EXAMPLE = "e.g. credential: {id: db-password, units: [app.service]}"
# Keys that describe a file: refused beside a credential that writes none.
FILE_KEYS = ("owner", "group", "mode")


def parse_credential(fail: Callable[..., None], value: Any,
                     default_id: Optional[str]) -> Optional[Grant]:
    """The :class:`Grant` of a ``credential:`` mapping ``value``, or None after
    reporting each problem through ``fail`` under ``credential``.
    ``default_id`` (the entry's name; None for a certificate's output, which
    must say its ``id``) stands in for a missing ``id``."""
    inner = Scope(fail, "credential")
    if not isinstance(value, YamlMap):
        inner("", "must be a mapping with id and units", CREDENTIAL_EXAMPLE)
        return None
    for key in value:
        if key not in CREDENTIAL_KEYS:
            inner(echo(key), "unknown key", suggest(key, CREDENTIAL_KEYS))
    for key, _ in value.duplicates:
        inner(echo(key), "key given twice", "keep one")
    credential_id = _credential_id(inner, value, default_id)
    units = value.get("units")
    if units is None:
        inner("units", "missing", "name the units that may load it, e.g. units: "
              "[app.service]; there is no 'any unit'")
    elif not isinstance(units, list) or not units:
        inner("units", "must be a list of at least one unit name or glob",
              "e.g. units: [app.service, \"worker@*.service\"]")
    else:
        for index, unit in enumerate(units):
            problem = unit_pattern_problem(unit)
            if problem is not None:
                inner(f"units[{index}]", f"'{echo(unit)}' {problem}")
            elif credential_id is not None and not is_glob(unit) and \
                    len(unit) + len(credential_id) > MAX_UNIT_AND_ID:
                inner(f"units[{index}]", f"'{echo(unit)}' and the ID '{echo(credential_id)}' "
                      f"are {len(unit) + len(credential_id)} characters together: systemd names "
                      f"both in a socket address of {SUN_PATH_MAX} bytes, which leaves "
                      f"{MAX_UNIT_AND_ID}", "use a shorter ID")
    if inner.count or credential_id is None or not isinstance(units, list):
        return None
    return Grant(credential_id, tuple(units))


def _credential_id(inner: Scope, value: YamlMap, default_id: Optional[str]) -> Optional[str]:
    if "id" not in value:
        if default_id is None:
            inner("id", "missing", "name the credential, e.g. id: tls.key")
        return default_id
    given = value["id"]
    if not isinstance(given, str) and "id" in value.raw:
        given = value.raw["id"]  # "2024" is a YAML number: take it as written
    problem = credential_id_problem(given)
    if problem is not None:
        inner("id", f"'{echo(given)}' {problem}")
        return None
    assert isinstance(given, str)  # checked by credential_id_problem
    return given


def check_fileless(fail: Callable[..., None], value: YamlMap, where: str) -> None:
    """Refuse ``owner``, ``group`` and ``mode`` beside a credential with no
    ``path``: they describe a file, and this writes none (silently ignored,
    they would read as a promise the agent does not keep)."""
    for key in FILE_KEYS:
        if key in value:
            fail(key, f"{where} writes no file (a credential without path)",
                 "remove it, or add path: to write a file as well")
