"""A migration from the Key Vault VM extension, end to end, against the emulator.

``kv-agent import vm-extension`` reads version 3 settings naming three certificates in the
emulator's vault (PKCS#12, PEM with its blocks shuffled, one pinned to a version, one with
``customSymbolicLinkName``), ``kv-agent check`` accepts the manifest it prints, and
``kv-agent once`` (as the user-assigned identity of ``msiClientId``) writes each file with
the bytes the extension would have written. Those are built here from the certificates
themselves, as the extension's documentation describes its file
(https://learn.microsoft.com/azure/virtual-machines/extensions/key-vault-linux, "Certificate
Installation on Linux"): the leaf, the intermediate, the root, then the private key (PKCS#8,
inferred), each PEM block ending in one newline. Last, the tmpfiles.d lines replace what the
extension left at its paths with links, and the old paths read the new files.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest
from certs import PEM, PKCS12, Pki, make_pki
from cryptography.hazmat.primitives import serialization

from agent.emulator import Emulator, IdentityConfig, UserAssignedIdentity

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent
IDENTITY = UserAssignedIdentity(
    client_id="3c2b1a09-8e7d-4c6b-9a58-473625140312",
    object_id="9a8b7c6d-1111-4222-8333-444455556666",
    msi_res_id=("/subscriptions/00000000-0000-0000-0000-000000000000/resourcegroups/kv-test"
                "/providers/Microsoft.ManagedIdentity/userAssignedIdentities/migrated"),
)
OTHER = UserAssignedIdentity(
    client_id="5e4d3c2b-aaaa-4bbb-8ccc-111122223333",
    object_id="7f6e5d4c-bbbb-4ccc-8ddd-444455556666",
    msi_res_id=("/subscriptions/00000000-0000-0000-0000-000000000000/resourcegroups/kv-test"
                "/providers/Microsoft.ManagedIdentity/userAssignedIdentities/other"),
)


@pytest.fixture(scope="module")
def emulator_identities() -> IdentityConfig:
    """A VM with two user-assigned identities and no system-assigned one: a token request
    that names neither is refused (IMDS cannot choose), so the files arrive only if
    msiClientId became identity.client_id."""
    return IdentityConfig(system_assigned=False, user_assigned=(IDENTITY, OTHER))


def extension_file(pki: Pki) -> bytes:
    """The extension's file for ``pki``: leaf, intermediate, root, then the PKCS#8 key."""
    certificates = b"".join(c.public_bytes(serialization.Encoding.PEM)
                            for c in (pki.leaf, pki.intermediate, pki.root))
    key = pki.key.private_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())
    return certificates + key


def run(*argv: str, env: Dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", *argv], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=60, check=False)


def a_service_account() -> pwd.struct_passwd:
    for name in ("daemon", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    pytest.skip("needs a daemon or nobody account")


def test_import_check_once_and_the_links_give_the_extensions_bytes(
        emulator: Emulator, shm_dir: Path, tmp_path: Path) -> None:
    """Imported settings pass check; once writes each certificate's file byte for byte as
    the extension did, owned as its acls said; the tmpfiles.d links make the extension's
    paths read those files."""
    if os.geteuid() != 0:
        pytest.skip("chowns files and writes a manifest root must own")
    pkis = {"web": make_pki("rsa", "web.example"), "api": make_pki("ec", "api.example"),
            "old": make_pki("rsa", "old.example")}
    emulator.set_secret("web", pkis["web"].pfx(), content_type=PKCS12)
    emulator.set_secret("api", pkis["api"].pem(order=[2, 0, 3, 1]), content_type=PEM)
    pinned = emulator.set_secret("old", pkis["old"].pfx(), content_type=PKCS12)
    emulator.set_secret("old", make_pki("rsa", "newer.example").pfx(), content_type=PKCS12)
    service = a_service_account()
    store = tmp_path / "waagent" / "Microsoft.Azure.KeyVault.Store"
    vault = emulator.vault_url
    settings = {
        "secretsManagementSettings": {
            "pollingIntervalInS": "3600", "requireInitialSync": True, "aclEnabled": True,
            "observedCertificates": [
                {"url": f"{vault}/secrets/web", "certificateStoreLocation": str(store),
                 "acls": [{"user": service.pw_name}]},
                {"url": f"{vault}/secrets/api", "certificateStoreLocation": str(store),
                 "customSymbolicLinkName": "apiCert"},
                {"url": f"{vault}/secrets/old/{pinned}", "certificateStoreLocation": str(store),
                 "acls": [{"group": "root"}]}]},
        "authenticationSettings": {"msiEndpoint": "http://169.254.169.254/metadata/identity",
                                   "msiClientId": IDENTITY.client_id},
    }
    (tmp_path / "settings.json").write_text(json.dumps(settings))
    env = {key: value for key, value in os.environ.items()
           if key.lower() not in ("http_proxy", "https_proxy", "all_proxy", "no_proxy")}
    env.update(KV_AGENT_IMDS_ENDPOINT=emulator.imds_endpoint,
               REQUESTS_CA_BUNDLE=emulator.ca_path)
    directory = shm_dir / "secrets"
    links = tmp_path / "links.conf"

    imported = run("import", "vm-extension", str(tmp_path / "settings.json"), "--directory",
                   str(directory), "--tmpfiles", str(links), env=env)
    assert imported.returncode == 0, imported.stderr
    assert imported.stderr == ""  # nothing without an equivalent in these settings
    manifest = tmp_path / "manifest.yaml"
    manifest.write_text(imported.stdout)
    os.chmod(manifest, 0o600)
    checked = run("check", "--manifest", str(manifest), env=env)
    assert checked.returncode == 0, checked.stderr
    assert "OK: 3 secrets" in checked.stdout
    once = run("once", "--manifest", str(manifest), env=env)
    assert once.returncode == 0, once.stderr

    label = vault.split("//", 1)[1].split(".")[0]  # the vault URL's first label: 127
    files = {"web": directory / f"{label}.web" / f"{label}.web",
             "api": directory / f"{label}.api" / "apiCert",
             "old": directory / f"{label}.old" / f"{label}.old"}
    for name, path in files.items():
        assert path.read_bytes() == extension_file(pkis[name]), name
    owners = {name: (path.stat().st_uid, path.stat().st_gid, stat.S_IMODE(path.stat().st_mode))
              for name, path in files.items()}
    assert owners == {"web": (service.pw_uid, 0, 0o400), "api": (0, 0, 0o400),
                      "old": (0, 0, 0o440)}

    # What the extension left behind: its links and versioned files, and a directory.
    store.mkdir(parents=True)
    old_paths: List[Path] = [store / f"{label}.web", store / "apiCert", store / f"{label}.old"]
    for path in old_paths:
        (store / (path.name + ".0123.PEM")).write_bytes(b"the extension's old file\n")
        path.symlink_to(store / (path.name + ".0123.PEM"))
    lines = [line for line in links.read_text().splitlines() if line.startswith("L+ ")]
    assert [line.split()[1] for line in lines] == [str(path) for path in old_paths]
    tmpfiles = shutil.which("systemd-tmpfiles")
    if tmpfiles is not None:
        applied = subprocess.run([tmpfiles, "--create", str(links)], capture_output=True,
                                 text=True, timeout=30, check=False)
        assert applied.returncode == 0, applied.stderr
    else:  # as tmpfiles.d(5) says L+ does: replace what is there with the link
        for line in lines:
            fields = line.split()
            Path(fields[1]).unlink()
            Path(fields[1]).symlink_to(fields[6])
    for name, path in zip(files, old_paths):
        assert path.is_symlink() and path.read_bytes() == extension_file(pkis[name]), name


def test_the_import_of_settings_it_cannot_read_exits_78_naming_the_key(
        tmp_path: Path) -> None:
    """The real command exits 78 with one error line per problem and no traceback."""
    bad = tmp_path / "settings.json"
    bad.write_text(json.dumps({"secretsManagementSettings": {
        "observedCertificates": [{"url": "https://kv.vault.azure.net/keys/k"}]}}))
    done = run("import", "vm-extension", str(bad), env=dict(os.environ))
    assert done.returncode == 78 and done.stdout == ""
    assert done.stderr.splitlines() == [
        f"kv-agent: error: {bad}: secretsManagementSettings.observedCertificates[0].url: "
        "'https://kv.vault.azure.net/keys/k' is not a secret's URL; write "
        "https://VAULT.vault.azure.net/secrets/NAME[/VERSION]"]


