"""The base: what every wing stands on, importing no wing of ours.

Typed errors and exit codes (``errors``), text from the network made safe
(``untrusted``), bounded HTTP (``transport``), backoff policy (``retry``), the
process's memory (``memory``), which hosts are this machine (``hosts``) and
where secrets may land (``landing``). The ``layers`` contract in
pyproject.toml keeps it at the bottom.
"""
