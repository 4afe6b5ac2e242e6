"""Prometheus metrics (``metrics:``): the text format, its atomic file, and the
running agent writing it after every refresh, read back by Prometheus' own parser."""

from __future__ import annotations

import errno
import os
import stat
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest
import secrecy
from prometheus_client.parser import text_string_to_metric_families
from test_daemon import (  # noqa: F401 - fixtures
    StartAgent,
    Vault,
    entry,
    manifest_text,
    replace_file,
    short_dir,
    start_agent,
    vault,
)

from agent.base.errors import WriteError
from agent.daemon import metrics
from agent.daemon.metrics import EntryMetrics, MetricsSnapshot, render, write_metrics

NOW = 1_800_000_000.0
Sample = Tuple[str, Dict[str, str], float]


def parse(text: str) -> Dict[str, Tuple[str, List[Sample]]]:
    """Family name -> (type, samples), as Prometheus' parser reads ``text``."""
    return {family.name: (family.type, [(s.name, dict(s.labels), s.value)
                                        for s in family.samples])
            for family in text_string_to_metric_families(text)}


def value(families: Dict[str, Tuple[str, List[Sample]]], sample: str,
          **labels: str) -> Optional[float]:
    """The value of ``sample`` whose labels include ``labels``, or None."""
    for _, samples in families.values():
        for name, have, number in samples:
            if name == sample and all(have.get(k) == v for k, v in labels.items()):
                return number
    return None


def snapshot(**changes: object) -> MetricsSnapshot:
    base = MetricsSnapshot(
        now_s=NOW,
        entries=(EntryMetrics("/run/secrets/db", "db", "https://kv.vault.azure.net",
                              last_success_s=NOW - 5, version_updated_s=NOW - 3600,
                              consecutive_failures=0, expires_s=NOW + 86400),
                 EntryMetrics("/run/secrets/api", "api", "https://kv.vault.azure.net:8443",
                              consecutive_failures=3)),
        last_refresh_s=NOW - 1, refresh_duration_s=0.125,
        refreshes={"success": 7, "failure": 2}, files_written=4,
        requests={("imds", "169.254.169.254", "200"): 1, ("vault", "kv.vault.azure.net", "200"): 9,
                  ("vault", "kv.vault.azure.net", "error"): 2})
    return base._replace(**changes)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------
# Rendering


def test_render_is_valid_exposition_with_conventional_names() -> None:
    """Every family has HELP and TYPE, counters end in _total, times in _seconds, and
    Prometheus' parser reads back each value and label."""
    text = render(snapshot())
    families = parse(text)
    assert text.endswith("\n")
    for name in ("kv_agent_up", "kv_agent_last_refresh_duration_seconds",
                 "kv_agent_last_refresh_timestamp_seconds",
                 "kv_agent_secret_last_success_timestamp_seconds",
                 "kv_agent_secret_version_age_seconds", "kv_agent_secret_consecutive_failures",
                 "kv_agent_secret_expiry_timestamp_seconds"):
        assert families[name][0] == "gauge", name
        assert f"# HELP {name} " in text and f"# TYPE {name} gauge" in text
    for name in ("kv_agent_requests", "kv_agent_files_written", "kv_agent_refreshes"):
        assert families[name][0] == "counter", name  # the parser strips _total
        assert f"# TYPE {name}_total counter" in text
    assert value(families, "kv_agent_up") == 1
    assert value(families, "kv_agent_last_refresh_duration_seconds") == 0.125
    assert value(families, "kv_agent_files_written_total") == 4
    assert value(families, "kv_agent_refreshes_total", result="failure") == 2
    assert value(families, "kv_agent_requests_total", target="vault",
                 host="kv.vault.azure.net", code="error") == 2
    assert value(families, "kv_agent_requests_total", target="imds", code="200") == 1
    db = {"entry": "/run/secrets/db", "secret": "db", "vault": "kv.vault.azure.net"}
    assert value(families, "kv_agent_secret_version_age_seconds", **db) == 3600
    assert value(families, "kv_agent_secret_last_success_timestamp_seconds", **db) == NOW - 5
    assert value(families, "kv_agent_secret_expiry_timestamp_seconds", **db) == NOW + 86400
    assert value(families, "kv_agent_secret_consecutive_failures", secret="api",
                 vault="kv.vault.azure.net:8443") == 3


def test_unknown_values_are_left_out_not_zero() -> None:
    """An entry never confirmed, without expiry or version time, has no such samples (a
    zero would read as 1970); with no refresh yet the refresh gauges are absent too."""
    families = parse(render(snapshot(last_refresh_s=None, refresh_duration_s=None)))
    assert value(families, "kv_agent_secret_last_success_timestamp_seconds", secret="api") is None
    assert value(families, "kv_agent_secret_expiry_timestamp_seconds", secret="api") is None
    assert value(families, "kv_agent_secret_version_age_seconds", secret="api") is None
    assert value(families, "kv_agent_last_refresh_duration_seconds") is None
    empty = parse(render(MetricsSnapshot(now_s=NOW, is_up=False)))
    assert value(empty, "kv_agent_up") == 0
    assert "kv_agent_secret_consecutive_failures" in empty  # HELP/TYPE even without samples


def test_credential_families_only_once_credentials_are_served() -> None:
    """With credentials: whether each credential entry is in memory (by its key, a
    credential-only one's being credential:<units>/<ID>) and the socket's connections by
    result; without: no such family at all, the file as it always was."""
    label = "credential:app.service/db"
    text = render(snapshot(
        entries=(EntryMetrics(label, "db", "https://kv.vault.azure.net",
                              credentials_loaded=True),
                 EntryMetrics("/run/secrets/tls.key", "tls", "https://kv.vault.azure.net",
                              credentials_loaded=False),
                 EntryMetrics("/run/secrets/plain", "plain", "https://kv.vault.azure.net")),
        credentials={"served": 3, "refused": 1, "ignored": 0}))
    families = parse(text)
    assert families["kv_agent_credential_loaded"][0] == "gauge"
    assert value(families, "kv_agent_credential_loaded", entry=label, secret="db") == 1
    assert value(families, "kv_agent_credential_loaded", secret="tls") == 0
    assert value(families, "kv_agent_credential_loaded", secret="plain") is None
    assert value(families, "kv_agent_credential_connections_total", result="served") == 3
    assert value(families, "kv_agent_credential_connections_total", result="refused") == 1
    assert "credential" not in render(snapshot())


@pytest.mark.parametrize("name", [
    'quote"d', "back\\slash", "new\nline", 'all\\"\n\\n', "carriage\rreturn", "ünï€",
    "lone\udc80surrogate", "", "{a=\"b\"} 1\nkv_agent_up 0",
])
def test_label_values_are_escaped_and_read_back(name: str) -> None:
    """Backslash, double quote and line feed are escaped as the format demands, so a
    hostile entry name or host reads back as itself and can never forge a sample."""
    text = render(MetricsSnapshot(now_s=NOW, entries=(
        EntryMetrics(f"/run/secrets/{name}", name, f"https://{name}", consecutive_failures=1),),
        requests={("vault", name, "200"): 1}))
    families = parse(text)
    expected = name.replace("\udc80", "?")
    assert value(families, "kv_agent_secret_consecutive_failures",
                 entry=f"/run/secrets/{expected}", secret=expected) == 1
    assert value(families, "kv_agent_requests_total", host=expected) == 1
    assert value(families, "kv_agent_up") == 1  # not overridden by a forged line
    assert len(families["kv_agent_up"][1]) == 1


def test_escape_label_value() -> None:
    """The three escapes, and nothing else touched."""
    assert metrics.escape_label_value('a\\b"c\nd\re') == 'a\\\\b\\"c\\nd\re'


def test_no_secret_or_token_in_the_text() -> None:
    """The format holds names, hosts, counts and times; a value or token has no way in."""
    value_ = secrecy.fresh_value("db")
    text = render(snapshot())
    secrecy.assert_no_leak(text, [value_], ["eyJhbGciOiJSUzI1NiJ9.eyJhdWQiOiJ4In0.c2lnbmF0dXJlMTIz"])


# ---------------------------------------------------------------------------
# The file


def test_write_creates_directories_0755_and_file_0644_whatever_the_umask(tmp_path: Path) -> None:
    """node_exporter runs as its own user: the directories made and the file are
    readable by all even under the unit's UMask=0077, and no temporary file stays."""
    path = tmp_path / "run" / "metrics" / "kv-agent.prom"
    old = os.umask(0o077)
    try:
        write_metrics(str(path), render(snapshot()))
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    for directory in (path.parent, path.parent.parent):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o755
    assert os.listdir(path.parent) == ["kv-agent.prom"]
    assert parse(path.read_text())["kv_agent_up"]


def test_rewrite_replaces_the_file_by_rename(tmp_path: Path) -> None:
    """Each write is a new inode renamed over the old: a reader holding the old file
    reads it whole, and a new reader reads the new one whole."""
    path = tmp_path / "kv-agent.prom"
    write_metrics(str(path), render(snapshot(files_written=1)))
    with open(path) as old_reader:
        write_metrics(str(path), render(snapshot(files_written=2)))
        assert value(parse(old_reader.read()), "kv_agent_files_written_total") == 1
    assert value(parse(path.read_text()), "kv_agent_files_written_total") == 2


@pytest.mark.parametrize("step", ["_write_all", "fsync", "rename"])
def test_failure_mid_write_keeps_the_old_file_and_leaves_no_temp(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: str) -> None:
    """A failure while writing (after half the bytes), at fsync or at the rename raises
    WriteError naming the path; the old file is intact and no temporary file stays."""
    path = tmp_path / "kv-agent.prom"
    write_metrics(str(path), render(snapshot(files_written=1)))
    before = path.read_bytes()

    def half_then_fail(fd: int, data: bytes) -> None:
        os.write(fd, data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    def fail(*args: object, **kwargs: object) -> None:
        raise OSError(5, "Input/output error")

    if step == "_write_all":
        monkeypatch.setattr(metrics, "_write_all", half_then_fail)
    else:
        monkeypatch.setattr(metrics.os, step, fail)
    with pytest.raises(WriteError) as caught:
        write_metrics(str(path), render(snapshot(files_written=2)))
    monkeypatch.undo()
    assert str(path) in str(caught.value)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["kv-agent.prom"]


def test_symlink_at_the_target_is_refused_and_not_followed(tmp_path: Path) -> None:
    """A symlink planted at the metrics path is refused with the fix; its target is
    untouched (the agent runs as root: writing through it would write anywhere)."""
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    path = tmp_path / "kv-agent.prom"
    path.symlink_to(victim)
    with pytest.raises(WriteError) as caught:
        write_metrics(str(path), render(snapshot()))
    assert "symlink" in str(caught.value) and f"remove {path}" in str(caught.value)
    assert victim.read_text() == "precious\n"
    assert path.is_symlink()
    assert sorted(os.listdir(tmp_path)) == ["kv-agent.prom", "victim"]


def test_symlinked_directory_and_non_file_target_are_refused(tmp_path: Path) -> None:
    """The directory is opened without following a symlink; a directory at the target is
    refused rather than replaced."""
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(WriteError, match="cannot use the directory"):
        write_metrics(str(tmp_path / "link" / "kv-agent.prom"), "x 1\n")
    assert os.listdir(real) == []
    (tmp_path / "dir.prom").mkdir()
    with pytest.raises(WriteError, match="not a regular file"):
        write_metrics(str(tmp_path / "dir.prom"), "x 1\n")


@pytest.mark.parametrize("where", ["directory", "file"])
def test_read_only_file_system_names_the_drop_in(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    """A read-only file system is the packaged unit's sandbox (ProtectSystem=strict, as
    in booted Debian 12 and 13): the fix names the example drop-in and the restart,
    whether the directory could not be made or the file not created in it."""
    def read_only(*args: object, **kwargs: object) -> int:
        raise OSError(errno.EROFS, "Read-only file system")

    if where == "directory":
        path = tmp_path / "node-exporter" / "kv-agent.prom"
        monkeypatch.setattr(metrics.os, "mkdir", read_only)
    else:
        path = tmp_path / "kv-agent.prom"
        monkeypatch.setattr(metrics, "_create", read_only)
    with pytest.raises(WriteError) as caught:
        write_metrics(str(path), render(snapshot()))
    message = str(caught.value)
    assert "Read-only file system" in message and str(path.parent) in message, message
    assert "/usr/share/doc/kv-agent/examples/metrics-path.conf" in message, message
    assert "ReadWritePaths=" in message and "restart kv-agent" in message, message


def test_a_leftover_temporary_file_is_replaced(tmp_path: Path) -> None:
    """A temporary file a crashed agent of the same pid left does not block the write."""
    path = tmp_path / "kv-agent.prom"
    leftover = tmp_path / f".kv-agent.prom.{os.getpid()}.tmp"
    leftover.write_text("half")
    write_metrics(str(path), render(snapshot()))
    assert os.listdir(tmp_path) == ["kv-agent.prom"]


def test_remove_takes_only_a_regular_file(tmp_path: Path) -> None:
    """Removing the metrics file removes a regular file, and leaves a symlink, a
    directory or nothing at all alone."""
    path = tmp_path / "kv-agent.prom"
    write_metrics(str(path), render(snapshot()))
    assert metrics.remove_metrics(str(path)) is True
    assert not path.exists()
    assert metrics.remove_metrics(str(path)) is False
    assert metrics.remove_metrics(str(tmp_path / "none" / "kv-agent.prom")) is False
    victim = tmp_path / "victim"
    victim.write_text("x")
    path.symlink_to(victim)
    assert metrics.remove_metrics(str(path)) is False
    assert path.is_symlink() and victim.exists()


# ---------------------------------------------------------------------------
# The running agent


def _metrics_of(path: Path) -> Optional[Dict[str, Tuple[str, List[Sample]]]]:
    try:
        return parse(path.read_text())
    except FileNotFoundError:
        return None


@pytest.mark.integration
def test_running_agent_writes_metrics_after_each_refresh(start_agent: StartAgent,  # noqa: F811
                                                         vault: Vault,  # noqa: F811
                                                         shm_dir: Path) -> None:
    """`kv-agent run` with `metrics: PATH` writes a file Prometheus parses after the first
    refresh (entries current, requests to IMDS and the vault by code, files written), and
    after failing refreshes counts the entry's consecutive failures and the 403s; at stop
    `up` is 0. The file names entries, never a value or a token."""
    vault.put("steady")
    expires = int(time.time()) + 30 * 86400
    vault.values.add("flaky-value-0123456789abcdef")
    vault.emulator.set_secret("flaky", "flaky-value-0123456789abcdef", expires_on=expires)
    path = shm_dir / "metrics" / "kv-agent.prom"
    odd = 'we"ird\\name'  # a path that needs escaping in a label
    run = start_agent([entry("steady"), entry("flaky", path=odd)], metrics=str(path))
    run.wait_ready()
    first = run.wait(lambda: _metrics_of(path), "the metrics file")
    steady = {"entry": str(run.directory / "steady"), "secret": "steady"}
    flaky = {"entry": str(run.directory / odd), "secret": "flaky"}
    assert value(first, "kv_agent_up") == 1
    assert value(first, "kv_agent_secret_consecutive_failures", **flaky) == 0
    assert value(first, "kv_agent_secret_expiry_timestamp_seconds", **flaky) == expires
    assert value(first, "kv_agent_secret_expiry_timestamp_seconds", **steady) is None
    assert (value(first, "kv_agent_secret_last_success_timestamp_seconds", **steady) or 0) \
        > time.time() - 60
    assert 0 <= (value(first, "kv_agent_secret_version_age_seconds", **steady) or -1) < 60
    assert value(first, "kv_agent_files_written_total") == 2
    assert (value(first, "kv_agent_requests_total", target="imds", code="200") or 0) >= 1
    vault_host = str(vault.url).split("//", 1)[1]
    assert (value(first, "kv_agent_requests_total", target="vault", host=vault_host,
                  code="200") or 0) >= 2
    assert (value(first, "kv_agent_last_refresh_duration_seconds") or -1) >= 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o644

    # A rotation whose GET is refused: the refresh fails for that entry, again and again.
    vault.emulator.inject_fault("vault", 403, count=1000, path_contains="/secrets/flaky")
    vault.put("flaky")
    failing = run.wait(lambda: (lambda m: m if m and (value(
        m, "kv_agent_secret_consecutive_failures", **flaky) or 0) >= 2 else None)(
        _metrics_of(path)), "two failed refreshes counted")
    assert value(failing, "kv_agent_secret_consecutive_failures", **steady) == 0
    assert (value(failing, "kv_agent_requests_total", target="vault", code="403") or 0) >= 2
    assert (value(failing, "kv_agent_refreshes_total", result="partial") or 0) >= 2
    assert (value(failing, "kv_agent_refreshes_total", result="success") or 0) >= 1
    assert value(failing, "kv_agent_up") == 1
    run.stop()
    stopped = parse(path.read_text())
    assert value(stopped, "kv_agent_up") == 0
    assert sorted(os.listdir(path.parent)) == ["kv-agent.prom"]
    secrecy.assert_no_leak(path.read_text(), vault.values, vault.tokens())


@pytest.mark.integration
def test_unwritable_metrics_path_is_logged_once_and_never_fatal(
        start_agent: StartAgent, vault: Vault, shm_dir: Path) -> None:  # noqa: F811
    """A symlink at the metrics path is refused with one warning, not one per refresh;
    the agent keeps refreshing and stays healthy."""
    vault.put("steady")
    path = shm_dir / "kv-agent.prom"
    path.symlink_to(shm_dir / "elsewhere")
    run = start_agent([entry("steady")], metrics=str(path))
    run.wait_ready()
    run.wait(lambda: run.status_json().get("last_refresh") and len(
        run.process.lines("metrics:")) >= 1, "the warning")
    cycles_later = run.status_json()["last_refresh"]
    run.wait(lambda: run.status_json()["last_refresh"] != cycles_later, "another refresh")
    assert len(run.process.lines("metrics:")) == 1, run.process.stderr
    assert "symlink" in run.process.lines("metrics:")[0]
    assert not (shm_dir / "elsewhere").exists()
    run.stop()


@pytest.mark.integration
def test_reload_without_metrics_removes_the_file(start_agent: StartAgent,  # noqa: F811
                                                 vault: Vault, shm_dir: Path) -> None:  # noqa: F811
    """A manifest edit that drops `metrics:` removes the old file (no stale `up 1` stays
    for node_exporter); putting it back writes it again at the next refresh."""
    vault.put("steady")
    path = shm_dir / "metrics" / "kv-agent.prom"
    run = start_agent([entry("steady")], metrics=str(path))
    run.wait_ready()
    run.wait(lambda: _metrics_of(path), "the metrics file")
    replace_file(run.manifest, manifest_text(vault.url, run.directory, [entry("steady")]))
    run.wait(lambda: not path.exists(), "the metrics file removed")
    run.wait(lambda: run.process.lines("metrics: removed"), "the removal logged")
    replace_file(run.manifest, manifest_text(vault.url, run.directory, [entry("steady")],
                                             metrics=str(path)))
    run.wait(lambda: _metrics_of(path), "the metrics file again")
    run.stop()


def test_a_drop_in_that_opens_the_directory_is_found(tmp_path: Path) -> None:
    """check names the drop-in that already lets the unit write the metrics path
    (with systemd's "-" prefix, or opening a parent directory), and none for a
    path no drop-in opens, nor from a file that is not a .conf."""
    etc, usr = tmp_path / "etc", tmp_path / "usr"
    etc.mkdir()
    usr.mkdir()
    (etc / "metrics-path.conf").write_text(
        "[Service]\n# ReadWritePaths=/srv/commented\nReadWritePaths=-/var/lib/prometheus/node-exporter\n")
    (usr / "other.conf").write_text("[Service]\nReadWritePaths=/srv /opt/metrics/\n")
    (usr / "ignored.conf.disabled").write_text("[Service]\nReadWritePaths=/data\n")
    dirs = (str(tmp_path / "missing"), str(etc), str(usr))
    found = metrics.drop_in_allowing
    assert found("/var/lib/prometheus/node-exporter/kv-agent.prom", dirs) == \
        str(etc / "metrics-path.conf")
    assert found("/srv/node/kv-agent.prom", dirs) == str(usr / "other.conf")
    assert found("/opt/metrics/kv-agent.prom", dirs) == str(usr / "other.conf")
    assert found("/srv/commented/kv-agent.prom", dirs) == str(usr / "other.conf")  # via /srv
    assert found("/var/lib/prometheus/kv-agent.prom", dirs) is None  # above the opened one
    assert found("/data/kv-agent.prom", dirs) is None
    assert found("/optional/kv-agent.prom", dirs) is None  # /opt is not a prefix of it


def test_from_cache_gauge_only_with_a_cache() -> None:
    """With ``cache:``: kv_agent_secret_from_cache per entry, 1 while its sealed copy is
    served, 0 otherwise, labelled as the other per-entry families; without: no such family,
    the file as it always was."""
    text = render(snapshot(entries=(
        EntryMetrics("/run/secrets/db", "db", "https://kv.vault.azure.net", from_cache=True),
        EntryMetrics("/run/secrets/api", "api", "https://kv.vault.azure.net:8443",
                     from_cache=False))))
    families = parse(text)
    assert families["kv_agent_secret_from_cache"][0] == "gauge"
    assert value(families, "kv_agent_secret_from_cache", entry="/run/secrets/db", secret="db",
                 vault="kv.vault.azure.net") == 1
    assert value(families, "kv_agent_secret_from_cache", entry="/run/secrets/api",
                 vault="kv.vault.azure.net:8443") == 0
    assert "from_cache" not in render(snapshot())
