"""A value from the vault never takes the agent down (issue 17, items 1 to 3), end to end.

``kv-agent once``, ``doctor`` and ``run`` against the emulator serving hostile values: a
certificate bundle with an SM2 certificate (whose public key cryptography cannot load), an
X25519 leaf asked for a pfx, PKCS#12 iteration counts and PEM that used to hold the CPU for
tens of seconds, and ``nbf``/``exp`` near 2^62. The run harness is tests/test_daemon.py's.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Sequence

import pytest
from certs import (
    PEM,
    PKCS12,
    Pki,
    cert_bag,
    data_content,
    encrypted_content,
    key_bag,
    make_pki,
    pem_block,
    pfx,
    shrouded_key_bag,
    sm2_certificate,
)
from daemon_harness import Datagram
from test_daemon import (  # noqa: F401 (fixtures)
    StartAgent,
    Vault,
    entry,
    manifest_text,
    read,
    run_cli,
    short_dir,
    start_agent,
    vault,
    write_file,
)

from agent.pipeline.pkcs12 import MAX_ITERATIONS

pytestmark = pytest.mark.integration

FREEZE_LIMIT_S = 2.0  # no value may keep the loop from answering for longer (item 2)


def put_typed(store: Vault, name: str, value: str, content_type: str) -> None:
    """Store a certificate-shaped value (kept for the leak check)."""
    store.values.add(value)
    store.emulator.set_secret(name, value, content_type=content_type)


def sm2_bundle(pki: Pki) -> str:
    """A good key, leaf, intermediate and root, and an SM2 certificate beside them."""
    return pki.pem() + pem_block("CERTIFICATE", sm2_certificate()).decode()


def x25519_pfx() -> str:
    """An X25519 leaf and its chain as a Key Vault PKCS#12 (no PKCS#12 can hold its key)."""
    x = make_pki("x25519", "x25519.example")
    return base64.b64encode(pfx([data_content(
        [key_bag(x.key_der())] + [cert_bag(c) for c in x.certificates_der()])])).decode()


def certificate_entry(name: str, directory: str, *kinds: str, **keys: Any) -> Dict[str, Any]:
    return {"name": name, "certificate": {kind: f"{directory}/{kind}.pem" for kind in kinds},
            **keys}


def cli_env(store: Vault) -> Dict[str, str]:
    env = {key: value for key, value in os.environ.items()
           if key not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "KV_AGENT_MANIFEST")}
    env.update(KV_AGENT_IMDS_ENDPOINT=store.emulator.imds_endpoint,
               REQUESTS_CA_BUNDLE=store.emulator.ca_path, NO_PROXY="127.0.0.1,localhost")
    return env


def write_manifest(path: Path, store: Vault, directory: Path,
                   entries: Sequence[Mapping[str, Any]]) -> Path:
    write_file(path, manifest_text(store.url, directory, entries))
    return path


@pytest.fixture
def bundles(vault: Vault) -> Pki:  # noqa: F811 (the fixture)
    """The vault holds: plain, sm2-bundle (PEM), x25519-tls (PKCS#12) and far-dates
    (nbf and exp near 2^62); returns the PKI of sm2-bundle's good chain."""
    pki = make_pki("ec")
    vault.put("plain")
    put_typed(vault, "sm2-bundle", sm2_bundle(pki), PEM)
    put_typed(vault, "x25519-tls", x25519_pfx(), PKCS12)
    value = "far " + os.urandom(8).hex()
    vault.values.add(value)
    vault.emulator.set_secret("far-dates", value, not_before=2**62, expires_on=2**62 + 1)
    return pki


ONE_BAD_ENTRY = [entry("plain"), certificate_entry("sm2-bundle", "web", "key", "fullchain"),
                 certificate_entry("x25519-tls", "x", "cert", "pfx"), entry("far-dates")]


def test_once_fails_only_the_certificate_it_cannot_convert(
        vault: Vault, bundles: Pki, shm_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    """once writes the plain secret, the bundle without its SM2 certificate and the far-dated
    secret, fails the X25519 pfx alone in one line with its fix, and exits 1 (some secret
    failed), never 70 with a traceback."""
    out = shm_dir / "out"
    manifest = write_manifest(tmp_path / "m.yaml", vault, out, ONE_BAD_ENTRY)

    done = run_cli(["once", "--manifest", str(manifest)], cli_env(vault))

    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("kv-agent: error:")]
    assert len(errors) == 1 and "secret 'x25519-tls'" in errors[0], done.stderr
    assert "cannot be written to a pfx" in errors[0] and "ask for key and cert" in errors[0]
    assert (out / "web" / "fullchain.pem").read_bytes() == b"".join(
        bundles.pem_blocks()[1:])
    assert (out / "plain").exists() and (out / "far-dates").exists()
    assert "the vault sent nbf and exp outside 1970..9999" in done.stderr
    assert not (out / "x").exists()


def test_doctor_reports_the_failing_certificate_without_a_traceback(
        vault: Vault, bundles: Pki, shm_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    """doctor fails the X25519 entry's transform check with its fix, passes the SM2 bundle and
    the far-dated secret (no expiry known), and exits 1, never 70 with a traceback."""
    manifest = write_manifest(tmp_path / "m.yaml", vault, shm_dir / "out", ONE_BAD_ENTRY)

    done = run_cli(["doctor", "--manifest", str(manifest), "--json"], cli_env(vault))

    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    checks = json.loads(done.stdout)
    failed = [check for check in checks if check["state"] == "fail"]
    assert [(check["subject"], check["check"]) for check in failed] == [
        ("certificate x25519-tls", "transform")], failed
    assert "cannot be written to a pfx" in failed[0]["detail"]
    sm2 = [check for check in checks if check["subject"] == "certificate sm2-bundle"]
    assert sm2 and all(check["state"] == "ok" for check in sm2), sm2


def test_run_keeps_refreshing_around_a_certificate_it_cannot_convert(
        start_agent: StartAgent, vault: Vault, bundles: Pki) -> None:  # noqa: F811
    """run sends READY once every required file is on disk although an optional certificate
    cannot be converted, says why in status.json, and goes on refreshing the others."""
    entries: List[Dict[str, Any]] = [
        entry("plain"), certificate_entry("sm2-bundle", "web", "key", "fullchain"),
        certificate_entry("x25519-tls", "x", "cert", "pfx", optional=True)]
    run = start_agent(entries)
    run.wait_ready()
    assert (run.directory / "web" / "fullchain.pem").exists()
    failing = [e for e in run.status_json()["secrets"] if e.get("error")]
    assert [e["name"] for e in failing] == ["x25519-tls"], failing
    assert "cannot be written to a pfx" in failing[0]["error"]
    rotated = vault.put("plain")
    run.wait_content("plain", rotated)
    assert "Traceback" not in run.process.stderr
    run.stop()


def test_run_with_dates_beyond_9999_stays_up_and_writes_status(
        start_agent: StartAgent, vault: Vault, bundles: Pki) -> None:  # noqa: F811
    """nbf and exp near 2^62 are read as no date: run writes the secret, sends READY, writes
    status.json (no expiry shown) and keeps refreshing; it used to exit 70."""
    run = start_agent([entry("far-dates"), entry("plain")])
    run.wait_ready()
    document = run.wait_status_json(lambda d: d.get("state") == "ready", "status.json ready")
    far = [e for e in document["secrets"] if e["name"] == "far-dates"]
    assert far and far[0].get("expires") is None and far[0].get("not_before") is None
    rotated = vault.put("plain")
    run.wait_content("plain", rotated)
    assert len(run.process.lines("outside 1970..9999")) == 1
    assert run.status_cli().returncode == 0
    run.stop()


def _watchdog_gaps(messages: Sequence[Datagram], until: float) -> List[float]:
    beats = [m.at for m in messages if m.has("WATCHDOG", "1") and m.at <= until]
    return [later - earlier for earlier, later in zip(beats, beats[1:])]


def test_no_value_keeps_the_loop_from_the_watchdog_or_sigterm(
        start_agent: StartAgent, vault: Vault) -> None:  # noqa: F811
    """With the costliest values we could build in the vault (the reported 2^26 MAC
    PKCS#12, 240 KB of BEGIN lines, iteration counts at the bounds, deep ASN.1), the
    watchdog keeps beating at its interval and SIGTERM is answered (STOPPING=1) within 2 s,
    even in the middle of the costliest conversion; the figures are printed (pytest -s)."""
    pki = make_pki("ec", "hostile.example")
    chain = [cert_bag(c) for c in pki.certificates_der()]
    hostile = {
        "mac-2-26": pfx([data_content([key_bag(pki.key_der()), chain[0]])],
                        mac_iterations=2**26),
        "pbes2-bounds": pfx([encrypted_content(chain, iterations=MAX_ITERATIONS),
                             data_content([shrouded_key_bag(pki.key_der(),
                                                            iterations=MAX_ITERATIONS)])]),
        "des-bound": pfx([encrypted_content(chain, iterations=MAX_ITERATIONS,
                                            scheme="pkcs12-3des"),
                          data_content([key_bag(pki.key_der())])]),
        "deep": b"\x30\x80" * 30_000,
    }
    for name, data in hostile.items():
        put_typed(vault, name, base64.b64encode(data).decode(), PKCS12)
    put_typed(vault, "begin-lines", "-----BEGIN CERTIFICATE-----\n" * (240_000 // 28), PEM)
    vault.put("plain")
    names = [*hostile, "begin-lines"]
    run = start_agent([entry("plain")] + [
        certificate_entry(name, name, "cert", optional=True) for name in names],
        env={"WATCHDOG_USEC": "400000"})  # a beat every 0.2 s
    run.wait_ready()
    run.wait(lambda: run.status_json().get("last_refresh"), "a first whole refresh")
    beats_until = time.monotonic()
    start_gaps = _watchdog_gaps(run.notes.messages, beats_until)
    assert len(start_gaps) >= 3, run.describe()

    # SIGTERM in the middle of the costliest conversion: a new version of pbes2-bounds
    # (two 1,000,000-iteration derivations) has just been fetched.
    before = len(vault.emulator.vault_log)
    put_typed(vault, "pbes2-bounds", base64.b64encode(hostile["pbes2-bounds"]).decode(),
              PKCS12)
    run.wait(lambda: any("/secrets/pbes2-bounds" in r.path
                         for r in vault.emulator.vault_log[before:]), "the new version's GET")
    sent = time.monotonic()
    run.process.send_signal(signal.SIGTERM)
    code = run.process.wait(15.0)
    exited = time.monotonic() - sent
    stopping = run.notes.with_key("STOPPING", "1")
    assert code == 0 and stopping, run.describe()
    answered = stopping[0].at - sent
    worst_gap = max(_watchdog_gaps(run.notes.messages, stopping[0].at))
    print(f"watchdog: longest gap {worst_gap:.3f} s (interval 0.2 s); SIGTERM answered "
          f"(STOPPING=1) after {answered:.3f} s, process exited after {exited:.3f} s")
    assert worst_gap < FREEZE_LIMIT_S, run.describe()
    assert answered < FREEZE_LIMIT_S, run.describe()
    assert exited < 3.0, run.describe()  # test_daemon's PROMPT_EXIT_S
    assert "Traceback" not in run.process.stderr
