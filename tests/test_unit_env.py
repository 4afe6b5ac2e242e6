"""agent.doctor.unit_env: kv-agent.service's environment, parsed as systemd writes and reads it."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence

import pytest

from agent.doctor.unit_env import (
    parse_env_file,
    parse_show,
    split_words,
    unit_environment,
)

# As systemd 257 prints a unit with a drop-in setting the emulator recipe's
# variables, one value with a space and one with a quote and a dollar, and
# two environment files (the "-" one missing).
SHOW = """\
LoadState=loaded
Environment=REQUESTS_CA_BUNDLE=/run/kv-agent-emulator/ca.pem \
KV_AGENT_IMDS_ENDPOINT=http://127.0.0.1:40380/metadata/identity/oauth2/token \
"NOTE=two words" "ODD=a\\"b\\$c" $'TAB=x\\ty'
EnvironmentFiles=/etc/kv-agent/env (ignore_errors=no)
EnvironmentFiles=/etc/default/kv agent (ignore_errors=yes)
"""


@pytest.mark.parametrize("text, words", [
    ("", []),
    ("A=1 B=2", ["A=1", "B=2"]),
    ('"A=two words"  B=x', ["A=two words", "B=x"]),
    ('"A=q\\"uote\\\\back\\$dollar\\`tick"', ['A=q"uote\\back$dollar`tick']),
    ("$'A=line\\nbreak\\x41\\101\\u00e9'", ["A=line\nbreakAAé"]),
    ("A=\\ b", ["A= b"]),
])
def test_split_words_undoes_systemctls_quoting(text: str, words: List[str]) -> None:
    """A list value splits into the words systemd quoted with "..." or $'...'."""
    assert split_words(text) == words


def test_parse_show_reads_load_state_environment_and_files() -> None:
    """`systemctl show` output gives the load state, every assignment in order and each file
    with its ignore_errors flag, even a path with a space."""
    settings = parse_show(SHOW)
    assert settings.load_state == "loaded"
    assert settings.environment == (
        "REQUESTS_CA_BUNDLE=/run/kv-agent-emulator/ca.pem",
        "KV_AGENT_IMDS_ENDPOINT=http://127.0.0.1:40380/metadata/identity/oauth2/token",
        "NOTE=two words", 'ODD=a"b$c', "TAB=x\ty")
    assert settings.files == (("/etc/kv-agent/env", False), ("/etc/default/kv agent", True))


ENV_FILE = """\
# a comment ; and more
; another comment \\
  continued comment
PLAIN=value
  SPACED = trailing kept inside   \n\
SINGLE='it''s $HOME'
DOUBLE="a \\"quote\\" \\$x \\n stays"
CONTINUED=first\\
second
EMPTY=
1BAD=ignored
NOEQUALS
DUP=one
DUP=two
"""


def test_parse_env_file_follows_systemds_rules() -> None:
    """Comments, quotes, escapes, continuations and invalid names read as systemd reads them."""
    assert parse_env_file(ENV_FILE) == [
        ("PLAIN", "value"),
        ("SPACED", "trailing kept inside"),
        ("SINGLE", "its $HOME"),
        ("DOUBLE", 'a "quote" $x \\n stays'),
        ("CONTINUED", "firstsecond"),
        ("EMPTY", ""),
        ("DUP", "one"),
        ("DUP", "two"),
    ]


def _runner(answers: Dict[str, Optional[str]]):  # type: ignore[no-untyped-def]
    def run(argv: Sequence[str]) -> Optional[str]:
        return answers.get(argv[0])
    return run


def test_unit_environment_layers_manager_unit_and_files(tmp_path: Path) -> None:
    """The manager's environment, then Environment=, then each file (later wins); a
    missing "-" file is skipped, a missing required one is a problem; names are kept."""
    files = {"/etc/kv-agent/env": "REQUESTS_CA_BUNDLE=/etc/kv-agent/ca.pem\nEXTRA=1\n"}

    def read(path: str) -> str:
        if path not in files:
            raise FileNotFoundError(2, "No such file or directory")
        return files[path]

    found = unit_environment(_runner({"show": SHOW, "show-environment":
                                      "LANG=C.UTF-8\nPATH=/usr/bin:/bin\nNOTE=manager\n"}), read)
    assert found is not None
    assert found.environ["REQUESTS_CA_BUNDLE"] == "/etc/kv-agent/ca.pem"  # the file won
    assert found.environ["NOTE"] == "two words" and found.environ["PATH"] == "/usr/bin:/bin"
    assert found.environ["KV_AGENT_IMDS_ENDPOINT"].startswith("http://127.0.0.1:40380/")
    assert found.from_environment == ("REQUESTS_CA_BUNDLE", "KV_AGENT_IMDS_ENDPOINT", "NOTE",
                                      "ODD", "TAB")
    assert found.from_files == (("/etc/kv-agent/env", ("REQUESTS_CA_BUNDLE", "EXTRA")),)
    assert found.problems == ()
    del files["/etc/kv-agent/env"]
    missing = unit_environment(_runner({"show": SHOW, "show-environment": ""}), read)
    assert missing is not None and missing.problems == (
        "EnvironmentFile=/etc/kv-agent/env cannot be read (No such file or directory)",)


@pytest.mark.parametrize("show", [None, "LoadState=not-found\nEnvironment=\n"])
def test_no_unit_means_no_unit_environment(show: Optional[str]) -> None:
    """No systemd to ask, or no kv-agent.service: None (doctor uses the shell's)."""
    assert unit_environment(_runner({"show": show}), lambda path: "") is None
