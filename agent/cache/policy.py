"""The manifest's ``cache:`` as a value, with its defaults and bounds.

The manifest parses into :class:`CachePolicy` (as it parses into the
identity's selector); the daemon serves by it and the store keeps its
copies in its directory. Absent ``cache:``, there is no policy and no cache.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_CACHE_DIRECTORY = "/var/lib/kv-agent/cache"
DEFAULT_CACHE_AFTER_S = 30.0
DEFAULT_CACHE_MAX_AGE_S = 7 * 86400.0
# after: long enough for a first try of every source, short enough that a boot waits for
# no more than a few minutes before the cache stands in.
MIN_CACHE_AFTER_S = 1.0
MAX_CACHE_AFTER_S = 10 * 60.0
# max_age: an hour at least (a copy younger is resealed every quarter of it), 90 days at most.
MIN_CACHE_MAX_AGE_S = 3600.0
MAX_CACHE_MAX_AGE_S = 90 * 86400.0


@dataclass(frozen=True)
class CachePolicy:
    """Serve from the sealed cache when the secrets are not all fetched
    ``after_s`` into a start, copies no older than ``max_age_s``, kept in
    ``directory`` (absolute, normalised)."""

    after_s: float = DEFAULT_CACHE_AFTER_S
    max_age_s: float = DEFAULT_CACHE_MAX_AGE_S
    directory: str = DEFAULT_CACHE_DIRECTORY
