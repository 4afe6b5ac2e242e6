"""Shared by the benchmark scripts: which kv-agent command to measure."""

from __future__ import annotations

import compileall
import functools
import os
import shutil
import sys
from typing import List

AGENT_PACKAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "agent")


@functools.lru_cache(maxsize=None)
def agent_command() -> List[str]:
    """The installed ``kv-agent`` beside this interpreter (as operators run it,
    with its byte code compiled at install time), else ``python -m agent``.

    Compiles the checkout's byte code first, as the packages do at install: an
    editable install under PYTHONDONTWRITEBYTECODE would otherwise compile
    every module from source at every start (about 60 ms), which no operator pays.
    """
    compileall.compile_dir(AGENT_PACKAGE, quiet=2)
    installed = shutil.which("kv-agent", path=os.path.dirname(sys.executable))
    return [installed] if installed else [sys.executable, "-m", "agent"]
