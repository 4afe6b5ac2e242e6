"""Managed-identity tokens: which identity a request means, minting, and the vault's check.

Tokens are HS256 JWTs signed with a random per-instance key (real ones are
RS256; nobody but this emulator's own vault checks the signature). IMDS's
server-side cache makes a repeated request return the same token with a
smaller ``expires_in`` (protocol.md A5).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from agent.emulator.secrets_file import IdentityConfig
from agent.emulator.wire import (
    DEFAULT_VM_RESOURCE_ID,
    IMDS_IDENTITY_NOT_FOUND,
    IMDS_MULTIPLE_IDENTITIES,
    KEYVAULT_RESOURCE,
    KV_BAD_SIGNATURE,
    KV_TOKEN_EXPIRED,
    KV_WRONG_AUDIENCE,
    TOKEN_CLOCK_SKEW_S,
    TOKEN_ISSUED_BEFORE_S,
    TOKEN_LIFETIME_S,
    TOKEN_REISSUE_MARGIN_S,
    b64url,
    b64url_decode,
    json_bytes,
)


@dataclass(frozen=True)
class _Identity:
    """The identity a token is issued for."""

    client_id: str
    object_id: str
    resource_id: str


@dataclass(frozen=True)
class _CachedToken:
    """IMDS's server-side cache entry, so ``expires_in`` counts down (protocol.md A2)."""

    access_token: str
    not_before: int
    expires_on: int


class TokenRejectedError(Exception):
    """A bearer token the vault does not accept; the message is the 401 message."""




class TokenIssuer:
    """Mints and checks the emulator's managed-identity tokens.

    IMDS keeps a cache per (identity, resource) for about a day (protocol.md A5),
    so a repeated request returns the same token with a smaller ``expires_in``.
    """

    def __init__(
        self, tenant_id: str, identities: IdentityConfig, clock: Callable[[], float]
    ) -> None:
        self.tenant_id = tenant_id
        self.clock = clock
        self.identities = identities
        self.lifetime_s = TOKEN_LIFETIME_S
        self._key = os.urandom(32)
        self._lock = threading.Lock()
        self._cache: dict[tuple[str, str], _CachedToken] = {}

    @property
    def issuer(self) -> str:
        return f"https://sts.windows.net/{self.tenant_id}/"

    def resolve(self, selectors: Mapping[str, str]) -> _Identity:
        """Pick the identity a token request means (protocol.md A9 item 4).

        Raises ``LookupError`` with the IMDS error description.
        """
        config = self.identities
        if selectors:
            ((kind, wanted),) = selectors.items()
            for uami in config.user_assigned:
                if getattr(uami, kind).lower() == wanted.lower():
                    return _Identity(uami.client_id, uami.object_id, uami.msi_res_id)
            raise LookupError(IMDS_IDENTITY_NOT_FOUND)
        if config.system_assigned:
            return _Identity(
                config.system_client_id, config.system_object_id, DEFAULT_VM_RESOURCE_ID
            )
        if len(config.user_assigned) == 1:
            # A VM with one user-assigned identity answers with it (MSAL docstring, A9).
            uami = config.user_assigned[0]
            return _Identity(uami.client_id, uami.object_id, uami.msi_res_id)
        if config.user_assigned:
            raise LookupError(IMDS_MULTIPLE_IDENTITIES)
        raise LookupError(IMDS_IDENTITY_NOT_FOUND)

    def issue(self, identity: _Identity, resource: str, now: int) -> _CachedToken:
        """Return the cached token for (identity, resource), minting one when none is fresh."""
        key = (identity.client_id.lower(), resource)
        margin = min(TOKEN_REISSUE_MARGIN_S, self.lifetime_s // 2)
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None and cached.expires_on - now > margin:
                return cached
            token = self._mint(identity, resource, now)
            self._cache[key] = token
            return token

    def _mint(self, identity: _Identity, resource: str, now: int) -> _CachedToken:
        expires_on = now + self.lifetime_s
        issued_at = now - TOKEN_ISSUED_BEFORE_S
        claims = {
            "aud": resource,
            "iss": self.issuer,
            "iat": issued_at,
            "nbf": issued_at,
            "exp": expires_on,
            "appid": identity.client_id,
            "appidacr": "2",
            "idp": self.issuer,
            "idtyp": "app",
            "oid": identity.object_id,
            "sub": identity.object_id,
            "tid": self.tenant_id,
            "uti": b64url(os.urandom(16)),
            "ver": "1.0",
            "xms_mirid": identity.resource_id,
        }
        return _CachedToken(self._sign(claims), issued_at, expires_on)

    def _sign(self, claims: Mapping[str, object]) -> str:
        header = b64url(
            json_bytes({"typ": "JWT", "alg": "HS256", "kid": "kv-agent-emulator"})
        )
        payload = b64url(json_bytes(claims))
        signing_input = f"{header}.{payload}".encode("ascii")
        signature = hmac.new(self._key, signing_input, hashlib.sha256).digest()
        return f"{header}.{payload}.{b64url(signature)}"

    def verify(self, token: str, now: float) -> dict[str, Any]:
        """Claims of a valid Key Vault token; raises TokenRejectedError with the 401 message."""
        parts = token.split(".")
        if len(parts) != 3:
            raise TokenRejectedError(KV_BAD_SIGNATURE)
        signing_input = f"{parts[0]}.{parts[1]}".encode("ascii", "replace")
        expected = hmac.new(self._key, signing_input, hashlib.sha256).digest()
        try:
            signature = b64url_decode(parts[2])
            claims = json.loads(b64url_decode(parts[1]))
        # json.JSONDecodeError and UnicodeDecodeError are ValueErrors too.
        except ValueError as exc:
            raise TokenRejectedError(KV_BAD_SIGNATURE) from exc
        if not hmac.compare_digest(signature, expected) or not isinstance(claims, dict):
            raise TokenRejectedError(KV_BAD_SIGNATURE)
        if not _number_at_least(claims.get("exp"), now):
            raise TokenRejectedError(KV_TOKEN_EXPIRED)
        if not _number_at_least(now + TOKEN_CLOCK_SKEW_S, claims.get("nbf", 0)):
            # Managed HSM's wording (protocol.md B5 issue list) [unverified for vaults].
            raise TokenRejectedError("Token not yet valid")
        if claims.get("aud") != KEYVAULT_RESOURCE:
            raise TokenRejectedError(KV_WRONG_AUDIENCE.format(aud=claims.get("aud")))
        return claims


def _number_at_least(value: object, floor: object) -> bool:
    numbers = (int, float)
    return (
        isinstance(value, numbers)
        and isinstance(floor, numbers)
        and not isinstance(value, bool)
        and value >= floor
    )
