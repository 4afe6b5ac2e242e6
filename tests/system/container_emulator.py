"""Runs INSIDE the test container only: kv-agent's emulator as the real
endpoints, so the agent runs with its production defaults.

IMDS answers on http://169.254.169.254:80 and the vault on
https://NAME.vault.azure.net:443 (an /etc/hosts entry points NAME at the same
address; the test adds the address to the container's loopback after checking
that the container has its own network namespace). The certificates go to
--cert-dir; the test puts ca.pem into the container's trust store.

SIGHUP re-reads the secrets file and adds a new version of every secret
whose value changed: that is how the test rotates a secret. Uses the
emulator module the .deb installed under /usr/lib/kv-agent.
"""

import argparse
import signal
import sys
import threading

sys.path.insert(0, "/usr/lib/kv-agent")

from agent.emulator import Emulator, load_secrets_file  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--secrets", required=True)
    parser.add_argument("--host", required=True)
    parser.add_argument("--vault-hostname", required=True)
    parser.add_argument("--cert-dir", required=True)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    args = parser.parse_args()

    current = load_secrets_file(args.secrets)
    emulator = Emulator(current, host=args.host, imds_port=80, vault_port=443,
                        vault_hostname=args.vault_hostname, cert_dir=args.cert_dir,
                        latency_s=args.latency_ms / 1000.0)
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
    finally:
        emulator.stop()


if __name__ == "__main__":
    sys.exit(main())
