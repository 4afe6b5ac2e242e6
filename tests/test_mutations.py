"""The curated mutation check (tests/mutations): every deliberate breakage of a
README promise must make the tests that guard it fail.

Each test is one mutation: a scratch copy of the repository gets that one
breakage and its guarding tests must fail there, while they pass on the
unmutated copy. A surviving mutant is a failing test named after it. The
mutants run in parallel (``KV_AGENT_MUTATION_JOBS``, default 2), all at once
the first time a test here needs a verdict; ``-k NAME`` runs only that one.
Skip the whole check with ``-m "not mutations"``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, List

import pytest
from mutations.runner import (
    BROKEN,
    CAUGHT,
    DEFAULT_JOBS,
    REPO,
    TIMEOUT,
    AnchorError,
    CheckReport,
    format_table,
    mutated_text,
    run_check,
    verdict,
)
from mutations.table import MUTATIONS, Mutation

pytestmark = pytest.mark.mutations

JOBS_ENV = "KV_AGENT_MUTATION_JOBS"


def _params() -> List[object]:
    params: List[object] = []
    for mutation in MUTATIONS:
        marks = [pytest.mark.xfail(reason=f"pending: {mutation.pending}", strict=True)] \
            if mutation.pending else []
        params.append(pytest.param(mutation, id=mutation.name, marks=marks))
    return params


@pytest.fixture(scope="module")
def check(request: pytest.FixtureRequest) -> Iterator[CheckReport]:
    """Run the mutants selected in this session (all of them, normally) once,
    in parallel, and print the table at the end of the module."""
    selected: List[Mutation] = []
    for item in request.session.items:
        if isinstance(item, pytest.Function) and hasattr(item, "callspec"):
            mutation = item.callspec.params.get("mutation")
            if isinstance(mutation, Mutation):
                selected.append(mutation)
    chosen = list(dict.fromkeys(selected)) or list(MUTATIONS)
    report = run_check(chosen, int(os.environ.get(JOBS_ENV, DEFAULT_JOBS)))
    yield report
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():  # the table belongs in the CI log
            reporter.write_line("")
            reporter.write_line(format_table(chosen, report))


def test_table_is_well_formed() -> None:
    """Mutation names are unique kebab-case ids; every guard is a node id in an existing test
    module; every promise is stated."""
    names = [mutation.name for mutation in MUTATIONS]
    assert len(names) == len(set(names)), "two mutations share a name"
    assert len([m for m in MUTATIONS if not m.pending]) >= 15
    for mutation in MUTATIONS:
        assert mutation.name == mutation.name.lower() and " " not in mutation.name
        assert mutation.promise and mutation.find != mutation.replace, mutation.name
        assert mutation.guards, f"mutation '{mutation.name}' names no guarding test"
        for guard in mutation.guards:
            module = guard.split("::", 1)[0]
            assert (REPO / module).is_file(), f"mutation '{mutation.name}': no {module}"


def test_every_anchor_occurs_exactly_once() -> None:
    """Each mutation's anchor is found exactly once in its file and the mutant compiles, so a
    refactor that moves a guarded line is noticed here, naming the mutation to update."""
    problems = []
    for mutation in MUTATIONS:
        try:
            mutated_text(REPO, mutation)
        except AnchorError as exc:
            problems.append(str(exc))
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("mutation", _params())
def test_mutant_is_caught(mutation: Mutation, check: CheckReport) -> None:
    """The mutant fails its guarding tests, which pass on the unmutated copy."""
    status = check.baseline[mutation.name]
    result = check.results[mutation.name]
    where = f"{mutation.path}: {mutation.find.strip()!r} -> {mutation.replace.strip()!r}"
    assert not status.missing, (
        f"mutation '{mutation.name}': no test {', '.join(status.missing)} (renamed?); "
        "name its guarding tests anew in tests/mutations/table.py")
    assert not status.error, status.error
    assert not status.failed, (
        f"the guarding tests of '{mutation.name}' fail on the unmutated copy: "
        f"{', '.join(status.failed)}; fix them first, a failing test proves nothing")
    if status.passed == 0:
        pytest.skip(f"every guarding test of '{mutation.name}' skips here: "
                    f"{'; '.join(status.skipped)}")
    assert result.outcome not in (BROKEN, TIMEOUT), (
        f"mutation '{mutation.name}' {result.outcome}: {result.detail}")
    assert result.outcome == CAUGHT, (
        f"mutant '{mutation.name}' {verdict(mutation, check)}: {mutation.promise}.\n"
        f"Breaking {where}\ndid not fail {', '.join(mutation.guards)} ({result.detail}).\n"
        "Add or sharpen a test that fails when this promise breaks, and name it in "
        "tests/mutations/table.py.")


def test_runner_copies_only_the_repository_sources(tmp_path: Path) -> None:
    """The scratch copy holds agent/, tests/ and pyproject.toml but no .git or .venv."""
    from mutations.runner import copy_repository

    copy_repository(tmp_path / "copy")
    present = {entry.name for entry in (tmp_path / "copy").iterdir()}
    assert {"agent", "tests", "pyproject.toml", "README.md"} <= present
    assert not present & {".git", ".venv"}
    assert not list((tmp_path / "copy").rglob("__pycache__"))


@pytest.mark.parametrize("guard, classname, name, expected", [
    ("tests/test_a.py", "tests.test_a", "test_x[p]", True),
    ("tests/test_a.py", "tests.test_ab", "test_x", False),
    ("tests/test_a.py::test_x", "tests.test_a", "test_x", True),
    ("tests/test_a.py::test_x", "tests.test_a", "test_x[default]", True),
    ("tests/test_a.py::test_x", "tests.test_a", "test_xy", False),
    ("tests/test_a.py::test_x[debug]", "tests.test_a", "test_x[default]", False),
    ("tests/test_a.py::TestC::test_x", "tests.test_a.TestC", "test_x", True),
])
def test_baseline_maps_node_ids_to_junit_cases(guard: str, classname: str, name: str,
                                               expected: bool) -> None:
    """A guard node id selects exactly the junit test cases pytest would run for it."""
    from mutations.runner import _node_matches

    assert _node_matches(guard, classname, name) is expected
