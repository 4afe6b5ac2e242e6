"""The daemon wing: ``kv-agent run``, the long-running agent systemd supervises.

``service`` performs: it starts, syncs, reloads and stops. What it keeps between
syncs lives beside it, with the decisions about it: ``entries`` (each entry's
state, the READY gate), ``reconcile`` (what to remove and when) over ``ledger``
(what was written), ``lifecycle`` (when to sync next), ``refresh`` (the refresh
thread and its statistics), ``loop`` (signals, inotify, the watchdog),
``metrics``, ``hooks``, ``notify``, ``signals`` and ``watch``.
"""
