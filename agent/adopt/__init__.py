"""Adoption: kv-agent manifests from what a machine already runs.

``kv-agent import vm-extension FILE``: the Key Vault VM extension for Linux's
settings (:mod:`agent.adopt.vm_extension`) rendered as a commented manifest
(:mod:`agent.adopt.manifest_text`), checked by the manifest's own parser
before it is shown. Parsing and rendering are pure; :func:`import_vm_extension`
alone reads the file. Nothing here prints: the CLI does.
"""

from __future__ import annotations

import os
from typing import Optional

from agent.adopt.manifest_text import ManifestText, render
from agent.adopt.vm_extension import MAX_SETTINGS_BYTES, SettingsError, parse_settings
from agent.base.errors import ManifestError
from agent.manifest import DEFAULT_DIRECTORY, Accounts, parse_manifest
from agent.manifest.document import YamlMap
from agent.manifest.problems import Problems
from agent.manifest.settings import top_directory

__all__ = ["ManifestText", "SettingsError", "directory_problem", "import_vm_extension",
           "render_settings"]


def directory_problem(directory: str) -> Optional[str]:
    """What the manifest's parser says of ``directory:`` given ``directory`` (``--directory``),
    as one line ``--directory: ...``, or None when it takes it."""
    given = YamlMap(directory=directory)
    given.key_lines, given.raw, given.duplicates = {}, {}, []
    problems = Problems("--directory")
    top_directory(problems, given)
    return problems.lines[0].replace("--directory: directory: ", "--directory: ", 1) \
        if problems.lines else None


def import_vm_extension(path: str, directory: str = DEFAULT_DIRECTORY) -> ManifestText:
    """The manifest for the extension settings in the file ``path``, writing under
    ``directory``.

    Raises SettingsError (exit 78) with one line per problem when the file
    cannot be read or its settings cannot be carried over; ValueError for a
    ``directory`` the manifest refuses, before the file is read."""
    problem = directory_problem(directory)
    if problem:
        raise ValueError(problem)
    try:
        with open(path, "rb") as stream:
            data = stream.read(MAX_SETTINGS_BYTES + 1)
    except OSError as exc:
        line = f"{path}: cannot read it ({os.strerror(exc.errno) if exc.errno else exc}); " \
               "pass the file holding the extension's settings JSON"
        raise SettingsError(line, problems=[line]) from None
    return render_settings(data, path, directory)


def render_settings(data: bytes, source: str, directory: str = DEFAULT_DIRECTORY) -> ManifestText:
    """The manifest for the settings ``data``; pure. The text is parsed by the
    manifest's own parser (with every user and group taken as existing, since
    the import may run elsewhere): a manifest it would refuse is a bug here, and
    never printed. Raises ValueError for a ``directory`` the manifest refuses
    (check it first with :func:`directory_problem`)."""
    problem = directory_problem(directory)
    if problem:
        raise ValueError(problem)
    result = render(parse_settings(data, source), source, directory)
    try:
        parse_manifest(result.manifest, "<imported manifest>",
                       accounts=Accounts(user=lambda _: 0, group=lambda _: 0),
                       check_filesystem=False)
    except ManifestError as exc:
        lines = [f"kv-agent produced a manifest it refuses (a bug): {problem}"
                 for problem in exc.problems]
        raise SettingsError(lines[0], problems=lines) from None
    return result
