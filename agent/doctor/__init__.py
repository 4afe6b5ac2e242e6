"""The doctor wing: ``kv-agent doctor``, the chain from manifest to file checked link by link.
"""
