"""Transforms: pure functions from fetched secrets to the bytes of each output.

The middle of the pipeline (entries -> sources -> **transforms** -> outputs).
A transform is given what the vault returned for each of the entry's sources
(the value's bytes, its content type and its attributes) and the entry's
:class:`TransformParams`, and returns one ``bytes`` per output of the entry,
in the entry's output order:

* ``raw``: the one value to one file, as stored, or decoded (``encoding``:
  ``utf-8``, ``base64``, ``hex``).
* ``certificate``: a Key Vault certificate's secret (PKCS#12 or PEM) split
  into key, cert, chain, fullchain, pfx and fullchain_key files (:mod:`agent.pipeline.certificates`,
  imported only here, only when an entry asks for it, so a plain-secret
  manifest never loads ``cryptography``).
* ``template``: several secrets into one file, ``env``, ``json`` or ``raw``.

Rules for every transform: pure (no I/O, no clock, no environment),
deterministic (the same inputs give the same bytes, so an unchanged template
is never rewritten), and never quoting the value in an error: a
:class:`TransformError` names the secret and the fix.

The boundary: only TransformError leaves :func:`transform_with_validity`
(and :func:`certificate_has_key`). A value from the vault is untrusted, and a
library may answer it with any exception (``cryptography`` raised
UnsupportedAlgorithm for an SM2 certificate in a bundle, which took every
later entry down with it): any other exception is a bug, turned into a
TransformError that fails that entry alone and says so, with the entry's
name, the exception's type and where it was raised (never its message,
which may quote the value); the entry's failure is logged like any other.
"""

from __future__ import annotations

import binascii
from typing import Callable, Mapping, NamedTuple, Optional, Protocol, Sequence, Tuple, TypeVar

from agent.base.errors import TransformError
from agent.base.untrusted import strict_base64
from agent.pipeline.sources import SecretAttributes

ENCODINGS = ("utf-8", "base64", "hex")
TEMPLATE_FORMATS = ("env", "json", "raw")
# fullchain_key: the leaf, its issuers, then the key, in one file: what the Key
# Vault VM extension for Linux writes (docs/how-to/migrate-vm-extension.md).
CERTIFICATE_KINDS = ("key", "cert", "chain", "fullchain", "pfx", "fullchain_key")
T = TypeVar("T")
# The characters a POSIX shell and systemd's EnvironmentFile= both unescape
# after a backslash inside double quotes (systemd's SHELL_NEED_ESCAPE);
# any other backslash is kept by both.
_ENV_ESCAPED = frozenset('"\\`$')


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


class TransformParams(NamedTuple):
    """What the manifest says about how to transform, beyond the transform's name.

    ``encodings``: one per source (None: the value as stored). ``kinds``: a
    certificate's output kinds, in output order. ``format`` and ``keys``: a
    template's format and its output names, one per source, in order.
    """

    encodings: Tuple[Optional[str], ...] = ()
    kinds: Tuple[str, ...] = ()
    format: Optional[str] = None
    keys: Tuple[str, ...] = ()


Transform = Callable[[Sequence[Material], TransformParams], Tuple[bytes, ...]]
# A certificate's (notBefore, notAfter) in epoch seconds; None: no usable date.
Window = Tuple[Optional[int], Optional[int]]


def decode(material: Material, encoding: Optional[str]) -> bytes:
    """The value as bytes: as stored (None or ``utf-8``: Key Vault's values
    are text, and their UTF-8 bytes are what is stored), or decoded from
    ``base64`` (the standard alphabet with padding; whitespace and line
    breaks are ignored, anything else is an error) or ``hex``.

    Raises TransformError naming the secret, never quoting the value.
    """
    if encoding is None or encoding == "utf-8":
        return material.value
    try:
        if encoding == "base64":
            return strict_base64(material.value)
        if encoding == "hex":
            return bytes.fromhex(b"".join(material.value.split()).decode("ascii"))
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise TransformError(f"secret '{material.name}': the value is not valid {encoding}",
                             f"store it {encoding}-encoded, or remove encoding: "
                             f"{encoding} from the entry") from None
    raise TransformError(f"secret '{material.name}': unknown encoding '{encoding}'",
                         f"use one of {', '.join(ENCODINGS)}")


def raw(materials: Sequence[Material], params: TransformParams) -> Tuple[bytes, ...]:
    """The value exactly as Key Vault returned it (or decoded), to a single output."""
    encoding = params.encodings[0] if params.encodings else None
    return (decode(materials[0], encoding),)


def certificate(materials: Sequence[Material], params: TransformParams) -> Tuple[bytes, ...]:
    """A certificate's secret split into the requested kinds (see agent.pipeline.certificates)."""
    return _certificate_files(materials, params)[0]


def _certificate_files(materials: Sequence[Material], params: TransformParams
                       ) -> Tuple[Tuple[bytes, ...], Window]:
    """The certificate's files and its leaf's (notBefore, notAfter), one parse."""
    try:
        from agent.pipeline.certificates import read_certificate  # cryptography only when asked
    except ImportError:  # a package built without its dependency: one line, not a traceback
        raise TransformError(f"secret '{materials[0].name}': certificates need the "
                             "cryptography package, which is not installed",
                             "install python3-cryptography (or pip install cryptography)"
                             ) from None

    material = materials[0]
    files = read_certificate(material.name, material.value, material.content_type,
                             params.kinds)
    return files.pieces, (files.not_before, files.not_after)


def template(materials: Sequence[Material], params: TransformParams) -> Tuple[bytes, ...]:
    """Several secrets into one file: substitution only, no logic.

    ``env``: one ``KEY="value"`` line per value, double-quoted with ``"``,
    ``\\``, `````` ` `````` and ``$`` escaped by a backslash: the one quoting
    a POSIX shell's ``.`` and systemd's ``EnvironmentFile=`` read back alike
    (systemd's env-file.c unescapes exactly those four inside double quotes
    and keeps any other backslash, as the shell does; newlines are kept).
    ``json``: one object of strings, keys in manifest order. ``raw``: the
    values concatenated in manifest order, nothing added between them.
    """
    values = [decode(material, params.encodings[index] if params.encodings else None)
              for index, material in enumerate(materials)]
    if params.format == "raw":
        return (b"".join(values),)
    texts = [_text(material, value, params.format or "env")
             for material, value in zip(materials, values)]
    if params.format == "json":
        import json  # only templates pay for it

        return ((json.dumps(dict(zip(params.keys, texts)), ensure_ascii=False, indent=2)
                 + "\n").encode("utf-8"),)
    lines = [f'{key}="{_env_quote(text)}"\n' for key, text in zip(params.keys, texts)]
    return ("".join(lines).encode("utf-8"),)


def _text(material: Material, value: bytes, form: str) -> str:
    """``value`` as text for an env or json template, or a TransformError:
    systemd ignores an assignment that is not UTF-8, and a NUL ends a C
    string (systemd's parser stops at it; the shell drops it)."""
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError:
        raise TransformError(f"secret '{material.name}': not UTF-8 text, which a {form} "
                             "file cannot hold", "write it to a file of its own") from None
    if form == "env" and "\0" in text:
        raise TransformError(f"secret '{material.name}': holds a NUL character, which an "
                             "env file cannot hold", "write it to a file of its own")
    return text


def _env_quote(text: str) -> str:
    return "".join("\\" + char if char in _ENV_ESCAPED else char for char in text)


TRANSFORMS: Mapping[str, Transform] = {"raw": raw, "certificate": certificate,
                                       "template": template}
DEFAULT_TRANSFORM = "raw"


def apply_transform(name: str, materials: Sequence[Material], outputs: int,
                    params: TransformParams = TransformParams()) -> Tuple[bytes, ...]:
    """Run transform ``name`` on the entry's fetched ``materials`` (one per
    source, in order); its result has exactly ``outputs`` items.

    Raises TransformError, and nothing else, for an unknown transform, a value
    it cannot use, a result that does not match the entry's outputs, or an
    unexpected exception (a bug, logged; see the module docstring).
    """
    return transform_with_validity(name, materials, outputs, params)[0]


def transform_with_validity(name: str, materials: Sequence[Material], outputs: int,
                            params: TransformParams = TransformParams(), *,
                            entry: Optional[str] = None,
                            ) -> Tuple[Tuple[bytes, ...], Optional[Window]]:
    """:func:`apply_transform`, plus, for a certificate, its leaf's notBefore
    and notAfter (epoch seconds) from the same parse, for expiry warnings;
    None for other transforms. ``entry``: the entry's name for a bug's log
    line (default: the first secret's)."""
    transform = TRANSFORMS.get(name)
    label = materials[0].name if materials else "?"
    if transform is None:
        raise TransformError(f"secret '{label}': unknown transform '{name}'",
                             f"use one of {', '.join(sorted(TRANSFORMS))}")

    def run() -> Tuple[Tuple[bytes, ...], Optional[Window]]:
        if transform is certificate:
            return _certificate_files(materials, params)
        return transform(materials, params), None

    data, window = guarded(run, f"the {name} transform", entry or label)
    if len(data) != outputs:
        raise TransformError(
            f"secret '{label}': transform '{name}' made {len(data)} files "
            f"for {outputs} outputs", "report this as a bug")
    return data, window


def certificate_has_key(material: Material, entry: Optional[str] = None) -> bool:
    """Whether a certificate's value holds its private key (the policy's
    ``exportable``), for ``doctor``. Raises TransformError only."""
    def run() -> bool:
        from agent.pipeline.certificates import read_bundle  # cryptography only when asked

        return read_bundle(material.name, material.value, material.content_type).key is not None

    return guarded(run, "reading the certificate", entry or material.name)


def guarded(run: Callable[[], T], what: str, entry: str) -> T:
    """``run()``, letting only TransformError out: any other exception is a
    bug, raised again as a TransformError that names ``entry`` (never a
    value), the exception's type and where it was raised."""
    try:
        return run()
    except TransformError:
        raise
    except Exception as exc:  # the boundary: see the module docstring
        raise TransformError(
            f"entry '{entry}': {what} failed unexpectedly ({type(exc).__name__} at "
            f"{_origin(exc)}): a bug in kv-agent",
            "please report it with this line; the entry's files keep their last good "
            "content, the other entries go on") from None


def _origin(exc: BaseException) -> str:
    """Where ``exc`` was raised: file:line in function, read from the
    traceback's frames (``traceback.extract_tb`` would read source files)."""
    tb = exc.__traceback__
    if tb is None:
        return "?"
    while tb.tb_next is not None:
        tb = tb.tb_next
    code = tb.tb_frame.f_code
    return f"{code.co_filename.rsplit('/', 1)[-1]}:{tb.tb_lineno} in {code.co_name}"
