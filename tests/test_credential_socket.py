"""The credential socket (agent.daemon.credentials) with a real client that binds the abstract
address as systemd's credential loader does (``\\0<random>/unit/<unit>/<ID>``), connects, shuts
its side for writing and reads to the end: a granted unit gets the value; anything else from the
loader is refused (journaled under the unit, then more than systemd's 1 MiB limit); a client that
is not the loader gets nothing; stuck clients are bounded; the socket is 0600, root's, and goes
at close."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import stat
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import pytest

from agent.base.errors import KvAgentError
from agent.daemon import credentials as credentials_module
from agent.daemon.credentials import (
    REFUSAL_BYTES,
    Credentials,
    CredentialSocket,
    peer_kind,
)
from agent.daemon.journal import entry_bytes
from agent.manifest import Accounts, parse_manifest
from agent.pipeline.credentials import Grant
from agent.writer.credentials import NOT_GRANTED, NOT_LOADED, UNKNOWN_ID, CredentialStore

DB = Grant("db", ("app.service", "worker@*.service"))
TLS = Grant("tls.key", ("nginx.service",))
PENDING = Grant("later", ("app.service",))
VALUE = b"s3cret-v1\n\x00binary\xff"
QUICK_S = 0.5  # a served connection takes milliseconds; this is generous on a loaded machine


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short directory (a socket's path must fit 108 bytes): the state directory."""
    path = Path(tempfile.mkdtemp(prefix="kvc-", dir="/tmp"))
    os.chmod(path, 0o711)
    yield path
    shutil.rmtree(path, ignore_errors=True)


class Journal:
    """journald's native socket, played: every datagram, parsed into fields."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(self.path)
        self._sock.settimeout(0.05)

    def entries(self) -> List[Dict[str, str]]:
        found = []
        while True:
            try:
                data = self._sock.recv(65536)
            except socket.timeout:
                return found
            found.append(dict(line.split("=", 1)
                              for line in data.decode().splitlines() if "=" in line))

    def close(self) -> None:
        self._sock.close()


@pytest.fixture
def journal(short_dir: Path) -> Iterator[Journal]:
    sink = Journal(short_dir / "journal")
    yield sink
    sink.close()


@pytest.fixture
def store() -> CredentialStore[Grant]:
    """db and tls.key loaded; 'later' declared but not loaded yet."""
    held: CredentialStore[Grant] = CredentialStore()
    held.declare({"db-entry": (DB,), "tls-entry": (TLS,), "later-entry": (PENDING,)})
    held.replace("db-entry", [(DB, VALUE)])
    held.replace("tls-entry", [(TLS, b"-----BEGIN PRIVATE KEY-----\n")])
    return held


@pytest.fixture
def serving(short_dir: Path, store: CredentialStore[Grant],
            journal: Journal) -> Iterator[CredentialSocket]:
    server = CredentialSocket(str(short_dir / "credentials.sock"), store.lookup,
                              journal_path=journal.path, timeout_s=1.0, max_connections=4)
    server.open()
    yield server
    server.close()


def loader_address(unit: str, credential_id: str) -> bytes:
    """What systemd's loader binds: NUL, 64 random bits in hex (no zero padding), the unit and
    the ID."""
    return b"\0" + f"{int.from_bytes(os.urandom(8), 'big'):x}/unit/{unit}/{credential_id}".encode()


def connect(path: str, address: Optional[object] = None) -> socket.socket:
    """A client as systemd's loader makes it (``address``: what it binds, if anything), its
    side shut for writing at once."""
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    if address is not None:
        client.bind(address)  # type: ignore[arg-type]
    client.connect(path)
    client.shutdown(socket.SHUT_WR)
    return client


def read_all(client: socket.socket, timeout_s: float = 5.0) -> bytes:
    """Everything until the server closes (as systemd reads, past its limit: to see it all)."""
    client.settimeout(timeout_s)
    chunks = []
    with client:
        while True:
            chunk = client.recv(1 << 20)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)


def load(path: str, unit: str, credential_id: str) -> bytes:
    return read_all(connect(path, loader_address(unit, credential_id)))


def timed_load(path: str, unit: str, credential_id: str) -> Tuple[bytes, float]:
    started = time.monotonic()
    data = load(path, unit, credential_id)
    return data, time.monotonic() - started


def test_a_granted_unit_gets_the_value_whole(serving: CredentialSocket,
                                             journal: Journal) -> None:
    """A unit the grant names, or a glob of it matches, reads exactly the value, then EOF;
    nothing is journaled."""
    assert load(serving.path, "app.service", "db") == VALUE
    assert load(serving.path, "worker@3.service", "db") == VALUE
    assert load(serving.path, "nginx.service", "tls.key") == b"-----BEGIN PRIVATE KEY-----\n"
    assert serving.counts() == {"served": 3, "refused": 0, "ignored": 0}
    assert journal.entries() == []


@pytest.mark.parametrize("unit, credential_id, reason", [
    ("other.service", "db", NOT_GRANTED),
    ("worker@3.socket", "db", NOT_GRANTED),
    ("nginx.service", "db", NOT_GRANTED),
    ("app.service", "tls.key", NOT_GRANTED),
    ("app.service", "nope", UNKNOWN_ID),
    ("app.service", "later", NOT_LOADED),
])
def test_the_loader_is_refused_with_more_than_systemds_limit_and_a_journal_entry(
        serving: CredentialSocket, journal: Journal, unit: str, credential_id: str,
        reason: str) -> None:
    """An ungranted unit, an unknown ID or a value not loaded yet gets 1 MiB + 1 zero bytes
    (systemd fails the unit: 243/CREDENTIALS), never the value, after one journal entry filed
    under the unit that names the ID and the reason."""
    data = load(serving.path, unit, credential_id)
    assert len(data) == REFUSAL_BYTES and not data.strip(b"\0")
    (entry,) = journal.entries()
    assert entry["OBJECT_SYSTEMD_UNIT"] == unit
    assert entry["PRIORITY"] == "4" and entry["SYSLOG_IDENTIFIER"] == "kv-agent"
    assert f"refused credential {credential_id} to {unit}: {reason}" in entry["MESSAGE"]
    assert serving.counts()["refused"] == 1


def test_each_refusal_is_journaled_and_logged_once_per_unit_and_id(
        serving: CredentialSocket, journal: Journal,
        caplog: pytest.LogCaptureFixture) -> None:
    """Every refusal reaches the unit's journal (each failed start shows why); the agent's own
    log says it once per unit and ID, with the reason and never a value."""
    caplog.set_level(logging.INFO, logger="agent.daemon.credentials")
    for _ in range(3):
        load(serving.path, "other.service", "db")
    load(serving.path, "other.service", "tls.key")
    assert len(journal.entries()) == 4
    refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert refusals == [
        f"credential db refused to other.service: {NOT_GRANTED} (logged once per unit and "
        "credential)",
        f"credential tls.key refused to other.service: {NOT_GRANTED} (logged once per unit "
        "and credential)"]
    assert VALUE.decode("latin-1") not in caplog.text


@pytest.mark.parametrize("address", [
    None,  # unbound: getpeername() is empty
    "path",  # bound to a path in the file system
    "xy/unit/app.service/db",  # a path shaped like the loader's address, bound relative
    b"\0unit/app.service/db",  # abstract, no random part
    b"\0abc/unit/app.service/db/x",  # an ID with a slash
    b"\0abc/units/app.service/db",
    b"\0abc/unit/app.service/db\0",  # a second NUL
    b"\0abc/unit/app.service/d\xc3\xa9",  # not ASCII
    b"\0abc/unit/app@.service/db",  # a template never runs
])
def test_a_client_that_is_not_the_loader_gets_nothing(
        serving: CredentialSocket, journal: Journal, short_dir: Path,
        monkeypatch: pytest.MonkeyPatch, address: Optional[object]) -> None:
    """Anything that is not systemd's credential loader's address (unbound, path-bound even
    with a path like its name, any other abstract name) is closed at once without a byte, and
    journals nothing."""
    if address == "path":
        address = str(short_dir / "client")
    elif isinstance(address, str):  # getpeername() gives 'xy/unit/app.service/db'
        (short_dir / os.path.dirname(address)).mkdir(parents=True)
        monkeypatch.chdir(short_dir)
    assert read_all(connect(serving.path, address)) == b""
    assert serving.counts() == {"served": 0, "refused": 0, "ignored": 1}
    assert journal.entries() == []


def test_ignored_clients_are_logged_once_per_kind(
        serving: CredentialSocket, short_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Two unbound clients and one bound to a path make two lines, none naming an address."""
    caplog.set_level(logging.INFO, logger="agent.daemon.credentials")
    for address in (None, None, str(short_dir / "client")):
        read_all(connect(serving.path, address))
    lines = [r.getMessage() for r in caplog.records if "not systemd's" in r.getMessage()]
    assert len(lines) == 2 and "an unbound client" in lines[0] and "path" in lines[1]
    assert peer_kind(b"\0x") == "a client with an abstract address not in systemd's form"


def test_a_rotation_is_served_to_the_next_connection(
        serving: CredentialSocket, store: CredentialStore[Grant]) -> None:
    """Once the store holds a new value, the next connection gets it."""
    assert load(serving.path, "app.service", "db") == VALUE
    store.replace("db-entry", [(DB, b"v2")])
    assert load(serving.path, "app.service", "db") == b"v2"


def test_a_stuck_client_neither_delays_others_nor_stays(serving: CredentialSocket) -> None:
    """A refused client that never reads holds one place for the timeout only; meanwhile a
    granted unit is served at once."""
    stuck = connect(serving.path, loader_address("other.service", "db"))
    try:
        time.sleep(0.1)  # the server has accepted it and filled its buffer
        data, elapsed = timed_load(serving.path, "app.service", "db")
        assert data == VALUE and elapsed < QUICK_S, elapsed
        # Closed after its 1 s: what it reads then ends short of the 1 MiB + 1 it was owed.
        time.sleep(1.5)
        assert serving.counts()["refused"] == 1
        assert len(read_all(stuck, timeout_s=5.0)) < REFUSAL_BYTES
    finally:
        stuck.close()


def test_at_most_max_connections_and_the_next_waits_instead_of_an_empty_answer(
        serving: CredentialSocket) -> None:
    """With every place held by stuck clients, a granted unit is not closed empty (that would
    start it with an empty credential): it waits in the queue and is served when a place
    frees, within the timeout."""
    stuck = [connect(serving.path, loader_address("other.service", "db")) for _ in range(4)]
    try:
        time.sleep(0.1)
        data, elapsed = timed_load(serving.path, "app.service", "db")
        assert data == VALUE
        assert 0.5 < elapsed < 1.0 + QUICK_S, elapsed  # the stuck ones' timeout, not more
    finally:
        for client in stuck:
            client.close()


def test_close_is_prompt_with_a_stuck_client_and_removes_the_socket(
        short_dir: Path, store: CredentialStore[Grant], journal: Journal) -> None:
    """close() ends the thread at once though a client is stuck mid-refusal, and the socket
    file goes: a unit starting afterwards fails to connect (fail-closed)."""
    server = CredentialSocket(str(short_dir / "credentials.sock"), store.lookup,
                              journal_path=journal.path, timeout_s=30.0)
    server.open()
    stuck = connect(server.path, loader_address("other.service", "db"))
    try:
        time.sleep(0.1)
        started = time.monotonic()
        server.close()
        assert time.monotonic() - started < QUICK_S
        assert not os.path.lexists(server.path)
        with pytest.raises(FileNotFoundError):
            connect(server.path, loader_address("app.service", "db"))
    finally:
        stuck.close()
    assert not [name for name in os.listdir(short_dir) if name.startswith(".cs-")]


def test_the_socket_is_roots_0600_and_never_wider(short_dir: Path,
                                                  store: CredentialStore[Grant]) -> None:
    """The socket is a socket, owned by the agent's user (root), mode 0600 even under a
    permissive umask; no temporary directory is left."""
    old = os.umask(0)
    try:
        server = CredentialSocket(str(short_dir / "credentials.sock"), store.lookup)
        server.open()
    finally:
        os.umask(old)
    try:
        st = os.lstat(server.path)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        assert (st.st_uid, st.st_gid) == (os.geteuid(), os.getegid())
        assert sorted(os.listdir(short_dir)) == ["credentials.sock"]
    finally:
        server.close()


def test_a_stale_socket_is_replaced_and_anything_else_refused(
        short_dir: Path, store: CredentialStore[Grant]) -> None:
    """A socket a crashed run left is replaced; a regular file, a directory or a symlink at
    the path is refused with what to do, and left as it was (the symlink not followed)."""
    path = short_dir / "credentials.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()
    server = CredentialSocket(str(path), store.lookup)
    server.open()
    try:
        assert load(server.path, "app.service", "db") == VALUE
    finally:
        server.close()
    target = short_dir / "target"
    target.write_text("keep")
    for make in (lambda: path.write_text("x"), path.mkdir,
                 lambda: path.symlink_to(target)):
        make()
        with pytest.raises(KvAgentError, match="exists and is not a socket"):
            CredentialSocket(str(path), store.lookup).open()
        assert target.read_text() == "keep"
        (path.rmdir if path.is_dir() and not path.is_symlink() else path.unlink)()


def test_close_removes_only_its_own_socket(short_dir: Path,
                                           store: CredentialStore[Grant]) -> None:
    """A socket put in its place since (another agent's) stays at close."""
    first = CredentialSocket(str(short_dir / "credentials.sock"), store.lookup)
    first.open()
    second = CredentialSocket(first.path, store.lookup)
    second.open()  # replaces the first's file
    first.close()
    assert load(second.path, "app.service", "db") == VALUE
    second.close()
    assert not os.path.lexists(second.path)


def test_a_path_too_long_for_a_socket_is_refused(store: CredentialStore[Grant]) -> None:
    """A state directory whose socket path would not fit sun_path is named, not truncated."""
    with pytest.raises(KvAgentError, match="longer than a socket address allows"):
        CredentialSocket("/tmp/" + "d" * 100 + "/credentials.sock", store.lookup).open()


def test_journal_entries_take_the_binary_form_for_a_line_feed() -> None:
    """A value with a line feed is sent as journald's binary field, the rest as KEY=VALUE."""
    assert entry_bytes({"A": "b", "M": "x\ny"}) == \
        b"A=b\nM\n" + (3).to_bytes(8, "little") + b"x\ny\n"


ACCOUNTS = Accounts(user=lambda name: 0, group=lambda name: 0)


def manifest(entries: str) -> object:
    return parse_manifest(f"vault: https://kv.vault.azure.net\ndirectory: /run/secrets\n"
                          f"secrets:\n{entries}", "m.yaml", accounts=ACCOUNTS,
                          check_filesystem=False)


FILES_ONLY = "  - {name: plain, path: plain}\n"
WITH_CREDENTIAL = FILES_ONLY + "  - {name: db, credential: {units: [app.service]}}\n"


def test_the_daemons_credentials_open_the_socket_only_for_a_manifest_with_any(
        short_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No socket for a manifest of files; one once a manifest with a credential is installed
    (the process made undumpable first), gone again when a reload drops them, and at stop;
    the store serves only what the manifest in use declares."""
    undumpable: List[bool] = []
    monkeypatch.setattr(credentials_module, "make_undumpable",
                        lambda: undumpable.append(True) or True)
    held = Credentials(str(short_dir))
    path = short_dir / "credentials.sock"
    held.install(manifest(FILES_ONLY))  # type: ignore[arg-type]
    assert not path.exists() and held.counts() is None and not undumpable
    held.install(manifest(WITH_CREDENTIAL))  # type: ignore[arg-type]
    assert stat.S_ISSOCK(os.lstat(path).st_mode) and undumpable == [True]
    assert held.counts() == {"served": 0, "refused": 0, "ignored": 0}
    held.install(manifest(FILES_ONLY))  # type: ignore[arg-type]
    assert not path.exists()
    held.install(manifest(WITH_CREDENTIAL))  # type: ignore[arg-type]
    assert path.exists() and undumpable == [True]  # once is for good
    held.stop()
    assert not path.exists()
    assert held.store.loaded() == frozenset() and held.store.lookup("app.service", "db") \
        .refusal == UNKNOWN_ID


def test_a_socket_that_cannot_be_made_stops_the_start_but_not_a_reload(
        short_dir: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """At start the agent cannot serve: an error (the operator sees it at once); at a reload
    the files go on being served, and the error is logged."""
    monkeypatch.setattr(credentials_module, "make_undumpable", lambda: True)
    (short_dir / "credentials.sock").write_text("not a socket")
    with pytest.raises(KvAgentError, match="not a socket"):
        Credentials(str(short_dir)).install(manifest(WITH_CREDENTIAL))  # type: ignore[arg-type]
    held = Credentials(str(short_dir))
    held.install(manifest(FILES_ONLY))  # type: ignore[arg-type]
    held.install(manifest(WITH_CREDENTIAL))  # type: ignore[arg-type]
    assert "units that load credentials fail to start" in caplog.text
    held.stop()


def test_many_loaders_at_once_are_all_answered(serving: CredentialSocket) -> None:
    """Twenty units starting together (more than the four places) each get their answer."""
    results: Dict[int, bytes] = {}

    def one(index: int) -> None:
        results[index] = load(serving.path, f"worker@{index}.service", "db")

    threads = [threading.Thread(target=one, args=(index,)) for index in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert results == {index: VALUE for index in range(20)}

