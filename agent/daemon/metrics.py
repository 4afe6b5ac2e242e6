"""Prometheus metrics for node_exporter's textfile collector (``metrics:``).

Two parts, kept apart so the format can be tested without a file system:

* :func:`render` is pure: a :class:`MetricsSnapshot` in, the text exposition
  format out (``# HELP`` and ``# TYPE`` for every family, label values
  escaped as the format demands: backslash, double quote, line feed). Names
  follow Prometheus' conventions: base units (``_seconds``), ``_total`` for
  counters, ``_timestamp_seconds`` for unix times.
* :func:`write_metrics` replaces the file atomically, so node_exporter,
  which reads the directory at every scrape, never sees a partial file;
  :class:`MetricsFile` is the daemon's use of it (a failure logged once,
  never fatal).

The figures come from the daemon: each entry's from its entry table
(:mod:`agent.daemon.entries`), the refreshes' from
:class:`agent.daemon.refresh.RefreshStats`.

Invariants:

* Nothing secret goes in: entry keys, secret names, vault hosts, counts and
  times; never a value, a version or a token. Names and hosts come from the
  manifest and the network, so every label value is escaped.
* The file is 0644 and its directories, when created here, 0755: node_exporter
  runs as its own user. The file therefore names the manifest's entries and
  secrets to every local user (status.json, which holds more, stays root's).
* The target is never followed: a symlink (or anything not a regular file)
  at the path is refused, and the directory is opened with ``O_NOFOLLOW``.
* The temporary file does not end in ``.prom``, so the collector never reads
  it, and is removed on any failure.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import stat
from typing import Callable, List, Mapping, NamedTuple, Optional, Tuple
from urllib.parse import urlsplit

from agent.base.errors import KvAgentError, WriteError

FILE_MODE = 0o644  # node_exporter's user must read it
DIR_MODE = 0o755
TEMP_SUFFIX = ".tmp"  # not .prom: the collector reads only *.prom
# The package's drop-in that opens a directory outside /run/kv-agent to the unit.
DROP_IN_EXAMPLE = "/usr/share/doc/kv-agent/examples/metrics-path.conf"

# Where systemd reads kv-agent.service's drop-ins [systemd.unit(5)].
UNIT_DROP_IN_DIRS = ("/etc/systemd/system/kv-agent.service.d",
                     "/run/systemd/system/kv-agent.service.d",
                     "/usr/local/lib/systemd/system/kv-agent.service.d",
                     "/usr/lib/systemd/system/kv-agent.service.d",
                     "/lib/systemd/system/kv-agent.service.d")
MAX_DROP_IN_BYTES = 64 * 1024

PREFIX = "kv_agent_"
ENTRY_LABELS = ("entry", "secret", "vault")

log = logging.getLogger(__name__)

RequestKey = Tuple[str, str, str]  # (target, host, code), as agent.base.transport counts them


class EntryMetrics(NamedTuple):
    """One manifest entry's figures; times are unix seconds, None when unknown."""

    entry: str  # the entry's key: its first output's path (unique in a manifest)
    secret: str  # the secret's name, or a select entry's label
    vault: str  # the vault's URL (shown as its host)
    last_success_s: Optional[float] = None  # when the vault last confirmed it
    version_updated_s: Optional[float] = None  # the written version's `updated`
    consecutive_failures: int = 0  # refreshes in a row that did not confirm it
    expires_s: Optional[float] = None  # the secret's `exp` (a certificate: the earlier end)
    # Whether its credentials are in memory; None for an entry that serves none.
    # (A credential-only entry's key is its first grant, credential:<units>/<ID>.)
    credentials_loaded: Optional[bool] = None
    # Whether its files stand on its sealed copy (agent.daemon.cache) while the
    # vault cannot be reached; None when the manifest has no ``cache:``.
    from_cache: Optional[bool] = None


class MetricsSnapshot(NamedTuple):
    """Everything the metrics file holds, at ``now_s`` (unix seconds)."""

    now_s: float
    is_up: bool = True
    entries: Tuple[EntryMetrics, ...] = ()
    last_refresh_s: Optional[float] = None  # when the last refresh ended (any result)
    refresh_duration_s: Optional[float] = None  # how long that refresh took
    refreshes: Mapping[str, int] = {}  # result ("success", "partial", "failure") -> count
    files_written: int = 0
    requests: Mapping[RequestKey, int] = {}
    # Connections to the credential socket by result (served, refused, ignored);
    # None while no manifest served credentials: their families are left out.
    credentials: Optional[Mapping[str, int]] = None


Labels = Tuple[Tuple[str, str], ...]
Samples = Tuple[Tuple[Labels, float], ...]


class _Family(NamedTuple):
    name: str
    kind: str  # gauge or counter
    help: str
    samples: Samples  # (labels, value) pairs


def render(snapshot: MetricsSnapshot) -> str:
    """The text exposition format (version 0.0.4) of ``snapshot``; ends in a
    newline. Every family is present, with its HELP and TYPE, even when it
    has no sample (no entry yet): a dashboard finds each name. (The
    credential families only once a manifest in use served credentials: a
    file without them is as it was before there were any.)"""
    return "".join(_render_family(family) for family in _families(snapshot))


def _families(s: MetricsSnapshot) -> List[_Family]:
    def per_entry(value: Callable[[EntryMetrics], Optional[float]]) -> Samples:
        return tuple((_entry_labels(e), v) for e in s.entries for v in [value(e)]
                     if v is not None)

    def age(e: EntryMetrics) -> Optional[float]:
        if e.version_updated_s is None:
            return None
        return max(0.0, s.now_s - e.version_updated_s)

    return [
        _Family("up", "gauge", "1 while kv-agent runs; 0 once it stopped cleanly.",
                _single(1.0 if s.is_up else 0.0)),
        _Family("last_refresh_timestamp_seconds", "gauge",
                "When the last refresh ended, successful or not (unix time).",
                _single(s.last_refresh_s)),
        _Family("last_refresh_duration_seconds", "gauge",
                "How long the last refresh took, successful or not.",
                _single(s.refresh_duration_s)),
        _Family("refreshes_total", "counter",
                "Refreshes since start, by result: success (every entry current), partial "
                "(some entries failed: see kv_agent_secret_consecutive_failures), failure "
                "(the refresh failed as a whole, e.g. no token).",
                tuple(((("result", result),), float(count))
                      for result, count in sorted(s.refreshes.items()))),
        _Family("files_written_total", "counter",
                "Files written (created or replaced) since start.",
                _single(float(s.files_written))),
        _Family("requests_total", "counter",
                "HTTP requests sent since start, by target (vault or the identity source: "
                "imds, arc, app-service), host and status code (error: no answer; "
                "timeout: no answer in time).",
                tuple(((("target", target), ("host", host), ("code", code)), float(count))
                      for (target, host, code), count in sorted(s.requests.items()))),
        _Family("secret_last_success_timestamp_seconds", "gauge",
                "When the vault last confirmed the entry's files current (unix time).",
                per_entry(lambda e: e.last_success_s)),
        _Family("secret_version_age_seconds", "gauge",
                "Age of the written version: now minus its updated time in Key Vault.",
                per_entry(age)),
        _Family("secret_consecutive_failures", "gauge",
                "Refreshes in a row that failed for the entry (0: the last one worked).",
                per_entry(lambda e: float(e.consecutive_failures))),
        _Family("secret_expiry_timestamp_seconds", "gauge",
                "When the written secret expires (its exp; a certificate's notAfter), "
                "unix time; absent when it has no expiry.",
                per_entry(lambda e: e.expires_s)),
    ] + _credential_families(s, per_entry) + _cache_families(s, per_entry)


def _credential_families(
        s: MetricsSnapshot,
        per_entry: Callable[[Callable[[EntryMetrics], Optional[float]]], Samples],
) -> List[_Family]:
    """The credential socket's families, only once a manifest served credentials."""
    if s.credentials is None:
        return []
    return [
        _Family("credential_loaded", "gauge",
                "1 when the entry's systemd credentials are in memory, ready to serve "
                "(entry: its first path, or credential:<units>/<id> without one).",
                per_entry(lambda e: None if e.credentials_loaded is None
                          else float(e.credentials_loaded))),
        _Family("credential_connections_total", "counter",
                "Connections to the credential socket since start, by result: served (a "
                "granted unit got its value), refused (the unit was made to fail), ignored "
                "(not systemd's credential loader).",
                tuple(((("result", result),), float(count))
                      for result, count in sorted(s.credentials.items()))),
    ]


def _cache_families(
        s: MetricsSnapshot,
        per_entry: Callable[[Callable[[EntryMetrics], Optional[float]]], Samples],
) -> List[_Family]:
    """The sealed cache's family, only with ``cache:`` (an entry says so):
    a file without it is as it was before there was a cache."""
    if all(e.from_cache is None for e in s.entries):
        return []
    return [
        _Family("secret_from_cache", "gauge",
                "1 while the entry's files are served from its sealed copy (the vault "
                "unreachable since start); 0 once a refresh fetched it.",
                per_entry(lambda e: None if e.from_cache is None else float(e.from_cache))),
    ]


def _single(value: Optional[float]) -> Samples:
    """One sample without labels, or none when the value is unknown."""
    return () if value is None else (((), value),)


def _entry_labels(entry: EntryMetrics) -> Labels:
    return (("entry", entry.entry), ("secret", entry.secret),
            ("vault", vault_host(entry.vault)))


def _render_family(family: _Family) -> str:
    name = PREFIX + family.name
    lines = [f"# HELP {name} {_escape_help(family.help)}", f"# TYPE {name} {family.kind}"]
    for labels, value in family.samples:
        text = ",".join(f'{key}="{escape_label_value(item)}"' for key, item in labels)
        lines.append(f"{name}{{{text}}} {_number(value)}" if text
                     else f"{name} {_number(value)}")
    return "\n".join(lines) + "\n"


def escape_label_value(value: str) -> str:
    """A label value as the exposition format quotes it: ``\\`` as ``\\\\``,
    ``"`` as ``\\"`` and a line feed as ``\\n``. Anything else may stand as it
    is in UTF-8 (a carriage return included); a character that is not valid
    UTF-8 (a lone surrogate) becomes "?"."""
    text = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return text.encode("utf-8", "replace").decode("utf-8")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _number(value: float) -> str:
    """Milliseconds at most (times and durations need no more), integers
    without a fraction (counts, whole seconds); NaN and infinities as the
    format spells them."""
    value = float(value)  # an int (a count, Key Vault's epoch seconds) is welcome too
    if math.isfinite(value):
        value = round(value, 3)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < 2 ** 53:
        return str(int(value))
    return repr(value)


def vault_host(url: str) -> str:
    """The host (and port) of a vault URL, the ``vault`` label; the URL
    itself when it does not parse."""
    try:
        return urlsplit(url).netloc or url
    except ValueError:
        return url


# -- the file ----------------------------------------------------------------------------


def write_metrics(path: str, text: str) -> None:
    """Replace the file at ``path`` (absolute) with ``text``, atomically:

    1. Create the missing directories above it, each DIR_MODE (chmod again:
       mkdir applies the umask, and the unit's UMask=0077 would hide them).
    2. Open the directory with ``O_NOFOLLOW``; refuse a target that exists
       and is not a regular file (a symlink is never written through).
    3. Create the temporary file beside it (``O_EXCL|O_NOFOLLOW``), fchmod
       FILE_MODE, write everything, fsync.
    4. Rename it over the target: a reader sees the old file or the new one.
    5. On any failure remove the temporary file; the old file stays.

    Raises WriteError naming the path, the cause and a fix.
    """
    directory, name = os.path.split(path)
    try:
        _make_directories(directory)  # (1)
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                         | os.O_CLOEXEC)  # (2)
    except OSError as exc:
        raise WriteError(f"metrics: cannot use the directory {directory}: {exc.strerror}",
                         _fix(exc, "make it a directory the agent may write (the unit's "
                                   "ReadWritePaths=), or set metrics: true")) from None
    try:
        _refuse_unless_regular(dir_fd, name, path)
        _replace(dir_fd, name, text.encode("utf-8"), path)
    finally:
        os.close(dir_fd)


def remove_metrics(path: str) -> bool:
    """Remove the metrics file at ``path`` if it is a regular file (a symlink
    or anything else there is not the agent's and stays); whether it did.
    Raises WriteError when it cannot."""
    directory, name = os.path.split(path)
    try:
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                         | os.O_CLOEXEC)
    except OSError:
        return False  # no directory, no file
    try:
        st = os.lstat(name, dir_fd=dir_fd)
        if not stat.S_ISREG(st.st_mode):
            return False
        os.unlink(name, dir_fd=dir_fd)
        return True
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise WriteError(f"metrics: cannot remove {path}: {exc.strerror}",
                         "remove it by hand") from None
    finally:
        os.close(dir_fd)


class MetricsFile:
    """The daemon's metrics file: rewritten after every refresh, successful
    or not, and at stop; never fatal. A failure is logged once (until it
    changes or a write works again)."""

    def __init__(self) -> None:
        self._error: Optional[str] = None  # the last failure, logged already

    def write(self, path: Optional[str], figures: Callable[[], MetricsSnapshot]) -> None:
        """Rewrite ``path`` (None: the manifest asks for no file) with the
        rendering of ``figures()``, taken only when there is a file to write."""
        if path is None:
            return
        try:
            write_metrics(path, render(figures()))
        except KvAgentError as exc:
            if str(exc) != self._error:
                log.warning("%s", exc)
            self._error = str(exc)
            return
        except Exception:  # a bug: the metrics must never take the agent down
            log.exception("metrics: writing %s failed unexpectedly", path)
            return
        if self._error is not None:
            log.info("metrics: %s written again", path)
        self._error = None

    def remove(self, path: Optional[str]) -> None:
        """A reload turned metrics off or moved them: the old file goes, so
        no stale series (``kv_agent_up 1`` forever) stays behind."""
        if path is None:
            return
        try:
            if remove_metrics(path):
                log.info("metrics: removed %s (no longer in the manifest)", path)
        except KvAgentError as exc:
            log.warning("%s", exc)
        self._error = None


def _fix(exc: OSError, otherwise: str) -> str:
    """The fix for ``exc``. Under the packaged unit, a read-only file system
    is its sandbox (ProtectSystem=strict), and only the drop-in opens it:
    "make it writable" would send the operator to chmod, which cannot help."""
    if exc.errno == errno.EROFS:
        return (f"the unit may write only to /run/secrets and /run/kv-agent: create the "
                f"directory if it is missing, install {DROP_IN_EXAMPLE} (ReadWritePaths= for "
                "it) as a drop-in and restart kv-agent, or set metrics: true")
    return otherwise


def _make_directories(directory: str) -> None:
    missing: List[str] = []
    current = directory
    while not os.path.lexists(current):
        missing.append(current)
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    for one in reversed(missing):
        try:
            os.mkdir(one, DIR_MODE)
        except FileExistsError:
            continue  # made meanwhile: as found, untouched
        os.chmod(one, DIR_MODE)


def _refuse_unless_regular(dir_fd: int, name: str, path: str) -> None:
    try:
        st = os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise WriteError(f"metrics: cannot check {path}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a regular file"
        raise WriteError(f"metrics: {path} is {kind}; the agent never writes through it",
                         f"remove {path} (the agent recreates it), or choose another "
                         "metrics: path")


def _replace(dir_fd: int, name: str, data: bytes, path: str) -> None:
    temp = f".{name}.{os.getpid()}{TEMP_SUFFIX}"
    try:
        fd = _create(dir_fd, temp)  # (3)
    except OSError as exc:
        raise WriteError(f"metrics: cannot create a file beside {path}: {exc.strerror}",
                         _fix(exc, "make its directory writable for the agent")) from None
    try:
        try:
            os.fchmod(fd, FILE_MODE)
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)  # (4)
    except OSError as exc:
        _unlink_quietly(dir_fd, temp)  # (5)
        raise WriteError(f"metrics: cannot write {path}: {exc.strerror or exc}",
                         "the previous file is kept; check the space and permissions "
                         "of its directory") from None
    except BaseException:
        _unlink_quietly(dir_fd, temp)
        raise


def _create(dir_fd: int, temp: str) -> int:
    """The new temporary file; one left by a crashed process of the same pid
    is removed first (O_EXCL never opens an existing file)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        return os.open(temp, flags, FILE_MODE, dir_fd=dir_fd)
    except FileExistsError:
        os.unlink(temp, dir_fd=dir_fd)
        return os.open(temp, flags, FILE_MODE, dir_fd=dir_fd)


def _write_all(fd: int, data: bytes) -> None:
    """write(2) until every byte is out (a write may be short)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _unlink_quietly(dir_fd: int, name: str) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except OSError:
        pass  # gone already, or the next write's _create removes it


def drop_in_allowing(path: str, directories: Tuple[str, ...] = UNIT_DROP_IN_DIRS
                     ) -> Optional[str]:
    """The drop-in whose ``ReadWritePaths=`` opens ``path``'s directory to the
    sandboxed unit, or None. `kv-agent check` then names it instead of telling
    an operator who already installed one to install it. Only reads: files
    that cannot be read are skipped, each read is bounded. (An empty
    ``ReadWritePaths=``, which resets the list, is not modelled: it would
    only make this answer too kind, never refuse a working setup.)"""
    target = os.path.dirname(path)
    for directory in directories:
        try:
            names = sorted(name for name in os.listdir(directory) if name.endswith(".conf"))
        except OSError:
            continue
        for name in names:
            drop_in = os.path.join(directory, name)
            if any(_covers(allowed, target) for allowed in _read_write_paths(drop_in)):
                return drop_in
    return None


def _read_write_paths(drop_in: str) -> List[str]:
    """Every path a drop-in's ``ReadWritePaths=`` lines name, without the
    ``-`` (ignore if missing) and ``+`` prefixes."""
    try:
        with open(drop_in, "rb") as handle:
            text = handle.read(MAX_DROP_IN_BYTES).decode("utf-8", "replace")
    except OSError:
        return []
    paths: List[str] = []
    for line in text.splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and key.strip() == "ReadWritePaths":
            paths.extend(item.lstrip("-+") for item in value.split())
    return paths


def _covers(allowed: str, directory: str) -> bool:
    """Whether ``allowed`` (a ReadWritePaths= entry) is ``directory`` or above it."""
    allowed = allowed.rstrip("/")
    return bool(allowed) and (directory == allowed or directory.startswith(allowed + "/"))
