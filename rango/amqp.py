"""RabbitMQ consumer: pika on the worker's own event loop.

One connection, one channel, one exclusive auto-delete queue bound with ``#``
to the topic exchange, consumed with automatic acknowledgement (PROTOCOL §5).
Each delivery is handed straight to a callback on the event loop: no thread
and no task per message.

Several brokers (a RabbitMQ cluster's nodes) may be given: the consumer starts at
the one it is told and, when its node is lost or refuses, moves on to the next at
once and declares a new queue there (an exclusive queue lives on one node and dies
with it). Once every node has failed in a row, it retries the whole list with
capped exponential backoff. Each change of state is reported once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import weakref
from collections.abc import Callable, Sequence
from enum import Enum
from typing import Any

import pika
from pika.adapters.asyncio_connection import AsyncioConnection
from pika.adapters.utils.connection_workflow import (
    AMQPConnectionWorkflowFailed,
    AMQPConnectorPhaseErrorBase,
)
from pika.channel import Channel
from pika.exchange_type import ExchangeType
from pika.spec import Basic

__all__ = ["HEARTBEAT", "Consumer", "State", "queue_name"]

log = logging.getLogger("rango.amqp")

BACKOFF_FIRST = 0.25
BACKOFF_CAP = 2.0  # the broker's return is noticed within 2 s
# While consuming, the exchange is re-declared and the queue re-bound this often:
# an exchange deleted (and re-created by a publisher) is bound again within it.
REBIND_INTERVAL = 2.0
# Seconds of consuming after which a connection counts as a success (see _on_bound).
SETTLE_AFTER = 1.0
# Seconds from the start of an attempt to the consume: pika's stack timeout covers the
# handshake only, and a node that then stalls on the channel or the declarations
# (a minority node, one still starting) would hold the worker for good, its
# heartbeats keeping the connection alive.
CONSUME_DEADLINE = 10.0
# Seconds between AMQP heartbeats unless the URL sets ``heartbeat=``: a path cut
# silently (no FIN, no RST) is noticed after two missed ones, instead of the
# broker's 60 s proposal; as Go Rango's amqp091 client.
HEARTBEAT = 10


class State(Enum):
    CONNECTING = "connecting"
    CONSUMING = "consuming"
    DISCONNECTED = "disconnected"
    STOPPED = "stopped"


def queue_name() -> str:
    """A queue name an operator can trace to a host and process."""
    return f"rango.instance.{socket.gethostname()}.{os.getpid()}.{secrets.token_hex(3)}"


class Consumer:
    """Consumes every event of ``exchange`` and passes it to ``on_event``."""

    def __init__(
        self,
        urls: str | Sequence[str],
        exchange: str,
        on_event: Callable[[str, bytes], None],
        on_state: Callable[[State], None] = lambda state: None,
        queue: str | None = None,
        first: int = 0,
    ) -> None:
        """Consume from ``urls`` (one URL or a cluster's), starting at entry ``first``
        (mod their number). ``queue`` fixes the queue's name; by default each
        connection declares a new one named by :func:`queue_name`."""
        self.nodes = [_parameters(url) for url in ([urls] if isinstance(urls, str) else urls)]
        if not self.nodes:
            raise ValueError("no broker URL")
        self._index = first % len(self.nodes)
        self._fixed_queue = queue
        self.queue = ""  # the current connection's, named by _connect
        self.exchange = exchange
        self.on_event = on_event
        self.on_state = on_state
        self.state = State.DISCONNECTED
        self._loop = asyncio.get_running_loop()
        self._connection: AsyncioConnection | None = None
        self._channel: Channel | None = None
        self._backoff = BACKOFF_FIRST
        self._failures = 0  # attempts failed in a row since a consume lasted
        self._retry: asyncio.Handle | None = None
        self._rebind: asyncio.TimerHandle | None = None
        self._settle: asyncio.TimerHandle | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self._stopped: asyncio.Future[None] | None = None
        self._reported = False
        _ignore_pika_connect_race(self._loop)
        _CONSUMERS.add(self)

    @property
    def address(self) -> str:
        """``host:port`` of the node in use or being tried (never the credentials)."""
        return self.nodes[self._index][1]

    @property
    def consuming(self) -> bool:
        return self.state is State.CONSUMING

    def start(self) -> None:
        """Connect now; reconnect by itself until :meth:`stop`."""
        self._connect()

    async def stop(self) -> None:
        """Close the connection; RabbitMQ deletes the exclusive queue with it."""
        previous = self.state
        self._set_state(State.STOPPED)
        if self._retry is not None:
            self._retry.cancel()
        conn = self._connection
        if conn is None or conn.is_closed:
            return
        self._stopped = self._loop.create_future()
        if previous is State.CONSUMING and self._channel is not None and self._channel.is_open:
            # Deleting explicitly also covers a broker that keeps the connection
            # half-open after we go: no queue of this instance is left behind.
            self._channel.queue_delete(self.queue, callback=lambda _frame: conn.close())
        elif not conn.is_closing:
            conn.close()
        try:
            await asyncio.wait_for(self._stopped, 5)
        except TimeoutError:
            log.warning("RabbitMQ connection did not close within 5 s")

    # Connection life cycle.

    def _connect(self) -> None:
        self._retry = None
        if self.state is State.STOPPED:
            return
        self._set_state(State.CONNECTING)
        parameters = self.nodes[self._index][0]
        # A new name per connection: the old exclusive queue may outlive a cut
        # connection on its node for a while, and would refuse a second owner.
        self.queue = self._fixed_queue or queue_name()
        # Named after the queue so `rabbitmqctl list_connections` shows host and pid.
        parameters.client_properties = {"connection_name": self.queue}
        self._connection = AsyncioConnection(
            parameters,
            on_open_callback=self._on_open,
            on_open_error_callback=self._on_open_error,
            on_close_callback=self._on_closed,
            custom_ioloop=self._loop,
        )

    def _abort_attempt(self) -> None:
        """Give up a connection attempt still opening, e.g. one pika's connect race has
        left hanging (see :func:`_ignore_pika_connect_race`): closing an opening
        connection aborts it, and :meth:`_on_open_error` moves on to the next node now."""
        conn = self._connection
        if self.state is State.CONNECTING and conn is not None and not (
            conn.is_open or conn.is_closing or conn.is_closed
        ):
            conn.close()

    def _on_open(self, conn: AsyncioConnection) -> None:
        conn.channel(on_open_callback=self._on_channel)

    def _on_channel(self, channel: Channel) -> None:
        self._channel = channel
        channel.add_on_close_callback(self._on_channel_closed)
        channel.add_on_cancel_callback(self._on_cancelled)
        # As the publishers declare it: a non-durable topic exchange.
        channel.exchange_declare(
            self.exchange,
            exchange_type=ExchangeType.topic,
            durable=False,
            callback=lambda _frame: channel.queue_declare(
                self.queue,
                durable=False,
                exclusive=True,
                auto_delete=True,
                callback=lambda _frame: channel.queue_bind(
                    self.queue, self.exchange, routing_key="#", callback=self._on_bound
                ),
            ),
        )

    def _on_bound(self, _frame: object) -> None:
        assert self._channel is not None
        self._channel.basic_consume(self.queue, self._on_message, auto_ack=True)
        # The failure count and the backoff start over only once consuming has lasted:
        # a node that drops each connection right after the consume must not turn
        # the moves into a loop without delay.
        self._settle = self._loop.call_later(SETTLE_AFTER, self._settled)
        if self._reported:
            log.warning("RabbitMQ is back")
        self._reported = False
        self._set_state(State.CONSUMING)
        self._schedule_rebind()

    def _settled(self) -> None:
        self._settle = None
        self._backoff = BACKOFF_FIRST
        self._failures = 0

    def _schedule_rebind(self) -> None:
        self._rebind = self._loop.call_later(REBIND_INTERVAL, self._rebind_now)

    def _rebind_now(self) -> None:
        """Declare and bind again: both are no-ops unless the exchange went away."""
        channel = self._channel
        if self.state is not State.CONSUMING or channel is None or not channel.is_open:
            return
        channel.exchange_declare(
            self.exchange,
            exchange_type=ExchangeType.topic,
            durable=False,
            callback=lambda _frame: channel.queue_bind(
                self.queue, self.exchange, routing_key="#",
                callback=lambda _frame: self._schedule_rebind(),
            ),
        )

    def _on_message(
        self, _channel: Channel, method: Basic.Deliver, _props: object, body: bytes
    ) -> None:
        self.on_event(method.routing_key, body)

    def _on_cancelled(self, _frame: object) -> None:
        """The broker cancelled the consumer (its queue was deleted): start over now."""
        conn = self._connection
        if self.state is State.STOPPED or conn is None or not conn.is_open:
            return
        log.error("RabbitMQ cancelled the consumer of %s (queue deleted?)", self.queue)
        conn.close()  # reconnect from scratch in _on_closed

    def _on_channel_closed(self, _channel: Channel, reason: Exception) -> None:
        self._channel = None
        conn = self._connection
        if self.state is State.STOPPED or conn is None or not conn.is_open:
            return  # the connection went with it: _on_closed reports that, once
        log.error("RabbitMQ channel closed: %s", reason)
        conn.close()  # reconnect from scratch in _on_closed

    def _give_up_attempt(self) -> None:
        """CONSUME_DEADLINE passed without a consume: drop the connection (next node).

        Not close(): that closes the channels gracefully first, waiting for the
        stalled node's answers; pika's own way to end a stream with an error is
        used instead, which reports it to :meth:`_on_closed` as any lost connection.
        """
        self._deadline = None
        conn = self._connection
        if self.state is not State.CONNECTING or conn is None or not conn.is_open:
            self._abort_attempt()  # still opening (or already ending)
            return
        terminate = getattr(conn, "_terminate_stream", None)  # pika 1.x, private
        if terminate is None:
            conn.close()
            return
        terminate(pika.exceptions.AMQPConnectionError(
            f"no consume within {CONSUME_DEADLINE:.0f} s of connecting"
        ))

    def _on_open_error(self, _conn: AsyncioConnection, error: BaseException) -> None:
        self._lost(f"cannot connect to RabbitMQ at {self.address}: {_describe(error)}")

    def _on_closed(self, _conn: AsyncioConnection, reason: BaseException) -> None:
        self._connection = None
        self._channel = None
        if self.state is State.STOPPED:
            if self._stopped is not None and not self._stopped.done():
                self._stopped.set_result(None)
            return
        self._lost(f"RabbitMQ connection to {self.address} lost: {_describe(reason)}")

    def _lost(self, message: str) -> None:
        """An attempt failed or the connection dropped: try the next node now, or,
        once every node has failed in a row, the whole list again after a backoff."""
        if self.state is State.STOPPED:
            return
        self._failures += 1
        count = len(self.nodes)
        self._index = (self._index + 1) % count
        at_once = self._failures % count != 0  # the round of the list is not over
        if not self._reported:
            # One line per change of state, not one per retry: a move to another
            # node is one; an outage of them all is one, until the first consume.
            if at_once:
                log.warning("%s; trying %s", message, self.address)
            else:
                self._reported = True
                every = f"retrying every {BACKOFF_CAP:.2g} s at most"
                log.error("%s; %s", message, every if count == 1 else
                          f"no node of {count} reachable, {every}")
        self._set_state(State.DISCONNECTED)
        if at_once:
            self._retry = self._loop.call_soon(self._connect)
            return
        self._retry = self._loop.call_later(self._backoff, self._connect)
        self._backoff = min(self._backoff * 2, BACKOFF_CAP)

    def _set_state(self, state: State) -> None:
        if state is self.state:
            return
        previous, self.state = self.state, state
        if previous is State.CONNECTING and self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        if state is State.CONNECTING:
            self._deadline = self._loop.call_later(CONSUME_DEADLINE, self._give_up_attempt)
        if previous is State.CONSUMING:
            for timer in (self._rebind, self._settle):
                if timer is not None:
                    timer.cancel()
            self._rebind = self._settle = None
        if state is State.CONSUMING:
            log.info("consuming %s from exchange %s on %s", self.queue, self.exchange,
                     self.address)
        elif state is State.CONNECTING and previous is State.DISCONNECTED:
            log.debug("connecting to RabbitMQ")
        self.on_state(state)


def _parameters(url: str) -> tuple[pika.URLParameters, str]:
    """pika's parameters of one broker URL, and its ``host:port`` for logs and metrics."""
    parameters = pika.URLParameters(url)
    parameters.connection_attempts = 1
    parameters.socket_timeout = 5
    # The whole attempt (TCP, AMQP handshake, channel) ends within this, not pika's
    # 15 s: a node that accepts and then stalls must not hold up the next node.
    parameters.stack_timeout = 5
    if "heartbeat=" not in url.partition("?")[2]:
        parameters.heartbeat = HEARTBEAT
    host = parameters.host
    return parameters, f"[{host}]:{parameters.port}" if ":" in host else f"{host}:{parameters.port}"


def _describe(error: BaseException) -> str:
    """The cause of a pika error, e.g. ``ConnectionRefusedError: [Errno 111] ...``.

    pika wraps a failed attempt as AMQPConnectionError(AMQPConnectionWorkflowFailed(
    AMQPConnectorSocketConnectError(OSError))), whose ``str()`` is just its class name.
    """
    for _ in range(5):
        if isinstance(error, AMQPConnectionWorkflowFailed) and error.exceptions:
            error = error.exceptions[-1]
        elif isinstance(error, AMQPConnectorPhaseErrorBase):
            error = error.exception
        elif (
            type(error) is pika.exceptions.AMQPConnectionError
            and len(error.args) == 1
            and isinstance(error.args[0], BaseException)
        ):
            error = error.args[0]
        else:
            break
    text = str(error) or type(error).__name__
    return f"{type(error).__name__}: {text}"[:200]


# Consumers, for the connect-race handler (a worker has one; weak: tests make many).
_CONSUMERS: weakref.WeakSet[Consumer] = weakref.WeakSet()


def _ignore_pika_connect_race(loop: asyncio.AbstractEventLoop) -> None:
    """Keep pika's connect race out of the error log.

    When the broker (or a proxy in front of it) resets a TCP connection the
    instant it is established, pika's connector calls ``getpeername()`` on a
    socket that is no longer connected and raises ValueError("Expected connected
    socket ...") from a loop callback, which asyncio would log with a traceback.
    pika's attempt would then hang until its stack timeout (5 s, enough to miss the
    3 s a returning node has to deliver): one debug line says it, and the attempts
    left hanging are aborted, so the consumer tries the next node at once. Every
    other exception is handled as before.
    """
    previous = loop.get_exception_handler()
    if getattr(previous, "__qualname__", "").startswith("_ignore_pika_connect_race"):
        return  # installed by an earlier consumer on this loop

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, ValueError) and "Expected connected socket" in str(exc):
            log.debug("RabbitMQ connection reset while connecting: %s", exc)
            for consumer in list(_CONSUMERS):
                consumer._abort_attempt()
            return
        if previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handler)
