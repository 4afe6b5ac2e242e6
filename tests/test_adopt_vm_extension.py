"""``kv-agent import vm-extension``: the Key Vault VM extension's settings as a manifest.

The settings documents are the public documentation's own examples, for each schema
version (placeholders filled with the values the same page gives as examples):

* version 3: https://learn.microsoft.com/azure/virtual-machines/extensions/key-vault-linux
  ("Azure CLI deployment", the settings.json example);
* version 2: the same page's revision for typeHandlerVersion 2.0 (the "Template deployment"
  resource, with the property table's values);
* version 1: the same page's 2019 revision for typeHandlerVersion 1.0 (MicrosoftDocs/azure-docs,
  articles/virtual-machines/extensions/key-vault-linux.md: "Property values").

Every imported manifest is checked with the manifest's own parser (users and groups taken
as existing), as ``kv-agent check`` would check it.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any, Dict, List, Tuple

import pytest
import yaml

from agent import cli
from agent.adopt import SettingsError, manifest_text, render_settings
from agent.base.errors import EXIT_CONFIG, EXIT_OK
from agent.manifest import Accounts, Manifest, parse_manifest
from agent.manifest.problems import MAX_PROBLEMS

STORE = "/var/lib/waagent/Microsoft.Azure.KeyVault.Store"
CLIENT_ID = "00001111-aaaa-2222-bbbb-3333cccc4444"

# Version 3, "Azure CLI deployment" (settings.json), <examplekv> as "examplekv", the
# client id as the schema's example "00001111-aaaa-2222-bbbb-3333cccc4444".
V3_SETTINGS: Dict[str, Any] = {
    "secretsManagementSettings": {
        "pollingIntervalInS": "3600",
        "linkOnRenewal": True,
        "aclEnabled": True,
        "observedCertificates": [
            {"url": "https://examplekv.vault.azure.net/secrets/mycertificate1",
             "certificateStoreLocation": STORE,
             "acls": [{"user": "app1", "group": "appGroup1"}, {"user": "service1"}]},
            {"url": "https://examplekv.vault.azure.net/secrets/mycertificate2",
             "certificateStoreLocation": STORE,
             "acls": [{"user": "app2"}]},
        ]},
    "authenticationSettings": {
        "msiEndpoint": "http://169.254.169.254/metadata/identity/oauth2/token",
        "msiClientId": CLIENT_ID,
    },
}

# Version 2, "Template deployment" and "Property values" of the 2.0 revision.
V2_RESOURCE: Dict[str, Any] = {
    "type": "Microsoft.Compute/virtualMachines/extensions",
    "name": "KeyVaultForLinux",
    "apiVersion": "2022-11-01",
    "location": "westeurope",
    "properties": {
        "publisher": "Microsoft.Azure.KeyVault",
        "type": "KeyVaultForLinux",
        "typeHandlerVersion": "2.0",
        "autoUpgradeMinorVersion": True,
        "enableAutomaticUpgrade": True,
        "settings": {
            "secretsManagementSettings": {
                "pollingIntervalInS": "3600",
                "certificateStoreName": "MY",
                "linkOnRenewal": False,
                "certificateStoreLocation": STORE,
                "requireInitialSync": True,
                "observedCertificates": [
                    "https://myvault.vault.azure.net/secrets/mycertificate",
                    "https://myvault.vault.azure.net/secrets/mycertificate2"]},
            "authenticationSettings": {
                "msiEndpoint": "http://169.254.169.254/metadata/identity",
                "msiClientId": "c7373ae5-91c2-4165-8ab6-7381d6e75619"}}},
}

# Version 1, "Property values" of the 2019 revision (a Windows store location in it).
V1_SETTINGS: Dict[str, Any] = {
    "secretsManagementSettings": {
        "pollingIntervalInS": "3600",
        "certificateStoreName": "MY",
        "linkOnRenewal": False,
        "certificateStoreLocation": "LocalMachine",
        "requireInitialSync": True,
        "observedCertificates": ["https://myvault.vault.azure.net/secrets/mycertificate"]},
}

ACCOUNTS = Accounts(user=lambda name: {"root": 0, "app1": 1001, "app2": 1002,
                                       "service1": 1003}.get(name),
                    group=lambda name: {"root": 0, "appGroup1": 2001}.get(name))


def imported(document: Any, source: str = "settings.json") -> Tuple[str, str, Tuple[str, ...]]:
    result = render_settings(json.dumps(document).encode(), source)
    return result.manifest, result.tmpfiles, result.warnings


def checked(text: str) -> Manifest:
    """The manifest as ``kv-agent check`` parses it, with the users and groups present."""
    return parse_manifest(text, "imported.yaml", accounts=ACCOUNTS, check_filesystem=False)


def problems(document: Any, raw: bytes = b"") -> List[str]:
    with pytest.raises(SettingsError) as caught:
        render_settings(raw or json.dumps(document).encode(), "settings.json")
    return list(caught.value.problems)


def test_version_3_example_becomes_one_certificate_entry_per_observed_certificate() -> None:
    """The documentation's version 3 settings give a valid manifest: one fullchain_key output
    per certificate, named as the extension's link, acls as owner, group and mode, the
    polling interval as refresh and the client id as the identity."""
    text, _, warnings = imported(V3_SETTINGS)
    manifest = checked(text)
    assert manifest.vault == "https://examplekv.vault.azure.net"
    assert manifest.refresh_interval_s == 3600.0
    assert (manifest.identity.selector, manifest.identity.value) == ("client_id", CLIENT_ID)
    first, second = manifest.secrets
    assert (first.name, first.transform, first.params.kinds) == (
        "mycertificate1", "certificate", ("fullchain_key",))
    assert first.paths == ("/run/secrets/examplekv.mycertificate1/examplekv.mycertificate1",)
    [output] = first.outputs.outputs
    assert (output.owner, output.group, output.mode) == ("app1", "appGroup1", 0o440)
    [output] = second.outputs.outputs
    assert (output.owner, output.group, output.mode) == ("app2", "root", 0o400)
    assert "observedCertificates[0]: https://examplekv.vault.azure.net/secrets/mycertificate1" \
        in text
    [acl_warning] = warnings  # two users, one file: service1 must read through the group
    assert "observedCertificates[0].acls" in acl_warning and "service1" in acl_warning
    assert "usermod -aG" in acl_warning


def test_the_output_ends_with_check_then_doctor_and_the_extensions_removal() -> None:
    """The last lines name kv-agent check, then kv-agent doctor, then az vm extension delete."""
    text, _, _ = imported(V3_SETTINGS)
    tail = text[text.index("# Next:"):]
    assert tail.index("kv-agent check") < tail.index("kv-agent doctor") < \
        tail.index("az vm extension delete --name KeyVaultForLinux")


def test_version_2_arm_resource_with_url_strings() -> None:
    """An ARM resource of version 2, observedCertificates as URL strings, gives the same
    entries; requireInitialSync is explained, certificateStoreName passes silently."""
    text, tmpfiles, warnings = imported(V2_RESOURCE, "template.json")
    manifest = checked(text)
    assert [entry.name for entry in manifest.secrets] == ["mycertificate", "mycertificate2"]
    assert manifest.secrets[1].paths == (
        "/run/secrets/myvault.mycertificate2/myvault.mycertificate2",)
    assert manifest.identity.value == "c7373ae5-91c2-4165-8ab6-7381d6e75619"
    assert "an ARM resource's properties.settings (typeHandlerVersion 2.0)" in text
    assert "requireInitialSync" in text and "After=kv-agent.service" in text
    assert warnings == ()
    assert f"L+ {STORE}/myvault.mycertificate - - - - " \
           "/run/secrets/myvault.mycertificate/myvault.mycertificate" in tmpfiles


def test_version_1_windows_store_name_falls_back_to_the_default_store() -> None:
    """Version 1's "LocalMachine" is no directory: the extension used its default store,
    and the import says so; version 1's missing chain is a warning with a resource."""
    text, tmpfiles, warnings = imported(V1_SETTINGS)
    checked(text)
    assert f"L+ {STORE}/myvault.mycertificate " in tmpfiles
    assert any("certificateStoreLocation: 'LocalMachine' is not a directory" in w
               for w in warnings)
    _, _, warnings = imported({"properties": {"type": "KeyVaultForLinux",
                                              "typeHandlerVersion": "1.0",
                                              "settings": V1_SETTINGS}})
    assert any("typeHandlerVersion: version 1 wrote the leaf" in w for w in warnings)


@pytest.mark.parametrize("wrap", [
    lambda s: {"name": "KeyVaultForLinux", "publisher": "Microsoft.Azure.KeyVault",
               "typePropertiesType": "KeyVaultForLinux", "typeHandlerVersion": "3.0",
               "settings": s},
    lambda s: {"runtimeSettings": [{"handlerSettings": {"publicSettings": s}}]},
    lambda s: {"properties": {"publisher": "Microsoft.Azure.KeyVault",
                              "type": "KeyVaultForLinux", "settings": s}},
], ids=["az vm extension show", "handler configuration", "ARM resource"])
def test_every_form_of_the_document_gives_the_same_entries(wrap: Any) -> None:
    """The settings inside az vm extension show's output, the handler's configuration or an
    ARM resource give the manifest the bare settings give."""
    bare = checked(imported(V3_SETTINGS)[0])
    assert checked(imported(wrap(V3_SETTINGS))[0]).secrets == bare.secrets


def test_no_certificates_is_an_empty_manifest_and_a_warning() -> None:
    """No observedCertificates: secrets: [] and a warning, exit 0."""
    for settings in ({"secretsManagementSettings": {"observedCertificates": []}},
                     {"secretsManagementSettings": {"pollingIntervalInS": "60"}}):
        text, tmpfiles, warnings = imported(settings)
        assert checked(text).secrets == ()
        assert any("no certificates are observed" in w for w in warnings)
        assert "L+" not in tmpfiles


def test_a_version_in_the_url_is_pinned_and_a_certificates_url_is_read_as_its_secret() -> None:
    """.../secrets/NAME/VERSION pins version:; a /certificates/ URL gives its secret, warned."""
    version = "0123456789abcdef0123456789abcdef"
    text, _, warnings = imported({"secretsManagementSettings": {"observedCertificates": [
        f"https://kv1.vault.azure.net:443/secrets/web/{version}/",
        "https://kv1.vault.azure.net/certificates/api"]}})
    web, api = checked(text).secrets
    assert web.sources[0].version == version and api.sources[0].version is None
    assert api.name == "api"
    assert any("/certificates/ URL" in w and "observedCertificates[1]" in w for w in warnings)


@pytest.mark.parametrize("host", ["contoso.vault.azure.cn", "contoso.vault.usgovcloudapi.net",
                                  "contoso.vault.microsoftazure.de"])
def test_a_sovereign_cloud_vault_is_kept(host: str) -> None:
    """A vault in China, US Government or Germany keeps its host; the file keeps its name."""
    text, _, _ = imported({"secretsManagementSettings": {"observedCertificates": [
        f"https://{host}/secrets/tls"]}})
    manifest = checked(text)
    assert manifest.vault == f"https://{host}"
    assert manifest.secrets[0].paths == ("/run/secrets/contoso.tls/contoso.tls",)


def test_two_vaults_give_each_entry_its_vault() -> None:
    """Certificates from two vaults: no top-level vault, one per entry."""
    text, _, _ = imported({"secretsManagementSettings": {"observedCertificates": [
        "https://One.vault.azure.net/secrets/a", "https://two.vault.azure.cn/secrets/a"]}})
    first, second = checked(text).secrets
    assert first.sources[0].vault == "https://one.vault.azure.net"
    assert second.sources[0].vault == "https://two.vault.azure.cn"
    assert first.paths == ("/run/secrets/One.a/One.a",)  # the vault label as written
    assert second.paths == ("/run/secrets/two.a/two.a",)


def test_identity_and_endpoints() -> None:
    """A user-assigned identity is client_id; Azure Arc's endpoint is source: arc; another
    endpoint is a note and a warning naming KV_AGENT_IMDS_ENDPOINT with the token URL."""
    def with_auth(auth: Dict[str, str]) -> Tuple[Manifest, str, Tuple[str, ...]]:
        text, _, warnings = imported({"secretsManagementSettings": {"observedCertificates": [
            "https://kv.vault.azure.net/secrets/a"]}, "authenticationSettings": auth})
        return checked(text), text, warnings

    manifest, text, warnings = with_auth({"msiClientId": CLIENT_ID})
    assert manifest.identity.value == CLIENT_ID and warnings == ()
    manifest, _, _ = with_auth({"msiEndpoint": "http://localhost:40342/metadata/identity"})
    assert manifest.identity.source == "arc" and manifest.identity.selector is None
    manifest, text, warnings = with_auth({"msiEndpoint": "http://10.0.0.9/metadata/identity"})
    assert manifest.identity.source == "auto"
    line = "Environment=KV_AGENT_IMDS_ENDPOINT=http://10.0.0.9/metadata/identity/oauth2/token"
    assert line in text
    assert any("KV_AGENT_IMDS_ENDPOINT" in w and "msiEndpoint" in w for w in warnings)


def test_custom_store_and_symbolic_link_name() -> None:
    """customSymbolicLinkName names the file; its store is where the link goes; a space in a
    path is escaped in the tmpfiles.d line."""
    text, tmpfiles, _ = imported({"secretsManagementSettings": {"observedCertificates": [
        {"url": "https://kv.vault.azure.net/secrets/app1", "customSymbolicLinkName": "app1Cert1",
         "certificateStoreLocation": "/var/lib/waagent/Microsoft.Azure.KeyVault/app 1"}]}})
    [entry] = checked(text).secrets
    assert entry.paths == ("/run/secrets/kv.app1/app1Cert1",)
    [line] = [line for line in tmpfiles.splitlines() if line.startswith("L+")]
    assert line == ("L+ /var/lib/waagent/Microsoft.Azure.KeyVault/app\\x201/app1Cert1 - - - - "
                    "/run/secrets/kv.app1/app1Cert1")
    assert len(line.split()) == 7


def test_one_certificate_in_two_stores_gets_two_directories() -> None:
    """The same certificate observed twice gets kv.web and kv.web-2, each a set of its own."""
    text, _, _ = imported({"secretsManagementSettings": {"observedCertificates": [
        {"url": "https://kv.vault.azure.net/secrets/web", "certificateStoreLocation": "/a"},
        {"url": "https://kv.vault.azure.net/secrets/web", "certificateStoreLocation": "/b"}]}})
    assert [e.paths for e in checked(text).secrets] == [
        ("/run/secrets/kv.web/kv.web",), ("/run/secrets/kv.web-2/kv.web",)]


def test_a_percent_sign_is_doubled_in_both_fields_of_the_tmpfiles_line() -> None:
    """tmpfiles.d reads %h as a specifier in the path and in the argument: % is written %%."""
    document = {"secretsManagementSettings": {"observedCertificates": [
        {"url": "https://kv.vault.azure.net/secrets/a", "customSymbolicLinkName": "a%h"}]}}
    result = render_settings(json.dumps(document).encode(), "s.json", "/run/s%n")
    line = result.tmpfiles.splitlines()[-1]
    assert line == f"L+ {STORE}/a%%h - - - - /run/s%%n/kv.a/a%%h"


def test_several_users_and_no_group_are_told_to_create_a_group() -> None:
    """No group in the acls: the file is 0400, so the fix is a new group, then group: and
    mode "0440"; not "read it through group <a user>", which nothing sets up."""
    _, _, warnings = imported({"secretsManagementSettings": {"observedCertificates": [
        {"url": "https://kv.vault.azure.net/secrets/a",
         "acls": [{"user": "app1"}, {"user": "app2"}]}]}})
    [warning] = [w for w in warnings if ".acls" in w]
    assert "create a group for them" in warning and 'mode: "0440"' in warning
    assert "through the group" not in warning


def test_a_suffixed_directory_never_takes_a_real_certificates_name() -> None:
    """kv/web in two stores, then kv/web-2: kv.web-2 is the second web's, so web-2 moves on."""
    text, tmpfiles, _ = imported({"secretsManagementSettings": {"observedCertificates": [
        {"url": "https://kv.vault.azure.net/secrets/web", "certificateStoreLocation": "/a"},
        {"url": "https://kv.vault.azure.net/secrets/web", "certificateStoreLocation": "/b"},
        {"url": "https://kv.vault.azure.net/secrets/web-2", "certificateStoreLocation": "/a"}]}})
    assert [e.paths for e in checked(text).secrets] == [
        ("/run/secrets/kv.web/kv.web",), ("/run/secrets/kv.web-2/kv.web",),
        ("/run/secrets/kv.web-2-2/kv.web-2",)]
    assert tmpfiles.count("\nL+ ") == 3


def test_the_same_certificate_observed_twice_is_one_entry_and_one_link_with_a_warning() -> None:
    """One URL twice in one store: the extension wrote one file, so one entry, one L+ line."""
    url = "https://kv.vault.azure.net/secrets/web"
    text, tmpfiles, warnings = imported({"secretsManagementSettings": {
        "observedCertificates": [url, {"url": url, "acls": [{"user": "app1"}]}]}})
    assert [e.paths for e in checked(text).secrets] == [("/run/secrets/kv.web/kv.web",)]
    assert tmpfiles.count("\nL+ ") == 1
    assert any("observedCertificates[1]: the extension's file" in w and
               "observedCertificates[0]" in w for w in warnings), warnings


@pytest.mark.parametrize("value", ["cert\U0001F600", "a\nb", "a b#c: d", "null", "-", "~",
                                   "x\u2028y", "\"'", "- [x]", "NULL", "yes"])
def test_every_scalar_reads_back_as_written(value: str) -> None:
    """A name or path, whatever its characters, is one YAML line that reads back as itself:
    JSON's surrogate pairs for an emoji, YAML refuses."""
    text = manifest_text._scalar(value)
    assert "\n" not in text and yaml.safe_load(f"key: {text}") == {"key": value}


@pytest.mark.parametrize("name", ["null", "-", "123", "yes", "0x1F", "1e3", "on", "Null"])
def test_a_secret_name_yaml_would_read_as_something_else_is_quoted(name: str) -> None:
    """Key Vault names are letters, digits and -: "null", "-" or "123" are names too."""
    version = "1" * 32  # hexadecimal, yet all digits: YAML's integer
    text, _, _ = imported({"secretsManagementSettings": {"observedCertificates": [
        f"https://kv.vault.azure.net/secrets/{name}/{version}"]},
        "authenticationSettings": {"msiClientId": CLIENT_ID}})
    [entry] = checked(text).secrets
    assert (entry.source.name, entry.source.version) == (name, version)


def test_a_link_name_and_a_directory_beyond_the_basic_plane_are_kept() -> None:
    """An emoji in customSymbolicLinkName and in --directory: the manifest holds them."""
    document = {"secretsManagementSettings": {"observedCertificates": [
        {"url": "https://kv.vault.azure.net/secrets/a",
         "customSymbolicLinkName": "c\U0001F600 1"}]}}
    result = render_settings(json.dumps(document).encode(), "s.json", "/run/s\U0001F600")
    manifest = checked(result.manifest)
    assert manifest.directory == "/run/s\U0001F600"
    assert manifest.secrets[0].paths == ("/run/s\U0001F600/kv.a/c\U0001F600 1",)


def test_settings_without_an_equivalent_are_warnings_naming_them() -> None:
    """Unknown keys, Windows keys, loggingSettings and disabled ACLs each give a warning naming
    the setting and what to do; the manifest is still made."""
    settings = {
        "loggingSettings": {"logger": "fluentd", "endpoint": "tcp://localhost:24224"},
        "colour": "blue",
        "secretsManagementSettings": {
            "aclEnabled": False, "pollingIntervalInSeconds": "60",
            "observedCertificates": [{"url": "https://kv.vault.azure.net/secrets/a",
                                      "keyExportable": True, "acls": [{"user": "app1"}]}]}}
    text, _, warnings = imported(settings)
    [entry] = checked(text).secrets
    assert entry.outputs.outputs[0].owner == "root"  # the ACLs were off
    said = "\n".join(warnings)
    for key in ("loggingSettings", ": colour:", "secretsManagementSettings."
                "pollingIntervalInSeconds", "observedCertificates[0].keyExportable",
                "observedCertificates[0].acls: aclEnabled is false"):
        assert key in said, key
    assert all(w.startswith("settings.json: ") and "; " in w for w in warnings)


def test_a_polling_interval_beyond_31_days_is_clamped_with_a_warning() -> None:
    """pollingIntervalInS above kv-agent's longest refresh becomes 744h, warned."""
    text, _, warnings = imported({"secretsManagementSettings": {
        "pollingIntervalInS": 40 * 86400, "observedCertificates": []}})
    assert checked(text).refresh_interval_s == 31 * 86400
    assert any("pollingIntervalInS" in w for w in warnings)


@pytest.mark.parametrize(("document", "key", "fix"), [
    ({"secretsManagementSettings": {"pollingIntervalInS": "hourly"}},
     "secretsManagementSettings.pollingIntervalInS", "3600"),
    ({"secretsManagementSettings": {"observedCertificates": "https://kv.vault.azure.net/"}},
     "observedCertificates[0]", "secrets/NAME"),
    ({"secretsManagementSettings": {"observedCertificates": [{"acls": []}]}},
     "observedCertificates[0]", "add \"url\""),
    ({"secretsManagementSettings": {"observedCertificates": ["http://kv.vault.azure.net/"
                                                             "secrets/a"]}},
     "observedCertificates[0]", "documentation"),
    ({"secretsManagementSettings": {"observedCertificates": [
        "[concat(parameters('vault'), '/secrets/a')]"]}},
     "observedCertificates[0]", "az vm extension show"),
    ({"secretsManagementSettings": {"observedCertificates": [
        {"url": "https://kv.vault.azure.net/secrets/a", "acls": [{"user": "a b"}]}]}},
     "observedCertificates[0].acls[0].user", "name"),
    ({"secretsManagementSettings": {"observedCertificates": [
        {"url": "https://kv.vault.azure.net/secrets/a", "customSymbolicLinkName": "../x"}]}},
     "observedCertificates[0].customSymbolicLinkName", "without /"),
    ({"secretsManagementSettings": {"requireInitialSync": "sometimes"}},
     "secretsManagementSettings.requireInitialSync", "true or false"),
    ({"secretsManagementSettings": []}, "secretsManagementSettings", "JSON object"),
    ({"authenticationSettings": {"msiClientId": "my-identity"}},
     "authenticationSettings.msiClientId", "client id"),
    ({"properties": {"type": "KeyVaultForWindows", "settings": {}}}, "properties.type",
     "Linux"),
    ([1, 2], "(top)", "settings object"),
    ({"settings": None}, "settings: is null", "extension's settings"),
    ({"properties": {"settings": None}}, "properties.settings: is null", "extension's settings"),
    ({"hello": "world"}, "(top)", "az vm extension show"),
])
def test_input_it_cannot_read_is_one_line_per_problem(document: Any, key: str, fix: str) -> None:
    """Each problem is one line naming the file, the key and the fix."""
    found = problems(document)
    assert any(line.startswith("settings.json: ") and key in line and fix in line
               for line in found), found
    assert all("\n" not in line for line in found)


def test_every_problem_is_reported_at_once() -> None:
    """Two bad certificates and a bad interval: three lines."""
    found = problems({"secretsManagementSettings": {"pollingIntervalInS": -5,
                                                    "observedCertificates": [3, "ftp://x/"]}})
    assert len(found) == 3


def test_problems_and_warnings_are_capped_as_a_manifests_are() -> None:
    """Thousands of bad certificates: MAX_PROBLEMS lines, then one counting the rest; the
    same for warnings (here, thousands of unknown keys)."""
    found = problems({"secretsManagementSettings": {"observedCertificates": [7] * 5000}})
    assert len(found) == MAX_PROBLEMS + 1
    assert found[-1] == f"settings.json: and {5000 - MAX_PROBLEMS} more problems; fix these first"
    _, _, warnings = imported({"secretsManagementSettings": {
        **{f"unknown{n}": 1 for n in range(5000)}, "observedCertificates": []}})
    assert len(warnings) == MAX_PROBLEMS + 1 and warnings[-1].endswith(" more warnings; fix "
                                                                       "these first")


def test_a_misspelt_setting_gets_a_did_you_mean() -> None:
    """pollingIntervalInSec is pollingIntervalInS mistyped: the warning says so."""
    _, _, warnings = imported({"secretsManagementSettings": {"pollingIntervalInSec": "60"}})
    assert any("pollingIntervalInSec" in w and "did you mean 'pollingIntervalInS'?" in w
               for w in warnings), warnings


def test_not_json_names_the_line() -> None:
    """A file that is not JSON says so, with the line."""
    [line] = problems(None, raw=b'{\n  "secretsManagementSettings": {,\n}')
    assert line.startswith("settings.json: line 2: not JSON")


def test_deeply_nested_json_is_one_problem_not_a_traceback(
        tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """100,000 nested lists would exhaust the parser's stack: exit 78, one line."""
    [line] = problems(None, raw=b"[" * 100_000)
    assert line.startswith("settings.json: (file): nested too deeply")
    deep = tmp_path / "deep.json"
    deep.write_bytes(b"[" * 100_000)
    code = cli.main(["import", "vm-extension", str(deep)], {})
    out, err = capsys.readouterr()
    assert code == EXIT_CONFIG and out == "" and len(err.splitlines()) == 1
    logging.getLogger().handlers.clear()


def test_the_cli_prints_the_manifest_and_warnings_and_writes_tmpfiles(
        tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """kv-agent import vm-extension: the manifest on stdout, warnings on stderr, exit 0;
    --tmpfiles writes the L+ lines to a new file."""
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps(V3_SETTINGS))
    links = tmp_path / "links.conf"
    code = cli.main(["import", "vm-extension", str(settings), "--tmpfiles", str(links)], {})
    out, err = capsys.readouterr()
    assert code == EXIT_OK
    checked(out)
    assert "kv-agent: warning: " in err and "observedCertificates[0].acls" in err
    assert links.read_text().count("\nL+ ") == 2
    assert cli.main(["import", "vm-extension", str(settings), "--tmpfiles", str(links)],
                    {}) != EXIT_OK  # never overwrites a file
    assert "--tmpfiles" in capsys.readouterr().err


def test_the_cli_exits_78_with_one_line_per_problem_and_no_traceback(
        tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """Bad types exit 78, each problem one error line naming the file and key; a missing
    file too; nothing on stdout, no traceback."""
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"secretsManagementSettings": {
        "pollingIntervalInS": True, "observedCertificates": [{"url": 7}]}}))
    for path, count in ((bad, 2), (tmp_path / "missing.json", 1)):
        code = cli.main(["import", "vm-extension", str(path)], {})
        out, err = capsys.readouterr()
        assert code == EXIT_CONFIG and out == ""
        lines = err.splitlines()
        assert len(lines) == count and "Traceback" not in err
        assert all(line.startswith(f"kv-agent: error: {path}: ") for line in lines)
    logging.getLogger().handlers.clear()


@pytest.mark.parametrize(("directory", "says"), [
    ("run/secrets", "'run/secrets' must be an absolute path"),
    ("/run/../etc", "'/run/../etc' must not contain '..'"),
    ("/", "'/' is not a secrets directory"),
])
def test_a_bad_directory_option_is_named_as_the_option_not_as_the_settings_file(
        tmp_path: Any, capsys: pytest.CaptureFixture[str], directory: str, says: str) -> None:
    """--directory is the operator's option, not a fault of the JSON file: a usage error
    (exit 2) naming --directory, before the file is read."""
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps(V3_SETTINGS))
    with pytest.raises(SystemExit) as exited:
        cli.main(["import", "vm-extension", str(settings), "--directory", directory], {})
    out, err = capsys.readouterr()
    assert exited.value.code == 2 and out == ""
    assert f"error: --directory: {says}" in err and str(settings) not in err
    with pytest.raises(ValueError, match=f"^--directory: {re.escape(says)}"):
        render_settings(json.dumps(V3_SETTINGS).encode(), "s.json", directory)
    logging.getLogger().handlers.clear()


def test_a_manifest_the_parser_refuses_is_reported_as_kv_agents_bug(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever the settings, the renderer's output must parse: if it ever does not, the
    error blames kv-agent, not the settings file."""
    import agent.adopt

    monkeypatch.setattr(agent.adopt, "render", lambda *_: manifest_text.ManifestText(
        "vault: 1\nsecrets: 2\n", "", ()))
    found = problems(V3_SETTINGS)
    assert found and all(line.startswith("kv-agent produced a manifest it refuses (a bug): ")
                         for line in found), found
