"""Apply each mutation to a scratch copy of the repository and run its guards.

For every mutation (see ``table.py``):

1. copy the repository (source, tests, packaging; not .git, .venv, dist or
   caches) into a fresh scratch directory, on tmpfs when there is one;
2. replace the mutation's anchor, which must occur exactly once (else
   :class:`AnchorError`, naming the mutation and the file to update);
3. run ``sys.executable -m pytest -x -q -p no:cacheprovider <guards>`` with
   the scratch copy as working directory and first on ``PYTHONPATH``, so the
   mutated code is what pytest imports and what every ``python -m agent``
   the tests start runs;
4. the mutant is *caught* only when pytest reports failed tests (exit 1).
   Exit 0 is a survivor; a collection or usage error (2-5) is a broken
   mutation or guard, never a catch; a run past the time limit is a timeout
   (make the guarding test fail fast instead).

Once per check, the unmutated copy runs the union of all guards (in parallel
with the mutants): a mutant "caught" by a test that fails anyway would prove
nothing, so each mutation also reports whether its guards pass unmutated.

Run alone: ``python tests/mutations/runner.py [--jobs N] [NAME ...]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

if __package__ in (None, ""):  # run as a script: make ``mutations`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mutations.table import MUTATIONS, Mutation  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
# Top-level entries never copied: VCS data, environments, build output, caches.
SKIP_TOP_LEVEL = frozenset({".git", ".venv", "venv", "build", "dist", ".pytest_cache",
                            ".hypothesis", ".mypy_cache", ".ruff_cache"})
SKIP_ANYWHERE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
MUTANT_TIMEOUT_S = 120.0
BASELINE_TIMEOUT_S = 300.0
DEFAULT_JOBS = 2

CAUGHT, SURVIVED, TIMEOUT, BROKEN = "caught", "SURVIVED", "TIMEOUT", "BROKEN"


class AnchorError(Exception):
    """A mutation's anchor text is missing from its file, or not unique there."""


class RunResult(NamedTuple):
    """One mutant's run."""

    name: str
    outcome: str  # CAUGHT, SURVIVED, TIMEOUT or BROKEN
    seconds: float
    detail: str  # the failing test, or why the run says nothing


class GuardStatus(NamedTuple):
    """How a mutation's guarding tests fare on the unmutated copy."""

    passed: int
    failed: Tuple[str, ...]
    skipped: Tuple[str, ...]  # "node id: reason"
    missing: Tuple[str, ...] = ()  # guard node ids pytest cannot find
    error: str = ""  # the baseline run itself went wrong


class CheckReport(NamedTuple):
    """Everything one check measured."""

    results: Dict[str, RunResult]
    baseline: Dict[str, GuardStatus]
    baseline_seconds: float
    wall_seconds: float


# -- mutating ------------------------------------------------------------------


def mutated_text(root: Path, mutation: Mutation) -> str:
    """The mutated content of ``mutation.path`` under ``root``.

    Raises AnchorError unless the anchor occurs exactly once, and when the
    mutated Python no longer compiles (the mutation itself is broken).
    """
    path = root / mutation.path
    fix = f"update mutation '{mutation.name}' in tests/mutations/table.py"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise AnchorError(f"mutation '{mutation.name}': {mutation.path} does not exist; "
                          f"{fix}") from None
    count = text.count(mutation.find)
    if count != 1:
        where = "is not found" if count == 0 else f"occurs {count} times (must be once)"
        raise AnchorError(
            f"mutation '{mutation.name}': its anchor {where} in {mutation.path}: "
            f"{mutation.find!r}; the line moved or changed: {fix} to a short line that "
            "occurs exactly once")
    mutated = text.replace(mutation.find, mutation.replace)
    if path.suffix == ".py":
        try:
            compile(mutated, str(path), "exec")
        except SyntaxError as exc:
            raise AnchorError(f"mutation '{mutation.name}': the mutated {mutation.path} "
                              f"does not compile ({exc.msg}, line {exc.lineno}); {fix}") from None
    return mutated


def copy_repository(destination: Path, source: Path = REPO) -> None:
    """Copy what the tests need (everything but VCS data, venvs, builds, caches)."""
    destination.mkdir(parents=True, exist_ok=True)
    for entry in sorted(source.iterdir()):
        if entry.name in SKIP_TOP_LEVEL:
            continue
        target = destination / entry.name
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, target, symlinks=True, ignore=SKIP_ANYWHERE)
        else:
            shutil.copy2(entry, target, follow_symlinks=False)


def scratch_parent() -> Optional[str]:
    """Where scratch copies go: /dev/shm (tmpfs) when usable, else the default."""
    return "/dev/shm" if os.access("/dev/shm", os.W_OK | os.X_OK) else None


# -- running pytest ------------------------------------------------------------


def clean_environ(scratch: Path) -> Dict[str, str]:
    """This environment for a pytest run in ``scratch``: the copy first on
    PYTHONPATH, and no state of an outer pytest run (its network-guard path and
    log, its options) leaking into the inner one."""
    env = dict(os.environ)
    for name in ("KV_AGENT_NETGUARD_LOG", "PYTEST_ADDOPTS", "PYTEST_CURRENT_TEST"):
        env.pop(name, None)
    kept = [part for part in env.get("PYTHONPATH", "").split(os.pathsep)
            if part and not part.rstrip("/").endswith(os.path.join("tests", "netguard"))]
    env["PYTHONPATH"] = os.pathsep.join([str(scratch), *kept])
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def run_pytest(scratch: Path, args: Sequence[str],
               timeout_s: float) -> Tuple[Optional[int], str, float]:
    """(exit code or None on timeout, combined output, seconds) of one run."""
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args]
    started = time.monotonic()
    try:
        done = subprocess.run(command, cwd=scratch, env=clean_environ(scratch),
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=timeout_s,
                              check=False)
    except subprocess.TimeoutExpired as exc:
        output = exc.output.decode("utf-8", "replace") if isinstance(exc.output, bytes) \
            else (exc.output or "")
        return None, output, time.monotonic() - started
    return done.returncode, done.stdout, time.monotonic() - started


def first_failure(output: str) -> str:
    """The first FAILED (else ERROR) line of pytest's short summary, or the
    output's tail."""
    for prefix in ("FAILED ", "ERROR "):
        for line in output.splitlines():
            if line.startswith(prefix):
                return line
    tail = [line for line in output.splitlines() if line.strip()][-3:]
    return " | ".join(tail)


def run_mutant(mutation: Mutation, timeout_s: float = MUTANT_TIMEOUT_S,
               source: Path = REPO) -> RunResult:
    """Copy ``source``, mutate, run the guards with -x; classify the outcome."""
    started = time.monotonic()
    scratch = Path(tempfile.mkdtemp(prefix="kv-agent-mutant-", dir=scratch_parent()))
    try:
        copy_repository(scratch, source)
        try:
            text = mutated_text(scratch, mutation)
        except AnchorError as exc:
            return RunResult(mutation.name, BROKEN, time.monotonic() - started, str(exc))
        (scratch / mutation.path).write_text(text, encoding="utf-8")
        code, output, _ = run_pytest(scratch, ["-x", *mutation.guards], timeout_s)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    seconds = time.monotonic() - started
    if code is None:
        return RunResult(mutation.name, TIMEOUT, seconds,
                         f"no verdict within {timeout_s:g} s; make the guard fail fast")
    if code == 1:
        return RunResult(mutation.name, CAUGHT, seconds, first_failure(output))
    if code == 0:
        return RunResult(mutation.name, SURVIVED, seconds, first_failure(output))
    return RunResult(mutation.name, BROKEN, seconds,
                     f"pytest exit {code} (not a test failure): {first_failure(output)}")


# -- the unmutated baseline ----------------------------------------------------


def _node_matches(guard: str, classname: str, name: str) -> bool:
    """Whether a junit testcase (classname, name) is selected by node id ``guard``."""
    file_part, _, rest = guard.partition("::")
    module = file_part[:-3] if file_part.endswith(".py") else file_part
    module = module.replace("/", ".")
    if not rest:
        return classname == module or classname.startswith(module + ".")
    *classes, function = rest.split("::")
    if classname != ".".join([module, *classes]):
        return False
    return name == function or (name.startswith(function + "[") and "[" not in function)


def _junit_cases(path: Path) -> List[Tuple[str, str, str, str]]:
    """(classname, name, status, message) for every testcase of a junit file."""
    cases = []
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        status, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                status, message = child.tag, child.get("message", "")
                if child.tag != "skipped":
                    break
        cases.append((case.get("classname", ""), case.get("name", ""), status, message))
    return cases


def _not_found(output: str, scratch: Path) -> List[str]:
    """Node ids pytest reported as not found (exit 4), relative to ``scratch``."""
    missing = []
    for line in output.splitlines():
        for prefix in ("ERROR: not found: ", "ERROR: file or directory not found: "):
            if line.startswith(prefix):
                node = line[len(prefix):].strip()
                missing.append(node[len(f"{scratch}/"):] if node.startswith(f"{scratch}/")
                               else node)
    return missing


def run_baseline(mutations: Sequence[Mutation], timeout_s: float = BASELINE_TIMEOUT_S,
                 source: Path = REPO) -> Tuple[Dict[str, GuardStatus], float]:
    """Run the union of all guards on an unmutated copy of ``source``; a
    status per mutation. A guard pytest cannot find (a renamed test) is
    reported for its own mutations and left out, so one stale node id does
    not void every other verdict."""
    started = time.monotonic()
    guards = list(dict.fromkeys(guard for m in mutations for guard in m.guards))
    missing: List[str] = []
    code: Optional[int] = 0
    output = ""
    cases: List[Tuple[str, str, str, str]] = []
    scratch = Path(tempfile.mkdtemp(prefix="kv-agent-baseline-", dir=scratch_parent()))
    try:
        copy_repository(scratch, source)
        junit = scratch / ".baseline-junit.xml"
        while guards:
            code, output, _ = run_pytest(scratch, [f"--junitxml={junit}", *guards], timeout_s)
            lost = [guard for guard in _not_found(output, scratch) if guard in guards]
            if code != 4 or not lost:
                break
            missing += lost
            guards = [guard for guard in guards if guard not in lost]
            code = 0 if not guards else code  # nothing left to run is no error
        cases = _junit_cases(junit) if junit.exists() and guards else []
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    error = ""
    if code is None:
        error = f"the unmutated run did not finish within {timeout_s:g} s"
    elif code not in (0, 1):
        error = f"the unmutated run ended with pytest exit {code}: {first_failure(output)}"
    statuses = {}
    for mutation in mutations:
        passed, failed, skipped = 0, [], []
        for classname, name, status, message in cases:
            if not any(_node_matches(guard, classname, name) for guard in mutation.guards):
                continue
            if status == "passed":
                passed += 1
            elif status == "skipped":
                skipped.append(f"{name}: {message}")
            else:
                failed.append(f"{classname}::{name}")
        gone = tuple(guard for guard in mutation.guards if guard in missing)
        statuses[mutation.name] = GuardStatus(passed, tuple(failed), tuple(skipped), gone,
                                              error)
    return statuses, time.monotonic() - started


# -- the whole check -----------------------------------------------------------


def _expected_cost(mutation: Mutation) -> int:
    """Rough order for scheduling: process-level tests first (longest first)."""
    guards = " ".join(mutation.guards)
    return 2 if "test_daemon" in guards else 1 if "test_cli_integration" in guards else 0


def run_check(mutations: Sequence[Mutation] = MUTATIONS, jobs: int = DEFAULT_JOBS,
              source: Path = REPO) -> CheckReport:
    """Run every mutant and the baseline on copies of ``source``, ``jobs`` at a time."""
    started = time.monotonic()
    ordered = sorted(mutations, key=_expected_cost, reverse=True)
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        baseline = pool.submit(run_baseline, mutations, BASELINE_TIMEOUT_S, source)
        futures = [pool.submit(run_mutant, mutation, MUTANT_TIMEOUT_S, source)
                   for mutation in ordered]
        results = {future.result().name: future.result() for future in futures}
        statuses, baseline_seconds = baseline.result()
    return CheckReport(results, statuses, baseline_seconds, time.monotonic() - started)


def verdict(mutation: Mutation, report: CheckReport) -> str:
    """One word for the table: what this mutation's check concluded."""
    status = report.baseline[mutation.name]
    result = report.results[mutation.name]
    if status.missing:
        return "GUARD-NOT-FOUND"
    if status.error or status.failed:
        return "GUARD-FAILS-UNMUTATED"
    if status.passed == 0:
        return "guard-skipped"
    if mutation.pending and result.outcome == SURVIVED:
        return "survived (pending)"
    if mutation.pending and result.outcome == CAUGHT:
        return "caught (pending: drop the flag)"
    return result.outcome


def format_table(mutations: Iterable[Mutation], report: CheckReport) -> str:
    """A plain-text table: mutation, guarding tests, verdict, seconds."""
    rows = [("mutation", "guarding tests", "result", "seconds")]
    for mutation in mutations:
        result = report.results[mutation.name]
        guards = ", ".join(guard.split("/")[-1] for guard in mutation.guards)
        rows.append((mutation.name, guards, verdict(mutation, report), f"{result.seconds:.1f}"))
    widths = [max(len(row[column]) for row in rows) for column in range(3)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row[:3], widths))
             + "  " + row[3].rjust(7) for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.append(f"unmutated guards: {report.baseline_seconds:.1f} s; "
                 f"whole check: {report.wall_seconds:.1f} s wall")
    return "\n".join(lines)


def is_success(mutation: Mutation, report: CheckReport) -> bool:
    """Caught (or, for a pending mutation, expected to survive) with sound guards."""
    word = verdict(mutation, report)
    return word in (CAUGHT, "survived (pending)", "guard-skipped")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("names", nargs="*", help="mutations to run (default: all)")
    parser.add_argument("--jobs", "-j", type=int, default=DEFAULT_JOBS,
                        help=f"mutants run at once (default {DEFAULT_JOBS})")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--verbose", "-v", action="store_true",
                        help="also print the failing test (or the reason) of every mutant")
    parser.add_argument("--source", type=Path, default=REPO,
                        help="the tree to mutate (default: this checkout)")
    args = parser.parse_args(argv)
    by_name = {mutation.name: mutation for mutation in MUTATIONS}
    unknown = [name for name in args.names if name not in by_name]
    if unknown:
        parser.error(f"unknown mutation(s): {', '.join(unknown)} (see --list)")
    if args.list:
        for mutation in MUTATIONS:
            print(f"{mutation.name}: {mutation.promise} [{mutation.path}]")
        return 0
    chosen = [by_name[name] for name in args.names] or list(MUTATIONS)
    report = run_check(chosen, args.jobs, args.source.resolve())
    print(format_table(chosen, report))
    if args.verbose:
        print()
        for mutation in chosen:
            print(f"{mutation.name}: {report.results[mutation.name].detail}")
    failures = [m for m in chosen if not is_success(m, report)]
    for mutation in failures:
        result = report.results[mutation.name]
        status = report.baseline[mutation.name]
        print(f"\n{mutation.name} ({verdict(mutation, report)}): {mutation.promise}\n"
              f"  {mutation.path}: {mutation.find!r} -> {mutation.replace!r}\n"
              f"  {result.detail}\n"
              + (f"  unmutated: {status.error or ', '.join(status.failed + status.missing)}\n"
                 if status.error or status.failed or status.missing else ""))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
