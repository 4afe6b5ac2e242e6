"""What a failed request to the vault means: the one-line VaultError for each
final non-200 answer (a GET of a secret, the list, the challenge) or for a
request that got no usable answer, worded with the fix.

A KeyVaultError body is untrusted: its code, inner code and message are
escaped and bounded (:func:`parse_error`) before they reach a message, and a
body is never quoted whole (a SecretBundle holds the value).
"""

from __future__ import annotations

from typing import Any, Dict, Tuple

import requests

from agent.base import transport
from agent.base.errors import (
    SecretNotFoundError,
    VaultError,
    VaultForbiddenError,
    VaultThrottledError,
    VaultUnavailableError,
)
from agent.base.untrusted import escape, load_json


def json_object(body: bytes) -> Dict[str, Any]:
    """The body as a JSON object, or {} when it is anything else."""
    try:
        content = load_json(body)
    except ValueError:
        return {}
    return content if isinstance(content, dict) else {}


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""


def parse_error(body: bytes) -> Tuple[str, str, str]:
    """(code, inner code, first line of message) of a KeyVaultError body,
    each escaped and bounded; empty strings for whatever is missing or odd."""
    error = json_object(body).get("error")
    if not isinstance(error, dict):
        return "", "", ""
    inner = error.get("innererror")
    inner_code = _text(inner.get("code")) if isinstance(inner, dict) else ""
    lines = _text(error.get("message")).strip().splitlines()
    return (escape(_text(error.get("code")), 100), escape(inner_code, 100),
            escape(lines[0], 300) if lines else "")


def error_for_status(name: str, status: int, body: bytes) -> VaultError:
    """The per-secret error for a final non-200 status, worded with the fix."""
    if status == 404:
        code, inner, _ = parse_error(body)
        detail = f" ({inner or code})" if inner or code else ""
        return SecretNotFoundError(
            f"secret '{name}': not found in the vault (404{detail})",
            "check the name and version in the manifest, or recover a deleted secret")
    return _refusal(f"secret '{name}':", status, body, permission="get",
                    fallback="check the manifest entry")


def _refusal(prefix: str, status: int, body: bytes, *, permission: str,
             fallback: str) -> VaultError:
    """The error for a final non-200 answer to a GET of a secret or of the list,
    ``prefix`` naming what was asked for; ``permission`` is the access-policy
    permission that request needs ('get' or 'list')."""
    code, inner, message = parse_error(body)
    detail = f" ({inner or code})" if inner or code else ""
    if status == 403:
        if inner == "SecretDisabled":
            return VaultForbiddenError(
                f"{prefix} this version is disabled (403 SecretDisabled)",
                "enable it in the vault, or pin an enabled version")
        if inner == "ForbiddenByFirewall":
            return VaultForbiddenError(
                f"{prefix} the vault's firewall refused this VM (403{detail})",
                "allow this VM's network or private endpoint in the vault's networking")
        return VaultForbiddenError(
            f"{prefix} permission denied (403{detail})",
            "grant this VM's identity the 'Key Vault Secrets User' role on the vault, "
            f"or a '{permission}' secret access policy")
    if status == 401:
        return VaultError(f"{prefix} the vault rejected the identity's token (401{detail}: "
                          f"{message})", "check the vault's tenant and the token audience")
    if status == 429:
        return VaultThrottledError(
            f"{prefix} throttled by the vault (429)",
            "the vault's request limit was reached; fewer refreshes or fewer agents")
    if status >= 500 or status == 408:
        return VaultUnavailableError(f"{prefix} the vault kept failing (HTTP {status}{detail})",
                                     "retry later")
    if 300 <= status < 400:
        return VaultError(f"{prefix} the vault answered with a redirect (HTTP {status}); "
                          "not followed, a token never leaves the vault's URL",
                          "use the vault's canonical URL in the manifest")
    return VaultError(f"{prefix} HTTP {status}{detail} {message}".rstrip(), fallback)


def request_failed(vault: str, exc: Exception, prefix: str) -> VaultError:
    """The error for a request that got no usable HTTP answer."""
    if isinstance(exc, requests.exceptions.SSLError):
        return VaultUnavailableError(
            f"{prefix}TLS with vault {vault} failed (certificate not trusted or wrong host)",
            "check the vault URL; for a private CA set REQUESTS_CA_BUNDLE")
    if isinstance(exc, (transport.ResponseTooLargeError, transport.BadResponseError)):
        return VaultError(f"{prefix}vault {vault} sent an unusable response: "
                          f"{transport.describe_failure(exc)}",
                          "check that the manifest's vault URL is a Key Vault")
    if isinstance(exc, transport.AbortedError):
        return VaultUnavailableError(f"{prefix}request to vault {vault} {exc}",
                                     "none: its file is kept as it was")
    if isinstance(exc, transport.DeadlineExceededError):
        return VaultUnavailableError(
            f"{prefix}vault {vault} too slow: {transport.describe_failure(exc)}",
            "check the network path to the vault; retry later")
    return VaultUnavailableError(
        f"{prefix}vault {vault} unreachable ({transport.describe_failure(exc)})",
        "check DNS, network and firewall")


def is_retryable(exc: Exception) -> bool:
    """Connection failures and timeouts are worth another try; a TLS failure
    or a bad body will be the same next time."""
    return not isinstance(exc, (requests.exceptions.SSLError, transport.ResponseTooLargeError,
                                transport.BadResponseError, transport.AbortedError))


def challenge_failed(vault: str, status: int, body: bytes) -> VaultError:
    """The vault kept failing (5xx, 408, 429) before it sent a challenge."""
    if status == 429:
        return VaultThrottledError(
            f"vault {vault}: throttled (429) before it sent its challenge",
            "the vault's request limit was reached; fewer refreshes or fewer agents")
    code, inner, _ = parse_error(body)
    detail = f" ({inner or code})" if inner or code else ""
    return VaultUnavailableError(f"vault {vault} kept failing (HTTP {status}{detail})",
                                 "retry later")



def list_error(vault: str, status: int, body: bytes) -> VaultError:
    """The error for a final non-200 answer to a list request."""
    return _refusal(f"listing vault {vault}:", status, body, permission="list",
                    fallback="check that the manifest's vault URL is a Key Vault")
