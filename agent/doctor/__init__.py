"""The doctor wing: ``kv-agent doctor``, the chain from manifest to file checked link by link.

Kept empty on purpose: the CLI imports the wing lazily, from its modules
(``chain.diagnose`` walks the chain, ``report`` renders it).
"""
