"""agent.cache.decision and agent.cache.copy: when a sealed copy may stand in for the vault
at start (only while the vault cannot answer), and the document a copy is sealed as."""

from __future__ import annotations

import json

import pytest

from agent.base.errors import (
    CacheError,
    EndlessListError,
    IdentityRefusedError,
    IdentityUnavailableError,
    KvAgentError,
    ListTooLongError,
    SealRefusedError,
    SecretNotFoundError,
    SetKeptError,
    TransformError,
    VaultError,
    VaultForbiddenError,
    VaultThrottledError,
    VaultUnavailableError,
    WriteError,
)
from agent.cache.copy import Copy, decode, encode
from agent.cache.decision import (
    MAX_CLOCK_SKEW_S,
    decide,
    decide_whole,
    describe_age,
    is_unavailable,
)

KEY = "/run/secrets/db-password"
NOW = 1_750_000_000.0
DAY = 86400.0
WEEK = 7 * DAY
UNREACHABLE = VaultUnavailableError("request to vault https://kv.vault.azure.net timed out")


def _copy(age_s: float = 3600.0, key: str = KEY) -> Copy:
    return Copy(key, NOW - age_s, ((KEY, b"s3cret"), ("/run/secrets/other", b"\x00\xff")))


@pytest.mark.parametrize("cause", [
    IdentityUnavailableError("IMDS at http://169.254.169.254 gave no usable answer (refused)"),
    IdentityUnavailableError("IMDS kept answering HTTP 503 after 5 attempts"),
    VaultUnavailableError("vault https://kv.vault.azure.net: DNS lookup failed"),
    VaultUnavailableError("vault kept failing (HTTP 500)"),
    VaultThrottledError("429 persisted beyond the retry budget"),
    EndlessListError("the list kept sending empty pages"),
    SetKeptError("set kept", None, VaultUnavailableError("timed out")),
], ids=["imds refused", "imds 503", "dns", "5xx", "429", "endless list", "set kept: outage"])
def test_an_outage_serves_a_young_copy(cause: KvAgentError) -> None:
    """The identity endpoint or the vault unavailable, a copy of this entry younger than
    max_age: served, the line naming the entry and the copy's time."""
    decision = decide(KEY, cause, _copy(), WEEK, NOW)
    assert decision.serve and decision.copy == _copy()
    assert decision.reason.startswith(KEY) and "2025-06-15T14:06:40Z" in decision.reason
    assert "1h old" in decision.reason


@pytest.mark.parametrize("cause", [
    VaultForbiddenError("secret 'db': 403 forbidden"),
    VaultForbiddenError("secret 'db': this version is disabled (403 SecretDisabled)"),
    SecretNotFoundError("secret 'db': not found in the vault (404)"),
    VaultError("secret 'db': the vault rejected the identity's token (401)"),
    VaultError("secret 'db': HTTP 400 BadParameter"),
    ListTooLongError("more than 100 pages"),
    TransformError("secret 'db' is not valid base64"),
    WriteError("/run/secrets is not a tmpfs"),
    SetKeptError("set kept", None, VaultForbiddenError("403")),
    IdentityRefusedError("IMDS refused a token for the system-assigned identity: "
                         "Identity not found"),
    IdentityRefusedError("IMDS refused a token for client_id abc: Multiple user assigned "
                         "identities exist"),
    SetKeptError("set kept", None, IdentityRefusedError("Identity not found")),
    KvAgentError("anything else"),
], ids=["403", "403 disabled", "404", "401", "400", "list too long", "transform", "write",
        "set kept: 403", "imds 400 identity not found", "imds 400 multiple identities",
        "set kept: imds 400", "other"])
def test_an_answer_is_never_hidden_by_a_copy(cause: KvAgentError) -> None:
    """A 403, a 404, any other refusal, a transform or a write failure: not served, even
    with a perfect copy; the line says an answer is not an outage."""
    decision = decide(KEY, cause, _copy(), WEEK, NOW)
    assert not decision.serve and decision.copy is None
    assert decision.reason.startswith(KEY) and "an answer is not an outage" in decision.reason
    assert not is_unavailable(cause)


def test_an_identity_refusal_says_who_answered() -> None:
    """The line for an identity endpoint's 4xx names that endpoint, not the vault."""
    decision = decide(KEY, IdentityRefusedError("IMDS refused a token: Identity not found"),
                      _copy(), WEEK, NOW)
    assert "the identity endpoint answered (IMDS refused a token: Identity not found)" in \
        decision.reason


def test_a_unit_is_served_whole_or_not_at_all() -> None:
    """A set (or a select's expansion) is served only when every member may be; else
    none of it, with the first refused member's reason, under the unit's label."""
    good = decide(KEY, UNREACHABLE, _copy(), WEEK, NOW)
    other = decide("/run/secrets/other", UNREACHABLE, None, WEEK, NOW)
    assert decide_whole("set 'db'", [good, good]).serve
    refused = decide_whole("set 'db'", [good, other])
    assert not refused.serve and refused.copy is None
    assert refused.reason.startswith("set 'db': not served from the sealed cache, none of it")
    assert refused.reason.endswith("/run/secrets/other: no sealed copy to serve")
    assert not decide_whole("set 'db'", []).serve


def test_a_fetched_entry_needs_no_copy() -> None:
    """No cause (the entry is ready): not served."""
    assert not decide(KEY, None, _copy(), WEEK, NOW).serve


@pytest.mark.parametrize(("age_s", "serve"), [
    (0.0, True), (WEEK - 1, True), (WEEK, True), (WEEK + 1, False), (30 * DAY, False),
    (-MAX_CLOCK_SKEW_S, True), (-MAX_CLOCK_SKEW_S - 1, False),
])
def test_the_copys_age_against_max_age(age_s: float, serve: bool) -> None:
    """Served up to max_age inclusive, never older; a copy dated in the future beyond the
    clock skew is skipped (a clock set back makes every copy look young)."""
    decision = decide(KEY, UNREACHABLE, _copy(age_s), WEEK, NOW)
    assert decision.serve is serve, decision.reason
    if not serve:
        assert "older than max_age 7d" in decision.reason or "future" in decision.reason


@pytest.mark.parametrize(("problem", "words"), [
    (SealRefusedError("cannot unseal credential 'x' with systemd-creds: Credential's time "
                      "passed, refusing to use."), "time passed"),
    (SealRefusedError("cannot unseal credential 'x' with systemd-creds: Decryption failed "
                      "(incorrect key?)"), "incorrect key"),
    (CacheError(f"{KEY}: the sealed copy is another entry's (/run/secrets/b)"), "another entry"),
    (CacheError(f"{KEY}: the sealed copy holds not a copy"), "not a copy"),
], ids=["expired", "undecryptable", "another entry's", "damaged"])
def test_an_unreadable_copy_is_skipped_with_its_reason(problem: CacheError, words: str) -> None:
    """Expired, undecryptable (host key or TPM2 changed), another entry's, damaged: skipped,
    one line with the entry and the reason."""
    decision = decide(KEY, UNREACHABLE, problem, WEEK, NOW)
    assert not decision.serve and decision.reason.startswith(KEY) and words in decision.reason


def test_no_copy_and_another_entrys_copy_are_skipped() -> None:
    """No copy at all, or a Copy value of another key: not served."""
    assert "no sealed copy" in decide(KEY, UNREACHABLE, None, WEEK, NOW).reason
    other = decide(KEY, UNREACHABLE, _copy(key="/run/secrets/b"), WEEK, NOW)
    assert not other.serve and "another entry's" in other.reason


def test_no_reason_holds_a_value() -> None:
    """The lines and a copy's repr name targets and times, never the bytes."""
    copy = _copy()
    lines = [decide(KEY, cause, copy, WEEK, NOW).reason
             for cause in (UNREACHABLE, VaultForbiddenError("403"), None)]
    assert all("s3cret" not in line for line in lines + [repr(copy)])


@pytest.mark.parametrize(("seconds", "text"), [
    (0, "0s"), (42, "42s"), (450, "7m30s"), (3600, "1h"), (18720, "5h12m"),
    (WEEK, "7d"), (3 * DAY + 4 * 3600 + 59, "3d4h"),
])
def test_ages_read_in_two_units_at_most(seconds: float, text: str) -> None:
    assert describe_age(seconds) == text


# -- the sealed document ------------------------------------------------------------------


def test_a_copy_round_trips_through_its_document() -> None:
    """encode then decode gives the same copy: binary bytes, empty bytes, many targets."""
    copy = Copy(KEY, NOW + 0.25, ((KEY, b"\x00\xff\n"), ("credential:app.service/db", b"")))
    assert decode(encode(copy), KEY) == copy


def test_another_entrys_document_is_refused() -> None:
    """The key inside the sealed document is checked: a copy moved to another entry fails."""
    with pytest.raises(CacheError, match="another entry's"):
        decode(encode(_copy()), "/run/secrets/b")


def _tampered(**fields: object) -> bytes:
    content = json.loads(encode(_copy()))
    content.update(fields)
    return json.dumps(content).encode()


@pytest.mark.parametrize("document", [
    b"", b"not json", b"[]", b"{" * 100_000, _tampered(format=2), _tampered(fetched_at="x"),
    _tampered(fetched_at=True), _tampered(fetched_at=float("nan")), _tampered(items={}),
    _tampered(items=[["a"]]), _tampered(items=[["a", "not base64!"]]),
    _tampered(items=[["a", 5]]), _tampered(key=None),
], ids=["empty", "text", "list", "deep", "format", "time text", "time bool", "nan",
        "items map", "short item", "bad base64", "number", "no key"])
def test_a_malformed_document_is_a_cache_error(document: bytes) -> None:
    """Whatever the unsealed bytes are, decode returns a copy or raises CacheError."""
    with pytest.raises(CacheError):
        decode(document, KEY)


def test_bytes_of_a_target() -> None:
    """A copy gives each target's bytes; a target it never held is a CacheError."""
    copy = _copy()
    assert copy.bytes_of(KEY) == b"s3cret"
    with pytest.raises(CacheError, match="nothing for /run/secrets/new"):
        copy.bytes_of("/run/secrets/new")


