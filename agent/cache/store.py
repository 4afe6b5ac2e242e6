"""The cache directory: one sealed copy per entry, replaced atomically.

Invariants:

* Nothing in the directory ever holds a value in plaintext: a copy is sealed
  (:mod:`agent.cache.seal`) before a byte reaches the file system, and the
  temporary file receives ciphertext only.
* The directory is root's (or the agent's user's), mode 0700, not a
  symlink; created so if missing, refused otherwise, and no directory
  above it may be replaced by another user (the writer's rule for the
  directories above a root, :mod:`agent.writer.root`).
* A copy's file is named by the SHA-256 of its entry's key (a path or a
  credential label: any characters), ``<hex>.sealed``; the sealing name
  is ``kv-agent-<hex>``, and the key itself is inside the sealed document.
* Names starting with the reserved prefix are this store's temporary
  files: a crash may leave one behind (ciphertext); :meth:`CacheStore.prune`
  removes it. Other names are left alone.
* Not thread-safe: one caller at a time (the daemon's refresh thread saves,
  its start loads and prunes, never at once).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import secrets
import stat
from typing import Dict, Iterable, Optional, Tuple

from agent.base.errors import CacheError
from agent.base.landing import RESERVED_PREFIX, directories_above
from agent.cache.copy import Copy, decode, encode
from agent.cache.seal import MAX_SEALED_BYTES, Sealer

SUFFIX = ".sealed"
TEMP_PREFIX = RESERVED_PREFIX + "tmp-"
COPY_NAME_RE = re.compile(r"^[0-9a-f]{64}\.sealed$")
SEALING_PREFIX = "kv-agent-"
# An unchanged copy is sealed again once its fetch time is this old (or a quarter of
# max_age, if less), so a copy is never much older than the last good fetch; each key
# sooner by up to half of it (reseal_after).
RESEAL_AFTER_S = 3600.0
DIRECTORY_MODE = 0o700


def file_name(key: str) -> str:
    """The file of ``key``'s copy: any key, one safe name."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest() + SUFFIX


def reseal_after(key: str, max_age_s: float) -> float:
    """How old an unchanged copy of ``key`` may grow before it is sealed again:
    RESEAL_AFTER_S (or max_age/4), less up to a half set by the key. The copies
    of one manifest are all sealed at its first refresh; without the spread,
    every one would be sealed again in the same refresh an hour later, each a
    systemd-creds run (9 ms measured) on the daemon's main thread: 9 s for
    1,000 entries, where the spread makes it a few at each refresh."""
    limit = min(RESEAL_AFTER_S, max_age_s / 4)
    share = int.from_bytes(hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()[:4],
                           "big") / 2 ** 32
    return limit * (1 - share / 2)


def sealing_name(key: str) -> str:
    """The credential name ``key``'s copy is sealed under (``--name=``)."""
    return SEALING_PREFIX + file_name(key)[:-len(SUFFIX)]


class CacheStore:
    """The sealed copies in ``directory``, sealed by ``sealer``. ``euid``
    (default: this process's) may own the directory besides root."""

    def __init__(self, directory: str, sealer: Sealer, *, euid: Optional[int] = None) -> None:
        self.directory = directory
        self.sealer = sealer
        self.euid = os.geteuid() if euid is None else euid
        # Per key: a keyed digest of its bytes and the fetch time of the copy on disk,
        # so an unchanged entry is not sealed again at every refresh. Keyed by a
        # per-process secret: no plain hash of a value is kept, even in memory.
        self._salt = secrets.token_bytes(32)
        self._sealed: Dict[str, Tuple[bytes, float]] = {}

    def save(self, copy: Copy, max_age_s: float) -> bool:
        """Seal ``copy`` into its file, valid ``max_age_s`` past its fetch
        time, unless the file already holds these bytes sealed less than
        :func:`reseal_after` before. True when written. Raises
        CacheError (SealError included); the previous copy is then intact.

        (1) compare with what this store last sealed for the key;
        (2) seal (plaintext to systemd-creds's stdin only);
        (3) open the directory (created if missing), judged;
        (4) write the ciphertext to a new temporary file (O_EXCL, 0600), fsync;
        (5) rename it over the copy; (6) fsync the directory;
        (7) on any failure, remove the temporary file.
        """
        digest = self._digest(copy)
        known = self._sealed.get(copy.key)  # (1)
        if known and known[0] == digest and \
                copy.fetched_at - known[1] < reseal_after(copy.key, max_age_s):
            return False
        sealed = self.sealer.seal(sealing_name(copy.key), encode(copy),  # (2)
                                  copy.fetched_at + max_age_s)
        directory = self._open_directory(create=True)  # (3)
        assert directory is not None  # created, or CacheError
        try:
            self._replace(directory, file_name(copy.key), sealed)
        finally:
            os.close(directory)
        self._sealed[copy.key] = (digest, copy.fetched_at)
        return True

    def load(self, key: str) -> Optional[Copy]:
        """``key``'s copy, unsealed and checked to be this entry's; None when
        there is none. Raises CacheError: unsafe directory, unreadable file,
        a copy of another entry or format; SealError: expired, damaged,
        another machine's key."""
        directory = self._open_directory(create=False)
        if directory is None:
            return None
        try:
            sealed = self._read(directory, file_name(key))
        finally:
            os.close(directory)
        if sealed is None:
            return None
        copy = decode(self.sealer.unseal(sealing_name(key), sealed), key)
        self._sealed[key] = (self._digest(copy), copy.fetched_at)
        return copy

    def prune(self, keep: Iterable[str]) -> Tuple[str, ...]:
        """Remove every copy whose entry is not in ``keep`` (the manifest's
        entry keys) and every temporary file left by a crash; other names
        are left alone. Returns the names removed, sorted. Raises CacheError
        (a name that cannot be removed: read-only, busy, not ours)."""
        wanted = {file_name(key) for key in keep}
        self._sealed = {key: known for key, known in self._sealed.items()
                        if file_name(key) in wanted}
        directory = self._open_directory(create=False)
        if directory is None:
            return ()
        removed = []
        try:
            for name in os.listdir(directory):
                stale = COPY_NAME_RE.match(name) and name not in wanted
                if stale or name.startswith(TEMP_PREFIX):
                    _unlink(directory, name)
                    removed.append(name)
        except OSError as exc:
            raise self._unusable(exc) from None
        finally:
            os.close(directory)
        return tuple(sorted(removed))

    def inspect(self) -> Optional[Dict[str, float]]:
        """Each copy's file name -> when it was last sealed (its mtime), the
        directory judged as a save judges it; None when it does not exist
        yet. Reads no copy (``kv-agent doctor`` decrypts nothing). Raises
        CacheError (an unsafe or unusable directory)."""
        directory = self._open_directory(create=False)
        if directory is None:
            return None
        try:
            return {name: os.stat(name, dir_fd=directory, follow_symlinks=False).st_mtime
                    for name in os.listdir(directory) if COPY_NAME_RE.match(name)}
        except OSError as exc:
            raise self._unusable(exc) from None
        finally:
            os.close(directory)

    # -- the directory -----------------------------------------------------------------------

    def _open_directory(self, create: bool) -> Optional[int]:
        """An fd of the directory, judged (None if missing and not ``create``)."""
        if create:
            self._create()
        try:
            fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                         | os.O_CLOEXEC)
        except FileNotFoundError:
            if create:
                raise CacheError(f"cache directory {self.directory} vanished", None) from None
            return None
        except OSError as exc:
            raise self._unusable(exc) from None
        try:
            self._judge(os.fstat(fd))
        except CacheError:
            os.close(fd)
            raise
        return fd

    def _create(self) -> None:
        try:
            os.makedirs(self.directory, mode=DIRECTORY_MODE, exist_ok=True)
        except OSError as exc:
            raise self._unusable(exc) from None

    def _judge(self, st: os.stat_result) -> None:
        """Root's (or the agent's), 0700 at most, and every directory above
        it (as written and as resolved) not replaceable by another user."""
        fix = f"chown root:root {self.directory} && chmod 0700 {self.directory}"
        if st.st_uid not in (0, self.euid):
            raise CacheError(f"cache directory {self.directory} is owned by uid {st.st_uid}",
                             fix)
        if stat.S_IMODE(st.st_mode) & 0o077:
            raise CacheError(f"cache directory {self.directory} is open to group or others "
                             f"(mode {stat.S_IMODE(st.st_mode):04o})", fix)
        parent = os.path.dirname(self.directory)
        for chain in (directories_above(parent), directories_above(os.path.realpath(parent))):
            for above in chain:
                try:
                    problem = self._ancestor_problem(above, os.lstat(above))
                except OSError as exc:
                    raise self._unusable(exc) from None
                if problem:
                    raise CacheError(f"cache directory {self.directory}: {problem}",
                                     "choose a directory under /var/lib")

    def _ancestor_problem(self, path: str, st: os.stat_result) -> Optional[str]:
        """Why another user could replace the cache directory through ``path``
        (a directory above it, or a symlink on the way), or None: the
        writer's rule (root's or ours; writable by others only when sticky
        and root's, as /tmp, where only a file's owner may replace it)."""
        if st.st_uid not in (0, self.euid):
            return f"{path} is owned by uid {st.st_uid}, who could replace it"
        if stat.S_ISLNK(st.st_mode):
            return None
        is_sticky_root = bool(st.st_mode & stat.S_ISVTX) and st.st_uid == 0
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not is_sticky_root:
            return (f"{path} is writable by group or others (mode "
                    f"{stat.S_IMODE(st.st_mode):04o}), who could replace it")
        return None

    def _unusable(self, exc: OSError) -> CacheError:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            return CacheError(f"cache directory {self.directory} is a symlink or not a "
                              "directory", "remove it so kv-agent creates it")
        return CacheError(f"cache directory {self.directory}: {exc.strerror}", None)

    # -- files ---------------------------------------------------------------------------

    def _replace(self, directory: int, name: str, sealed: bytes) -> None:
        """Steps (4) to (7) of :meth:`save`."""
        temp = TEMP_PREFIX + secrets.token_hex(8)
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600, dir_fd=directory)  # (4)
            try:
                view = memoryview(sealed)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(temp, name, src_dir_fd=directory, dst_dir_fd=directory)  # (5)
            os.fsync(directory)  # (6)
        except OSError as exc:
            with contextlib.suppress(OSError):  # ciphertext left behind: prune removes it
                _unlink(directory, temp)  # (7)
            raise CacheError(f"cannot keep a sealed copy in {self.directory}: "
                             f"{exc.strerror}", None) from None

    def _read(self, directory: int, name: str) -> Optional[bytes]:
        """The file's bytes (a regular file, not a symlink, bounded), or None."""
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK,
                         dir_fd=directory)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise CacheError(f"sealed copy {self.directory}/{name}: {exc.strerror}",
                             None) from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise CacheError(f"sealed copy {self.directory}/{name} is not a file", None)
            data = bytearray()
            while len(data) <= MAX_SEALED_BYTES:
                block = os.read(fd, 65536)
                if not block:
                    return bytes(data)
                data += block
            raise CacheError(f"sealed copy {self.directory}/{name} is larger than "
                             f"{MAX_SEALED_BYTES} bytes", "it is skipped")
        finally:
            os.close(fd)

    def _digest(self, copy: Copy) -> bytes:
        hasher = hashlib.blake2b(key=self._salt)
        for target, data in copy.items:
            for part in (target.encode("utf-8", "surrogatepass"), data):
                hasher.update(len(part).to_bytes(8, "big"))
                hasher.update(part)
        return hasher.digest()


def _unlink(directory: int, name: str) -> None:
    try:
        os.unlink(name, dir_fd=directory)
    except FileNotFoundError:
        pass
