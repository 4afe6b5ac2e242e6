"""Link 4 of the chain, per secret: readable (a 403 gets the exact ``az`` line
that grants it, chosen by what the 403 says: RBAC or access policy), exists (a
404 gets the closest names of the vault's list), enabled, ``nbf``/``exp``; per
certificate or template entry, its transform run in memory and whether a
certificate's key is exportable; per ``select:`` entry, whether the vault may
be listed.

Each GET goes through the agent's own vault client (its probe answers what the
agent's fetch would), and a vault that stops answering is not asked again.
No value ever reaches a check: only names, versions, dates and the vault's own
words, escaped and bounded; what goes into a printed command is checked
against a narrow shape first.
"""

from __future__ import annotations

import difflib
import re
from typing import Callable, Dict, List, Mapping, Optional, Tuple, Union
from urllib.parse import urlsplit

from agent.base.errors import (
    IdentityUnavailableError,
    KvAgentError,
    VaultError,
    VaultUnavailableError,
)
from agent.base.untrusted import escape, load_json
from agent.doctor.report import FAIL, OK, WARN, Check
from agent.doctor.vault_links import is_address
from agent.manifest import Entry
from agent.pipeline.expiry import EXPIRED, EXPIRING, NOT_YET_VALID, Validity, combine, judge, moment
from agent.pipeline.outputs import OutputSet
from agent.pipeline.sources import Source
from agent.pipeline.transforms import certificate_has_key, transform_with_validity
from agent.vault.audience import audience_for_host
from agent.vault.client import Probed, Secret, VaultClient
from agent.vault.failures import parse_error
from agent.vault.listing import SecretItem

NEAR_NAMES = 3

# What may go into a printed command line: anything else is a placeholder,
# so a hostile answer cannot put shell syntax into a line an operator pastes.
_VAULT_NAME = re.compile(r"[0-9A-Za-z-]{3,24}\Z")
_SECRET_NAME = re.compile(r"[0-9A-Za-z-]{1,127}\Z")
_VAULT_ID = re.compile(
    r"/subscriptions/[0-9a-fA-F-]{36}/resourcegroups/[-\w.()]{1,90}"
    r"/providers/microsoft\.keyvault/vaults/[0-9A-Za-z-]{3,24}", re.IGNORECASE)
_ACCESS_POLICY_VAULT = re.compile(r"on key vault '([0-9A-Za-z-]{3,24});")


class SecretProbes:
    """The per-secret checks of one vault; ``answers`` keeps each GET's
    answer for the entry checks, and a vault that stops answering is not
    asked again (each request would wait out its bound)."""

    def __init__(self, client: VaultClient, vault: str, object_id: Optional[str],
                 now: float, warn_before_s: float) -> None:
        self.client = client
        self.vault = vault
        self.object_id = object_id
        self.now = now
        self.warn_before_s = warn_before_s
        self.answers: Dict[Source, Probed] = {}
        self._gone: Optional[str] = None  # why the vault is not asked again
        self._listing: Optional[Union[Tuple[SecretItem, ...], KvAgentError]] = None

    def check(self, source: Source) -> List[Check]:
        subject = _secret_subject(source)
        if self._gone is not None:
            return [Check(subject, "readable", WARN, f"not checked: {self._gone}")]
        try:
            probed = self.client.probe_secret(Source(*source))
        except KvAgentError as exc:
            if isinstance(exc, (VaultUnavailableError, IdentityUnavailableError)):
                self._gone = f"the vault stopped answering ({exc.message})"
            return [Check(subject, "readable", FAIL, exc.message, exc.hint)]
        self.answers[source] = probed
        return judge_answer(source, probed, self.object_id, self.now, self.warn_before_s,
                            self._near_names)

    def check_listing(self, label: str, wanted: Callable[[SecretItem], bool]) -> List[Check]:
        """Whether the vault may be listed (a ``select:`` entry needs it)."""
        subject = label
        listing = self._list()
        if isinstance(listing, KvAgentError):
            return [Check(subject, "listable", FAIL, listing.message,
                          refusal_fix(self.vault, _inner_code(listing.message), b"",
                                      self.object_id, listing.hint))]
        chosen = sum(1 for item in listing if wanted(item))
        return [Check(subject, "listable", OK,
                      f"{chosen} of the vault's {len(listing)} secrets match")]

    def _list(self) -> Union[Tuple[SecretItem, ...], KvAgentError]:
        if self._listing is None:
            if self._gone is not None:
                self._listing = VaultError(f"not listed: {self._gone}")
            else:
                try:
                    self._listing = self.client.list_secrets(self.vault)
                except KvAgentError as exc:
                    self._listing = exc
        return self._listing

    def _near_names(self, name: str) -> Optional[List[str]]:
        """The listed names closest to ``name``; None when the vault may not
        be listed."""
        listing = self._list()
        if isinstance(listing, KvAgentError):
            return None
        names = {item.name.lower(): item.name for item in listing}
        close = difflib.get_close_matches(name.lower(), list(names), n=NEAR_NAMES, cutoff=0.6)
        return [names[one] for one in close]


def made(outputs: OutputSet) -> str:
    """What an entry's transform makes, counted as the operator reads it: files and
    credentials apart ("2 files and 1 credential"), never a credential called a file."""
    counts = [(len(outputs.paths), "file"), (len(outputs.grants), "credential")]
    return " and ".join(f"{n} {noun}{'' if n == 1 else 's'}" for n, noun in counts if n)


def judge_answer(source: Source, probed: Probed, object_id: Optional[str], now: float,
                 warn_before_s: float,
                 near_names: Callable[[str], Optional[List[str]]] = lambda name: None,
                 ) -> List[Check]:
    """The checks one secret GET's answer settles (pure but for
    ``near_names``, asked only for a 404): readable, exists, enabled and
    its validity window."""
    subject = _secret_subject(source)
    vault = source.vault
    if probed.secret is not None:
        attributes = probed.secret.attributes
        checks = [Check(subject, "readable", OK, f"readable, version {probed.secret.version}")]
        if attributes.enabled is False:  # served, though: only a disabled *version* is refused
            checks.append(Check(subject, "enabled", WARN, "the vault says disabled"))
        else:
            checks.append(Check(subject, "enabled", OK, "enabled"))
        checks.append(check_validity(subject, source, Validity(attributes.nbf, attributes.exp),
                                     now, warn_before_s))
        return checks
    code, inner, _ = parse_error(probed.body)
    error = probed.error
    assert error is not None
    if probed.status == 404:
        return [_not_found(subject, source, code or inner, near_names)]
    if probed.status == 403 and inner == "SecretDisabled":
        version = f" --version {source.version}" if source.version else ""
        return [Check(subject, "readable", OK, "readable (the identity may get it)"),
                Check(subject, "exists", OK, "exists"),
                Check(subject, "enabled", FAIL,
                      f"{'version ' + source.version if source.version else 'its current version'}"
                      " is disabled (403 SecretDisabled)",
                      f"az keyvault secret set-attributes --vault-name "
                      f"{vault_name(vault, probed.body)} --name {source.name}{version} "
                      "--enabled true")]
    if probed.status == 403:
        detail = f" {inner or code}" if inner or code else ""
        return [Check(subject, "readable", FAIL, f"permission denied (403{detail})",
                      refusal_fix(vault, inner, probed.body, object_id, error.hint))]
    return [Check(subject, "readable", FAIL, error.message, error.hint)]


def _not_found(subject: str, source: Source, code: str,
               near_names: Callable[[str], Optional[List[str]]]) -> Check:
    detail = f" (404 {code})" if code else " (404)"
    if source.version:
        return Check(subject, "exists", FAIL, f"version {source.version} not found{detail}",
                     f"pick an existing version: az keyvault secret list-versions --vault-name "
                     f"{vault_name(source.vault, b'')} --name {source.name}")
    near = near_names(source.name)
    if near:
        return Check(subject, "exists", FAIL,
                     f"not found{detail}; closest names in the vault: {', '.join(near)}",
                     f"if '{near[0]}' is the secret meant, set name: {near[0]} in the manifest")
    said = ("no similar name in the vault" if near is not None
            else "the vault may not be listed, so no similar names")
    return Check(subject, "exists", FAIL, f"not found{detail}; {said}",
                 f"create it: az keyvault secret set --vault-name "
                 f"{vault_name(source.vault, b'')} --name {source.name} --file <value file>")


def check_validity(subject: str, source: Source, validity: Validity, now: float,
                   warn_before_s: float) -> Check:
    """The version's ``nbf``/``exp`` window at ``now``: expired fails (the
    agent still writes it, as Key Vault serves it, but clients may refuse
    it); not yet valid and expiring soon are warnings."""
    kind = judge(validity, now, warn_before_s)
    rotate = (f"rotate it: az keyvault secret set --vault-name "
              f"{vault_name(source.vault, b'')} --name {source.name} --file <new value file>")
    if kind == EXPIRED and validity.expires is not None:
        return Check(subject, "validity", FAIL, f"expired at {moment(validity.expires)}",
                     rotate)
    if kind == NOT_YET_VALID and validity.not_before is not None:
        return Check(subject, "validity", WARN,
                     f"not valid before {moment(validity.not_before)} (written anyway)")
    if kind == EXPIRING and validity.expires is not None:
        days = max(0.0, (validity.expires - now) / 86400.0)
        return Check(subject, "validity", WARN,
                     f"expires at {moment(validity.expires)}, in {days:.1f} days", rotate)
    until = f"valid until {moment(validity.expires)}" if validity.expires else "no expiry set"
    return Check(subject, "validity", OK, until)


def check_entry(entry: Entry, probed: Mapping[Source, Probed], now: float,
                warn_before_s: float) -> List[Check]:
    """For a certificate or template entry whose secrets all arrived: its
    transform, run in memory (nothing is written), and for a certificate
    whether the key is exportable and the leaf's validity."""
    if entry.transform == "raw":
        return []
    secrets = [probed[source].secret for source in entry.sources if source in probed]
    if len(secrets) != len(entry.sources) or any(one is None for one in secrets):
        return []
    fetched = [one for one in secrets if one is not None]
    subject = f"{entry.transform} {entry.name}"
    try:
        _, leaf = transform_with_validity(entry.transform, fetched, len(entry.outputs.outputs),
                                          entry.params, entry=entry.name)
    except KvAgentError as exc:
        name = "key exportable" if "non-exportable" in exc.message else "transform"
        return [Check(subject, name, FAIL, exc.message, exc.hint)]
    if entry.transform != "certificate" or leaf is None:
        return [Check(subject, "transform", OK, f"makes its {made(entry.outputs)}")]
    return [_key_check(subject, entry, fetched[0]),
            check_validity(subject, entry.sources[0], combine([Validity(*leaf)]), now,
                           warn_before_s)]


def _key_check(subject: str, entry: Entry, secret: Secret) -> Check:
    """Whether the certificate's value holds its private key (the policy's
    ``exportable``); the transform already failed when a key is asked."""
    try:
        has_key = certificate_has_key(secret, entry.name)
    except KvAgentError as exc:  # the transform read it a moment ago; defensive
        return Check(subject, "key exportable", FAIL, exc.message, exc.hint)
    if has_key:
        return Check(subject, "key exportable", OK, "the value holds the private key")
    return Check(subject, "key exportable", WARN,
                 "the key is not exportable: only cert, chain and fullchain can be written")


def _secret_subject(source: Source) -> str:
    pinned = f" (version {source.version})" if source.version else ""
    return f"secret {source.name}{pinned}"


# -- the one command that fixes a refusal ------------------------------------------


def refusal_fix(vault: str, inner: str, body: bytes, object_id: Optional[str],
                fallback: Optional[str]) -> Optional[str]:
    """The one command that grants this identity what a 403 refused, chosen
    by the 403's inner code: an RBAC vault needs the role, an access-policy
    vault (AccessDenied, ForbiddenByPolicy) a policy, a firewall the
    machine's address [protocol.md B5]."""
    assignee = object_id or "<object id of the identity>"
    name = vault_name(vault, body)
    fields = _message_fields(body)
    if inner in ("AccessDenied", "ForbiddenByPolicy"):
        return (f"az keyvault set-policy --name {name} --object-id {assignee} "
                "--secret-permissions get list")
    if inner == "ForbiddenByFirewall":
        address = fields.get("client address", "")
        if is_address(address):
            return f"az keyvault network-rule add --name {name} --ip-address {address}"
        return fallback
    if inner == "ForbiddenByRbac" or not inner:
        found = _VAULT_ID.match(fields.get("resource", "").strip("'"))
        scope = (f"'{found.group(0)}'" if found
                 else f'"$(az keyvault show --name {name} --query id -o tsv)"')
        return (f'az role assignment create --role "Key Vault Secrets User" '
                f"--assignee {assignee} --scope {scope}")
    return fallback


def vault_name(vault: str, body: bytes) -> str:
    """The vault's name for an ``az`` command: from a 403's message, else
    the first label of a host under a Key Vault domain, else a placeholder."""
    fields = _message_fields(body)
    named = fields.get("vault", "").split(";")[0]
    if _VAULT_NAME.match(named):
        return named
    found = _ACCESS_POLICY_VAULT.search(fields.get("", ""))
    if found:
        return found.group(1)
    host = urlsplit(vault).hostname or ""
    label = host.split(".")[0]
    if audience_for_host(host) and _VAULT_NAME.match(label):
        return label
    return "<vault name>"


def _message_fields(body: bytes) -> Dict[str, str]:
    """A KeyVaultError message's ``Name: value`` lines (lower-case names),
    and the whole message under ''; escaped and bounded."""
    try:
        content = load_json(body) if body else None
    except ValueError:
        return {}
    error = content.get("error") if isinstance(content, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    if not isinstance(message, str):
        return {}
    fields = {"": escape(message, 2000)}
    for line in message[:4000].splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() and len(key) < 40:
            fields.setdefault(key.strip().lower(), escape(value.strip(), 300))
    return fields


def _inner_code(message: str) -> str:
    """The inner code our own refusal message carries in parentheses."""
    for code in ("ForbiddenByRbac", "AccessDenied", "ForbiddenByPolicy", "ForbiddenByFirewall"):
        if f"({code})" in message:
            return code
    return ""
