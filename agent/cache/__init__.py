"""The sealed cache (``cache:``): the last good bytes of each entry, sealed to
this machine with ``systemd-creds``, for a start while Azure cannot be reached.

The rooms: ``seal`` (systemd-creds, the only cryptography), ``store`` (one
sealed copy per entry in a root-only directory, replaced atomically),
``decision`` (whether a copy may be served, and why not; pure) and
``policy`` (the manifest's ``cache:`` as a value). The daemon saves copies
after a good refresh and serves them at start; the doctor reports them.
Nothing here knows Azure or HTTP.
"""
