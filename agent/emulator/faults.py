"""Injected faults: a first-in first-out queue, and the realistic answer for a faulted request."""

from __future__ import annotations

import threading
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


@dataclass
class Fault:
    """A queued fault; ``remaining`` counts the matching requests it still hits."""

    service: str
    status: int | None
    remaining: int
    retry_after: str | None
    drop: bool
    delay_s: float
    path_contains: str | None
    body: bytes | None


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

    def take(self, service: str, path: str) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.service != service:
                    continue
                if fault.path_contains is not None and fault.path_contains not in path:
                    continue
                fault.remaining -= 1
                if fault.remaining <= 0:
                    self._faults.remove(fault)
                return fault
        return None
