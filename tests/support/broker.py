"""RabbitMQ for the tests: a publisher that acts like the trading engine, ``rabbitmqctl``
look-ups of a worker's queues and connections, and :class:`TcpProxy`, which stands
between a gateway and the broker to make the broker unreachable on demand (the real
server is shared and never stopped, but by test_broker_restart.py in CI).
"""

from __future__ import annotations

import contextlib
import re
import secrets
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from typing import Any

import orjson
import pika

from support import AMQP_URL
from support.wire import reset_socket

BROKER = ("127.0.0.1", 5672)  # the real broker, where TcpProxy forwards


def unique(prefix: str = "m") -> str:
    """A market name no other test uses."""
    return f"{prefix}{secrets.token_hex(4)}"


class Publisher:
    """Publishes events to a topic exchange like the trading engine does."""

    def __init__(self, exchange: str) -> None:
        self.exchange = exchange
        self.conn = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
        self.channel = self.conn.channel()
        self.channel.exchange_declare(exchange, exchange_type="topic", durable=False)

    def publish(self, routing_key: str, body: Any) -> None:
        if not isinstance(body, bytes):
            body = body.encode() if isinstance(body, str) else orjson.dumps(body)
        self.channel.basic_publish(self.exchange, routing_key, body)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.conn.close()


def rabbitmqctl(*args: str, timeout: float = 30) -> list[str]:
    """Run ``rabbitmqctl <args> -q``; its output lines (an error if it fails)."""
    out = subprocess.run(
        ["rabbitmqctl", *args, "-q"], capture_output=True, text=True, timeout=timeout, check=True
    ).stdout
    return out.splitlines()


def _instance_re(pid: int) -> re.Pattern[str]:
    # rango.instance.<host>.<pid>.<hex>; the host may itself contain dots.
    return re.compile(rf"rango\.instance\.\S+\.{pid}\.[0-9a-f]+")


def queues_of(*pids: int) -> dict[int, list[str]]:
    """The broker's queues that belong to each Rango worker in ``pids`` (one look-up)."""
    names = [line.strip() for line in rabbitmqctl("list_queues", "name")]
    return {pid: [n for n in names if _instance_re(pid).fullmatch(n)] for pid in pids}


def amqp_connections_of(pid: int) -> list[str]:
    """Erlang pids of the broker connections a Rango worker ``pid`` named after its queue."""
    pattern = _instance_re(pid)
    found = []
    for line in rabbitmqctl("list_connections", "pid", "client_properties"):
        conn_pid, _, props = line.partition("\t")
        match = re.search(r'\{"connection_name","([^"]*)"\}', props)
        if match and pattern.fullmatch(match.group(1)):
            found.append(conn_pid.strip())
    return found


def close_amqp_connection(conn_pid: str, reason: str = "test") -> None:
    rabbitmqctl("close_connection", conn_pid, reason)


class TcpProxy:
    """Forwards TCP connections from a free local port to ``upstream``.

    Made with ``listening=False``, the port is bound but not listening: the kernel
    refuses connections, as when nothing runs there. :meth:`listen` starts
    accepting; :meth:`on` also forwards. :meth:`off` resets every connection
    accepted from then on (counted in ``refused``) and cuts the connections it
    is forwarding, both ways. With ``cut_after``, each forwarded connection is reset
    that many seconds after it was accepted (a node that drops every connection).
    """

    def __init__(
        self, upstream: tuple[str, int], enabled: bool = True, listening: bool = True,
        cut_after: float | None = None,
    ) -> None:
        self.upstream = upstream
        self.cut_after = cut_after
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
                reset_socket(sock)

    def close(self) -> None:
        self._closed = True
        self.off()
        if self._thread is not None:
            self._thread.join(2)
        self._listener.close()

    def _accept_loop(self) -> None:
        for client in _accepted(self._listener, lambda: self._closed):
            with self._lock:
                enabled = self.enabled
                if not enabled:
                    self.refused += 1
            if not enabled:
                reset_socket(client)
                continue
            try:
                upstream = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                reset_socket(client)
                continue
            upstream.settimeout(None)
            client.settimeout(None)
            with self._lock:
                if not self.enabled:  # switched off meanwhile
                    self.refused += 1
                    reset_socket(client)
                    reset_socket(upstream)
                    continue
                self.accepted += 1
                self._pairs.append((client, upstream))
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=_pump, args=(src, dst), daemon=True).start()
            if self.cut_after is not None:
                cut = threading.Timer(self.cut_after, self._cut, args=(client, upstream))
                cut.daemon = True
                cut.start()

    def _cut(self, client: socket.socket, upstream: socket.socket) -> None:
        with self._lock:
            if (client, upstream) in self._pairs:
                self._pairs.remove((client, upstream))
        reset_socket(client)
        reset_socket(upstream)


def _accepted(listener: socket.socket, closed: Callable[[], bool]) -> Iterator[socket.socket]:
    """Connections accepted on ``listener`` (which has a short timeout, so that ``closed``
    is polled) until ``closed()`` or the listener is closed."""
    while not closed():
        try:
            sock, _ = listener.accept()
        except TimeoutError:
            continue
        except OSError:
            return
        yield sock


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    for sock in (src, dst):
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


class StallingBroker:
    """A fake node that answers the AMQP handshake as RabbitMQ does (Connection.Start,
    Tune, OpenOk, built with pika's own frame classes) and then never answers
    Channel.Open: a node that accepts logins but stalls on everything after them.
    ``stalled`` counts the Channel.Open frames left unanswered."""

    def __init__(self) -> None:
        self.stalled = 0
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(8)
        self._listener.settimeout(0.05)
        self.port: int = self._listener.getsockname()[1]
        self._closed = False
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._accept_loop, daemon=True).start()

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.close()

    def _accept_loop(self) -> None:
        for conn in _accepted(self._listener, lambda: self._closed):
            self._conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        from pika import frame, spec

        def send(method: Any) -> None:
            conn.sendall(frame.Method(0, method).marshal())

        conn.settimeout(None)
        buffer = b""
        try:
            while len(buffer) < 8:  # the protocol header, b"AMQP\0\0\x09\x01"
                buffer += conn.recv(8 - len(buffer)) or b"!" * 8
            buffer = b""
            send(spec.Connection.Start(server_properties={"product": "stalling"},
                                       mechanisms="PLAIN", locales="en_US"))  # fmt: skip
            while data := conn.recv(65536):
                buffer += data
                while True:
                    consumed, decoded = frame.decode_frame(buffer)
                    if decoded is None:
                        break
                    buffer = buffer[consumed:]
                    method = getattr(decoded, "method", None)
                    if isinstance(method, spec.Connection.StartOk):
                        send(spec.Connection.Tune(channel_max=2047, frame_max=131072,
                                                  heartbeat=10))  # fmt: skip
                    elif isinstance(method, spec.Connection.Open):
                        send(spec.Connection.OpenOk())
                    elif isinstance(method, spec.Channel.Open):
                        self.stalled += 1  # and never an OpenOk
        except OSError:
            pass
