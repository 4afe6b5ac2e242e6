"""The status wing: what the daemon leaves behind for ``status`` and ``doctor``.

``snapshot`` is the one typed value, ``store`` keeps it as status.json in the
agent's state directory, ``render`` shows it to a human. The daemon writes it;
the CLI and the doctor read it; neither of those imports the other.
"""
