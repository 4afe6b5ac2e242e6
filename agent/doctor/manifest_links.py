"""Link 1 of the chain: the manifest (``check``'s own messages), the output
directory (tmpfs, safe from other users, writable) and the sets' directories
(a file there that is not the agent's is kept, and warned about).

Nothing here touches the network: the writer's own checks judge the
directories, the manifest's own loader judges the manifest, so doctor says
what the agent would.
"""

from __future__ import annotations

import os
from typing import List, Optional, Sequence

from agent.base.errors import KvAgentError, ManifestError, WriteError
from agent.base.untrusted import escape
from agent.doctor.report import FAIL, OK, WARN, Check
from agent.manifest import Manifest, load_manifest
from agent.writer import Writer, foreign_in_set

MAX_MANIFEST_PROBLEMS = 20


def check_manifest(path: str, checks: List[Check]) -> Optional[Manifest]:
    """The manifest, with its check appended; None (and one FAIL per
    problem, worded as ``kv-agent check`` words it) when it is invalid."""
    try:
        manifest = load_manifest(path)
    except ManifestError as exc:
        for problem in exc.problems[:MAX_MANIFEST_PROBLEMS]:
            detail, _, fix = problem.partition("; ")
            checks.append(Check("manifest", "valid", FAIL, detail,
                                fix or f"edit {path} there, then run kv-agent check"))
        return None
    except KvAgentError as exc:
        checks.append(Check("manifest", "valid", FAIL, exc.message,
                            exc.hint or f"fix {path}, then run kv-agent check"))
        return None
    count = len(manifest.secrets)
    selects = f" and {len(manifest.selections)} select" if manifest.selections else ""
    checks.append(Check("manifest", "valid", OK,
                        f"{path}: {count} secret{'s' if count != 1 else ''}{selects}"))
    return manifest


def check_directory(directory: str, landing: Sequence[str] = ()) -> List[Check]:
    """Whether the output directory is on tmpfs, safe from other users with
    each directory below it that files land in (``landing``; the writer's
    own checks), and writable by this process."""
    subject = f"output directory {directory}"
    try:
        writer = Writer(directory)
        writer.check()
        for below in landing:
            writer.check_directory(below)
    except WriteError as exc:
        detail, _, fix = exc.message.partition("; ")
        return [Check(subject, "tmpfs", FAIL, detail, exc.hint or fix or None)]
    checks = [Check(subject, "tmpfs", OK, "on tmpfs or ramfs, safe from other users")]
    existing = directory
    while not os.path.lexists(existing) and existing != os.path.dirname(existing):
        existing = os.path.dirname(existing)
    where = "" if existing == directory else f" (not created yet; judged on {existing})"
    try:
        read_only = bool(os.statvfs(existing).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    if read_only or not os.access(existing, os.W_OK | os.X_OK):
        why = "mounted read-only" if read_only else "not writable by this user"
        return checks + [Check(subject, "writable", FAIL, f"{existing} is {why}{where}",
                               "run kv-agent as root, or choose a writable tmpfs directory "
                               "(for the unit: its ReadWritePaths=)")]
    return checks + [Check(subject, "writable", OK, f"writable{where}")]


def check_sets(manifest: Manifest) -> List[Check]:
    """A warning per file in a set's directory that is not the agent's:
    the agent keeps it (never deletes it) and carries it into each new
    generation, but consumers reading the set see it. Nothing when none."""
    paths = {entry.key: entry.paths for entry in manifest.secrets}
    checks = []
    for group in manifest.sets:
        members = [path for key in group.keys for path in paths.get(key, ())]
        for path in foreign_in_set(group.directory, members):
            checks.append(Check(f"set {group.directory}", "own files", WARN,
                                f"{escape(path)} is not kv-agent's: kept, never deleted",
                                f"move it out of {group.directory} (the set's directory "
                                "holds only its files)"))
    return checks
