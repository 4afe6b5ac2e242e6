"""The vault's contents: secrets, their versions, soft-deleted secrets and forbidden names.

Every method takes one lock, so a test may rotate, disable or delete a secret
while requests are in flight.
"""

from __future__ import annotations

import dataclasses
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from agent.emulator.secrets_file import VersionSpec
from agent.emulator.wire import KEYVAULT_RECOVERABLE_S


@dataclass
class Version:
    """A stored secret version; ``seq`` orders versions across the whole vault."""

    version: str
    spec: VersionSpec
    created: int
    updated: int
    seq: int


@dataclass
class _Secret:
    """A stored secret: its name as first created, and versions oldest first."""

    name: str
    versions: list[Version] = field(default_factory=list)


@dataclass(frozen=True)
class DeletedSecret:
    """A soft-deleted secret with every version, as recover brings it back (B5)."""

    secret: _Secret
    deleted: int
    purge_at: int


class DeletedConflictError(LookupError):
    """The name belongs to a deleted secret that was neither recovered nor purged."""




class SecretStore:
    """The vault's contents; every method takes the lock, so tests may change it mid-run."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        # Keyed by lower-case name: Key Vault names are case-insensitive (B7).
        self._secrets: dict[str, _Secret] = {}
        self._forbidden: dict[str, str] = {}
        self._deleted: dict[str, DeletedSecret] = {}
        self._seq = 0

    def add(self, name: str, spec: VersionSpec) -> str:
        """Append a version (creating the secret); raises DeletedConflictError (B5 409)."""
        now = int(self._clock())
        version = uuid.uuid4().hex
        with self._lock:
            if name.lower() in self._deleted:
                raise DeletedConflictError(
                    f"secret {name!r} is soft-deleted in the emulator: recover or purge it first"
                )
            self._seq += 1
            secret = self._secrets.setdefault(name.lower(), _Secret(name))
            secret.versions.append(Version(version, spec, now, now, self._seq))
        return version

    def set_enabled(self, name: str, version: str | None, enabled: bool) -> None:
        with self._lock:
            target = self._find(name, version)
            if target is None:
                label = name if version is None else f"{name}/{version}"
                raise KeyError(f"no secret {label!r} in the emulator")
            target.spec = dataclasses.replace(target.spec, enabled=enabled)
            target.updated = int(self._clock())

    def delete(self, name: str) -> None:
        """Remove a live secret at once, as a delete followed by a purge would."""
        with self._lock:
            if self._secrets.pop(name.lower(), None) is None:
                raise KeyError(f"no secret {name!r} in the emulator")

    def update(
        self,
        name: str,
        version: str | None,
        change: Callable[[VersionSpec], VersionSpec],
    ) -> tuple[str, Version] | None:
        """Apply ``change`` to one version's attributes; None when there is no such version."""
        with self._lock:
            target = self._find(name, version)
            if target is None:
                return None
            target.spec = change(target.spec)
            target.updated = int(self._clock())
            return self._secrets[name.lower()].name, dataclasses.replace(target)

    def soft_delete(self, name: str) -> DeletedSecret | None:
        """Move a secret with all its versions to the deleted state; None when missing."""
        now = int(self._clock())
        with self._lock:
            secret = self._secrets.pop(name.lower(), None)
            if secret is None:
                return None
            deleted = DeletedSecret(secret, now, now + KEYVAULT_RECOVERABLE_S)
            self._deleted[name.lower()] = deleted
            return _copy_deleted(deleted)

    def deleted(self, name: str) -> DeletedSecret | None:
        with self._lock:
            found = self._deleted.get(name.lower())
            return None if found is None else _copy_deleted(found)

    def all_deleted(self) -> list[DeletedSecret]:
        with self._lock:
            return [_copy_deleted(found) for found in self._deleted.values()]

    def recover(self, name: str) -> tuple[str, Version] | None:
        """Bring a deleted secret back with every version; None when it is not deleted."""
        with self._lock:
            found = self._deleted.pop(name.lower(), None)
            if found is None:
                return None
            self._secrets[name.lower()] = found.secret
            return found.secret.name, dataclasses.replace(found.secret.versions[-1])

    def purge(self, name: str) -> bool:
        """Forget a deleted secret for good; False when it is not deleted."""
        with self._lock:
            return self._deleted.pop(name.lower(), None) is not None

    def forbid(self, name: str, inner_code: str | None) -> None:
        with self._lock:
            if inner_code is None:
                self._forbidden.pop(name.lower(), None)
            else:
                self._forbidden[name.lower()] = inner_code

    def forbidden(self, name: str) -> str | None:
        with self._lock:
            return self._forbidden.get(name.lower())

    def get(self, name: str, version: str | None) -> tuple[str, Version] | None:
        """Return (stored name, version), or None; ``version=None`` means the latest."""
        with self._lock:
            target = self._find(name, version)
            if target is None:
                return None
            return self._secrets[name.lower()].name, dataclasses.replace(target)

    def latest_of_all(self) -> list[tuple[str, Version]]:
        """Every secret's latest version, ordered by upper-cased name like the real cursor."""
        with self._lock:
            items = [
                (s.name, dataclasses.replace(s.versions[-1]))
                for s in self._secrets.values()
            ]
        return sorted(items, key=lambda item: item[0].upper())

    def versions(self, name: str) -> list[tuple[str, Version]]:
        with self._lock:
            secret = self._secrets.get(name.lower())
            if secret is None:
                return []
            return [(secret.name, dataclasses.replace(v)) for v in secret.versions]

    def _find(self, name: str, version: str | None) -> Version | None:
        secret = self._secrets.get(name.lower())
        if secret is None or not secret.versions:
            return None
        if version is None:
            return secret.versions[-1]
        return next((v for v in secret.versions if v.version == version.lower()), None)


def _copy_deleted(found: DeletedSecret) -> DeletedSecret:
    """A snapshot callers may read without the store's lock."""
    versions = [dataclasses.replace(version) for version in found.secret.versions]
    return dataclasses.replace(found, secret=_Secret(found.secret.name, versions))
