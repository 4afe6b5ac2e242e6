"""The manifest's ``credential:`` (issue 19): on plain and template entries and on each
certificate output; no file without ``path:``; every refusal with its line, key and fix."""

from __future__ import annotations

from typing import List

import pytest
from test_manifest import ACCOUNTS, parse

from agent.manifest import Manifest, landing_directories, parse_manifest
from agent.pipeline.credentials import Grant

HEAD = "vault: https://kv.vault.azure.net\nsecrets:\n"


def load(body: str) -> Manifest:
    return parse_manifest(HEAD + body, "m.yaml", accounts=ACCOUNTS, check_filesystem=False)


def problems(body: str) -> List[str]:
    return parse(HEAD + body)


def test_a_credential_alone_writes_no_file_and_takes_the_entry_name_as_id() -> None:
    """credential: without path: is no file at all; id defaults to the name; key is its label."""
    manifest = load("  - name: db-password\n"
                    "    credential: {units: [app.service, \"worker@*.service\"]}\n")
    (entry,) = manifest.secrets
    assert entry.paths == () and entry.grants == (
        Grant("db-password", ("app.service", "worker@*.service")),)
    assert entry.key == "credential:app.service,worker@*.service/db-password"
    assert not entry.key.startswith("/")  # never taken for a file
    assert entry.targets == (entry.key,)
    assert landing_directories(manifest) == () and manifest.sets == ()


def test_a_credential_with_a_path_is_a_file_and_a_credential() -> None:
    """path: and credential: together: the file as before, and the same bytes as a credential."""
    (entry,) = load("  - name: db-password\n    path: db\n    mode: \"0440\"\n"
                    "    credential: {id: db, units: [app.service]}\n").secrets
    assert entry.paths == ("/run/secrets/db",) and entry.key == "/run/secrets/db"
    assert entry.primary.mode == 0o440 and entry.primary.credential == Grant("db",
                                                                            ("app.service",))


def test_without_credential_an_entry_is_what_it_always_was() -> None:
    """No credential: key: the default path, no grants (existing manifests unchanged)."""
    (entry,) = load("  - name: api\n").secrets
    assert entry.paths == ("/run/secrets/api",) and entry.grants == ()
    assert entry.key == "/run/secrets/api"


def test_a_template_may_be_a_credential_with_or_without_its_path() -> None:
    """The entry's credential: serves the rendered template; without template.path no file."""
    alone, both = load(
        "  - name: app-env\n    template: {values: {A: a}}\n"
        "    credential: {units: [app.service]}\n"
        "  - name: app-env2\n    template: {path: app.env, values: {A: a}}\n"
        "    credential: {id: env, units: [app.service]}\n").secrets
    assert alone.paths == () and alone.grants == (Grant("app-env", ("app.service",)),)
    assert both.paths == ("/run/secrets/app.env",) and both.grants[0].id == "env"


def test_each_certificate_output_may_be_a_credential() -> None:
    """key as a credential alone, fullchain as a file and a credential: one file, two grants;
    the certificate's set holds its file; with no file at all it is no set."""
    web, other = load(
        "  - name: web-tls\n    certificate:\n"
        "      key: {credential: {id: tls.key, units: [nginx.service]}}\n"
        "      fullchain: {path: web/fullchain.pem, credential: {id: tls.crt, units: [nginx.service]}}\n"
        "  - name: api-tls\n    certificate:\n"
        "      key: {credential: {id: api.key, units: [api.service]}}\n").secrets
    assert web.params.kinds == ("key", "fullchain")
    assert web.paths == ("/run/secrets/web/fullchain.pem",)
    assert [grant.id for grant in web.grants] == ["tls.key", "tls.crt"]
    assert other.paths == () and other.key == "credential:api.service/api.key"
    manifest = load("  - name: api-tls\n    certificate:\n"
                    "      key: {credential: {id: api.key, units: [api.service]}}\n")
    assert manifest.sets == ()


@pytest.mark.parametrize("body, fragments", [
    ("  - name: a\n    credential: {units: []}\n",
     ["m.yaml:3: secrets[0].credential.units: must be a list", "worker@*.service"]),
    ("  - name: a\n    credential: {}\n",
     ["secrets[0].credential.units: missing", "there is no 'any unit'"]),
    ("  - name: a\n    credential: {units: app.service}\n",
     ["secrets[0].credential.units: must be a list"]),
    ("  - name: a\n    credential: [app.service]\n",
     ["secrets[0].credential: must be a mapping with id and units"]),
    ("  - name: a\n    credential: {unitz: [a.service], units: [a.service]}\n",
     ["secrets[0].credential.unitz: unknown key; did you mean 'units'?"]),
    ("  - name: a\n    credential: {id: a/b, units: [a.service]}\n",
     ["secrets[0].credential.id: 'a/b' is not a systemd credential name", "'/' or ':'"]),
    ("  - name: a\n    credential: {id: '..', units: [a.service]}\n",
     ["secrets[0].credential.id: '..' is not a systemd credential name"]),
    ("  - name: a\n    credential: {id: 'a:b', units: [a.service]}\n",
     ["credential.id: 'a:b' is not a systemd credential name"]),
    ("  - name: a\n    credential: {id: 'a b', units: [a.service]}\n",
     ["credential.id: 'a b' has a space"]),
    ("  - name: a\n    credential: {units: ['*.service']}\n",
     ["credential.units[0]: '*.service' begins with a wildcard", "app-*.service"]),
    ("  - name: a\n    credential: {units: [a.service, 'app.*']}\n",
     ["credential.units[1]: 'app.*' does not end in a unit type"]),
    ("  - name: a\n    credential: {units: ['worker@.service']}\n",
     ["credential.units[0]: 'worker@.service' is a template", "worker@*.service"]),
    ("  - name: a\n    credential: {units: ['" + "u" * 80 + ".service']}\n",
     ["credential.units[0]:", "89 characters together", "108 bytes", "use a shorter ID"]),
    ("  - name: a\n    mode: \"0440\"\n    credential: {units: [a.service]}\n",
     ["m.yaml:4: secrets[0].mode: the entry writes no file", "add path:"]),
    ("  - name: a\n    set: s\n    credential: {units: [a.service]}\n",
     ["secrets[0].set: a set is files that change together, and this entry writes none"]),
    ("  - name: a\n    certificate: {key: k.pem}\n    credential: {units: [a.service]}\n",
     ["secrets[0].credential: a certificate serves each output as its own credential",
      "key: {credential:"]),
    ("  - name: a\n    certificate: {key: {credential: {units: [a.service]}}}\n",
     ["secrets[0].certificate.key.credential.id: missing"]),
    ("  - name: a\n    certificate: {key: {mode: \"0400\", credential: {id: k, units: [a.service]}}}\n",
     ["secrets[0].certificate.key.mode: this output writes no file"]),
    ("  - name: a\n    certificate: {key: {credential: {id: k, units: [a.service], unitz: [b.service]}}}\n",
     ["certificate.key.credential.unitz: unknown key; did you mean 'units'?"]),
    ("  - name: a\n    template: {values: {A: a}, path: {path: x, credential: {units: [a.service]}}}\n",
     ["secrets[0].template.path.credential: a template's credential is its entry's"]),
    ("  - name: a\n    template: {values: {A: a}}\n",
     ["secrets[0].template.path: missing"]),
])
def test_credential_refusals_name_the_line_key_and_fix(body: str, fragments: List[str]) -> None:
    """Each invalid credential is one problem naming the file, line, key and fix."""
    found = problems(body)
    assert len(found) == 1, found
    for fragment in fragments:
        assert fragment in found[0]


@pytest.mark.parametrize("first, second, fragments", [
    ("[app.service]", "[app.service]",
     ["m.yaml:5: credential: app.service is granted the credential 'db' by both 'a' (line 3) "
      "and 'b'", "give each its own ID"]),
    ("[app.service]", "['app*.service']",
     ["app*.service and app.service match one unit"]),
    ("['worker@*.service']", "['worker@1*.service']",
     ["worker@1*.service and worker@*.service may match one unit",
      "fixed beginnings or endings"]),
])
def test_two_entries_may_not_serve_one_id_to_one_unit(first: str, second: str,
                                                      fragments: List[str]) -> None:
    """Same ID and units that can meet (name and name, name and glob, two globs) is refused."""
    found = problems(f"  - name: a\n    credential: {{id: db, units: {first}}}\n"
                     f"  - name: b\n    credential: {{id: db, units: {second}}}\n")
    assert len(found) == 1, found
    for fragment in fragments:
        assert fragment in found[0]


@pytest.mark.parametrize("first, second", [
    ("[app.service]", "[other.service]"),
    ("['worker@*.service']", "['other@*.service']"),
    ("['worker@*.service']", "['worker@*.socket']"),
])
def test_one_id_to_units_that_cannot_meet_is_fine(first: str, second: str) -> None:
    """One ID for disjoint units: two entries, each its own units, two keys."""
    manifest = load(f"  - name: a\n    credential: {{id: db, units: {first}}}\n"
                    f"  - name: b\n    credential: {{id: db, units: {second}}}\n")
    assert len({entry.key for entry in manifest.secrets}) == 2


def test_two_outputs_of_one_certificate_may_not_serve_one_id_to_one_unit() -> None:
    """The clash is found inside an entry too."""
    found = problems("  - name: a\n    certificate:\n"
                     "      key: {credential: {id: k, units: [a.service]}}\n"
                     "      cert: {credential: {id: k, units: [a.service]}}\n")
    assert len(found) == 1 and "granted the credential 'k' by two outputs of 'a'" in found[0]


def test_a_pattern_listed_twice_in_one_grant_is_no_clash() -> None:
    """Within one output's units the same unit twice serves one value: not refused."""
    (entry,) = load("  - name: a\n    credential: {units: [a.service, 'a*.service']}\n").secrets
    assert entry.grants[0].units == ("a.service", "a*.service")


def test_many_globs_sharing_one_id_are_checked_in_bounded_time() -> None:
    """Thousands of globs for one ID stop at the comparison budget with one problem."""
    body = "".join(f"  - name: s{n}\n    credential: {{id: db, units: ['u{n}x*.service']}}\n"
                   for n in range(600))
    found = problems(body)
    assert found == [found[0]] and "too many unit globs share the credential ID 'db'" in found[0]
