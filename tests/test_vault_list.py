"""Listing a vault's secrets (issue 10): VaultClient.list_secrets and agent.vault.listing.

Against the recorded real paging (empty pages that are not the end, nextLink with
:443 followed verbatim), against the emulator with ``empty_pages``, and against
hostile pages: a nextLink elsewhere, a paging loop, a huge page, malformed items.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import pytest
from fakes import FakeClock, FakeResponse, FakeSession, json_reply

from agent.base.errors import (
    EndlessListError,
    VaultError,
    VaultForbiddenError,
    VaultUnavailableError,
)
from agent.base.retry import RetryPolicy
from agent.identity.selector import Identity
from agent.identity.tokens import token_source
from agent.pipeline.sources import SecretAttributes, parse_attributes
from agent.vault.client import ENDLESS_LIST_HOLD_S, MAX_BODY_BYTES, VaultClient, new_session
from agent.vault.listing import (
    MAX_EMPTY_PAGES,
    ListLimits,
    check_next_link,
    page_bound,
    parse_item,
    parse_page,
)

VAULT = "https://contoso.vault.azure.net"
RECORDINGS = Path(__file__).parent / "recordings"
FIRST_PARAMS = {"api-version": "7.6", "maxresults": "25"}


class Tokens:
    def __init__(self) -> None:
        self.calls: List[Tuple[str, bool]] = []

    def __call__(self, resource: str, force: bool) -> str:
        self.calls.append((resource, force))
        return f"token-{len(self.calls)}"


def client(session: Any, tokens: Optional[Tokens] = None,
           clock: Optional[FakeClock] = None) -> VaultClient:
    clock = clock or FakeClock()
    return VaultClient(session, tokens or Tokens(), policy=RetryPolicy(deadline_s=30),
                       clock=clock, sleep=clock.sleep)


def page(items: List[Dict[str, Any]], next_link: Optional[str]) -> Tuple[int, Dict[str, str],
                                                                         bytes]:
    return json_reply(200, {"value": items, "nextLink": next_link})


def item(name: str, **extra: Any) -> Dict[str, Any]:
    return {"id": f"{VAULT}/secrets/{name}", "attributes": {"enabled": True}, **extra}


def link(token: str) -> str:
    return f"{VAULT}:443/secrets?api-version=7.6&$skiptoken={token}&maxresults=25"


def recorded_pages() -> List[Tuple[str, Tuple[int, Dict[str, str], bytes]]]:
    """(request URL, reply) of every list GET in the recording, its sanitised vault
    name (``keyvault_name``, not a valid host) replaced by ``contoso``."""
    recording = json.loads(
        (RECORDINGS / "keyvault__js__recording_can_list_secrets_by_page.json").read_text())
    pages = []
    for entry in recording["Entries"]:
        if entry["RequestMethod"] == "GET" and "/secrets?" in entry["RequestUri"]:
            body = json.dumps(entry["ResponseBody"]).replace("keyvault_name", "contoso")
            pages.append((entry["RequestUri"].replace("keyvault_name", "contoso"),
                          (entry["StatusCode"], {}, body.encode())))
    return pages


def test_recorded_paging_is_followed_verbatim_through_empty_pages() -> None:
    """The recording's two empty opening pages and its :443 nextLinks are followed as sent,
    with no parameter added, until nextLink is null; every page carries the token."""
    pages = recorded_pages()
    assert json.loads(pages[0][1][2])["value"] == []  # the recording opens with empty pages
    session = FakeSession(*[reply for _, reply in pages])
    items = client(session).list_secrets(VAULT)
    assert [i.name for i in items] == [
        "listSecretName-canlistsecretproperties-51074815250816990",
        "listSecretName-canlistsecretproperties-51074815250816991",
        "listSecretName-canlistsecretsbypage-0", "listSecretName-canlistsecretsbypage-1"]
    assert items[2].attributes.enabled is True and items[2].attributes.created == 1665617943
    assert items[2].version is None and items[2].id == f"{VAULT}/secrets/{items[2].name}"
    assert session.sent[0].url == f"{VAULT}/secrets" and session.sent[0].params == FIRST_PARAMS
    for (_, previous), (recorded_url, _), sent in zip(pages, pages[1:], session.sent[1:]):
        assert sent.url == json.loads(previous[2])["nextLink"] and sent.params == {}
        assert sent.url == recorded_url.replace(".net/", ".net:443/")  # what the SDK asked
        assert ":443/secrets?api-version=7.3&$skiptoken=" in sent.url
    assert all(sent.headers["Authorization"].startswith("Bearer ") for sent in session.sent)
    assert len(session.sent) == len(pages)


def test_real_list_item_shapes_parse() -> None:
    """Items as the spec and real vaults send them: contentType, tags, managed, no value."""
    (parsed,) = parse_page({"value": [{
        "contentType": "application/x-pkcs12", "id": f"{VAULT}/secrets/tls-cert",
        "managed": True, "tags": {"env": "prod", "n": 5},
        "kid": f"{VAULT}/keys/tls-cert/{'b' * 32}",
        "attributes": {"enabled": False, "nbf": 1, "exp": 2, "created": 3, "updated": 4,
                       "recoveryLevel": "Recoverable+Purgeable"}}],
        "nextLink": None}).items
    assert parsed.name == "tls-cert" and parsed.content_type == "application/x-pkcs12"
    assert parsed.attributes == SecretAttributes(
        False, 1, 2, 3, 4, (("env", "prod"),), True, f"{VAULT}/keys/tls-cert/{'b' * 32}")
    assert parse_item({"id": f"{VAULT}/secrets/db/{'a' * 32}"}).version == "a" * 32


@pytest.mark.parametrize("empty_pages", [False, True])
def test_emulator_list_is_complete_with_and_without_empty_pages(empty_pages: bool) -> None:
    """Against the emulator, 60 secrets come back whole, also when the list opens with empty
    pages and ends with an empty page whose nextLink is null."""
    from agent.emulator import Emulator

    names = [f"s-{i:03d}" for i in range(60)]
    with Emulator({name: "v" for name in names}, empty_pages=empty_pages) as emulator:
        emulator.set_secret("tagged", "v", content_type="text/plain", tags={"team": "db"})
        tokens = token_source(Identity(), {"KV_AGENT_IMDS_ENDPOINT": emulator.imds_endpoint},
                              RetryPolicy(deadline_s=5))
        vault = VaultClient(new_session({"REQUESTS_CA_BUNDLE": emulator.ca_path}),
                            lambda resource, force: tokens.get_token(
                                resource, force_refresh=force).token)
        try:
            items = vault.list_secrets(emulator.vault_url)
        finally:
            tokens.close()
        pages = [r for r in emulator.vault_log if r.path == "/secrets" and r.status == 200]
    assert sorted(i.name for i in items) == sorted(names + ["tagged"])
    (tagged,) = [i for i in items if i.name == "tagged"]
    assert tagged.content_type == "text/plain"
    assert tagged.attributes.tags == (("team", "db"),)
    assert len(pages) == (6 if empty_pages else 3)


def test_empty_first_page_with_null_next_link_is_an_empty_vault() -> None:
    """{"value": [], "nextLink": null} is a complete, empty list."""
    assert client(FakeSession(page([], None))).list_secrets(VAULT) == ()


@pytest.mark.parametrize("next_link, reason", [
    ("https://evil.example/secrets?x=1", "leads away"),
    ("https://contoso.vault.azure.net.evil.example/secrets", "leads away"),
    ("http://contoso.vault.azure.net/secrets?x=1", "leads away"),
    ("https://contoso.vault.azure.net:8443/secrets?x=1", "leads away"),
    ("https://evil.example\\.contoso.vault.azure.net/secrets", "leads away"),
    ("https://user:pw@contoso.vault.azure.net/secrets", "credentials"),
    ("https://contoso.vault.azure.net/deletedsecrets?x=1", "leaves the secret list"),
    ("https://contoso.vault.azure.net/secrets?" + "x" * 5000, "characters"),
])
def test_next_link_elsewhere_is_never_followed(next_link: str, reason: str) -> None:
    """A nextLink to another host, scheme, port or list is refused: nothing more is sent,
    so the token never leaves the vault."""
    session = FakeSession(page([item("a")], next_link))
    with pytest.raises(VaultError, match=reason) as caught:
        client(session).list_secrets(VAULT)
    assert len(session.sent) == 1
    assert "nothing more was sent" in str(caught.value)


def test_paging_loop_is_detected() -> None:
    """A nextLink that repeats an earlier page ends the listing with an error."""
    session = FakeSession(page([item("a")], link("one")), page([item("b")], link("two")),
                          page([item("c")], link("one")))
    with pytest.raises(VaultError, match="paging loop"):
        client(session).list_secrets(VAULT)
    assert len(session.sent) == 3


def test_pages_and_items_are_bounded() -> None:
    """More pages or items than the limits allow is an error, never a shorter list."""
    endless = FakeSession(*[page([], link(str(n))) for n in range(10)])
    with pytest.raises(VaultError, match="more than 5 pages"):
        client(endless).list_secrets(VAULT, ListLimits(max_pages=5))
    assert len(endless.sent) == 5
    crowded = FakeSession(page([item(f"s{n}") for n in range(30)], link("x")))
    with pytest.raises(VaultError, match="more than 20 secrets"):
        client(crowded).list_secrets(VAULT, ListLimits(max_items=20))


def test_a_list_of_endless_empty_pages_stops_after_a_few_in_a_row() -> None:
    """Empty pages that each carry a new nextLink end the listing after MAX_EMPTY_PAGES
    in a row with EndlessListError (issue 17 item 8: it cost 1,000 requests)."""
    endless = FakeSession(*[page([], link(f"e{n}")) for n in range(1000)])
    with pytest.raises(EndlessListError, match="empty pages in a row") as caught:
        client(endless).list_secrets(VAULT)
    assert len(endless.sent) == MAX_EMPTY_PAGES == 10
    assert caught.value.exit_code == 69 and "nothing more was sent" in str(caught.value)


def test_a_list_that_did_not_end_is_not_tried_again_for_a_while() -> None:
    """After EndlessListError the vault's list fails at once with the same error, with no
    request, for ENDLESS_LIST_HOLD_S; then it is listed again."""
    clock = FakeClock()
    session = FakeSession(*[page([], link(f"e{n}")) for n in range(MAX_EMPTY_PAGES)],
                          page([item("a")], None))
    vault = client(session, clock=clock)
    with pytest.raises(EndlessListError) as first:
        vault.list_secrets(VAULT)
    clock.now += ENDLESS_LIST_HOLD_S - 1
    with pytest.raises(EndlessListError) as second:
        vault.list_secrets(VAULT)
    assert second.value is first.value and len(session.sent) == MAX_EMPTY_PAGES
    clock.now += 1
    assert [i.name for i in vault.list_secrets(VAULT)] == ["a"]


def test_empty_pages_between_items_are_not_counted_as_a_run() -> None:
    """A few empty pages before, between and after items (as the real service sends
    them) are followed to the end: only a run of MAX_EMPTY_PAGES stops the list."""
    replies = []
    for n in range(30):
        replies += [page([], link(f"gap{n}-{g}")) for g in range(MAX_EMPTY_PAGES - 1)]
        replies.append(page([item(f"s{n}")], link(f"item{n}")))
    replies.append(page([], None))
    session = FakeSession(*replies)
    items = client(session).list_secrets(VAULT)
    assert [i.name for i in items] == [f"s{n}" for n in range(30)]


def test_pages_past_what_the_known_size_explains_stop_the_listing() -> None:
    """With the vault's size at its last listing known (30 secrets), a list of one-item
    pages that never ends stops at page_bound pages, not at 1,000."""
    trickle = FakeSession(*[page([item(f"s{n}")], link(f"t{n}")) for n in range(1000)])
    with pytest.raises(EndlessListError, match="the vault held 30 at its last listing"):
        client(trickle).list_secrets(VAULT, ListLimits(known_size=30))
    assert len(trickle.sent) == page_bound(30, len(trickle.sent)) == 14


def test_a_vault_that_grew_past_its_known_size_is_listed_whole() -> None:
    """Full pages always advance the bound: a vault of 25 secrets grown to 500 is listed
    to its end, whatever its last known size."""
    names = [f"s{n:03d}" for n in range(500)]
    pages = [page([item(name) for name in names[start:start + 25]],
                  link(f"p{start}") if start + 25 < len(names) else None)
             for start in range(0, len(names), 25)]
    items = client(FakeSession(*pages)).list_secrets(VAULT, ListLimits(known_size=25))
    assert [i.name for i in items] == names


def test_the_emulators_endless_list_costs_at_most_max_empty_pages_requests() -> None:
    """Against the emulator's endless-pages fault, a listing ends with EndlessListError
    after MAX_EMPTY_PAGES list requests."""
    from agent.emulator import Emulator

    with Emulator({"a": "v"}) as emulator:
        emulator.inject_fault("vault", endless_pages=True, count=10_000)
        tokens = token_source(Identity(), {"KV_AGENT_IMDS_ENDPOINT": emulator.imds_endpoint},
                              RetryPolicy(deadline_s=5))
        vault = VaultClient(new_session({"REQUESTS_CA_BUNDLE": emulator.ca_path}),
                            lambda resource, force: tokens.get_token(
                                resource, force_refresh=force).token)
        try:
            with pytest.raises(EndlessListError):
                vault.list_secrets(emulator.vault_url)
        finally:
            tokens.close()
        authenticated = [r for r in emulator.vault_log
                         if r.path == "/secrets" and r.status == 200]
    assert len(authenticated) == MAX_EMPTY_PAGES


def test_listing_has_a_total_deadline() -> None:
    """Slow pages that each arrive in time still end the listing at its deadline."""
    clock = FakeClock()

    class SlowPages(FakeSession):
        def get(self, url: str, **kwargs: Any) -> FakeResponse:
            clock.now += 4  # each page takes 4 s
            return super().get(url, **kwargs)

    session = SlowPages(*[page([item(f"s{n}")], link(str(n))) for n in range(20)])
    with pytest.raises(VaultUnavailableError, match="not done after 10 s"):
        client(session, clock=clock).list_secrets(VAULT, ListLimits(deadline_s=10))
    assert len(session.sent) == 3


def test_huge_page_is_refused() -> None:
    """A page over the body bound is an unusable answer, not buffered without limit."""
    huge = page([item(f"s{n}", tags={"t": "x" * 200}) for n in range(2000)], None)
    assert len(huge[2]) > MAX_BODY_BYTES
    with pytest.raises(VaultError, match="too large"):
        client(FakeSession(huge)).list_secrets(VAULT)


@pytest.mark.parametrize("body", [
    b"not json", b"[]", b'{"nextLink": null}', b'{"value": {}, "nextLink": null}',
    b'{"value": [], "nextLink": 5}', b'{"value": ["db"], "nextLink": null}',
    b'{"value": [{"attributes": {}}], "nextLink": null}',
    b'{"value": [{"id": 5}], "nextLink": null}',
    b'{"value": [{"id": "https://contoso.vault.azure.net/keys/db"}], "nextLink": null}',
    b'{"value": [{"id": "https://contoso.vault.azure.net/secrets/bad_name"}], "nextLink": null}',
    b'{"value": [{"id": "https://contoso.vault.azure.net/secrets/db/v/x"}], "nextLink": null}',
    b'{"value": [{"id": "https://contoso.vault.azure.net/secrets/db/\\u001b[31m"}]}',
    b"[" * 100_000 + b"]" * 100_000,
])
def test_malformed_pages_and_items_fail_the_listing_clearly(body: bytes) -> None:
    """A page or item of the wrong shape is one VaultError for the listing, text escaped."""
    with pytest.raises(VaultError, match="page 1 is unusable") as caught:
        client(FakeSession((200, {}, body))).list_secrets(VAULT)
    text = str(caught.value)
    assert "\x1b" not in text and "\n" not in text


def test_odd_attribute_types_read_as_absent() -> None:
    """Attributes, tags and flags of the wrong type are None/empty, never an exception."""
    assert parse_attributes({"attributes": {"enabled": "yes", "nbf": 1.5, "exp": True,
                                            "created": "1", "updated": 10 ** 30},
                             "managed": "true", "tags": "x", "kid": 5}) == SecretAttributes(
        unusable_dates=("nbf", "exp", "created", "updated"))
    assert parse_attributes({"attributes": ["x"]}) == SecretAttributes()
    assert parse_attributes({"tags": {"a": "b\n\x1b", "c": None, "d": ["x"]}}).tags == (
        ("a", "b\\x0a\\x1b"),)
    many = parse_attributes({"tags": {str(n): "v" for n in range(100)}}).tags
    assert many is not None and len(many) == 50
    odd = parse_item({"id": f"{VAULT}/secrets/db", "contentType": 5})
    assert odd.content_type is None and odd.attributes == SecretAttributes()


def test_next_link_check_accepts_the_real_forms() -> None:
    """The real nextLink (explicit :443, its own query) and the emulator's may be followed."""
    real = link("eyJOZXh0TWFya2VyIjoiMiE")
    check_next_link(real, VAULT)  # no ValueError
    local = "https://127.0.0.1:8443/secrets?api-version=7.6&$skiptoken=x"
    check_next_link(local, "https://127.0.0.1:8443")


def test_list_failures_name_the_vault_and_the_fix() -> None:
    """403 on the list says which permission is missing; 401 gets one fresh token first."""
    denied = json_reply(403, {"error": {"code": "Forbidden", "message": "no",
                                        "innererror": {"code": "ForbiddenByRbac"}}})
    with pytest.raises(VaultForbiddenError, match=f"listing vault {VAULT}: permission") as caught:
        client(FakeSession(denied)).list_secrets(VAULT)
    assert caught.value.hint and "'list'" in caught.value.hint
    tokens = Tokens()
    session = FakeSession(json_reply(401, {}), page([item("a")], None))
    assert [i.name for i in client(session, tokens).list_secrets(VAULT)] == ["a"]
    assert [force for _, force in tokens.calls] == [False, True, False]


def test_throttled_page_honours_retry_after() -> None:
    """A 429 on a later page waits its Retry-After and resumes at that same page."""
    clock = FakeClock()
    session = FakeSession(page([item("a")], link("one")),
                          json_reply(429, {}, **{"Retry-After": "7"}),
                          page([item("b")], None))
    items = client(session, clock=clock).list_secrets(VAULT)
    assert [i.name for i in items] == ["a", "b"] and clock.sleeps == [7.0]
    assert session.sent[1].url == session.sent[2].url == link("one")
