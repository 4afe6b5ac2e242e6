"""Shared by the benchmark scripts: which kv-agent command to measure."""

from __future__ import annotations

import os
import shutil
import sys
from typing import List


def agent_command() -> List[str]:
    """The installed ``kv-agent`` beside this interpreter (as operators run it,
    with its byte code compiled at install time), else ``python -m agent``."""
    installed = shutil.which("kv-agent", path=os.path.dirname(sys.executable))
    return [installed] if installed else [sys.executable, "-m", "agent"]
