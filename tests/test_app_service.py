"""App Service / Container Apps identity: the request, expires_on without expires_in,
its error shapes, and the flow through the token cache against the emulator."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Dict, List

import pytest
from requests.structures import CaseInsensitiveDict
from secrecy import assert_no_leak

from agent.base import transport
from agent.base.errors import IdentityUnavailableError
from agent.base.retry import RetryPolicy
from agent.emulator import Emulator
from agent.emulator.secrets_file import IdentityConfig, UserAssignedIdentity
from agent.identity.app_service import (
    APP_SERVICE_API_VERSION,
    AppServiceRequestFactory,
    exposure_warning,
)
from agent.identity.request import AccessToken, Retry, TokenRequest
from agent.identity.selector import Identity
from agent.identity.tokens import token_source
from agent.manifest import Accounts, parse_manifest
from agent.sync.sync import Sync

ENDPOINT = "http://127.0.0.1:9/MSI/token"
RESOURCE = "https://vault.azure.net"
NOW = 1_700_000_000.0
HEADER = "identity-header-" + "h" * 24
CLIENT_ID = "11111111-2222-3333-4444-555555555555"
# Never connected to: the tests below only build requests and factories with it.
FOREIGN_ENDPOINT = "http://10.1.2.3:8081/msi/token"


def reply(status: int, content: Any, **headers: str) -> transport.Reply:
    return transport.Reply(status, CaseInsensitiveDict(headers), json.dumps(content).encode())


@pytest.mark.parametrize("identity, params", [
    (Identity(), {}),
    (Identity("client_id", "c"), {"client_id": "c"}),
    (Identity("object_id", "o"), {"principal_id": "o"}),
    (Identity("resource_id", "/r"), {"mi_res_id": "/r"}),
])
def test_request_shape(identity: Identity, params: Dict[str, str]) -> None:
    """api-version 2019-08-01, App Service's selector names and X-IDENTITY-HEADER; the
    header's value never shows in a repr."""
    factory = AppServiceRequestFactory(ENDPOINT, HEADER, identity)
    request = factory.request(RESOURCE)
    assert request == TokenRequest(
        ENDPOINT, {"api-version": APP_SERVICE_API_VERSION, "resource": RESOURCE, **params},
        {"X-IDENTITY-HEADER": HEADER, "Metadata": "true"})
    assert HEADER not in repr(request) and HEADER not in repr(factory)


def test_expires_on_without_expires_in() -> None:
    """The token's expiry comes from expires_on alone (epoch seconds or a date)."""
    factory = AppServiceRequestFactory(ENDPOINT, HEADER, Identity())
    sent = factory.request(RESOURCE)
    body = {"access_token": "t" * 30, "expires_on": str(int(NOW) + 3600), "resource": RESOURCE,
            "token_type": "Bearer"}
    token = factory.answer(sent, reply(200, body), RESOURCE, NOW)
    assert isinstance(token, AccessToken) and token.expires_on == NOW + 3600
    dated = factory.answer(sent, reply(200, {**body, "expires_on": "11/14/2023 22:13:20 +00:00"}),
                           RESOURCE, NOW)
    assert isinstance(dated, AccessToken) and dated.expires_on == NOW


@pytest.mark.parametrize("status, identity, hint", [
    (401, Identity(), "IDENTITY_HEADER"),
    (403, Identity(), "IDENTITY_HEADER"),
    (400, Identity(), "az webapp identity assign"),
    (404, Identity("client_id", "c"), "user-assigned"),
])
def test_refusals_quote_the_platform_message_and_give_the_fix(
        status: int, identity: Identity, hint: str) -> None:
    """{"statusCode", "message"} refusals name the source, the status, the message, the fix."""
    factory = AppServiceRequestFactory(ENDPOINT, HEADER, identity)
    with pytest.raises(IdentityUnavailableError) as caught:  # refused: request_token's call
        factory.answer(factory.request(RESOURCE),
                       reply(status, {"statusCode": status, "message": "No such\nthing"}),
                       RESOURCE, NOW)
    message = str(caught.value)
    assert f"App Service identity at {ENDPOINT}" in message and f"HTTP {status}" in message
    assert "No such thing" in message and "\n" not in message
    assert caught.value.hint and hint in caught.value.hint


def test_transient_statuses_are_retries() -> None:
    """429 and 5xx are retried with Retry-After and the platform's message."""
    factory = AppServiceRequestFactory(ENDPOINT, HEADER, Identity())
    sent = factory.request(RESOURCE)
    assert factory.answer(sent, reply(429, {"statusCode": 429, "message": "busy"},
                                      **{"Retry-After": "2"}), RESOURCE, NOW) == \
        Retry(429, "busy", 2.0)
    assert factory.answer(sent, reply(500, {"statusCode": 500, "message": "x"}),
                          RESOURCE, NOW) == Retry(500, "x", None)


# -- against the emulator ----------------------------------------------------


def app_environ(emulator: Emulator, header: str) -> Dict[str, str]:
    return {"IDENTITY_ENDPOINT": emulator.app_service_endpoint, "IDENTITY_HEADER": header,
            # IMDS_ENDPOINT set too: App Service still wins (it is checked first)
            "IMDS_ENDPOINT": emulator.imds_base}


def test_app_service_flow_against_the_emulator(caplog: pytest.LogCaptureFixture) -> None:
    """auto picks App Service; one GET with the header gets a token the cache serves."""
    caplog.set_level(logging.DEBUG)
    with Emulator({"db": "v"}) as emulator:
        tokens = token_source(Identity(), app_environ(emulator, emulator.identity_header),
                              RetryPolicy(deadline_s=5), exists=lambda path: False)
        try:
            assert tokens.source.source == "app-service"
            token = tokens.get_token(RESOURCE)
            assert tokens.get_token(RESOURCE) is token
        finally:
            tokens.close()
        (record,) = emulator.imds_log
        assert record.path == "/MSI/token" and record.status == 200
        assert record.query["api-version"] == APP_SERVICE_API_VERSION
        assert_no_leak(caplog.text, [emulator.identity_header], [token.token])


def test_user_assigned_by_principal_id_against_the_emulator() -> None:
    """object_id in the manifest is sent as principal_id and the emulator finds it."""
    config = IdentityConfig(system_assigned=False, user_assigned=(
        UserAssignedIdentity(CLIENT_ID, "22222222-2222-3333-4444-555555555555", "/s/x"),))
    with Emulator(identities=config) as emulator:
        tokens = token_source(Identity("object_id", "22222222-2222-3333-4444-555555555555"),
                              app_environ(emulator, emulator.identity_header),
                              RetryPolicy(deadline_s=5))
        try:
            tokens.get_token(RESOURCE)
        finally:
            tokens.close()
        assert emulator.imds_log[0].query["principal_id"].startswith("2222")


@pytest.mark.parametrize("identity, header, fragment", [
    (Identity(), "stale-header", "HTTP 401 X-IDENTITY-HEADER is missing or invalid"),
    (Identity("client_id", CLIENT_ID), None,
     "HTTP 400 No Managed Identity found for specified ClientId/ResourceId/PrincipalId."),
])
def test_emulator_errors_reach_the_operator(identity: Identity, header: Any,
                                            fragment: str) -> None:
    """A stale header and an unknown identity are final, one line, with the fix."""
    slept: List[float] = []
    with Emulator({"db": "v"}) as emulator:
        tokens = token_source(identity, app_environ(emulator, header or emulator.identity_header),
                              RetryPolicy(deadline_s=5), sleep=slept.append)
        try:
            with pytest.raises(IdentityUnavailableError) as caught:
                tokens.get_token(RESOURCE)
        finally:
            tokens.close()
        assert fragment in str(caught.value) and caught.value.hint
        assert emulator.imds_requests == 1 and not slept
        assert emulator.identity_header not in str(caught.value)


def test_app_service_shares_retry_after() -> None:
    """A 429 with Retry-After is waited out by the shared retry loop, then the token comes."""
    slept: List[float] = []
    with Emulator({"db": "v"}) as emulator:
        emulator.inject_fault("imds", 429, retry_after="3")
        tokens = token_source(Identity(), app_environ(emulator, emulator.identity_header),
                              RetryPolicy(deadline_s=5), sleep=slept.append)
        try:
            tokens.get_token(RESOURCE)
        finally:
            tokens.close()
        assert [record.status for record in emulator.imds_log] == [429, 200]
        assert slept and slept[0] >= 3


def test_app_service_source_without_its_environment_is_a_clear_error() -> None:
    """identity.source: app-service on a machine without IDENTITY_HEADER says so at start."""
    with pytest.raises(IdentityUnavailableError, match="IDENTITY_HEADER"):
        token_source(Identity(source="app-service"), {"IDENTITY_ENDPOINT": ENDPOINT})


# -- an endpoint that would send the header in clear over the network -----------------


@pytest.mark.parametrize("source, endpoint, warned", [
    ("app-service", FOREIGN_ENDPOINT, True),
    ("app-service", "HTTP://app.internal:8081/msi/token", True),
    ("app-service", "http://[::1", True),  # unparseable: not provably loopback
    ("app-service", "http://127.0.0.1:41741/MSI/token", False),
    ("app-service", "http://localhost:4141/MSI/token", False),
    ("app-service", "http://[::1]:4141/MSI/token", False),
    ("app-service", "https://10.1.2.3:8081/msi/token", False),
    ("imds", "http://169.254.169.254/metadata/identity/oauth2/token", False),
    ("arc", "http://10.1.2.3:40342/metadata/identity/oauth2/token", False),
])
def test_exposure_warning_only_for_plain_http_beyond_loopback(
        source: str, endpoint: str, warned: bool) -> None:
    """Only App Service over plain HTTP to a host that is not loopback is warned about,
    naming the endpoint, the header and the fix."""
    exposure = exposure_warning(source, endpoint)
    assert (exposure is not None) == warned
    if exposure is not None:
        assert "plain HTTP" in exposure.message and "IDENTITY_HEADER" in exposure.message
        assert "\n" not in exposure.message and "IDENTITY_ENDPOINT" in exposure.fix


@pytest.mark.parametrize("endpoint, warnings", [
    (FOREIGN_ENDPOINT, 1), ("http://127.0.0.1:9/MSI/token", 0)])
def test_agent_warns_once_at_start_about_a_cleartext_endpoint(
        endpoint: str, warnings: int, shm_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Building the agent under App Service's variables with a plain-HTTP endpoint on
    another host logs one warning (without the header), and sends nothing."""
    accounts = Accounts(user=lambda name: {"root": 0}.get(name), group=lambda name: None)
    manifest = parse_manifest(
        f"vault: https://contoso.vault.azure.net\ndirectory: {shm_dir}\nsecrets:\n"
        "  - name: db\n", "m.yaml", accounts=accounts, check_filesystem=False)
    caplog.set_level(logging.INFO)
    agent = Sync(manifest, environ={"IDENTITY_ENDPOINT": endpoint, "IDENTITY_HEADER": HEADER})
    try:
        assert agent.tokens.source.source == "app-service"
    finally:
        agent.close()
    warned = [record.getMessage() for record in caplog.records
              if record.levelno == logging.WARNING]
    assert len(warned) == warnings
    assert all("10.1.2.3" in line and "plain HTTP" in line for line in warned)
    assert HEADER not in caplog.text
