"""Loaded by every Python process the tests start (PYTHONPATH): same guard."""

import kv_netguard

kv_netguard.install()
