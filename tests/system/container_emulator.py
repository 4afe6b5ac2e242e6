"""Runs INSIDE the test container only: kv-agent's emulator as the real
endpoints, so the agent runs with its production defaults.

IMDS answers on http://169.254.169.254:80 and the vault on
https://NAME.vault.azure.net:443 (an /etc/hosts entry points NAME at the same
address; the test adds the address to the container's loopback after checking
that the container has its own network namespace). The certificates go to
--cert-dir; the test puts ca.pem into the container's trust store.

SIGHUP re-reads the secrets file and adds a new version of every secret
whose value changed: that is how the test rotates a secret. It re-reads the
--forbidden file too (``NAME: INNER_CODE`` lines, e.g. ``db-password:
ForbiddenByRbac``; missing or empty: nothing forbidden), so a GET of a listed
secret answers 403 with that code, as when the identity loses its role, and
a name taken off the list is readable again. Uses the emulator module the
.deb installed under /usr/lib/kv-agent, or the tree under $KV_TEST_EMULATOR_LIB:
a test that upgrades, downgrades and purges the packages keeps its vault apart
from them (test_nspawn_upgrade.py), and the cloud-init test unpacks the .debs
there, so that the image holds the emulator while kv-agent itself is not
installed yet (test_nspawn_cloudinit.py).
"""

import argparse
import os
import signal
import sys
import threading

sys.path.insert(0, os.environ.get("KV_TEST_EMULATOR_LIB", "/usr/lib/kv-agent"))

import yaml  # noqa: E402

from agent.emulator import Emulator, load_secrets_file  # noqa: E402


def load_forbidden(path: "str | None") -> "dict[str, str]":
    """The --forbidden file's name -> inner code ({} when there is none)."""
    if not path or not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as handle:
        content = yaml.safe_load(handle) or {}
    return {str(name): str(code) for name, code in content.items()}


def apply_forbidden(emulator: Emulator, before: "dict[str, str]",
                    after: "dict[str, str]") -> None:
    """Forbid what ``after`` adds or changes, allow what it drops; one line each."""
    for name in before:
        if name not in after:
            emulator.allow_secret(name)
            print(f"allowed {name}", flush=True)
    for name, code in after.items():
        if before.get(name) != code:
            emulator.forbid_secret(name, code)
            print(f"forbidden {name} ({code})", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--secrets", required=True)
    parser.add_argument("--forbidden", default=None)
    parser.add_argument("--host", required=True)
    parser.add_argument("--vault-hostname", required=True)
    parser.add_argument("--cert-dir", required=True)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    args = parser.parse_args()

    current = load_secrets_file(args.secrets)
    emulator = Emulator(current, host=args.host, imds_port=80, vault_port=443,
                        vault_hostname=args.vault_hostname, cert_dir=args.cert_dir,
                        latency_s=args.latency_ms / 1000.0)
    forbidden = load_forbidden(args.forbidden)
    apply_forbidden(emulator, {}, forbidden)
    stop = threading.Event()
    reload = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGHUP, lambda *_: (reload.set(), stop.set()))
    emulator.start()
    print(f"emulator ready: {emulator.imds_endpoint} {emulator.vault_url}", flush=True)
    try:
        while True:
            stop.wait()
            if not reload.is_set():
                return 0
            reload.clear()
            stop.clear()
            latest = load_secrets_file(args.secrets)
            for name, value in latest.items():
                if current.get(name) != value:
                    emulator.set_secret(name, value)
                    print(f"rotated {name}", flush=True)  # never the value
            current = latest
            latest_forbidden = load_forbidden(args.forbidden)
            apply_forbidden(emulator, forbidden, latest_forbidden)
            forbidden = latest_forbidden
    finally:
        emulator.stop()


if __name__ == "__main__":
    sys.exit(main())
