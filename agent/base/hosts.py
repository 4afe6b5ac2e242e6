"""Which hosts are this machine: the one rule for "loopback".

A vault or an identity endpoint on loopback is the local emulator (no TLS
demanded of its token endpoint, no audience from a cloud suffix, no exposure
warning); every other host is the network. One rule, so the vault client, the
identity sources and the doctor can never disagree.
"""

from __future__ import annotations

import ipaddress


def is_loopback_host(host: str) -> bool:
    """True for ``localhost`` (and ``*.localhost``) and loopback address
    literals (127.0.0.0/8, ``::1``, bracketed or not): the local emulator. A
    name is never resolved. In the base, below the vault client and the
    identity sources, so both judge loopback by one rule."""
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
