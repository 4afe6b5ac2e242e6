"""Loopback emulator of the IMDS managed-identity endpoint and the Key Vault secrets API.

kv-agent's tests (and anyone trying the agent without Azure) run this instead of
``169.254.169.254`` and ``https://<vault>.vault.azure.net``. It is built from
``docs/protocol.md`` (sections A1-A5, A9, B1-B6, B10) and the real exchanges in
``docs/recordings/``; where the real service's wording is known it is copied byte
for byte, and where it is not the choice is marked "[unverified]".

It is deliberately *stricter* than the stubs other projects use (protocol.md D1,
D2): no ``Metadata: true`` header, numbers instead of strings, a token for the
wrong audience or a forgotten bearer token all fail here the way they fail in
Azure, so a client that passes against the emulator has a good chance against
the real thing.

Two servers are started, both on ``host`` (127.0.0.1 by default):

* IMDS, plain HTTP: ``GET /metadata/identity/oauth2/token``; tokens are HS256
  JWTs signed with a random per-instance key (real ones are RS256; nobody but
  this emulator's own vault checks the signature).
* Key Vault, HTTPS with a throw-away CA generated at start (``cryptography`` is
  imported only there, so pre-made certificate files work without it): get and
  list (B3, B4), and the writes the official SDKs make (SetSecret, UpdateSecret,
  DeleteSecret with soft delete, deleted-secret get/list/recover/purge), shaped
  like the recorded CRUD exchange. ``empty_pages`` makes lists open with empty
  pages carrying a nextLink, as real lists may (B4).

Nothing happens at import: servers, keys and temporary directories exist only
between :meth:`Emulator.start` and :meth:`Emulator.stop`.

The parts, each a module of this package (one direction: ``facade`` uses the
others, the handlers use ``tokens``, ``store`` and ``wire``; nothing here imports
the agent, apart from ``agent.base.errors`` for the typed errors the CLI maps to exit
codes, because the emulator is an oracle for the agent, not a mirror of it):

* :mod:`.wire`: services, wire constants, the services' exact messages, request
  and response values and error bodies;
* :mod:`.secrets_file`: the YAML secrets file and its own validation;
* :mod:`.tls`: the throw-away CA and server certificate;
* :mod:`.certificates`: certificate-backed secrets (B9): a stable root and
  intermediate CA, leaves with new keys, PKCS#12 and PEM values;
* :mod:`.certificate_wire`: the certificates data plane's bodies (policy,
  certificate, pending operation) the SDKs' ``CertificateClient`` reads;
* :mod:`.tokens`: which identity a request means, minting and checking tokens;
* :mod:`.store`: the vault's secrets, versions and soft-deleted secrets;
* :mod:`.faults`: the injected-fault queue and the answers it gives;
* :mod:`.imds`: the IMDS token endpoint's rules;
* :mod:`.identity_sources`: Azure Arc's HIMDS (its key-file challenge) and App Service's
  identity endpoint, served on the IMDS port (protocol.md A7, A8);
* :mod:`.keyvault`: the Key Vault secrets (and certificates) data plane;
* :mod:`.server`: the loopback HTTP(S) server;
* :mod:`.facade`: :class:`Emulator`, which wires them together;
* :mod:`.demo`: ``kv-agent demo``, the agent run against the emulator.

This package ships apart from the agent (the ``kv-agent-emulator`` .deb and
.rpm, the ``emulator`` extra of the wheel): a VM that runs the agent needs none
of it.
"""

from agent.emulator.certificates import CertificateSpec
from agent.emulator.facade import CERTIFICATE_ROOT_FILE, Emulator, RequestRecord
from agent.emulator.secrets_file import (
    EmulatorFile,
    IdentityConfig,
    UserAssignedIdentity,
    load_emulator_file,
    load_secrets_file,
)
from agent.emulator.tls import CertificatePaths, generate_certificates
from agent.emulator.wire import (
    FORBIDDEN_INNER_CODES,
    IMDS,
    IMDS_IDENTITY_NOT_FOUND,
    IMDS_MISSING_METADATA,
    IMDS_MISSING_RESOURCE,
    IMDS_MULTIPLE_IDENTITIES,
    KV_BAD_API_VERSION,
    KV_BAD_SIGNATURE,
    KV_DELETED_CONFLICT,
    KV_DELETED_NOT_FOUND,
    KV_DISABLED,
    KV_INVALID_NAME,
    KV_MISSING_TOKEN,
    KV_NOT_FOUND,
    KV_THROTTLED,
    KV_TOKEN_EXPIRED,
    KV_WRONG_AUDIENCE,
    SERVICES,
    VAULT,
)

__all__ = [
    "CERTIFICATE_ROOT_FILE",
    "FORBIDDEN_INNER_CODES",
    "IMDS",
    "IMDS_IDENTITY_NOT_FOUND",
    "IMDS_MISSING_METADATA",
    "IMDS_MISSING_RESOURCE",
    "IMDS_MULTIPLE_IDENTITIES",
    "KV_BAD_API_VERSION",
    "KV_BAD_SIGNATURE",
    "KV_DELETED_CONFLICT",
    "KV_DELETED_NOT_FOUND",
    "KV_DISABLED",
    "KV_INVALID_NAME",
    "KV_MISSING_TOKEN",
    "KV_NOT_FOUND",
    "KV_THROTTLED",
    "KV_TOKEN_EXPIRED",
    "KV_WRONG_AUDIENCE",
    "SERVICES",
    "VAULT",
    "CertificatePaths",
    "CertificateSpec",
    "Emulator",
    "EmulatorFile",
    "IdentityConfig",
    "RequestRecord",
    "UserAssignedIdentity",
    "generate_certificates",
    "load_emulator_file",
    "load_secrets_file",
]
