"""Transforms: pure functions from a fetched secret to the bytes of each output.

The middle of the pipeline (entries -> sources -> **transforms** -> outputs).
A transform is given what the vault returned (the value's bytes, its content
type and its attributes) and returns one ``bytes`` per output of the entry,
in the entry's output order. Today only ``raw`` exists (the value, byte for
byte, to one file); a certificate split into key and chain, an encoding or a
template is one more function here and one more name in :data:`TRANSFORMS`.

Rules for every transform: pure (no I/O, no clock, no environment; this
module imports nothing that does any), deterministic, and never quoting the
value in an error: a :class:`TransformError` names the secret and the fix.
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional, Protocol, Tuple

from agent.errors import KvAgentError
from agent.sources import SecretAttributes


class Material(Protocol):
    """What a transform reads: the fetched secret (``vault.Secret`` is one)."""

    @property
    def name(self) -> str: ...

    @property
    def value(self) -> bytes: ...

    @property
    def content_type(self) -> Optional[str]: ...

    @property
    def attributes(self) -> SecretAttributes: ...


Transform = Callable[[Material], Tuple[bytes, ...]]


class TransformError(KvAgentError):
    """A fetched secret cannot be turned into its entry's files; that entry
    fails (its files keep their last good content), the others go on."""


def raw(material: Material) -> Tuple[bytes, ...]:
    """The value exactly as Key Vault returned it, to a single output."""
    return (material.value,)


TRANSFORMS: Mapping[str, Transform] = {"raw": raw}
DEFAULT_TRANSFORM = "raw"


def apply_transform(name: str, material: Material, outputs: int) -> Tuple[bytes, ...]:
    """Run transform ``name``; its result has exactly ``outputs`` items.

    Raises TransformError for an unknown transform or a result that does not
    match the entry's outputs (a bug in a transform, reported per entry).
    """
    transform = TRANSFORMS.get(name)
    if transform is None:
        raise TransformError(f"secret '{material.name}': unknown transform '{name}'",
                             f"use one of {', '.join(sorted(TRANSFORMS))}")
    data = transform(material)
    if len(data) != outputs:
        raise TransformError(
            f"secret '{material.name}': transform '{name}' made {len(data)} files "
            f"for {outputs} outputs", "report this as a bug")
    return data
