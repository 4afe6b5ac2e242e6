"""``kv-agent doctor``'s credential link (issue 19): the agent's socket, and each
granted unit's ``LoadCredential=``, with systemd's answers injected.

The busctl and systemctl texts below are real: captured verbatim on Debian 12
(systemd 252.39) and Debian 13 (systemd 257.13) in nspawn containers, from units
with two ``LoadCredential=`` lines, none, a line without a path, template
instances (one with an escaped ``\\x2d``), a socket unit and a unit that does
not exist. The two versions answered alike but for the order of the pairs.
"""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import pytest
from test_doctor import Doctor
from test_manifest import ACCOUNTS

from agent.doctor.credential_links import (
    MAX_UNITS,
    UnitProbe,
    check_credentials,
    check_socket,
    edit_target,
    object_path,
    parse_load_credentials,
    parse_load_state,
    parse_strings,
    parse_unit_list,
    socket_path,
)
from agent.doctor.machine import Host, Reply
from agent.doctor.report import FAIL, OK, WARN, Check, Report
from agent.emulator import Emulator
from agent.manifest import Manifest, parse_manifest
from agent.pipeline.credentials import Grant

SOCK = "/run/kv-agent/credentials.sock"
HEAD = "vault: https://kv.vault.azure.net\nsecrets:\n"

# -- real answers (252 and 257) ---------------------------------------------------------

TWO_LINES_252 = ('{"type":"a(ss)","data":[["tls.key","/etc/other/key.pem"],'
                 '["db-password","/run/kv-agent/credentials.sock"]]}\n')
TWO_LINES_257 = ('{"type":"a(ss)","data":[["db-password","/run/kv-agent/credentials.sock"],'
                 '["tls.key","/etc/other/key.pem"]]}\n')
ONE_LINE = '{"type":"a(ss)","data":[["db-password","/run/kv-agent/credentials.sock"]]}\n'
NO_LINE = '{"type":"a(ss)","data":[]}\n'
# LoadCredential=onlyid (no path: from the credential store) and a path with a space.
NO_PATH = '{"type":"a(ss)","data":[["spaced","/run/a b/c"],["onlyid","onlyid"]]}\n'
# busctl without --json: the form doctor does not parse.
PLAIN_TEXT = 'a(ss) 2 "tls.key" "/etc/other/key.pem" "db-password" "/run/kv-agent/credentials.sock"\n'
LOADED = '{"type":"s","data":"loaded"}\n'
NOT_FOUND = '{"type":"s","data":"not-found"}\n'
MASKED = '{"type":"s","data":"masked"}\n'
BAD_SETTING = '{"type":"s","data":"bad-setting"}\n'
AFTER_AGENT = ('{"type":"as","data":["network.target","systemd-journald.socket","basic.target",'
               '"kv-agent.service","sysinit.target","system.slice"]}\n')
AFTER_BASIC = ('{"type":"as","data":["basic.target","system.slice","sysinit.target",'
               '"systemd-journald.socket"]}\n')
LIST_WORKERS = ("app.service           loaded failed failed app.service\n"
                "worker@1.service      loaded failed failed worker@1.service\n"
                "worker@a\\x2db.service loaded failed failed worker@a\\x2db.service\n")
LIST_MIXED = (
    "home.mount                                                        not-found inactive dead"
    "      home.mount\n"
    "run-credentials-systemd\\x2dsysctl.service.mount                   loaded    active   "
    "mounted   /run/credentials/systemd-sysctl.service\n"
    "getty@tty1.service                                                loaded    inactive dead"
    "      Getty on tty1\n")
INTERFACES = {"service": "Service", "socket": "Socket", "timer": "Timer"}
NO_AFTER = '{"type":"as","data":[]}\n'
UNKNOWN_INTERFACE = ("Failed to get property LoadCredential on interface "
                     "org.freedesktop.systemd1.Service: Unknown interface "
                     "org.freedesktop.systemd1.Service or property LoadCredential.")


class FakeSystemd:
    """systemd as busctl and systemctl answer it: per unit its LoadState,
    LoadCredential and After answers (a str, or a Reply for a failure), any
    other unit not found; the argv of every question asked, in order."""

    def __init__(self, units: Dict[str, Dict[str, object]], listed: str = "") -> None:
        self.units = units
        self.listed = listed
        self.asked: List[Tuple[str, ...]] = []

    def __call__(self, argv: Sequence[str]) -> Reply:
        self.asked.append(tuple(argv))
        if argv[0] == "systemctl":
            assert list(argv[:7]) == ["systemctl", "list-units", "--all", "--plain",
                                      "--no-legend", "--full", "--"]
            return Reply(self.listed)
        assert list(argv[:5]) == ["busctl", "--json=short", "get-property",
                                  "org.freedesktop.systemd1",
                                  argv[4]] and argv[4].startswith(
            "/org/freedesktop/systemd1/unit/")
        # As systemd does, a unit it does not know answers too: not-found, no credential.
        found = [name for name in self.units if object_path(name) == argv[4]]
        name = found[0] if found else "unknown.service"
        properties = self.units[found[0]] if found else unit(NO_LINE, NO_AFTER, NOT_FOUND)
        interface = INTERFACES[name.rpartition(".")[2]] if argv[6] == "LoadCredential" \
            else "Unit"
        if argv[5] != f"org.freedesktop.systemd1.{interface}":
            return Reply(None, f"Failed to get property {argv[6]} on interface {argv[5]}: "
                         f"Unknown interface {argv[5]} or property {argv[6]}.")
        answer = properties.get(argv[6], Reply(None, f"no {argv[6]} in this test"))
        return answer if isinstance(answer, Reply) else Reply(str(answer))


def unit(load_credential: object = ONE_LINE, after: object = AFTER_AGENT,
         state: object = LOADED) -> Dict[str, object]:
    return {"LoadState": state, "LoadCredential": load_credential, "After": after}


def probe(systemd: FakeSystemd, *grants: Grant) -> List[Check]:
    return UnitProbe(systemd, SOCK).check(grants)


def load(body: str) -> Manifest:
    return parse_manifest(HEAD + body, "m.yaml", accounts=ACCOUNTS, check_filesystem=False)


# -- the pure parts ---------------------------------------------------------------------


@pytest.mark.parametrize("name, path", [
    ("app.service", "/org/freedesktop/systemd1/unit/app_2eservice"),
    ("worker@1.service", "/org/freedesktop/systemd1/unit/worker_401_2eservice"),
    ("worker@a\\x2db.service", "/org/freedesktop/systemd1/unit/worker_40a_5cx2db_2eservice"),
    ("1digit.service", "/org/freedesktop/systemd1/unit/_31digit_2eservice"),
    ("sock.socket", "/org/freedesktop/systemd1/unit/sock_2esocket"),
    ("", "/org/freedesktop/systemd1/unit/_"),
])
def test_object_path_escapes_as_systemds_bus_label_escape(name: str, path: str) -> None:
    """Every byte outside [A-Za-z0-9], and a leading digit, becomes _xx (the paths systemd answered)."""
    assert object_path(name) == path


@pytest.mark.parametrize("text, pairs", [
    (TWO_LINES_252, (("tls.key", "/etc/other/key.pem"), ("db-password", SOCK))),
    (TWO_LINES_257, (("db-password", SOCK), ("tls.key", "/etc/other/key.pem"))),
    (NO_LINE, ()),
    (NO_PATH, (("spaced", "/run/a b/c"), ("onlyid", "onlyid"))),
])
def test_load_credential_pairs_are_read_from_busctls_json(
        text: str, pairs: Tuple[Tuple[str, str], ...]) -> None:
    """busctl's a(ss) answer becomes (ID, path) pairs in its order; a line without a path has its ID."""
    assert parse_load_credentials(text) == pairs


@pytest.mark.parametrize("text", [
    PLAIN_TEXT, "", "null", '{"type":"a(ss)"}', '{"type":"a(say)","data":[]}',
    '{"type":"a(ss)","data":{}}', '{"type":"a(ss)","data":[["only-one"]]}',
    '{"type":"a(ss)","data":[["id",7]]}', LOADED,
])
def test_any_other_answer_is_refused_not_guessed(text: str) -> None:
    """Not busctl's JSON, another type or items that are not two strings: ValueError."""
    with pytest.raises(ValueError):
        parse_load_credentials(text)


def test_load_state_and_after_are_read_from_busctls_json() -> None:
    """LoadState is an s, After= an as; each refuses the other's type."""
    assert parse_load_state(NOT_FOUND) == "not-found" and parse_load_state(LOADED) == "loaded"
    assert "kv-agent.service" in parse_strings(AFTER_AGENT)
    with pytest.raises(ValueError):
        parse_load_state(AFTER_AGENT)
    with pytest.raises(ValueError):
        parse_strings(LOADED)


def test_list_units_gives_each_units_name_and_load_state() -> None:
    """The first two fields of list-units' plain lines; escaped names kept as systemd spells them."""
    assert parse_unit_list(LIST_WORKERS) == [
        ("app.service", "loaded"), ("worker@1.service", "loaded"),
        ("worker@a\\x2db.service", "loaded")]
    assert parse_unit_list(LIST_MIXED)[0] == ("home.mount", "not-found")
    assert parse_unit_list("\n  \n● not a unit\n") == []


def test_an_instance_is_fixed_in_its_template() -> None:
    """systemctl edit on the template gives every instance the line."""
    assert edit_target("worker@1.service") == "worker@.service"
    assert edit_target("app.service") == "app.service"
    assert edit_target("sock.socket") == "sock.socket"


def test_the_socket_is_in_the_state_directory() -> None:
    """$KV_AGENT_STATE_DIR/credentials.sock, else /run/kv-agent/credentials.sock."""
    assert socket_path({}) == SOCK
    assert socket_path({"KV_AGENT_STATE_DIR": "/run/other"}) == "/run/other/credentials.sock"


# -- the units ----------------------------------------------------------------------------


def test_a_unit_with_the_right_line_passes() -> None:
    """Every granted ID loaded from the socket, ordered after kv-agent: OK, naming the IDs."""
    systemd = FakeSystemd({"app.service": unit(TWO_LINES_257)})
    (check,) = probe(systemd, Grant("db-password", ("app.service",)))
    assert check == Check("unit app.service", "credentials", OK, f"loads db-password from {SOCK}")


def test_a_unit_without_the_line_fails_with_the_exact_line_to_add() -> None:
    """A granted ID the unit does not load: FAIL, the line and the drop-in command."""
    systemd = FakeSystemd({"app.service": unit(NO_LINE)})
    (check,) = probe(systemd, Grant("db-password", ("app.service",)))
    assert check.state == FAIL and check.subject == "unit app.service"
    assert check.detail == f"does not load from {SOCK}: db-password (no LoadCredential= line)"
    assert check.fix == ("systemctl edit app.service, add under [Service]: "
                         f"LoadCredential=db-password:{SOCK}; then systemctl restart app.service")


def test_a_unit_loading_the_id_from_elsewhere_fails_and_names_where() -> None:
    """LoadCredential=tls.key:/etc/other/key.pem is not the socket: FAIL, its path named, the line given."""
    systemd = FakeSystemd({"nginx.service": unit(TWO_LINES_252)})
    (check,) = probe(systemd, Grant("tls.key", ("nginx.service",)),
                     Grant("db-password", ("nginx.service",)))
    assert check.state == FAIL
    assert check.detail == f"does not load from {SOCK}: tls.key (its line loads /etc/other/key.pem)"
    assert f"add under [Service]: LoadCredential=tls.key:{SOCK};" in (check.fix or "")


def test_every_missing_id_gets_its_line_and_a_missing_order_its_own() -> None:
    """Two IDs missing and no After=kv-agent.service: both lines, then Wants= and After=."""
    systemd = FakeSystemd({"app.service": unit(NO_PATH, after=AFTER_BASIC)})
    (check,) = probe(systemd, Grant("db-password", ("app.service",)),
                     Grant("api", ("app.service",)))
    assert check.fix == (
        f"systemctl edit app.service, add under [Service]: LoadCredential=db-password:{SOCK} "
        f"and LoadCredential=api:{SOCK}, and under [Unit]: Wants=kv-agent.service and "
        "After=kv-agent.service; then systemctl restart app.service")


def test_a_unit_not_ordered_after_the_agent_is_warned() -> None:
    """The right line without After=kv-agent.service: WARN (at boot it may ask too early)."""
    systemd = FakeSystemd({"app.service": unit(ONE_LINE, after=AFTER_BASIC)})
    (check,) = probe(systemd, Grant("db-password", ("app.service",)))
    assert check.state == WARN and "not ordered after kv-agent.service" in check.detail
    assert check.fix == ("systemctl edit app.service, add under [Unit]: "
                         "Wants=kv-agent.service and After=kv-agent.service")


def test_a_socket_path_spelt_otherwise_is_the_same_socket() -> None:
    """/run/kv-agent//credentials.sock names the socket too."""
    answer = '{"type":"a(ss)","data":[["db-password","/run/kv-agent//credentials.sock"]]}'
    systemd = FakeSystemd({"app.service": unit(answer)})
    (check,) = probe(systemd, Grant("db-password", ("app.service",)))
    assert check.state == OK


def test_a_glob_matching_two_units_checks_each_and_fixes_the_template() -> None:
    """worker@*.service: the loaded instances list-units gives, each checked; the fix edits worker@.service."""
    systemd = FakeSystemd({"worker@1.service": unit(ONE_LINE),
                           "worker@a\\x2db.service": unit(NO_LINE)}, listed=LIST_WORKERS)
    checks = probe(systemd, Grant("db-password", ("worker@*.service",)))
    assert [(check.subject, check.state) for check in checks] == [
        ("unit worker@1.service", OK), ("unit worker@a\\x2db.service", FAIL)]
    assert (checks[1].fix or "").startswith("systemctl edit worker@.service, add under [Service]:")
    # The name holds a backslash: quoted for the shell.
    assert (checks[1].fix or "").endswith("systemctl restart 'worker@a\\x2db.service'")
    assert systemd.asked[0][-1] == "worker@*.service"  # one listing, of the glob only
    # A glob-matched unit is loaded already: its LoadState is not asked.
    assert not any("LoadState" in argv for argv in systemd.asked)


def test_a_unit_two_grants_match_is_checked_once_for_both_ids() -> None:
    """app.service by name and by a glob: one check, both IDs."""
    systemd = FakeSystemd({"app.service": unit(TWO_LINES_252)},
                          listed="app.service loaded active running app\n")
    checks = probe(systemd, Grant("db-password", ("app.service",)),
                   Grant("tls.key", ("app*.service",)))
    assert [check.subject for check in checks] == ["unit app.service"]
    assert checks[0].state == FAIL and "tls.key" in checks[0].detail


def test_a_glob_matching_no_loaded_unit_is_a_note() -> None:
    """No instance loaded now (not-found ones do not count): OK, said so, not a failure."""
    systemd = FakeSystemd({}, listed=LIST_MIXED)
    (check,) = probe(systemd, Grant("db-password", ("worker@*.service",)))
    assert check.state == OK and check.subject == "units worker@*.service"
    assert "no unit matching worker@*.service is loaded now" in check.detail


def test_a_unit_that_does_not_exist_is_a_note_with_the_line_it_will_need() -> None:
    """LoadState not-found: WARN (it may be installed later), never FAIL; its LoadCredential= not asked."""
    systemd = FakeSystemd({"app.service": unit(NO_LINE, state=NOT_FOUND)})
    (check,) = probe(systemd, Grant("db-password", ("app.service",)))
    assert check.state == WARN and check.name == "exists"
    assert check.fix == (f"when you create it, give it LoadCredential=db-password:{SOCK} and "
                         "After=kv-agent.service")
    assert [argv[-1] for argv in systemd.asked] == ["LoadState"]


@pytest.mark.parametrize("state, fix", [
    (MASKED, "systemctl unmask app.service, if it should run"),
    (BAD_SETTING, "systemctl status app.service says why"),
])
def test_a_unit_systemd_cannot_load_is_warned(state: str, fix: str) -> None:
    """masked, bad-setting: WARN, with what to do."""
    systemd = FakeSystemd({"app.service": unit(state=state)})
    (check,) = probe(systemd, Grant("db-password", ("app.service",)))
    assert (check.state, check.fix) == (WARN, fix)


def test_a_socket_unit_is_read_on_its_own_interface() -> None:
    """sock.socket's LoadCredential= is on org.freedesktop.systemd1.Socket; its fix says [Socket]."""
    systemd = FakeSystemd({"sock.socket": unit(NO_LINE)})
    (check,) = probe(systemd, Grant("db-password", ("sock.socket",)))
    asked = [argv for argv in systemd.asked if argv[-1] == "LoadCredential"]
    assert asked[0][5] == "org.freedesktop.systemd1.Socket"
    assert "add under [Socket]:" in (check.fix or "")


def test_a_unit_that_runs_nothing_cannot_load_a_credential() -> None:
    """A .timer starts no process: WARN, grant the service instead; nothing more asked."""
    systemd = FakeSystemd({"tmr.timer": unit()})
    (check,) = probe(systemd, Grant("db-password", ("tmr.timer",)))
    assert check.state == WARN and check.fix == "grant the service it starts instead"
    assert [argv[-1] for argv in systemd.asked] == ["LoadState"]


def test_an_instance_too_long_with_its_id_fails() -> None:
    """A glob-matched instance whose name and ID overflow the peer address: FAIL, shorter ID."""
    long_unit = "worker@" + "i" * 70 + ".service"
    systemd = FakeSystemd({long_unit: unit()}, listed=f"{long_unit} loaded active running w\n")
    (check,) = probe(systemd, Grant("db-password", ("worker@*.service",)))
    assert check.state == FAIL and "characters together" in check.detail
    assert not any(argv[-1] == "LoadCredential" for argv in systemd.asked)


def test_busctl_failing_is_a_warning_with_its_words() -> None:
    """busctl exits non-zero: WARN with its first error line, escaped; not a failure."""
    systemd = FakeSystemd({"app.service": unit(Reply(None, UNKNOWN_INTERFACE + "\x1b[2J"))})
    (check,) = probe(systemd, Grant("db-password", ("app.service",)))
    assert check.state == WARN and check.detail.startswith("cannot read its LoadCredential=: ")
    assert "\x1b" not in check.detail and "Unknown interface" in check.detail


def test_an_unexpected_answer_is_a_warning() -> None:
    """busctl's plain text (or anything not its JSON): WARN, never a traceback."""
    systemd = FakeSystemd({"app.service": unit(PLAIN_TEXT)})
    (check,) = probe(systemd, Grant("db-password", ("app.service",)))
    assert check.state == WARN and "unexpected" in check.detail


def test_once_systemd_times_out_it_is_asked_nothing_more() -> None:
    """A timeout: that unit warns, the next ones are not asked (doctor stays bounded)."""
    timeout = Reply(None, "busctl gave no answer within 3 s", is_timeout=True)
    systemd = FakeSystemd({"a.service": unit(state=timeout), "b.service": unit(),
                           "c.service": unit()})
    checks = probe(systemd, Grant("db-password", ("a.service", "b.service", "c.service")))
    assert [check.state for check in checks] == [WARN, WARN, WARN]
    assert "no answer within 3 s" in checks[0].detail
    assert all("not checked" in check.detail for check in checks[1:])
    assert len(systemd.asked) == 1


def test_listing_failing_is_a_warning_and_the_literals_are_still_checked() -> None:
    """list-units without an answer: one WARN for the globs; named units checked as usual."""
    def ask(argv: Sequence[str]) -> Reply:
        if argv[0] == "systemctl":
            return Reply(None, "Failed to connect to bus: No such file or directory")
        return inner(argv)
    inner = FakeSystemd({"app.service": unit()})
    checks = UnitProbe(ask, SOCK).check([Grant("db-password", ("app.service",
                                                               "worker@*.service"))])
    assert [(check.subject, check.state) for check in checks] == [
        ("credentials", WARN), ("unit app.service", OK)]
    assert "cannot list the units matching worker@*.service" in checks[0].detail


def test_the_units_asked_are_bounded() -> None:
    """More than MAX_UNITS units: the first MAX_UNITS checked, then one WARN."""
    names = [f"w@{index}.service" for index in range(MAX_UNITS + 5)]
    systemd = FakeSystemd({name: unit() for name in names},
                          listed="".join(f"{name} loaded active running w\n" for name in names))
    checks = probe(systemd, Grant("db-password", ("w@*.service",)))
    assert len(checks) == MAX_UNITS + 1 and checks[-1].detail.startswith("5 more granted units")
    assert len(systemd.asked) == 1 + 2 * MAX_UNITS


def test_only_names_and_paths_are_asked_never_a_value() -> None:
    """doctor reads LoadState, LoadCredential and After, never SetCredential= (which holds values)."""
    systemd = FakeSystemd({"app.service": unit(), "worker@1.service": unit()},
                          listed=LIST_WORKERS)
    probe(systemd, Grant("db-password", ("app.service", "worker@*.service")))
    assert {argv[-1] for argv in systemd.asked if argv[0] == "busctl"} == {
        "LoadState", "LoadCredential", "After"}


# -- the socket -----------------------------------------------------------------------


def _stat(mode: int, uid: int = 0) -> os.stat_result:
    return os.stat_result((mode, 1, 1, 1, uid, 0, 0, 0, 0, 0))


def _lstat(result: Optional[os.stat_result]) -> Callable[[str], os.stat_result]:
    def lstat(path: str) -> os.stat_result:
        if result is None:
            raise FileNotFoundError(2, "No such file or directory", path)
        return result
    return lstat


SOCKET_0600 = _stat(stat.S_IFSOCK | 0o600)


@pytest.mark.parametrize("found, running, state, words", [
    (SOCKET_0600, True, OK, "a socket, root's, mode 0600"),
    (SOCKET_0600, None, OK, "a socket, root's, mode 0600"),
    (_stat(stat.S_IFSOCK | 0o666), True, FAIL, "mode 0666: other users can connect"),
    (_stat(stat.S_IFSOCK | 0o660), True, FAIL, "mode 0660"),
    (_stat(stat.S_IFSOCK | 0o600, uid=1000), True, FAIL, "belongs to uid 1000, not root"),
    (_stat(stat.S_IFREG | 0o600), True, FAIL, "is not a socket"),
    (None, True, FAIL, "kv-agent runs but"),
    (None, False, WARN, "kv-agent is not running: it creates"),
    (None, None, WARN, "whether kv-agent runs is unknown"),
    (SOCKET_0600, False, WARN, "left from an earlier run"),
])
def test_the_socket_is_root_only_while_the_agent_runs(
        found: Optional[os.stat_result], running: Optional[bool], state: str,
        words: str) -> None:
    """The socket's kind, owner and mode, judged with whether the agent runs."""
    check = check_socket(SOCK, running, _lstat(found))
    assert (check.subject, check.name, check.state) == ("credentials", "socket", state)
    assert words in check.detail
    assert state == OK or check.fix


def test_a_real_socket_and_a_real_file_are_told_apart(tmp_path: Path) -> None:
    """With the real lstat: a bound AF_UNIX socket is judged on owner and mode, a file is no socket."""
    path = str(tmp_path / "credentials.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        server.bind(path)
        os.chmod(path, 0o600)
        check = check_socket(path, True)
        assert check.state == (OK if os.geteuid() == 0 else FAIL)
        os.chmod(path, 0o606)
        assert "mode 0606" in check_socket(path, True).detail
    finally:
        server.close()
    os.unlink(path)
    Path(path).write_text("not a socket")
    assert "is not a socket" in check_socket(path, True).detail


# -- the link -------------------------------------------------------------------------


MANIFEST = ("  - name: db-password\n"
            "    credential: {units: [app.service, \"worker@*.service\"]}\n"
            "  - name: api\n")


def test_a_manifest_without_credentials_adds_no_check() -> None:
    """No credential: nothing asked, nothing said."""
    def never(argv: Sequence[str]) -> Reply:
        raise AssertionError(f"asked {argv}")
    assert check_credentials(load("  - name: api\n"), {}, Host(systemd=never)) == []


def test_without_systemd_the_socket_is_checked_and_the_units_are_not(tmp_path: Path) -> None:
    """No systemd (a container): the socket's check, then one WARN; systemd never asked."""
    def never(argv: Sequence[str]) -> Reply:
        raise AssertionError(f"asked {argv}")
    environ = {"KV_AGENT_STATE_DIR": str(tmp_path)}
    checks = check_credentials(load(MANIFEST), environ,
                               Host(is_systemd=lambda: False, systemd=never))
    assert [(check.name, check.state) for check in checks] == [("socket", WARN), ("units", WARN)]
    assert checks[0].detail.startswith(
        f"kv-agent is not running: it creates {tmp_path}/credentials.sock at start")


def test_the_link_checks_the_socket_then_each_unit(tmp_path: Path) -> None:
    """The socket in the state directory, then each granted unit against that path."""
    sock = f"{tmp_path}/credentials.sock"
    answer = f'{{"type":"a(ss)","data":[["db-password","{sock}"]]}}'
    systemd = FakeSystemd({"app.service": unit(answer), "worker@1.service": unit(NO_LINE)},
                          listed=LIST_WORKERS)
    checks = check_credentials(load(MANIFEST), {"KV_AGENT_STATE_DIR": str(tmp_path)},
                               Host(is_systemd=lambda: True, systemd=systemd))
    assert [(check.subject, check.state) for check in checks] == [
        ("credentials", WARN), ("unit app.service", OK), ("unit worker@1.service", FAIL),
        ("unit worker@a\\x2db.service", FAIL)]
    assert f"LoadCredential=db-password:{sock}" in (checks[2].fix or "")
    assert not Report(tuple(checks[:2]), 0.0).is_failed


def test_doctor_runs_the_link_last(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """diagnose() ends with the credential checks, after the running agent's."""
    import agent.doctor.chain as chain

    monkeypatch.setattr(chain._Network, "run", lambda self: [])
    manifest = tmp_path / "manifest.yaml"
    manifest.write_text(f"directory: {tmp_path}/out\n" + HEAD + MANIFEST)
    manifest.chmod(0o600)
    systemd = FakeSystemd({"app.service": unit(NO_LINE)}, listed="")
    report = chain.diagnose(str(manifest), {"KV_AGENT_STATE_DIR": str(tmp_path / "state")},
                            Host(is_systemd=lambda: True, unit_state=lambda unit: "inactive",
                                 unit_environment=lambda: None, systemd=systemd))
    subjects = [check.subject for check in report.checks]
    assert subjects[-3:] == ["credentials", "units worker@*.service", "unit app.service"]
    assert subjects.index("agent") < subjects.index("credentials")
    assert report.checks[-1].state == FAIL


@pytest.mark.integration
def test_the_doctor_command_shows_the_credential_link_and_no_value(
        emulator: Emulator, shm_dir: Path) -> None:
    """The real ``kv-agent doctor`` on a credential-only entry: the secret is checked, the
    socket's line follows the agent's, and no value is printed (Doctor.run checks)."""
    doctor = Doctor(emulator, shm_dir)
    emulator.clear_faults()
    doctor.put("cred-db")
    done = doctor.run(doctor.manifest(
        "  - name: cred-db\n    credential: {units: [app.service]}\n"))
    lines = done.stdout.splitlines()
    assert "✓ secret cred-db, readable" in done.stdout, done.stdout
    socket_line = next(i for i, line in enumerate(lines) if "credentials, socket" in line)
    assert socket_line > max(i for i, line in enumerate(lines) if ", status:" in line)
    assert f"it creates {shm_dir}/state/credentials.sock at start" in lines[socket_line]
    assert done.returncode == 0, done.stdout


@pytest.mark.parametrize("files, credentials, said", [
    (1, 0, "1 file"), (2, 0, "2 files"), (0, 1, "1 credential"),
    (2, 1, "2 files and 1 credential"), (1, 2, "1 file and 2 credentials"),
])
def test_the_transform_check_counts_files_and_credentials_apart(files: int, credentials: int,
                                                                said: str) -> None:
    """doctor's transform line names what an entry makes as the operator reads it: a
    credential is never counted as a file."""
    from agent.doctor.secret_links import made
    from agent.pipeline.outputs import Output, OutputSet

    grant = Grant("db", ("app.service",))
    outputs = [Output(f"/run/secrets/f{n}", 0, 0, 0o400) for n in range(files)]
    outputs += [Output("", 0, 0, 0o400, credential=grant._replace(id=f"c{n}"))
                for n in range(credentials)]
    assert made(OutputSet(tuple(outputs))) == said
