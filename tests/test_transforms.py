"""Transforms are pure: fetched bytes, content type and attributes in, output bytes out."""

from __future__ import annotations

import ast
import base64
import json
import random
import shutil
import subprocess
from pathlib import Path
from typing import List, NamedTuple, Optional, Tuple

import pytest

from agent.pipeline.sources import SecretAttributes
from agent.pipeline.transforms import (
    TRANSFORMS,
    TransformError,
    TransformParams,
    apply_transform,
    certificate_has_key,
    raw,
    transform_with_validity,
)


class Fetched(NamedTuple):
    name: str
    value: bytes
    content_type: Optional[str] = None
    attributes: SecretAttributes = SecretAttributes()


def test_raw_is_the_value_byte_for_byte() -> None:
    """raw returns the fetched bytes unchanged, as the one output."""
    data = bytes(range(256)) + "é\n".encode()
    assert raw([Fetched("s", data, "application/x-pem-file")], TransformParams()) == (data,)
    assert apply_transform("raw", [Fetched("s", b"")], 1) == (b"",)
    assert apply_transform("raw", [Fetched("s", data)], 1, TransformParams(("utf-8",))) == (data,)


def test_unknown_transform_and_wrong_output_count_fail_the_entry() -> None:
    """An unknown name or a result not matching the outputs is a TransformError
    naming the secret, never quoting the value."""
    with pytest.raises(TransformError, match="secret 's': unknown transform 'pem'"):
        apply_transform("pem", [Fetched("s", b"hidden")], 1)
    with pytest.raises(TransformError, match="made 1 files for 2 outputs") as caught:
        apply_transform("raw", [Fetched("s", b"hidden")], 2)
    assert "hidden" not in str(caught.value)
    assert set(TRANSFORMS) == {"raw", "certificate", "template"}


@pytest.mark.parametrize("encoding, stored, decoded", [
    ("base64", b"AAEC/w==", b"\x00\x01\x02\xff"),
    ("base64", b"AAEC\n/w==\n", b"\x00\x01\x02\xff"),  # line breaks tolerated
    ("base64", b" aGVsbG8gd29ybGQ= \r\n", b"hello world"),
    ("base64", b"", b""),
    ("hex", b"00ff10", b"\x00\xff\x10"),
    ("hex", b"00 FF\n10", b"\x00\xff\x10"),
    ("utf-8", "é".encode(), "é".encode()),
])
def test_encodings_decode_the_stored_value(encoding: str, stored: bytes, decoded: bytes) -> None:
    """base64 (standard, padded, whitespace ignored) and hex decode; utf-8 is the value as stored."""
    assert apply_transform("raw", [Fetched("s", stored)], 1, TransformParams((encoding,))) == (
        decoded,)


@pytest.mark.parametrize("encoding, stored", [
    ("base64", b"AAEC/w"),  # no padding
    ("base64", b"AAEC_w=="),  # URL-safe alphabet
    ("base64", b"AA*EC/w=="),  # a stray character
    ("base64", b"AAEC/x=="),  # non-canonical trailing bits
    ("base64", b"AAEC/w==AA=="),  # data after the padding
    ("hex", b"0g"),
    ("hex", b"abc"),
])
def test_bad_encoded_values_name_the_secret_never_the_value(encoding: str, stored: bytes) -> None:
    """A value that is not strictly what its encoding says fails the entry without quoting it."""
    with pytest.raises(TransformError) as caught:
        apply_transform("raw", [Fetched("license-blob", stored)], 1, TransformParams((encoding,)))
    text = str(caught.value)
    assert f"secret 'license-blob': the value is not valid {encoding}" in text
    assert stored.decode() not in text


def template(form: str, values: List[Tuple[str, bytes]],
             encodings: Tuple[Optional[str], ...] = ()) -> bytes:
    materials = [Fetched(f"secret-{index}", value) for index, (_, value) in enumerate(values)]
    params = TransformParams(encodings, format=form, keys=tuple(key for key, _ in values))
    (data,) = apply_transform("template", materials, 1, params)
    return data


def test_json_template_is_an_object_of_strings_in_order() -> None:
    """json writes one object, keys in manifest order, values exactly (decoded when asked)."""
    data = template("json", [("b", b'q"\n\\'), ("a", "é".encode()), ("c", b"aGk=")],
                    (None, None, "base64"))
    assert json.loads(data) == {"b": 'q"\n\\', "a": "é", "c": "hi"}
    assert list(json.loads(data)) == ["b", "a", "c"] and data.endswith(b"\n")


def test_raw_template_concatenates_values_in_order() -> None:
    """raw writes the values one after the other, nothing added."""
    assert template("raw", [("key", b"K\n"), ("cert", b"C"), ("x", b"\x00")]) == b"K\nC\x00"


@pytest.mark.parametrize("form, value, fragment", [
    ("env", b"a\x00b", "NUL"),
    ("env", b"\xff\xfe", "not UTF-8"),
    ("json", b"\xff", "not UTF-8"),
])
def test_values_a_template_cannot_hold_are_errors(form: str, value: bytes, fragment: str) -> None:
    """A NUL in an env file or bytes that are not UTF-8 fail the entry, naming the secret."""
    with pytest.raises(TransformError) as caught:
        template(form, [("X", b"fine"), ("Y", value)])
    assert "secret 'secret-1'" in str(caught.value) and fragment in str(caught.value)


SHELLS = [shell for shell in ("sh", "bash", "dash") if shutil.which(shell)]
TRICKY = ['', ' ', "'", '"', "\\", "$", "`", "$(id)", "${X}", "\\$", "\\\n", "\n", "a\nb\n",
          "\r\n", "  lead and trail  ", "'\"'\"'", "\\\\\"", "é ✓ 漢字 🙂", "#not a comment",
          "=", "x=y", "\t", "!history"]


def random_values(count: int, seed: int = 11) -> List[str]:
    """Printable ASCII, newlines, quotes, $, backslashes, spaces and UTF-8, mixed."""
    rng = random.Random(seed)
    alphabet = ([chr(c) for c in range(0x20, 0x7f)] + ["\n", "\t", "\r", "é", "ß", "漢", "🙂"]
                + ["'", '"', "$", "\\", "`"] * 6)
    values = list(TRICKY)
    while len(values) < count:
        values.append("".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))))
    return values


@pytest.mark.skipif(not SHELLS, reason="no POSIX shell on PATH")
def test_env_template_round_trips_200_values_through_the_shell(tmp_path: Path) -> None:
    """For 200 values (printable ASCII, newlines, quotes, $, backslashes, UTF-8), sourcing the env
    file in sh, bash and dash and printing a variable gives back the exact value. (systemd's own
    EnvironmentFile= parsing is proved by the system test, with the real systemd.)"""
    values = random_values(200)
    keys = [f"V{index}" for index in range(len(values))]
    env = tmp_path / "app.env"
    env.write_bytes(template("env", [(key, value.encode()) for key, value in zip(keys, values)]))
    # Each value printed, then a NUL as separator (no value can hold one).
    script = ". ./app.env; " + "; ".join(f'printf "%s\\0" "${key}"' for key in keys)
    for shell in SHELLS:
        done = subprocess.run([shell, "-c", script], cwd=tmp_path, capture_output=True,
                              timeout=30, check=True)
        got = done.stdout.decode("utf-8").split("\0")[:-1]
        mismatched = [(key, value, back) for key, value, back in zip(keys, values, got)
                      if value != back]
        assert len(got) == len(values) and not mismatched, (shell, mismatched[:3])


def test_env_template_quoting_is_double_quotes_with_four_escapes() -> None:
    """Every value is double-quoted with only ", \\, ` and $ escaped: what systemd's env-file.c
    and a POSIX shell both unescape inside double quotes (any other backslash stays)."""
    data = template("env", [("A", b'a"b\\c`d$e'), ("B", b"x\ny"), ("C", b"")])
    assert data == b'A="a\\"b\\\\c\\`d\\$e"\nB="x\ny"\nC=""\n'


def test_transforms_import_nothing_that_does_io() -> None:
    """agent/pipeline/transforms.py imports only typing, binascii, json, errors, untrusted (no I/O:
    strict base64), the source values and (for a certificate entry, lazily) agent.pipeline.certificates."""
    tree = ast.parse(Path("agent/pipeline/transforms.py").read_text())
    imported = {node.module if isinstance(node, ast.ImportFrom) else alias.name
                for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                for alias in node.names}
    assert imported <= {"__future__", "typing", "binascii", "json", "agent.base.errors",
                        "agent.base.untrusted", "agent.pipeline.sources", "agent.pipeline.certificates"}


def test_base64_is_the_standard_alphabet() -> None:
    """The base64 encoding is the one base64.b64encode writes (padding included)."""
    value = bytes(range(256))
    stored = base64.b64encode(value)
    assert apply_transform("raw", [Fetched("s", stored)], 1, TransformParams(("base64",))) == (
        value,)


def _boom(materials: object, params: object) -> Tuple[bytes, ...]:
    raise RuntimeError("the value s3cr3t-in-a-message")


def test_only_transform_error_leaves_a_transform(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any other exception from a transform is a TransformError naming the entry, the
    exception's type and where it was raised, as a bug, never the exception's message."""
    monkeypatch.setitem(TRANSFORMS, "raw", _boom)  # type: ignore[index]
    with pytest.raises(TransformError) as caught:
        transform_with_validity("raw", [Fetched("db", b"s3cr3t")], 1, entry="db-entry")
    text = str(caught.value)
    assert text.startswith("entry 'db-entry': the raw transform failed unexpectedly "
                           "(RuntimeError at test_transforms.py:")
    assert "in _boom): a bug in kv-agent" in text and "the other entries go on" in text
    assert "s3cr3t" not in text and "\n" not in text


def test_the_certificate_boundary_holds_for_library_exceptions(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An exception cryptography might raise deep inside a certificate's conversion, and one
    reading a certificate for doctor, each come out as a TransformError."""
    from cryptography.exceptions import UnsupportedAlgorithm

    import agent.pipeline.certificates as certificates

    def unsupported(*args: object) -> object:
        raise UnsupportedAlgorithm("curve 1.2.156.10197.1.301")

    monkeypatch.setattr(certificates, "read_certificate", unsupported)
    monkeypatch.setattr(certificates, "read_bundle", unsupported)
    fetched = Fetched("web-tls", b"x", "application/x-pem-file")
    with pytest.raises(TransformError, match="UnsupportedAlgorithm at test_transforms.py"):
        apply_transform("certificate", [fetched], 1, TransformParams(kinds=("cert",)))
    with pytest.raises(TransformError, match="entry 'web': reading the certificate failed"):
        certificate_has_key(fetched, "web")
