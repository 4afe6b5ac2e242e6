"""Transforms are pure: fetched bytes, content type and attributes in, output bytes out."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import NamedTuple, Optional

import pytest

from agent.sources import SecretAttributes
from agent.transforms import TRANSFORMS, TransformError, apply_transform, raw


class Fetched(NamedTuple):
    name: str
    value: bytes
    content_type: Optional[str] = None
    attributes: SecretAttributes = SecretAttributes()


def test_raw_is_the_value_byte_for_byte() -> None:
    """raw returns the fetched bytes unchanged, as the one output."""
    data = bytes(range(256)) + "é\n".encode()
    assert raw(Fetched("s", data, "application/x-pem-file")) == (data,)
    assert apply_transform("raw", Fetched("s", b""), 1) == (b"",)


def test_unknown_transform_and_wrong_output_count_fail_the_entry() -> None:
    """An unknown name or a result not matching the outputs is a TransformError
    naming the secret, never quoting the value."""
    with pytest.raises(TransformError, match="secret 's': unknown transform 'pem'"):
        apply_transform("pem", Fetched("s", b"hidden"), 1)
    with pytest.raises(TransformError, match="made 1 files for 2 outputs") as caught:
        apply_transform("raw", Fetched("s", b"hidden"), 2)
    assert "hidden" not in str(caught.value)
    assert set(TRANSFORMS) == {"raw"}


def test_transforms_import_nothing_that_does_io() -> None:
    """agent/transforms.py imports only typing, errors and the source values."""
    tree = ast.parse(Path("agent/transforms.py").read_text())
    imported = {node.module if isinstance(node, ast.ImportFrom) else alias.name
                for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                for alias in node.names}
    assert imported <= {"__future__", "typing", "agent.errors", "agent.sources"}
