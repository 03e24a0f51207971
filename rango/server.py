"""The websocket edge: a lean ``asyncio.Protocol`` per connection.

Each connection hosts websockets' sans-I/O :class:`~websockets.server.ServerProtocol`,
which validates the handshake and parses client frames, close, ping and pong.
Outgoing event frames bypass it: the hub hands every subscriber the same
pre-encoded frame, the connection queues a reference, and the server writes each
connection's queue with one ``write()`` per event-loop iteration.

No task, queue or timer exists per connection: keepalive, handshake timeouts and
flushing are done by the :class:`Server` for all connections at once.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from urllib.parse import urlsplit

from websockets.datastructures import Headers
from websockets.frames import CloseCode, Opcode
from websockets.http11 import Request
from websockets.protocol import State
from websockets.server import ServerProtocol

from .auth import ANONYMOUS, Auth, Authenticator, AuthError
from .config import Config
from .hub import Hub
from .metrics import Metrics
from .protocol import PING, PONG, ClientError, error, parse_query_streams, parse_request, text_frame

__all__ = ["Connection", "Server"]

OP_TEXT, OP_BINARY, OP_CONT, OP_PONG = Opcode.TEXT, Opcode.BINARY, Opcode.CONT, Opcode.PONG

log = logging.getLogger("rango.server")
# websockets logs each connection at info; keep it out of Rango's info level.
_ws_logger = logging.getLogger("websockets.server")

_SEND_EOF = b""


class Connection(asyncio.Protocol):
    """One websocket client."""

    __slots__ = (
        "auth",
        "fragments",
        "fragments_binary",
        "last_seen",
        "pending",
        "ping_sent",
        "registered",
        "server",
        "subscriptions",
        "transport",
        "ws",
    )

    def __init__(self, server: Server) -> None:
        self.server = server
        self.ws = ServerProtocol(max_size=server.config.max_frame_size, logger=_ws_logger)
        self.transport: asyncio.Transport | None = None
        self.auth: Auth = ANONYMOUS
        self.subscriptions: dict[str, None] = {}
        self.pending: list[bytes] | None = None
        self.fragments: list[bytes] | None = None
        self.fragments_binary = False  # the opcode of the first fragment was BINARY
        self.last_seen = time.monotonic()
        self.ping_sent = 0.0
        # True once the hub knows the connection (after the 101 answer). Not the
        # websocket state: a request cut short by EOF leaves CONNECTING for CLOSED
        # without ever being upgraded, and must not be counted out of the hub.
        self.registered = False

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        server = self.server
        server.connections.discard(self)
        if self.registered:
            self.registered = False
            server.hub.disconnect(self)
            log.debug("client gone (%s), %d subscriptions", self.auth.uid or "anonymous",
                      len(self.subscriptions))
        self.pending = None
        self.transport = None

    def data_received(self, data: bytes) -> None:
        ws = self.ws
        ws.receive_data(data)
        for event in ws.events_received():
            if isinstance(event, Request):
                self._handshake(event)
            else:
                self._frame(event.opcode, event.data, event.fin)
        self._send_protocol_data()
        if ws.state is State.OPEN:
            # Any frame proves the peer alive. Before the upgrade the clock keeps
            # running from the connection's start: a request trickled one byte at
            # a time still meets the handshake timeout.
            self.last_seen = time.monotonic()
            self.ping_sent = 0.0

    def eof_received(self) -> bool:
        self.ws.receive_eof()
        self._send_protocol_data()
        return False

    # Outgoing

    def push(self, frame: bytes) -> None:
        """Queue a pre-encoded frame; the server writes it this loop iteration."""
        pending = self.pending
        if pending is None:
            if self.transport is None:
                return
            self.pending = [frame]
            self.server.mark_dirty(self)
        else:
            pending.append(frame)

    def send(self, frame: bytes) -> None:
        """Queue an answer of this connection's own, after the events already routed."""
        self.server.hub.flush()
        self.push(frame)

    def close(self, code: int = CloseCode.GOING_AWAY, reason: str = "") -> None:
        """Start the closing handshake after what is queued; no-op if not open."""
        if self.ws.state is State.OPEN and self.transport is not None:
            self.last_seen = time.monotonic()  # the peer gets ping_timeout to answer
            self.server.hub.flush()
            self.server.flush_one(self)
            self.ws.send_close(code, reason)
            self._send_protocol_data()
            # No data frame may follow a close frame (RFC 6455 5.5.1): leave the
            # hub now rather than when the peer answers or the socket is gone.
            if self.registered:
                self.registered = False
                self.server.hub.disconnect(self)

    def _send_protocol_data(self) -> None:
        transport = self.transport
        if transport is None:
            return
        for data in self.ws.data_to_send():
            if data is _SEND_EOF or not data:
                # Anything queued by the hub goes before the end of the stream.
                self.server.flush_one(self)
                if transport.can_write_eof():
                    transport.write_eof()
                transport.close()
                return
            if self.pending:
                self.server.flush_one(self)
            transport.write(data)

    # Handshake

    def _handshake(self, request: Request) -> None:
        server = self.server
        status, reason = server.check_request(self, request)
        if status:
            server.metrics.rejected(status)
            response = self.ws.reject(status, reason + "\n")
        else:
            response = self.ws.accept(request)
            if response.status_code != 101:
                server.metrics.rejected(response.status_code)
        self.ws.send_response(response)
        if response.status_code != 101:
            log.debug("upgrade refused: %d %s", response.status_code, reason)
            return
        self._send_protocol_data()  # the 101 response goes before any frame
        streams = parse_query_streams(urlsplit(request.path).query)
        self.registered = True
        server.hub.connect(self, streams)
        if server.draining:
            self.close(CloseCode.GOING_AWAY, "server shutting down")

    # Incoming frames

    def _frame(self, opcode: object, data: bytes, fin: bool) -> None:
        if opcode is OP_TEXT or opcode is OP_BINARY:
            binary = opcode is OP_BINARY
            if not fin:
                self.fragments = [data]
                self.fragments_binary = binary
                return
        elif opcode is OP_CONT:
            if self.fragments is None:
                return  # websockets already failed the connection
            self.fragments.append(data)
            if not fin:
                return
            data = b"".join(self.fragments)
            self.fragments = None
            binary = self.fragments_binary
        elif opcode is OP_PONG:
            return
        else:
            return  # ping is answered and close handled by websockets
        if self.ws.state is not State.OPEN:
            return
        if binary:
            self.send(text_frame(error("binary frames are not supported, send text")))
            return
        self._message(data)

    def _message(self, data: bytes) -> None:
        text = data.strip()
        if not text:
            return
        if text == b"ping":
            self.send(PONG)
            return
        try:
            request = parse_request(text.decode())
        except ClientError as exc:
            self.send(text_frame(error(str(exc))))
            return
        except UnicodeDecodeError:
            self.ws.fail(CloseCode.INVALID_DATA, "invalid UTF-8")
            return
        hub = self.server.hub
        if request.event == "subscribe":
            hub.subscribe(self, request.streams)
        else:
            hub.unsubscribe(self, request.streams)


class Server:
    """Accepts websocket connections for one worker and writes their frames."""

    def __init__(self, config: Config, hub: Hub, metrics: Metrics) -> None:
        self.config = config
        self.hub = hub
        self.metrics = metrics
        self.authenticator = Authenticator(config)
        self.connections: set[Connection] = set()
        self._dirty: list[Connection] = []
        self._flush_scheduled = False
        self._loop = asyncio.get_running_loop()
        self._listener: asyncio.AbstractServer | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._auth_log = _AuthLog()
        hub.wake = self.schedule_flush
        self.draining = False

    async def start(self, sock: socket.socket | None = None) -> None:
        """Listen on the configured address with ``SO_REUSEPORT`` (or on ``sock``)."""
        config = self.config
        if sock is not None:
            self._listener = await self._loop.create_server(
                lambda: Connection(self), sock=sock, backlog=4096
            )
        else:
            self._listener = await self._loop.create_server(
                lambda: Connection(self),
                config.ws_host,
                config.ws_port,
                reuse_port=True,
                backlog=4096,
            )
        self._schedule_sweep()

    def stop_accepting(self) -> None:
        if self._listener is not None:
            self._listener.close()

    async def drain(self, timeout: float) -> None:
        """Close every connection with 1001 going away; abort those still open at ``timeout``."""
        self.stop_accepting()
        self.draining = True
        for conn in list(self.connections):
            if conn.ws.state is State.OPEN:
                conn.close(CloseCode.GOING_AWAY, "server shutting down")
        # Connections still in their handshake are closed with 1001 right after
        # it (see Connection._handshake): a client accepted just before the
        # drain sees a proper close, not a reset. The timeout below bounds them.
        deadline = time.monotonic() + timeout
        while self.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.abort()
        if self._sweeper is not None:
            self._sweeper.cancel()

    # Handshake policy (PROTOCOL §2)

    def check_request(self, conn: Connection, request: Request) -> tuple[int, str]:
        """Authenticate and check the origin; return ``(status, reason)`` or ``(0, "")``."""
        headers: Headers = request.headers
        path = urlsplit(request.path).path
        try:
            header = headers.get("Authorization")
        except Exception:  # several Authorization headers
            header = "multiple headers"
        if header is None and path != "/private":
            conn.auth = ANONYMOUS
        else:
            try:
                conn.auth = self.authenticator.authenticate(header)
            except AuthError as exc:
                conn.auth = ANONYMOUS
                if path == "/private":
                    self._auth_log.refused(str(exc))
                    return 401, "Unauthorized"
                log.debug("anonymous fallback: %s", exc)
        if not self._origin_allowed(headers):
            return 403, "Forbidden origin"
        return 0, ""

    def _origin_allowed(self, headers: Headers) -> bool:
        try:
            origin = headers.get("Origin")
            host = headers.get("Host")
        except Exception:
            return False
        if origin is None:
            return True
        netloc = urlsplit(origin).netloc.lower()
        if not netloc:
            return False
        allowed = self.config.cors_origins
        if allowed is None:
            return host is not None and netloc == host.lower()
        return netloc in allowed

    # Writing

    def mark_dirty(self, conn: Connection) -> None:
        self._dirty.append(conn)
        self.schedule_flush()

    def schedule_flush(self) -> None:
        """Write what is queued once the current loop iteration's callbacks are done."""
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        """Write every connection's queued frames with one ``write()`` each."""
        self.hub.flush()  # while still scheduled: its pushes need no new callback
        self._flush_scheduled = False
        dirty, self._dirty = self._dirty, []
        for conn in dirty:
            self.flush_one(conn)

    def flush_one(self, conn: Connection) -> None:
        pending = conn.pending
        if pending is None:
            return
        conn.pending = None
        transport = conn.transport
        if transport is None or transport.is_closing():
            return
        transport.write(pending[0] if len(pending) == 1 else b"".join(pending))
        if transport.get_write_buffer_size() > self.config.max_pending_bytes:
            self._drop_slow(conn, transport)

    def _drop_slow(self, conn: Connection, transport: asyncio.Transport) -> None:
        log.info(
            "dropping slow client (%s): %d bytes not read",
            conn.auth.uid or "anonymous",
            transport.get_write_buffer_size(),
        )
        self.metrics.slow_client()
        transport.abort()

    # Keepalive and handshake timeouts, one timer for all connections.

    def _schedule_sweep(self) -> None:
        config = self.config
        tick = min(config.ping_interval, config.ping_timeout, config.handshake_timeout) / 2
        self._sweeper = self._loop.call_later(max(0.02, min(tick, 5.0)), self._sweep)

    def _sweep(self) -> None:
        config = self.config
        now = time.monotonic()
        for conn in list(self.connections):
            state = conn.ws.state
            if state is State.OPEN:
                if conn.ping_sent:
                    if now - conn.ping_sent > config.ping_timeout:
                        log.debug("keepalive timeout (%s)", conn.auth.uid or "anonymous")
                        conn.close(CloseCode.INTERNAL_ERROR, "keepalive ping timeout")
                elif now - conn.last_seen >= config.ping_interval:
                    conn.ping_sent = now
                    conn.push(PING)
            elif state is State.CONNECTING:
                if now - conn.last_seen > config.handshake_timeout and conn.transport:
                    conn.transport.abort()
            elif conn.transport is not None and now - conn.last_seen > config.ping_timeout:
                conn.transport.abort()  # closing handshake never finished
        self._schedule_sweep()


class _AuthLog:
    """Warn about refused tokens, at most once a second per reason."""

    def __init__(self) -> None:
        from .logs import RateLimited

        self._limited = RateLimited(log, interval=1.0)

    def refused(self, reason: str) -> None:
        self._limited.log(logging.WARNING, reason, "refused /private: %s", reason)
