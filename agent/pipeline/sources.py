"""Sources: what to fetch, and what a fetch brings back besides the bytes.

The first stage of the pipeline (entries -> **sources** -> transforms ->
outputs). A :class:`Source` names one secret version on one vault; entries
that name the same source share one fetch, so a secret written to two files
costs one request. :class:`SecretAttributes` is what Key Vault says about
the version (enabled, validity window, tags ...): kept on the fetched value
for the transforms and features that will need it (expiry warnings,
list-based refresh), never used to decide anything today.

Pure values; nothing here does I/O.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, NamedTuple, Optional, Tuple

from agent.base.untrusted import escape
from agent.pipeline.expiry import usable_epoch

MAX_TAGS = 50  # Key Vault allows 15; more is not a vault talking
MAX_TAG_CHARS = 256  # Key Vault's limit on a tag's name and on its value
MAX_KID_CHARS = 512
_TIMES = ("nbf", "exp", "created", "updated")


class Source(NamedTuple):
    """One secret on one vault, at a pinned ``version`` or (None) the current one."""

    vault: str
    name: str
    version: Optional[str] = None


class SecretAttributes(NamedTuple):
    """A secret version's attributes as Key Vault reported them [protocol.md B2].

    Times are epoch seconds (Key Vault's unit). Every field is None when the
    vault left it out or sent something of the wrong type: these come from
    the network and are never trusted to have a shape. A time must be an
    integer from 1970 to the year 9999 (:func:`agent.pipeline.expiry.usable_epoch`);
    ``unusable_dates`` names the time fields the vault sent otherwise, read
    as None, for one warning. ``tags`` is a tuple of (name, value) pairs so
    the value stays immutable and hashable.
    """

    enabled: Optional[bool] = None
    nbf: Optional[int] = None
    exp: Optional[int] = None
    created: Optional[int] = None
    updated: Optional[int] = None
    tags: Optional[Tuple[Tuple[str, str], ...]] = None
    managed: Optional[bool] = None
    kid: Optional[str] = None
    unusable_dates: Tuple[str, ...] = ()


def unique_sources(sources: Iterable[Source]) -> Tuple[Source, ...]:
    """Each distinct source once, in first-seen order (one fetch each)."""
    return tuple(dict.fromkeys(sources))


def parse_attributes(bundle: Mapping[str, Any]) -> SecretAttributes:
    """The attributes of a SecretBundle (already JSON), defensively.

    Whatever shape the vault sent, this returns a value and never raises: a
    field of the wrong type is None, text is escaped and bounded (it can
    reach a log), tags beyond MAX_TAGS are dropped.
    """
    attributes = bundle.get("attributes")
    if not isinstance(attributes, dict):
        attributes = {}
    times = {field: usable_epoch(attributes.get(field)) for field in _TIMES}
    return SecretAttributes(
        enabled=_flag(attributes.get("enabled")),
        tags=_tags(bundle.get("tags")),
        managed=_flag(bundle.get("managed")),
        kid=escape(bundle["kid"], MAX_KID_CHARS) if isinstance(bundle.get("kid"), str) else None,
        unusable_dates=tuple(field for field in _TIMES
                             if times[field] is None and attributes.get(field) is not None),
        **times,
    )


def _flag(value: Any) -> Optional[bool]:
    return value if isinstance(value, bool) else None


def _tags(value: Any) -> Optional[Tuple[Tuple[str, str], ...]]:
    if not isinstance(value, dict):
        return None
    pairs = [(escape(name, MAX_TAG_CHARS), escape(text, MAX_TAG_CHARS))
             for name, text in list(value.items())[:MAX_TAGS]
             if isinstance(name, str) and isinstance(text, str)]
    return tuple(pairs)
