"""The documented cloud-init recipe, docs/deploy/cloud-init.yaml, booted on
Debian 12 (cloud-init 22.4) and Debian 13 (cloud-init 25.1) as a new VM would
boot it: its first boot runs the recipe, and nothing is done by hand.

The image is a variant of the system test's root file system with cloud-init
(and curl and openssh-server, which cloud images have) added, cached under its
own key, so cloud-init never runs in the other tests' containers (measured on
a cold cache: about 35 s of mmdebstrap per release; 307 MB for Debian 12 and
266 MB for Debian 13, 53 and 68 MB more than the shared image). Before the
first boot, the test puts in what the image and the cloud would provide:

* a NoCloud seed (/var/lib/cloud/seed/nocloud/meta-data and user-data) whose
  user-data is the recipe itself with two strings replaced: the package URL
  (file:// to the .deb built from this tree, copied into the image) and its
  SHA-256. /etc/cloud/cloud.cfg.d pins ``datasource_list: [NoCloud, None]``
  so that ds-identify and cloud-init look for nothing else (the host's DMI
  shows through nspawn; on an Azure host they would otherwise find Azure) and
  turns network configuration off (nspawn's private network has no NIC);
* the emulator as the recipe's vault: the .debs unpacked under /opt (not
  installed: installing kv-agent is the recipe's job) and run by a unit that
  starts before cloud-final. It serves https://contoso-kv.vault.azure.net (the
  recipe's own vault, pointed at 127.0.0.1 by /etc/hosts) with its CA in the
  system trust store, and IMDS on http://127.0.0.1:80, which a drop-in gives
  kv-agent as KV_AGENT_IMDS_ENDPOINT. Not 169.254.169.254: the emulator must
  answer during the first boot, before the host can check the container's
  network namespace, which the safety rules require before that address is
  used (Container.assert_private_network). Everything else is the production
  default: the vault's real name, port 443, the system trust store.

Then: cloud-init is done without an error, the manifest has the owner and mode
the recipe gives, kv-agent is enabled and active with the file written, and
the recipe's consumer (myapp) started after kv-agent's READY and read that very
file. A reboot then shows the units, not the recipe's runcmd order, keep that
order on every later boot.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List

import kvsystem
import pytest
import yaml
from kvsystem import TIMINGS, Container

pytestmark = pytest.mark.scenario

RECIPE = kvsystem.REPO / "docs" / "deploy" / "cloud-init.yaml"
# The two strings of the recipe the test replaces, and nothing else.
RECIPE_PACKAGE_URL = "https://downloads.example.com/kv-agent/kv-agent_0.1.0_all.deb"
RECIPE_PACKAGE_SHA256 = "0" * 64
# What the recipe itself names.
VAULT_HOST = "contoso-kv.vault.azure.net"
MANIFEST = "/etc/kv-agent/manifest.yaml"
CONSUMER = "myapp.service"
SECRET_NAME = "db-password"
SECRET_PATH = f"/run/secrets/{SECRET_NAME}"
SECRET_VALUE = "ci-Secret-0001-first-boot"

# Cloud images have these; the test's other containers must not (cloud-init
# would run at each of their boots).
CLOUD_INIT_PACKAGES = ("cloud-init", "curl", "openssh-server")
EMULATOR_ROOT = "/opt/kv-test-emulator"
EMULATOR_UNIT = "kv-test-emulator.service"
SEED = "/var/lib/cloud/seed/nocloud"
INSTANCE_ID = "kv-agent-cloudinit-test"
IMDS_ENDPOINT = "http://127.0.0.1/metadata/identity/oauth2/token"

TEST_CLOUD_CFG = """\
# kv-agent's cloud-init test image: NoCloud from the seed directory, and no
# network configuration (nspawn's private network has only lo).
datasource_list: [ NoCloud, None ]
network: {config: disabled}
"""

EMULATOR_SERVICE = f"""\
[Unit]
Description=kv-agent cloud-init test: IMDS and Key Vault emulator (container only)
# Up, with its CA trusted, before cloud-final runs the recipe (and before
# kv-agent at every later boot).
Before=cloud-final.service kv-agent.service

[Service]
Type=exec
Environment=KV_TEST_EMULATOR_LIB={EMULATOR_ROOT}/usr/lib/kv-agent
ExecStart=/usr/bin/python3 -I {EMULATOR_ROOT}/emulator.py --secrets {EMULATOR_ROOT}/secrets.yaml \
  --host 127.0.0.1 --vault-hostname {VAULT_HOST} --cert-dir /run/kv-test-emulator
ExecStartPost=/bin/sh {EMULATOR_ROOT}/trust.sh
RuntimeDirectory=kv-test-emulator

[Install]
WantedBy=multi-user.target
"""

# The emulator writes a fresh CA before it binds; once the vault port answers,
# that CA goes into the system trust store (Debian's requests uses it).
TRUST_SCRIPT = """\
set -e
until python3 -I -c 'import socket; socket.create_connection(("127.0.0.1", 443), 1).close()' \\
    2>/dev/null; do sleep 0.1; done
cp /run/kv-test-emulator/ca.pem /usr/local/share/ca-certificates/kv-test-emulator.crt
update-ca-certificates >/dev/null
"""

KV_AGENT_DROP_IN = f"[Service]\nEnvironment=KV_AGENT_IMDS_ENDPOINT={IMDS_ENDPOINT}\n"


def user_data(package_url: str, package_sha256: str) -> str:
    """The recipe with its package URL and SHA-256 replaced, and nothing else."""
    text = RECIPE.read_text(encoding="utf-8")
    for placeholder in (RECIPE_PACKAGE_URL, RECIPE_PACKAGE_SHA256):
        assert text.count(placeholder) == 1, \
            f"{RECIPE.relative_to(kvsystem.REPO)}: expected {placeholder!r} exactly once"
    return text.replace(RECIPE_PACKAGE_URL, package_url).replace(
        RECIPE_PACKAGE_SHA256, package_sha256)


def recipe_file(path: str) -> Dict[str, Any]:
    """The recipe's write_files entry for ``path``."""
    recipe = yaml.safe_load(RECIPE.read_text(encoding="utf-8"))
    [entry] = [item for item in recipe["write_files"] if item["path"] == path]
    return dict(entry)


def _write(root: Path, path: str, text: str, mode: int = 0o644) -> None:
    target = root / path.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text, encoding="utf-8")
    os.chmod(target, mode)


def prepare_image(root: Path, debs: Dict[str, Path]) -> None:
    """What the image and the cloud provide before the first boot (module docstring)."""
    deb = debs["kv-agent"]
    shutil.copyfile(deb, root / "root" / deb.name)
    digest = hashlib.sha256(deb.read_bytes()).hexdigest()
    _write(root, f"{SEED}/meta-data", f"instance-id: {INSTANCE_ID}\n")
    _write(root, f"{SEED}/user-data", user_data(f"file:///root/{deb.name}", digest), 0o600)
    _write(root, "/etc/cloud/cloud.cfg.d/90-kv-agent-test.cfg", TEST_CLOUD_CFG)
    for package in debs.values():
        kvsystem.run(["dpkg-deb", "-x", str(package), str(root / EMULATOR_ROOT.lstrip("/"))])
    shutil.copyfile(Path(__file__).with_name("container_emulator.py"),
                    root / EMULATOR_ROOT.lstrip("/") / "emulator.py")
    _write(root, f"{EMULATOR_ROOT}/secrets.yaml", f"{SECRET_NAME}: {json.dumps(SECRET_VALUE)}\n",
           0o600)
    _write(root, f"{EMULATOR_ROOT}/trust.sh", TRUST_SCRIPT)
    _write(root, f"/etc/systemd/system/{EMULATOR_UNIT}", EMULATOR_SERVICE)
    wants = root / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    (wants / EMULATOR_UNIT).symlink_to(f"/etc/systemd/system/{EMULATOR_UNIT}")
    _write(root, "/etc/systemd/system/kv-agent.service.d/50-test-emulator.conf", KV_AGENT_DROP_IN)
    _write(root, "/etc/hosts", f"127.0.0.1 localhost {VAULT_HOST}\n")
    # The shared image's nginx (the certificate steps of test_nspawn_system.py)
    # would take port 80, where the emulator's IMDS listens.
    (root / "etc/systemd/system/nginx.service").symlink_to("/dev/null")
    # An image's locale, as cloud images set one: with none, cloud-init's locale
    # module asks update-locale for en_US.UTF-8, which this image never generated.
    _write(root, "/etc/default/locale", "LANG=C.UTF-8\n")


@pytest.fixture(scope="module")
def cloudinit_tar(host_tools: None, suite: str,
                  tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ``suite`` root file system with CLOUD_INIT_PACKAGES (mmdebstrap on a cold cache)."""
    started = time.monotonic()
    try:
        tar = kvsystem.rootfs_tar(suite, log=tmp_path_factory.mktemp("mmdebstrap") / "log",
                                  extra=CLOUD_INIT_PACKAGES)
    except kvsystem.Unavailable as exc:
        pytest.skip(str(exc))
    size = tar.stat().st_size / 1e6
    TIMINGS[f"{suite}: cloud-init root file system, {size:.0f} MB (mmdebstrap or cache)"] = \
        time.monotonic() - started
    return tar


@pytest.fixture(scope="module")
def machine(suite: str, cloudinit_tar: Path, built_debs: Dict[str, Path]) -> Iterator[Container]:
    """The ``suite`` container after its first boot, which ran the recipe; the boot
    waits for cloud-final, whose runcmd starts kv-agent and myapp."""
    container = Container(cloudinit_tar, name=f"kv-agent-ci-{suite}")
    started = time.monotonic()
    try:
        container.boot(timeout=300, prepare=lambda root: prepare_image(root, built_debs))
        TIMINGS[f"{suite}: cloud-init image unpack and seed"] = container.timings["unpack_s"]
        TIMINGS[f"{suite}: first boot, recipe included, to running"] = \
            container.timings["boot_s"]
        container.assert_private_network()
        yield container
    finally:
        container.close()
        TIMINGS[f"{suite}: cloud-init machine (boot to teardown)"] = time.monotonic() - started


def show(machine: Container, unit: str, *properties: str) -> Dict[str, str]:
    """``systemctl show -p ...`` of ``unit`` as a dict."""
    output = machine.run(["systemctl", "show", "-p", ",".join(properties), unit]).stdout
    return dict(line.split("=", 1) for line in output.splitlines() if "=" in line)


def failed_units(machine: Container) -> List[str]:
    """One line per failed unit (`systemctl list-units --failed`)."""
    output = machine.run(["systemctl", "list-units", "--failed", "--plain", "--no-legend"]).stdout
    return [line for line in output.splitlines() if line.strip()]


def test_cloud_init_is_done_without_an_error(machine: Container, suite: str) -> None:
    """After the first boot, with no command run in between, cloud-init says done,
    found the NoCloud seed, and recorded no error (recoverable ones included,
    where cloud-init 23.4 and later count them); none of its units failed."""
    status = machine.run(["cloud-init", "status", "--wait", "--long"], check=False, timeout=120)
    assert re.search(r"^status: done$", status.stdout, re.M), status.stdout + status.stderr
    result = json.loads(machine.read("/run/cloud-init/result.json"))["v1"]
    assert "NoCloud" in result["datasource"], result
    assert result["errors"] == [], result["errors"]
    assert not any(result.get("recoverable_errors", {}).values()), result["recoverable_errors"]
    failed = failed_units(machine)
    assert not [line for line in failed if "cloud" in line or "kv-" in line
                or CONSUMER in line], failed
    schema = machine.run(["cloud-init", "schema", "--config-file", f"{SEED}/user-data"],
                         check=False)
    assert schema.returncode == 0 and "Valid" in schema.stdout, schema.stdout + schema.stderr


def test_the_manifest_has_the_recipes_owner_mode_and_content(machine: Container) -> None:
    """/etc/kv-agent/manifest.yaml is the recipe's, with its owner and mode, and
    the package's own manifest was set aside (dpkg kept ours without asking)."""
    entry = recipe_file(MANIFEST)
    owner, mode = machine.run(["stat", "-c", "%U:%G %a", MANIFEST]).stdout.split()
    assert owner == entry["owner"] and mode == entry["permissions"].lstrip("0"), (owner, mode)
    assert machine.read(MANIFEST) == entry["content"]
    assert machine.run(["test", "-f", f"{MANIFEST}.dpkg-dist"], check=False).returncode == 0
    machine.run(["kv-agent", "check"])


def test_the_agent_is_enabled_active_and_wrote_the_file(machine: Container) -> None:
    """kv-agent is enabled and active, says so in `kv-agent status`, and the
    secret's file has the value, owner and mode the manifest gives."""
    assert machine.run(["systemctl", "is-enabled", "kv-agent"]).stdout.strip() == "enabled"
    assert machine.run(["systemctl", "is-active", "kv-agent"], check=False
                       ).stdout.strip() == "active"
    machine.run(["kv-agent", "status"])
    assert machine.run(["stat", "-c", "%U %a", SECRET_PATH]).stdout.split() == ["myapp", "400"]
    assert machine.read(SECRET_PATH) == SECRET_VALUE


def assert_consumer_read_after_ready(machine: Container) -> None:
    """myapp started after kv-agent became active (READY=1) and logged the size
    and the inode of the file that holds the value."""
    agent = show(machine, "kv-agent", "ActiveEnterTimestampMonotonic")
    consumer = show(machine, CONSUMER, "ExecMainStartTimestampMonotonic", "ActiveState")
    assert consumer["ActiveState"] == "active", consumer
    assert 0 < int(agent["ActiveEnterTimestampMonotonic"]) \
        <= int(consumer["ExecMainStartTimestampMonotonic"]), (agent, consumer)
    inode = machine.run(["stat", "-c", "%i", SECRET_PATH]).stdout.strip()
    expected = f"started: {SECRET_PATH}: {len(SECRET_VALUE)} bytes, inode {inode}"
    machine.wait_for(f"journalctl -b -o cat -u {CONSUMER} | grep -qx '{expected}'",
                     what=f"myapp's line {expected!r}")


def test_the_consumer_read_its_secret_after_ready(machine: Container) -> None:
    """The recipe's consumer is enabled, started after kv-agent's READY and read the file."""
    assert machine.run(["systemctl", "is-enabled", CONSUMER]).stdout.strip() == "enabled"
    assert_consumer_read_after_ready(machine)


def test_a_reboot_keeps_the_order_without_cloud_init(machine: Container, suite: str) -> None:
    """At the next boot cloud-init runs nothing again (same instance), /run starts
    empty, and the units alone bring kv-agent up before myapp, which reads the
    file the new agent wrote."""
    semaphores = f"stat -c '%n %y' /var/lib/cloud/instances/{INSTANCE_ID}/sem/*"
    runs_before = machine.sh(semaphores).stdout
    started = time.monotonic()
    machine.reboot(timeout=120)
    TIMINGS[f"{suite}: reboot to running"] = time.monotonic() - started
    status = machine.run(["cloud-init", "status", "--wait"], check=False, timeout=120)
    assert "status: done" in status.stdout, status.stdout + status.stderr
    assert machine.sh(semaphores).stdout == runs_before, "cloud-init ran the recipe again"
    assert machine.read(SECRET_PATH) == SECRET_VALUE
    assert_consumer_read_after_ready(machine)
