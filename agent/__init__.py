"""kv-agent: materialise Azure Key Vault secrets into files on tmpfs.

Data flows one way: manifest -> identity -> vault -> writer. Only
:mod:`agent.sync.sync` knows that order; only :mod:`agent.cli` prints to users and
chooses exit codes.
"""

__version__ = "0.1.0"
