"""Environment variables that would lead an official Azure SDK away from the
emulator: another identity source than IMDS, a proxy, or another trust store.
The Python and JavaScript SDK tests both strip them before they run a client."""

from __future__ import annotations

AWAY_FROM_THE_EMULATOR = (
    # Managed-identity sources other than IMDS (App Service, Arc, Cloud Shell,
    # workload identity) and settings that pick another identity or authority.
    "IDENTITY_ENDPOINT",
    "IDENTITY_HEADER",
    "IDENTITY_SERVER_THUMBPRINT",
    "IMDS_ENDPOINT",
    "MSI_ENDPOINT",
    "MSI_SECRET",
    "AZURE_CLIENT_ID",
    "AZURE_TENANT_ID",
    "AZURE_AUTHORITY_HOST",
    "AZURE_FEDERATED_TOKEN_FILE",
    "AZURE_TOKEN_CREDENTIALS",
    # Proxies, in both spellings.
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "NO_PROXY",
    "http_proxy",
    "https_proxy",
    "all_proxy",
    "no_proxy",
)
