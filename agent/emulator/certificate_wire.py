"""The certificates data plane's bodies: policy, certificate bundle, pending operation.

What the official SDKs' ``CertificateClient`` reads (``begin_create_certificate``,
``get_certificate``, ``get_certificate_version``, ``get_certificate_policy``,
``get_certificate_operation``, ``list_properties_of_certificates`` and its
versions), shaped like the recorded exchanges of azure-sdk-for-js's
keyvault-certificates tests and Microsoft's documented create/get sample
(protocol.md B9). Pure: no I/O, no crypto beyond a SHA-1 thumbprint.

A create is asked with a policy; the emulator maps the parts it can issue
(key type, exportable, content type, DNS names, validity) onto its
:class:`~agent.emulator.certificates.CertificateSpec` and refuses, with a
400 naming the field, what it cannot (an RSA size but 2048, a curve but
P-256, an issuer but ``Self``). The subject is always ``CN=<name>``, and a
policy without DNS names gets the emulator's default (``localhost``): the
policy read back says so.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from agent.emulator.certificates import DEFAULT_SANS, PEM, PKCS12, CertificateSpec

RSA_KEY_SIZE = 2048  # what IssuingChain issues (certificates._new_key)
EC_CURVE = "P-256"
_KEY_TYPES = {"RSA": "rsa", "RSA-HSM": "rsa", "EC": "ec", "EC-HSM": "ec"}
_DAYS_PER_YEAR = 365
MAX_VALIDITY_MONTHS = 1200  # secrets_file caps validity_days at 36,500
SERVER_AUTH, CLIENT_AUTH = "1.3.6.1.5.5.7.3.1", "1.3.6.1.5.5.7.3.2"  # the leaf's EKUs
CREATE_STATUS_DETAILS = (
    "Pending certificate created. Certificate request is in progress. This may take some "
    "time based on the issuer provider. Please check again later."
)  # the recorded 202 body's wording (B9)
CREATE_RETRY_AFTER_S = "0"  # real: 10; the emulator has issued by then
CERTIFICATE_NOT_FOUND = (
    "A certificate with (name/id) {name} was not found in this key vault. If you recently "
    "deleted this certificate you may be able to recover it using the correct recovery "
    "command. For help resolving this issue, please see "
    "https://go.microsoft.com/fwlink/?linkid=2125182"
)  # the SecretNotFound wording, for certificates [unverified]
PENDING_NOT_FOUND = "Pending certificate not found: {name}"  # [unverified]


@dataclass(frozen=True)
class CreateRequest:
    """A create's body: the policy's CertificateSpec fields (None: keep the
    current policy), and the attributes' ``enabled`` and the tags, when given."""

    fields: Mapping[str, Any] | None = None
    enabled: bool | None = None
    tags: Mapping[str, str] | None = None


def policy_fields(policy: object) -> dict[str, Any]:
    """The CertificateSpec fields a create's ``policy`` asks for (``parse_certificate``
    checks them again); raises ValueError naming the field the emulator cannot issue.
    Fields it has no use for (subject, key usages, lifetime actions) are ignored."""
    if not isinstance(policy, Mapping):
        raise ValueError("The certificate policy must be a JSON object.")  # noqa: TRY004
    key = _part(policy, "key_props")
    secret = _part(policy, "secret_props")
    x509 = _part(policy, "x509_props")
    issuer = _part(policy, "issuer")
    kty = key.get("kty") or "RSA"
    if kty not in _KEY_TYPES:
        raise ValueError(f"key_props.kty '{kty}' is not one of {', '.join(_KEY_TYPES)}.")
    key_type = _KEY_TYPES[kty]
    if key_type == "rsa" and key.get("key_size") not in (None, RSA_KEY_SIZE):
        raise ValueError(f"key_props.key_size: the emulator issues RSA {RSA_KEY_SIZE} only.")
    if key_type == "ec" and key.get("crv") not in (None, EC_CURVE):
        raise ValueError(f"key_props.crv: the emulator issues EC {EC_CURVE} only.")
    fields: dict[str, Any] = {"key_type": key_type}
    if key.get("exportable") is not None:
        fields["exportable"] = key["exportable"]
    content_type = secret.get("contentType") or PKCS12
    if content_type not in (PKCS12, PEM):
        raise ValueError(f"secret_props.contentType must be {PKCS12} or {PEM}.")
    fields["content_type"] = content_type
    sans = _part(x509, "sans").get("dns_names")
    if sans:
        fields["sans"] = sans
    months = x509.get("validity_months")
    if months is not None:
        if isinstance(months, bool) or not isinstance(months, int) or not (
                1 <= months <= MAX_VALIDITY_MONTHS):
            raise ValueError(
                f"x509_props.validity_months must be a whole number from 1 to "
                f"{MAX_VALIDITY_MONTHS}.")
        fields["validity_days"] = months * _DAYS_PER_YEAR // 12
    issuer_name = issuer.get("name") or "Self"
    if not isinstance(issuer_name, str) or issuer_name.lower() != "self":
        raise ValueError(f"issuer.name '{issuer_name}': the emulator issues only as 'Self'.")
    return fields


def _part(parent: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = parent.get(name)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(f"The certificate policy's {name} must be a JSON object.")
    return value


def policy_body(name: str, spec: CertificateSpec, policy_id: str, created: int,
                updated: int) -> dict[str, Any]:
    """The CertificatePolicy a certificate issued under ``spec`` reports (B9's sample)."""
    if spec.key_type == "ec":
        key: dict[str, Any] = {"exportable": spec.exportable, "kty": "EC", "key_size": 256,
                               "reuse_key": False, "crv": EC_CURVE}
        usages = ["digitalSignature"]
    else:
        key = {"exportable": spec.exportable, "kty": "RSA", "key_size": RSA_KEY_SIZE,
               "reuse_key": False}
        usages = ["digitalSignature", "keyEncipherment"]
    return {
        "id": policy_id,
        "key_props": key,
        "secret_props": {"contentType": spec.content_type},
        "x509_props": {
            "subject": f"CN={name}",
            "sans": {"dns_names": list(spec.sans or DEFAULT_SANS)},
            "ekus": [SERVER_AUTH, CLIENT_AUTH],
            "key_usage": usages,
            "validity_months": max(1, round(spec.validity_days * 12 / _DAYS_PER_YEAR)),
            "basic_constraints": {"ca": False},
        },
        "lifetime_actions": [{"trigger": {"lifetime_percentage": 80},
                              "action": {"action_type": "AutoRenew"}}],
        "issuer": {"name": "Self"},
        "attributes": {"enabled": True, "created": created, "updated": updated},
    }


def thumbprint(cer: bytes) -> str:
    """``x5t``: base64url of the certificate's SHA-1 digest, unpadded (as recorded)."""
    digest = hashlib.sha1(cer, usedforsecurity=False).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def certificate_bundle(base: str, name: str, version: str, cer: bytes,
                       attributes: Mapping[str, object], tags: Mapping[str, str] | None,
                       policy: Mapping[str, Any] | None, has_pending: bool
                       ) -> dict[str, Any]:
    """A CertificateBundle: ids of the certificate, its key and its secret (one
    name and version, B9), thumbprint, DER (standard base64), attributes, then
    the policy and the pending operation's id, in the recorded key order."""
    body: dict[str, Any] = {
        "id": f"{base}/certificates/{name}/{version}",
        "kid": f"{base}/keys/{name}/{version}",
        "sid": f"{base}/secrets/{name}/{version}",
        "x5t": thumbprint(cer),
        "cer": base64.b64encode(cer).decode("ascii"),
        "attributes": dict(attributes),
    }
    if tags is not None:
        body["tags"] = dict(tags)
    if policy is not None:
        body["policy"] = dict(policy)
    if has_pending:
        body["pending"] = {"id": f"{base}/certificates/{name}/pending"}
    return body


def certificate_item(base: str, name: str, version: str | None, cer: bytes,
                     attributes: Mapping[str, object], tags: Mapping[str, str] | None
                     ) -> dict[str, Any]:
    """A CertificateItem of a list: unversioned id for the certificates list,
    versioned for a certificate's versions [unverified: no ``subject``]."""
    item: dict[str, Any] = {
        "id": f"{base}/certificates/{name}" + (f"/{version}" if version else ""),
        "x5t": thumbprint(cer),
        "attributes": dict(attributes),
    }
    if tags is not None:
        item["tags"] = dict(tags)
    return item


def operation_body(base: str, name: str, request_id: str, *, is_done: bool
                   ) -> dict[str, Any]:
    """A CertificateOperation: ``inProgress`` (the 202 to a create, as the real
    service always answers it) or ``completed`` with the unversioned target
    (what GET .../pending then says). No ``csr``: the emulator signs at once."""
    body: dict[str, Any] = {
        "id": f"{base}/certificates/{name}/pending",
        "issuer": {"name": "Self"},
        "cancellation_requested": False,
    }
    if is_done:
        body.update(status="completed", target=f"{base}/certificates/{name}")
    else:
        body.update(status="inProgress", status_details=CREATE_STATUS_DETAILS)
    body["request_id"] = request_id
    return body
