"""The ``kv-agent`` command line: the only module that prints to users and
chooses exit codes.

Every foreseeable failure arrives as a KvAgentError and becomes
``kv-agent: error: ...`` plus its exit code; a traceback appears only for a
bug, or with ``--debug``. Imports of heavy modules are deferred to the
subcommand that needs them, so ``check`` and ``--help`` stay fast.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import traceback
from typing import TYPE_CHECKING, Any, Callable, List, Mapping, Optional, Sequence, TextIO

from agent import __version__
from agent.base.errors import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_SOFTWARE,
    EXIT_UNAVAILABLE,
    KvAgentError,
    ManifestError,
    MissingDependencyError,
)
from agent.base.logs import configure_logging

if TYPE_CHECKING:
    from agent.emulator import Emulator
    from agent.sync.sync import SecretOutcome

MANIFEST_ENV = "KV_AGENT_MANIFEST"
DEFAULT_MANIFEST = "/etc/kv-agent/manifest.yaml"

class _CommandParser(argparse.ArgumentParser):
    """A subcommand's parser: it accepts the global options too, so
    `kv-agent check --debug` works like `kv-agent --debug check`. Their
    default is SUPPRESS: a subcommand not given them keeps the values parsed
    before it instead of resetting them to False."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        _add_global_options(self, default=argparse.SUPPRESS)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; factored out so tests can inspect it."""
    from agent.base.retry import ONCE_RETRY_S  # light: the standard library only

    parser = argparse.ArgumentParser(
        prog="kv-agent",
        description="Materialise Azure Key Vault secrets into files on tmpfs, "
        "authenticated by the VM's managed identity.")
    parser.add_argument("--version", action="version", version=f"kv-agent {__version__}")
    _add_global_options(parser, default=False)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True,
                                     parser_class=_CommandParser)

    def with_manifest(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--manifest", metavar="FILE",
                         help=f"manifest file (default ${MANIFEST_ENV} or {DEFAULT_MANIFEST})")

    def with_state_dir(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--state-dir", metavar="DIR",
                         help="the agent's state directory (default $KV_AGENT_STATE_DIR "
                              "or /run/kv-agent)")

    once = commands.add_parser("once", help="fetch every secret once and write the files")
    with_manifest(once)
    once.add_argument("--retry-for", metavar="SECONDS", type=float, default=ONCE_RETRY_S,
                      help="keep retrying an unavailable IMDS or vault this long "
                           f"(default {ONCE_RETRY_S:g})")
    once.set_defaults(handler=_cmd_once)

    check = commands.add_parser("check", help="validate the manifest without network access")
    with_manifest(check)
    check.set_defaults(handler=_cmd_check)

    run = commands.add_parser(
        "run", help="run the agent: keep the files current until stopped (systemd service)")
    with_manifest(run)
    with_state_dir(run)
    run.set_defaults(handler=_cmd_run)

    status = commands.add_parser(
        "status", help="show the running agent's status; non-zero when a secret is failing")
    with_state_dir(status)
    status.add_argument("--json", action="store_true", help="print the status document")
    status.set_defaults(handler=_cmd_status)

    doctor = commands.add_parser(
        "doctor", help="check the whole chain (manifest, directory, identity, vaults, secrets, "
                       "the running agent) and say how to fix what fails")
    with_manifest(doctor)
    doctor.add_argument("--json", action="store_true", help="print the checks as JSON")
    doctor.add_argument("--no-unit-env", action="store_true",
                        help="check with this shell's environment, not kv-agent.service's")
    doctor.set_defaults(handler=_cmd_doctor)

    adopt = commands.add_parser(
        "import", help="print the manifest equivalent to another tool's configuration")
    adopt.add_argument("kind", choices=["vm-extension"],
                       help="vm-extension: the Key Vault VM extension for Linux's settings")
    adopt.add_argument("file", metavar="FILE", help="its settings JSON (as given to az vm "
                       "extension set --settings, an ARM resource, or az vm extension show)")
    # No default here: the manifest's DEFAULT_DIRECTORY, imported only by the command.
    adopt.add_argument("--directory", metavar="DIR",
                       help="the manifest's directory, on tmpfs (default: the manifest's "
                       "default, see directory: in kv-agent.yaml(5))")
    adopt.add_argument("--tmpfiles", metavar="FILE", help="also write the tmpfiles.d lines that "
                       "link the extension's paths to kv-agent's files")
    adopt.set_defaults(handler=_cmd_import, usage_error=adopt.error)

    emulator = commands.add_parser(
        "emulator", help="run a local IMDS + Key Vault emulator (no Azure needed)")
    emulator.add_argument("--secrets", metavar="FILE", required=True,
                          help="YAML mapping of secret name to value, or a document with "
                               "'secrets:' and 'identities:'")
    emulator.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    emulator.add_argument("--imds-port", type=int, default=0, help="IMDS port (default: any)")
    emulator.add_argument("--vault-port", type=int, default=0, help="vault port (default: any)")
    emulator.add_argument("--vault-hostname", help="host name for the vault URL and certificate")
    emulator.add_argument("--latency-ms", type=float, default=0.0,
                          help="delay added to every request")
    emulator.add_argument("--cert-dir", help="write the generated CA and certificate here")
    emulator.add_argument("--tls-cert", help="serve this certificate (PEM) instead")
    emulator.add_argument("--tls-key", help="key for --tls-cert (PEM)")
    emulator.add_argument("--ca-cert", help="CA that signed --tls-cert (PEM), to print")
    emulator.add_argument("--empty-pages", action="store_true",
                          help="open every list with empty pages that carry a nextLink, as "
                               "Azure may")
    emulator.add_argument("--arc-port", metavar="PORT", type=int,
                          help="also serve Azure Arc's HIMDS on this port (40342 on an Arc "
                               "server; 0: any)")
    emulator.add_argument("--arc-tokens-dir", metavar="DIR",
                          help="where HIMDS writes its key files (default: a temporary "
                               "directory)")
    emulator.add_argument("--app-service-port", metavar="PORT", type=int,
                          help="also serve App Service's identity endpoint on this port "
                               "(0: any)")
    emulator.add_argument("--identity-header", metavar="VALUE",
                          help="the X-IDENTITY-HEADER App Service expects (default: random)")
    emulator.set_defaults(handler=_cmd_emulator, usage_error=emulator.error)

    demo = commands.add_parser(
        "demo", help="run the agent against a local emulator and show what it wrote")
    demo.add_argument("--directory", default="/dev/shm/kv-agent-demo",
                      help="tmpfs directory for the demo (default /dev/shm/kv-agent-demo)")
    demo.set_defaults(handler=_cmd_demo)
    return parser


def _add_global_options(parser: argparse.ArgumentParser, default: object) -> None:
    parser.add_argument("--debug", action="store_true", default=default,
                        help="debug logging and tracebacks (never secret values or tokens)")
    parser.add_argument("-q", "--quiet", action="store_true", default=default,
                        help="only warnings and errors")


def main(argv: Optional[Sequence[str]] = None, environ: Optional[Mapping[str, str]] = None) -> int:
    """Run the command line; returns the exit code."""
    env = os.environ if environ is None else environ
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.debug else logging.WARNING if args.quiet else logging.INFO
    configure_logging(level, env, sys.stderr)
    handler: Callable[[argparse.Namespace, Mapping[str, str]], int] = args.handler
    try:
        return handler(args, env)
    except ManifestError as exc:
        for line in exc.problems:
            _error(line)
        if args.debug:
            traceback.print_exc()
        return exc.exit_code
    except KvAgentError as exc:
        _error(str(exc))
        if args.debug:
            traceback.print_exc()
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except Exception:  # a bug: show everything, never hide it
        traceback.print_exc()
        _error("unexpected failure (a bug); please report it with the traceback above")
        return EXIT_SOFTWARE


def _error(line: str) -> None:
    """``kv-agent: error: ...`` on stderr (with journald's <3> under systemd)."""
    logging.getLogger("kv-agent").error("%s", line)


def _manifest_path(args: argparse.Namespace, environ: Mapping[str, str]) -> str:
    return str(args.manifest or environ.get(MANIFEST_ENV) or DEFAULT_MANIFEST)


def _cmd_check(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    import importlib.util

    from agent.sync.sync import check

    path = _manifest_path(args, environ)
    manifest = check(path)
    from agent.daemon.hooks import is_executable

    for entry in manifest.secrets:
        if entry.on_change and not is_executable(entry.on_change):
            logging.getLogger("kv-agent").warning(
                "%s: secret '%s': on_change program '%s' is not an executable on PATH; "
                "the hook will fail until it is", path, entry.name, entry.on_change[0])
    if any(entry.transform == "certificate" for entry in manifest.secrets) and \
            importlib.util.find_spec("cryptography") is None:
        logging.getLogger("kv-agent").warning(
            "%s: certificate entries need the cryptography package, which is not installed; "
            "install python3-cryptography (or pip install cryptography)", path)
    count = len(manifest.secrets)
    sets = f" in {len(manifest.sets)} set{'s' if len(manifest.sets) != 1 else ''}" \
        if manifest.sets else ""
    chosen = len(manifest.selections)
    selects = f" and {chosen} select entr{'ies' if chosen != 1 else 'y'}" if chosen else ""
    print(f"{path}: OK: {count} secret{'s' if count != 1 else ''}{selects} into "
          f"{manifest.directory}{sets}")
    from agent.identity.tokens import choose_source

    # Offline, from the environment and files only: the endpoint is not asked.
    choice = choose_source(manifest.identity.source, environ)
    print(f"{path}: identity: would use {choice.describe()}")
    if manifest.metrics_path:
        print(f"{path}: metrics: {_metrics_note(manifest.metrics_path)}")
    from agent.sync.credentials import served

    credentials = served(manifest)
    if credentials.credentials:
        print(f"{path}: credentials: {credentials.describe()}, served by kv-agent run")
    return EXIT_OK


def _metrics_note(metrics_path: str) -> str:
    """Where the running agent will write metrics, and, outside the unit's own
    writable directories, the drop-in that lets it (a path the sandbox forbids
    would fail at every refresh, logged once, and the operator would wonder why)."""
    from agent.daemon.metrics import DROP_IN_EXAMPLE, drop_in_allowing
    from agent.manifest import DEFAULT_METRICS_PATH

    note = f"written to {metrics_path} after every refresh"
    allowed = os.path.dirname(os.path.dirname(DEFAULT_METRICS_PATH)) + "/"
    if metrics_path.startswith(allowed):
        return note
    drop_in = drop_in_allowing(metrics_path)
    if drop_in is not None:
        return note + f"; the unit may write there: ReadWritePaths= in {drop_in}"
    return note + ("; the packaged unit may not write there: add ReadWritePaths= for its "
                   f"directory in a drop-in (see {DROP_IN_EXAMPLE})")


def _cmd_once(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    from agent.base.memory import limit_arenas, spare_the_collector
    from agent.base.retry import RetryPolicy
    from agent.manifest import load_manifest
    from agent.sync.sync import Sync, expiry_warnings

    limit_arenas(environ)  # before the fetch threads start
    manifest = load_manifest(_manifest_path(args, environ))
    spare_the_collector()  # the modules and the manifest live until the exit
    policy = RetryPolicy(deadline_s=args.retry_for)
    agent = Sync(manifest, environ=environ, imds_policy=policy, vault_policy=policy)
    try:
        agent.prepare()
        report = agent.sync(is_final=True)
        # Waits out the grace (about 2 s) only when a set was swapped, so a
        # reader mid-read of the old generation still finds every file.
        agent.retire_generations(report)
    finally:
        agent.close()
    for line in expiry_warnings(report.outcomes, manifest.warn_before_expiry_s, time.time()):
        logging.getLogger("kv-agent").warning("%s", line)
    for outcome in report.optional_failures:
        logging.getLogger("kv-agent").warning("optional %s", outcome.describe())
    for outcome in report.failures:
        _error(outcome.describe())
    credential_only = _note_credentials(report.outcomes)
    total = len(report.outcomes)
    failed = len(report.failures) + len(report.optional_failures)
    written = sum(1 for outcome in report.outcomes if outcome.changed_paths)
    logging.getLogger("kv-agent").info(
        "%d secret%s: %d written, %d unchanged, %d failed%s (%.2f s)", total,
        "s" if total != 1 else "", written, total - written - failed - credential_only, failed,
        f", {credential_only} credential only" if credential_only else "", report.elapsed_s)
    spare_the_collector()  # the exit frees it all
    return _exit_code(report.failures)


def _note_credentials(outcomes: Sequence["SecretOutcome"]) -> int:
    """Say of each credential fetched and checked that only ``kv-agent run``
    serves it (a one-shot run has no socket, and a credential-only entry no
    file); returns how many entries were credentials only."""
    only = 0
    for outcome in outcomes:
        if outcome.error is not None or not outcome.entry.grants:
            continue
        only += not outcome.entry.paths
        logging.getLogger("kv-agent").info(
            "secret '%s': %s fetched and checked; a credential is served by kv-agent run "
            "only%s", outcome.entry.name, ", ".join(g.label for g in outcome.entry.grants),
            "" if outcome.entry.paths else ", and this entry writes no file")
    return only


def _exit_code(failures: Sequence["SecretOutcome"]) -> int:
    """0 when nothing required failed; 69 when every failure was IMDS or the
    vault being unavailable (worth a retry later); else 1."""
    if not failures:
        return EXIT_OK
    if all(o.error is not None and o.error.exit_code == EXIT_UNAVAILABLE for o in failures):
        return EXIT_UNAVAILABLE
    return EXIT_FAILURE


def _cmd_run(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    # Handlers first, before the heavy imports and the manifest: until then a
    # SIGHUP would kill the agent (see agent/daemon/signals.py). The daemon takes the
    # flags over, so nothing asked for in the meantime is lost.
    from agent.daemon.signals import SignalFlags

    signals = SignalFlags()
    signals.install()
    try:
        from agent.base.memory import limit_arenas
        from agent.daemon.service import Daemon
        from agent.status.store import state_dir

        limit_arenas(environ)  # before the first thread starts

        daemon = Daemon(_manifest_path(args, environ), environ=environ,
                        state_dir=state_dir(environ, args.state_dir), signals=signals)
        code = daemon.run()
        if daemon.is_refresh_abandoned:
            _exit_now(code)
        return code
    finally:
        signals.restore()


def _exit_now(code: int) -> None:
    """Exit at once, not joining the threads a stopped refresh left behind
    (one stuck in DNS or in connect(), where no socket can be shut down: the
    interpreter would wait for it). Everything is saved by then; the files
    are whole (each write is atomic). Logs and output are flushed first."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _cmd_status(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    import json

    from agent.status.render import render_status
    from agent.status.snapshot import parse_snapshot
    from agent.status.store import StateStore, state_dir

    store = StateStore(state_dir(environ, args.state_dir))
    document = store.load()
    if args.json:
        print(json.dumps(document, indent=2, sort_keys=True))
    lines, code = render_status(parse_snapshot(document), store.path)
    if not args.json:
        for line in lines:
            print(line)
    elif code != EXIT_OK:
        _error(lines[0])
    return code


def _cmd_doctor(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    import json

    from agent.doctor.chain import diagnose
    from agent.doctor.report import ASCII_MARKS, MARKS, as_json, render

    report = diagnose(_manifest_path(args, environ), environ,
                      use_unit_env=not args.no_unit_env)
    if args.json:
        print(json.dumps(as_json(report), indent=2))
    else:
        marks = MARKS if _can_encode("".join(MARKS.values()), sys.stdout) else ASCII_MARKS
        encoding = sys.stdout.encoding or "ascii"
        for line in render(report, marks):
            # A name or a path the terminal cannot show must not end the list.
            print(line.encode(encoding, "backslashreplace").decode(encoding))
    return EXIT_FAILURE if report.is_failed else EXIT_OK


def _can_encode(text: str, stream: TextIO) -> bool:
    """Whether ``stream`` can print ``text`` (a C locale without UTF-8 cannot)."""
    try:
        text.encode(stream.encoding or "ascii")
    except (UnicodeEncodeError, LookupError):
        return False
    return True


def _cmd_import(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    """The manifest on stdout, its warnings on stderr; a bad file exits 78 (SettingsError)."""
    from agent.adopt import directory_problem, import_vm_extension
    from agent.manifest import DEFAULT_DIRECTORY

    directory = DEFAULT_DIRECTORY if args.directory is None else args.directory
    problem = directory_problem(directory)
    if problem:
        args.usage_error(problem)
    result = import_vm_extension(args.file, directory)
    for warning in result.warnings:
        logging.getLogger("kv-agent").warning("%s", warning)
    if args.tmpfiles:
        try:
            with open(args.tmpfiles, "x", encoding="utf-8") as stream:
                stream.write(result.tmpfiles)
        except OSError as exc:
            raise KvAgentError(f"--tmpfiles {args.tmpfiles}: {exc.strerror or exc}",
                               "name a new file in an existing directory") from None
    sys.stdout.write(result.manifest)
    return EXIT_OK


def _cmd_emulator(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    import signal
    import threading

    for option, needs in (("arc_tokens_dir", "arc_port"), ("identity_header", "app_service_port")):
        if getattr(args, option) is not None and getattr(args, needs) is None:
            args.usage_error(f"--{option.replace('_', '-')} needs --{needs.replace('_', '-')}")
    _require_emulator("emulator")
    from agent.emulator import Emulator, load_emulator_file

    try:
        loaded = load_emulator_file(args.secrets)
    except (OSError, ValueError) as exc:
        raise KvAgentError(str(exc), "pass a YAML mapping of secret name to value, or "
                                     "'secrets:' and 'identities:' as kv-agent(8) says") from None
    secrets = loaded.secrets
    emulator = Emulator(
        secrets, host=args.host, imds_port=args.imds_port, vault_port=args.vault_port,
        vault_hostname=args.vault_hostname, tls_cert=args.tls_cert, tls_key=args.tls_key,
        ca_cert=args.ca_cert, cert_dir=args.cert_dir, latency_s=args.latency_ms / 1000.0,
        identities=loaded.identities, empty_pages=args.empty_pages, arc_port=args.arc_port,
        arc_tokens_dir=args.arc_tokens_dir, app_service_port=args.app_service_port,
        identity_header=args.identity_header)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    try:
        emulator.start()
    except OSError as exc:
        raise KvAgentError(f"cannot start the emulator on {args.host}: {exc.strerror or exc}",
                           "choose other --imds-port/--vault-port/--arc-port/"
                           "--app-service-port values, or free them") from None
    try:
        for line in _emulator_banner(emulator.imds_endpoint, emulator.vault_url,
                                     emulator.ca_path, len(secrets)):
            print(line, flush=True)
        for line in _identity_banner(emulator, args):
            print(line, flush=True)
        print("Stop with Ctrl-C.", flush=True)
        # Under systemd (kv-agent-emulator.service, Type=notify): the
        # listeners are bound and the CA written, so units ordered after it
        # (kv-agent with the emulator drop-in) find both.
        from agent.daemon.notify import Notifier

        Notifier(environ).ready(f"serving {len(secrets)} secrets: IMDS "
                                f"{emulator.imds_endpoint}, vault {emulator.vault_url}")
        stop.wait()
    finally:
        emulator.stop()
    return EXIT_OK


def _emulator_banner(imds: str, vault: str, ca_path: str, count: int) -> List[str]:
    return [
        f"kv-agent emulator: {count} secret{'s' if count != 1 else ''}",
        f"  IMDS token endpoint: {imds}",
        f"  vault:               {vault}",
        f"  CA certificate:      {ca_path}",
        "Point the agent at it (manifest 'vault:' set to the vault above):",
        f"  KV_AGENT_IMDS_ENDPOINT={imds} REQUESTS_CA_BUNDLE={ca_path} \\",
        "    kv-agent once --manifest manifest.yaml",
    ]


def _identity_banner(emulator: "Emulator", args: argparse.Namespace) -> List[str]:
    """The environment Azure Arc or App Service would give the agent, for the
    endpoints asked for (identity.source auto then picks them; protocol.md A7, A8).
    The header is the emulator's own throw-away value, printed to be exported."""
    from agent.identity.arc import DEFAULT_TOKENS_DIR

    ca = f"REQUESTS_CA_BUNDLE={emulator.ca_path}"
    lines = []
    if args.arc_port is not None:
        tokens, endpoint = emulator.arc_api.tokens_dir, emulator.arc_endpoint
        lines += [f"Azure Arc (HIMDS): {endpoint}, key files in {tokens}",
                  f"  IDENTITY_ENDPOINT={endpoint} IMDS_ENDPOINT={emulator.arc_base} \\",
                  f"  KV_AGENT_ARC_TOKENS_DIR={tokens} {ca} \\",
                  "    kv-agent once --manifest manifest.yaml"]
        if os.path.normpath(tokens) != DEFAULT_TOKENS_DIR:
            # The SDKs (azure-identity, MSAL, msal-node) accept a key file only
            # there and have no setting like KV_AGENT_ARC_TOKENS_DIR.
            lines += [f"  The official Azure SDKs read key files only in {DEFAULT_TOKENS_DIR}: "
                      f"for them, run the emulator with --arc-tokens-dir {DEFAULT_TOKENS_DIR} "
                      "(as root)"]
    if args.app_service_port is not None:
        lines += [f"App Service: {emulator.app_service_endpoint}",
                  f"  IDENTITY_ENDPOINT={emulator.app_service_endpoint} "
                  f"IDENTITY_HEADER={emulator.identity_header} \\",
                  f"  {ca} kv-agent once --manifest manifest.yaml"]
    return lines


def _cmd_demo(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    _require_emulator("demo")
    from agent.emulator.demo import run_demo

    return run_demo(args.directory, say=lambda line: print(line, flush=True))


# Where the .deb and the .rpm install the agent (packaging/kv-agent puts it on sys.path).
_PACKAGED_ROOT = "/usr/lib/kv-agent"


def _require_emulator(command: str) -> None:
    """Raise MissingDependencyError unless the ``agent.emulator`` package is installed.

    The emulator and the demo ship apart from the agent (the kv-agent-emulator
    .deb and .rpm, the wheel's ``emulator`` extra), so on a VM with only the
    agent ``kv-agent demo`` names the package to install instead of failing
    with a traceback. Only the emulator's own absence is caught: an ImportError
    from inside an installed emulator is a bug and keeps its traceback.
    """
    import importlib.util

    if importlib.util.find_spec("agent.emulator") is not None:
        return
    import agent

    if os.path.dirname(os.path.dirname(os.path.abspath(agent.__file__))) == _PACKAGED_ROOT:
        hint = ("install the kv-agent-emulator package: apt install kv-agent-emulator "
                "(Debian, Ubuntu) or dnf install kv-agent-emulator (RHEL, Azure Linux)")
    else:
        hint = "install it with pip install 'kv-agent[emulator]'"
    raise MissingDependencyError(f"kv-agent {command} needs the emulator, "
                                 "which is not installed", hint)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
