"""Link 2 of the chain, and the token half of link 3: which identity source
answers (IMDS, Azure Arc, App Service, as
:func:`agent.identity.tokens.choose_source` decides), which identity its token
is for (client and object id from the token's claims, read without verifying;
the token itself is never shown), whether its endpoint would get the
credential in clear, and whether the token the agent would send to a vault is
for the audience that vault needs.

The checks ask the agent's own token cache, so what doctor sees is what the
agent sees. No token ever reaches a check: only its claims, escaped and
bounded.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Dict, List, Mapping, NamedTuple, Optional, Tuple

from agent.base.errors import KvAgentError
from agent.base.untrusted import escape, load_json
from agent.doctor.report import FAIL, OK, WARN, Check, vault_label
from agent.identity.app_service import exposure_warning
from agent.identity.tokens import TokenCache

MAX_TOKEN_CHARS = 16 * 1024  # a managed-identity JWT is ~1.5 KB
# An object id goes into the printed grant (secret_links.refusal_fix) only in
# this shape, so a hostile token cannot put shell syntax into a line an operator
# pastes.
_GUID = re.compile(r"[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}\Z")


class IdentityFindings(NamedTuple):
    """What the identity checks learnt: the cache to ask for more tokens
    (None when it failed) and the identity's object id (None if unknown)."""

    tokens: Optional[TokenCache]
    object_id: Optional[str]
    checks: Tuple[Check, ...]


def check_endpoint(tokens: TokenCache) -> List[Check]:
    """A warning when the identity endpoint would get its credential in clear
    over the network (App Service over plain HTTP to another host; the
    agent logs the same at start), else nothing. Sends nothing."""
    exposure = exposure_warning(tokens.source.source, tokens.endpoint)
    if exposure is None:
        return []
    return [Check("identity", "endpoint", WARN, exposure.message, exposure.fix)]


def check_identity(tokens: TokenCache, audience: str) -> IdentityFindings:
    """Which identity source answers, and for which identity (from the
    token's claims; the token itself is never kept in a check)."""
    source = tokens.source.describe()
    try:
        token = tokens.get_token(audience)
    except KvAgentError as exc:
        return IdentityFindings(None, None, (Check("identity", "source", FAIL,
                                                   f"{source}: {exc.message}", exc.hint),))
    claims = token_claims(token.token)
    object_id = claims.get("oid")
    client_id = claims.get("appid") or claims.get("azp")
    checks = [Check("identity", "source", OK, f"{source} answers at {tokens.endpoint}")]
    if not object_id:
        checks.append(Check("identity", "principal", WARN,
                            "the token's claims could not be read (not a JWT): "
                            "which identity is unknown"))
        return IdentityFindings(tokens, None, tuple(checks))
    resource_id = claims.get("xms_mirid")
    detail = (f"client id {client_id or '?'}, object id {object_id}"
              + (f", {resource_id}" if resource_id else "")
              + (f", tenant {claims['tid']}" if claims.get("tid") else ""))
    checks.append(Check("identity", "principal", OK, detail))
    return IdentityFindings(tokens, object_id if _GUID.match(object_id) else None,
                            tuple(checks))


def token_claims(token: str) -> Dict[str, str]:
    """The string claims of a JWT's payload (``aud``, ``appid``, ``oid`` ...),
    decoded WITHOUT verifying (doctor only reports them), each escaped and
    bounded; {} for anything that is not a JWT. Never the token itself."""
    parts = token.split(".")
    if len(token) > MAX_TOKEN_CHARS or len(parts) != 3:
        return {}
    try:
        payload = base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4))
        content = load_json(payload)
    except (binascii.Error, ValueError):
        return {}
    if not isinstance(content, dict):
        return {}
    return {key: escape(value, 200) for key, value in content.items()
            if key in ("aud", "appid", "azp", "oid", "tid", "xms_mirid")
            and isinstance(value, str)}


def check_audience(tokens: TokenCache, vault: str, audience: str,
                   environ: Mapping[str, str]) -> Check:
    """Whether the token the agent would send to ``vault`` is for the
    audience it needs (its ``aud`` claim, exactly: a trailing slash counts
    [protocol.md B1])."""
    subject = f"vault {vault_label(vault)}"
    try:
        token = tokens.get_token(audience)
    except KvAgentError as exc:
        return Check(subject, "audience", FAIL, f"no token for {audience}: {exc.message}",
                     exc.hint)
    found = token_claims(token.token).get("aud")
    if found is None:
        return Check(subject, "audience", WARN,
                     f"the token's audience cannot be read (not a JWT); the vault needs "
                     f"{audience}")
    if found == audience:
        return Check(subject, "audience", OK, f"the token's audience is {audience}, "
                                              "as the vault needs")
    source = tokens.source.source
    endpoint = {"imds": "KV_AGENT_IMDS_ENDPOINT", "arc": "IDENTITY_ENDPOINT",
                "app-service": "IDENTITY_ENDPOINT"}.get(source, "the identity endpoint")
    where = escape(environ.get(endpoint, ""), 100)
    return Check(subject, "audience", FAIL,
                 f"the token is for '{found}', the vault needs '{audience}' "
                 "(it would answer 401 AKV10022)",
                 f"the identity endpoint{f' {where}' if where else ''} ignored "
                 f"resource={audience}: point {endpoint} at the real {source} endpoint "
                 "(or unset it)")
