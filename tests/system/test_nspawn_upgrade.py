"""Upgrades never lose a file (issue 21, part 3): the .deb upgraded, downgraded and purged
under a running agent and a consumer that never stops reading, on Debian 12 and 13.

A story of its own, on a machine of its own, booted as in test_nspawn_system.py (the
emulator plays IMDS and the vault inside the container only, from this tree's sources under
/root/emu/lib, so removing the packages never pulls the vault away). The previous release is
this tree built as PREVIOUS (packaging/build-deb.sh, KV_AGENT_BUILD_VERSION): there are no
release tags to build from. The operator's manifest is the package's conffile, edited; the
operator's drop-in sets an environment variable.

Each exchange (``apt install ./kv-agent_NEW.deb``, then the downgrade back) runs while a
consumer loop (a shell in the container) compares every read of every file with the values it
may hold, and while the vault has just rotated one secret, so that the new agent rewrites it
at its start. Then: no read saw a missing, partial or unknown file; the manifest is
byte-identical and dpkg did not prompt (stdin is /dev/null and no --force-conf* option is
given: dpkg prompts only for a conffile both edited and changed in the package, and the
shipped one is the same in both); the drop-in is in effect in the new process; the agent was
restarted exactly once (the journal since the exchange holds exactly one new invocation and
one start, and no automatic restart), by the new package's postinst while the old agent was
still running (not stopped by prerm before the unpack); the agent rewrote the rotated secret;
`kv-agent status` names the new version. The purge then keeps what it promises
(test_nspawn_system.py's purge step, kv-agent.postrm): the agent's files and state go, an
operator's file and drop-in stay.

docs/design/upgrades.md states the contract this proves.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Dict, Iterator, List, NamedTuple, Tuple

import kvsystem
import pytest
from kvsystem import IMDS_ADDRESS, TIMINGS, Container, story
from test_nspawn_system import (
    EMULATOR_SERVICE,
    EMULATOR_UNIT,
    VAULT_HOST,
    secrets_yaml,
    wait_active,
    write_report,
)

pytestmark = pytest.mark.scenario

PREVIOUS = "0.0.9"
CURRENT = (kvsystem.REPO / "packaging/debian/changelog").read_text().split("(", 1)[1].split(")")[0]
MANIFEST_PATH = "/etc/kv-agent/manifest.yaml"
DROP_IN = "/etc/systemd/system/kv-agent.service.d/override.conf"
DROP_IN_TEXT = "[Service]\nEnvironment=OPERATOR_SITE=upgrade-test\n"
CONSUMER = "/root/consumer"
SENTINEL = "/usr/lib/kv-agent/agent/__init__.py"  # replaced by dpkg at every unpack
OPERATORS_OWN = "/run/secrets/operators-own"
# systemd's catalogue: "unit started" (a start job done, here: READY=1).
UNIT_STARTED = "39f53479d3a045ac8e11786248231fbf"

# Distinct lengths; app-key near Key Vault's 25k-character limit, so a torn write would
# have room to show.
VALUES = {"db-password": "pg-Upgrade-0001", "api-token": "tok-Upgrade-AAAA-first",
          "app-key": "".join(chr(0x41 + (i * 7) % 26) for i in range(20000))}
ROTATIONS = ["pg-Upgrade-0002-upgrade", "pg-Upgrade-0003-downgrade"]

MANIFEST = f"""\
# The operator's manifest: the package's conffile, edited.
vault: https://{VAULT_HOST}
directory: /run/secrets
refresh: 1h
secrets:
  - name: db-password
    owner: nobody
    group: nogroup
    mode: "0440"
  - name: api-token
    mode: "0400"
  - name: app-key
    mode: "0400"
"""

# Reads every secret file until `stop` exists. A read is good when the file holds, in
# full, one of the values it may hold then (accept/NAME.*); cmp keeps the inode it opened,
# so a rename between its two tries cannot fail a good read. Counts land in `result`.
CONSUMER_LOOP = """\
#!/bin/sh
cd /root/consumer
reads=0 failures=0
while [ ! -e stop ]; do
    for name in "$@"; do
        reads=$((reads + 1))
        file=/run/secrets/$name
        if ! { cmp -s "$file" "accept/$name.1" || cmp -s "$file" "accept/$name.2"; }; then
            failures=$((failures + 1))
            if [ -e "$file" ]; then
                echo "$(date +%T.%N) $name: $(stat -c %s "$file") bytes, not an accepted value"
            else
                echo "$(date +%T.%N) $name: missing"
            fi >>failures.log
        fi
    done
    echo "$reads $failures" >progress
done
echo "$reads $failures" >result
"""

# Notes, every 20 ms, whether dpkg replaced the agent's code (SENTINEL is no longer the file
# linked at the start) while the agent that ran before the exchange (pid $1) was alive.
MONITOR_LOOP = f"""\
#!/bin/sh
cd /root/consumer
while [ ! -e stop ]; do
    if ! [ {SENTINEL} -ef sentinel.ref ] && kill -0 "$1" 2>/dev/null; then
        : >replaced-while-running
    fi
    sleep 0.02
done
"""


class Exchange(NamedTuple):
    """What one `apt install` of another version did, as the checks need it."""

    reads: int
    failures: List[str]
    apt_output: str
    invocations_before: str
    journal: List[Dict[str, str]]


@pytest.fixture(scope="module")
def previous_deb(built_deb: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This tree's kv-agent .deb built as PREVIOUS, the release before this one."""
    started = time.monotonic()
    deb = kvsystem.build_deb(tmp_path_factory.mktemp("previous"), version=PREVIOUS)["kv-agent"]
    TIMINGS["build the previous .deb"] = time.monotonic() - started
    return deb


@pytest.fixture(scope="module")
def machine(suite: str, rootfs_tar: Path, built_deb: Path,
            previous_deb: Path) -> Iterator[Container]:
    """The booted ``suite`` container with both .debs in /root/debs and the emulator with
    this tree's agent package under /root/emu/lib (none of the .debs')."""
    container = Container(rootfs_tar, name=f"kv-agent-upgrade-{suite}")
    with story(container, (built_deb, previous_deb), f"{suite}: upgrade story (boot to teardown)",
               deb_dir="/root/debs"):
        shutil.copytree(kvsystem.REPO / "agent", container.root / "root/emu/lib/agent",
                        ignore=shutil.ignore_patterns("__pycache__"))
        yield container


# -- helpers -----------------------------------------------------------------------------


def apt(machine: Container, *arguments: str) -> str:
    """`apt ARGUMENTS -y` in /root/debs, non-interactive, stdin /dev/null, no --force-conf*:
    a conffile prompt would fail it (dpkg reads its answer from stdin). Its output, less
    apt's own warning that its command line is meant for people."""
    started = time.monotonic()
    result = machine.sh(f"cd /root/debs && apt {' '.join(arguments)} -y", timeout=300)
    TIMINGS[f"{machine.name}: apt {' '.join(arguments)}"] = time.monotonic() - started
    return "".join(line for line in (result.stdout + result.stderr).splitlines(keepends=True)
                   if not line.startswith("WARNING: apt does not have a stable CLI"))


def rotate(machine: Container, value: str, count: int) -> None:
    """The vault's db-password becomes ``value`` (its ``count``-th rotation)."""
    machine.write("/root/emu/secrets.yaml", secrets_yaml(dict(VALUES, **{"db-password": value})),
                  mode=0o600)
    machine.run(["systemctl", "reload", EMULATOR_UNIT])
    machine.wait_for(f"[ $(journalctl -o cat -u {EMULATOR_UNIT} | grep -c '^rotated "
                     f"db-password') -ge {count} ]", what="the emulator's rotation")


def show(machine: Container, *properties: str) -> Dict[str, str]:
    """`systemctl show -p ... kv-agent` as a dict."""
    lines = machine.run(["systemctl", "show", "-p", ",".join(properties), "kv-agent"]).stdout
    return dict(line.split("=", 1) for line in lines.splitlines() if "=" in line)


def journal_cursor(machine: Container) -> str:
    last = machine.run(["journalctl", "-n", "1", "-o", "json"]).stdout
    return str(json.loads(last)["__CURSOR"])


def unit_journal(machine: Container, cursor: str) -> List[Dict[str, str]]:
    """kv-agent's journal entries (the agent's and systemd's about it) after ``cursor``."""
    text = machine.run(["journalctl", "-u", "kv-agent", "-o", "json", f"--after-cursor={cursor}",
                        "--output-fields=MESSAGE_ID,INVOCATION_ID,_SYSTEMD_INVOCATION_ID,"
                        "__REALTIME_TIMESTAMP"]).stdout
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def conffile_hash(machine: Container) -> str:
    """The md5 dpkg recorded for the manifest as the installed package ships it."""
    listed = machine.run(["dpkg-query", "-W", "-f=${Conffiles}", "kv-agent"]).stdout.split()
    return listed[listed.index(MANIFEST_PATH) + 1]


def start_consumer(machine: Container, accepted: Dict[str, List[str]]) -> None:
    """The consumer and the monitor running (transient units), the consumer's first round
    done: each file may hold its ``accepted`` values."""
    machine.run(["rm", "-rf", CONSUMER])
    for name, values in accepted.items():
        for index, value in enumerate(values, start=1):
            machine.write(f"{CONSUMER}/accept/{name}.{index}", value, mode=0o600)
    machine.write(f"{CONSUMER}/loop.sh", CONSUMER_LOOP, mode=0o755)
    machine.write(f"{CONSUMER}/monitor.sh", MONITOR_LOOP, mode=0o755)
    machine.run(["ln", SENTINEL, f"{CONSUMER}/sentinel.ref"])
    main_pid = show(machine, "MainPID")["MainPID"]
    assert main_pid != "0"
    machine.run(["systemd-run", "--quiet", "--collect", "--unit=upgrade-consumer",
                 f"{CONSUMER}/loop.sh", *accepted])
    machine.run(["systemd-run", "--quiet", "--collect", "--unit=upgrade-monitor",
                 f"{CONSUMER}/monitor.sh", main_pid])
    machine.wait_for(f"[ -s {CONSUMER}/progress ]", what="the consumer's first reads")


def stop_consumer(machine: Container) -> Tuple[int, List[str]]:
    """Stops both loops; (reads, failure lines)."""
    machine.run(["touch", f"{CONSUMER}/stop"])
    machine.wait_for(f"[ -s {CONSUMER}/result ]", what="the consumer's count")
    reads, failures = (int(n) for n in machine.read(f"{CONSUMER}/result").split())
    log = machine.run(["sh", "-c", f"cat {CONSUMER}/failures.log 2>/dev/null || true"]).stdout
    assert len(log.splitlines()) == failures, log
    return reads, log.splitlines()


def exchange(machine: Container, suite: str, deb: str, value_before: str, rotated: str,
             count: int, *apt_options: str) -> Exchange:
    """The vault rotates db-password, then ``apt install ./DEB`` while the consumer reads."""
    rotate(machine, rotated, count)
    accepted = {name: [value] for name, value in VALUES.items()}
    accepted["db-password"] = [value_before, rotated]
    start_consumer(machine, accepted)
    invocation = show(machine, "InvocationID")["InvocationID"]
    cursor = journal_cursor(machine)
    time.sleep(0.5)  # reads before the exchange too
    output = apt(machine, "install", *apt_options, f"./{deb}")
    time.sleep(0.5)  # and after it
    reads, failures = stop_consumer(machine)
    machine.wait_for(f"journalctl -u kv-agent -o json --after-cursor='{cursor}' "
                     f"| grep -q {UNIT_STARTED}", what="the start in the journal")
    entries = unit_journal(machine, cursor)
    write_report(suite, f"apt install ./{deb} under a reading consumer",
                 f"{reads} reads, {len(failures)} failed")
    return Exchange(reads, failures, output, invocation, entries)


def assert_kept_its_promises(machine: Container, suite: str, done: Exchange, version: str,
                             rotated: str, manifest_hash: str, shipped_hash: str) -> None:
    """Every promise of the upgrade contract (docs/design/upgrades.md) after ``done``."""
    # (1) The consumer never saw a missing, partial or unknown file.
    assert done.reads > 100 and not done.failures, (done.reads, done.failures[:20])
    # (2) The conffile: kept byte-identical, with no prompt. dpkg prompts only for one
    # both edited here and changed in the package: the operator's differs from the shipped
    # one (so a changed package manifest would have prompted), and the shipped one did not
    # change between the versions.
    assert machine.run(["sha256sum", MANIFEST_PATH]).stdout.split()[0] == manifest_hash
    assert conffile_hash(machine) == shipped_hash
    assert machine.run(["md5sum", MANIFEST_PATH]).stdout.split()[0] != shipped_hash
    assert "Configuration file" not in done.apt_output, done.apt_output
    assert machine.run(["sh", "-c", "ls /etc/kv-agent"]).stdout.split() == ["manifest.yaml"]
    assert machine.run(["dpkg-query", "-W", "-f=${Status} ${Version}", "kv-agent"]
                       ).stdout == f"install ok installed {version}"
    # (3) The operator's drop-in survives and is in effect in the new process.
    state = show(machine, "DropInPaths", "Environment", "MainPID", "InvocationID", "NRestarts",
                 "UnitFileState", "ActiveState")
    assert DROP_IN in state["DropInPaths"].split(), state
    assert "OPERATOR_SITE=upgrade-test" in state["Environment"].split(), state
    environ = machine.run(["cat", f"/proc/{state['MainPID']}/environ"]).stdout.split("\0")
    assert "OPERATOR_SITE=upgrade-test" in environ
    assert state["UnitFileState"] == "enabled" and state["ActiveState"] == "active", state
    # (4) Restarted exactly once: one new invocation and one start in the journal since
    # the exchange began, no automatic restart; by postinst, after the unpack, while the
    # old agent still ran (never stopped by prerm before it).
    invocations = {entry.get("_SYSTEMD_INVOCATION_ID") or entry.get("INVOCATION_ID")
                   for entry in done.journal} - {None, done.invocations_before}
    assert invocations == {state["InvocationID"]}, (invocations, state)
    starts = [entry for entry in done.journal if entry.get("MESSAGE_ID") == UNIT_STARTED]
    assert len(starts) == 1 and state["NRestarts"] == "0", (starts, state)
    assert machine.run(["test", "-e", f"{CONSUMER}/replaced-while-running"], check=False
                       ).returncode == 0, "the old agent was stopped before dpkg unpacked"
    old = [int(entry["__REALTIME_TIMESTAMP"]) for entry in done.journal
           if done.invocations_before in (entry.get("_SYSTEMD_INVOCATION_ID"),
                                          entry.get("INVOCATION_ID"))]
    TIMINGS[f"{suite}: restart to {version}, the old agent's last line to READY"] = \
        (int(starts[0]["__REALTIME_TIMESTAMP"]) - max(old)) / 1e6
    # (5) The new agent rewrote the rotated secret, and says it is the new version.
    assert machine.read("/run/secrets/db-password") == rotated
    wait_active(machine)
    status = machine.run(["kv-agent", "status"]).stdout
    assert f"  agent: kv-agent {version}\n" in status, status
    write_report(suite, f"kv-agent status after apt install of {version}", status)


# -- the story ---------------------------------------------------------------------------

MANIFEST_HASH: Dict[str, str] = {}  # by suite: the operator's manifest's sha256
SHIPPED_HASH: Dict[str, str] = {}  # by suite: the package's manifest's md5, as dpkg records it


def test_the_previous_release_runs_with_an_operators_manifest_and_drop_in(
        machine: Container, suite: str, previous_deb: Path) -> None:
    """The previous .deb installs; with the vault in the container, the operator's edited
    manifest and drop-in, `systemctl enable --now` starts it and it names its version."""
    apt(machine, "install", f"./{previous_deb.name}")
    machine.run(["rm", "-f", "/etc/nginx/sites-enabled/default"])  # it holds port 80
    machine.run(["systemctl", "stop", "nginx"])
    machine.run(["ip", "address", "add", f"{IMDS_ADDRESS}/32", "dev", "lo"])
    machine.write("/etc/hosts", f"127.0.0.1 localhost\n{IMDS_ADDRESS} {VAULT_HOST}\n")
    machine.write("/root/emu/secrets.yaml", secrets_yaml(VALUES), mode=0o600)
    machine.write(f"/etc/systemd/system/{EMULATOR_UNIT}", EMULATOR_SERVICE)
    machine.write(f"/etc/systemd/system/{EMULATOR_UNIT}.d/lib.conf",
                  "[Service]\nEnvironment=KV_TEST_EMULATOR_LIB=/root/emu/lib\n")
    machine.run(["systemctl", "daemon-reload"])
    machine.run(["systemctl", "start", EMULATOR_UNIT])
    machine.wait_for(f"journalctl -o cat -u {EMULATOR_UNIT} | grep -q 'emulator ready'",
                     what="the emulator")
    machine.sh("cp /root/emu/certs/ca.pem /usr/local/share/ca-certificates/kv-agent-test.crt"
               " && update-ca-certificates >/dev/null")
    machine.write(MANIFEST_PATH, MANIFEST, mode=0o600)
    machine.write(DROP_IN, DROP_IN_TEXT)
    machine.run(["kv-agent", "check"])
    machine.run(["systemctl", "daemon-reload"])
    machine.run(["systemctl", "enable", "--now", "kv-agent"], timeout=120)
    for name, value in VALUES.items():
        assert machine.read(f"/run/secrets/{name}") == value
    MANIFEST_HASH[suite] = machine.run(["sha256sum", MANIFEST_PATH]).stdout.split()[0]
    SHIPPED_HASH[suite] = conffile_hash(machine)
    wait_active(machine)
    status = machine.run(["kv-agent", "status"]).stdout
    assert f"  agent: kv-agent {PREVIOUS}\n" in status, status


def test_upgrade_while_a_consumer_reads(machine: Container, suite: str,
                                        built_deb: Path) -> None:
    """`apt install ./kv-agent_CURRENT.deb` over the running previous release keeps every
    promise (the module docstring): no missing or partial file in thousands of reads, the
    manifest kept without a prompt, the drop-in in effect, one restart, the new version."""
    done = exchange(machine, suite, built_deb.name, VALUES["db-password"], ROTATIONS[0], 1)
    assert_kept_its_promises(machine, suite, done, CURRENT, ROTATIONS[0], MANIFEST_HASH[suite],
                             SHIPPED_HASH[suite])


def test_downgrade_while_a_consumer_reads(machine: Container, suite: str,
                                          previous_deb: Path) -> None:
    """`apt install --allow-downgrades ./kv-agent_PREVIOUS.deb` back keeps the same
    promises."""
    done = exchange(machine, suite, previous_deb.name, ROTATIONS[0], ROTATIONS[1], 2,
                    "--allow-downgrades")
    assert_kept_its_promises(machine, suite, done, PREVIOUS, ROTATIONS[1], MANIFEST_HASH[suite],
                             SHIPPED_HASH[suite])


def test_purge_removes_the_agents_files_and_keeps_the_operators(machine: Container) -> None:
    """`apt purge kv-agent` stops the agent and removes what kv-agent.postrm promises: the
    files it wrote, /run/kv-agent, /var/lib/kv-agent and the manifest (a conffile goes on
    purge); an operator's own file in /run/secrets, and so that directory, and the
    operator's drop-in (not the package's) stay."""
    machine.write(OPERATORS_OWN, "not the agent's\n", mode=0o600)
    output = apt(machine, "purge", "kv-agent")
    assert "warning" not in output.lower(), output
    assert show(machine, "ActiveState")["ActiveState"] == "inactive"
    gone = machine.run(["sh", "-c", "ls -d /run/secrets/db-password /run/secrets/api-token "
                        "/run/secrets/app-key /run/kv-agent /var/lib/kv-agent /etc/kv-agent "
                        "/usr/lib/kv-agent /usr/bin/kv-agent 2>/dev/null || true"]).stdout
    assert gone == "", gone
    assert machine.run(["ls", "-A", "/run/secrets"]).stdout.split() == ["operators-own"]
    assert machine.read(DROP_IN) == DROP_IN_TEXT
    assert machine.run(["dpkg-query", "-W", "-f=${Status}", "kv-agent"], check=False
                       ).stdout in ("", "unknown ok not-installed")
