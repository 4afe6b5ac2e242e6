"""Sources and the attributes a fetch keeps: unique fetches, defensive parsing."""

from __future__ import annotations

from typing import Any, Dict

import pytest

from agent.pipeline.sources import SecretAttributes, Source, parse_attributes, unique_sources
from agent.vault.client import parse_secret_bundle


def test_unique_sources_keep_first_seen_order() -> None:
    """Equal sources collapse to one; the order is that of first appearance."""
    a, b = Source("https://a.vault.azure.net", "x"), Source("https://a.vault.azure.net", "y")
    pinned = Source("https://a.vault.azure.net", "x", "0" * 32)
    assert unique_sources([a, b, a, pinned, b]) == (a, b, pinned)


def test_bundle_keeps_content_type_and_attributes() -> None:
    """parse_secret_bundle keeps the content type and every attribute Key Vault sent."""
    body = (b'{"value": "v", "id": "https://a.vault.azure.net/secrets/s/abc",'
            b' "contentType": "application/x-pkcs12", "kid": "https://a/keys/s/abc",'
            b' "managed": true, "tags": {"env": "prod"},'
            b' "attributes": {"enabled": true, "nbf": 1, "exp": 2, "created": 3,'
            b' "updated": 4, "recoveryLevel": "Recoverable"}}')
    secret = parse_secret_bundle("s", body)
    assert secret.content_type == "application/x-pkcs12"
    assert secret.attributes == SecretAttributes(True, 1, 2, 3, 4, (("env", "prod"),), True,
                                                 "https://a/keys/s/abc")
    assert repr(secret).endswith("value=****)")


@pytest.mark.parametrize("bundle", [
    {}, {"attributes": None}, {"attributes": []}, {"attributes": "x"},
    {"attributes": {"enabled": "yes", "nbf": "1", "exp": 1.5, "created": True,
                    "updated": 2**80}},
    {"tags": ["a"], "managed": "true", "kid": 7},
    {"tags": {"a": 1, "2": None}},
], ids=repr)
def test_odd_shapes_become_none_never_a_crash(bundle: Dict[str, Any]) -> None:
    """A field of the wrong type is None (tags of the wrong types are dropped)."""
    attributes = parse_attributes(bundle)
    assert (attributes.enabled, attributes.nbf, attributes.exp, attributes.created,
            attributes.updated, attributes.managed, attributes.kid) == (None,) * 7
    assert attributes.tags in (None, ())


def test_network_text_is_escaped_and_bounded() -> None:
    """Tag text and kid reach logs: control characters are escaped, lengths capped."""
    attributes = parse_attributes({"kid": "k\n\x1b[31m" + "x" * 1000,
                                   "tags": {f"t{i}": "a\nb" for i in range(80)}})
    assert attributes.kid is not None and "\n" not in attributes.kid
    assert "\x1b" not in attributes.kid and len(attributes.kid) < 600
    assert attributes.tags is not None and len(attributes.tags) == 50
    assert all("\n" not in value for _, value in attributes.tags)


def test_dates_outside_1970_to_9999_are_no_date_and_named() -> None:
    """nbf/exp/created/updated beyond the year 9999 (2^62), negative or not integers read as
    None and are named in unusable_dates; the last second of 9999 is still a date."""
    attributes = parse_attributes({"attributes": {"nbf": 2**62, "exp": -5, "created": 1.5,
                                                  "updated": 253402300799}})
    assert (attributes.nbf, attributes.exp, attributes.created) == (None, None, None)
    assert attributes.updated == 253402300799
    assert attributes.unusable_dates == ("nbf", "exp", "created")
    assert parse_attributes({"attributes": {"nbf": None}}).unusable_dates == ()
