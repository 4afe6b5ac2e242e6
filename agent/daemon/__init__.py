"""The daemon wing: ``kv-agent run``, the long-running agent systemd supervises.

``service`` performs: it starts, syncs, reloads and stops. What it keeps between
syncs lives beside it: ``ledger`` (what was written), ``lifecycle`` (when to sync
next), ``loop`` (signals, inotify, the watchdog), ``metrics``, ``hooks``,
``notify``, ``signals`` and ``watch``.
"""
