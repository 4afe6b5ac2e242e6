"""systemd credentials' pure rules (agent.pipeline.credentials): names, unit globs, grants,
and the peer address of systemd's credential loader, odd and hostile ones included."""

from __future__ import annotations

from typing import Optional, Union

import pytest

from agent.pipeline.credentials import (
    MAX_UNIT_AND_ID,
    SUN_PATH_MAX,
    Grant,
    Peer,
    change_names,
    credential_id_problem,
    grants,
    is_credential_name,
    is_unit_name,
    may_overlap,
    parse_peer,
    unit_pattern_problem,
)


@pytest.mark.parametrize("name", [
    "db-password", "tls.key", "a", "x" * 255, "with space", "UPPER_and.dots-1", "~!#$%^&*()",
    ".hidden", "...",
])
def test_credential_names_systemd_accepts(name: str) -> None:
    """A file name that is also an fd name: 1-255 printable ASCII, no '/' or ':'."""
    assert is_credential_name(name)


@pytest.mark.parametrize("name", [
    "", ".", "..", "a/b", "/abs", "a:b", "x" * 256, "tab\there", "new\nline", "nul\0",
    "caf\u00e9", "del\x7f",
])
def test_credential_names_systemd_refuses(name: str) -> None:
    """Empty, '.' and '..', a slash, a colon, over 255 characters, controls and non-ASCII."""
    assert not is_credential_name(name)


def test_the_manifest_also_refuses_a_space_in_an_id() -> None:
    """A space is systemd's, but KV_AGENT_CHANGED separates names by spaces: refused, saying so."""
    assert credential_id_problem("db-password") is None
    assert "space" in (credential_id_problem("db password") or "")
    assert "not a systemd credential name" in (credential_id_problem("a/b") or "")
    assert credential_id_problem(5) is not None


@pytest.mark.parametrize("name", [
    "app.service", "worker@1.service", "getty@tty1.service", "a@b@c.service",
    "dev-disk-by\\x2dlabel.device", "x:y.socket", "my_app.timer", "run-u1.scope",
    "a" * 247 + ".service",
])
def test_unit_names_that_run(name: str) -> None:
    """systemd's unit_name_is_valid() for plain and instance names."""
    assert is_unit_name(name)


@pytest.mark.parametrize("name", [
    "", "app", ".service", "app.servic", "app.SERVICE", "worker@.service", "@x.service",
    "a b.service", "a/b.service", "caf\u00e9.service", "app*.service", "a" * 248 + ".service",
    "app.service.", "app.service\0",
])
def test_unit_names_refused(name: str) -> None:
    """No type, an unknown type, a template, a leading '@', foreign characters, over 255."""
    assert not is_unit_name(name)


@pytest.mark.parametrize("pattern", [
    "app.service", "worker@*.service", "app-?.service", "web[0-9].service",
    "web[!0].service", "a*b*.socket", "worker@1.service",
])
def test_unit_patterns_accepted(pattern: str) -> None:
    """Unit names, and globs that begin with a fixed character and end in a fixed .type."""
    assert unit_pattern_problem(pattern) is None


@pytest.mark.parametrize("pattern, words", [
    ("*", "unit type"), ("*.service", "begins with a wildcard"),
    ("?pp.service", "begins with a wildcard"), ("[ab]pp.service", "begins with a wildcard"),
    ("app.*", "unit type"), ("app", "unit type"), ("worker@.service", "template"),
    ("web[0-9.service", "not a unit glob"), ("web[].service", "not a unit glob"),
    ("web]x*.service", "not a unit glob"), ("a b*.service", "not a unit glob"),
    ("a/*.service", "not a unit glob"), ("a/b.service", "not a unit name"),
    ("", "not a unit name"), (None, "not a unit name"), (["app.service"], "not a unit name"),
    ("a" * 250 + "*.service", "longer than"),
])
def test_unit_patterns_refused(pattern: object, words: str) -> None:
    """No "any unit" (a leading wildcard, a wildcard type), templates, broken classes."""
    assert words in (unit_pattern_problem(pattern) or "")


@pytest.mark.parametrize("units, unit, expected", [
    (("app.service",), "app.service", True),
    (("app.service",), "app2.service", False),
    (("app.service",), "App.service", False),  # unit names are case-sensitive
    (("worker@*.service",), "worker@3.service", True),
    (("worker@*.service",), "worker@.service", False),  # a template never asks
    (("worker@*.service",), "worker.service", False),
    (("worker@*.service",), "worker@3.socket", False),
    (("web[0-9].service",), "web7.service", True),
    (("web[!0].service",), "web0.service", False),
    (("a.service", "b-?.service"), "b-1.service", True),
    (("app*.service",), "app/../x.service", False),  # not a unit name, whatever matches
])
def test_grants_match_names_and_globs(units: tuple, unit: str, expected: bool) -> None:
    """A unit is granted when it equals a name or matches a glob, case-sensitively."""
    grant = Grant("db-password", units)
    assert grants(grant, unit) is expected
    assert grant.admits(unit) is expected


@pytest.mark.parametrize("first, second, expected", [
    ("app.service", "app.service", True),
    ("app.service", "app2.service", False),
    ("app.service", "app*.service", True),
    ("app*.service", "app.service", True),
    ("bpp.service", "app*.service", False),
    ("worker@*.service", "worker@1*.service", True),  # conservative: they do meet
    ("worker@*.service", "other@*.service", False),  # fixed beginnings differ
    ("worker@*.service", "worker@*.socket", False),  # fixed endings differ
    ("a*-x.service", "a*-y.service", False),
    ("a[0-9].service", "a[a-z].service", True),  # conservative: cannot tell
])
def test_two_patterns_may_overlap(first: str, second: str, expected: bool) -> None:
    """Exact for a name; for two globs apart only by fixed beginnings or endings."""
    assert may_overlap(first, second) is expected
    assert may_overlap(second, first) is expected


def test_a_grant_is_named_for_hooks_once_per_pattern_and_labelled_whole() -> None:
    """KV_AGENT_CHANGED gets credential:<unit pattern>/<id> per pattern; the label joins them."""
    grant = Grant("db-password", ("app.service", "worker@*.service"))
    assert change_names(grant) == ("credential:app.service/db-password",
                                   "credential:worker@*.service/db-password")
    assert grant.label == "credential:app.service,worker@*.service/db-password"


def address(unit: str, credential_id: str, random: str = "1b2c3d4e5f607182") -> bytes:
    """What systemd's load_credential() binds its client socket to."""
    return b"\0" + f"{random}/unit/{unit}/{credential_id}".encode()


def test_systemds_address_names_the_unit_and_the_credential() -> None:
    """\\0<random>/unit/<unit>/<id> gives the unit and the ID."""
    assert parse_peer(address("app.service", "db-password")) == \
        Peer("app.service", "db-password")
    assert parse_peer(address("worker@3.service", "tls.key", "a")) == \
        Peer("worker@3.service", "tls.key")


def test_the_longest_address_systemd_can_bind_is_read() -> None:
    """Unit and ID of MAX_UNIT_AND_ID bytes make the longest name systemd binds: 107 bytes,
    sun_path less the NUL it keeps after the name."""
    unit = "u" * (MAX_UNIT_AND_ID - 10 - len(".service")) + ".service"
    found = address(unit, "i" * 10)
    assert len(found) == SUN_PATH_MAX - 1
    assert parse_peer(found) == Peer(unit, "i" * 10)


@pytest.mark.parametrize("peer", [
    None, "", b"", b"\0",
    "/run/client.sock",  # a path socket: Python gives a str
    "\0abc/unit/app.service/db",  # a str, even if it looks abstract
    b"abc/unit/app.service/db",  # no leading NUL
    b"/tmp/x/unit/app.service/db",  # a path, as bytes
    b"\0/unit/app.service/db",  # no random part
    b"\0abc/unit/app.service",  # no ID
    b"\0abc/unit/app.service/",  # an empty ID
    b"\0abc/unit//db",  # no unit
    b"\0abc/units/app.service/db",  # not "unit"
    b"\0abc/UNIT/app.service/db",
    b"\0abc/unit/app.service/db/extra",  # an ID with a slash
    b"\0abc/unit/app.service/..",
    b"\0abc/unit/app.service/.",
    b"\0abc/unit/../db",
    b"\0abc/unit/worker@.service/db",  # a template never loads a credential
    b"\0abc/unit/app/db",  # not a unit name
    b"\0abc/unit/app.service/a:b",  # not a credential name
    b"\0abc/unit/app.service/d\0b",  # a NUL inside
    b"\0abc/unit/app.service/db\0",  # a trailing NUL
    b"\0\0abc/unit/app.service/db",
    b"\0abc/unit/app.service/caf\xc3\xa9",  # not ASCII
    b"\0abc/unit/app.service/\xff",
    b"\0a\nb/unit/app.service/db",  # a control character in the random part
    b"\0abc/unit/app.service/db\n",
    b"\0abc/unit/app.service/" + b"x" * 200,  # longer than sun_path
    b"\0" + b"r" * (SUN_PATH_MAX - len("/unit/a.service/db")) + b"/unit/a.service/db",
])
def test_anything_else_is_nobody(peer: Optional[Union[bytes, str]]) -> None:
    """Every other address, odd or hostile, parses to None: it gets nothing."""
    assert parse_peer(peer) is None


def test_an_address_one_byte_under_the_bound_is_read() -> None:
    """The bound is sun_path's 108 bytes, counted with the leading NUL."""
    tail = b"/unit/a.service/db"
    fits = b"\0" + b"r" * (SUN_PATH_MAX - 1 - len(tail)) + tail
    assert len(fits) == SUN_PATH_MAX and parse_peer(fits) == Peer("a.service", "db")
