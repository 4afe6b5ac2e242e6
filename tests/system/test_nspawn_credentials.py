"""systemd credentials from kv-agent's socket in a real systemd (issue 19): Debian 12 and 13
containers, booted as in test_nspawn_system.py, with the .debs installed and the emulator
playing IMDS and the vault inside the container only.

A story of its own, on a machine of its own (its steps need none of the other story's, so
``pytest tests/system/test_nspawn_credentials.py`` runs it alone): a consumer unit with
``DynamicUser=yes`` and ``LoadCredential=db-password:/run/kv-agent/credentials.sock``, ordered
after kv-agent, reads its secret (the unit's output is the value's SHA-256, never the value);
an ungranted unit fails to start (243/CREDENTIALS) and its own journal says why; a rotation
with ``on_change: [systemctl, try-restart, app.service]`` delivers the new value; both units
started again in one transaction (as at boot; the container is not rebooted: the machinery
has no reboot, kvsystem.Container unpacks a fresh root at every boot) serve it again from a
new agent's memory; /run/secrets holds no file for the credential; the exposure score is the
one docs/packages.md quotes.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import time
from pathlib import Path
from typing import Dict, Iterator

import kvsystem
import pytest
from kvsystem import IMDS_ADDRESS, TIMINGS, Container, story
from test_nspawn_system import (
    EMULATOR_SERVICE,
    EMULATOR_UNIT,
    PACKAGES_DOC,
    VAULT_HOST,
    journal,
    secrets_yaml,
    wait_active,
    write_report,
)

pytestmark = pytest.mark.scenario

SOCKET = "/run/kv-agent/credentials.sock"
APP = "app.service"
OTHER = "other.service"
VALUES = {"db-password": "pg-Credential-0001", "example-token": "tok-Credential-AAAA"}
ROTATED = {"db-password": "pg-Credential-0002-rotated", "example-token": "tok-Credential-AAAA"}

MANIFEST = f"""\
vault: https://{VAULT_HOST}
directory: /run/secrets
refresh: 1h
secrets:
  - name: db-password
    credential:
      units: [{APP}]
    on_change: ["systemctl", "try-restart", "{APP}"]
  - name: example-token
    mode: "0400"
"""

# Says who it runs as and the SHA-256 of the credential: a test compares digests, and the
# journal never holds a value.
SHOW_CREDENTIAL = """\
#!/bin/sh
echo "credential: uid $(id -u): $(sha256sum < "$CREDENTIALS_DIRECTORY/$1" | cut -d' ' -f1)"
"""


def consumer(unit: str) -> str:
    """A consumer as the how-to gives it: its own dynamic user, the credential from the
    agent's socket, ordered after the agent; oneshot, so `systemctl start` returns once it
    has read it."""
    return f"""\
[Unit]
Description=kv-agent test: credential consumer {unit}
Wants=kv-agent.service
After=kv-agent.service

[Service]
Type=oneshot
RemainAfterExit=yes
DynamicUser=yes
LoadCredential=db-password:{SOCKET}
ExecStart=/usr/local/bin/show-credential db-password

[Install]
WantedBy=multi-user.target
"""


def digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


@pytest.fixture(scope="module")
def machine(suite: str, rootfs_tar: Path, built_debs: Dict[str, Path]) -> Iterator[Container]:
    """The booted ``suite`` container with the .debs and the emulator driver copied in."""
    container = Container(rootfs_tar, name=f"kv-agent-cred-{suite}")
    with story(container, built_debs.values(), f"{suite}: credential story (boot to teardown)"):
        yield container


def consumer_lines(machine: Container, unit: str) -> list:
    return [line for line in journal(machine, unit).splitlines()
            if line.startswith("credential: ")]


def test_the_agent_and_the_emulator_are_installed(machine: Container,
                                                  built_debs: Dict[str, Path]) -> None:
    """Both .debs install offline; the emulator plays IMDS and the vault inside the
    container (its own network namespace, checked by every command)."""
    debs = [f"/root/{deb.name}" for deb in built_debs.values()]
    machine.run(["apt-get", "install", "-y", "--no-install-recommends", *debs], timeout=180)
    # The image's nginx listens on every address's port 80, where IMDS must bind.
    machine.run(["rm", "-f", "/etc/nginx/sites-enabled/default"])
    machine.run(["systemctl", "stop", "nginx"])
    machine.run(["ip", "address", "add", f"{IMDS_ADDRESS}/32", "dev", "lo"])
    machine.write("/etc/hosts", f"127.0.0.1 localhost\n{IMDS_ADDRESS} {VAULT_HOST}\n")
    machine.write("/root/emu/secrets.yaml", secrets_yaml(VALUES), mode=0o600)
    machine.write(f"/etc/systemd/system/{EMULATOR_UNIT}", EMULATOR_SERVICE)
    machine.run(["systemctl", "daemon-reload"])
    machine.run(["systemctl", "start", EMULATOR_UNIT])
    machine.wait_for(f"journalctl -o cat -u {EMULATOR_UNIT} | grep -q 'emulator ready'",
                     what="the emulator")
    machine.sh("cp /root/emu/certs/ca.pem /usr/local/share/ca-certificates/kv-agent-test.crt"
               " && update-ca-certificates >/dev/null")
    machine.write("/etc/kv-agent/manifest.yaml", MANIFEST, mode=0o600)
    assert "1 credential for 1 unit pattern" in machine.run(["kv-agent", "check"]).stdout
    machine.write("/usr/local/bin/show-credential", SHOW_CREDENTIAL, mode=0o755)
    for unit in (APP, OTHER):
        machine.write(f"/etc/systemd/system/{unit}", consumer(unit))
    machine.run(["systemctl", "daemon-reload"])


def test_a_consumer_ordered_after_the_agent_gets_its_credential(machine: Container,
                                                                suite: str) -> None:
    """Starting app.service pulls in kv-agent, which is READY only with the credential in
    memory; the unit, under its own dynamic user, reads the value from its credentials
    directory. The socket is root's 0600; /run/secrets holds the file entry alone."""
    started = time.monotonic()
    machine.run(["systemctl", "start", APP], timeout=120)
    TIMINGS[f"{suite}: systemctl start {APP} (with kv-agent)"] = time.monotonic() - started
    wait_active(machine)
    (line,) = consumer_lines(machine, APP)
    uid = int(line.split()[2].rstrip(":"))
    assert uid != 0 and line.endswith(digest(VALUES["db-password"])), line
    assert machine.run(["stat", "-c", "%a %U:%G %F", SOCKET]).stdout.strip() == \
        "600 root:root socket"
    assert machine.run(["ls", "-A", "/run/secrets"]).stdout.split() == ["example-token"]
    status = machine.run(["kv-agent", "status"]).stdout
    assert "db-password -> credential:app.service/db-password (loaded)" in status, status
    shown = machine.run(["systemctl", "status", "--no-pager", "--lines=0", "kv-agent"]).stdout
    assert "1 credential in memory" in shown, shown
    write_report(suite, "kv-agent status (a credential)", status)


def test_an_ungranted_unit_fails_to_start_and_its_journal_says_why(machine: Container,
                                                                   suite: str) -> None:
    """other.service asks for db-password, which the manifest grants to app.service only: it
    fails at once with 243/CREDENTIALS, never with an empty credential, and its own journal
    (and `systemctl status`) names the credential and the reason."""
    result = machine.run(["systemctl", "start", OTHER], check=False, timeout=60)
    assert result.returncode != 0
    show = machine.run(["systemctl", "show", "-p", "Result,ExecMainStatus", OTHER]).stdout
    assert sorted(show.split()) == ["ExecMainStatus=243", "Result=exit-code"], show
    why = f"refused credential db-password to {OTHER}: the unit is not granted it"
    machine.wait_for(f"journalctl -o cat -u {OTHER} | grep -qF '{why}'",
                     what="the refusal in the unit's journal")
    assert not consumer_lines(machine, OTHER)
    machine.wait_for(f"systemctl status --no-pager {OTHER} | grep -qF '{why}'",
                     what="the refusal in systemctl status")
    status = machine.run(["systemctl", "status", "--no-pager", OTHER], check=False).stdout
    write_report(suite, f"systemctl status {OTHER} (refused)", status)
    wait_active(machine)  # the agent itself is unaffected


def test_a_rotation_restarts_the_consumer_with_the_new_value(machine: Container) -> None:
    """The vault rotates db-password; the agent's refresh (a reload) loads the new value and
    its on_change hook, `systemctl try-restart app.service`, gives the unit the new value."""
    machine.write("/root/emu/secrets.yaml", secrets_yaml(ROTATED), mode=0o600)
    machine.run(["systemctl", "reload", EMULATOR_UNIT])
    machine.wait_for(f"journalctl -o cat -u {EMULATOR_UNIT} | grep -q '^rotated'",
                     what="the emulator's rotation")
    machine.run(["systemctl", "reload", "kv-agent"], timeout=60)
    expected = digest(ROTATED["db-password"])
    machine.wait_for(f"journalctl -o cat -u {APP} | grep -q '{expected}$'", timeout=60,
                     what="the consumer restarted with the rotated value")
    assert len(consumer_lines(machine, APP)) == 2
    machine.wait_for("journalctl -o cat -u kv-agent | grep -q 'ran on_change hook'",
                     what="the hook's line")
    assert machine.run(["ls", "-A", "/run/secrets"]).stdout.split() == ["example-token"]


def test_both_units_started_together_serve_it_again(machine: Container, suite: str) -> None:
    """With both units enabled and stopped (the socket goes with the agent), one transaction
    starts them as a boot would: the consumer waits for the new agent and gets the value that
    agent fetched into its memory."""
    machine.run(["systemctl", "enable", "kv-agent", APP])
    machine.run(["systemctl", "stop", APP, "kv-agent"], timeout=60)
    assert machine.run(["test", "-e", SOCKET], check=False).returncode != 0
    started = time.monotonic()
    machine.run(["systemctl", "start", "multi-user.target"], timeout=120)
    TIMINGS[f"{suite}: both units started together"] = time.monotonic() - started
    lines = consumer_lines(machine, APP)
    assert len(lines) == 3 and lines[-1].endswith(digest(ROTATED["db-password"])), lines
    assert machine.run(["systemctl", "is-active", APP]).stdout == "active\n"


# Across a reboot the emulator must come up by itself, with the IMDS address, before the
# agent (the test added both by hand at install); it makes a new CA at every start, which
# the container trusts once the emulator listens.
EMULATOR_AT_BOOT = f"""\
[Unit]
Before=kv-agent.service

[Service]
ExecStartPre=-ip address add {IMDS_ADDRESS}/32 dev lo
ExecStartPost=/root/emu/trust-ca
"""
TRUST_CA = f"""\
#!/bin/sh
for attempt in $(seq 100); do
    python3 -c 'import socket; socket.create_connection(("{IMDS_ADDRESS}", 80), 1)' \\
        2>/dev/null && break
    sleep 0.1
done
cp /root/emu/certs/ca.pem /usr/local/share/ca-certificates/kv-agent-test.crt
update-ca-certificates >/dev/null
"""


def test_after_a_reboot_the_consumer_gets_its_credential_with_no_manual_step(
        machine: Container, suite: str) -> None:
    """The container is powered off and booted again (/run empty: no socket, no value in any
    memory): with kv-agent and app.service enabled, the boot starts the agent, which is READY
    once the credential is in its memory, and then app.service, which reads it."""
    machine.write("/root/emu/trust-ca", TRUST_CA, mode=0o755)
    machine.write(f"/etc/systemd/system/{EMULATOR_UNIT}.d/boot.conf", EMULATOR_AT_BOOT)
    machine.run(["systemctl", "daemon-reload"])
    machine.run(["systemctl", "add-wants", "multi-user.target", EMULATOR_UNIT])
    started = time.monotonic()
    try:
        machine.reboot()
    except (AssertionError, subprocess.TimeoutExpired) as exc:
        state = machine.run(["sh", "-c", "systemctl list-jobs --no-pager; journalctl -b "
                             "--no-pager -o short-monotonic -u kv-agent -u "
                             f"{EMULATOR_UNIT} -u {APP} | tail -60"], check=False)
        raise AssertionError(f"the reboot did not finish: {exc}\n{state.stdout}"
                             f"{state.stderr}") from exc
    TIMINGS[f"{suite}: reboot to running, credential served"] = time.monotonic() - started
    this_boot = machine.run(["journalctl", "-b", "--no-pager", "-o", "cat", "-u", APP]).stdout
    lines = [line for line in this_boot.splitlines() if line.startswith("credential: ")]
    assert len(lines) == 1 and lines[0].endswith(digest(ROTATED["db-password"])), this_boot
    assert machine.run(["systemctl", "is-active", APP]).stdout == "active\n"
    assert machine.run(["stat", "-c", "%a %U:%G %F", SOCKET]).stdout.strip() == \
        "600 root:root socket"
    assert machine.run(["ls", "-A", "/run/secrets"]).stdout.split() == ["example-token"]


def test_no_value_in_any_journal(machine: Container) -> None:
    """Neither the agent, the consumers, the refusals nor anyone else logged a value."""
    everything = machine.run(["journalctl", "--no-pager", "-o", "cat"]).stdout
    for value in {*VALUES.values(), *ROTATED.values()}:
        assert value not in everything


def test_the_exposure_score_is_unchanged(machine: Container, suite: str) -> None:
    """Serving credentials needs no directive more: systemd-analyze security rates the
    installed unit as docs/packages.md quotes (2.1 on Debian 12 and 13)."""
    result = machine.run(["systemd-analyze", "security", "--no-pager", "kv-agent.service"],
                         check=False)
    match = re.search(r"Overall exposure level for kv-agent\.service: (\d+\.\d+) (\w+)",
                      result.stdout)
    assert match, result.stdout + result.stderr
    write_report(suite, "systemd-analyze security (serving credentials)", match.group(0))
    packages = (kvsystem.REPO / PACKAGES_DOC).read_text(encoding="utf-8")
    assert f"rates the unit's exposure {match.group(1)} (" in " ".join(packages.split()), \
        match.group(0)


def test_stop_removes_the_socket(machine: Container) -> None:
    """`systemctl stop kv-agent` exits cleanly and takes the socket with it: a unit starting
    then fails (no empty credential); the file entry stays."""
    machine.run(["systemctl", "stop", "kv-agent"], timeout=60)
    show = machine.run(["systemctl", "show", "-p", "Result,ExecMainStatus", "kv-agent"]).stdout
    assert sorted(show.split()) == ["ExecMainStatus=0", "Result=success"], show
    assert machine.run(["test", "-e", SOCKET], check=False).returncode != 0
    assert machine.read("/run/secrets/example-token") == VALUES["example-token"]
