"""The wire, byte by byte: upgrade requests, websocket frames, and one raw client for
clients a websocket library will not let us write (frames split or pipelined anywhere,
invalid ones, a client that never reads or never answers a ping).

Also websockets' own handshake answer to any request bytes, the reference the
gateway's fast path is held to.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import socket
import struct
import threading
import time

from websockets.http11 import Request
from websockets.server import ServerProtocol

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
RFC_KEY = "dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455 §1.3's example
LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER so that close() sends RST, not FIN


def accept_key(key: str) -> str:
    """The ``Sec-WebSocket-Accept`` answering ``Sec-WebSocket-Key: key``."""
    return base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()


def upgrade_request(
    port: int, path: str, headers: dict[str, str] | None = None, key: str | None = None
) -> bytes:
    """A websocket upgrade request with a fresh key (or ``key``) and any extra ``headers``."""
    key = key or base64.b64encode(os.urandom(16)).decode()
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


def request_head(*lines: str, target: str = "/public", first: str | None = None) -> bytes:
    """A request head without its final blank line (what ``rango.handshake.parse`` takes)."""
    request_line = first if first is not None else f"GET {target} HTTP/1.1"
    return "\r\n".join((request_line, *lines)).encode("latin-1")


# The header lines of a usual upgrade request, for :func:`request_head`.
BASE_HEADERS = (
    "Host: example.com",
    "Upgrade: websocket",
    "Connection: Upgrade",
    f"Sec-WebSocket-Key: {RFC_KEY}",
    "Sec-WebSocket-Version: 13",
)


def websockets_answer(head: bytes) -> tuple[Request | None, int, dict[str, str]]:
    """What websockets' own server protocol makes of the request ``head``.

    Returns the parsed request (None if it could not parse one), the status it
    answers and the answer's headers.
    """
    ws = ServerProtocol()
    ws.receive_data(head + b"\r\n\r\n")
    requests = [e for e in ws.events_received() if isinstance(e, Request)]
    if requests:
        response = ws.accept(requests[0])
    else:  # websockets answered a request it could not parse by itself
        data = b"".join(ws.data_to_send())
        return None, int(data.split(b" ", 2)[1]) if data else 0, {}
    return requests[0], response.status_code, dict(response.headers.raw_items())


def reset_socket(sock: socket.socket) -> None:
    """Close ``sock`` with a TCP reset instead of a FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


class RawClient:
    """A websocket client written by hand: frames are sent exactly as given.

    The upgrade request goes out at once (``pipelined`` bytes in the same write,
    right behind it) and the answer's head is read: ``status`` and ``headers``;
    :meth:`upgraded` checks it is a valid 101. ``rcvbuf`` sets the receive buffer
    before connecting, so a client that stops reading fills its window quickly.
    """

    def __init__(
        self,
        port: int,
        path: str = "/public",
        headers: dict[str, str] | None = None,
        pipelined: bytes = b"",
        *,
        rcvbuf: int | None = None,
        timeout: float = 5.0,
    ) -> None:
        self.sock = socket.socket()
        if rcvbuf is not None:  # before connect(), so the window starts small
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.connect(("127.0.0.1", port))
        self.timeout = timeout
        self.key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(upgrade_request(port, path, headers, self.key) + pipelined)
        self.buffer = b""
        deadline = time.monotonic() + timeout
        while b"\r\n\r\n" not in self.buffer:
            self._read(deadline)
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        self.head = head.decode("latin-1")
        status_line, *lines = self.head.split("\r\n")
        self.status = int(status_line.split(" ", 2)[1])
        fields = (line.partition(":") for line in lines)
        self.headers = {name.strip().lower(): value.strip() for name, _, value in fields}

    def upgraded(self) -> RawClient:
        """Check that the server switched protocols, with the right accept key."""
        assert self.status == 101, self.head
        assert self.headers.get("sec-websocket-accept") == accept_key(self.key), self.head
        return self

    def _read(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("nothing complete from the server in time")
        self.sock.settimeout(remaining)
        data = self.sock.recv(65536)
        if not data:
            raise EOFError("server closed the connection")
        self.buffer += data

    def _take(self, n: int, deadline: float) -> bytes:
        while len(self.buffer) < n:
            self._read(deadline)
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

    def recv_frame(self, timeout: float | None = None) -> tuple[bool, int, bytes]:
        """``(fin, opcode, payload)`` of the next server frame, within ``timeout``
        (the client's own by default). EOFError at the end of the stream."""
        b0, payload = self.recv_raw_frame(timeout)
        return bool(b0 & 0x80), b0 & 0x0F, payload

    def recv_frame_rsv(self, timeout: float | None = None) -> tuple[bool, int, bytes]:
        """``(rsv1, opcode, payload)`` of the next server frame, which must be final."""
        b0, payload = self.recv_raw_frame(timeout)
        assert b0 & 0x80, "a fragmented server frame"
        assert not b0 & 0x30, "RSV2/RSV3 set"
        return bool(b0 & 0x40), b0 & 0x0F, payload

    def recv_raw_frame(self, timeout: float | None = None) -> tuple[int, bytes]:
        """The first byte and the payload of the next server frame."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        b0, b1 = self._take(2, deadline)
        assert not b1 & 0x80, "server frames are never masked"
        n = b1 & 0x7F
        if n == 126:
            (n,) = struct.unpack("!H", self._take(2, deadline))
        elif n == 127:
            (n,) = struct.unpack("!Q", self._take(8, deadline))
        return b0, self._take(n, deadline)

    def recv_text(self) -> str:
        fin, opcode, payload = self.recv_frame()
        assert (fin, opcode) == (True, OP_TEXT), (fin, opcode, payload)
        return payload.decode()

    def read_until_closed(self, timeout: float = 5.0) -> bool:
        """Read and discard until EOF or reset; False if still open at ``timeout``."""
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                self.sock.settimeout(max(0.01, deadline - time.monotonic()))
                try:
                    if not self.sock.recv(65536):
                        return True
                except TimeoutError:
                    return False
        except OSError:  # ECONNRESET
            return True
        return False

    def close(self, reset: bool = False) -> None:
        """Close the connection (with a TCP reset when ``reset``)."""
        if reset:
            reset_socket(self.sock)
        else:
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


def exchange(port: int, data: bytes, until: bytes) -> bytes:
    """Send ``data``; return the answer up to ``until``, or until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(data)
        answer = b""
        while not answer.endswith(until):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
        return answer


def half_handshake(port: int) -> None:
    """Send the start of an upgrade request, then vanish with a reset."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"GET /public HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 1000)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
