"""``python -m agent`` is the same as the ``kv-agent`` command."""

from agent.cli import main

raise SystemExit(main())
