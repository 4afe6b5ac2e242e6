"""Typed errors and exit codes for kv-agent.

Every foreseeable failure is a :class:`KvAgentError`: a one-line message that
names the object (manifest key, secret, path) and what to do about it. The CLI
turns these into ``kv-agent: error: ...`` and an exit code; only an unforeseen
exception ever shows a traceback.

This module imports nothing from the package so every other module can use it.
A message must never contain a secret value or a token.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

# Exit codes (sysexits.h where one fits, so systemd's RestartPreventExitStatus=
# can tell "fix the config" apart from "try again").
EXIT_OK = 0
EXIT_FAILURE = 1  # some secret could not be written; the others were
EXIT_USAGE = 2  # bad command line (argparse's own code)
EXIT_UNAVAILABLE = 69  # EX_UNAVAILABLE: IMDS or the vault cannot be reached
EXIT_SOFTWARE = 70  # EX_SOFTWARE: a bug; a traceback was printed
EXIT_CANTCREAT = 73  # EX_CANTCREAT: the output directory cannot be used
EXIT_NOPERM = 77  # EX_NOPERM: this user may not read what the command needs
EXIT_CONFIG = 78  # EX_CONFIG: the manifest is invalid


class KvAgentError(Exception):
    """A foreseeable failure with a message fit for an operator.

    ``hint`` says what to do; it is kept apart so callers can show it
    differently, and ``str()`` joins the two into one line.
    """

    exit_code = EXIT_FAILURE

    def __init__(self, message: str, hint: Optional[str] = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}; {self.hint}" if self.hint else self.message


class ManifestError(KvAgentError):
    """The manifest is unreadable, unsafe or invalid.

    Validation reports every problem at once, so an operator fixes the file in
    one pass: ``problems`` holds one line per problem, each naming the file,
    the line, the key and the fix.
    """

    exit_code = EXIT_CONFIG

    def __init__(
        self, message: str, hint: Optional[str] = None, problems: Sequence[str] = ()
    ) -> None:
        super().__init__(message, hint)
        self.problems: Tuple[str, ...] = tuple(problems) or (str(self),)


class IdentityUnavailableError(KvAgentError):
    """No managed-identity token could be obtained from IMDS."""

    exit_code = EXIT_UNAVAILABLE


class IdentityRefusedError(IdentityUnavailableError):
    """The identity endpoint answered with a final 4xx refusal: no such
    identity on this machine ("Identity not found"), several and none
    chosen, a refused key file or a challenge the agent cannot meet; decided
    once, by the reply's status (:func:`agent.identity.request.refusal`). An
    answer, not an outage: the sealed cache
    never stands in for it (:mod:`agent.cache.decision`). A subclass, so
    everything that handles an unavailable identity (the sync's abort, the
    exit code 69, the doctor) handles it too."""


class VaultError(KvAgentError):
    """Key Vault refused or failed a request for one secret."""

    exit_code = EXIT_FAILURE


class SecretNotFoundError(VaultError):
    """404: the secret (or the pinned version) does not exist."""


class VaultForbiddenError(VaultError):
    """403: no permission, a firewall, or a disabled secret version."""


class VaultThrottledError(VaultError):
    """429 persisted beyond the retry budget."""


class ListTooLongError(VaultError):
    """A vault's list ran past its page or item bound (a list is never cut short)."""


class VaultUnavailableError(VaultError):
    """The vault could not be reached or kept failing with 5xx."""

    exit_code = EXIT_UNAVAILABLE


class EndlessListError(VaultError):
    """A vault's list kept sending pages that did not advance it: empty pages in
    a row, or far more pages than its secrets fill. Worth trying again later."""

    exit_code = EXIT_UNAVAILABLE


class TransformError(KvAgentError):
    """A fetched secret cannot be turned into its entry's files; that entry
    fails (its files keep their last good content), the others go on. The
    only error that may leave a transform (:mod:`agent.pipeline.transforms`); here,
    below both transforms and certificates, so neither imports the other
    for it."""


class WriteError(KvAgentError):
    """A file could not be written safely; its previous content is intact."""

    exit_code = EXIT_CANTCREAT


class ConfigError(KvAgentError):
    """The agent's environment is misconfigured (e.g. a CA bundle variable
    naming a missing file): fix it, retrying will not help."""

    exit_code = EXIT_CONFIG


class PermissionDeniedError(KvAgentError):
    """The user running the command may not read what it needs (status.json
    is root's alone), which is not the same as "nothing there"."""

    exit_code = EXIT_NOPERM


class MissingDependencyError(KvAgentError):
    """An optional Python package a command needs is not installed (the
    emulator's and the demo's ``cryptography``): 69, EX_UNAVAILABLE, as for a
    support program that does not exist."""

    exit_code = EXIT_UNAVAILABLE


class SetKeptError(KvAgentError):
    """Another member of this entry's set failed, so the whole set kept its
    last good files (a set changes whole or not at all). Carries the cause's
    exit code: a set kept because the vault was down is worth a retry."""

    def __init__(self, message: str, hint: Optional[str], cause: KvAgentError) -> None:
        super().__init__(message, hint)
        self.cause = cause
        self.exit_code = cause.exit_code


class CacheError(KvAgentError):
    """The sealed cache (``cache:``) could not keep or give back a copy: its
    directory is unsafe, a copy is missing, malformed or another entry's.
    Never fatal to the agent: the entry goes without a copy, one line says why."""


class SealError(CacheError):
    """``systemd-creds`` could not seal or unseal a copy. The message names the
    credential and what went wrong (systemd-creds's own words, escaped and
    bounded), never a value."""


class SealToolMissingError(SealError):
    """``systemd-creds`` is not installed (or not executable): no copy can be
    sealed or read on this machine."""

    exit_code = EXIT_UNAVAILABLE


class SealTimeoutError(SealError):
    """``systemd-creds`` did not finish in time (a TPM2 that does not answer)."""

    exit_code = EXIT_UNAVAILABLE


class SealRefusedError(SealError):
    """``systemd-creds`` refused: the copy expired (``--not-after``), names
    another credential, is damaged, or was sealed with another host key or
    TPM2 state; or it could not seal (no usable key)."""
