"""Tools for the failure tests: a switchable TCP proxy, a hand-made websocket client,
and ``rabbitmqctl`` look-ups.

Nothing here talks to Rango's code: the tests drive real processes from the outside.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import re
import socket
import struct
import subprocess
import threading
import time

__all__ = [
    "OP_CLOSE",
    "OP_PING",
    "OP_PONG",
    "OP_TEXT",
    "RawClient",
    "TcpProxy",
    "accepts",
    "amqp_connections_of",
    "close_amqp_connection",
    "queues_of",
    "ready_status",
    "worker_pids",
]

OP_TEXT, OP_CLOSE, OP_PING, OP_PONG = 0x1, 0x8, 0x9, 0xA
_WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_LINGER_RESET = struct.pack("ii", 1, 0)  # close() sends RST instead of FIN


class TcpProxy:
    """Forwards TCP connections from a free local port to ``upstream``.

    Made with ``listening=False``, the port is bound but not listening: the kernel
    refuses connections, as when nothing runs there. :meth:`listen` starts
    accepting; :meth:`on` also forwards. :meth:`off` resets every connection
    accepted from then on (counted in ``refused``) and cuts the connections it
    is forwarding, both ways.
    """

    def __init__(
        self, upstream: tuple[str, int], enabled: bool = True, listening: bool = True
    ) -> None:
        self.upstream = upstream
        self.enabled = enabled
        self.accepted = 0  # connections forwarded
        self.refused = 0  # connections accepted and reset while off
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))  # reserves the port; refuses until listen()
        self._listener.settimeout(0.05)
        self.port: int = self._listener.getsockname()[1]
        self._closed = False
        self._thread: threading.Thread | None = None
        if listening:
            self.listen()

    def listen(self) -> None:
        if self._thread is None:
            self._listener.listen(64)
            self._thread = threading.Thread(target=self._accept_loop, daemon=True)
            self._thread.start()

    def on(self) -> None:
        self.enabled = True
        self.listen()

    def off(self) -> None:
        """Refuse new connections and cut the ones in progress."""
        with self._lock:
            self.enabled = False
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            for sock in pair:
                _reset(sock)

    def close(self) -> None:
        self._closed = True
        self.off()
        if self._thread is not None:
            self._thread.join(2)
        self._listener.close()

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                enabled = self.enabled
                if not enabled:
                    self.refused += 1
            if not enabled:
                _reset(client)
                continue
            try:
                upstream = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                _reset(client)
                continue
            upstream.settimeout(None)
            client.settimeout(None)
            with self._lock:
                if not self.enabled:  # switched off meanwhile
                    self.refused += 1
                    _reset(client)
                    _reset(upstream)
                    continue
                self.accepted += 1
                self._pairs.append((client, upstream))
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=_pump, args=(src, dst), daemon=True).start()


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    for sock in (src, dst):
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def _reset(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


class RawClient:
    """A websocket client written by hand, to misbehave in ways a library will not:
    never read, never answer pings, never finish the handshake."""

    def __init__(self, port: int, rcvbuf: int | None = None, timeout: float = 5.0) -> None:
        self.port = port
        self.sock = socket.socket()
        if rcvbuf is not None:  # before connect(), so the window starts small
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.connect(("127.0.0.1", port))
        self.buffer = b""

    def handshake(self, path: str = "/public", query: str = "") -> None:
        """Send the upgrade request and check the 101 answer."""
        key = base64.b64encode(os.urandom(16)).decode()
        target = path + (f"?{query}" if query else "")
        self.sock.sendall(
            f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        while b"\r\n\r\n" not in self.buffer:
            data = self.sock.recv(4096)
            if not data:
                raise AssertionError(f"connection closed during the handshake: {self.buffer!r}")
            self.buffer += data
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        assert lines[0].startswith("HTTP/1.1 101"), head
        accept = base64.b64encode(hashlib.sha1((key + _WS_GUID).encode()).digest()).decode()
        fields = (line.partition(":") for line in lines[1:])
        headers = {name.strip().lower(): value.strip() for name, _, value in fields}
        assert headers.get("sec-websocket-accept") == accept, head

    def send_frame(self, opcode: int, payload: bytes = b"") -> None:
        """One masked, final frame (clients must mask)."""
        mask = os.urandom(4)
        size = len(payload)
        if size < 126:
            header = struct.pack("!BB", 0x80 | opcode, 0x80 | size)
        elif size < 1 << 16:
            header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, size)
        else:
            header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, size)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(header + mask + masked)

    def read_frame(self, timeout: float = 5.0) -> tuple[int, bytes] | None:
        """The next frame as ``(opcode, payload)``; ``None`` at EOF or reset."""
        deadline = time.monotonic() + timeout
        try:
            self._fill(2, deadline)
            first, second = self.buffer[0], self.buffer[1]
            size, offset = second & 0x7F, 2
            if size == 126:
                self._fill(4, deadline)
                size, offset = struct.unpack("!H", self.buffer[2:4])[0], 4
            elif size == 127:
                self._fill(10, deadline)
                size, offset = struct.unpack("!Q", self.buffer[2:10])[0], 10
            assert not second & 0x80, "server frames must not be masked"
            self._fill(offset + size, deadline)
        except EOFError:
            return None
        payload = self.buffer[offset : offset + size]
        self.buffer = self.buffer[offset + size :]
        return first & 0x0F, payload

    def read_until_closed(self, timeout: float = 5.0) -> bool:
        """Read and discard until EOF or reset; ``False`` if still open at ``timeout``."""
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

    def _fill(self, size: int, deadline: float) -> None:
        while len(self.buffer) < size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no complete frame in time")
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:
                data = b""
            if not data:
                raise EOFError
            self.buffer += data

    def close(self) -> None:
        _reset(self.sock)


def _rabbitmqctl(*args: str) -> list[str]:
    out = subprocess.run(
        ["rabbitmqctl", *args, "-q"], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    return out.splitlines()


def _instance_re(pid: int) -> re.Pattern[str]:
    # rango.instance.<host>.<pid>.<hex>; the host may itself contain dots.
    return re.compile(rf"rango\.instance\.\S+\.{pid}\.[0-9a-f]+")


def amqp_connections_of(pid: int) -> list[str]:
    """Erlang pids of the broker connections a Rango worker ``pid`` named after its queue."""
    pattern = _instance_re(pid)
    found = []
    for line in _rabbitmqctl("list_connections", "pid", "client_properties"):
        conn_pid, _, props = line.partition("\t")
        match = re.search(r'\{"connection_name","([^"]*)"\}', props)
        if match and pattern.fullmatch(match.group(1)):
            found.append(conn_pid.strip())
    return found


def queues_of(*pids: int) -> dict[int, list[str]]:
    """The broker's queues that belong to each Rango worker in ``pids`` (one look-up)."""
    names = [line.strip() for line in _rabbitmqctl("list_queues", "name")]
    return {pid: [n for n in names if _instance_re(pid).fullmatch(n)] for pid in pids}


def close_amqp_connection(conn_pid: str, reason: str = "test") -> None:
    subprocess.run(
        ["rabbitmqctl", "close_connection", conn_pid, reason],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip


def worker_pids(pid: int) -> list[int]:
    """Pids of the worker processes a ``rango`` supervisor ``pid`` runs now."""
    pids: list[int] = []
    with contextlib.suppress(FileNotFoundError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                pids.extend(int(child) for child in f.read().split())
    return sorted(pids)


def ready_status(rango: object) -> int | None:
    """The HTTP status of ``/ready`` on the metrics port; ``None`` if not listening yet."""
    try:
        return rango.http("/ready")[0]  # type: ignore[attr-defined]
    except OSError:
        return None


def accepts(port: int) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:``port``."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False
