"""The vault wing: Key Vault's REST API, spoken to as an untrusted server.

``url`` says which host a vault URL names and where a request will really
connect; ``client`` GETs secrets (one, many concurrently, or the list);
``listing`` parses the list's pages. It knows nothing of identity endpoints.
"""
