"""The manifest's cache: key (issue 20): absent means no cache; after, max_age and directory
with their defaults and bounds; each problem one line with its fix, did-you-mean for typos."""

from __future__ import annotations

from typing import List, Optional

import pytest

from agent.base.errors import ManifestError
from agent.cache.policy import CachePolicy
from agent.manifest import Accounts, parse_manifest

ACCOUNTS = Accounts(user=lambda name: 1000, group=lambda name: 1000)
HEAD = """\
vault: https://kv.vault.azure.net
directory: /run/secrets
secrets:
  - name: db
    path: db
"""


def _policy(cache: str) -> Optional[CachePolicy]:
    return parse_manifest(HEAD + cache, "m.yaml", accounts=ACCOUNTS,
                          check_filesystem=False).cache


def _problems(cache: str) -> List[str]:
    with pytest.raises(ManifestError) as caught:
        parse_manifest(HEAD + cache, "m.yaml", accounts=ACCOUNTS, check_filesystem=False)
    return list(caught.value.problems)


def test_no_cache_key_means_no_cache() -> None:
    """Absent (or null): no policy, as before issue 20."""
    assert _policy("") is None
    assert _policy("cache:\n") is None


def test_the_defaults() -> None:
    """An empty mapping takes every default: 30s, 7d, /var/lib/kv-agent/cache."""
    assert _policy("cache: {}\n") == CachePolicy(30.0, 7 * 86400.0, "/var/lib/kv-agent/cache")


def test_every_key_given() -> None:
    """after, max_age and directory are parsed (durations, a normalised path)."""
    policy = _policy("cache:\n  after: 2m\n  max_age: 1d12h\n  directory: /var/lib/x//cache/\n")
    assert policy == CachePolicy(120.0, 36 * 3600.0, "/var/lib/x/cache")


@pytest.mark.parametrize(("cache", "words"), [
    ("cache: {after: 0}\n", "cache.after"), ("cache: {after: 11m}\n", "out of range"),
    ("cache: {after: soon}\n", "not a duration"), ("cache: {max_age: 59m}\n", "out of range"),
    ("cache: {max_age: 91d}\n", "out of range"), ("cache: {max_age: forever}\n", "cache.max_age"),
    ("cache: {directory: relative/dir}\n", "absolute path"),
    ("cache: {directory: /var/lib/../run/secrets}\n", "without '..'"),
    ("cache: {directory: /run/secrets/cache}\n", "overlaps directory /run/secrets"),
    ("cache: {directory: /run/secrets/}\n", "overlaps directory"),
    ("cache: {directory: /tmp}\n", "system directory"),
    ("cache: 30s\n", "must be a mapping"),
    ("cache: {afer: 30s}\n", "did you mean 'after'"),
], ids=["after 0", "after 11m", "after text", "max_age 59m", "max_age 91d", "max_age text",
        "relative", "dotdot", "inside secrets", "the secrets'", "system", "scalar", "typo"])
def test_each_problem_is_one_line_with_its_fix(cache: str, words: str) -> None:
    """Out of bounds, unparsable, overlapping the secrets directory, a typo: one line naming
    the key (cache.<key>) and the line."""
    problems = _problems(cache)
    assert len(problems) == 1 and words in problems[0], problems
    assert "cache" in problems[0] and "\n" not in problems[0]


def test_the_bounds_are_inclusive() -> None:
    """1s and 10m for after, 1h and 90d for max_age are accepted."""
    assert _policy("cache: {after: 1s, max_age: 1h}\n") == CachePolicy(1.0, 3600.0)
    assert _policy("cache: {after: 10m, max_age: 90d}\n") == CachePolicy(600.0, 90 * 86400.0)
