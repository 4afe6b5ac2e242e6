"""The Key Vault VM extension for Linux's settings, read into plain values.

What the extension (``Microsoft.Azure.KeyVault`` / ``KeyVaultForLinux``) is
told, from its public documentation (learn.microsoft.com/azure/virtual-machines/
extensions/key-vault-linux, its revisions for versions 1.0, 2.0 and 3.0; the
notes with sources are in docs/how-to/migrate-vm-extension.md):

* ``secretsManagementSettings``: ``pollingIntervalInS`` (seconds, a string),
  ``certificateStoreLocation`` (the directory, default
  ``/var/lib/waagent/Microsoft.Azure.KeyVault.Store``), ``observedCertificates``
  (versions 1 and 2: URL strings; version 3: objects with ``url``,
  ``certificateStoreLocation``, ``customSymbolicLinkName`` and ``acls`` of
  ``{user, group}``), ``requireInitialSync``, ``aclEnabled``, and the keys the
  extension ignores on Linux (``certificateStoreName``, ``linkOnRenewal``);
* ``authenticationSettings``: ``msiEndpoint``, ``msiClientId``;
* ``loggingSettings`` (fluentd, version 3).

The document may be those settings themselves (``az vm extension set
--settings``), an ARM resource (``properties.settings``), the output of ``az
vm extension show`` (``settings``), or the handler's own configuration on the
VM (``runtimeSettings[0].handlerSettings.publicSettings``).

:func:`parse_settings` is pure: bytes in, an :class:`ExtensionSettings` out,
or :class:`SettingsError` with one line per problem (the file, the key and
the fix). What kv-agent has no equivalent for is a warning, never a problem.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple
from urllib.parse import SplitResult, urlsplit

from agent.base.errors import ManifestError
from agent.base.untrusted import escape
from agent.manifest.entries import SECRET_NAME_RE, VERSION_RE
from agent.manifest.problems import MAX_PROBLEMS, suggest
from agent.manifest.settings import GUID_RE
from agent.manifest.values import ACCOUNT_NAME_RE, MAX_ACCOUNT_NAME_CHARS, parse_vault_url

DEFAULT_STORE = "/var/lib/waagent/Microsoft.Azure.KeyVault.Store"
EXTENSION_TYPE = "KeyVaultForLinux"
MAX_SETTINGS_BYTES = 1 << 20
MAX_NAME_BYTES = 255
MAX_PATH_BYTES = 4095
# Keys each level knows. Those kv-agent has no use for are still known: they
# get a note or a warning of their own, not "unknown".
TOP_KEYS = ("secretsManagementSettings", "authenticationSettings", "loggingSettings")
SECRETS_KEYS = ("pollingIntervalInS", "certificateStoreLocation", "certificateStoreName",
                "observedCertificates", "requireInitialSync", "linkOnRenewal", "aclEnabled")
CERTIFICATE_KEYS = ("url", "certificateStoreLocation", "certificateStoreName",
                    "customSymbolicLinkName", "acls")
WINDOWS_KEYS = ("keyExportable", "accounts")  # KeyVaultForWindows' own; no meaning on Linux
ACL_KEYS = ("user", "group")
AUTHENTICATION_KEYS = ("msiEndpoint", "msiClientId")


class SettingsError(ManifestError):
    """The settings document cannot be read; ``problems`` holds one line per
    problem (exit 78, as an invalid manifest)."""


@dataclass(frozen=True)
class Acl:
    """One entry of a certificate's ``acls``: read access for a user, a group, or both."""

    user: Optional[str]
    group: Optional[str]


@dataclass(frozen=True)
class ObservedCertificate:
    """One of ``observedCertificates``, with where the extension put its file.

    ``link_name`` is the name consumers read in ``store``: the extension's
    symbolic link ``<vault>.<certificate>`` (the vault being the URL's first
    DNS label as written), or ``customSymbolicLinkName``."""

    key: str  # where it came from: observedCertificates[i]
    url: str
    vault_url: str  # normalised: https://host[:port]
    vault_label: str
    name: str
    version: Optional[str]
    store: str
    link_name: str
    acls: Tuple[Acl, ...]

    @property
    def extension_path(self) -> str:
        """The path the extension's consumers read."""
        return posixpath.join(self.store, self.link_name)


@dataclass(frozen=True)
class ExtensionSettings:
    """The settings, read; ``warnings`` name each setting kv-agent cannot carry over."""

    form: str  # which document it was: settings, ARM resource, ...
    handler_version: Optional[str]
    polling_interval_s: Optional[int]
    certificates: Tuple[ObservedCertificate, ...]
    msi_client_id: Optional[str]
    msi_endpoint: Optional[str]
    require_initial_sync: Optional[bool]
    warnings: Tuple[str, ...]


class _Reader:
    """Problems and warnings as they are found, each one line naming the file and key."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.problems: List[str] = []
        self.warnings: List[str] = []

    def problem(self, key: str, what: str, fix: str) -> None:
        self.problems.append(f"{self.source}: {key}: {what}; {fix}")

    def warn(self, key: str, what: str, fix: str) -> None:
        self.warnings.append(f"{self.source}: {key}: {what}; {fix}")

    def error(self) -> SettingsError:
        """The problems so far, at most MAX_PROBLEMS lines, as the manifest's are."""
        lines = capped(self.problems, self.source, "problems")
        return SettingsError(lines[0], problems=lines)


def capped(lines: Sequence[str], source: str, what: str) -> Tuple[str, ...]:
    """At most MAX_PROBLEMS of ``lines``, then one counting the rest (as
    :class:`~agent.manifest.problems.Problems` reports a manifest's): a settings
    file of 1 MiB can hold tens of thousands of bad certificates."""
    if len(lines) <= MAX_PROBLEMS:
        return tuple(lines)
    return tuple(lines[:MAX_PROBLEMS]) + (
        f"{source}: and {len(lines) - MAX_PROBLEMS} more {what}; fix these first",)


def parse_settings(data: bytes, source: str) -> ExtensionSettings:
    """The extension's settings in ``data`` (one of the documents the module
    docstring lists), read from the file named ``source``.

    Raises SettingsError, with every problem, for what cannot be read: not
    JSON, a setting of the wrong type, a URL or path that is not one, an ARM
    expression that only a deployment resolves."""
    reader = _Reader(source)
    if len(data) > MAX_SETTINGS_BYTES:
        reader.problem("(file)", f"larger than {MAX_SETTINGS_BYTES >> 20} MiB",
                       "pass the extension's settings, a few KiB")
        raise reader.error()
    try:
        document = json.loads(data.decode("utf-8-sig"))
    except (UnicodeDecodeError, ValueError) as exc:
        where = f"line {exc.lineno}" if isinstance(exc, json.JSONDecodeError) else "(file)"
        reader.problem(where, f"not JSON ({escape(str(exc).split(':')[0], 80)})",
                       "pass the JSON given to az vm extension set --settings, or the ARM "
                       "resource")
        raise reader.error() from None
    except RecursionError:  # 1 MiB of "[" nests deeper than the parser's stack
        reader.problem("(file)", "nested too deeply to be the extension's settings",
                       "pass the JSON given to az vm extension set --settings, or the ARM "
                       "resource")
        raise reader.error() from None
    form, prefix, handler_version, settings = _locate(reader, document)
    parsed = None
    if settings is not None:
        parsed = _read(reader, settings, prefix, form, handler_version)
    if parsed is None and not reader.problems:  # each path to None records why; a net
        reader.problem("(top)", "no settings found", "pass the extension's settings (az vm "
                       "extension show --query settings)")
    if reader.problems or parsed is None:
        raise reader.error()
    return parsed


def _locate(reader: _Reader, document: Any
            ) -> Tuple[str, str, Optional[str], Optional[Mapping[str, Any]]]:
    """(the document's form, the key path to its settings, typeHandlerVersion, the settings)."""
    if not isinstance(document, dict):
        reader.problem("(top)", "not a JSON object", "pass the extension's settings object")
        return "", "", None, None
    if any(key in document for key in TOP_KEYS):
        return "settings for az vm extension set --settings", "", None, document
    runtime = document.get("runtimeSettings")
    if isinstance(runtime, list) and runtime and isinstance(runtime[0], dict):
        handler = runtime[0].get("handlerSettings")
        public = handler.get("publicSettings") if isinstance(handler, dict) else None
        if isinstance(public, dict):
            return ("the extension's handler configuration",
                    "runtimeSettings[0].handlerSettings.publicSettings.", None, public)
    properties = document.get("properties")
    if isinstance(properties, dict) and "settings" in properties:
        _check_type(reader, "properties.", properties.get("publisher"), properties.get("type"))
        return ("an ARM resource's properties.settings", "properties.settings.",
                _text(properties.get("typeHandlerVersion")), _settings(reader, properties,
                                                                      "properties."))
    if "settings" in document:
        _check_type(reader, "", document.get("publisher"),
                    document.get("typePropertiesType", document.get("type")))
        return ("the output of az vm extension show", "settings.",
                _text(document.get("typeHandlerVersion")),
                _settings(reader, document, ""))
    reader.problem("(top)", "no secretsManagementSettings, properties.settings or settings",
                   "pass the extension's settings (az vm extension show --query settings)")
    return "", "", None, None


def _check_type(reader: _Reader, prefix: str, publisher: Any, kind: Any) -> None:
    if isinstance(kind, str) and kind not in (EXTENSION_TYPE, "Microsoft.Compute/"
                                              "virtualMachines/extensions"):
        reader.problem(prefix + "type", f"'{escape(kind, 60)}' is not {EXTENSION_TYPE}",
                       "kv-agent imports the Key Vault VM extension for Linux only")
    if isinstance(publisher, str) and publisher != "Microsoft.Azure.KeyVault":
        reader.problem(prefix + "publisher", f"'{escape(publisher, 60)}' is not "
                       "Microsoft.Azure.KeyVault", "pass the Key Vault VM extension's resource")


def _text(value: Any) -> Optional[str]:
    return str(value) if isinstance(value, (str, int, float)) else None


def _settings(reader: _Reader, parent: Mapping[str, Any],
              prefix: str) -> Optional[Mapping[str, Any]]:
    """``settings`` of a resource: required, so null is a problem (an extension deployed
    without settings, or a query that missed them), not an empty document."""
    if parent.get("settings") is None:
        reader.problem(prefix + "settings", "is null", "pass the extension's settings "
                       "(az vm extension show --query settings)")
        return None
    return _object(reader, parent, "settings", prefix)


def _object(reader: _Reader, parent: Mapping[str, Any], key: str,
            prefix: str) -> Optional[Mapping[str, Any]]:
    value = parent.get(key)
    if value is None:
        return None
    if not isinstance(value, dict):
        reader.problem(prefix + key, "must be a JSON object", "write {\"...\": ...}")
        return None
    return value


def _read(reader: _Reader, settings: Mapping[str, Any], prefix: str, form: str,
          handler_version: Optional[str]) -> Optional[ExtensionSettings]:
    _unknown(reader, settings, TOP_KEYS, prefix)
    secrets = _object(reader, settings, "secretsManagementSettings", prefix) or {}
    auth = _object(reader, settings, "authenticationSettings", prefix) or {}
    here = prefix + "secretsManagementSettings."
    _unknown(reader, secrets, SECRETS_KEYS, here)
    _unknown(reader, auth, AUTHENTICATION_KEYS, prefix + "authenticationSettings.")
    if "loggingSettings" in settings:
        reader.warn(prefix + "loggingSettings", "kv-agent logs to the journal, not to fluentd",
                    "forward the journal of kv-agent.service instead (e.g. fluent-bit's "
                    "systemd input)")
    if handler_version is not None and handler_version.split(".")[0] == "1":
        reader.warn(prefix.replace("settings.", "typeHandlerVersion"),
                    "version 1 wrote the leaf and its key without the issuers; kv-agent's file "
                    "holds the whole chain, as versions 2 and 3 write",
                    "nothing to do for a server (the leaf still comes first)")
    interval = _interval(reader, secrets.get("pollingIntervalInS"), here + "pollingIntervalInS")
    store = _store(reader, secrets.get("certificateStoreLocation"),
                   here + "certificateStoreLocation", DEFAULT_STORE)
    sync = _flag(reader, secrets, "requireInitialSync", here)
    acl_enabled = _flag(reader, secrets, "aclEnabled", here)
    certificates = _certificates(reader, secrets.get("observedCertificates"), here, store,
                                 acl_enabled is not False)
    client_id = _string(reader, auth, "msiClientId", prefix + "authenticationSettings.")
    if client_id is not None and not GUID_RE.fullmatch(client_id):
        reader.problem(prefix + "authenticationSettings.msiClientId",
                       f"'{escape(client_id, 60)}' is not a client id (a GUID)",
                       "give the user-assigned identity's client id")
    endpoint = _string(reader, auth, "msiEndpoint", prefix + "authenticationSettings.")
    if endpoint is not None:
        _check_url(reader, endpoint, prefix + "authenticationSettings.msiEndpoint",
                   ("http", "https"))
    return ExtensionSettings(form, handler_version, interval, certificates, client_id, endpoint,
                             sync, tuple(reader.warnings))


def _unknown(reader: _Reader, data: Mapping[str, Any], known: Sequence[str], prefix: str) -> None:
    for key in data:
        if key in known:
            continue
        if key in WINDOWS_KEYS:
            reader.warn(prefix + key, "a setting of the Windows extension (KeyVaultForWindows), "
                        "which the Linux extension ignores", "nothing to do")
        else:
            # A did-you-mean only for lines that will be shown: difflib is slow on many keys.
            hint = suggest(key, known) if len(reader.warnings) < MAX_PROBLEMS else ""
            reader.warn(prefix + escape(str(key), 60), "not a setting of the Key Vault VM "
                        "extension for Linux, and kv-agent has no equivalent",
                        hint if hint.startswith("did you mean") else
                        "check what it was meant to do and set that up by hand")


def _is_expression(value: Any) -> bool:
    """An ARM template expression (``[parameters('x')]``), resolved only at deployment."""
    return isinstance(value, str) and value.startswith("[") and not value.startswith("[[") \
        and value.endswith("]")


def _expression(reader: _Reader, key: str, value: Any) -> bool:
    if _is_expression(value):
        reader.problem(key, f"'{escape(value, 60)}' is an ARM template expression, resolved only "
                       "at deployment", "pass the deployed settings: az vm extension show "
                       "--name KeyVaultForLinux --resource-group RG --vm-name VM")
        return True
    return False


def _string(reader: _Reader, data: Mapping[str, Any], key: str, prefix: str) -> Optional[str]:
    value = data.get(key)
    if value is None or _expression(reader, prefix + key, value):
        return None
    if not isinstance(value, str) or not value.strip():
        reader.problem(prefix + key, "must be a non-empty string", f"write \"{key}\": \"...\"")
        return None
    return value.strip()


def _flag(reader: _Reader, data: Mapping[str, Any], key: str, prefix: str) -> Optional[bool]:
    value = data.get(key)
    if value is None or _expression(reader, prefix + key, value):
        return None
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if not isinstance(value, bool):
        reader.problem(prefix + key, f"'{escape(str(value), 40)}' is not true or false",
                       f"write \"{key}\": true or false")
        return None
    return value


def _interval(reader: _Reader, value: Any, key: str) -> Optional[int]:
    """``pollingIntervalInS``: whole seconds, documented as a string ("3600")."""
    if value is None or _expression(reader, key, value):
        return None
    text = value.strip() if isinstance(value, str) else value
    if isinstance(text, str) and text.isascii() and text.isdigit() and len(text) <= 10:
        text = int(text)
    if isinstance(text, bool) or not isinstance(text, int) or text <= 0:
        reader.problem(key, f"'{escape(str(value), 40)}' is not a whole number of seconds",
                       "write e.g. \"pollingIntervalInS\": \"3600\"")
        return None
    return text


def _store(reader: _Reader, value: Any, key: str, default: str) -> str:
    """A certificate store location: an absolute directory. Version 1's examples
    gave "LocalMachine", a Windows store name; the Linux extension then used its
    default directory (inferred: it is documented only as a disk path since 2.0)."""
    if value is None or _expression(reader, key, value):
        return default
    if not isinstance(value, str) or not value.strip():
        reader.problem(key, "must be a directory path", f"write e.g. \"{DEFAULT_STORE}\"")
        return default
    text = value.strip()
    if not text.startswith("/"):
        reader.warn(key, f"'{escape(text, 60)}' is not a directory (a Windows store name); the "
                    f"extension used {default}", "nothing to do")
        return default
    normal = posixpath.normpath(text)
    if ".." in text.split("/") or not text.isprintable() or \
            len(normal.encode("utf-8", "replace")) > MAX_PATH_BYTES:
        reader.problem(key, f"'{escape(text, 60)}' is not a plain absolute path",
                       "write the directory without .. or control characters")
        return default
    return "/" + normal.lstrip("/") if normal != "/" else normal


def _certificates(reader: _Reader, value: Any, prefix: str, store: str,
                  acl_enabled: bool) -> Tuple[ObservedCertificate, ...]:
    key = prefix + "observedCertificates"
    if value is None or _expression(reader, key, value):
        reader.warn(key, "no certificates are observed", "the manifest fetches nothing; add "
                    "entries for the secrets consumers need")
        return ()
    if isinstance(value, str):  # a single URL where a list belongs: seen in hand-written settings
        value = [value]
    if not isinstance(value, list):
        reader.problem(key, "must be a list of URLs or of objects with url",
                       "write \"observedCertificates\": [\"https://VAULT.vault.azure.net/secrets/"
                       "NAME\"]")
        return ()
    if not value:
        reader.warn(key, "no certificates are observed", "the manifest fetches nothing")
    certificates = []
    for index, item in enumerate(value):
        here = f"{key}[{index}]"
        certificate = _certificate(reader, item, here, store, acl_enabled)
        if certificate is not None:
            certificates.append(certificate)
    return tuple(certificates)


def _certificate(reader: _Reader, item: Any, key: str, store: str,
                 acl_enabled: bool) -> Optional[ObservedCertificate]:
    """One observed certificate: a URL (versions 1 and 2) or an object (version 3)."""
    if isinstance(item, str):
        item = {"url": item}
        inner = key
    elif isinstance(item, dict):
        _unknown(reader, item, CERTIFICATE_KEYS, key + ".")
        inner = key + ".url"
    else:
        reader.problem(key, "must be a URL or an object with url",
                       "write \"https://VAULT.vault.azure.net/secrets/NAME\"")
        return None
    url = item.get("url")
    if url is None:
        reader.problem(key, "has no url", "add \"url\": \"https://VAULT.vault.azure.net/secrets/"
                       "NAME\"")
        return None
    if _expression(reader, inner, url):
        return None
    parsed = _secret_url(reader, url, inner)
    if parsed is None:
        return None
    vault_url, label, name, version = parsed
    here_store = _store(reader, item.get("certificateStoreLocation"),
                        key + ".certificateStoreLocation", store)
    link = item.get("customSymbolicLinkName")
    if link is not None and not _expression(reader, key + ".customSymbolicLinkName", link):
        link = _link_name(reader, link, key + ".customSymbolicLinkName")
    acls = _acls(reader, item.get("acls"), key + ".acls")
    if acls and not acl_enabled:
        reader.warn(key + ".acls", "aclEnabled is false, so the extension applied no ACL",
                    "the file stays root's; give owner: or group: in the manifest if a "
                    "service needs it")
        acls = ()
    return ObservedCertificate(key, url, vault_url, label, name, version, here_store,
                               link if isinstance(link, str) else f"{label}.{name}", acls)


def _secret_url(reader: _Reader, url: Any, key: str
                ) -> Optional[Tuple[str, str, str, Optional[str]]]:
    """(vault URL, vault label, name, version) of ``https://VAULT.vault.azure.net/secrets/
    NAME[/VERSION]``; a /certificates/ URL is read as the certificate's secret, with a warning
    (the extension needs /secrets/: only that path returns the private key)."""
    split = _check_url(reader, url, key, ("https",))
    if split is None:
        return None
    parts = [part for part in split.path.split("/") if part]
    if len(parts) not in (2, 3) or parts[0] not in ("secrets", "certificates"):
        reader.problem(key, f"'{escape(url, 80)}' is not a secret's URL",
                       "write https://VAULT.vault.azure.net/secrets/NAME[/VERSION]")
        return None
    name, version = parts[1], parts[2] if len(parts) == 3 else None
    if not SECRET_NAME_RE.fullmatch(name):
        reader.problem(key, f"'{escape(name, 60)}' is not a Key Vault name",
                       "1-127 letters, digits and -")
        return None
    if version is not None and not VERSION_RE.fullmatch(version):
        reader.problem(key, f"'{escape(version, 60)}' is not a Key Vault version",
                       "32 hexadecimal characters, or none to follow the latest")
        return None
    if parts[0] == "certificates":
        reader.warn(key, "a /certificates/ URL: the extension reads certificates through "
                    "/secrets/ (only it returns the private key)", "kv-agent reads the secret "
                    f"of the same name, {name}; fix the URL in the settings you keep")
    try:
        vault_url = parse_vault_url(f"{split.scheme}://{split.netloc}")
    except ValueError as exc:
        reader.problem(key, f"the vault: {exc}", "write https://VAULT.vault.azure.net/secrets/"
                       "NAME")
        return None
    # The first DNS label, in the case written: the extension names its file
    # after the URL (inferred; the documentation's example keeps "exampleVault").
    label = split.netloc.rsplit(":", 1)[0] if split.port else split.netloc
    label = label.split(".")[0]
    return vault_url, label, name, version


def _check_url(reader: _Reader, url: Any, key: str,
               schemes: Tuple[str, ...]) -> Optional[SplitResult]:
    if not isinstance(url, str) or not url.isprintable() or len(url) > 2048:
        reader.problem(key, "must be a URL on one line", "write https://VAULT.vault.azure.net/"
                       "secrets/NAME")
        return None
    try:
        split = urlsplit(url.strip())
        split.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        split = None
    if split is None or split.scheme not in schemes or not split.hostname or split.query \
            or split.fragment or "@" in split.netloc:
        reader.problem(key, f"'{escape(url, 80)}' is not a {' or '.join(schemes)} URL",
                       "write it as the extension's documentation shows")
        return None
    return split


def _link_name(reader: _Reader, value: Any, key: str) -> Optional[str]:
    """customSymbolicLinkName: one file name in the store directory."""
    if not isinstance(value, str) or not value or value in (".", "..") or "/" in value \
            or not value.isprintable() or len(value.encode("utf-8", "replace")) > MAX_NAME_BYTES:
        reader.problem(key, f"'{escape(str(value), 60)}' is not a file name",
                       "write one name, without /, e.g. \"app1Cert1\"")
        return None
    return value


def _acls(reader: _Reader, value: Any, key: str) -> Tuple[Acl, ...]:
    if value is None or _expression(reader, key, value):
        return ()
    if not isinstance(value, list):
        reader.problem(key, "must be a list of {user, group}",
                       "write \"acls\": [{\"user\": \"app1\", \"group\": \"appGroup1\"}]")
        return ()
    acls = []
    for index, item in enumerate(value):
        here = f"{key}[{index}]"
        if not isinstance(item, dict):
            reader.problem(here, "must be an object with user and/or group",
                           "write {\"user\": \"app1\"}")
            continue
        _unknown(reader, item, ACL_KEYS, here + ".")
        names: Dict[str, Optional[str]] = {}
        for field in ACL_KEYS:
            names[field] = _account(reader, item.get(field), f"{here}.{field}")
        if names["user"] or names["group"]:
            acls.append(Acl(names["user"], names["group"]))
    return tuple(acls)


def _account(reader: _Reader, value: Any, key: str) -> Optional[str]:
    if value is None or _expression(reader, key, value):
        return None
    kind = key.rsplit(".", 1)[-1]
    if not isinstance(value, str) or len(value) > MAX_ACCOUNT_NAME_CHARS or \
            not ACCOUNT_NAME_RE.fullmatch(value):
        reader.problem(key, f"'{escape(str(value), 60)}' is not a {kind} name",
                       f"write the {kind}'s name, e.g. \"app1\"")
        return None
    return value

