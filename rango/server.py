"""The websocket edge: a lean ``asyncio.Protocol`` per connection.

The opening handshake takes :mod:`rango.handshake`'s fast path when the request
has the usual shape, and websockets' sans-I/O
:class:`~websockets.server.ServerProtocol` otherwise. After the upgrade a
``ServerProtocol`` parses client frames, close, ping and pong; it is created on
the client's first frame (or when the server closes), so a connection that only
listens never holds one. Outgoing event frames bypass it: the hub hands every
subscriber the same pre-encoded frame, the connection queues a reference, and
the server writes each connection's queue with one ``write()`` per event-loop
iteration. The ``101`` answer is queued the same way, so it leaves in one
``write()`` with the ``subscribed`` answer that follows it.

No task, queue or timer exists per connection: keepalive, handshake timeouts and
flushing are done by the :class:`Server` for all connections at once.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import ssl
import time
from urllib.parse import urlsplit

import websockets.exceptions
from websockets import http11
from websockets.datastructures import Headers
from websockets.frames import CloseCode, Opcode
from websockets.http11 import Request
from websockets.protocol import State
from websockets.server import ServerProtocol

from . import handshake
from .auth import ANONYMOUS, Auth, Authenticator, AuthError
from .config import Config
from .hub import Hub
from .logs import RateLimited
from .metrics import Metrics
from .protocol import PING, PONG, ClientError, error, parse_query_streams, parse_request, text_frame

__all__ = ["Connection", "Server"]

OP_TEXT, OP_BINARY, OP_CONT = Opcode.TEXT, Opcode.BINARY, Opcode.CONT
OP_PING, OP_PONG = Opcode.PING, Opcode.PONG

log = logging.getLogger("rango.server")
# websockets logs each connection at info; keep it out of Rango's info level.
_ws_logger = logging.getLogger("websockets.server")

_SEND_EOF = b""
_CONNECTING, _OPEN = State.CONNECTING, State.OPEN

# Largest upgrade request accepted (request line and headers). Browsers send 1-4 KB
# with cookies; a session JWT is under 2 KB. websockets' own per-line limit is
# raised to match so that Rango answers first (401 on /private, else 431).
MAX_REQUEST_SIZE = 16384
http11.MAX_LINE_LENGTH = max(http11.MAX_LINE_LENGTH, MAX_REQUEST_SIZE)


def _unmask(frame: bytes, n: int) -> bytes:
    """The payload of a masked frame with a 6-byte header and ``n`` < 126 bytes."""
    if not n:
        return b""
    mask = int.from_bytes((frame[2:6] * (n // 4 + 1))[:n], "big")
    return (int.from_bytes(frame[6:], "big") ^ mask).to_bytes(n, "big")


# websockets 14+ names it; older versions raise a plain SecurityError.
_REQUEST_LINE_TOO_LONG = getattr(websockets.exceptions, "RequestLineTooLong", ())


def _refusal_status(exc: BaseException) -> int:
    """The status websockets answers a request it cannot parse with (400: closed unanswered)."""
    if isinstance(exc, _REQUEST_LINE_TOO_LONG):
        return 414
    if isinstance(exc, websockets.exceptions.SecurityError):
        return 431
    return 400


# An Origin or Host header given more than once (never allowed).
MULTIPLE = "\x00multiple"


def _single_values(headers: Headers) -> tuple[str | None, str | None, str | None]:
    """``Authorization``, ``Origin`` and ``Host`` of a request that websockets parsed.

    Several ``Authorization`` headers become a value no token check accepts.
    """
    values: list[str | None] = []
    for name, several in (("Authorization", "multiple headers"), ("Origin", MULTIPLE),
                          ("Host", MULTIPLE)):
        found = headers.get_all(name)
        values.append(found[0] if len(found) == 1 else several if found else None)
    return values[0], values[1], values[2]


@functools.lru_cache(maxsize=256)
def _query_streams(query: str) -> tuple[str, ...]:
    return tuple(parse_query_streams(query))


def target_streams(target: str) -> tuple[str, ...]:
    """The streams a request target's query string names (cached: clients share URLs)."""
    query = urlsplit(target).query
    return _query_streams(query) if query else ()


class Connection(asyncio.Protocol):
    """One websocket client."""

    __slots__ = (
        "auth",
        "fragments",
        "fragments_binary",
        "head",
        "last_seen",
        "pending",
        "phase",
        "ping_sent",
        "registered",
        "server",
        "subscriptions",
        "tokens",
        "transport",
        "ws",
    )

    def __init__(self, server: Server) -> None:
        self.server = server
        # websockets' protocol, when the connection needs one (see _protocol).
        self.ws: ServerProtocol | None = None
        # The state while there is no websockets protocol: CONNECTING, OPEN
        # once the 101 answer is queued, CLOSING once a close frame came.
        self.phase = _CONNECTING
        self.transport: asyncio.Transport | None = None
        self.auth: Auth = ANONYMOUS
        self.subscriptions: dict[str, None] = {}
        # Frames queued this iteration: one bytes (the common case, no list to
        # allocate), a list of them, or None.
        self.pending: bytes | list[bytes] | None = None
        self.fragments: list[bytes] | None = None
        self.fragments_binary = False  # the opcode of the first fragment was BINARY
        self.last_seen = time.monotonic()
        self.ping_sent = 0.0
        # True once the hub knows the connection (after the 101 answer). Not the
        # websocket state: a request cut short by EOF leaves CONNECTING for CLOSED
        # without ever being upgraded, and must not be counted out of the hub.
        self.registered = False
        # Before the upgrade: the request's bytes so far. After: the rate
        # limiter's tokens (see _allowed).
        self.head = b""
        self.tokens = 0.0

    @property
    def state(self) -> State:
        """The websocket state: websockets' when there is a protocol, else :attr:`phase`."""
        ws = self.ws
        return self.phase if ws is None else ws.state

    def _protocol(self) -> ServerProtocol:
        """websockets' protocol for this connection, created on first use.

        After a fast-path upgrade it starts OPEN with a fresh frame parser: the
        same state websockets reaches after accepting the request itself.
        """
        ws = self.ws
        if ws is None:
            ws = self.ws = ServerProtocol(
                state=self.phase,
                max_size=self.server.config.max_frame_size,
                logger=_ws_logger,
            )
        return ws

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
        if ws is None:
            if self.phase is _CONNECTING:
                self._request_data(data)
                return
            if self.phase is not _OPEN:
                return  # after the client's close frame: discarded (RFC 6455 1.4)
            if self._control_frame(data):
                return
        elif ws.state is _CONNECTING:
            # websockets parses an unusual request; the size bound still holds.
            self.head += data
            if len(self.head) > MAX_REQUEST_SIZE:
                self._refuse_large_request()
                return
        self._receive(data)

    def _receive(self, data: bytes) -> None:
        ws = self._protocol()
        ws.receive_data(data)
        for event in ws.events_received():
            if isinstance(event, Request):
                self._handshake(event)
            else:
                self._frame(event.opcode, event.data, event.fin)
        self._send_protocol_data()
        if ws.state is _OPEN:
            # Any frame proves the peer alive. Before the upgrade the clock keeps
            # running from the connection's start: a request trickled one byte at
            # a time still meets the handshake timeout.
            self.last_seen = time.monotonic()
            self.ping_sent = 0.0

    def _control_frame(self, data: bytes) -> bool:
        """Answer one whole masked pong, ping or close frame without websockets' protocol.

        Keepalive pongs and a close with 1000 or 1001 are nearly all that a
        client which only listens ever sends, so such a client never needs a
        protocol object. Anything else (data frames, fragments, several frames
        at once, other close codes, protocol errors) returns False: websockets
        parses it, exactly as before.
        """
        n = len(data) - 6  # 2-byte header and 4-byte mask, payload < 126 bytes
        if n < 0 or n > 125 or data[1] != 0x80 | n:
            return False
        opcode = data[0]  # FIN set, no RSV bits
        if opcode == 0x88:
            if n == 2:
                code = (data[2] ^ data[6]) << 8 | (data[3] ^ data[7])
                if code != 1000 and code != 1001:
                    return False
            elif n:
                return False
            self._closed_by_client(_unmask(data, n))
            return True
        if opcode == 0x8A:
            pass
        elif opcode == 0x89:
            if not self._allowed():
                return True  # failed with 1008
            self.push(b"\x8a" + bytes((n,)) + _unmask(data, n))
        else:
            return False
        self.last_seen = time.monotonic()
        self.ping_sent = 0.0
        return True

    def _closed_by_client(self, payload: bytes) -> None:
        """Echo a client's close frame and close TCP, as websockets does (RFC 6455 5.5.1)."""
        self.phase = State.CLOSING
        transport = self.transport
        assert transport is not None
        self.server.flush_one(self)
        transport.write(b"\x88" + bytes((len(payload),)) + payload)
        transport.close()  # after the write; the FIN is websockets' send_eof()

    def eof_received(self) -> bool:
        if self.ws is not None or self.phase is _OPEN:
            self._protocol().receive_eof()
            self._send_protocol_data()
        return False  # before the upgrade: an incomplete request, just close

    # Outgoing

    def push(self, frame: bytes) -> None:
        """Queue a pre-encoded frame; the server writes it this loop iteration."""
        pending = self.pending
        if pending is None:
            if self.transport is None:
                return
            self.pending = frame
            server = self.server
            server.dirty.append(self)
            if not server.flush_scheduled:
                server.schedule_flush()
        elif pending.__class__ is list:
            pending.append(frame)  # type: ignore[union-attr]
        else:
            self.pending = [pending, frame]  # type: ignore[list-item]

    def send(self, frame: bytes) -> None:
        """Queue an answer of this connection's own, after the events already routed."""
        self.server.hub.flush()
        self.push(frame)

    def close(self, code: int = CloseCode.GOING_AWAY, reason: str = "", fail: bool = False) -> None:
        """Start the closing handshake after what is queued; no-op if not open.

        With ``fail``, the connection is failed instead (RFC 6455 7.1.7): the close
        frame is sent, the rest of the input is discarded and TCP closes at once.
        """
        if self.state is _OPEN and self.transport is not None:
            self.last_seen = time.monotonic()  # the peer gets ping_timeout to answer
            self.server.hub.flush()
            self.server.flush_one(self)
            ws = self._protocol()
            if fail:
                ws.fail(code, reason)
            else:
                ws.send_close(code, reason)
            self._send_protocol_data()
            # No data frame may follow a close frame (RFC 6455 5.5.1): leave the
            # hub now rather than when the peer answers or the socket is gone.
            if self.registered:
                self.registered = False
                self.server.hub.disconnect(self)

    def _send_protocol_data(self) -> None:
        transport = self.transport
        if transport is None or self.ws is None:
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

    def _refuse_large_request(self) -> None:
        """Answer a request over MAX_REQUEST_SIZE without parsing the rest of it."""
        private = self.head.startswith(b"GET /private")
        status = 401 if private else 431
        if private:
            self.server.refused(f"request headers larger than {MAX_REQUEST_SIZE} bytes")
        self.server.metrics.rejected(status)
        phrase = "Unauthorized" if private else "Request Header Fields Too Large"
        assert self.transport is not None
        self.transport.write(
            f"HTTP/1.1 {status} {phrase}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            .encode()
        )
        self.transport.close()

    def _request_data(self, data: bytes) -> None:
        """Collect the upgrade request until its blank line, then answer it."""
        head = self.head
        start = max(0, len(head) - 3)
        head = head + data if head else data
        end = head.find(b"\r\n\r\n", start)
        if end < 0 or end > MAX_REQUEST_SIZE:
            self.head = head
            if len(head) > MAX_REQUEST_SIZE:
                self._refuse_large_request()
            return
        rest = head[end + 4 :]
        upgrade = handshake.parse(head[:end])
        if upgrade is None:
            # Not the usual shape: websockets parses it, and answers it if it
            # is not a valid upgrade. It gets the request alone, so that after
            # a 101 its parser stops exactly at the first frame byte.
            self.head = head
            self._receive(head[: end + 4])
            ws = self.ws
            if ws is not None and ws.handshake_exc is not None and not ws.accept_called:
                # Refused while parsing it (too many headers, malformed): counted
                # here since Rango never saw a request.
                self.server.metrics.rejected(_refusal_status(ws.handshake_exc))
        else:
            status, reason = self.server.check_request(
                self, upgrade.target, upgrade.authorization, upgrade.origin, upgrade.host
            )
            if status:
                self._reject(status, reason)
                return
            # Queued, not written: it leaves with the subscribed answer.
            self.push(handshake.accept(upgrade))
            self._open(upgrade.target)
        if rest and self.state is _OPEN:
            self.data_received(rest)  # frames the client sent without waiting

    def _handshake(self, request: Request) -> None:
        """Answer a request that websockets parsed (see _request_data)."""
        server = self.server
        authorization, origin, host = _single_values(request.headers)
        status, reason = server.check_request(self, request.path, authorization, origin, host)
        if status:
            self._reject(status, reason)
            return
        ws = self._protocol()
        response = ws.accept(request)
        ws.send_response(response)
        if response.status_code != 101:
            server.metrics.rejected(response.status_code)
            log.debug("upgrade refused: %d %s", response.status_code, response.reason_phrase)
            return
        self._send_protocol_data()  # the 101 response goes before any frame
        # The protocol saw the request alone and keeps it (~1.7 KB) in its
        # suspended parser: a fresh one, created on the first frame, is the
        # same protocol without it.
        self.ws = None
        self._open(request.path)

    def _reject(self, status: int, reason: str) -> None:
        """Answer the upgrade request with an HTTP error and close."""
        self.server.metrics.rejected(status)
        log.debug("upgrade refused: %d %s", status, reason)
        ws = self._protocol()
        ws.send_response(ws.reject(status, reason + "\n"))
        self._send_protocol_data()

    def _open(self, target: str) -> None:
        """Register the upgraded connection; its query-string streams are subscribed."""
        server = self.server
        self.phase = _OPEN
        self.head = b""
        self.tokens = float(server.config.rate_burst)
        self.registered = True
        server.hub.connect(self, target_streams(target))
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
        elif opcode is OP_PING:
            self._allowed()  # websockets answered it; a flood still counts
            return
        else:
            return  # close is handled by websockets
        if self.state is not _OPEN or not self._allowed():
            return
        if binary:
            self.send(text_frame(error("binary frames are not supported, send text")))
            return
        self._message(data)

    def _allowed(self) -> bool:
        """Spend a token for one client frame; close with 1008 when none is left.

        A token bucket: RANGO_RATE_LIMIT tokens a second, at most RANGO_RATE_BURST.
        """
        if self.state is not _OPEN:
            return False
        config = self.server.config
        now = time.monotonic()
        tokens = min(
            float(config.rate_burst), self.tokens + (now - self.last_seen) * config.rate_limit
        )
        self.last_seen = now
        if tokens >= 1.0:
            self.tokens = tokens - 1.0
            return True
        self.tokens = tokens
        self.server.closing("rate_limit", self)
        self.close(CloseCode.POLICY_VIOLATION, "rate limit exceeded", fail=True)
        return False

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
            self._protocol().fail(CloseCode.INVALID_DATA, "invalid UTF-8")
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
        # Connections with frames queued, written by flush() at the iteration's end.
        self.dirty: list[Connection] = []
        self.flush_scheduled = False
        self._loop = asyncio.get_running_loop()
        self._listener: asyncio.AbstractServer | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._limited = RateLimited(log, interval=1.0)
        hub.wake = self.schedule_flush
        self.draining = False

    async def start(self) -> None:
        """Listen on the configured address with ``SO_REUSEPORT``."""
        config = self.config
        ssl_context = None
        if config.tls_certfile:
            ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ssl_context.load_cert_chain(config.tls_certfile, config.tls_keyfile)
        self._listener = await self._loop.create_server(
            lambda: Connection(self),
            config.ws_host,
            config.ws_port,
            reuse_port=True,
            backlog=4096,
            ssl=ssl_context,
            ssl_handshake_timeout=config.handshake_timeout if ssl_context else None,
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
            if conn.state is _OPEN:
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

    def refused(self, reason: str) -> None:
        """Warn that /private was refused, at most once a second per reason (never the token)."""
        self._limited.log(logging.WARNING, reason, "refused /private: %s", reason)

    def closing(self, reason: str, conn: Connection) -> None:
        """Count and log a connection the server closes for ``reason``."""
        self.metrics.closed(reason)
        self._limited.log(
            logging.INFO, reason, "closing client (%s): %s", conn.auth.uid or "anonymous",
            reason.replace("_", " "),
        )

    def check_request(
        self,
        conn: Connection,
        target: str,
        authorization: str | None,
        origin: str | None,
        host: str | None,
    ) -> tuple[int, str]:
        """Authenticate and check the origin; return ``(status, reason)`` or ``(0, "")``.

        ``origin`` or ``host`` is :data:`MULTIPLE` when the request had several.
        """
        path = urlsplit(target).path
        if self.hub.clients >= self.config.max_connections:
            self._limited.log(
                logging.WARNING, "503", "refusing connections: %d open, RANGO_MAX_CONNECTIONS=%d",
                self.hub.clients, self.config.max_connections,
            )
            return 503, "Too many connections"
        if authorization is None and path != "/private":
            conn.auth = ANONYMOUS
        else:
            try:
                conn.auth = self.authenticator.authenticate(authorization)
            except AuthError as exc:
                conn.auth = ANONYMOUS
                if path == "/private":
                    self.refused(str(exc))
                    return 401, "Unauthorized"
                log.debug("anonymous fallback: %s", exc)
        if not self._origin_allowed(origin, host):
            return 403, "Forbidden origin"
        return 0, ""

    def _origin_allowed(self, origin: str | None, host: str | None) -> bool:
        if origin is MULTIPLE or host is MULTIPLE:
            return False
        if origin is None:
            return True
        allowed = self.config.cors_origins
        if origin == "null":
            # Pages opened from disk (file://) and sandboxed frames: only when
            # API_CORS_ORIGINS lists "null" explicitly (a development opt-in).
            return allowed is not None and "null" in allowed
        netloc = urlsplit(origin).netloc.lower()
        if not netloc:
            return False
        if allowed is None:
            return host is not None and netloc == host.lower()
        return netloc in allowed

    # Writing

    def schedule_flush(self) -> None:
        """Write what is queued once the current loop iteration's callbacks are done."""
        if not self.flush_scheduled:
            self.flush_scheduled = True
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        """Write every connection's queued frames with one ``write()`` each.

        This is the hot path's last step (one call per client per iteration), so
        :meth:`flush_one` is inlined here.
        """
        self.hub.flush()  # while still scheduled: its pushes need no new callback
        self.flush_scheduled = False
        dirty, self.dirty = self.dirty, []
        limit = self.config.max_pending_bytes
        for conn in dirty:
            pending = conn.pending
            if pending is None:
                continue
            conn.pending = None
            transport = conn.transport
            if transport is None or transport.is_closing():
                continue
            transport.write(pending if pending.__class__ is bytes else b"".join(pending))
            if transport.get_write_buffer_size() > limit:
                self._drop_slow(conn, transport)

    def flush_one(self, conn: Connection) -> None:
        pending = conn.pending
        if pending is None:
            return
        conn.pending = None
        transport = conn.transport
        if transport is None or transport.is_closing():
            return
        transport.write(pending if pending.__class__ is bytes else b"".join(pending))
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
            state = conn.state
            if state is _OPEN:
                if conn.ping_sent:
                    if now - conn.ping_sent > config.ping_timeout:
                        self.closing("keepalive_timeout", conn)
                        conn.close(CloseCode.INTERNAL_ERROR, "keepalive ping timeout")
                elif now - conn.last_seen >= config.ping_interval:
                    conn.ping_sent = now
                    conn.push(PING)
            elif state is _CONNECTING:
                if now - conn.last_seen > config.handshake_timeout and conn.transport:
                    conn.transport.abort()
            elif conn.transport is not None and now - conn.last_seen > config.ping_timeout:
                conn.transport.abort()  # closing handshake never finished
        self._schedule_sweep()


