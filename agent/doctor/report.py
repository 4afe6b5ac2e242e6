"""What doctor finds, as values: one :class:`Check` per link of the chain, the
:class:`Report` of a whole run, and the checklist the CLI prints.

Every other module of the doctor wing builds checks; this one imports none of
them. Nothing here prints: :func:`render` and :func:`as_json` return what the
CLI writes.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple
from urllib.parse import urlsplit

OK = "ok"
WARN = "warn"
FAIL = "fail"


class Check(NamedTuple):
    """One link of the chain: ``subject`` (``vault kv-prod``, ``secret
    db-password``), the ``name`` of the check (``tls``, ``readable``), its
    ``state`` (OK, WARN or FAIL), one line of ``detail`` and, for a failure
    (sometimes a warning), the one ``fix`` to apply."""

    subject: str
    name: str
    state: str
    detail: str
    fix: Optional[str] = None

    def as_json(self) -> Dict[str, Optional[str]]:
        return {"subject": self.subject, "check": self.name, "state": self.state,
                "detail": self.detail, "fix": self.fix}


class Report(NamedTuple):
    """Every check, in chain order, and how long doctor took."""

    checks: Tuple[Check, ...]
    elapsed_s: float

    @property
    def is_failed(self) -> bool:
        return any(check.state == FAIL for check in self.checks)


def soften(checks: Sequence[Check]) -> List[Check]:
    """The checks of an optional secret: a failure there fails nothing (as
    in the agent), so it is a warning, still with its fix."""
    return [check._replace(state=WARN, detail=f"{check.detail} (optional)")
            if check.state == FAIL else check for check in checks]


def vault_label(vault: str) -> str:
    """A vault URL as a check's subject names it: its host (and port)."""
    return urlsplit(vault).netloc or vault


# -- rendering (pure; the CLI prints) -------------------------------------------------

MARKS = {OK: "✓", WARN: "!", FAIL: "✗"}
ASCII_MARKS = {OK: "ok", WARN: "!", FAIL: "FAIL"}


def render(report: Report, marks: Mapping[str, str] = MARKS) -> List[str]:
    """The checklist: one line per check, its fix indented under it, and a
    last line with the counts and the time taken."""
    lines = []
    for check in report.checks:
        lines.append(f"{marks[check.state]} {check.subject}, {check.name}: {check.detail}")
        if check.fix and check.state != OK:
            lines.append(f"    fix: {check.fix}")
    failed = sum(1 for check in report.checks if check.state == FAIL)
    warned = sum(1 for check in report.checks if check.state == WARN)
    lines.append(f"{len(report.checks)} checks: {failed} failed, {warned} warnings "
                 f"({report.elapsed_s:.1f} s)")
    return lines


def as_json(report: Report) -> List[Dict[str, Optional[str]]]:
    """The checks for ``--json``: subject, check, state, detail, fix."""
    return [check.as_json() for check in report.checks]
