"""The kv-agent manifest equivalent to the extension's settings, as commented YAML.

Pure: an :class:`~agent.adopt.vm_extension.ExtensionSettings` in, text out.
Each observed certificate becomes a ``certificate:`` entry whose one output,
``fullchain_key``, has the bytes of the extension's file (the leaf, its
issuers, then the key); ``acls`` become owner, group and mode. Each entry gets
a directory of its own under the manifest's ``directory`` (a certificate's
files are a set, which needs one), named after the extension's file, and the
file keeps the name consumers read (``<vault>.<certificate>`` or
``customSymbolicLinkName``).

The extension kept its files on disk (``/var/lib/waagent/...``); kv-agent
writes to tmpfs. The text ends with the links that let unchanged consumer
configuration find the new files (``tmpfiles.d`` ``L+`` lines, also given
alone for ``--tmpfiles``), the path each consumer should read instead, and
the next steps.
"""

from __future__ import annotations

import posixpath
import re
from typing import Dict, Iterable, List, NamedTuple, Optional, Sequence, Set, Tuple
from urllib.parse import urlsplit

import yaml

from agent.adopt.vm_extension import ExtensionSettings, ObservedCertificate, capped
from agent.base.untrusted import escape
from agent.manifest.model import DEFAULT_DIRECTORY
from agent.manifest.values import MAX_REFRESH_S

IMDS_HOST = "169.254.169.254"
ARC_PORT = 40342
PLACEHOLDER_VAULT = "https://your-vault.vault.azure.net"
# Words YAML 1.1 reads as something other than a string; such a value is quoted.
_YAML_WORDS = {"y", "n", "yes", "no", "on", "off", "true", "false", "null", "~"}
_PLAIN_RE = re.compile(r"[A-Za-z/][A-Za-z0-9_./@+-]*(?::[A-Za-z0-9_./@+-]+)*")


class Placement(NamedTuple):
    """Where one certificate's file goes: relative to the manifest's directory, and absolute."""

    certificate: ObservedCertificate
    path: str
    absolute: str


class ManifestText(NamedTuple):
    """The manifest, the ``tmpfiles.d`` snippet of its links, and warnings found on the way."""

    manifest: str
    tmpfiles: str
    warnings: Tuple[str, ...]


def render(settings: ExtensionSettings, source: str,
           directory: str = DEFAULT_DIRECTORY) -> ManifestText:
    """The manifest for ``settings`` (read from ``source``), writing under ``directory``."""
    warnings: List[str] = []
    placements = place(_distinct(settings.certificates, warnings, source), directory)
    vaults = {certificate.vault_url for certificate in settings.certificates}
    shared_vault = vaults.pop() if len(vaults) == 1 else None
    lines = [
        "# kv-agent manifest imported by `kv-agent import vm-extension` from",
        f"# {_comment(source)}, read as {settings.form}"
        + (f" (typeHandlerVersion {_comment(settings.handler_version)})"
           if settings.handler_version else "") + ".",
        "# Review it, then install it as /etc/kv-agent/manifest.yaml (root:root, mode 0600).",
    ]
    if shared_vault:
        lines.append(f"vault: {_scalar(shared_vault)}")
    elif not placements:  # the manifest needs a vault even with no entry
        lines.append(f"vault: {PLACEHOLDER_VAULT}   # no certificate named one: put yours here")
    lines.append(f"directory: {_scalar(directory)}   # tmpfs: the files live in memory")
    lines += _refresh(settings.polling_interval_s, warnings, source)
    lines += _identity(settings, warnings, source)
    lines += _entries(placements, shared_vault, warnings, source)
    lines += _links(placements, directory)
    lines += _next_steps(settings)
    return ManifestText("\n".join(lines) + "\n", tmpfiles(placements),
                        capped(settings.warnings + tuple(warnings), source, "warnings"))


def place(certificates: Sequence[ObservedCertificate], directory: str) -> Tuple[Placement, ...]:
    """Each certificate's file: ``<vault>.<name>/<link name>``, one directory per certificate
    (its set's), ``-2``, ``-3`` ... added when two would share one."""
    taken: Set[str] = set()  # every folder given, so a real "v.c-2" and a suffixed one differ
    placements = []
    for certificate in certificates:
        base = folder = f"{certificate.vault_label}.{certificate.name}"
        suffix = 2
        while folder in taken:
            folder, suffix = f"{base}-{suffix}", suffix + 1
        taken.add(folder)
        path = f"{folder}/{certificate.link_name}"
        placements.append(Placement(certificate, path, posixpath.join(directory, path)))
    return tuple(placements)


def _distinct(certificates: Sequence[ObservedCertificate], warnings: List[str],
              source: str) -> List[ObservedCertificate]:
    """The certificates, each extension path once: the extension had one file there, and
    one path takes one ``L+`` link (tmpfiles.d ignores a second). The first is kept."""
    first: Dict[str, ObservedCertificate] = {}
    for certificate in certificates:
        kept = first.setdefault(certificate.extension_path, certificate)
        if kept is not certificate:
            warnings.append(f"{source}: {certificate.key}: the extension's file "
                            f"{escape(certificate.extension_path, 200)} is also {kept.key}'s; "
                            f"the manifest keeps {kept.key} ({escape(kept.url, 200)}) alone")
    return list(first.values())


def tmpfiles(placements: Sequence[Placement]) -> str:
    """``tmpfiles.d(5)`` lines: each path the extension's consumers read becomes a symbolic
    link to kv-agent's file. ``L+`` replaces what the extension left there (deleting the
    extension leaves its files and links behind)."""
    lines = ["# kv-agent: links from the Key Vault VM extension's paths to kv-agent's files",
             "# (written by kv-agent import vm-extension --tmpfiles; apply with",
             "#  systemd-tmpfiles --create THIS-FILE)"]
    lines += [f"L+ {_tmpfiles_path(p.certificate.extension_path)} - - - - "
              f"{_tmpfiles_path(p.absolute)}" for p in placements]
    return "\n".join(lines) + "\n"


def _tmpfiles_path(path: str) -> str:
    """A path as one tmpfiles.d field: backslashes and whitespace as C escapes, and ``%`` as
    ``%%`` (tmpfiles.d expands specifiers such as ``%h`` in both the path and the argument)."""
    return "".join(f"\\x{ord(c):02x}" if c.isspace() or c == "\\" else "%%" if c == "%" else c
                   for c in path)


def _refresh(seconds: Optional[int], warnings: List[str], source: str) -> List[str]:
    if seconds is None:
        return ["# pollingIntervalInS was not given: kv-agent refreshes every 15m (refresh:)"]
    if seconds > MAX_REFRESH_S:
        warnings.append(f"{source}: secretsManagementSettings.pollingIntervalInS: {seconds} s is "
                        "longer than kv-agent's longest refresh, 31 days; the manifest says 744h")
        seconds = int(MAX_REFRESH_S)
    return [f"refresh: {_duration(seconds)}   # secretsManagementSettings.pollingIntervalInS"]


def _duration(seconds: int) -> str:
    """``3600`` as ``1h``, ``5400`` as ``1h30m``, ``90`` as ``1m30s``."""
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    text = "".join(f"{n}{unit}" for n, unit in ((hours, "h"), (minutes, "m"), (secs, "s")) if n)
    return text or "1s"


def _identity(settings: ExtensionSettings, warnings: List[str], source: str) -> List[str]:
    """``msiClientId`` as ``identity.client_id``; ``msiEndpoint`` as a source or a note."""
    lines: List[str] = []
    body: List[str] = []
    if settings.msi_client_id:
        body.append(f"  client_id: {_scalar(settings.msi_client_id)}   # authenticationSettings."
                    "msiClientId: the user-assigned identity")
    endpoint = settings.msi_endpoint
    if endpoint:
        split = urlsplit(endpoint)
        if split.hostname == IMDS_HOST:
            lines.append(f"# authenticationSettings.msiEndpoint {_comment(endpoint)} is IMDS, "
                         "where kv-agent asks by default: nothing to set.")
        elif split.hostname in ("localhost", "127.0.0.1") and split.port == ARC_PORT:
            body.append("  source: arc   # authenticationSettings.msiEndpoint: Azure Arc's "
                        "HIMDS (auto finds it too)")
        else:
            token_url = _token_url(endpoint)
            lines += [f"# authenticationSettings.msiEndpoint is {_comment(endpoint)}: kv-agent "
                      "asks IMDS at 169.254.169.254",
                      "# unless its unit's environment says otherwise:",
                      "#   systemctl edit kv-agent   ->   [Service]",
                      f"#   Environment=KV_AGENT_IMDS_ENDPOINT={_comment(token_url)}"]
            warnings.append(f"{source}: authenticationSettings.msiEndpoint: not IMDS's address; "
                            f"set KV_AGENT_IMDS_ENDPOINT={escape(token_url, 200)} in kv-agent's "
                            "unit (see the manifest's comment)")
    if body:
        lines += ["identity:"] + body
    return lines


def _token_url(endpoint: str) -> str:
    """The token URL kv-agent asks, from the extension's ``.../metadata/identity``."""
    trimmed = endpoint.rstrip("/")
    return trimmed if trimmed.endswith("/oauth2/token") else trimmed + "/oauth2/token"


def _entries(placements: Sequence[Placement], shared_vault: Optional[str],
             warnings: List[str], source: str) -> List[str]:
    if not placements:
        return ["secrets: []   # observedCertificates was empty"]
    lines = ["secrets:"]
    for placement in placements:
        certificate = placement.certificate
        lines += [
            f"  # {certificate.key}: {_comment(certificate.url)}",
            f"  # The extension wrote {_comment(certificate.extension_path)}: the leaf, its "
            "issuers, then the key;",
            "  # fullchain_key writes the same bytes.",
            f"  - name: {_scalar(certificate.name)}",
        ]
        if shared_vault is None:
            lines.append(f"    vault: {_scalar(certificate.vault_url)}")
        if certificate.version:
            lines.append(f"    version: {_scalar(certificate.version)}   # pinned in the URL: "
                         "never follows a renewal (drop it to follow)")
        lines += ["    certificate:", f"      fullchain_key: {_scalar(placement.path)}"]
        lines += _ownership(certificate, warnings, source)
    return lines


def _ownership(certificate: ObservedCertificate, warnings: List[str],
               source: str) -> List[str]:
    """``acls`` as owner, group and mode: one user and one group map exactly; a file has
    one owner and one group, so more users or groups need a group they share."""
    if not certificate.acls:
        return ["    # no acls: root only, as the extension's file (root, 0600); "
                "kv-agent's default 0400"]
    users = _unique(acl.user for acl in certificate.acls)
    groups = _unique(acl.group for acl in certificate.acls)
    if len(users) > 1 or len(groups) > 1:
        named = (f"{source}: {certificate.key}.acls: a file has one owner and one group, and "
                 f"the acls name users {', '.join(users) or '-'} and groups "
                 f"{', '.join(groups) or '-'}; the manifest gives it to the first; ")
        if groups:
            fix = (f"put the others in group {groups[0]} (usermod -aG) and read it through the "
                   "group")
        else:  # mode 0400: nobody reads through a group until the manifest names one
            fix = ("create a group for them (groupadd, then usermod -aG for each), then set "
                   "group: to it and mode: \"0440\" in the manifest")
        warnings.append(named + fix)
    lines = []
    if users:
        lines.append(f"    owner: {_scalar(users[0])}   # acls: read access")
    if groups:
        lines.append(f"    group: {_scalar(groups[0])}   # acls: read access")
    lines.append(f"    mode: \"{'0440' if groups else '0400'}\"")
    return lines


def _unique(names: Iterable[Optional[str]]) -> List[str]:
    seen: List[str] = []
    for name in names:
        if name and name not in seen:
            seen.append(name)
    return seen


def _links(placements: Sequence[Placement], directory: str) -> List[str]:
    if not placements:
        return []
    stores = sorted({p.certificate.store for p in placements})
    lines = [
        "",
        f"# The extension kept its files on disk, in {', '.join(_comment(s) for s in stores)};",
        f"# kv-agent keeps them in memory under {_comment(directory)} and writes them again at "
        "each start.",
        "# Consumers read the new path: change each one's configuration to it,",
    ]
    lines += [f"#   {_comment(p.certificate.extension_path)}  ->  {_comment(p.absolute)}"
              for p in placements]
    lines += [
        "# or leave their configuration unchanged and link the old paths to the new files",
        "# (systemd-tmpfiles; --tmpfiles FILE writes these lines, e.g. to",
        "#  /etc/tmpfiles.d/kv-agent-vm-extension.conf, then systemd-tmpfiles --create FILE):",
    ]
    lines += [f"#   {line}" for line in tmpfiles(placements).splitlines()[3:]]
    lines.append("# A link works for a consumer that could read the old directory: its "
                 "permissions stay.")
    return lines


def _next_steps(settings: ExtensionSettings) -> List[str]:
    lines = [""]
    if settings.require_initial_sync:
        lines += ["# requireInitialSync: kv-agent is ready (systemd's READY=1) only once every "
                  "file is written:",
                  "# order consumers After=kv-agent.service and Wants=kv-agent.service."]
    lines += [
        "# Next: kv-agent check --manifest FILE (offline: users, groups, paths), then",
        "#       kv-agent doctor --manifest FILE (identity, vault access, each certificate).",
        "# Once kv-agent runs and the consumers read its files, remove the extension:",
        "#   az vm extension delete --name KeyVaultForLinux --resource-group RG --vm-name VM",
    ]
    return lines


def _scalar(value: str) -> str:
    """``value`` as a YAML scalar: plain when YAML reads it back as this very string, else
    YAML's own double-quoted form on one line. (JSON's form is not YAML's: it writes a
    character beyond U+FFFF as two surrogate escapes, which YAML refuses.)"""
    if _PLAIN_RE.fullmatch(value) and value.lower() not in _YAML_WORDS:
        return value
    text: str = yaml.safe_dump(value, default_style='"', allow_unicode=True, width=1 << 30)
    return text.removesuffix("\n...\n").rstrip("\n")


def _comment(text: Optional[str]) -> str:
    """Text from the settings, safe inside a one-line comment."""
    return escape(text or "", 200)

