"""Injected faults: a first-in first-out queue, and the realistic answer for a faulted request."""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import dataclass

from agent.emulator.wire import (
    IMDS,
    IMDS_FAULT_ERRORS,
    KV_FAULT_ERRORS,
    Response,
    challenge_header,
    imds_error,
    keyvault_error_body,
    status_phrase,
)

# The secret list's path: the only one an ``endless_pages`` fault answers.
LIST_PATH = "/secrets"


@dataclass
class Fault:
    """A queued fault; ``remaining`` counts the matching requests it still hits.

    ``until`` (time.monotonic): when set, the fault hits every matching request
    until then, whatever ``remaining`` says, and is dropped after it.
    ``endless_pages``: authenticated list requests get an empty page whose
    nextLink is always a fresh one, so the list never ends (a cursor that
    never advances); the unauthenticated one still meets the challenge.
    """

    service: str
    status: int | None
    remaining: int
    retry_after: str | None
    drop: bool
    delay_s: float
    path_contains: str | None
    body: bytes | None
    until: float | None = None
    endless_pages: bool = False

    def matches(self, service: str, path: str, has_token: bool = True) -> bool:
        """Whether this fault applies to a request for ``path`` on ``service``
        (``has_token``: it carries an Authorization header)."""
        if self.service != service:
            return False
        if self.endless_pages and (path != LIST_PATH or not has_token):
            return False
        return self.path_contains is None or self.path_contains in path


def endless_page(link_base: str) -> Response:
    """An empty page of the secret list with a fresh nextLink (``endless_pages``)."""
    link = f"{link_base}{LIST_PATH}?api-version=7.6&$skiptoken={uuid.uuid4().hex}&maxresults=25"
    return Response(200, json.dumps({"value": [], "nextLink": link}).encode())


def fault_response(service: str, fault: Fault, tenant_id: str) -> Response:
    """Answer for an injected ``status`` fault: realistic, unless ``body`` overrides it."""
    assert fault.status is not None
    status = fault.status
    headers: list[tuple[str, str]] = []
    if fault.retry_after is not None:
        headers.append(("Retry-After", fault.retry_after))
    phrase = status_phrase(status)
    if fault.body is not None:
        body = fault.body
    elif service == IMDS:
        error, description = IMDS_FAULT_ERRORS.get(status, ("unknown", phrase))
        body = imds_error(status, error, description).body
    else:
        code, message = KV_FAULT_ERRORS.get(
            status, (phrase.replace(" ", ""), phrase + ".")
        )
        body = keyvault_error_body(code, message)
        if status == 401:
            headers.append(challenge_header(tenant_id))
    return Response(status, body, tuple(headers))




class FaultQueue:
    """FIFO of injected faults; the first one matching a request is used."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._faults: list[Fault] = []

    def add(self, fault: Fault) -> None:
        with self._lock:
            self._faults.append(fault)

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()

    def take(self, service: str, path: str, has_token: bool = True) -> Fault | None:
        now = time.monotonic()
        with self._lock:
            self._faults = [f for f in self._faults if f.until is None or now < f.until]
            for fault in self._faults:
                if not fault.matches(service, path, has_token):
                    continue
                if fault.until is not None:
                    return fault  # a timed fault: every request until it ends
                fault.remaining -= 1
                if fault.remaining <= 0:
                    self._faults.remove(fault)
                return fault
        return None
