"""The asyncio side of the websocket edge: listener, writes, timers, drain.

Each accepted socket gets a :class:`ServerConnection`, which is the sans-I/O
:class:`rango.connection.Connection` plus its transport: bytes read go straight
into the state machine, and what it queues is written here. :class:`Server` is
the worker's :class:`~rango.connection.Gateway` with a loop: it writes every
connection's queued frames with one ``write()`` each at the end of the loop
iteration (:meth:`Server.flush`, the hot path's last step), drops clients that
stop reading, ends the streams the connections ask to end, and runs one timer
for the keepalive and timeouts of all connections.

No task, queue or timer exists per connection.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from typing import cast

from websockets import http11
from websockets.frames import CloseCode
from websockets.protocol import State

from .admission import MAX_REQUEST_SIZE
from .config import Config
from .connection import Connection, Events, Gateway
from .hub import Hub
from .listener import Listener, open_sockets
from .metrics import RoutingTimes

__all__ = ["Server", "ServerConnection"]

log = logging.getLogger("rango.server")

_OPEN = State.OPEN

# websockets' own per-line limit is raised to Rango's request bound, so that Rango
# answers an oversized request first (401 on /private, else 431).
http11.MAX_LINE_LENGTH = max(http11.MAX_LINE_LENGTH, MAX_REQUEST_SIZE)


class ServerConnection(Connection, asyncio.Protocol):
    """A :class:`~rango.connection.Connection` on an asyncio transport."""

    __slots__ = ("transport",)

    gateway: Server

    def __init__(self, server: Server) -> None:
        super().__init__(server)
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # create_server's protocols always get a Transport (BaseTransport is its base).
        self.transport = cast(asyncio.Transport, transport)
        self.gateway.connections.add(self)

    # Bytes go straight to the state machine: no call in between.
    data_received = Connection.receive_data

    def eof_received(self) -> bool:
        self.receive_eof()
        self.gateway.flush_one(self)  # before the transport closes itself
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        gateway = self.gateway
        gateway.connections.discard(self)
        self.lost()
        self.transport = None
        listener = gateway.listener
        if listener is not None and listener.paused:
            listener.freed()  # a descriptor is free again (EMFILE)


class Server(Gateway[ServerConnection]):
    """Accepts websocket connections for one worker and writes their frames."""

    def __init__(self, config: Config, hub: Hub, events: Events) -> None:
        super().__init__(config, hub, events)
        self._loop = asyncio.get_running_loop()
        self.listener: Listener | None = None
        # perf_counter() of each event delivered since the last flush, and where the
        # flush reports them (the worker's routing-time histogram), if anywhere.
        self.delivered: list[float] = []
        self.routing: RoutingTimes | None = None
        self._sweeper: asyncio.TimerHandle | None = None

    async def start(self) -> None:
        """Listen on the configured address with ``SO_REUSEPORT``."""
        config = self.config
        ssl_context = None
        if config.tls_certfile:
            ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ssl_context.load_cert_chain(config.tls_certfile, config.tls_keyfile)
        sockets = open_sockets(config.ws_host, config.ws_port, backlog=4096)
        self.listener = Listener(
            sockets,
            lambda: ServerConnection(self),
            self.events.accept_failed,
            ssl_context,
            config.handshake_timeout if ssl_context else None,
        )
        self._schedule_sweep()

    def stop_accepting(self) -> None:
        if self.listener is not None:
            self.listener.close()

    async def drain(self, timeout: float) -> None:
        """Close every connection with 1001 going away; abort those still open at ``timeout``."""
        self.stop_accepting()
        self.draining = True
        for conn in list(self.connections):
            conn.close(CloseCode.GOING_AWAY, "server shutting down")
        # Connections still in their handshake are closed with 1001 right after
        # it (see Connection._open): a client accepted just before the drain
        # sees a proper close, not a reset. The timeout below bounds them.
        # Connections accepted but still in their TLS handshake join
        # self.connections when it completes; they are waited for too.
        connecting = self.listener.connecting if self.listener is not None else {}
        deadline = time.monotonic() + timeout
        while (self.connections or connecting) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for task in list(connecting):
            task.cancel()  # its transport is closed
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.abort()
        if self._sweeper is not None:
            self._sweeper.cancel()

    # Writing.

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
        try:
            self.hub.flush()  # while still scheduled: its pushes need no new callback
        finally:
            self.flush_scheduled = False  # a failed run must not stop every later flush
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
            # The hot path's class check: mypy does not narrow on __class__.
            transport.write(
                pending if pending.__class__ is bytes else b"".join(pending)  # type: ignore[arg-type]
            )
            if transport.get_write_buffer_size() > limit:
                self._drop_slow(conn, transport)
        if self.ends:
            self._end_streams()
        delivered = self.delivered
        if delivered:
            if self.routing is not None:
                self.routing.observe_since(time.perf_counter(), delivered)
            delivered.clear()

    def flush_one(self, conn: ServerConnection) -> None:
        """Write one connection's queued bytes now (and end its stream if it asked)."""
        transport = conn.transport
        if transport is None or transport.is_closing():
            return
        data = conn.data_to_send()
        if data:
            transport.write(data)
            if transport.get_write_buffer_size() > self.config.max_pending_bytes:
                self._drop_slow(conn, transport)

    def _end_streams(self) -> None:
        """Half-close then close the streams whose connections are done (after their bytes)."""
        ends, self.ends = self.ends, []
        for conn in ends:
            self.flush_one(conn)
            transport = conn.transport
            if transport is None or transport.is_closing():
                continue
            if transport.can_write_eof():
                transport.write_eof()
            transport.close()

    def _drop_slow(self, conn: ServerConnection, transport: asyncio.Transport) -> None:
        log.info(
            "dropping slow client (%s): %d bytes not read",
            conn.auth.uid or "anonymous",
            transport.get_write_buffer_size(),
        )
        self.events.slow_client()
        transport.abort()

    # Keepalive and timeouts, one timer for all connections.

    def _schedule_sweep(self) -> None:
        config = self.config
        tick = min(config.ping_interval, config.ping_timeout, config.handshake_timeout) / 2
        self._sweeper = self._loop.call_later(max(0.02, min(tick, 5.0)), self._sweep)

    def _sweep(self) -> None:
        now = self.clock()
        for conn in list(self.connections):
            if conn.tick(now) and conn.transport is not None:
                conn.transport.abort()
        self._schedule_sweep()
