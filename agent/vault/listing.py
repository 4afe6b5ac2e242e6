"""Key Vault's secret list, one page at a time: values and pure parsing.

``GET {vault}/secrets?api-version=..&maxresults=25`` answers
``{"value": [SecretItem...], "nextLink": <url or null>}`` [protocol.md B4].
The client (:meth:`agent.vault.client.VaultClient.list_secrets`) follows ``nextLink``
verbatim until it is null; these functions say what a page holds and whether
a ``nextLink`` may be followed at all. Three facts of the real service shape
them:

* pages can be **empty and still have a nextLink** (the cursor walks deleted
  entries): only a null ``nextLink`` ends the list;
* the real ``nextLink`` spells the port (``https://{vault}:443/secrets?...``)
  and carries its own query: it is sent as is, with no parameters added;
* an item has no value, and its ``id`` is the unversioned secret URL.

A list whose pages never end (each empty, with a fresh nextLink) must not
cost a thousand requests per attempt (issue 17, item 8): a listing stops
after MAX_EMPTY_PAGES empty pages in a row, and, when the vault's size at
its last listing is known, after :func:`page_bound` pages (:func:`check_advancing`).

Everything here is untrusted: a page is at most a bounded body, text is
escaped, odd attribute types read as "absent". An item without a usable
name, or a page of the wrong shape, is a ValueError for the whole listing:
a list quietly missing a secret could later be taken for "that secret was
deleted".
"""

from __future__ import annotations

import math
import re
from typing import Any, NamedTuple, Optional, Tuple
from urllib.parse import urlsplit

from agent.base.errors import EndlessListError
from agent.base.untrusted import escape
from agent.pipeline.sources import SecretAttributes, parse_attributes
from agent.vault.url import check_target

LIST_PATH = "/secrets"
PAGE_SIZE = 25  # maxresults: 1-25, the service's maximum [protocol.md B4]
MAX_NEXT_LINK_CHARS = 4096  # a real one is ~400 characters
# Empty pages in a row (each with a nextLink) after which a listing stops. A
# real vault sends two before its first item, where the cursor walks deleted
# entries [protocol.md B4]; ten leave room for a vault with many deleted
# secrets, and cost at most ten requests on a list that never ends.
MAX_EMPTY_PAGES = 10
# Pages a listing may take beyond twice those its secrets fill (see page_bound).
PAGE_SLACK = 10
_NAME = re.compile(r"[0-9a-zA-Z-]{1,127}\Z")  # [protocol.md B7]
_VERSION = re.compile(r"[0-9a-zA-Z]{1,64}\Z")


class ListLimits(NamedTuple):
    """Bounds of one listing (policy as data): pages and items fetched,
    seconds from the first request to the last page, empty pages in a row,
    and ``known_size``: the vault's number of secrets at its last listing
    (None: never listed), which bounds the pages (:func:`page_bound`)."""

    max_pages: int = 1000
    max_items: int = 10_000
    deadline_s: float = 120.0
    max_empty_pages: int = MAX_EMPTY_PAGES
    known_size: Optional[int] = None


def pages_for(size: int) -> int:
    """Pages a list of ``size`` secrets fills: ⌈size ÷ 25⌉, at least one."""
    return max(1, math.ceil(size / PAGE_SIZE))


def page_bound(known_size: Optional[int], items: int) -> Optional[int]:
    """Pages a listing may take, given the vault's size at its last listing
    and the ``items`` this listing has brought so far (None: no bound, the
    size is unknown).

    Twice the pages that the larger of the two fills (pages of fewer than 25,
    empty pages between full ones), plus PAGE_SLACK. A vault that grew since
    is no problem: every full page raises the bound by two. Only pages that
    bring (almost) nothing run into it.
    """
    if known_size is None:
        return None
    return 2 * pages_for(max(known_size, items)) + PAGE_SLACK


class SecretItem(NamedTuple):
    """One entry of a secret list: the secret's properties, never its value.

    ``version`` is set only when the id is versioned (``/versions`` lists).
    """

    name: str
    id: str
    version: Optional[str]
    content_type: Optional[str]
    attributes: SecretAttributes


class Page(NamedTuple):
    """One page: its items and the URL of the next page (None: the last)."""

    items: Tuple[SecretItem, ...]
    next_link: Optional[str]


def parse_page(content: Any) -> Page:
    """A Page from a decoded 200 body; ValueError when the page or one of its
    items has the wrong shape. The next link is not checked here."""
    if not isinstance(content, dict):
        raise ValueError("the page is not a JSON object")
    values = content.get("value")
    if not isinstance(values, list):
        raise ValueError("the page has no 'value' list")
    next_link = content.get("nextLink")
    if next_link is not None and not isinstance(next_link, str):
        raise ValueError("the page's nextLink is not a string")
    return Page(tuple(parse_item(raw, index) for index, raw in enumerate(values)),
                next_link or None)


def parse_item(raw: Any, index: int = 0) -> SecretItem:
    """A SecretItem from one list entry; ValueError unless it is an object
    whose ``id`` names a secret (``.../secrets/<name>[/<version>]``)."""
    if not isinstance(raw, dict):
        raise ValueError(f"item {index} is not a JSON object")
    raw_id = raw.get("id")
    if not isinstance(raw_id, str):
        raise ValueError(f"item {index} has no id")
    name, version = _name_and_version(raw_id, index)
    content_type = raw.get("contentType")
    return SecretItem(
        name=name,
        id=escape(raw_id, 512),
        version=version,
        content_type=escape(content_type, 255) if isinstance(content_type, str) else None,
        attributes=parse_attributes(raw),
    )


def _name_and_version(raw_id: str, index: int) -> Tuple[str, Optional[str]]:
    parts = urlsplit(raw_id[:MAX_NEXT_LINK_CHARS]).path.split("/")
    # ['', 'secrets', name] or ['', 'secrets', name, version]
    if len(parts) not in (3, 4) or parts[:2] != ["", "secrets"] or not _NAME.match(parts[2]):
        raise ValueError(f"item {index}'s id '{escape(raw_id, 100)}' names no secret")
    if len(parts) == 3 or parts[3] == "":
        return parts[2], None
    if not _VERSION.match(parts[3]):
        raise ValueError(f"item {index}'s id '{escape(raw_id, 100)}' has an invalid version")
    return parts[2], parts[3]


def check_next_link(link: str, vault: str) -> None:
    """Raise ValueError unless a bearer token may follow ``link``.

    It must be https to exactly the vault's host and port (as urllib3 will
    connect: :func:`agent.vault.url.check_target`), carry no credentials or
    fragment, and continue the same list (path ``/secrets``), so a page can
    never send the token, or the listing, anywhere else.
    """
    shown = escape(link, 200)
    if len(link) > MAX_NEXT_LINK_CHARS:
        raise ValueError(f"the nextLink is over {MAX_NEXT_LINK_CHARS} characters")
    parts = urlsplit(link)
    if parts.username is not None or parts.password is not None or parts.fragment:
        raise ValueError(f"the nextLink '{shown}' carries credentials or a fragment")
    try:
        check_target(link, vault)
    except ValueError:
        raise ValueError(f"the nextLink '{shown}' leads away from the vault") from None
    if parts.path != LIST_PATH:
        raise ValueError(f"the nextLink '{shown}' leaves the secret list")


def check_advancing(vault: str, number: int, empty: int, items: int,
                     limits: ListLimits) -> None:
    """Raise EndlessListError when the listing, at page ``number`` with
    ``empty`` empty pages in a row and ``items`` secrets so far, still has a
    nextLink but has stopped advancing (issue 17, item 8)."""
    if empty >= limits.max_empty_pages:
        raise EndlessListError(
            f"listing vault {vault}: {empty} empty pages in a row, each with a new nextLink "
            "(a list that does not advance); nothing more was sent", "retry later")
    bound = page_bound(limits.known_size, items)
    if bound is not None and number >= bound:
        raise EndlessListError(
            f"listing vault {vault}: {number} pages brought {items} secrets (the vault held "
            f"{limits.known_size} at its last listing), and the list still does not end; "
            "nothing more was sent", "retry later")

