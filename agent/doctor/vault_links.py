"""Link 3 of the chain, per vault: can it be reached? DNS (through the
injected lookup, bounded), then one unauthenticated request through the
agent's own vault client and its bounded transport: the connection, the TLS
handshake (verified against the CA bundle the agent uses) and the 401
challenge, which names the audience the vault's token must have.

Each failure says which of them broke and the one thing to fix. Whether the
token is for that audience is the identity's link
(:func:`agent.doctor.identity_links.check_audience`).
"""

from __future__ import annotations

import ipaddress
from typing import Callable, List, Mapping, NamedTuple, Optional, Tuple
from urllib.parse import urlsplit

import requests

from agent.base import transport
from agent.base.errors import VaultError
from agent.base.hosts import is_loopback_host
from agent.base.untrusted import escape
from agent.doctor.report import FAIL, OK, WARN, Check, vault_label
from agent.vault.audience import audience_for_host, audience_from_challenge, parse_challenge
from agent.vault.client import VaultClient, proxies_for
from agent.vault.failures import parse_error


class VaultReach(NamedTuple):
    """A vault's DNS, TLS and challenge checks, and the audience its token
    must have (None when the vault could not be reached or asked)."""

    audience: Optional[str]
    checks: Tuple[Check, ...]


def check_vault(client: VaultClient, vault: str, environ: Mapping[str, str],
                resolve: Callable[[str], List[str]]) -> VaultReach:
    """DNS, then one unauthenticated request: the connection, TLS and the
    401 challenge, and from them the audience the vault's token needs."""
    subject = f"vault {vault_label(vault)}"
    host = urlsplit(vault).hostname or ""
    checks = [_check_dns(subject, host, proxies_for(vault, environ), resolve)]
    if checks[0].state == FAIL:
        return VaultReach(None, tuple(checks))
    ca = ca_in_use(environ)
    try:
        reply = client.knock(vault)
    except VaultError as exc:
        return VaultReach(None, (*checks, Check(subject, "url", FAIL, exc.message, exc.hint)))
    except requests.exceptions.SSLError as exc:
        return VaultReach(None, (*checks, _tls_failure(subject, exc, ca, environ)))
    except requests.RequestException as exc:
        return VaultReach(None, (*checks, _connection_failure(subject, vault, exc)))
    checks.append(Check(subject, "tls", OK, f"certificate verified against {ca}"))
    challenge = reply.headers.get("WWW-Authenticate", "")
    if reply.status != 401 or not parse_challenge(challenge):
        code, inner, _ = parse_error(reply.body)
        detail = f" ({inner or code})" if inner or code else ""
        checks.append(Check(subject, "challenge", FAIL,
                            f"no Key Vault challenge to an unauthenticated request "
                            f"(HTTP {reply.status}{detail})",
                            "check that the manifest's vault URL is the Key Vault's "
                            "(https://<name>.vault.azure.net)"))
        return VaultReach(None, tuple(checks))
    params = parse_challenge(challenge)
    asked = escape(params.get("resource") or params.get("scope") or "?", 100)
    try:
        audience = audience_for_host(host) or audience_from_challenge(host, challenge)
    except VaultError as exc:
        checks.append(Check(subject, "challenge", FAIL, exc.message, exc.hint))
        return VaultReach(None, tuple(checks))
    authority = escape(params.get("authorization") or params.get("authorization_uri") or "?",
                       120)
    checks.append(Check(subject, "challenge", OK,
                        f"401 challenge asks for {asked} (authority {authority})"))
    return VaultReach(audience, tuple(checks))


def _check_dns(subject: str, host: str, proxies: Mapping[str, str],
               resolve: Callable[[str], List[str]]) -> Check:
    if is_loopback_host(host) or is_address(host):
        return Check(subject, "dns", OK, f"{host} is an address, no lookup needed")
    if proxies:
        return Check(subject, "dns", WARN,
                     f"{host} is reached through the proxy {escape(proxies['https'], 100)}, "
                     "which resolves it; not looked up here")
    try:
        addresses = resolve(host)
    except OSError as exc:
        return Check(subject, "dns", FAIL, f"{host} does not resolve ({escape(exc, 100)})",
                     "check the vault name in the manifest; for a private endpoint, the "
                     "privatelink.vaultcore.azure.net DNS zone linked to this network")
    return Check(subject, "dns", OK, f"{host} resolves to {', '.join(addresses[:3])}")


def ca_in_use(environ: Mapping[str, str]) -> str:
    """The CA bundle the agent verifies vaults with, in words."""
    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        if environ.get(name):
            return f"{environ[name]} ({name})"
    # requests' default: certifi's bundle (Debian's and Fedora's packages point
    # it at the system's store).
    return f"the default CA bundle {requests.utils.DEFAULT_CA_BUNDLE_PATH}"


def _tls_failure(subject: str, exc: Exception, ca: str, environ: Mapping[str, str]) -> Check:
    text = str(exc)
    if "hostname" in text.lower() or "doesn't match" in text:
        why = "the certificate is for another host name"
    elif "CERTIFICATE_VERIFY_FAILED" in text:
        why = "the certificate is not signed by a CA in the bundle"
    else:
        why = "the TLS handshake failed"
    if environ.get("REQUESTS_CA_BUNDLE") or environ.get("CURL_CA_BUNDLE"):
        fix = ("point REQUESTS_CA_BUNDLE at the PEM of the CA that signed the vault's "
               "certificate (or unset it for the default bundle)")
    else:
        fix = ("for a private CA (a TLS-inspecting proxy), set REQUESTS_CA_BUNDLE to its PEM "
               "in the unit's environment; else check the vault URL")
    return Check(subject, "tls", FAIL, f"not verified against {ca}: {why}", fix)


def _connection_failure(subject: str, vault: str, exc: Exception) -> Check:
    address = urlsplit(vault).netloc
    cause = transport.describe_failure(exc)
    if isinstance(exc, requests.Timeout):
        return Check(subject, "connection", FAIL,
                     f"no answer from {address}: timed out ({cause})",
                     f"check the network path to {address}: a firewall, NSG or proxy that "
                     "drops packets looks like this")
    return Check(subject, "connection", FAIL, f"cannot connect to {address} ({cause})",
                 f"check the vault URL and that {address} is reachable from this machine "
                 "(firewall, private endpoint, proxy)")


def is_address(text: str) -> bool:
    """Whether ``text`` is an IP address (IPv6 with or without brackets): one
    needs no lookup, and only one goes into a printed firewall rule."""
    try:
        ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return False
    return True
