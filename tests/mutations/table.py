"""The mutations: one named, one-line breakage per README promise.

Each mutation replaces ``find`` (which must occur exactly once in ``path``:
a refactor that moves or duplicates the line is noticed, never silently
skipped) by ``replace``, and names the pytest node ids that must fail on the
mutant: the narrowest tests that guard the promise, so the whole check stays
within a few minutes of CI time. Keep ``find`` a short, distinctive line.

``pending`` marks a mutation whose guarding test is known to be missing (it is
expected to survive); the reason says what will guard it. Once that test
exists, add its node id to ``guards`` and drop ``pending``.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple


class Mutation(NamedTuple):
    """One deliberate breakage of one promise."""

    name: str  # kebab-case, the pytest id of the test that checks it
    promise: str  # what the README promises, in its own words where possible
    path: str  # relative to the repository root
    find: str  # exact text, occurring exactly once in ``path``
    replace: str
    guards: Tuple[str, ...]  # pytest node ids that must fail on the mutant
    pending: Optional[str] = None  # why it is expected to survive for now


VAULT = "tests/test_vault.py"
IDENTITY = "tests/test_identity.py"
WRITER = "tests/test_writer.py"
WRITER_SETS = "tests/test_writer_sets.py"
MANIFEST = "tests/test_manifest.py"
HOOKS = "tests/test_hooks.py"
DAEMON = "tests/test_daemon.py"
CLI = "tests/test_cli_integration.py"
RETRY = "tests/test_retry.py"
STATE = "tests/test_state.py"
SELECT = "tests/test_select.py"
LIFECYCLE = "tests/test_lifecycle.py"
SYNC = "tests/test_sync.py"
ARC = "tests/test_arc.py"
FRESHNESS = "tests/test_freshness.py"
DOCTOR = "tests/test_doctor.py"
METRICS = "tests/test_metrics.py"
TRANSFORMS = "tests/test_transforms.py"
CERTIFICATES = "tests/test_certificates.py"
PKCS12 = "tests/test_pkcs12.py"
EXPIRY = "tests/test_expiry.py"
CREDENTIAL_SOCKET = "tests/test_credential_socket.py"
DAEMON_CREDENTIALS = "tests/test_daemon_credentials.py"
CREDENTIAL_RULES = "tests/test_credentials.py"
ENTRIES = "tests/test_entries.py"
CACHE_DECISION = "tests/test_cache_decision.py"
CACHE_STORE = "tests/test_cache_store.py"
CACHE_SEAL = "tests/test_cache_seal.py"
CACHE_SERVE = "tests/test_daemon_cache_serve.py"
DAEMON_CACHE = "tests/test_daemon_cache.py"
CACHE_END_TO_END = "tests/test_cache_end_to_end.py"
CACHE_NO_PLAINTEXT = "tests/test_cache_no_plaintext.py"
UPGRADE_SCRIPTS = "tests/system/test_upgrade_scripts.py"

MUTATIONS: Tuple[Mutation, ...] = (
    # -- where a token may go ------------------------------------------------
    Mutation(
        "token-host-outside-audience-domain",
        "the agent never sends a token to a host other than the vault: a challenge's "
        "audience is used only when the vault host lies under its domain",
        "agent/vault/audience.py",
        "    if not is_loopback_host(host) and not host.lower().endswith(",
        "    if False and not host.lower().endswith(",
        (f"{VAULT}::test_unknown_host_is_refused_even_with_a_vault_challenge",),
    ),
    Mutation(
        "audience-from-look-alike-suffix",
        "the token audience comes from the vault's DNS suffix (evilvault.azure.net is not "
        "under vault.azure.net)",
        "agent/vault/audience.py",
        '        if host.endswith("." + suffix):',
        "        if host.endswith(suffix):",
        (f"{VAULT}::test_audience_from_dns_suffix",),
    ),
    Mutation(
        "vault-follows-redirects",
        "the agent never sends a token along a redirect",
        "agent/base/transport.py",
        "timeout=timeout, allow_redirects=False, stream=True,",
        "timeout=timeout, allow_redirects=True, stream=True,",
        (f"{VAULT}::test_redirect_is_not_followed",
         f"{IDENTITY}::test_request_shape_system_assigned"),
    ),
    Mutation(
        "http-vault-accepted",
        "vault: https only; a manifest naming an http vault is refused",
        "agent/vault/url.py",
        '    if parts.scheme.lower() != "https":',
        '    if parts.scheme.lower() not in ("https", "http"):',
        (f"{MANIFEST}::test_top_level_rules",),
    ),
    Mutation(
        "vault-session-reads-netrc",
        "the vault session never reads ~/.netrc (whose Basic credentials would replace the "
        "bearer token) nor the environment behind the agent's back",
        "agent/base/transport.py",
        "    session.trust_env = False",
        "    session.trust_env = True",
        (f"{VAULT}::test_session_ignores_netrc_and_environment",),
    ),
    Mutation(
        "imds-through-proxy",
        "proxy variables apply to the vault only: IMDS is always reached directly",
        "agent/identity/tokens.py",
        "    session.trust_env = False  # IMDS must never go through a proxy [protocol.md A1]",
        "    session.trust_env = True",
        (f"{CLI}::test_once_reaches_imds_directly_whatever_the_proxy_variables",
         f"{IDENTITY}::test_token_source_asks_imds_at_the_configured_endpoint_without_a_proxy"),
    ),
    Mutation(
        "imds-without-metadata-header",
        "every IMDS request carries Metadata: true",
        "agent/identity/imds.py",
        'headers={"Metadata": "true"})',
        "headers={})",
        (f"{IDENTITY}::test_request_shape_system_assigned",),
    ),
    # -- anything from the network is bounded --------------------------------
    Mutation(
        "vault-body-unbounded",
        "every vault response body is size-bounded",
        "agent/base/transport.py",
        "        if size > max_bytes:",
        "        if False:",
        (f"{VAULT}::test_valid_bundle_over_the_size_cap_is_refused",
         f"{IDENTITY}::test_oversized_body_is_refused"),
    ),
    Mutation(
        "vault-ignores-retry-after",
        "a throttled vault (429) is retried honouring Retry-After",
        "agent/vault/pacing.py",
        '        retry_after = (parse_retry_after(reply.headers.get("Retry-After"))',
        "        retry_after = (None",
        (f"{VAULT}::test_429_honours_retry_after",),
    ),
    Mutation(
        "imds-ignores-retry-after",
        "IMDS is retried honouring Retry-After",
        "agent/identity/imds.py",
        '            retry_after = parse_retry_after(reply.headers.get("Retry-After"))',
        "            retry_after = None",
        (f"{IDENTITY}::test_retry_after_is_honoured",),
    ),
    # -- never a secret or a token in a log ----------------------------------
    Mutation(
        "secret-repr-shows-value",
        "logs never contain a secret value (a Secret's repr masks it)",
        "agent/vault/client.py",
        "version={self.version!r}, value=****)",
        "version={self.version!r}, value={self.value!r})",
        (f"{VAULT}::test_secret_repr_never_shows_the_value",),
    ),
    Mutation(
        "file-spec-repr-shows-value",
        "logs never contain a secret value (a FileSpec's repr masks its content)",
        "agent/writer/specs.py",
        'return (f"FileSpec(path={self.path!r}, content=****, uid={self.uid}, "',
        'return (f"FileSpec(path={self.path!r}, content={self.content!r}, uid={self.uid}, "',
        (f"{WRITER}::test_file_spec_repr_never_shows_the_content",),
    ),
    Mutation(
        "value-in-write-log-line",
        "logs never contain a secret value (the 'wrote' line names the version)",
        "agent/sync/sync.py",
        "fetched.version, output.owner, output.group, output.mode)",
        "fetched.value, output.owner, output.group, output.mode)",
        (f"{CLI}::test_once_writes_every_secret_byte_for_byte_with_owner_group_and_mode"
         "[default]",),
    ),
    Mutation(
        "doctor-prints-the-token",
        "doctor never prints a token: the principal line is built from the token's "
        "claims, never from the token",
        "agent/doctor/identity_links.py",
        '    checks.append(Check("identity", "principal", OK, detail))',
        '    checks.append(Check("identity", "principal", OK, detail + token.token))',
        (f"{DOCTOR}::test_healthy_setup_passes_every_check",),
    ),
    Mutation(
        "token-repr-shows-token",
        "logs never contain a token (an AccessToken's repr masks it)",
        "agent/identity/request.py",
        'return f"AccessToken(token=****, resource=',
        'return f"AccessToken(token={self.token!r}, resource=',
        (f"{IDENTITY}::test_access_token_repr_masks_the_token",),
    ),
    # -- the writer ----------------------------------------------------------
    Mutation(
        "writer-follows-symlinked-parents",
        "every path is reached from the root with O_NOFOLLOW: a symlink below the root is "
        "never followed",
        "agent/writer/tree.py",
        "O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC",
        "O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC",
        (f"{WRITER}::test_symlinked_parent_is_refused",),
    ),
    Mutation(
        "writer-temp-without-excl-nofollow",
        "the temporary file is created O_CREAT|O_EXCL|O_NOFOLLOW, never through a planted "
        "link",
        "agent/writer/tree.py",
        "O_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC",
        "O_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC",
        (f"{WRITER}::test_steps_follow_the_writer_contract",
         f"{WRITER_SETS}::test_members_get_owner_and_mode_before_their_first_byte"),
    ),
    Mutation(
        "first-byte-before-owner-and-mode",
        "every file gets its final owner and mode before any byte goes in",
        "agent/writer/files.py",
        "os.fchown(fd, spec.uid, spec.gid)  # (5)",
        "os.write(fd, spec.content[:1]); os.lseek(fd, 0, os.SEEK_SET); "
        "os.fchown(fd, spec.uid, spec.gid)  # (5)",
        (f"{WRITER}::test_steps_follow_the_writer_contract",),
    ),
    Mutation(
        "unchanged-file-rewritten",
        "a file is rewritten only when its content, owner or mode changed",
        "agent/writer/files.py",
        "if matches(dir_fd, name, spec):  # (3)",
        "if False:  # (3)",
        (f"{WRITER}::test_unchanged_file_keeps_inode_and_times",),
    ),
    Mutation(
        "owner-change-not-rewritten",
        "a file whose owner changed is rewritten with the manifest's owner",
        "agent/writer/tree.py",
        "if not stat.S_ISREG(st.st_mode) or (st.st_uid, st.st_gid) != (spec.uid, spec.gid):",
        "if not stat.S_ISREG(st.st_mode):",
        (f"{WRITER}::test_owner_only_change_rewrites",),
    ),
    Mutation(
        "mode-change-not-rewritten",
        "a file whose mode changed (even behind the agent's back) is rewritten with the "
        "manifest's mode",
        "agent/writer/tree.py",
        "if stat.S_IMODE(st.st_mode) != spec.mode or st.st_size != len(spec.content):",
        "if st.st_size != len(spec.content):",
        (f"{WRITER}::test_mode_changed_behind_the_writers_back_is_repaired",),
    ),
    Mutation(
        "disk-taken-for-tmpfs",
        "the output root must be tmpfs or ramfs: secrets never reach a disk",
        "agent/base/landing.py",
        "return ctypes.c_long.from_buffer(buffer).value & 0xFFFFFFFF",
        "return TMPFS_MAGIC",
        (f"{WRITER}::test_check_refuses_missing_root_on_disk_without_creating_it",),
    ),
    Mutation(
        "temp-file-left-on-failure",
        "on any failure the temporary file is removed and the target is as it was",
        "agent/writer/files.py",
        "def _unlink_quietly(name: str, dir_fd: int) -> None:",
        "def _unlink_quietly(name: str, dir_fd: int) -> None:\n    return",
        (f"{WRITER}::test_failure_keeps_old_file_and_removes_temp",),
    ),
    Mutation(
        "unchanged-set-rewritten",
        "an unchanged set is not rewritten (content, owner and mode of every member)",
        "agent/writer/sets.py",
        "and _has_shape(parent_fd, name, wanted):  # (3)",
        "and False:  # (3)",
        (f"{WRITER_SETS}::test_unchanged_set_keeps_its_inodes_and_times",),
    ),
    Mutation(
        "set-old-generation-removed-at-swap",
        "a reader that opens a set's directory once and reads relative to it sees one "
        "generation, whole, never a missing file",
        "agent/writer/generations.py",
        "SET_GRACE_S = 2.0",
        "SET_GRACE_S = 0.0",
        (f"{WRITER_SETS}::test_reader_opening_the_directory_once_sees_one_generation",),
    ),
    Mutation(
        "set-generation-left-on-failure",
        "a failure before a set's swap leaves the old set and no half-built generation",
        "agent/writer/sets.py",
        "            remove_generation(parent_fd, generation)\n            raise WriteError(f\"{directory}: cannot prepare",
        "            raise WriteError(f\"{directory}: cannot prepare",
        (f"{WRITER_SETS}::test_failure_before_the_swap_keeps_the_old_set_and_leaves_nothing",),
    ),
    Mutation(
        "failing-secret-loses-its-file",
        "a secret that fails keeps its last good file",
        "agent/sync/sync.py",
        "                return SecretOutcome(entry, error=one)",
        "                return SecretOutcome(entry, error=one, "
        "changed_paths=entry.paths if self.writer.remove(entry.key) else ())",
        (f"{CLI}::test_once_failures_name_each_secret_and_keep_its_file",),
    ),
    # -- the manifest --------------------------------------------------------
    Mutation(
        "writable-manifest-accepted",
        "kv-agent refuses a manifest that is writable by group or others",
        "agent/manifest/file.py",
        "    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):",
        "    if st.st_mode & 0:",
        (f"{MANIFEST}::test_writable_by_others_is_refused",),
    ),
    Mutation(
        "foreign-manifest-accepted",
        "kv-agent refuses a manifest owned by anyone other than root or its own user",
        "agent/manifest/file.py",
        "    if st.st_uid not in (0, euid):",
        "    if False:",
        (f"{MANIFEST}::test_foreign_owner_is_refused",),
    ),
    Mutation(
        "path-outside-directory",
        "path: relative to directory, or absolute inside it (/run/secretsX is not inside "
        "/run/secrets)",
        "agent/manifest/paths.py",
        '    if not joined.startswith(directory.rstrip("/") + "/"):',
        '    if not joined.startswith(directory.rstrip("/")):',
        (f"{MANIFEST}::test_entry_rules",),
    ),
    Mutation(
        "symlinked-parent-accepted",
        "check validates paths: a symlink among the existing parents inside directory is "
        "refused",
        "agent/manifest/paths.py",
        "        if stat.S_ISLNK(st.st_mode):",
        "        if False:",
        (f"{MANIFEST}::test_symlinked_parent_is_refused",),
    ),
    Mutation(
        "setuid-mode-accepted",
        'mode: quoted octal; no setuid/setgid/sticky bits',
        "agent/manifest/values.py",
        "    if mode > 0o777:",
        "    if False:",
        (f"{MANIFEST}::test_entry_rules",),
    ),
    Mutation(
        "invalid-manifest-not-78",
        "an invalid manifest exits 78, which the unit's RestartPreventExitStatus= honours",
        "agent/base/errors.py",
        "EXIT_CONFIG = 78",
        "EXIT_CONFIG = 1",
        (f"{CLI}::test_invalid_manifest_is_refused_by_check_and_once_with_file_line_key_and_fix",),
    ),
    # -- once ----------------------------------------------------------------
    Mutation(
        "once-exits-zero-on-failure",
        "kv-agent once exits 0 only when every non-optional file is written",
        "agent/cli.py",
        "    return _exit_code(report.failures)",
        "    return _exit_code(())",
        (f"{CLI}::test_once_failures_name_each_secret_and_keep_its_file",),
    ),
    Mutation(
        "optional-failure-fails-the-run",
        "optional: true: a failure is reported but fails nothing",
        "agent/sync/sync.py",
        "return tuple(o for o in self.outcomes if o.error and not o.entry.is_optional)",
        "return tuple(o for o in self.outcomes if o.error)",
        (f"{CLI}::test_once_reports_optional_failures_but_exits_zero",),
    ),
    # -- the running agent ---------------------------------------------------
    Mutation(
        "ready-without-files",
        "READY=1 only when every non-optional secret's file is on disk",
        "agent/daemon/lifecycle.py",
        "    if not state.is_ready and has_every_required_file():",
        "    if not state.is_ready:",
        (f"{DAEMON}::test_no_ready_while_imds_refuses_connections",
         f"{LIFECYCLE}::test_no_ready_while_a_required_file_is_missing"),
        # Survived the suite before issue 9: no test watched READY while IMDS was down.
    ),
    Mutation(
        "reload-ready-waits-for-its-refresh",
        "a reload's READY=1 comes once the new manifest is in use, never after its refresh "
        "(systemd >= 253 holds systemctl reload until READY=1)",
        "agent/daemon/service.py",
        "        self._announce(announce_ready)  # now, not after the refresh",
        "        self._announce(False)  # now, not after the refresh",
        (f"{DAEMON}::test_reload_is_ready_at_once_while_its_refresh_waits",),
    ),
    Mutation(
        "bad-edit-stops-the-agent",
        "an invalid manifest edit is rejected and the previous manifest stays in use",
        "agent/daemon/watch.py",
        'log.error("manifest rejected, keeping the previous one: %s", problem)',
        "raise",
        (f"{DAEMON}::test_invalid_manifest_on_reload_keeps_the_old_one",),
    ),
    Mutation(
        "foreign-file-removed",
        "when a secret leaves the manifest its file is deleted only if it is still the file "
        "the agent wrote",
        "agent/daemon/ledger.py",
        "        if not self.is_ours(path):",
        "        if False:",
        (f"{DAEMON}::test_restart_removes_only_its_own_files_of_dropped_entries",),
    ),
    Mutation(
        "hook-at-first-write",
        "on_change runs after a file changes, never at the first write at start",
        "agent/daemon/lifecycle.py",
        "    run_hooks = state.is_ready and is_current",
        "    run_hooks = is_current",
        (f"{DAEMON}::test_on_change_hooks_run_once_per_change_never_at_start",
         f"{LIFECYCLE}::test_hooks_run_only_once_ready_and_for_the_current_manifest"),
    ),
    Mutation(
        "sigterm-ignored",
        "SIGTERM sends STOPPING=1 and exits 0 within seconds",
        "agent/daemon/signals.py",
        "        self.stop_requested = True",
        "        pass",
        (f"{DAEMON}::test_works_without_notify_socket",),
    ),
    # -- hooks ---------------------------------------------------------------
    Mutation(
        "hook-gets-notify-socket",
        "a hook never gets the agent's NOTIFY_SOCKET or watchdog variables",
        "agent/daemon/hooks.py",
        "if key not in PRIVATE_ENV}",
        "if key not in ()}",
        (f"{HOOKS}::test_hook_does_not_inherit_systemd_hand_over",),
    ),
    Mutation(
        "hook-runs-in-a-shell",
        "on_change runs its argv without a shell",
        "agent/daemon/hooks.py",
        "done = subprocess.run(list(command), env=env,",
        'done = subprocess.run(" ".join(command), shell=True, env=env,',
        (f"{HOOKS}::test_hook_runs_without_a_shell_and_sees_changed_paths",),
    ),
    Mutation(
        "hook-output-reaches-the-log",
        "a hook's output is discarded, because it might print a secret",
        "agent/daemon/hooks.py",
        "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,",
        "stdout=None, stderr=None,",
        (f"{HOOKS}::test_hook_output_never_reaches_the_agents_output",),
    ),
    # -- issue 11: sets and expiry in the agent ------------------------------
    Mutation(
        "set-written-file-by-file",
        "a set changes whole: the agent writes a set's files with one swap of its "
        "directory, never file by file",
        "agent/sync/sync.py",
        "            result = self.writer.apply_set(group.directory, specs)",
        "            result = __import__('agent.writer').writer.SetResult(group.directory, "
        "any([self.writer.apply(spec).changed for spec in specs]))",
        (f"{SYNC}::test_a_set_is_written_by_one_swap_and_unchanged_sets_are_left",
         f"{DAEMON}::test_a_certificate_set_rotates_whole_for_readers_and_hooks"),
    ),
    Mutation(
        "failing-member-writes-the-set",
        "a failing member keeps the whole set as it was (keep-last-good applies to the set)",
        "agent/sync/sync.py",
        "        if failed:\n            kept = _set_kept(group, failed[0])",
        "        if False:\n            kept = _set_kept(group, failed[0])",
        (f"{SYNC}::test_a_failing_member_keeps_the_whole_set",),
    ),
    Mutation(
        "expired-refused",
        "an expired secret or certificate is still written (Azure serves it), with a warning",
        "agent/sync/sync.py",
        "            validity = _validity(secrets, leaf)\n",
        "            validity = _validity(secrets, leaf)\n"
        "            if validity.expires is not None and validity.expires <= time.time():\n"
        "                raise KvAgentError(f\"secret '{entry.name}' expired\")\n",
        (f"{SYNC}::test_outcomes_carry_the_validity_window",
         f"{DAEMON}::test_expired_and_expiring_secrets_are_written_and_shown"),
    ),
    Mutation(
        "old-generation-kept-until-next-rotation",
        "the daemon removes a set's old generation (an old key) when its grace ends, "
        "not at the next rotation",
        "agent/daemon/reconcile.py",
        "            for directory in writer.retire():",
        "            for directory in []:",
        (f"{DAEMON}::test_a_certificate_set_rotates_whole_for_readers_and_hooks",),
    ),
    Mutation(
        "old-generation-kept-while-a-refresh-runs",
        "an old set generation goes when its grace ends, even while a refresh is stuck",
        "agent/daemon/service.py",
        "                                    self._reconcile.retire_deadline(),\n"
        "                                    self._cache.deadline(self._life.is_ready)))\n"
        "            self._handle_messages()\n"
        "            self._reconcile.retire_due()\n",
        "                                    None if self._worker.is_running\n"
        "                                    else self._reconcile.retire_deadline(),\n"
        "                                    self._cache.deadline(self._life.is_ready)))\n"
        "            self._handle_messages()\n"
        "            if not self._worker.is_running:\n"
        "                self._reconcile.retire_due()\n",
        (f"{DAEMON}::test_an_old_generation_goes_on_time_while_a_refresh_is_stuck",),
    ),
    Mutation(
        "old-generation-left-at-stop-beside-a-stuck-refresh",
        "at stop no old set generation stays in tmpfs, even with a refresh stuck",
        "agent/daemon/reconcile.py",
        "            writer.stop()",
        "            pass",
        (f"{DAEMON}::test_stop_during_a_stuck_refresh_right_after_a_swap_leaves_no_old_"
         "generation",),
    ),
    Mutation(
        "set-swap-deletes-foreign-files",
        "a set swap never deletes a file it did not write",
        "agent/writer/sets.py",
        "            kept = foreign_names(present or set(), members)",
        "            kept: List[str] = []",
        (f"{WRITER_SETS}::test_a_foreign_entry_never_swaps_a_set_and_is_never_deleted",),
    ),
    Mutation(
        "set-members-not-recorded",
        "READY=1 only with the files: a set's files count once the agent wrote them, every "
        "member recorded after each swap (unchanged members get new inodes too)",
        "agent/daemon/reconcile.py",
        "        self._record_sets(manifest, report)",
        "        pass",
        (f"{DAEMON}::test_a_set_counts_for_ready_only_while_it_is_the_agents",),
    ),
    # -- issue 9: promises the field testing found broken ---------------------
    Mutation(
        "token-where-urllib3-connects-unchecked",
        "a token goes only to the host the HTTP library will really connect to "
        "(https://evil.example\\.vault.azure.net must not reach evil.example)",
        "agent/vault/client.py",
        "            check_target(url, vault)",
        "            pass",
        (f"{VAULT}::test_every_request_is_checked_against_where_urllib3_connects",),
    ),
    Mutation(
        "forged-log-line",
        "network text cannot forge a kv-agent: log line (control characters escaped)",
        "agent/base/logs.py",
        "first, *rest = [escape(line, limit=0) for line in message.splitlines()]",
        "first, *rest = [line for line in message.splitlines()]",
        (f"{CLI}::test_log_formatter_never_starts_a_forged_line",),
    ),
    Mutation(
        "retry-after-zero-hot-loop",
        "Retry-After: 0 waits at least the normal backoff step (no 429 hot loop)",
        "agent/base/retry.py",
        "        return max(step, min(retry_after, self._policy.max_retry_after_s))",
        "        return min(retry_after, self._policy.max_retry_after_s)",
        (f"{RETRY}::test_retry_after_zero_waits_at_least_the_backoff_step",),
    ),
    Mutation(
        "no-total-request-deadline",
        "every request is bounded in total time, not only per read",
        "agent/base/transport.py",
        "        _WATCHDOG.watch(self)",
        "        pass",
        (f"{VAULT}::test_trickled_body_is_cut_at_the_total_deadline",),
    ),
    Mutation(
        "status-json-world-readable",
        "status.json (secret names and paths) is readable by root only",
        "agent/status/store.py",
        "STATUS_FILE_MODE = 0o600",
        "STATUS_FILE_MODE = 0o644",
        (f"{STATE}::test_new_state_is_private",),
    ),
    Mutation(
        "output-directory-of-another-user",
        "an output directory, or a directory below it that a file lands in, that another "
        "user owns or can write is refused",
        "agent/base/landing.py",
        "    if st.st_uid not in (0, euid):\n        return (f\"{path} is owned by uid",
        "    if False:\n        return (f\"{path} is owned by uid",
        (f"{WRITER}::test_precreated_unsafe_root_is_refused",
         f"{WRITER}::test_a_foreign_directory_below_the_root_is_refused_and_nothing_written_in_it",
         f"{WRITER}::test_check_refuses_and_once_skips_a_foreign_directory_below_the_root"),
    ),
    # -- issue 12: bulk selection ----------------------------------------------
    Mutation(
        "select-failed-listing-taken-as-empty",
        "a select entry's failed listing removes nothing (only a successful listing may)",
        "agent/sync/sync.py",
        "                    failed[selection.vault] = exc",
        "                    listings[selection.vault] = ()",
        (f"{SELECT}::test_run_keeps_every_selected_file_while_the_listing_fails_and_reports_it_once",),
    ),
    Mutation(
        "select-takes-disabled-secrets",
        "a select entry takes only enabled secrets",
        "agent/sync/selection.py",
        "    if item.attributes.enabled is not True:",
        "    if item.attributes.enabled is None:",
        (f"{SELECT}::test_expansion_keeps_enabled_secrets_matching_prefix_and_every_tag",),
    ),
    Mutation(
        "select-ready-without-listing",
        "READY=1 only with the files: a required select entry counts once it listed",
        "agent/daemon/entries.py",
        "            return state.checked is not None",
        "            return True",
        (f"{SELECT}::test_run_is_not_ready_without_a_listing_and_skips_an_explicit_entrys_secret",),
    ),
    # -- Azure Arc's key file ------------------------------------------------
    Mutation(
        "arc-key-file-from-any-directory",
        "the agent sends Azure Arc the contents of a key file only from HIMDS's tokens "
        "directory, so a fake HIMDS cannot make it send another file",
        "agent/identity/arc.py",
        "    return os.path.dirname(os.path.normpath(path)) == os.path.normpath(directory)",
        "    return True",
        (f"{ARC}::test_key_file_refusals",
         f"{ARC}::test_emulator_challenge_to_a_bad_key_file_is_refused_and_nothing_sent"),
    ),
    Mutation(
        "arc-key-file-symlink-followed",
        "an Azure Arc key file that is a symlink is refused, not followed",
        "agent/identity/arc.py",
        "        _check_file(os.lstat(path), shown)",
        "        _check_file(os.stat(path), shown)",
        (f"{ARC}::test_key_file_refusals",),
    ),
    # -- issue 12: list-based refresh -------------------------------------------
    Mutation(
        "listing-misses-a-rotation",
        "a refresh fetches every secret whose updated differs from what the agent wrote",
        "agent/sync/freshness.py",
        "    return updated is not None and updated == seen.updated and \\\n",
        "    return updated is not None and \\\n",
        (f"{FRESHNESS}::test_a_changed_updated_fetches_that_secret_only",
         f"{SYNC}::test_an_unchanged_refresh_only_lists_and_a_rotation_is_fetched[False]"),
    ),
    Mutation(
        "listing-ignores-a-damaged-file",
        "a secret whose file is missing or changed behind the agent's back is fetched "
        "and rewritten, pinned versions too",
        "agent/sync/freshness.py",
        "    return all(path in stamps and stamp(path) == stamps[path] for path in entry.paths)",
        "    return True",
        (f"{FRESHNESS}::test_a_missing_or_changed_file_is_fetched_again",
         f"{SYNC}::test_a_pinned_version_costs_nothing_and_its_file_is_repaired"),
    ),
    Mutation(
        "file-stamp-without-ctime",
        "a file edited in place behind the agent's back (same size, inode, owner and "
        "mode: only its ctime moves) is fetched and rewritten",
        "agent/sync/freshness.py",
        "st.st_size, st.st_ctime_ns, st.st_uid, st.st_gid,",
        "st.st_size, 0, st.st_uid, st.st_gid,",
        (f"{FRESHNESS}::test_a_same_size_in_place_write_is_seen_by_its_ctime_alone",),
    ),
    Mutation(
        "mapped-edit-not-verified-by-content",
        "a file others may write is verified by content at every refresh, so an edit "
        "through a shared mapping (no ctime change) is fetched and rewritten",
        "agent/sync/freshness.py",
        "    digest = _content_digest(path, st)\n",
        "    digest = b''\n",
        (f"{FRESHNESS}::test_an_edit_through_a_writable_mapping_is_seen_by_content",),
    ),
    # -- issue 13: metrics ---------------------------------------------------------
    Mutation(
        "metrics-written-in-place",
        "the metrics file is replaced by a rename, never left partial",
        "agent/daemon/metrics.py",
        '    temp = f".{name}.{os.getpid()}{TEMP_SUFFIX}"',
        "    temp = name",
        (f"{METRICS}::test_failure_mid_write_keeps_the_old_file_and_leaves_no_temp[_write_all]",),
    ),
    Mutation(
        "metrics-symlink-at-target-replaced",
        "a symlink at the metrics path is refused",
        "agent/daemon/metrics.py",
        "    if not stat.S_ISREG(st.st_mode):\n        kind =",
        "    if False:\n        kind =",
        (f"{METRICS}::test_symlink_at_the_target_is_refused_and_not_followed",),
    ),
    Mutation(
        "metrics-failures-not-counted",
        "a failing entry's consecutive failures show in the metrics",
        "agent/daemon/entries.py",
        "            state.failures += 1\n            return []",
        "            return []",
        (f"{METRICS}::test_running_agent_writes_metrics_after_each_refresh",),
    ),
    # -- issue 12: fleet scale ----------------------------------------------------
    Mutation(
        "retry-after-pauses-one-thread-only",
        "a 429 or 503 pauses all of the agent's requests to that vault, not just the one "
        "that got it",
        "agent/vault/pacing.py",
        "        pause.throttled(now, min(retry_after or 0.0, self._policy.max_retry_after_s))",
        "        pass",
        (f"{VAULT}::test_a_retry_after_pauses_the_other_requests_to_that_vault",),
    ),
    Mutation(
        "ready-agent-waits-inside-the-refresh",
        "once ready, requests a busy vault's pause holds back end unsent (files kept), "
        "so a fleet does not send everything the moment an outage ends",
        "agent/vault/pacing.py",
        "            if self.is_giving_way and pause.remaining(self._clock()) > 0:",
        "            if False:",
        (f"{VAULT}::test_a_client_that_gives_way_ends_held_back_requests_unsent",),
    ),
    Mutation(
        "ready-first-retry-in-step",
        "a ready agent's first retry after a failed refresh is spread over 5 to 60 s",
        "agent/daemon/lifecycle.py",
        "    elif is_failing and not streak:",
        "    elif False:",
        (f"{LIFECYCLE}::test_a_ready_agents_first_failure_retries_anywhere_in_a_minute",),
    ),
    # -- a value from the vault never takes the agent down (issue 17) ----------
    Mutation(
        "transform-bug-escapes",
        "only the agent's own error leaves a transform: an unexpected exception fails that "
        "entry alone",
        "agent/pipeline/transforms.py",
        "    except Exception as exc:  # the boundary: see the module docstring",
        "    except ArithmeticError as exc:  # the boundary: see the module docstring",
        (f"{TRANSFORMS}::test_only_transform_error_leaves_a_transform",
         f"{SYNC}::test_a_bug_in_one_entrys_transform_fails_that_entry_alone"),
    ),
    Mutation(
        "pkcs12-iterations-unbounded",
        "a PKCS#12 iteration count above 1,000,000 is refused before any derivation",
        "agent/pipeline/pkcs12.py",
        "    if count > MAX_ITERATIONS:",
        "    if False:",
        (f"{PKCS12}::test_the_mac_count_of_the_reported_value_is_refused_in_milliseconds",),
    ),
    Mutation(
        "rsa-key-size-unchecked",
        "an RSA key above 4,096 bits is refused before it is loaded",
        "agent/pipeline/certificates.py",
        "    if rsa_bits is not None and rsa_bits > MAX_RSA_BITS:",
        "    if False:",
        (f"{CERTIFICATES}::test_an_rsa_key_above_4096_bits_is_refused_before_it_is_loaded",),
    ),
    Mutation(
        "far-dates-kept",
        "a date after the year 9999 is read as no date",
        "agent/pipeline/expiry.py",
        "and 0 <= value <= MAX_EPOCH_S:",
        "and 0 <= value:",
        (f"{EXPIRY}::test_a_usable_epoch_is_an_integer_from_1970_to_the_year_9999",
         f"{SYNC}::test_dates_beyond_the_year_9999_are_no_date_said_once"),
    ),
    Mutation(
        "failed-start-refetches-everything",
        "a start that failed for some secrets retries only those",
        "agent/sync/freshness.py",
        "    return since is not None and seen is not None and seen.fetched_at >= since",
        "    return False",
        (f"{FRESHNESS}::test_while_starting_only_what_is_missing_is_fetched_without_listing",
         f"{SYNC}::test_a_failed_start_fetches_only_what_is_missing"),
    ),
    # -- issue 19: systemd credentials -----------------------------------------
    Mutation(
        "credential-grant-check-skipped",
        "a credential reaches only the units granted it",
        "agent/writer/credentials.py",
        "                    if grant.admits(unit):",
        "                    if True:",
        (f"{CREDENTIAL_SOCKET}::test_the_loader_is_refused_with_more_than_systemds_limit_and_a"
         "_journal_entry",),
    ),
    Mutation(
        "credential-refusal-closes-empty",
        "a refused unit fails to start: it never starts with an empty credential (systemd "
        "takes a close without data as one)",
        "agent/daemon/credentials.py",
        "        self.remaining = len(value) if value is not None else REFUSAL_BYTES",
        "        self.remaining = len(value) if value is not None else 0",
        (f"{CREDENTIAL_SOCKET}::test_the_loader_is_refused_with_more_than_systemds_limit_and_a"
         "_journal_entry",
         f"{DAEMON_CREDENTIALS}::test_granted_refused_and_foreign_clients_of_the_running_agent"),
    ),
    Mutation(
        "credential-peer-path-accepted",
        "a client that is not systemd's credential loader gets nothing, even bound to a path "
        "shaped like the loader's address",
        "agent/pipeline/credentials.py",
        "    if not isinstance(address, bytes) or not 1 < len(address) <= SUN_PATH_MAX \\\n"
        "            or address[0] != 0:",
        "    if isinstance(address, str):\n        address = address.encode()\n"
        "    if not isinstance(address, bytes) or not 1 < len(address) <= SUN_PATH_MAX:",
        (f"{CREDENTIAL_SOCKET}::test_a_client_that_is_not_the_loader_gets_nothing",
         f"{CREDENTIAL_RULES}::test_anything_else_is_nobody"),
    ),
    Mutation(
        "credential-ready-before-loaded",
        "READY=1 only once every required credential is in memory",
        "agent/daemon/entries.py",
        "            or (bool(state.grants) and key not in loaded)))",
        "            or False))",
        (f"{ENTRIES}::test_ready_waits_for_every_required_credential_in_memory",
         f"{DAEMON_CREDENTIALS}::test_ready_waits_for_a_required_credential_and_the_socket"
         "_serves_it_then"),
    ),
    # -- issue 20: the sealed cache ------------------------------------------
    Mutation(
        "serves-the-cache-on-a-403",
        "the sealed cache stands in only for an outage: a 403 is an answer, never hidden "
        "behind an old copy",
        "agent/cache/decision.py",
        "UNAVAILABLE = (IdentityUnavailableError, VaultUnavailableError, VaultThrottledError,",
        "UNAVAILABLE = (__import__('agent.base.errors').base.errors.VaultForbiddenError,\n"
        "               IdentityUnavailableError, VaultUnavailableError, VaultThrottledError,",
        (f"{CACHE_DECISION}::test_an_answer_is_never_hidden_by_a_copy",
         f"{CACHE_SERVE}::test_a_403_is_an_answer_never_hidden_by_the_cache"),
    ),
    Mutation(
        "serves-the-cache-on-an-imds-400",
        "the sealed cache stands in only for an outage: the identity endpoint's 400 "
        "(Identity not found) is an answer, never hidden behind an old copy",
        "agent/cache/decision.py",
        "ANSWERS = (IdentityRefusedError,)",
        "ANSWERS = ()",
        (f"{CACHE_DECISION}::test_an_answer_is_never_hidden_by_a_copy",
         f"{CACHE_SERVE}::test_an_imds_400_is_an_answer_never_hidden_by_the_cache"),
    ),
    Mutation(
        "serves-a-null-key-copy",
        "never a copy that is not sealed to this machine: one sealed with systemd-creds' "
        "null key (anyone could plant it) is refused before it is decrypted",
        "agent/cache/seal.py",
        "    known = AUTO_KEY_IDS.get(key_id)",
        "    known = AUTO_KEY_IDS.get(key_id, 'any key')",
        (f"{CACHE_SEAL}::test_a_null_key_copy_is_refused_without_decrypting_it",
         f"{CACHE_STORE}::test_a_planted_null_key_copy_is_skipped_never_served"),
    ),
    Mutation(
        "serves-half-a-set",
        "a set changes whole: served from the sealed cache by one swap of its directory when "
        "every member's copy may be, else not at all",
        "agent/daemon/cache_serve.py",
        "            group = self._units.groups.get(key)",
        "            group = None",
        (f"{CACHE_SERVE}::test_sets_are_served_whole_from_their_sealed_copies",
         f"{CACHE_SERVE}::test_a_set_with_one_unservable_copy_is_not_served_at_all"),
    ),
    Mutation(
        "serves-half-a-select",
        "a select: entry is served from the sealed cache whole (its last good expansion and "
        "every secret of it) or not at all",
        "agent/daemon/cache_serve.py",
        "        whole = decide_whole(label, [listing, *decisions])\n",
        "        whole = decide_whole(label, [listing])\n"
        "        entries = tuple(e for e, d in zip(entries, decisions) if d.serve)\n"
        "        decisions = [d for d in decisions if d.serve]\n",
        (f"{CACHE_SERVE}::test_a_select_entry_with_one_unservable_copy_is_not_served_at_all",),
    ),
    Mutation(
        "writes-plaintext-to-the-cache",
        "plaintext only in memory and tmpfs: with cache:, the copy on disk is sealed to this "
        "machine, never a value in plaintext",
        "agent/cache/store.py",
        "        sealed = self.sealer.seal(sealing_name(copy.key), encode(copy),  # (2)",
        "        sealed = encode(copy) or self.sealer.seal(sealing_name(copy.key), encode(copy),",
        (f"{CACHE_STORE}::test_no_plaintext_in_the_directory_ever",
         f"{CACHE_SERVE}::test_imds_down_at_boot_serves_the_sealed_copies_then_the_vault_takes"
         "_over",
         f"{CACHE_NO_PLAINTEXT}::test_no_plaintext_in_the_cache_after_writes_rotations_and"
         "_crashes"),
    ),
    Mutation(
        "serves-the-cache-on-a-404",
        "the sealed cache stands in only for an outage: a 404 (the secret deleted) is an "
        "answer, never hidden behind an old copy",
        "agent/cache/decision.py",
        "UNAVAILABLE = (IdentityUnavailableError, VaultUnavailableError, VaultThrottledError,",
        "UNAVAILABLE = (__import__('agent.base.errors').base.errors.SecretNotFoundError,\n"
        "               IdentityUnavailableError, VaultUnavailableError, VaultThrottledError,",
        (f"{CACHE_DECISION}::test_an_answer_is_never_hidden_by_a_copy",
         f"{CACHE_END_TO_END}::test_a_404_is_an_answer_never_hidden_by_the_cache"),
    ),
    Mutation(
        "waits-on-a-stuck-tpm2-for-every-copy",
        "a stuck TPM2 (or no systemd-creds) stops the sealed cache's saving and serving at the "
        "first timeout: each call may hold the main thread 10 s, under WatchdogSec=",
        "agent/cache/seal.py",
        "MACHINE_WIDE = (SealToolMissingError, SealTimeoutError)",
        "MACHINE_WIDE = (SealToolMissingError,)",
        (f"{DAEMON_CACHE}::test_a_stuck_tpm2_stops_the_save_at_the_first_timeout",
         f"{DAEMON_CACHE}::test_a_stuck_tpm2_stops_the_serving_at_the_first_timeout"),
    ),
    Mutation(
        "decrypts-the-copy-of-an-answer",
        "an entry the vault answered (a 403, a 404) is refused without decrypting its copy",
        "agent/daemon/cache_serve.py",
        "            if is_unavailable(cause):",
        "            if True:",
        (f"{DAEMON_CACHE}::test_an_answer_is_refused_without_decrypting_the_copy",),
    ),
    Mutation(
        "a-ready-agent-serves-from-the-cache",
        "only at start: a running agent that loses the vault keeps its own files, never the "
        "cache's",
        "agent/daemon/service.py",
        "            if self._cache.is_due(self._life.is_ready, self._now()):",
        "            if self._cache.is_due(False, self._now()):",
        (f"{CACHE_END_TO_END}::test_a_running_agent_keeps_its_files_and_never_serves_the_cache",),
    ),
    Mutation(
        "once-saves-to-the-cache",
        "`kv-agent once` neither serves nor saves a copy: it leaves the daemon's as they are",
        "agent/cli.py",
        "        agent.retire_generations(report)\n",
        "        agent.retire_generations(report)\n"
        "        from agent.daemon.cache import SealedCache\n"
        "        from agent.writer.credentials import CredentialStore\n"
        "        cache = SealedCache()\n"
        "        cache.install(manifest)\n"
        "        cache.save(report, CredentialStore(), time.time())\n",
        (f"{CACHE_END_TO_END}::test_once_neither_serves_nor_saves_the_cache",),
    ),
    # -- issue 21: upgrades never lose a file ---------------------------------
    Mutation(
        "deb-stops-the-agent-before-the-unpack",
        "an upgrade restarts the agent once, after the new files are in place",
        "packaging/debian/rules",
        "\tdh_installsystemd --no-enable --restart-after-upgrade",
        "\tdh_installsystemd --no-enable --no-restart-after-upgrade",
        (f"{UPGRADE_SCRIPTS}::test_deb_upgrade_restarts_once_after_the_unpack_and_never_stops"
         "_before",),
    ),
    Mutation(
        "rpm-stops-the-agent-on-upgrade",
        "an upgrade of the .rpm never stops the agent before it restarts it once",
        "packaging/rpm/kv-agent.spec",
        "%systemd_preun kv-agent.service",
        "systemctl stop kv-agent.service || :\n%systemd_preun kv-agent.service",
        (f"{UPGRADE_SCRIPTS}::test_rpm_upgrade_restarts_once_after_the_old_files_go",),
    ),
    Mutation(
        "shipped-manifest-changes",
        "an upgrade keeps the edited manifest without a prompt: the shipped one never changes",
        "systemd/manifest.yaml",
        "# This default fetches nothing.",
        "# This default fetches nothing at all.",
        (f"{UPGRADE_SCRIPTS}::test_the_shipped_manifest_never_changes_so_upgrades_never_prompt",),
    ),
    # -- issue 21: adoption ---------------------------------------------------
    Mutation(
        "vm-extension-file-key-first",
        "a migration from the Key Vault VM extension keeps the bytes: the file holds the leaf, "
        "its issuers, then the key, as the extension's",
        "agent/pipeline/certificates.py",
        "            pieces.append(_pem((chain.leaf, *chain.issuers)) + _pkcs8(bundle.key))",
        "            pieces.append(_pkcs8(bundle.key) + _pem((chain.leaf, *chain.issuers)))",
        (f"{CERTIFICATES}::test_fullchain_key_is_the_vm_extensions_file",
         "tests/test_adopt_integration.py::test_import_check_once_and_the_links_give_the"
         "_extensions_bytes"),
    ),
)
