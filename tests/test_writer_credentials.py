"""The credential store (agent.writer.credentials): values in memory only, replaced whole per
entry, served only for declared grants, failing closed with a reason."""

from __future__ import annotations

import threading
from typing import Dict, Tuple

from agent.pipeline.credentials import Grant
from agent.writer.credentials import (
    AMBIGUOUS,
    NOT_GRANTED,
    NOT_LOADED,
    UNKNOWN_ID,
    Answer,
    CredentialStore,
)

DB = Grant("db-password", ("app.service", "worker@*.service"))
KEY = Grant("tls.key", ("nginx.service",))
CRT = Grant("tls.crt", ("nginx.service",))


def store_with(declared: Dict[str, Tuple[Grant, ...]]) -> CredentialStore[Grant]:
    store = CredentialStore[Grant]()
    store.declare(declared)
    return store


def test_a_granted_unit_gets_the_bytes_and_others_get_nothing() -> None:
    """value_for serves a unit a grant admits (name or glob) and None to anyone else."""
    store = store_with({"db": (DB,)})
    assert store.replace("db", [(DB, b"s3cret")]) == (DB,)
    assert store.value_for("app.service", "db-password") == b"s3cret"
    assert store.value_for("worker@7.service", "db-password") == b"s3cret"
    assert store.value_for("other.service", "db-password") is None
    assert store.value_for("app.service", "other-id") is None


def test_each_refusal_says_why() -> None:
    """Unknown ID, unit not granted, not loaded yet, two grants: no bytes, each its reason."""
    other = Grant("db-password", ("app*.service",))  # the manifest would refuse this
    store = store_with({"db": (DB,), "web": (KEY,), "twice": (other,)})
    store.replace("db", [(DB, b"x")])
    assert store.lookup("app.service", "nope") == Answer(None, UNKNOWN_ID)
    assert store.lookup("nginx.service", "db-password") == Answer(None, NOT_GRANTED)
    assert store.lookup("nginx.service", "tls.key") == Answer(None, NOT_LOADED)
    assert store.lookup("app.service", "db-password") == Answer(None, AMBIGUOUS)
    assert store.lookup("worker@1.service", "db-password") == Answer(b"x")


def test_an_entry_is_replaced_whole_and_only_changes_count() -> None:
    """replace swaps every value of an entry at once and returns only the grants that changed."""
    store = store_with({"web": (KEY, CRT)})
    assert store.replace("web", [(KEY, b"k1"), (CRT, b"c1")]) == (KEY, CRT)
    assert store.replace("web", [(KEY, b"k1"), (CRT, b"c1")]) == ()
    assert store.replace("web", [(KEY, b"k2"), (CRT, b"c1")]) == (KEY,)
    assert store.value_for("nginx.service", "tls.key") == b"k2"
    assert store.value_for("nginx.service", "tls.crt") == b"c1"


def test_undeclared_grants_are_never_loaded() -> None:
    """A value for a key or grants the manifest in force does not declare is ignored."""
    store = store_with({"db": (DB,)})
    assert store.replace("gone", [(KEY, b"k")]) == ()
    assert store.replace("db", [(KEY, b"k")]) == ()
    assert store.loaded() == frozenset()
    assert store.value_for("nginx.service", "tls.key") is None


def test_a_new_declaration_keeps_unchanged_entries_and_drops_the_rest() -> None:
    """A reload keeps the values of entries with the same grants; a credential that left the
    manifest, or whose units changed, is never served again."""
    store = store_with({"db": (DB,), "web": (KEY,)})
    store.replace("db", [(DB, b"d")])
    store.replace("web", [(KEY, b"k")])
    narrower = Grant("tls.key", ("other.service",))
    store.declare({"db": (DB,), "web": (narrower,)})
    assert store.value_for("app.service", "db-password") == b"d"
    assert store.value_for("nginx.service", "tls.key") is None
    assert store.value_for("other.service", "tls.key") is None  # declared, not loaded
    assert store.loaded() == frozenset({"db"})
    store.declare({})
    assert store.value_for("app.service", "db-password") is None and not store.loaded()


def test_what_is_loaded_for_the_ready_gate() -> None:
    """holds, loaded and unloaded say which entries' credentials are in memory."""
    store = store_with({"db": (DB,), "web": (KEY, CRT)})
    store.replace("db", [(DB, b"d")])
    assert store.holds("db", (DB,)) and not store.holds("db", (KEY,))
    assert not store.holds("web", (KEY, CRT))
    assert store.loaded() == frozenset({"db"})
    assert store.unloaded(["web", "db", "never"]) == ("web", "never")


def test_no_value_is_ever_shown() -> None:
    """Neither the store's repr nor an answer's shows a value."""
    store = store_with({"db": (DB,)})
    store.replace("db", [(DB, b"hunter2")])
    answer = store.lookup("app.service", "db-password")
    assert "hunter2" not in repr(store) and "hunter2" not in repr(answer)
    assert "7 bytes" in repr(answer)


def test_lookups_while_a_refresh_replaces_always_find_a_whole_value() -> None:
    """A reader thread during 2,000 replacements always gets some version's bytes, never
    None or an error: the entry is never seen half-replaced or missing."""
    store = store_with({"web": (KEY, CRT)})
    store.replace("web", [(KEY, b"k0"), (CRT, b"c0")])
    done = threading.Event()
    seen = []

    def read() -> None:
        while not done.is_set():
            seen.append(store.value_for("nginx.service", "tls.crt"))

    reader = threading.Thread(target=read)
    reader.start()
    for version in range(1, 2000):
        store.replace("web", [(KEY, b"k%d" % version), (CRT, b"c%d" % version)])
    done.set()
    reader.join()
    assert seen and all(value is not None and value.startswith(b"c") for value in seen)
