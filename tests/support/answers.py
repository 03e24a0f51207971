"""The gateway's answers as PROTOCOL.md words them, and the ways to ask for them over a
websockets client: ``subscribed``/``unsubscribed``/``cannot`` frames, requests, the
next frame expected, an error, a refused upgrade, a connection still alive.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import ClientConnection


def subscribed(streams: list[str]) -> dict[str, Any]:
    return {"success": {"message": "subscribed", "streams": streams}}


def unsubscribed(streams: list[str]) -> dict[str, Any]:
    return {"success": {"message": "unsubscribed", "streams": streams}}


def cannot(stream: str) -> dict[str, Any]:
    return {"success": {"message": f"cannot subscribe to {stream}"}}


def recv_json(ws: ClientConnection, timeout: float = 5.0) -> Any:
    """The next frame, parsed."""
    return orjson.loads(ws.recv(timeout=timeout))


def request(ws: ClientConnection, event: str, streams: Any) -> None:
    ws.send(orjson.dumps({"event": event, "streams": streams}).decode())


def subscribe(ws: ClientConnection, streams: list[str]) -> Any:
    """Send a subscribe request and return the answer."""
    request(ws, "subscribe", streams)
    return recv_json(ws)


def expect(ws: ClientConnection, frame: Any, timeout: float = 5.0) -> None:
    """The next frame received is ``frame`` (so nothing else came before it)."""
    assert recv_json(ws, timeout) == frame


def expect_error(ws: ClientConnection) -> str:
    """The next frame is ``{"error": "<readable reason>"}``; return the reason."""
    answer = recv_json(ws)
    assert isinstance(answer, dict) and set(answer) == {"error"}, answer
    assert isinstance(answer["error"], str) and answer["error"].strip(), answer
    return answer["error"]


def assert_alive(ws: ClientConnection) -> None:
    """The connection is open and answers requests."""
    ws.send("ping")
    assert ws.recv(timeout=5) == "pong"


def answered_with_an_error(gateway: Any, message: Any) -> None:
    """On a new connection to ``gateway``, ``message`` is answered with an error frame and
    the connection stays open."""
    with gateway.connect() as ws:
        expect(ws, subscribed([]))
        ws.send(message)
        expect_error(ws)
        assert_alive(ws)


def refused(gateway: Any, path: str, headers: dict[str, str] | None = None, **kwargs: Any) -> int:
    """Connect to ``gateway`` (a :class:`support.gateway.Rango`); the HTTP status of the
    refused upgrade."""
    with pytest.raises(InvalidStatus) as info:
        gateway.connect(path, additional_headers=headers or {}, **kwargs).close()
    return info.value.response.status_code
