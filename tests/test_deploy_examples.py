"""The deployment examples in docs/deploy, checked by parsing only.

cloud-init.yaml is also booted, for real, by tests/system/test_nspawn_cloudinit.py
on Debian 12 and 13; here it is held to its shape: a cloud-config with the keys
the recipe relies on, a manifest kv-agent's own parser accepts, and its steps in
the order that makes them work. vmss.bicep is NEVER DEPLOYED (no Azure
subscription here): a light structural reading checks its resources, the role
it grants and where, and that its custom data is the recipe with placeholders
the recipe really has. There is no Bicep compiler here either; `az bicep
build` is the check this cannot replace.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Dict, List

import pytest
import yaml

from agent.base.errors import ManifestError
from agent.manifest import Accounts, parse_manifest

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "docs" / "deploy"
RECIPE = DEPLOY / "cloud-init.yaml"
BICEP = DEPLOY / "vmss.bicep"
UNIT = REPO / "packaging" / "debian" / "kv-agent.service"
MANIFEST = "/etc/kv-agent/manifest.yaml"
CONSUMER = "myapp.service"
DROP_IN = f"/etc/systemd/system/{CONSUMER}.d/10-kv-agent.conf"
# Built-in role "Key Vault Secrets User" (MicrosoftDocs/azure-docs,
# articles/role-based-access-control/built-in-roles/security.md).
KEY_VAULT_SECRETS_USER = "4633458b-17de-408a-b874-0445c86b69e6"


def recipe() -> Dict[str, Any]:
    return dict(yaml.safe_load(RECIPE.read_text(encoding="utf-8")))


def written(path: str) -> Dict[str, Any]:
    """The recipe's write_files entry for ``path``."""
    entries = [entry for entry in recipe()["write_files"] if entry["path"] == path]
    assert len(entries) == 1, f"{RECIPE.name}: write_files has {len(entries)} entries for {path}"
    return dict(entries[0])


def fake_accounts() -> Accounts:
    return Accounts(user=lambda name: 1000, group=lambda name: 1000)


# -- cloud-init.yaml ----------------------------------------------------------------


def test_the_recipe_is_a_cloud_config_with_the_keys_it_relies_on() -> None:
    """The recipe starts with #cloud-config (cloud-init ignores user data without it),
    updates the package lists, keeps the image's default user and adds the consumer's."""
    text = RECIPE.read_text(encoding="utf-8")
    assert text.startswith("#cloud-config\n")
    config = recipe()
    assert {"package_update", "packages", "users", "write_files", "runcmd"} <= set(config)
    assert config["package_update"] is True and "curl" in config["packages"]
    assert config["users"][0] == "default", "without `default` the image's first user is not made"
    [myapp] = [user for user in config["users"] if isinstance(user, dict)]
    assert myapp["name"] == "myapp" and myapp["system"] is True


def test_the_recipes_manifest_passes_the_manifest_parser() -> None:
    """The manifest the recipe writes is valid, at the unit's --manifest path, root:root
    0600 and deferred until after packages and users; its file belongs to the
    user the consumer runs as."""
    entry = written(MANIFEST)
    assert (entry["owner"], entry["permissions"], entry["defer"]) == ("root:root", "0600", True)
    assert f"--manifest {MANIFEST} " in UNIT.read_text(encoding="utf-8")
    parsed = parse_manifest(entry["content"], f"{RECIPE.name}: {MANIFEST}",
                            accounts=fake_accounts(), check_filesystem=False)
    [secret] = parsed.secrets
    assert secret.primary.path == "/run/secrets/db-password" and secret.primary.owner == "myapp"
    assert secret.on_change == ("systemctl", "try-restart", CONSUMER)
    consumer = written(f"/etc/systemd/system/{CONSUMER}")["content"]
    assert "User=myapp\n" in consumer and secret.primary.path in consumer


def test_the_recipes_manifest_refusal_is_seen() -> None:
    """A manifest the parser refuses fails this file's check (so the check above can fail)."""
    broken = written(MANIFEST)["content"].replace('mode: "0400"', "mode: 0400")
    with pytest.raises(ManifestError) as refused:
        parse_manifest(broken, "broken", accounts=fake_accounts(), check_filesystem=False)
    assert "mode" in " ".join(refused.value.problems), refused.value.problems


def test_the_consumer_is_ordered_after_the_agent_without_requiring_it() -> None:
    """The consumer's drop-in orders it after kv-agent (whose start ends at READY=1),
    pulls it in with Wants= (Requires= would restart it with every agent restart)
    and refuses to start without its file."""
    drop_in = written(DROP_IN)["content"]
    lines = drop_in.splitlines()
    assert lines[0] == "[Unit]"
    assert {"Wants=kv-agent.service", "After=kv-agent.service",
            "AssertPathExists=/run/secrets/db-password"} <= set(lines)
    assert not any(line.startswith(("Requires=", "BindsTo=")) for line in lines)


def _runcmd_index(steps: List[Any], wanted: List[str]) -> int:
    for index, step in enumerate(steps):
        if step == wanted:
            return index
    raise AssertionError(f"{RECIPE.name}: runcmd has no step {wanted}")


def test_runcmd_installs_checks_then_starts_the_agent_before_the_consumer() -> None:
    """runcmd stops at the first failure, installs the checked .deb keeping the
    recipe's manifest, checks the manifest, starts kv-agent and only then the consumer."""
    steps = recipe()["runcmd"]
    assert steps[0] == "set -eu"
    [install] = [index for index, step in enumerate(steps)
                 if isinstance(step, list) and "kv-agent-install" in step]
    script, url, sha256 = steps[install][2], steps[install][4], steps[install][5]
    assert "sha256sum --check" in script and "--force-confold" in script
    assert re.fullmatch(r"https://\S+\.deb", url) and re.fullmatch(r"[0-9a-f]{64}", sha256)
    check = _runcmd_index(steps, ["kv-agent", "check"])
    agent = _runcmd_index(steps, ["systemctl", "enable", "--now", "kv-agent.service"])
    consumer = _runcmd_index(steps, ["systemctl", "enable", "--now", CONSUMER])
    assert install < check < agent < consumer


# -- vmss.bicep (parsing only, never deployed) ----------------------------------------


def _strip_bicep(text: str) -> str:
    """The Bicep source with comments and string contents removed (the quotes kept),
    for counting brackets."""
    # One pass, left to right: a // inside a string ('https://...') is not a
    # comment, and an apostrophe inside a comment opens no string.
    return re.sub(r"'(?:[^'\\\n]|\\.)*'|//[^\n]*",
                  lambda match: "''" if match.group(0).startswith("'") else "", text)


def bicep_problems(text: str) -> List[str]:
    """What a light structural reading of Bicep finds wrong: unbalanced brackets
    and resource declarations that are not ``resource NAME 'TYPE@VERSION' [existing] = {``."""
    problems = []
    stripped = _strip_bicep(text)
    pairs = {"}": "{", "]": "[", ")": "("}
    stack: List[str] = []
    for char in stripped:
        if char in "{[(":
            stack.append(char)
        elif char in pairs:
            if not stack or stack.pop() != pairs[char]:
                problems.append(f"unbalanced {char!r}")
                break
    if stack:
        problems.append(f"unclosed {stack[-1]!r}")
    for line in text.splitlines():
        if line.startswith("resource ") and not re.fullmatch(
                r"resource \w+ '[\w.]+/[\w./]+@\d{4}-\d\d-\d\d(-preview)?'( existing)? = \{",
                line):
            problems.append(f"not a resource declaration: {line}")
    return problems


def bicep_resources(text: str) -> Dict[str, str]:
    """symbolic name -> the resource's body, braces included."""
    resources = {}
    for match in re.finditer(r"^resource (\w+) '([^']+)'[^\n]*= \{$", text, re.M):
        depth, end = 0, match.end() - 1
        for end in range(match.end() - 1, len(text)):
            depth += {"{": 1, "}": -1}.get(text[end], 0)
            if depth == 0:
                break
        resources[match.group(1)] = match.group(2) + "\n" + text[match.end() - 1:end + 1]
    return resources


def test_the_bicep_reader_sees_a_broken_template() -> None:
    """The structural reading refuses an unclosed brace and a malformed resource line."""
    assert bicep_problems("resource x 'Microsoft.Compute/virtualMachineScaleSets@2023-09-01' = {\n")
    assert bicep_problems("resource x 'virtualMachineScaleSets' = {\n}\n")
    assert not bicep_problems(BICEP.read_text(encoding="utf-8"))


def test_the_scale_set_grants_the_secrets_user_role_on_the_vault_before_it_boots() -> None:
    """vmss.bicep (parsing only: it is never deployed here) gives the scale set a
    user-assigned identity, grants that identity "Key Vault Secrets User" on the
    vault alone, and creates the scale set after the grant."""
    text = BICEP.read_text(encoding="utf-8")
    assert "NOT DEPLOYED" in text and "parsing only" in text
    resources = bicep_resources(text)
    assert set(resources) == {"vault", "identity", "secretsUser", "scaleSet"}, set(resources)
    assert resources["vault"].startswith("Microsoft.KeyVault/vaults@")
    grant = resources["secretsUser"]
    assert grant.startswith("Microsoft.Authorization/roleAssignments@")
    assert "scope: vault\n" in grant and "roleDefinitionId: keyVaultSecretsUser\n" in grant
    assert "principalId: identity.properties.principalId\n" in grant
    assert re.search(rf"var keyVaultSecretsUser = subscriptionResourceId\("
                     rf"'Microsoft.Authorization/roleDefinitions', '{KEY_VAULT_SECRETS_USER}'\)",
                     text)
    scale_set = resources["scaleSet"]
    assert scale_set.startswith("Microsoft.Compute/virtualMachineScaleSets@")
    assert re.search(r"dependsOn: \[\s*secretsUser\s*\]", scale_set)
    assert re.search(r"type: 'UserAssigned'\s*userAssignedIdentities: \{\s*'\$\{identity\.id\}'",
                     scale_set)


def test_the_scale_sets_custom_data_is_the_recipe_filled_in() -> None:
    """customData is base64 of cloud-init.yaml with replace() calls whose
    placeholders each occur exactly once in the recipe, so the template cannot
    silently stop filling in the vault, the package URL or its SHA-256."""
    text = BICEP.read_text(encoding="utf-8")
    assert "var recipe = loadTextContent('cloud-init.yaml')" in text
    assert "customData: base64(customData)" in text
    placeholders = re.findall(r"replace\(\w+, '([^']+)', ", text)
    assert len(placeholders) == 3, placeholders
    recipe_text = RECIPE.read_text(encoding="utf-8")
    for placeholder in placeholders:
        assert recipe_text.count(placeholder) == 1, placeholder
    parameters = set(re.findall(r"^param (\w+) ", text, re.M))
    assert {"vaultName", "subnetId", "packageUrl", "packageSha256"} <= parameters
