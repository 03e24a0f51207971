"""One websocket client as a state machine, sans I/O.

A :class:`Connection` takes the client's bytes and end-of-file in
(:meth:`~Connection.receive_data`, :meth:`~Connection.receive_eof`) and the
clock's ticks (:meth:`~Connection.tick`), and hands out what to write
(:attr:`~Connection.pending`, queued on :attr:`Gateway.dirty`) and when to end
the TCP stream (:attr:`Gateway.ends`). It never sees a socket: the asyncio
adapter in :mod:`rango.server` writes the bytes, and the tests drive it
in-process like the hub.

What a connection does, in order of its life:

* **Upgrade** (RFC 6455 §4.2): the request is collected up to its blank line
  (at most :data:`~rango.admission.MAX_REQUEST_SIZE`), read by
  :mod:`rango.handshake`'s fast path when it has the usual shape and by
  websockets' :class:`~websockets.server.ServerProtocol` otherwise, and judged
  by :mod:`rango.admission`. The ``101`` is queued, not written, so it leaves
  in one write with the ``subscribed`` answer.
* **Frames**: websockets' protocol parses client frames, but is created only on
  a client's first data frame (or when the server closes): a lone keepalive
  pong, ping, or close with 1000/1001 is answered by :mod:`rango.frames`, so a
  client that only listens never holds one (about 1.3 KB saved per
  connection). Fragments are reassembled here; every data or ping frame costs
  a token of the rate limiter.
* **Outgoing**: the hub pushes the same pre-encoded frame to every subscriber;
  :meth:`~Connection.push` queues a reference, and the adapter writes each
  connection's queue with one ``write()`` per event-loop iteration.
* **Close**: no data frame follows a close frame (§5.5.1): the connection
  leaves the hub before its close frame is queued, whoever started the close.

Four clocks, one meaning each: :attr:`~Connection.heard_at` (the peer's last
frame: keepalive), :attr:`~Connection.refilled_at` (the rate limiter's last
refill), and :attr:`~Connection.deadline`, the one time by which the peer must
have answered (the upgrade request, a ping, or the closing handshake) or is
dropped; the handshake's start is the first deadline's origin.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, Generic, Protocol, TypeVar, cast

from websockets.frames import CloseCode, Frame, Opcode
from websockets.http11 import Request
from websockets.protocol import State
from websockets.server import ServerProtocol

from . import deflate, frames, handshake
from .admission import (
    MAX_REQUEST_SIZE,
    Admission,
    oversized_status,
    parse_failure_status,
    request_values,
)
from .auth import ANONYMOUS, Auth
from .config import Config
from .hub import NO_SUBSCRIPTIONS, Hub
from .logs import RateLimited
from .protocol import PONG, ClientError, error, parse_request, target_streams, text_frame

__all__ = ["Connection", "Events", "Gateway"]

log = logging.getLogger("rango.server")
# websockets logs each connection at info; keep it out of Rango's info level.
_ws_logger = logging.getLogger("websockets.server")

_OP_TEXT, _OP_BINARY, _OP_CONT = Opcode.TEXT, Opcode.BINARY, Opcode.CONT
_OP_PING, _OP_PONG = Opcode.PING, Opcode.PONG
_CONNECTING, _OPEN, _CLOSING, _CLOSED = State.CONNECTING, State.OPEN, State.CLOSING, State.CLOSED


class Events(Protocol):
    """What the gateway reports of its connections (the worker's metrics)."""

    def rejected(self, status: int) -> None: ...

    def closed(self, reason: str) -> None: ...

    def slow_client(self) -> None: ...

    def accept_failed(self, reason: str) -> None: ...


ConnT = TypeVar("ConnT", bound="Connection")


class Gateway(Generic[ConnT]):
    """What the connections of one worker share: settings, hub, policy, and the outbox.

    The outbox is two lists the I/O side empties: :attr:`dirty`, connections
    with bytes pending, and :attr:`ends`, connections whose TCP stream ends once
    those bytes are written. :meth:`schedule_flush` is called when the first
    connection of a round becomes dirty; here it only records that a flush is
    due, and :class:`rango.server.Server` makes it a loop callback.
    """

    def __init__(
        self,
        config: Config,
        hub: Hub,
        events: Events,
        admission: Admission | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.hub = hub
        self.events = events
        self.admission = admission or Admission(config)
        self.clock = clock
        self.connections: set[ConnT] = set()  # kept by the I/O side
        self.dirty: list[ConnT] = []
        self.ends: list[ConnT] = []
        self.flush_scheduled = False
        self.draining = False
        # One float object for every connection's full bucket, not one each.
        self.burst = float(config.rate_burst)
        self._limited = RateLimited(log, interval=1.0)
        hub.wake = self.schedule_flush

    def schedule_flush(self) -> None:
        self.flush_scheduled = True

    def closing(self, reason: str, conn: ConnT) -> None:
        """Count and log a connection the server closes for ``reason``."""
        self.events.closed(reason)
        self._limited.log(
            logging.INFO, reason, "closing client (%s): %s", conn.auth.uid or "anonymous",
            reason.replace("_", " "),
        )


def _idle(ws: ServerProtocol) -> bool:
    """websockets' protocol is between messages (the caller knows it is between frames)."""
    # current_size counts a fragmented incoming message (expect_continuation_frame
    # is about the messages websockets sends).
    return ws.current_size is None and ws.parser_exc is None


class Connection:
    """One websocket client, from its first request byte to the end of its stream."""

    __slots__ = (
        "auth",
        "deadline",
        "deflate",
        "fragments",
        "fragments_binary",
        "gateway",
        "head",
        "heard_at",
        "pending",
        "phase",
        "refilled_at",
        "registered",
        "scan",
        "subscriptions",
        "tokens",
        "ws",
    )

    def __init__(self, gateway: Gateway[Any]) -> None:
        self.gateway = gateway
        # websockets' protocol, when the connection needs one (see _protocol).
        self.ws: ServerProtocol | None = None
        # The state while there is no websockets protocol: CONNECTING, OPEN
        # once the 101 answer is queued, CLOSING once a close frame came, CLOSED
        # once an oversized request was refused.
        self.phase = _CONNECTING
        self.auth: Auth = ANONYMOUS
        # Read-only, shared with the connections subscribed alike; the hub replaces it.
        self.subscriptions: Mapping[str, None] = NO_SUBSCRIPTIONS
        # Bytes queued this iteration: one bytes (the common case, no list to
        # allocate), a list of them, or None.
        self.pending: bytes | list[bytes] | None = None
        self.fragments: list[bytes] | None = None
        self.fragments_binary = False  # the opcode of the first fragment was BINARY
        now = gateway.clock()
        # Before the upgrade the request must be complete by the deadline, even
        # when it trickles in one byte at a time.
        self.deadline = now + gateway.config.handshake_timeout
        self.heard_at = now
        self.refilled_at = now
        # True once the hub knows the connection (after the 101 answer). Not the
        # websocket state: a request cut short by EOF leaves CONNECTING for CLOSED
        # without ever being upgraded, and must not be counted out of the hub.
        self.registered = False
        self.head = b""  # the upgrade request's bytes so far
        self.tokens = 0.0  # the rate limiter's bucket, filled at the upgrade
        # The window bits of a negotiated permessage-deflate, else 0: all the
        # compression state a connection has (see rango.deflate).
        self.deflate = 0
        # Where websockets' parser stands in the client's frames (frames.skip):
        # 0 between frames, when its protocol object can be dropped.
        self.scan: int | bytes = 0

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
                max_size=self.gateway.config.max_frame_size,
                logger=_ws_logger,
            )
            if self.deflate:
                # Compressed client frames, inflated one message at a time with
                # the inflated size bounded by max_size (RFC 7692 §7.2.2).
                ws.extensions = [deflate.Inflate()]
        return ws

    # Input.

    def receive_data(self, data: bytes) -> None:
        """Take bytes the client sent."""
        ws = self.ws
        if ws is None:
            phase = self.phase
            if phase is _CONNECTING:
                self._request_data(data)
                return
            if phase is not _OPEN:
                return  # after the client's close frame: discarded (RFC 6455 §1.4)
            control = frames.parse_control(data)
            if control is not None:
                self._control(control)
                return
        elif ws.state is _CONNECTING:
            # websockets parses an unusual request; the size bound still holds.
            self.head += data
            if len(self.head) > MAX_REQUEST_SIZE:
                self._refuse_large_request()
                return
        self._receive(data)

    def receive_eof(self) -> None:
        """The client ended its stream; before the upgrade that just drops the request."""
        if self.ws is not None or self.phase is _OPEN:
            self._protocol().receive_eof()
            self._send_protocol_data()

    def lost(self) -> None:
        """The TCP connection is gone: leave the hub, drop what was not written."""
        if self.registered:
            self._leave_hub()
        self.pending = None

    def tick(self, now: float) -> bool:
        """Keepalive and timeouts at ``now``; True when the TCP stream must be aborted.

        An open connection silent for RANGO_PING_INTERVAL is pinged and must
        answer (any frame) within RANGO_PING_TIMEOUT, else it is closed with
        1011. The upgrade request must be complete within
        RANGO_HANDSHAKE_TIMEOUT, and a closing handshake within
        RANGO_PING_TIMEOUT; past either the stream is aborted.
        """
        config = self.gateway.config
        deadline = self.deadline
        if self.state is _OPEN:
            if deadline:
                if now > deadline:
                    self.gateway.closing("keepalive_timeout", self)
                    self.close(CloseCode.INTERNAL_ERROR, "keepalive ping timeout")
            elif now - self.heard_at >= config.ping_interval:
                self.deadline = now + config.ping_timeout
                self.push(frames.PING)
            return False
        if not deadline:
            # Closed by the peer (or by websockets on a protocol error): the
            # closing handshake gets its time from the first tick that sees it.
            self.deadline = now + config.ping_timeout
            return False
        return now > deadline

    # Output.

    def push(self, frame: bytes) -> None:
        """Queue a pre-encoded frame; the gateway writes it this loop iteration.

        Called by the hub once per subscriber per run of events: keep it short.
        """
        pending = self.pending
        if pending is None:
            self.pending = frame
            gateway = self.gateway
            gateway.dirty.append(self)
            if not gateway.flush_scheduled:
                gateway.schedule_flush()
        elif pending.__class__ is list:
            pending.append(frame)
        else:
            # The class checks above keep the hot path cheap; mypy does not follow them.
            self.pending = [pending, frame]  # type: ignore[list-item]

    def send(self, frame: bytes) -> None:
        """Queue an answer of this connection's own, after the events already routed."""
        self.gateway.hub.flush()
        self.push(frame)

    def data_to_send(self) -> bytes:
        """Take the bytes queued so far (for callers that are not the gateway's flush)."""
        pending, self.pending = self.pending, None
        if pending is None:
            return b""
        return pending if isinstance(pending, bytes) else b"".join(pending)

    def close(self, code: int = CloseCode.GOING_AWAY, reason: str = "", fail: bool = False) -> None:
        """Start the closing handshake after what is queued; no-op if not open.

        With ``fail``, the connection is failed instead (RFC 6455 §7.1.7): the
        close frame is sent, the rest of the input is discarded and TCP ends as
        soon as it is written.
        """
        if self.state is not _OPEN:
            return
        self.deadline = self.gateway.clock() + self.gateway.config.ping_timeout
        ws = self._protocol()
        if fail:
            ws.fail(code, reason)
        else:
            ws.send_close(code, reason)
        self._send_protocol_data()

    def _leave_hub(self) -> None:
        """Unsubscribe from everything; the hub's current run is pushed first.

        Called once per registered connection, whichever side closes first.
        """
        self.registered = False
        log.debug("client gone (%s), %d subscriptions", self.auth.uid or "anonymous",
                  len(self.subscriptions))
        self.gateway.hub.disconnect(self)

    def _send_protocol_data(self) -> None:
        """Queue what websockets' protocol has to send; its EOF ends the stream."""
        ws = self.ws
        if ws is None:
            return
        if self.registered and ws.state is not _OPEN:
            # Closing: no data frame may follow the close frame (RFC 6455
            # §5.5.1), so leave the hub before that frame is queued.
            self._leave_hub()
        for data in ws.data_to_send():
            if not data:
                self._end()
                return
            self.push(data)

    def _end(self) -> None:
        """End the TCP stream once what is queued is written."""
        gateway = self.gateway
        gateway.ends.append(self)
        if not gateway.flush_scheduled:
            gateway.schedule_flush()

    # The upgrade.

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
                # here since admission never saw a request.
                self.gateway.events.rejected(parse_failure_status(ws.handshake_exc))
        else:
            if not self._admit(upgrade.target, upgrade.authorization, upgrade.origin,
                               upgrade.host):
                return
            agreed = self._negotiate(upgrade.extensions) if upgrade.extensions else ""
            self.push(handshake.accept(upgrade, agreed))  # leaves with the subscribed answer
            self._open(upgrade.target)
        if rest and self.state is _OPEN:
            self.receive_data(rest)  # frames the client sent without waiting

    def _refuse_large_request(self) -> None:
        """Answer a request over MAX_REQUEST_SIZE without parsing the rest of it."""
        status = oversized_status(self.head)
        if status == 401:
            self.gateway.admission.refused(f"request headers larger than {MAX_REQUEST_SIZE} bytes")
        self.gateway.events.rejected(status)
        self.ws = None
        self.phase = _CLOSED  # the rest of the request is discarded
        self.head = b""
        self.push(handshake.refusal(status))
        self._end()

    def _handshake(self, request: Request) -> None:
        """Answer a request that websockets parsed (see _request_data)."""
        authorization, origin, host = request_values(request.headers)
        if not self._admit(request.path, authorization, origin, host):
            return
        ws = self._protocol()
        response = ws.accept(request)
        if response.status_code == 101:
            agreed = self._negotiate(request.headers.get_all("Sec-WebSocket-Extensions"))
            if agreed:
                response.headers["Sec-WebSocket-Extensions"] = agreed
        ws.send_response(response)
        if response.status_code != 101:
            self.gateway.events.rejected(response.status_code)
            log.debug("upgrade refused: %d %s", response.status_code, response.reason_phrase)
            self._send_protocol_data()
            return
        self._send_protocol_data()  # the 101 response goes before any frame
        # The protocol saw the request alone and keeps it (~1.7 KB) in its
        # suspended parser: a fresh one, created on the first frame, is the
        # same protocol without it.
        self.ws = None
        self._open(request.path)

    def _negotiate(self, offers: list[str] | tuple[str, ...]) -> str:
        """The ``Sec-WebSocket-Extensions`` answer to ``offers`` ("" for none), the
        same on both handshake paths; sets :attr:`deflate` when one is agreed."""
        if not offers or not self.gateway.config.compression:
            return ""
        agreement = deflate.negotiate(offers)
        if agreement is None:
            return ""
        self.deflate = agreement.window_bits
        return agreement.header

    def _admit(
        self, target: str, authorization: str | None, origin: str | None, host: str | None
    ) -> bool:
        """Ask admission; refuse with its status and return False, or take its identity."""
        gateway = self.gateway
        verdict = gateway.admission.check(gateway.hub.clients, target, authorization, origin,
                                          host)
        self.auth = verdict.auth
        if not verdict.status:
            return True
        gateway.events.rejected(verdict.status)
        log.debug("upgrade refused: %d %s", verdict.status, verdict.reason)
        ws = self._protocol()
        ws.send_response(ws.reject(verdict.status, verdict.reason + "\n"))
        self._send_protocol_data()
        return False

    def _open(self, target: str) -> None:
        """Register the upgraded connection; its query-string streams are subscribed."""
        gateway = self.gateway
        self.phase = _OPEN
        self.head = b""
        # The clocks keep the request's arrival: close enough for a keepalive
        # and a bucket that starts full, and no clock read per upgrade.
        self.tokens = gateway.burst
        self.deadline = 0.0
        self.registered = True
        gateway.hub.connect(self, target_streams(target))
        if gateway.draining:
            self.close(CloseCode.GOING_AWAY, "server shutting down")

    # Frames.

    def _control(self, control: frames.Control) -> None:
        """Answer a control frame that :func:`frames.parse_control` read."""
        opcode = control.opcode
        if opcode == frames.OP_CLOSE:
            self._closed_by_client(control.payload)
            return
        now = self.gateway.clock()
        if opcode == frames.OP_PING:
            if not self._allowed(now):
                return  # failed with 1008
            self.push(frames.pong(control.payload))
        self.heard_at = now
        self.deadline = 0.0

    def _closed_by_client(self, payload: bytes) -> None:
        """Echo a client's close frame and end the stream, as websockets does (§5.5.1)."""
        self.phase = _CLOSING
        if self.registered:
            self._leave_hub()
        self.push(frames.close(payload))
        self._end()

    def _receive(self, data: bytes) -> None:
        """Hand ``data`` to websockets' protocol and act on what it parsed."""
        ws = self._protocol()
        if ws.state is _OPEN:
            self.scan = frames.skip(self.scan, data)
        ws.receive_data(data)
        # One clock read (and one float object, which heard_at and refilled_at share
        # as long as the connection idles) for everything these bytes carried.
        now = self.gateway.clock()
        for event in ws.events_received():
            if isinstance(event, Request):
                self._handshake(event)
            else:
                # A ServerProtocol yields the Request, then Frames of bytes.
                frame = cast(Frame, event)
                self._frame(frame.opcode, cast(bytes, frame.data), frame.fin, now)
        self._send_protocol_data()
        if ws.state is _OPEN:
            # Any frame proves the peer alive (before the upgrade, the
            # handshake deadline stands).
            self.heard_at = now
            self.deadline = 0.0
            if self.ws is ws and self.scan == 0 and self.fragments is None and _idle(ws):
                # Between messages websockets' protocol holds nothing a fresh one
                # would not (~1.3 KB with its parser): drop it, as after the
                # upgrade; the next frame gets a new one (see _protocol).
                self.ws = None

    def _frame(self, opcode: Opcode, data: bytes, fin: bool, now: float) -> None:
        if opcode is _OP_TEXT or opcode is _OP_BINARY:
            binary = opcode is _OP_BINARY
            if not fin:
                self.fragments = [data]
                self.fragments_binary = binary
                return
        elif opcode is _OP_CONT:
            if self.fragments is None:
                return  # websockets already failed the connection
            self.fragments.append(data)
            if not fin:
                return
            data = b"".join(self.fragments)
            self.fragments = None
            binary = self.fragments_binary
        elif opcode is _OP_PONG:
            return
        elif opcode is _OP_PING:
            self._allowed(now)  # websockets answered it; a flood still counts
            return
        else:
            return  # close is handled by websockets
        if self.state is not _OPEN or not self._allowed(now):
            return
        if binary:
            self.send(text_frame(error("binary frames are not supported, send text")))
            return
        self._message(data)

    def _allowed(self, now: float) -> bool:
        """Spend a token for one client frame; close with 1008 when none is left.

        A token bucket: RANGO_RATE_LIMIT tokens a second, at most RANGO_RATE_BURST.
        """
        if self.state is not _OPEN:
            return False
        gateway = self.gateway
        tokens = min(
            gateway.burst, self.tokens + (now - self.refilled_at) * gateway.config.rate_limit
        )
        self.refilled_at = now
        if tokens >= 1.0:
            self.tokens = tokens - 1.0
            return True
        self.tokens = tokens
        gateway.closing("rate_limit", self)
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
        hub = self.gateway.hub
        if request.event == "subscribe":
            hub.subscribe(self, request.streams)
        else:
            hub.unsubscribe(self, request.streams)
