#!/usr/bin/env python3
"""The floor for ``kv-agent once``: a minimal Python client doing the same job.

It sends the requests ``kv-agent once`` sends (one IMDS token, the vault's
unauthenticated challenge, then one GET per secret over 16 keep-alive
connections, as ``agent.vault.client.MAX_CONCURRENCY``) and writes each value
atomically (temp file, mode, fsync, rename) under the manifest's directory,
with none of the agent's checks: no bounds on time or size, no validation,
no retries, no status. What no agent built on requests and PyYAML can beat.

Run by ``tests/bench/once.py``: ``python floor.py MANIFEST``, with
KV_AGENT_IMDS_ENDPOINT and REQUESTS_CA_BUNDLE set (loopback only).
"""

import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Dict

import requests
import yaml

CONCURRENCY = 16
API_VERSION = "7.6"


def main() -> int:
    with open(sys.argv[1], "rb") as handle:
        manifest = yaml.load(handle.read(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    vault, directory = manifest["vault"], manifest["directory"]
    os.makedirs(directory, exist_ok=True)
    session = requests.Session()
    session.trust_env = False
    adapter = requests.adapters.HTTPAdapter(pool_maxsize=CONCURRENCY)
    session.mount("https://", adapter)
    session.verify = os.environ["REQUESTS_CA_BUNDLE"]
    token = requests.get(os.environ["KV_AGENT_IMDS_ENDPOINT"], headers={"Metadata": "true"},
                         params={"api-version": "2018-02-01",
                                 "resource": "https://vault.azure.net"}).json()["access_token"]
    session.get(f"{vault}/secrets", params={"api-version": API_VERSION})  # the challenge
    headers = {"Authorization": f"Bearer {token}"}

    def fetch(entry: Dict[str, str]) -> None:
        name = entry["name"]
        reply = session.get(f"{vault}/secrets/{name}", params={"api-version": API_VERSION},
                            headers=headers)
        reply.raise_for_status()
        value = json.loads(reply.content)["value"].encode()
        path = os.path.join(directory, name)
        temp = os.path.join(directory, f".tmp-{name}")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.fchmod(fd, int(entry.get("mode", "0600"), 8))
            os.write(fd, value)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, path)

    with ThreadPoolExecutor(CONCURRENCY) as pool:
        list(pool.map(fetch, manifest["secrets"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
