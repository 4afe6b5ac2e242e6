"""RefreshStats (agent/daemon/refresh.py): what a finished refresh says in the
journal. The refresh thread itself runs in tests/test_daemon.py."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import List

import pytest
import yaml

from agent.base.errors import IdentityUnavailableError
from agent.daemon.refresh import FAILURE, PARTIAL, SUCCESS, RefreshStats
from agent.manifest import Accounts, Manifest, parse_manifest
from agent.sync.sync import SecretOutcome, SyncReport

ACCOUNTS = Accounts(user=lambda name: 0, group=lambda name: 0)
DOWN = IdentityUnavailableError("IMDS unreachable after 9 attempts", "check the network")


def two_entries(directory: Path) -> Manifest:
    document = {"vault": "https://kv.vault.azure.net", "directory": str(directory),
                "secrets": [{"name": "a", "path": "a"}, {"name": "b", "path": "b"}]}
    return parse_manifest(yaml.safe_dump(document), "m.yaml", accounts=ACCOUNTS,
                          check_filesystem=False)


def journal(caplog: pytest.LogCaptureFixture) -> List[str]:
    return [record.getMessage() for record in caplog.records]


def test_works_again_only_once_a_secret_is_fetched_again(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """An outage that fails a refresh as a whole and then entry by entry (the
    same outage) must not log "refresh works again" until a secret is fetched."""
    caplog.set_level(logging.INFO, logger="agent.daemon.refresh")
    a, b = two_entries(tmp_path).secrets
    stats = RefreshStats()
    assert stats.finish(DOWN, 1.0, 1.0) == FAILURE
    all_failed = SyncReport((SecretOutcome(a, error=DOWN), SecretOutcome(b, error=DOWN)), 0.1)
    assert stats.finish(all_failed, 2.0, 2.0) == PARTIAL
    assert not any("works again" in line for line in journal(caplog)), journal(caplog)
    good = SyncReport((SecretOutcome(a, version="1"), SecretOutcome(b, version="1")), 0.1)
    assert stats.finish(good, 3.0, 3.0) == SUCCESS
    assert stats.finish(good, 4.0, 4.0) == SUCCESS
    assert [line for line in journal(caplog) if "works again" in line] == \
        ["refresh works again"]
    assert stats.error is None
