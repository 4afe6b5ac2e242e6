"""The vault wing: Key Vault's REST API, spoken to as an untrusted server.

``url`` says which host a vault URL names and where a request will really
connect; ``client`` GETs secrets (one, many concurrently, or the list);
``pacing`` decides how fast and how many of them go to one vault;
``audience`` which token they carry; ``failures`` words what went wrong;
``listing`` parses the list's pages. It knows nothing of identity endpoints.
"""
