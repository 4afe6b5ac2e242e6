"""One verifying TLS context per CA bundle, shared by every connection to it.

The vault session's adapter (:mod:`agent.base.transport`) hands each HTTPS
connection the context of its bundle from here instead of letting urllib3
build and load one per connection.
"""

from __future__ import annotations

import os
import ssl
import stat
import threading
from typing import Optional, Tuple

from urllib3.util.ssl_ import create_urllib3_context


class BundleContext:
    """One verifying TLS context for every connection to a CA bundle (a file
    or a directory), loaded again only when the bundle changes on disk.

    requests (2.32 and later) otherwise has urllib3 build a context and load
    the bundle for each new connection: 16 of them for a vault's pool, each
    holding its own copy (about 70 KiB with the emulator's one CA, 700 KiB
    with a full public bundle) and costing the parse of the bundle (issue 17,
    items 20 and 21). The context is urllib3's own default, verifying the
    certificate chain and the host name exactly as a per-connection one.
    """

    def __init__(self, path: str) -> None:
        self._path = path
        self._lock = threading.Lock()
        self._stamp: Optional[Tuple[int, int, int, int]] = None
        self._context: Optional[ssl.SSLContext] = None

    def context(self) -> ssl.SSLContext:
        """The context for the bundle as it is now. Raises OSError (ssl.SSLError
        included) when the bundle cannot be read or loaded."""
        status = os.stat(self._path)
        stamp = (status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns)
        with self._lock:
            if self._context is None or stamp != self._stamp:
                context = create_urllib3_context(cert_reqs=ssl.CERT_REQUIRED)
                if stat.S_ISDIR(status.st_mode):
                    context.load_verify_locations(capath=self._path)
                else:
                    context.load_verify_locations(cafile=self._path)
                self._context, self._stamp = context, stamp
            return self._context
