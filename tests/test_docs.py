"""The documentation says what the code does, each fact in its home.

Issue 9, item 20: options, variables and an exit code had drifted out of the
docs. The lists here come from the code (argparse's parser, the ``KV_AGENT_*``
names in agent/, the EXIT_* codes, the manifest's key tuples and bounds),
never from a copy, so a new option, variable, code or key fails this test
until it is documented where it belongs.

Issue 18 moved the text to its homes: the README is the front door (at most
300 lines); commands, options, variables and exit codes are in kv-agent(8),
generated from the parser by packaging/manpage.py; the manifest's keys,
defaults, limits and errors in kv-agent.yaml(5); the promises' full table in
docs/design/promises.md; the module map in docs/design/architecture.md. Every
relative link in the README, CONTRIBUTING.md and docs/ must reach a file (and a
heading, when it names one).
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import re
from pathlib import Path
from types import ModuleType
from typing import Dict, Iterator, List, Set, Tuple

import pytest

from agent import manifest as manifest_module
from agent.cli import build_parser
from agent.pipeline.transforms import CERTIFICATE_KINDS

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
CONTRIBUTING = REPO / "CONTRIBUTING.md"
DOCS = REPO / "docs"
MANPAGE_SCRIPT = REPO / "packaging" / "manpage.py"
MANIFEST_PAGE = REPO / "packaging" / "kv-agent.yaml.5"
PROMISES = DOCS / "design" / "promises.md"
ARCHITECTURE = DOCS / "design" / "architecture.md"
TUTORIAL = DOCS / "tutorial.md"
CONSUMER_EXAMPLE = REPO / "systemd" / "examples" / "kv-agent-consumer-example.service"
CREDENTIALS_GUIDE = DOCS / "how-to" / "credentials.md"
CREDENTIAL_EXAMPLE = REPO / "systemd" / "examples" / "kv-agent-credential-example.service"
README_MAX_LINES = 300
ENV_NAME = re.compile(r"^KV_AGENT_[A-Z0-9_]+$")
HELP = {"-h", "--help"}
TEST_NAME = re.compile(r"`((?:(?:system|emulator)/)?test_[a-z_]+\.py)(?:::(test_[a-z0-9_]+))?")


# -- what the code has ----------------------------------------------------------------


def _subcommands(parser: argparse.ArgumentParser) -> Dict[str, argparse.ArgumentParser]:
    """Every subcommand's parser, by name, from argparse's subparsers action."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("build_parser() has no subcommands")


def _options(parser: argparse.ArgumentParser) -> Set[str]:
    """Every option string (``-q``, ``--quiet``, ...) the parser accepts, bar help."""
    return {option for action in parser._actions for option in action.option_strings} - HELP


def _global_options() -> Set[str]:
    return _options(build_parser())


def _command_options() -> Iterator[Tuple[str, str]]:
    """(command, option) for every option of every subcommand that is not
    also a top-level option."""
    global_options = _global_options()
    for name, sub in sorted(_subcommands(build_parser()).items()):
        for option in sorted(_options(sub) - global_options):
            yield name, option


def _environment_names() -> Set[str]:
    """Every ``KV_AGENT_*`` string literal in agent/: the variables it reads
    (and KV_AGENT_CHANGED, which it sets for hooks)."""
    names = set()
    for path in (REPO / "agent").rglob("*.py"):
        if path.parent.name == "emulator":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                    and ENV_NAME.match(node.value):
                names.add(node.value)
    return names


def _exit_codes() -> Dict[str, int]:
    """Every EXIT_* constant of agent/base/errors.py but 2 (argparse's usage error)."""
    import agent.base.errors as errors

    return {name: value for name, value in vars(errors).items()
            if name.startswith("EXIT_") and isinstance(value, int) and value != 2}


# -- kv-agent(8), as the build makes it --------------------------------------------------


def _manpage_module() -> ModuleType:
    """packaging/manpage.py, the generator the build scripts run."""
    spec = importlib.util.spec_from_file_location("manpage", MANPAGE_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _roff_text(text: str) -> str:
    """Roff with font escapes, hyphen escapes and the named quotes undone."""
    text = re.sub(r"\\f[BIRP]", "", text)
    for escape, plain in (("\\-", "-"), ("\\(dq", '"'), ("\\(ga", "`"), ("\\&", ""),
                          ("\\:", ""), ("\\e", "\\")):
        text = text.replace(escape, plain)
    return text


def _man_text() -> str:
    """kv-agent(8), generated from this tree's parser, as plain text."""
    return _roff_text(_manpage_module().build())


def _sections(text: str) -> Dict[str, str]:
    """``.SH`` sections of a man page's text, by title."""
    sections: Dict[str, str] = {}
    for chunk in re.split(r"^\.SH ", text, flags=re.M)[1:]:
        title, _, body = chunk.partition("\n")
        sections[title.strip().strip('"')] = body
    return sections


def _man_sections() -> Dict[str, str]:
    return _sections(_man_text())


def _man_command(command: str) -> str:
    """The ``.SS`` subsection of COMMANDS whose title starts with ``command``."""
    commands = _man_sections().get("COMMANDS", "")
    for chunk in re.split(r"^\.SS ", commands, flags=re.M)[1:]:
        title = chunk.partition("\n")[0].strip().strip('"')
        if title.split()[0] == command:
            return chunk
    raise AssertionError(f"kv-agent(8): no '.SS \"{command} ...\"' under COMMANDS")


def _mentions(text: str, option: str) -> bool:
    """``option`` as a whole word (``--json`` is not in ``--jsonl``)."""
    return re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text) is not None


def _readme_blocks() -> List[str]:
    """The README as blocks: each table row, and each run of non-blank,
    non-table lines (a paragraph, or a list with its lead-in line)."""
    blocks: List[str] = []
    current: List[str] = []
    for line in README.read_text(encoding="utf-8").splitlines() + [""]:
        if line.startswith("|") or not line.strip():
            if current:
                blocks.append("\n".join(current))
                current = []
            if line.startswith("|"):
                blocks.append(line)
        else:
            current.append(line)
    return blocks


def _markdown_section(path: Path, title: str) -> str:
    """The ``## title`` section of a Markdown file, up to the next ``## ``."""
    text = path.read_text(encoding="utf-8")
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"{path.name} has no '## {title}' section"
    return match.group(1)


# -- commands, options, variables, exit codes ---------------------------------------------


@pytest.mark.parametrize("command", sorted(_subcommands(build_parser())))
def test_every_command_is_documented(command: str) -> None:
    """Each subcommand has a row in the README's commands table and a subsection in kv-agent(8)."""
    rows = [block for block in _readme_blocks() if block.startswith(f"| `kv-agent {command}")]
    assert rows, f"README.md: no row '| `kv-agent {command} ...` |' in the commands table"
    _man_command(command)


@pytest.mark.parametrize(("command", "option"), list(_command_options()),
                         ids=[f"{c} {o}" for c, o in _command_options()])
def test_every_command_option_is_in_the_man_page(command: str, option: str) -> None:
    """Each option of each subcommand appears in that command's subsection of the generated
    kv-agent(8)."""
    assert _mentions(_man_command(command), option), (
        f"kv-agent(8): {option} missing under '.SS \"{command} ...\"' (packaging/manpage.py)")


@pytest.mark.parametrize("option", sorted(_global_options()))
def test_every_global_option_is_in_the_man_page(option: str) -> None:
    """Each top-level option appears in the OPTIONS section of the generated kv-agent(8)."""
    assert _mentions(_man_sections().get("OPTIONS", ""), option), \
        f"kv-agent(8): document {option} under .SH OPTIONS"


@pytest.mark.parametrize("name", sorted(_environment_names()))
def test_every_environment_variable_is_in_the_man_page(name: str) -> None:
    """Each KV_AGENT_* variable the code uses appears in kv-agent(8)'s ENVIRONMENT section."""
    assert _mentions(_man_sections().get("ENVIRONMENT", ""), name), \
        f"packaging/kv-agent.8.in: document {name} under .SH ENVIRONMENT"


@pytest.mark.parametrize("name", sorted(_exit_codes()))
def test_every_exit_code_is_in_the_man_page(name: str) -> None:
    """Each exit code the code has is in kv-agent(8)'s EXIT STATUS (77, permission denied,
    was once missing)."""
    code = _exit_codes()[name]
    man = " ".join(_man_sections()["EXIT STATUS"].split())
    assert re.search(rf"(?<!\d){code} ", man), \
        f"packaging/kv-agent.8.in, EXIT STATUS: add {code} ({name})"


def test_the_lists_come_from_the_code() -> None:
    """The collected lists hold what issue 9 found undocumented, so a broken
    collector cannot pass by finding nothing."""
    pairs = set(_command_options())
    assert {("once", "--retry-for"), ("demo", "--directory"), ("status", "--state-dir"),
            ("emulator", "--latency-ms"), ("emulator", "--tls-key")} <= pairs
    assert {"KV_AGENT_STATE_DIR", "KV_AGENT_IMDS_ENDPOINT", "KV_AGENT_MANIFEST"} <= \
        _environment_names()
    assert {"--debug", "-q", "--quiet", "--version"} <= _global_options()
    assert {"EXIT_CONFIG", "EXIT_NOPERM", "EXIT_UNAVAILABLE"} <= set(_exit_codes())


# -- the man page generator ---------------------------------------------------------------


def test_the_generated_page_gives_each_option_its_help_and_argument() -> None:
    """Each option's item in kv-agent(8) carries its argument name and argparse's help, so
    the page says what `--help` says, and no mark of the template is left."""
    manpage = _manpage_module()
    text = _man_text()
    for name, sub in _subcommands(build_parser()).items():
        for action in sub._actions:
            if action.option_strings and action.help and not set(action.option_strings) & HELP:
                assert _roff_text(manpage.roff(manpage.sentence(action.help))) in text, \
                    (name, action.option_strings)
    assert '.BI "--retry-for" " SECONDS"' in text
    assert '.SS "emulator --secrets FILE [options]"' in text
    assert "@command" not in text and "@options" not in text and "@VERSION@" not in text


def test_the_generator_refuses_a_command_without_prose_or_prose_without_a_command() -> None:
    """packaging/manpage.py fails the build when the template lacks a command's block, or
    has one for a command the parser does not have: the page cannot drift."""
    manpage = _manpage_module()
    template = (REPO / "packaging" / "kv-agent.8.in").read_text(encoding="utf-8")
    without = re.sub(r'^\.\\" @command demo\n.*?(?=^\.SH FILES)', "", template,
                     flags=re.M | re.S)
    with pytest.raises(manpage.TemplateError, match="no '@command' block for demo"):
        manpage.render(build_parser(), without, "0", "2000-01-01")
    extra = template.replace('.\\" @command demo', '.\\" @command dance\n.\\" @options\n'
                             '.\\" @command demo')
    with pytest.raises(manpage.TemplateError, match="'@command dance' is not a command"):
        manpage.render(build_parser(), extra, "0", "2000-01-01")


def test_the_builds_generate_kv_agent_8_and_install_both_pages() -> None:
    """Both build scripts run packaging/manpage.py, and the .deb and the .rpm install
    kv-agent(8) and kv-agent.yaml(5)."""
    for script in ("build-deb.sh", "build-rpm.sh"):
        text = (REPO / "packaging" / script).read_text(encoding="utf-8")
        assert "packaging/manpage.py" in text and "kv-agent.8" in text, script
    manpages = (REPO / "packaging" / "debian" / "kv-agent.manpages").read_text().split()
    assert manpages == ["packaging/kv-agent.8", "packaging/kv-agent.yaml.5"]
    spec = (REPO / "packaging" / "rpm" / "kv-agent.spec").read_text(encoding="utf-8")
    assert "%{_mandir}/man8/kv-agent.8" in spec and "%{_mandir}/man5/kv-agent.yaml.5" in spec


# -- kv-agent.yaml(5), the manifest's reference ------------------------------------------


def _manifest_page() -> str:
    return _roff_text(MANIFEST_PAGE.read_text(encoding="utf-8"))


def _plain(text: str) -> str:
    """Roff text as it reads: font macros' arguments joined as troff joins them
    (``.BR 15m .`` is "15m."), other requests dropped."""
    lines = []
    for line in text.splitlines():
        match = re.match(r"^\.(B|I|BR|RB|BI|IB|IR|RI)(?:\s+(.*))?$", line)
        if match:
            words = re.findall(r'"([^"]*)"|(\S+)', match.group(2) or "")
            joined = [quoted or plain for quoted, plain in words]
            lines.append(" ".join(joined) if len(match.group(1)) == 1 else "".join(joined))
        elif not line.startswith("."):
            lines.append(line)
    return "\n".join(lines)


def _terms(section: str) -> Set[str]:
    """The words of every ``.TP`` item's term line in ``section`` (``.BR a ", " b``: a, b)."""
    terms: Set[str] = set()
    lines = section.splitlines()
    for index, line in enumerate(lines[:-1]):
        if line.strip() == ".TP":
            term = re.sub(r"^\.(?:B|BR|BI|I|IR|RB)\s+", "", lines[index + 1])
            terms.update(re.sub(r'"[^"]*"', " ", term).split())
    return terms


MANIFEST_KEYS = [
    ("TOP-LEVEL KEYS", manifest_module.TOP_KEYS),
    ("IDENTITY", manifest_module.IDENTITY_KEYS + (manifest_module.IDENTITY_SOURCE_KEY,)),
    ("ENTRIES", manifest_module.SECRET_KEYS),
    ("CERTIFICATE ENTRIES", manifest_module.CERTIFICATE_OUTPUT_KEYS),
    ("CERTIFICATE ENTRIES", CERTIFICATE_KINDS),
    ("TEMPLATE ENTRIES", manifest_module.TEMPLATE_KEYS + manifest_module.TEMPLATE_VALUE_KEYS),
    ("SELECT ENTRIES", manifest_module.SELECT_KEYS + manifest_module.SELECT_FILTER_KEYS),
    ("CREDENTIALS", manifest_module.CREDENTIAL_KEYS),
    ("CACHE", manifest_module.CACHE_KEYS),
]


@pytest.mark.parametrize(("section", "key"),
                         [(section, key) for section, keys in MANIFEST_KEYS for key in keys],
                         ids=[f"{section}: {key}" for section, keys in MANIFEST_KEYS
                              for key in keys])
def test_every_manifest_key_has_its_item_in_the_manifest_page(section: str, key: str) -> None:
    """Each key the manifest parser knows is an item of its section of kv-agent.yaml(5)."""
    found = _sections(_manifest_page())
    assert section in found, f"kv-agent.yaml.5: no .SH {section}"
    assert key in _terms(found[section]), f"kv-agent.yaml.5, {section}: add '.TP' '.B {key}'"


def _manifest_values() -> List[Tuple[str, str]]:
    from agent.identity.selector import SOURCES
    from agent.pipeline.transforms import ENCODINGS, TEMPLATE_FORMATS

    return ([("ENTRIES", value) for value in ENCODINGS]
            + [("TEMPLATE ENTRIES", value) for value in TEMPLATE_FORMATS]
            + [("IDENTITY", value) for value in SOURCES])


@pytest.mark.parametrize(("section", "value"), _manifest_values(),
                         ids=[f"{s}: {v}" for s, v in _manifest_values()])
def test_every_manifest_value_is_named_in_the_manifest_page(section: str, value: str) -> None:
    """Each encoding, template format and identity source the code accepts is named in
    its section of kv-agent.yaml(5)."""
    assert _mentions(_sections(_manifest_page())[section], value), \
        f"kv-agent.yaml.5, {section}: name {value}"


def _regex_bound(pattern: "re.Pattern[str]") -> Tuple[int, int]:
    """The first ``{m,n}`` repetition of a compiled pattern."""
    low, high = re.search(r"\{(\d+),(\d+)\}", pattern.pattern).groups()  # type: ignore[union-attr]
    return int(low), int(high)


def _manifest_figures() -> List[Tuple[str, str]]:
    """(what, the text kv-agent.yaml(5) must hold) for every default and bound the manifest
    parser has, derived from its constants."""
    from agent.base.errors import EXIT_CONFIG
    from agent.cache import policy
    from agent.manifest import (
        conflicts,
        document,
        entries,
        paths,
        problems,
        quoting,
        selections,
        values,
    )
    from agent.pipeline import credentials
    from agent.pipeline.certificates import MAX_CERTIFICATES

    m = manifest_module
    return [
        ("default directory", m.DEFAULT_DIRECTORY),
        ("default metrics path", m.DEFAULT_METRICS_PATH),
        ("default refresh", f"Default {int(m.DEFAULT_REFRESH_S) // 60}m."),
        ("default mode", f'"{m.DEFAULT_MODE:04o}"'),
        ("default jitter", f"Default {m.DEFAULT_JITTER:.0%}."),
        ("default warning", f"Default {int(m.DEFAULT_WARN_BEFORE_EXPIRY_S) // 86400}d."),
        ("shortest refresh", f"from {int(values.MIN_REFRESH_S)} s"),
        ("longest refresh", f"to {int(values.MAX_REFRESH_S) // 86400} days"),
        ("longest warning", f"from 0 to {int(values.MAX_WARN_BEFORE_EXPIRY_S) // 86400}d"),
        ("largest jitter", f"to {values.MAX_JITTER:.0%}"),
        ("manifest size", f"at most {document.MAX_MANIFEST_BYTES >> 20} MiB"),
        ("value length", f"at most {document.MAX_SCALAR_CHARS} characters"),
        ("nesting", f"at most {document.MAX_DEPTH} levels"),
        ("values", f"{document.MAX_NODES:,} values"),
        ("vault URL", f"at most {values.MAX_VAULT_CHARS} characters"),
        ("path component", f"{paths.NAME_MAX} bytes"),
        ("path", f"{paths.PATH_MAX:,} bytes"),
        ("account name", f"at most {values.MAX_ACCOUNT_NAME_CHARS} characters"),
        ("numeric id", f"0 to {values.MAX_ID}"),
        ("duration text", f"a duration {values.MAX_DURATION_CHARS} characters"),
        ("tags", f"At most {selections.MAX_SELECT_TAGS} tags"),
        ("tag text", f"at most {selections.MAX_TAG_CHARS} characters"),
        ("prefix", f"up to {_regex_bound(selections.SELECT_PREFIX_RE)[1]} characters"),
        ("secret name", "{} to {} characters".format(*_regex_bound(entries.SECRET_NAME_RE))),
        ("set name", f"1 to {_regex_bound(entries.SET_NAME_RE)[1] + 1} letters"),
        ("problems shown", f"At most {problems.MAX_PROBLEMS} problems"),
        ("problem length", f"at most {problems.MAX_PROBLEM_CHARS} characters"),
        ("quoted values", f"at most {quoting.ECHO_CHARS} characters"),
        ("certificates", f"more than {MAX_CERTIFICATES} certificates"),
        ("credential ID", f"1 to {credentials.MAX_CREDENTIAL_NAME} printable ASCII"),
        ("unit and ID", f"leaves {credentials.MAX_UNIT_AND_ID} bytes for both"),
        ("socket address", f"a socket address of at most {credentials.SUN_PATH_MAX - 1} bytes"),
        ("glob comparisons", f"at most {conflicts.MAX_GLOB_COMPARISONS:,} comparisons"),
        ("exit code", f"exit {EXIT_CONFIG}"),
        ("default cache directory", policy.DEFAULT_CACHE_DIRECTORY),
        ("default cache after", f"Default {int(policy.DEFAULT_CACHE_AFTER_S)}s."),
        ("default cache max_age", f"Default {int(policy.DEFAULT_CACHE_MAX_AGE_S) // 86400}d."),
        ("cache after bounds", f"from {int(policy.MIN_CACHE_AFTER_S)}s to "
                               f"{int(policy.MAX_CACHE_AFTER_S) // 60}m"),
        ("cache max_age bounds", f"from {int(policy.MIN_CACHE_MAX_AGE_S) // 3600}h to "
                                 f"{int(policy.MAX_CACHE_MAX_AGE_S) // 86400}d"),
    ]


@pytest.mark.parametrize(("what", "text"), _manifest_figures(),
                         ids=[what for what, _ in _manifest_figures()])
def test_the_manifest_page_states_every_default_and_limit(what: str, text: str) -> None:
    """kv-agent.yaml(5) states each default and bound of the manifest as the code has it."""
    page = " ".join(_plain(_manifest_page()).split())
    assert text in page, f"kv-agent.yaml.5: the {what} is '{text}' in agent/manifest/"


def _fake_accounts() -> manifest_module.Accounts:
    return manifest_module.Accounts(user=lambda name: 1000, group=lambda name: 1000)


def test_the_manifest_page_example_is_a_valid_manifest() -> None:
    """The EXAMPLE of kv-agent.yaml(5), every shape of entry, passes the manifest's own
    validation."""
    example = _sections(_manifest_page())["EXAMPLE"]
    text = re.search(r"^\.EX\n(.*?)^\.EE", example, re.M | re.S).group(1)  # type: ignore[union-attr]
    parsed = manifest_module.parse_manifest(text, "EXAMPLE", accounts=_fake_accounts(),
                                            check_filesystem=False)
    assert {entry.transform for entry in parsed.secrets} == {"raw", "certificate", "template"}
    assert parsed.selections and parsed.identity.selector == "client_id"


# -- the README, the tutorial -----------------------------------------------------------


def _yaml_blocks(path: Path) -> List[str]:
    return re.findall(r"```yaml\n(.*?)```", path.read_text(encoding="utf-8"), re.S)


def test_the_readme_has_at_most_300_lines() -> None:
    """The README is the front door, not the reference: at most 300 lines."""
    lines = len(README.read_text(encoding="utf-8").splitlines())
    assert lines <= README_MAX_LINES, (
        f"README.md has {lines} lines; move the detail to its home (docs/, the man pages)")


def test_the_readmes_first_manifest_is_valid() -> None:
    """The README's first manifest passes the manifest's own validation."""
    [first] = _yaml_blocks(README)
    parsed = manifest_module.parse_manifest(first, "README", accounts=_fake_accounts(),
                                            check_filesystem=False)
    assert [entry.name for entry in parsed.secrets] == ["db-password"]


def _tutorial_manifest() -> str:
    """The manifest the tutorial writes with ``sudo tee``, its ``$vault`` filled in."""
    text = TUTORIAL.read_text(encoding="utf-8")
    match = re.search(r"manifest\.yaml >/dev/null <<EOF\n(.*?)^EOF$", text, re.M | re.S)
    assert match, "docs/tutorial.md: no `sudo tee /etc/kv-agent/manifest.yaml ... <<EOF` block"
    return match.group(1).replace("$vault", "placeholder-kv")


def test_the_tutorials_manifest_is_valid_and_feeds_the_example_consumer() -> None:
    """The tutorial's manifest is valid and writes the file, as the user, that the
    packaged example consumer reads and runs as, with that consumer's reload as its hook."""
    parsed = manifest_module.parse_manifest(_tutorial_manifest(), "tutorial",
                                            accounts=_fake_accounts(), check_filesystem=False)
    [entry] = parsed.secrets
    unit = CONSUMER_EXAMPLE.read_text(encoding="utf-8")
    assert f"Environment=SECRET={entry.primary.path}\n" in unit
    assert f"User={entry.primary.owner}\n" in unit
    assert entry.on_change == ("systemctl", "reload", CONSUMER_EXAMPLE.name)


def test_the_tutorial_takes_every_step_with_placeholder_names_only() -> None:
    """The tutorial turns the identity on, grants the role, installs, writes the manifest,
    enables the unit, runs doctor and starts the consumer, and names no real vault."""
    text = TUTORIAL.read_text(encoding="utf-8")
    commands = "\n".join(re.findall(r"```sh\n(.*?)```", text, re.S))
    for step in ("az vm identity assign", 'az role assignment create --role "Key Vault Secrets User"',
                 "apt install ./kv-agent_", "kv-agent check", "systemctl enable --now kv-agent",
                 "kv-agent doctor", f"examples/{CONSUMER_EXAMPLE.name}",
                 f"systemctl enable --now {CONSUMER_EXAMPLE.stem}"):
        assert step in " ".join(commands.replace("\\\n", " ").split()), \
            f"docs/tutorial.md: no command with '{step}'"
    assert not re.search(r"https://[a-z0-9-]+\.vault\.azure\.net", text), \
        "docs/tutorial.md: use <vault-name> or $vault, never a vault's name"
    assert not re.search(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", text)


def _load_credentials(unit_text: str) -> Dict[str, str]:
    """The ``LoadCredential=ID:PATH`` lines of a unit, by ID."""
    return dict(line.split("=", 1)[1].split(":", 1) for line in unit_text.splitlines()
                if line.startswith("LoadCredential="))


def test_the_credentials_guide_serves_its_consumer_from_the_agents_socket() -> None:
    """docs/how-to/credentials.md: its manifest is valid and grants its consumer unit
    (DynamicUser=yes, after kv-agent) the ID that unit loads, from the agent's socket."""
    from agent.pipeline.credentials import SOCKET_NAME
    from agent.status.store import DEFAULT_STATE_DIR

    text = CREDENTIALS_GUIDE.read_text(encoding="utf-8")
    parsed = manifest_module.parse_manifest(_yaml_blocks(CREDENTIALS_GUIDE)[0], "guide",
                                            accounts=_fake_accounts(), check_filesystem=False)
    [unit] = re.findall(r"```ini\n(.*?)```", text, re.S)
    name = re.search(r"^# /etc/systemd/system/(\S+)$", unit, re.M).group(1)  # type: ignore[union-attr]
    loads = _load_credentials(unit)
    assert loads and set(loads.values()) == {f"{DEFAULT_STATE_DIR}/{SOCKET_NAME}"}
    granted = {grant.id for entry in parsed.secrets for grant in entry.grants
               if grant.admits(name)}
    assert set(loads) <= granted, f"{name} loads {sorted(loads)}, granted {sorted(granted)}"
    for line in ("DynamicUser=yes", "After=kv-agent.service", "Wants=kv-agent.service"):
        assert f"\n{line}\n" in unit
    assert f"${{CREDENTIALS_DIRECTORY}}/{next(iter(loads))}" in unit
    assert any(entry.on_change == ("systemctl", "try-restart", name)
               for entry in parsed.secrets)


def test_the_credential_example_unit_is_granted_what_it_loads() -> None:
    """The packaged credential example: the manifest entry in its comment is valid, grants
    the unit the ID it loads from the agent's socket and restarts it on rotation."""
    from agent.pipeline.credentials import SOCKET_NAME
    from agent.status.store import DEFAULT_STATE_DIR

    unit = CREDENTIAL_EXAMPLE.read_text(encoding="utf-8")
    entry_text = "\n".join(line[len("#   "):] for line in unit.splitlines()
                           if line.startswith("#   "))
    parsed = manifest_module.parse_manifest(
        "vault: https://placeholder-kv.vault.azure.net\nsecrets:\n" + entry_text, "example",
        accounts=_fake_accounts(), check_filesystem=False)
    [entry] = parsed.secrets
    assert entry.paths == () and entry.grants[0].admits(CREDENTIAL_EXAMPLE.name)
    assert _load_credentials(unit) == {entry.grants[0].id: f"{DEFAULT_STATE_DIR}/{SOCKET_NAME}"}
    assert entry.on_change == ("systemctl", "try-restart", CREDENTIAL_EXAMPLE.name)
    assert "\nDynamicUser=yes\n" in unit and "\nAfter=kv-agent.service\n" in unit


# -- the promises ---------------------------------------------------------------------------


def _promise_rows() -> List[str]:
    """The rows of docs/design/promises.md's table, bar the header."""
    rows = [line for line in PROMISES.read_text(encoding="utf-8").splitlines()
            if line.startswith("| **")]
    assert len(rows) >= 10, "docs/design/promises.md: the promises table is missing"
    return rows


def _assert_tests_exist(where: str, text: str) -> List[Tuple[str, str]]:
    named = TEST_NAME.findall(text)
    for filename, function in named:
        source = REPO / "tests" / filename
        assert source.is_file(), f"{where}: tests/{filename} does not exist"
        if function:
            assert re.search(rf"^def {function}\(", source.read_text(), re.M), (
                f"{where}: {filename}::{function} does not exist")
    return named


def test_every_test_the_promises_table_names_exists() -> None:
    """Each `file.py::test_name` (or `system/file.py::test_name`, `emulator/file.py::...`)
    the promises table gives as proof is a real test function, so the table cannot point at
    a test that was renamed or removed."""
    named = _assert_tests_exist("docs/design/promises.md", "\n".join(_promise_rows()))
    assert len(named) >= 10


def test_every_mutation_the_promises_table_names_exists() -> None:
    """The bracketed mutation names in the promises table are mutations of the check, and
    every promise names at least one."""
    from mutations.table import MUTATIONS

    known = {mutation.name for mutation in MUTATIONS}
    named = []
    for row in _promise_rows():
        groups = re.findall(r"\[([a-z0-9, -]+)\]", row)
        assert groups, f"docs/design/promises.md: no [mutation] in {row[:60]}"
        named += [name.strip() for group in groups for name in group.split(",")]
    assert set(named) <= known, f"unknown mutations: {sorted(set(named) - known)}"


def test_the_readme_lists_every_promise_with_a_test_of_the_table() -> None:
    """The README's short list has one line per promise of the full table, in its order and
    words, and each line names an existing test that the table gives for that promise."""
    bullets = re.findall(r"^- (\*\*.*?)(?=^- |\Z)", _markdown_section(
        README, "The promises, and the tests that prove them"), re.M | re.S)
    rows = _promise_rows()
    titles = [re.match(r"\*\*(.+?)\*\*", bullet).group(1) for bullet in bullets]  # type: ignore[union-attr]
    assert titles == [re.match(r"\| \*\*(.+?)\*\*", row).group(1) for row in rows], \
        "README.md's promises and docs/design/promises.md's rows differ"
    for title, bullet, row in zip(titles, bullets, rows):
        named = _assert_tests_exist(f"README.md, '{title}'", bullet)
        assert named, f"README.md: the promise '{title}' names no test"
        assert set(named) <= set(TEST_NAME.findall(row)), (
            f"README.md: '{title}' names a test the table does not give for it")


# -- the module map -------------------------------------------------------------------------


def test_the_architecture_names_every_module() -> None:
    """docs/design/architecture.md names every module of the agent and of the emulator
    package by its path in its wing, so the module map a newcomer reads is never behind the code."""
    text = ARCHITECTURE.read_text(encoding="utf-8")
    agent = REPO / "agent"
    modules = [path.relative_to(agent).as_posix() for path in sorted(agent.rglob("*.py"))
               if path.name != "__init__.py" or path.parent.name == "writer"]
    missing = [name for name in modules if f"`{name}`" not in text]
    assert not missing, f"docs/design/architecture.md does not name: {', '.join(missing)}"


# -- links ------------------------------------------------------------------------------------


def _markdown_files() -> List[Path]:
    return [README, CONTRIBUTING, *sorted(DOCS.rglob("*.md"))]


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: Path) -> Set[str]:
    """Every heading anchor of a Markdown file (a repeated one gets -1, -2, ...)."""
    anchors: Set[str] = set()
    counts: Dict[str, int] = {}
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    for heading in re.findall(r"^#{1,6} (.+)$", text, re.M):
        slug = _slug(heading)
        anchors.add(slug if slug not in counts else f"{slug}-{counts[slug]}")
        counts[slug] = counts.get(slug, 0) + 1
    return anchors


def _links(path: Path) -> Iterator[str]:
    """Every link and image target in ``path``, outside code blocks and code spans."""
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    yield from re.findall(r"!?\[[^\]]*\]\(([^)\s]+)\)", text)


def _relative_links() -> List[Tuple[Path, str]]:
    return [(path, target) for path in _markdown_files() for target in _links(path)
            if not re.match(r"^[a-z][a-z0-9+.-]*:", target)]


def test_the_documentation_is_found_and_linked() -> None:
    """The link check sees the README, CONTRIBUTING and every page of docs/, and the README
    links the tutorial, CONTRIBUTING and every guide and design note."""
    files = _markdown_files()
    assert len(files) >= 15 and TUTORIAL in files
    linked = {(README.parent / target.split("#")[0]).resolve()
              for path, target in _relative_links() if path == README}
    for page in [CONTRIBUTING, *DOCS.rglob("*.md")]:
        assert page.resolve() in linked, f"README.md does not link {page.relative_to(REPO)}"


@pytest.mark.parametrize(("path", "target"), _relative_links(),
                         ids=[f"{p.relative_to(REPO)}:{t}" for p, t in _relative_links()])
def test_every_relative_link_points_to_an_existing_file(path: Path, target: str) -> None:
    """Each relative link in the README, CONTRIBUTING.md and docs/ reaches a file of the
    repository and, when it names a heading, that heading."""
    file_part, _, anchor = target.partition("#")
    destination = (path.parent / file_part).resolve() if file_part else path
    assert destination.exists(), f"{path.relative_to(REPO)}: {target} does not exist"
    assert REPO in destination.parents or destination == REPO, target
    if anchor and destination.suffix == ".md":
        assert anchor in _anchors(destination), (
            f"{path.relative_to(REPO)}: {destination.name} has no heading #{anchor}")
