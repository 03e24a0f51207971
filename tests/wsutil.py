"""Helpers shared by the end-to-end test modules (answers, markers, a raw client, metrics)."""

from __future__ import annotations

import base64
import contextlib
import os
import re
import socket
import struct
import threading
import time
from typing import Any

import orjson
from conftest import recv_json, wait_for
from websockets.sync.client import ClientConnection


def subscribed(streams: list[str]) -> dict[str, Any]:
    return {"success": {"message": "subscribed", "streams": streams}}


def unsubscribed(streams: list[str]) -> dict[str, Any]:
    return {"success": {"message": "unsubscribed", "streams": streams}}


def cannot(stream: str) -> dict[str, Any]:
    return {"success": {"message": f"cannot subscribe to {stream}"}}


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


# A raw websocket client, for clients that must misbehave or split bytes freely.


def upgrade_request(port: int, path: str, headers: dict[str, str] | None = None) -> bytes:
    """A websocket upgrade request with a fresh key and any extra ``headers``."""
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
        *(f"{name}: {value}" for name, value in (headers or {}).items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class RawClient:
    """A websocket client written by hand: frames are sent exactly as given."""

    def __init__(
        self,
        port: int,
        path: str = "/public",
        headers: dict[str, str] | None = None,
        pipelined: bytes = b"",
    ) -> None:
        """Upgrade; ``pipelined`` bytes go in the same write, right behind the request."""
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.sock.sendall(upgrade_request(port, path, headers) + pipelined)
        self.buffer = b""
        while b"\r\n\r\n" not in self.buffer:
            self._read()
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        self.status = int(head.split(b" ", 2)[1])

    def _read(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise EOFError("server closed the connection")
        self.buffer += data

    def _take(self, n: int) -> bytes:
        while len(self.buffer) < n:
            self._read()
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    @staticmethod
    def frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
        """A masked client frame."""
        head = bytes([(0x80 if fin else 0) | opcode])
        n = len(payload)
        if n < 126:
            head += bytes([0x80 | n])
        elif n < 65536:
            head += bytes([0x80 | 126]) + struct.pack("!H", n)
        else:
            head += bytes([0x80 | 127]) + struct.pack("!Q", n)
        mask = os.urandom(4)
        return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_frame(self) -> tuple[bool, int, bytes]:
        """``(fin, opcode, payload)`` of the next server frame."""
        b0, b1 = self._take(2)
        assert not b1 & 0x80, "server frames are never masked"
        n = b1 & 0x7F
        if n == 126:
            (n,) = struct.unpack("!H", self._take(2))
        elif n == 127:
            (n,) = struct.unpack("!Q", self._take(8))
        return bool(b0 & 0x80), b0 & 0x0F, self._take(n)

    def recv_text(self) -> str:
        fin, opcode, payload = self.recv_frame()
        assert (fin, opcode) == (True, 0x1), (fin, opcode, payload)
        return payload.decode()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def upgrade_status(
    port: int, path: str = "/public", headers: dict[str, str] | None = None, first: int = 0
) -> int:
    """Send an upgrade request of any size; return the status of the answer (0: none).

    The request is written from a thread: the server may answer and close before it
    has read all of it. With ``first``, the first ``first`` bytes go in a TCP segment
    of their own.
    """
    data = upgrade_request(port, path, headers)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def write() -> None:
            with contextlib.suppress(OSError):  # refused before the end: expected
                if first:
                    sock.sendall(data[:first])
                    time.sleep(0.1)  # the server reads the first segment alone
                sock.sendall(data[first:])

        writer = threading.Thread(target=write, daemon=True)
        writer.start()
        answer = b""
        with contextlib.suppress(ConnectionResetError):
            while b"\r\n" not in answer and (chunk := sock.recv(4096)):
                answer += chunk
        writer.join(10)
    status = answer.split(b" ", 2)[1] if answer.startswith(b"HTTP/1.1 ") else b"0"
    return int(status)


# Metrics.

_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def samples(metrics: dict[str, float], name: str) -> list[tuple[dict[str, str], float]]:
    """Samples of metric ``name`` as ``(labels, value)``."""
    found = []
    for key, value in metrics.items():
        metric, _, labels = key.partition("{")
        if metric == name:
            found.append((dict(_LABEL.findall(labels)), value))
    return found


def sample(metrics: dict[str, float], name: str, **labels: str) -> float | None:
    """The value of the sample of ``name`` with exactly ``labels``; None if absent."""
    for found, value in samples(metrics, name):
        if found == labels:
            return value
    return None


def counter(rango: Any, name: str, **labels: str) -> float:
    """A counter (or gauge) of ``rango``'s endpoint; an absent series reads 0."""
    return sample(rango.metrics(), name, **labels) or 0.0


def wait_counter(rango: Any, name: str, value: float, **labels: str) -> float:
    """Until the counter reaches ``value`` (workers' counters arrive asynchronously)."""
    wait_for(
        lambda: counter(rango, name, **labels) >= value,
        10,
        f"{name}{labels} >= {value} (now {counter(rango, name, **labels)})",
    )
    return counter(rango, name, **labels)
