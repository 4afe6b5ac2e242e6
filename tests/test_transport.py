"""agent.base.transport is the one place that sends HTTP and reads bodies (issue 10)."""

from __future__ import annotations

import os
import re
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest
import requests
from hostile import HostileServer, answer, response

from agent.base import transport
from agent.base.transport import RequestCounts
from agent.emulator import generate_certificates
from agent.identity.selector import Identity
from agent.identity.tokens import token_source
from agent.vault.client import new_session

AGENT = Path(__file__).resolve().parent.parent / "agent"
# Sending a request or reading a response body by any other road than
# transport.bounded_get would skip its size and total-time bounds.
HTTP_USE = re.compile(
    r"\bsession\.(get|post|request|send)\(|\brequests\.(get|post|request)\(|"
    r"\.iter_content\(|\.raw\.(read|stream)\(|\.json\(\)|\burlopen\(")


def test_only_transport_sends_requests_and_reads_bodies() -> None:
    """Identity and vault code reach the network only through transport.bounded_get (the
    emulator and demo, which serve or drive it, are not the agent's path)."""
    offenders = []
    for path in sorted(AGENT.rglob("*.py")):
        relative = path.relative_to(AGENT).as_posix()
        if relative == "base/transport.py" or relative.startswith("emulator/"):
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if HTTP_USE.search(line):
                offenders.append(f"agent/{relative}:{number}: {line.strip()}")
    assert offenders == []
    uses = {path.relative_to(AGENT).as_posix() for path in AGENT.rglob("*.py")
            if "bounded_get(" in path.read_text()}
    assert {"identity/request.py", "vault/client.py"} <= uses


def _get(session: "requests.Session", url: str, total_s: float = 5.0) -> None:
    try:
        transport.bounded_get(session, url, params={}, headers={}, timeout=(1.0, 1.0),
                              total_s=total_s, max_bytes=16)
    except requests.RequestException:
        pass


def _delta(before: Dict[Tuple[str, str, str], int]) -> Dict[Tuple[str, str, str], int]:
    after = transport.REQUESTS.snapshot()
    return {key: count - before.get(key, 0) for key, count in after.items()
            if count != before.get(key, 0)}


def test_every_request_is_counted_by_target_host_and_code() -> None:
    """bounded_get counts each request once under its session's target, the host and the
    status code (kept when the body then fails), `error` when refused and `timeout` when
    no answer came in time (the kv_agent_requests_total metric)."""
    with HostileServer(answer(response(200, b"ok")), answer(response(503)),
                       answer(response(200, b"x" * 100)), tls=False) as server, \
            HostileServer(lambda server, conn, index: server.stopping.wait(5),
                          tls=False) as silent:
        refused = socket.socket()
        refused.bind(("127.0.0.1", 0))  # bound, never listening: connection refused
        refused_port = refused.getsockname()[1]
        session = transport.new_session(1, target="vault")
        before = transport.REQUESTS.snapshot()
        host = f"127.0.0.1:{server.port}"
        for _ in range(3):  # 200, 503, then 200 with a body over max_bytes
            _get(session, f"http://{host}/secrets/x")
        _get(session, f"http://user:pw@127.0.0.1:{refused_port}/")
        _get(transport.new_session(1, target="imds"), f"http://127.0.0.1:{silent.port}/",
             total_s=0.5)
        _get(requests.Session(), f"http://{host}/")
        refused.close()
    assert _delta(before) == {
        ("vault", host, "200"): 2, ("vault", host, "503"): 1,
        ("vault", f"127.0.0.1:{refused_port}", "error"): 1,
        ("imds", f"127.0.0.1:{silent.port}", "timeout"): 1,
        ("other", host, "200"): 1}


def test_counting_is_thread_safe() -> None:
    """Counts from many threads at once add up exactly."""
    counts = RequestCounts()

    def add() -> None:
        for _ in range(2000):
            counts.add("vault", "kv", "200")

    threads = [threading.Thread(target=add) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert counts.snapshot() == {("vault", "kv", "200"): 16000}


def test_identity_and_vault_sessions_count_under_their_target() -> None:
    """The vault's session counts as `vault`, the identity session as its source (`imds`)."""
    assert new_session({}).target == "vault"
    cache = token_source(Identity(), {"KV_AGENT_IMDS_ENDPOINT": "http://127.0.0.1:9/x"},
                         exists=lambda path: False)
    assert cache._session.target == "imds"


def _silent(server: HostileServer, conn: socket.socket, index: int) -> None:
    """Read the request, then neither answer nor close (a vault that hangs)."""
    server.stopping.wait(server.give_up_s)


def test_abort_ends_a_request_that_neither_answers_nor_fails_and_refuses_new_ones() -> None:
    """transport.abort shuts down the socket of a request blocked on a silent server, which
    raises AbortedError at once (not after its 20-s read timeout), and every later request
    on the session fails unsent (issue 17 item 25)."""
    with HostileServer(_silent, tls=False, give_up_s=30) as server:
        session = transport.new_session(2, target="vault")
        outcome: Dict[str, BaseException] = {}

        def get() -> None:
            try:
                transport.bounded_get(session, f"http://127.0.0.1:{server.port}/secrets/a",
                                      params={}, headers={}, timeout=(5.0, 20.0), total_s=30.0,
                                      max_bytes=1024)
            except BaseException as exc:  # noqa: BLE001 - the test inspects it
                outcome["error"] = exc

        thread = threading.Thread(target=get)
        thread.start()
        deadline = time.monotonic() + 5
        while not server.seen and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.seen, "the request never arrived"
        aborted_at = time.monotonic()
        assert transport.abort(session) == 1
        thread.join(5)
        assert not thread.is_alive() and time.monotonic() - aborted_at < 1.0
        assert isinstance(outcome.get("error"), transport.AbortedError), outcome
        with pytest.raises(transport.AbortedError):
            transport.bounded_get(session, f"http://127.0.0.1:{server.port}/secrets/b",
                                  params={}, headers={}, timeout=(5.0, 20.0), total_s=30.0,
                                  max_bytes=1024)
        assert len(server.seen) == 1


def test_requests_share_one_deadline_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ten requests start at most one thread between them (the deadline watchdog), not
    a timer thread each: that cost a fifth of `once`'s CPU for 1,000 secrets."""
    started: List[str] = []
    real_start = threading.Thread.start
    client = threading.current_thread()

    def counting_start(thread: threading.Thread) -> None:
        if threading.current_thread() is client:  # not the server's own threads
            started.append(thread.name)
        real_start(thread)

    with HostileServer(*[answer(response(200, b"ok")) for _ in range(10)],
                       tls=False) as server:
        session = transport.new_session(1)
        _get(session, f"http://127.0.0.1:{server.port}/")  # the watchdog, if not yet running
        monkeypatch.setattr(threading.Thread, "start", counting_start)
        for _ in range(9):
            _get(session, f"http://127.0.0.1:{server.port}/")
    assert started == []


def test_a_silent_server_is_cut_at_the_deadline_in_a_forked_child() -> None:
    """A child forked after requests were made still has its requests cut at their total
    deadline (the watchdog thread is not copied by fork: the child starts its own)."""
    with HostileServer(answer(response(200, b"ok")),
                       lambda server, conn, index: server.stopping.wait(10),
                       tls=False) as server:
        _get(transport.new_session(1), f"http://127.0.0.1:{server.port}/")
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 1
            try:
                started = time.monotonic()
                transport.bounded_get(transport.new_session(1), f"http://127.0.0.1:{server.port}/",
                                      params={}, headers={}, timeout=(5.0, 5.0), total_s=0.5,
                                      max_bytes=16)
            except transport.DeadlineExceededError:
                code = 0 if time.monotonic() - started < 3.0 else 2
            except BaseException:
                code = 3
            os._exit(code)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def _tls_get(session: "requests.Session", url: str) -> int:
    """The status of one bounded GET of ``url``; raises as bounded_get does."""
    reply = transport.bounded_get(session, url, params={}, headers={}, timeout=(2.0, 2.0),
                                  total_s=5.0, max_bytes=64)
    return reply.status


def test_a_session_parses_its_ca_bundle_once_for_all_its_connections(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Five HTTPS connections of one session load the CA bundle once, into one shared TLS
    context, not once each (16 copies of a public bundle were ~11 MiB of a vault's pool)."""
    loads: List[object] = []
    real_load = ssl.SSLContext.load_verify_locations

    def counting_load(context: ssl.SSLContext, *args: Any, **kwargs: Any) -> None:
        loads.append(args or kwargs)
        real_load(context, *args, **kwargs)

    monkeypatch.setattr(ssl.SSLContext, "load_verify_locations", counting_load)
    with HostileServer(answer(response(200, b"ok"))) as server:  # each answer closes
        session = transport.new_session(4)
        session.verify = server.ca_path
        assert [_tls_get(session, f"{server.url}/{n}") for n in range(5)] == [200] * 5
        assert server.connections == 5
    assert len(loads) == 1


def test_the_shared_tls_context_refuses_what_a_fresh_one_refuses(tmp_path: Path) -> None:
    """Over the shared context a server is still refused when another CA signed its
    certificate or when its certificate names another host."""
    other = generate_certificates(str(tmp_path), hostnames=[])  # 127.0.0.1 and localhost
    with HostileServer(answer(response(200, b"ok"))) as stranger, \
            HostileServer(answer(response(200, b"ok")), host="127.0.0.2") as misnamed:
        session = transport.new_session(4)
        session.verify = other.ca_cert
        with pytest.raises(requests.exceptions.SSLError):
            _tls_get(session, f"{stranger.url}/")
        # A certificate signed by the trusted CA, but for 127.0.0.1 and localhost only.
        misnamed._context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        misnamed._context.load_cert_chain(other.server_cert, other.server_key)
        with pytest.raises(requests.exceptions.SSLError, match="(?i)mismatch|match"):
            _tls_get(session, f"{misnamed.url}/")


def test_a_ca_bundle_replaced_on_disk_verifies_the_next_connection(tmp_path: Path) -> None:
    """The shared context follows its CA bundle: once the file is replaced, the next
    connection trusts the new bundle's CA and no longer the old one's."""
    bundle = tmp_path / "ca.pem"
    with HostileServer(answer(response(200, b"ok"))) as first, \
            HostileServer(answer(response(200, b"ok"))) as second:
        bundle.write_bytes(Path(first.ca_path).read_bytes())
        session = transport.new_session(4)
        session.verify = str(bundle)
        assert _tls_get(session, f"{first.url}/") == 200
        replacement = tmp_path / "ca.pem.new"
        replacement.write_bytes(Path(second.ca_path).read_bytes())
        os.replace(replacement, bundle)
        assert _tls_get(session, f"{second.url}/") == 200
        with pytest.raises(requests.exceptions.SSLError):
            _tls_get(session, f"{first.url}/")


def test_the_default_bundle_is_requests_own_and_parsed_once(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """With no CA bundle named (verify=True, as on a VM) connections trust requests' own
    default bundle, parsed once for all of them (a local test CA is then refused)."""
    loads: List[object] = []
    real_load = ssl.SSLContext.load_verify_locations

    def counting_load(context: ssl.SSLContext, *args: Any, **kwargs: Any) -> None:
        loads.append(kwargs.get("cafile", args[0] if args else None))
        real_load(context, *args, **kwargs)

    monkeypatch.setattr(ssl.SSLContext, "load_verify_locations", counting_load)
    with HostileServer(answer(response(200, b"ok"))) as server:
        session = transport.new_session(4)
        for _ in range(3):
            with pytest.raises(requests.exceptions.SSLError):
                _tls_get(session, f"{server.url}/")
    assert loads == [requests.utils.DEFAULT_CA_BUNDLE_PATH]
