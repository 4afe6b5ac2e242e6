"""How the agent's lines look on stderr and in the journal: one formatter,
configured once by the command line for the whole process."""

from __future__ import annotations

import logging
from typing import Mapping, TextIO

from agent.base.untrusted import escape

# sd-daemon(3) priority prefixes, so journald records levels.
_JOURNAL_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4,
                     logging.ERROR: 3, logging.CRITICAL: 2}


class LineFormatter(logging.Formatter):
    """``kv-agent: warning: ...`` on a terminal; ``<4>warning: ...`` under
    systemd (JOURNAL_STREAM set), where journald adds the time and name.

    Defence in depth for text that came from the network (issue 9, item 7):
    control characters are escaped and continuation lines are indented, so no
    record can start a line that looks like another ``kv-agent:`` line or
    repaint a terminal, even if some message missed its escaping.
    """

    def __init__(self, journal: bool) -> None:
        super().__init__()
        self._journal = journal

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + self.formatException(record.exc_info)
        label = "" if record.levelno == logging.INFO else f"{record.levelname.lower()}: "
        first, *rest = [escape(line, limit=0) for line in message.splitlines()] or [""]
        prefix = (f"<{_JOURNAL_PRIORITY.get(record.levelno, 6)}>" if self._journal
                  else "kv-agent: ")
        return "\n".join([f"{prefix}{label}{first}"]
                         + [f"{prefix if self._journal else ''}  {line}" for line in rest])


def configure_logging(level: int, environ: Mapping[str, str], stream: TextIO) -> None:
    """One handler on ``stream`` for the whole process (the CLI calls it
    once, at start: it owns logging as it owns printing)."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(LineFormatter(journal=bool(environ.get("JOURNAL_STREAM"))))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    if level > logging.DEBUG:
        logging.getLogger("urllib3").setLevel(logging.WARNING)
