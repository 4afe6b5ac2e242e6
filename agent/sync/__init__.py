"""The sync wing: one sync, the only place that knows the order of the work.

``sync`` runs manifest -> identity -> vault -> transforms -> outputs once;
``freshness`` plans which sources a refresh must GET, from the vault's list;
``selection`` expands a ``select:`` entry from the same list.
"""
