"""``kv-agent demo``: the whole path, end to end, with no Azure.

Starts the local emulator with a few sample secrets, writes a manifest, and
runs the real ``kv-agent`` command against it (as a subprocess, exactly as an
operator would) into a tmpfs directory: first sync, an idempotent re-run, a
rotation, and a failing secret that keeps its last good file. It checks each
step and prints what happened; it never prints a secret's value.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from typing import Callable, Dict, List, Mapping, Tuple

from agent.errors import EXIT_FAILURE, EXIT_OK, KvAgentError

Say = Callable[[str], None]
MARKER = ".kv-agent-demo"
DEMO_SECRETS: Dict[str, str] = {
    "db-password": "demo-only-correct-horse-battery-staple",
    "api-key": "demo-only-4c1f9a7e2b",
    "tls-key": "-----BEGIN PRIVATE KEY-----\ndemo-only\n-----END PRIVATE KEY-----\n",
}


def environ_for_emulator(imds: str, ca_path: str, base: Mapping[str, str]) -> Dict[str, str]:
    """The environment that points a kv-agent process at an emulator."""
    env = dict(base)
    env.update({"KV_AGENT_IMDS_ENDPOINT": imds, "REQUESTS_CA_BUNDLE": ca_path})
    return env


def demo_manifest(vault: str, secrets_dir: str, uid: int, gid: int) -> str:
    """The demo's manifest text: three secrets and one optional missing one."""
    return f"""\
# kv-agent demo manifest (the emulator's vault; files owned by you)
vault: {vault}
directory: {secrets_dir}
refresh: 15m
secrets:
  - name: db-password
    path: db-password
    owner: {uid}
    group: {gid}
    mode: "0440"
  - name: api-key
    path: app/api-key
    owner: {uid}
    group: {gid}
    mode: "0400"
  - name: tls-key
    path: tls/server.key
    owner: {uid}
    group: {gid}
    mode: "0400"
  - name: feature-flag        # not in the vault: reported, fails nothing
    path: feature-flag
    owner: {uid}
    group: {gid}
    mode: "0444"
    optional: true
"""


def _prepare_directory(directory: str) -> None:
    """Use ``directory`` only if it is new or a previous demo's (marker)."""
    if os.path.lexists(directory):
        if not os.path.exists(os.path.join(directory, MARKER)):
            raise KvAgentError(f"{directory} exists and is not a kv-agent demo directory",
                               "pass --directory with a new path under /dev/shm")
        shutil.rmtree(directory)
    os.makedirs(directory, mode=0o700)
    with open(os.path.join(directory, MARKER), "w", encoding="utf-8"):
        pass


def _listing(root: str) -> List[Tuple[str, os.stat_result]]:
    found = []
    for dirpath, _dirs, files in os.walk(root):
        for name in sorted(files):
            path = os.path.join(dirpath, name)
            found.append((path, os.lstat(path)))
    return sorted(found)


def _show_files(root: str, say: Say) -> None:
    for path, st in _listing(root):
        say(f"    {stat.filemode(st.st_mode)} {st.st_uid}:{st.st_gid} "
            f"{st.st_size:5d} bytes  inode {st.st_ino}  {path}")


def _run(argv: List[str], env: Mapping[str, str], say: Say) -> int:
    say("  $ kv-agent " + " ".join(argv))
    done = subprocess.run([sys.executable, "-m", "agent", *argv], env=dict(env),
                          capture_output=True, text=True, timeout=120, check=False)
    for line in (done.stdout + done.stderr).splitlines():
        say(f"    {line}")
    say(f"    (exit code {done.returncode})")
    return done.returncode


def run_demo(directory: str, say: Say) -> int:
    """Run the demo; returns 0 when every step behaved as described."""
    from agent.emulator import Emulator

    _prepare_directory(directory)
    secrets_dir = os.path.join(directory, "secrets")
    manifest_path = os.path.join(directory, "manifest.yaml")
    failures: List[str] = []

    def expect(condition: bool, what: str) -> None:
        say(f"  {'ok' if condition else 'UNEXPECTED'}: {what}")
        if not condition:
            failures.append(what)

    with Emulator(DEMO_SECRETS, cert_dir=os.path.join(directory, "emulator")) as emulator:
        with open(os.open(manifest_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600),
                  "w", encoding="utf-8") as handle:
            handle.write(demo_manifest(emulator.vault_url, secrets_dir,
                                       os.getuid(), os.getgid()))
        env = environ_for_emulator(emulator.imds_endpoint, emulator.ca_path, os.environ)
        say("kv-agent demo: a local IMDS and Key Vault emulator (no Azure involved)")
        say(f"  IMDS:  {emulator.imds_endpoint}")
        say(f"  vault: {emulator.vault_url}  (CA {emulator.ca_path})")
        say(f"  manifest: {manifest_path}")

        say("\n1. Validate the manifest (no network):")
        expect(_run(["check", "--manifest", manifest_path], env, say) == 0, "manifest valid")

        say("\n2. First sync: every secret becomes a file with its owner and mode:")
        code = _run(["once", "--manifest", manifest_path], env, say)
        expect(code == 0, "exit 0 although the optional secret is missing")
        _show_files(secrets_dir, say)
        first = dict(_listing(secrets_dir))
        expect(len(first) == 3, "three files written")

        say("\n3. Run again: nothing changed, so no file is touched (same inodes):")
        _run(["once", "--manifest", manifest_path], env, say)
        again = dict(_listing(secrets_dir))
        expect(all(again[p].st_ino == first[p].st_ino and
                   again[p].st_mtime_ns == first[p].st_mtime_ns for p in first),
               "same inode and mtime for every file")

        say("\n4. Rotate db-password in the vault; the next sync replaces it atomically:")
        emulator.set_secret("db-password", "demo-only-rotated-value")
        _run(["once", "--manifest", manifest_path], env, say)
        rotated = dict(_listing(secrets_dir))
        db = os.path.join(secrets_dir, "db-password")
        expect(rotated[db].st_ino != first[db].st_ino, "db-password replaced (new inode)")

        say("\n5. Disable api-key in the vault: the run fails, the last good file stays:")
        emulator.disable_secret("api-key")
        code = _run(["once", "--manifest", manifest_path], env, say)
        kept = os.path.join(secrets_dir, "app", "api-key")
        expect(code != 0 and os.path.exists(kept), "non-zero exit, api-key kept")

    say("\nLook at the files yourself (they stay until you delete them):")
    say(f"  ls -lR {secrets_dir}")
    say(f"  cat {db}")
    say(f"  cat {manifest_path}")
    say("Run the emulator on its own to try your own manifest: kv-agent emulator --help")
    if failures:
        say(f"\nkv-agent demo: {len(failures)} step(s) did not behave as expected")
        return EXIT_FAILURE
    say("\nkv-agent demo: done")
    return EXIT_OK
