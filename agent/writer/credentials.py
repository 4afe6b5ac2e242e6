"""The credential store: where a credential's bytes land, in memory only.

A credential-only output has no file: its bytes land here, and the running
agent's socket serves them to the units granted them. The store knows no
Azure, no manifest and no socket; it holds, per entry (by the entry's key),
the grants the manifest in force declares and the bytes last loaded for each.

Invariants:

* Nothing here is ever written anywhere: no file, no log, no repr (a
  :class:`Answer`'s repr masks its value). Python cannot wipe ``bytes``;
  a replaced value is dropped for the collector, like any fetched secret.
* An entry's values are replaced whole, in one step under the lock
  (:meth:`CredentialStore.replace`): a reader sees every credential of the
  entry from one version, never a mix.
* Only declared grants are served (:meth:`CredentialStore.declare`, the
  manifest in force): a credential that left the manifest, or whose units
  changed, is dropped at once and never served again, even if a sync of the
  old manifest still finishing tries to load it.
* A lookup fails closed: no grant of that ID admits the unit, two do (the
  manifest refuses that; the store never guesses), or none is loaded yet:
  no bytes, and the reason (:class:`Answer`).

Thread-safe: a refresh thread loads while the socket's thread reads.
"""

from __future__ import annotations

import threading
from typing import (
    Dict,
    FrozenSet,
    Generic,
    Iterable,
    List,
    Mapping,
    NamedTuple,
    Optional,
    Protocol,
    Sequence,
    Tuple,
    TypeVar,
)

# Why a lookup served nothing (Answer.refusal), for the one log line per unit and ID.
UNKNOWN_ID = "no credential of that ID"
NOT_GRANTED = "the unit is not granted it"
AMBIGUOUS = "more than one grant admits the unit"
NOT_LOADED = "its value is not loaded yet"


class Granted(Protocol):
    """What the store needs of a grant (agent.pipeline.credentials.Grant is one)."""

    @property
    def id(self) -> str: ...

    def admits(self, unit: str) -> bool: ...


G = TypeVar("G", bound=Granted)


class Answer(NamedTuple):
    """A lookup's answer: the bytes to serve, or None and why not."""

    value: Optional[bytes]
    refusal: Optional[str] = None

    def __repr__(self) -> str:
        shown = "None" if self.value is None else f"<{len(self.value)} bytes>"
        return f"Answer(value={shown}, refusal={self.refusal!r})"


class CredentialStore(Generic[G]):
    """The current bytes of every credential, by entry key and grant."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._declared: Dict[str, Tuple[G, ...]] = {}
        self._values: Dict[str, Tuple[bytes, ...]] = {}  # aligned with _declared[key]

    def __repr__(self) -> str:
        with self._lock:
            return (f"CredentialStore({len(self._declared)} entries declared, "
                    f"{len(self._values)} loaded)")

    def declare(self, grants: Mapping[str, Sequence[G]]) -> None:
        """Make ``grants`` (entry key -> its grants, in output order) the
        credentials served from now on. An entry declared before with the
        very same grants keeps its values; every other value is dropped now.
        ``declare({})`` serves nothing (at stop)."""
        declared = {key: tuple(found) for key, found in grants.items() if found}
        with self._lock:
            # A held value was loaded for the grants declared then (replace
            # insists), and those have not changed since, or it would be gone.
            self._values = {key: values for key, values in self._values.items()
                            if declared.get(key) == self._declared.get(key)}
            self._declared = declared

    def replace(self, key: str, values: Sequence[Tuple[G, bytes]]) -> Tuple[G, ...]:
        """Hold ``values`` (each of the entry's grants with its bytes, in
        output order) as entry ``key``'s, replacing what it held, in one
        step. Returns the grants whose bytes are new or differ (none when
        nothing changed). Ignored, returning none, unless exactly these
        grants are declared for ``key``: a sync of a manifest since replaced
        loads nothing."""
        grants = tuple(grant for grant, _ in values)
        data = tuple(bytes(value) for _, value in values)
        with self._lock:
            if not grants or self._declared.get(key) != grants:
                return ()
            before = self._values.get(key)
            self._values[key] = data
        return tuple(grant for index, grant in enumerate(grants)
                     if before is None or before[index] != data[index])

    def lookup(self, unit: str, credential_id: str) -> Answer:
        """What to serve ``unit`` asking for ``credential_id``: the bytes of
        the one declared grant of that ID that admits the unit, once loaded;
        else no bytes and the reason (fails closed)."""
        with self._lock:
            matches: List[Tuple[str, int]] = []
            has_id = False
            for key, grants in self._declared.items():
                for index, grant in enumerate(grants):
                    if grant.id != credential_id:
                        continue
                    has_id = True
                    if grant.admits(unit):
                        matches.append((key, index))
            if not matches:
                return Answer(None, NOT_GRANTED if has_id else UNKNOWN_ID)
            if len(matches) > 1:
                return Answer(None, AMBIGUOUS)
            key, index = matches[0]
            values = self._values.get(key)
        return Answer(None, NOT_LOADED) if values is None else Answer(values[index])

    def value_for(self, unit: str, credential_id: str) -> Optional[bytes]:
        """The bytes to serve ``unit`` for ``credential_id``, or None (:meth:`lookup`)."""
        return self.lookup(unit, credential_id).value

    def holds(self, key: str, grants: Sequence[G]) -> bool:
        """Whether entry ``key``'s values are loaded for exactly ``grants``."""
        with self._lock:
            return key in self._values and self._declared.get(key) == tuple(grants)

    def values(self, key: str, grants: Sequence[G]) -> Optional[Tuple[bytes, ...]]:
        """Entry ``key``'s bytes, in grant order, when loaded for exactly
        ``grants`` (the daemon seals them into its cache); else None."""
        with self._lock:
            if self._declared.get(key) != tuple(grants):
                return None
            return self._values.get(key)

    def loaded(self) -> FrozenSet[str]:
        """The keys of the entries whose credentials are loaded."""
        with self._lock:
            return frozenset(self._values)

    def unloaded(self, keys: Iterable[str]) -> Tuple[str, ...]:
        """Those of ``keys`` whose credentials are not loaded (READY waits for
        the non-optional ones), in the order given."""
        with self._lock:
            return tuple(key for key in keys if key not in self._values)
