"""A validating fake of requests.Session for unit tests (no sockets).

Each scripted reply is a (status, headers, body) tuple or an exception to
raise; every request is recorded so tests can assert on its exact shape.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple, Union

import requests
from requests.structures import CaseInsensitiveDict

Reply = Union[Tuple[int, Dict[str, str], bytes], BaseException]


@dataclass
class Sent:
    url: str
    params: Dict[str, str]
    headers: Dict[str, str]
    kwargs: Dict[str, Any]


class FakeResponse:
    def __init__(self, status: int, headers: Mapping[str, str], body: bytes) -> None:
        self.status_code = status
        self.headers = CaseInsensitiveDict(headers)
        self._body = body
        self.closed = False

    def iter_content(self, size: int) -> Iterator[bytes]:
        for start in range(0, len(self._body), size):
            yield self._body[start:start + size]

    @property
    def raw(self) -> "FakeResponse":
        """urllib3's raw response, as far as agent.base.transport reads it."""
        return self

    def stream(self, size: int, decode_content: bool = True) -> Iterator[bytes]:
        return self.iter_content(size)

    def close(self) -> None:
        self.closed = True


class FakeSession:
    def __init__(self, *replies: Reply) -> None:
        self.replies: List[Reply] = list(replies)
        self.sent: List[Sent] = []

    def get(self, url: str, params: Optional[Dict[str, str]] = None,
            headers: Optional[Dict[str, str]] = None, **kwargs: Any) -> FakeResponse:
        assert "timeout" in kwargs, "every request needs a timeout"
        assert kwargs.get("allow_redirects") is False, "redirects must never be followed"
        self.sent.append(Sent(url, dict(params or {}), dict(headers or {}), kwargs))
        if not self.replies:
            raise AssertionError(f"unexpected request to {url}")
        reply = self.replies.pop(0)
        if isinstance(reply, BaseException):
            raise reply
        return FakeResponse(*reply)


def json_reply(status: int, content: Any, **headers: str) -> Tuple[int, Dict[str, str], bytes]:
    return status, dict(headers), json.dumps(content).encode()


def refused() -> requests.ConnectionError:
    return requests.ConnectionError("[Errno 111] Connection refused")


class FakeClock:
    """Monotonic time that advances only when something sleeps."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: List[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
