"""``kv-agent demo``: the whole path, end to end, with no Azure.

Starts the local emulator with a few sample secrets, writes a manifest, and
runs the real ``kv-agent`` command against it (as a subprocess, exactly as an
operator would) into a tmpfs directory: first sync, an idempotent re-run, a
rotation, and a failing secret that keeps its last good file. It checks each
step and prints what happened; it never prints a secret's value.

Each step builds on the one before (the rotation compares inodes with the
first sync), so the demo stops at the first step that does not behave as
described, says which, and returns a failure exit code: it never goes on to
compare files that are not there.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from agent.base.errors import (
    EXIT_FAILURE,
    EXIT_OK,
    KvAgentError,
    MissingDependencyError,
    WriteError,
)
from agent.emulator.facade import Emulator

Say = Callable[[str], None]
MARKER = ".kv-agent-demo"
STEP_TIMEOUT_S = 120.0
# The files the demo manifest asks for (relative to the secrets directory);
# feature-flag is optional and missing from the vault, so it never appears.
EXPECTED_FILES = ("app/api-key", "db-password", "tls/server.key")
# Run by ``python -c``: put the directory the demo's own ``agent`` package came
# from (argv[1]) first on sys.path, then run the command line with the rest.
_ENTRY = ("import sys; sys.path.insert(0, sys.argv.pop(1)); "
          "from agent.cli import main; sys.exit(main())")
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


def kv_agent_command() -> List[str]:
    """The argv prefix that runs this very kv-agent in a child process.

    The child uses the running interpreter (``sys.executable``) and imports
    ``agent`` from the directory this module was imported from. ``python3 -m
    agent`` is not enough: the .deb and the .rpm install the package privately
    in /usr/lib/kv-agent, which only /usr/bin/kv-agent puts on sys.path, so
    ``-m`` finds no ``agent`` there, or another copy (site-packages, or the
    current directory, which ``-m`` and ``-c`` put first). Inserting the
    directory explicitly works the same in a venv (site-packages), in
    /usr/lib/kv-agent and in a source checkout. PYTHONPATH would not: the
    packaged launcher runs ``python3 -I``, which ignores it, and it comes
    after the current directory. ``-I`` is passed on when the demo runs with
    it, so the steps are isolated exactly as the command itself is.
    """
    import agent

    package_root = os.path.dirname(os.path.dirname(os.path.abspath(agent.__file__)))
    flags = ["-I"] if sys.flags.isolated else []
    return [sys.executable, *flags, "-c", _ENTRY, package_root]


def require_cryptography() -> None:
    """Raise MissingDependencyError unless ``cryptography`` can be imported.

    The emulator needs it for its throw-away CA; checking first gives one
    line naming the package instead of a failure halfway through the demo.
    """
    try:
        import cryptography.x509  # noqa: F401
    except ImportError:
        raise MissingDependencyError(
            "kv-agent demo needs the Python package 'cryptography' for its emulator's "
            "test certificates",
            "install python3-cryptography (Debian, Ubuntu, RHEL, Azure Linux) "
            "or run pip install 'kv-agent[emulator]'") from None


def _prepare_directory(directory: str) -> None:
    """Use ``directory`` only if it is new or a previous demo's (marker)."""
    if os.path.lexists(directory):
        if not os.path.exists(os.path.join(directory, MARKER)):
            raise KvAgentError(f"{directory} exists and is not a kv-agent demo directory",
                               "pass --directory with a new path under /dev/shm")
        shutil.rmtree(directory)
    try:
        os.makedirs(directory, mode=0o700)
        with open(os.path.join(directory, MARKER), "w", encoding="utf-8"):
            pass
    except OSError as exc:
        raise WriteError(f"cannot create the demo directory {directory}: "
                         f"{exc.strerror or exc}",
                         "pass --directory with a new path on a tmpfs you can write, "
                         "e.g. under /dev/shm") from None


def _listing(root: str) -> Dict[str, os.stat_result]:
    """Every file under ``root``, by path relative to it, with its lstat."""
    found = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            found[os.path.relpath(path, root)] = os.lstat(path)
    return found


def _show_files(root: str, say: Say) -> None:
    for relative, st in sorted(_listing(root).items()):
        say(f"    {stat.filemode(st.st_mode)} {st.st_uid}:{st.st_gid} "
            f"{st.st_size:5d} bytes  inode {st.st_ino}  {os.path.join(root, relative)}")


def _identity(listing: Mapping[str, os.stat_result]) -> Dict[str, Tuple[int, int]]:
    """Path -> (inode, mtime): what changes when a file is replaced or rewritten."""
    return {path: (st.st_ino, st.st_mtime_ns) for path, st in listing.items()}


class _StepFailedError(Exception):
    """A demo step did not behave as described; the later steps depend on it."""


class _Steps:
    """Runs the demo's commands and checks, and remembers whether a step failed."""

    def __init__(self, command: Sequence[str], env: Mapping[str, str], say: Say) -> None:
        self._command = list(command)
        self._env = dict(env)
        self._say = say
        self._failed: List[str] = []

    def run(self, *argv: str) -> Optional[int]:
        """Run ``kv-agent ARGV`` and show its output; returns its exit code,
        or None when it could not be started or did not finish in time."""
        self._say("  $ kv-agent " + " ".join(argv))
        try:
            done = subprocess.run([*self._command, *argv], env=self._env,
                                  capture_output=True, text=True, timeout=STEP_TIMEOUT_S,
                                  check=False)
        except subprocess.TimeoutExpired:
            self._say(f"    (no result after {STEP_TIMEOUT_S:.0f} s; stopped)")
            return None
        except OSError as exc:
            self._say(f"    (cannot start {self._command[0]}: {exc.strerror or exc})")
            return None
        for line in (done.stdout + done.stderr).splitlines():
            self._say(f"    {line}")
        self._say(f"    (exit code {done.returncode})")
        return done.returncode

    def expect(self, condition: bool, what: str) -> None:
        self._say(f"  {'ok' if condition else 'UNEXPECTED'}: {what}")
        if not condition:
            self._failed.append(what)

    def end_step(self, number: int) -> None:
        """Stop the demo here if anything in step ``number`` was unexpected."""
        if self._failed:
            raise _StepFailedError(f"step {number}: " + "; ".join(self._failed))


def run_demo(directory: str, say: Say, command: Optional[Sequence[str]] = None) -> int:
    """Run the demo; returns 0 when every step behaved as described, else 1
    (after the first step that did not). ``command`` runs kv-agent (default:
    :func:`kv_agent_command`).

    Raises MissingDependencyError without ``cryptography``, KvAgentError or
    WriteError when the directory or the emulator cannot be set up.
    """
    require_cryptography()
    _prepare_directory(directory)
    secrets_dir = os.path.join(directory, "secrets")
    manifest_path = os.path.join(directory, "manifest.yaml")
    emulator = Emulator(DEMO_SECRETS, cert_dir=os.path.join(directory, "emulator"))
    try:
        emulator.start()
    except OSError as exc:
        raise KvAgentError(f"cannot start the demo's emulator on 127.0.0.1: "
                           f"{exc.strerror or exc}", "check that loopback is up") from None
    try:
        with open(os.open(manifest_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600),
                  "w", encoding="utf-8") as handle:
            handle.write(demo_manifest(emulator.vault_url, secrets_dir,
                                       os.getuid(), os.getgid()))
        env = environ_for_emulator(emulator.imds_endpoint, emulator.ca_path, os.environ)
        say("kv-agent demo: a local IMDS and Key Vault emulator (no Azure involved)")
        say(f"  IMDS:  {emulator.imds_endpoint}")
        say(f"  vault: {emulator.vault_url}  (CA {emulator.ca_path})")
        say(f"  manifest: {manifest_path}")
        steps = _Steps(kv_agent_command() if command is None else command, env, say)
        try:
            _run_steps(steps, emulator, manifest_path, secrets_dir, say)
        except _StepFailedError as exc:
            say(f"\nkv-agent demo: stopped: {exc} (the output above shows why)")
            return EXIT_FAILURE
    finally:
        emulator.stop()

    say("\nLook at the files yourself (they stay until you delete them):")
    say(f"  ls -lR {secrets_dir}")
    say(f"  cat {os.path.join(secrets_dir, 'db-password')}")
    say(f"  cat {manifest_path}")
    say("Run the emulator on its own to try your own manifest: kv-agent emulator --help")
    say("\nkv-agent demo: done")
    return EXIT_OK


def _run_steps(steps: _Steps, emulator: Emulator, manifest: str, secrets_dir: str,
               say: Say) -> None:
    """The five steps; raises _StepFailedError after the first unexpected one."""
    say("\n1. Validate the manifest (no network):")
    steps.expect(steps.run("check", "--manifest", manifest) == EXIT_OK, "manifest valid")
    steps.end_step(1)

    say("\n2. First sync: every secret becomes a file with its owner and mode:")
    code = steps.run("once", "--manifest", manifest)
    steps.expect(code == EXIT_OK, "exit 0 although the optional secret is missing")
    _show_files(secrets_dir, say)
    first = _identity(_listing(secrets_dir))
    steps.expect(sorted(first) == sorted(EXPECTED_FILES),
                 f"{len(EXPECTED_FILES)} files written: {', '.join(EXPECTED_FILES)}")
    steps.end_step(2)

    say("\n3. Run again: nothing changed, so no file is touched (same inodes):")
    code = steps.run("once", "--manifest", manifest)
    steps.expect(code == EXIT_OK and _identity(_listing(secrets_dir)) == first,
                 "exit 0, same inode and mtime for every file")
    steps.end_step(3)

    say("\n4. Rotate db-password in the vault; the next sync replaces it atomically:")
    emulator.set_secret("db-password", "demo-only-rotated-value")
    code = steps.run("once", "--manifest", manifest)
    rotated = _identity(_listing(secrets_dir))
    replaced = [path for path in first if rotated.get(path) != first[path]]
    steps.expect(code == EXIT_OK and replaced == ["db-password"],
                 "exit 0, db-password replaced (new inode), the others untouched")
    steps.end_step(4)

    say("\n5. Disable api-key in the vault: the run fails, the last good file stays:")
    emulator.disable_secret("api-key")
    code = steps.run("once", "--manifest", manifest)
    kept = _identity(_listing(secrets_dir)).get("app/api-key")
    steps.expect(code == EXIT_FAILURE and kept is not None
                 and kept == rotated.get("app/api-key"),
                 "exit 1 (a secret failed), api-key's last good file kept")
    steps.end_step(5)
