"""Fuzzed manifests (issue 9, item 6): whatever the text, parse_manifest
returns a Manifest or raises a ManifestError whose problems are bounded,
printable single lines, within a time and memory bound per example.

Two generators: structured YAML (random trees of the real schema's keys plus
junk, with hostile scalars) and raw text mutations of a valid manifest. Each
example runs in a forked child (see ``parse_isolated``), so a hang or a
memory blow-up fails the example instead of the suite. Bounded for CI: a few
hundred examples, about 10-20 s on a loaded 2-core machine.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_manifest import GOOD, assert_bounded_problems, parse_isolated

from agent.manifest import IDENTITY_KEYS, SECRET_KEYS, TOP_KEYS, Accounts
from agent.manifest.values import MAX_ACCOUNT_NAME_CHARS

EXAMPLE_TIMEOUT_S = 5.0  # per example; a parse takes milliseconds

FUZZ = settings(max_examples=250, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _lookup(name: str) -> Optional[int]:
    """An NSS stand-in that fails the example if a name arrives unbounded (item 11)."""
    if len(name) > MAX_ACCOUNT_NAME_CHARS or "\0" in name:
        raise AssertionError(f"lookup reached with an unbounded name ({len(name)} chars)")
    return {"root": 0, "postgres": 110, "nginx": 111, "ssl-cert": 121}.get(name)


ACCOUNTS = Accounts(user=_lookup, group=_lookup)

HOSTILE_SCALARS = [
    "//dev/shm/x", "/dev", "/run", "/", "//", "///", "/dev/shm/./x/..", "0440", "4755",
    "15m", "1h30m", "99999999999999999999h", "9" * 400, "1e400", "-1", "nan", ".inf",
    "https://kv.vault.azure.net", "https://evil\\.vault.azure.net", "x" * 300, "p" * 256,
    "a/" * 100, "\n", "\x1b[31m", "\0", "~", "null", "yes", "2001-02-30", "0x" + "f" * 100,
    ".kv-agent-x", "../etc/shadow", "*", "&", "!!binary", "<<",
]

scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(), st.integers(min_value=-(10 ** 400), max_value=10 ** 400),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40), st.text(alphabet="09azAZ-_./:%hms ", max_size=20),
    st.sampled_from(HOSTILE_SCALARS),
)

keys = st.one_of(st.sampled_from(TOP_KEYS + SECRET_KEYS + IDENTITY_KEYS), st.text(max_size=12),
                 st.integers(), st.none())


def _trees(leaves: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.recursive(
        leaves,
        lambda children: st.one_of(st.lists(children, max_size=5),
                                   st.dictionaries(keys, children, max_size=6)),
        max_leaves=40)


@st.composite
def entries(draw: st.DrawFn) -> Dict[Any, Any]:
    """A secrets entry: mostly real keys with plausible or hostile values."""
    chosen = draw(st.lists(st.sampled_from(SECRET_KEYS), unique=True, max_size=len(SECRET_KEYS)))
    entry: Dict[Any, Any] = {key: draw(_trees(scalars)) for key in chosen}
    if draw(st.booleans()):
        entry["name"] = draw(st.sampled_from(["db-password", "tls-key", "s"]))
    return entry


@st.composite
def manifests(draw: st.DrawFn) -> Dict[Any, Any]:
    """A top-level mapping built from the schema plus junk."""
    document: Dict[Any, Any] = {}
    for key in draw(st.lists(st.sampled_from(TOP_KEYS), unique=True)):
        if key == "secrets":
            document[key] = draw(st.one_of(st.lists(entries(), max_size=4), _trees(scalars)))
        elif key == "identity":
            document[key] = draw(st.one_of(
                st.dictionaries(st.sampled_from(IDENTITY_KEYS), scalars, max_size=3),
                _trees(scalars)))
        else:
            document[key] = draw(_trees(scalars))
    document.update(draw(st.dictionaries(keys, _trees(scalars), max_size=2)))
    return document


def _check(text: str) -> None:
    assert_bounded_problems(parse_isolated(text, timeout_s=EXAMPLE_TIMEOUT_S, accounts=ACCOUNTS))


@FUZZ
@given(manifests())
def test_structured_manifests_parse_or_fail_in_bounded_lines(document: Dict[Any, Any]) -> None:
    """Any tree of schema keys and hostile values yields a Manifest or bounded one-line problems."""
    try:
        text = yaml.safe_dump(document, allow_unicode=True)
    except yaml.YAMLError:
        return  # not representable as YAML: nothing to parse
    _check(text)


MUTATION_ALPHABET = list(":-[]{}&*!|>'\"#%@`,?~ \t\n\\0123456789x/.") + [
    "\0", "\x1b", "\ufeff", "\ud800", "<<: *a", "&a ", "*a", "!!python/object ", "- ", "\n  ",
    "9" * 500, "//", "[" * 50, "\n" + "  " * 30,
]


@st.composite
def mutated_texts(draw: st.DrawFn) -> str:
    """GOOD with a few random insertions, deletions and replacements."""
    text = GOOD
    for _ in range(draw(st.integers(min_value=1, max_value=6))):
        position = draw(st.integers(min_value=0, max_value=len(text)))
        action = draw(st.sampled_from(["insert", "delete", "replace", "repeat"]))
        piece = draw(st.one_of(st.sampled_from(MUTATION_ALPHABET), st.text(max_size=5)))
        if action == "insert":
            text = text[:position] + piece + text[position:]
        elif action == "delete":
            text = text[:position] + text[position + draw(st.integers(1, 20)):]
        elif action == "replace":
            text = text[:position] + piece + text[position + len(piece):]
        else:
            line_start = text.rfind("\n", 0, position) + 1
            line_end = text.find("\n", position)
            line = text[line_start:line_end if line_end != -1 else len(text)]
            text = text[:line_start] + (line + "\n") * draw(st.integers(2, 50)) + text[line_start:]
    return text


@FUZZ
@given(mutated_texts())
def test_mutated_manifests_parse_or_fail_in_bounded_lines(text: str) -> None:
    """A valid manifest with random edits yields a Manifest or bounded one-line problems."""
    _check(text)


def test_fuzz_generators_cover_valid_and_invalid() -> None:
    """The unmutated manifest is valid, so the fuzz explores both outcomes."""
    outcomes: List[Dict[str, object]] = [parse_isolated(GOOD, accounts=ACCOUNTS)]
    assert "ok" in outcomes[0], outcomes


def test_an_unpaired_surrogate_anywhere_is_a_problem_on_its_line() -> None:
    """A text holding an unpaired surrogate (libyaml's parser raises on it before any event)
    is one bounded problem naming its line, never a crash."""
    text = GOOD.replace("secrets:", "secrets: \ud800", 1)
    problems = assert_bounded_problems(parse_isolated(text, accounts=ACCOUNTS))
    line = GOOD[:GOOD.index("secrets:")].count("\n") + 1
    assert any(f":{line}:" in problem and "surrogate" in problem for problem in problems), problems
