"""Load and validate the YAML manifest into a frozen :class:`Manifest`.

The manifest is where the pipeline starts: each entry becomes an
:class:`Entry` made of a :class:`~agent.pipeline.sources.Source` (what to fetch), a
transform name with its parameters (:mod:`agent.pipeline.transforms`) and an
:class:`~agent.pipeline.outputs.OutputSet` (the files, and the systemd credentials
the running agent serves). An entry has one of three
shapes: ``path:`` (one secret to one file, ``raw``, optionally decoded with
``encoding:``), ``certificate:`` (one certificate's secret to up to six
files) or ``template:`` (several secrets to one file). Entries that change
together (``set:``, and each certificate) become :class:`~agent.pipeline.outputs.EntrySet`
values in :attr:`Manifest.sets`.

The manifest decides which secrets land where, owned by whom: whoever can edit
it can direct any secret to any user. So it is refused unless only root (or the
agent's own user) can write it, as sudo does with sudoers; and it is validated
fully before anything is fetched, with every problem reported at once, each on
one line naming the file, the line, the key and the fix.

Nothing here touches the network. Users and groups are resolved through
injectable lookups so tests (and ``kv-agent check`` on a build host) can run
without the real passwd database.

This module only names what the rest of the agent uses; the rooms are:
``model`` (the frozen values and their defaults), ``file`` (reading the file
safely), ``document`` (YAML with line numbers, and the cost bounds),
``quoting`` and ``problems`` (one bounded line per problem, did-you-mean),
``values`` (durations, modes, jitter, accounts, commands, vault URLs),
``paths``, ``settings`` (the top-level keys), ``entries``, ``credentials``
(``credential:``), ``selections``, ``conflicts`` (what entries may share) and
``parser`` (``load_manifest``, ``parse_manifest``).
"""

from agent.manifest.credentials import CREDENTIAL_KEYS
from agent.manifest.entries import (
    CERTIFICATE_OUTPUT_KEYS,
    OUTPUT_KEYS,
    SECRET_KEYS,
    TEMPLATE_KEYS,
    TEMPLATE_VALUE_KEYS,
)
from agent.manifest.file import read_manifest_bytes, read_manifest_text
from agent.manifest.model import (
    DEFAULT_DIRECTORY,
    DEFAULT_JITTER,
    DEFAULT_METRICS_PATH,
    DEFAULT_MODE,
    DEFAULT_REFRESH_S,
    DEFAULT_WARN_BEFORE_EXPIRY_S,
    Accounts,
    Entry,
    Manifest,
    Selection,
    landing_directories,
)
from agent.manifest.parser import TOP_KEYS, load_manifest, parse_manifest
from agent.manifest.paths import resolve_path
from agent.manifest.selections import SELECT_FILTER_KEYS, SELECT_KEYS
from agent.manifest.settings import CACHE_KEYS, IDENTITY_KEYS, IDENTITY_SOURCE_KEY
from agent.manifest.values import (
    parse_command,
    parse_duration,
    parse_expiry_window,
    parse_jitter,
    parse_mode,
    parse_vault_url,
)

__all__ = [
    # the model
    "Accounts", "Entry", "Manifest", "Selection", "landing_directories",
    "DEFAULT_DIRECTORY", "DEFAULT_JITTER", "DEFAULT_METRICS_PATH", "DEFAULT_MODE",
    "DEFAULT_REFRESH_S", "DEFAULT_WARN_BEFORE_EXPIRY_S",
    # loading
    "load_manifest", "parse_manifest", "read_manifest_bytes", "read_manifest_text",
    # the keys each level knows (kv-agent.yaml(5) has an item for each)
    "TOP_KEYS", "IDENTITY_KEYS", "IDENTITY_SOURCE_KEY", "SECRET_KEYS", "OUTPUT_KEYS",
    "CERTIFICATE_OUTPUT_KEYS", "CREDENTIAL_KEYS", "TEMPLATE_KEYS", "TEMPLATE_VALUE_KEYS",
    "SELECT_KEYS", "SELECT_FILTER_KEYS", "CACHE_KEYS",
    # the value parsers
    "parse_command", "parse_duration", "parse_expiry_window", "parse_jitter", "parse_mode",
    "parse_vault_url", "resolve_path",
]
