"""The connection state machine in-process: no socket, no broker, a clock of the test's own.

A websockets :class:`~websockets.client.ClientProtocol` (sans I/O too) plays the
client where a real client's behaviour matters; raw bytes are fed where the
exact frame matters. Every frame path, both handshake paths, the rate limit,
keepalive, timeouts and every way to close.
"""

from __future__ import annotations

from typing import Any

import jwt
import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from websockets.client import ClientProtocol
from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory
from websockets.frames import Close, Frame, Opcode
from websockets.http11 import Response
from websockets.protocol import State
from websockets.uri import parse_uri

from rango import frames
from rango.config import Config
from rango.connection import Connection, Gateway
from rango.deflate import Deflater
from rango.hub import Hub

UID = "IDUNIT000001"


@pytest.fixture(scope="module")
def signing_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


class Recorder:
    """The gateway's events, as a list of ``(kind, value)``."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, object]] = []

    def rejected(self, status: int) -> None:
        self.seen.append(("rejected", status))

    def closed(self, reason: str) -> None:
        self.seen.append(("closed", reason))

    def slow_client(self) -> None:
        self.seen.append(("slow", None))

    def accept_failed(self, reason: str) -> None:
        self.seen.append(("accept_failed", reason))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class World:
    """A gateway with a hub, a recorder and a manual clock."""

    def __init__(self, key: ec.EllipticCurvePrivateKey, **settings: Any) -> None:
        pem = key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.config = Config(jwt_public_key=pem, jwt_algorithm="ES256", **settings)
        self.key = key
        self.hub = Hub(
            rbac={"admin": frozenset({"admin"})},
            deflater=Deflater() if self.config.compression else None,
            min_size=self.config.compression_min_size,
        )
        self.events = Recorder()
        self.clock = Clock()
        self.gateway = Gateway(self.config, self.hub, self.events, clock=self.clock)

    def token(self, uid: str = UID, role: str = "member") -> str:
        now = int(self.clock.now)
        return jwt.encode({"uid": uid, "role": role, "iat": now, "exp": now + 3_600_000_000},
                          self.key, algorithm="ES256")

    def connect(
        self, path: str = "/public", extensions: list[Any] | None = None, **headers: str
    ) -> Peer:
        peer = Peer(self, path, headers, extensions)
        peer.pump()
        return peer


class Peer:
    """A websockets client protocol wired to one Rango connection."""

    def __init__(
        self, world: World, path: str, headers: dict[str, str],
        extensions: list[Any] | None = None,
    ) -> None:  # fmt: skip
        self.world = world
        self.client = ClientProtocol(
            parse_uri(f"ws://127.0.0.1:8080{path}"), extensions=extensions
        )
        request = self.client.connect()
        for name, value in headers.items():
            request.headers[name.replace("_", "-")] = value
        self.client.send_request(request)
        self.conn = Connection(world.gateway)
        self.response: Response | None = None

    @property
    def ended(self) -> bool:
        return self.conn in self.world.gateway.ends

    def send_raw(self, data: bytes) -> list[Any]:
        self.conn.receive_data(data)
        return self.receive()

    def pump(self) -> list[Any]:
        """Client bytes to Rango, then Rango's bytes back; the client's events."""
        for data in self.client.data_to_send():
            if data:
                self.conn.receive_data(data)
            else:
                self.conn.receive_eof()
        return self.receive()

    def receive(self) -> list[Any]:
        """What Rango queued, as the client parses it (Responses and Frames)."""
        self.world.hub.flush()
        data = self.conn.data_to_send()
        if data:
            self.client.receive_data(data)
        if self.ended and self.client.state is not State.CLOSED:
            self.client.receive_eof()
        events = self.client.events_received()
        for event in events:
            if isinstance(event, Response):
                self.response = event
        return events

    def messages(self, events: list[Any] | None = None) -> list[Any]:
        """The JSON of the text frames among ``events`` (default: what arrives now)."""
        events = self.receive() if events is None else events
        return [orjson.loads(e.data) for e in events
                if isinstance(e, Frame) and e.opcode is Opcode.TEXT]

    def send_text(self, text: str | bytes) -> list[Any]:
        self.client.send_text(text.encode() if isinstance(text, str) else text)
        return self.messages(self.pump())


def masked(opcode: int, payload: bytes = b"", fin: bool = True) -> bytes:
    """A client frame as a real client sends it (websockets' own serializer, masked)."""
    return Frame(Opcode(opcode), payload, fin).serialize(mask=True, extensions=[])


def subscribed(streams: list[str]) -> dict[str, Any]:
    return {"success": {"message": "subscribed", "streams": streams}}


@pytest.fixture
def world(signing_key: ec.EllipticCurvePrivateKey) -> World:
    return World(signing_key)


# The upgrade: the fast path, websockets' path, refusals.


def test_fast_path_upgrade_queues_101_and_subscribed_in_one_write(world: World) -> None:
    peer = Peer(world, "/public?stream=btcusd.trades", {})
    for data in peer.client.data_to_send():
        peer.conn.receive_data(data)
    assert peer.conn.ws is None  # no websockets protocol on the fast path
    written = peer.conn.data_to_send()
    assert written.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    peer.client.receive_data(written)
    events = peer.client.events_received()
    assert isinstance(events[0], Response) and events[0].status_code == 101
    assert peer.messages(events) == [subscribed(["btcusd.trades"])]
    assert peer.conn.state is State.OPEN and peer.conn.registered
    assert world.hub.clients == 1


def test_unusual_request_goes_through_websockets(world: World) -> None:
    peer = world.connect("/public?stream=a.b", Sec_WebSocket_Protocol="chat")
    assert peer.response is not None and peer.response.status_code == 101
    # websockets' protocol is dropped after the 101: a fresh one comes with the first frame.
    assert peer.conn.ws is None and peer.conn.state is State.OPEN
    assert world.hub.clients == 1


def test_request_trickled_byte_by_byte(world: World) -> None:
    peer = Peer(world, "/public", {})
    request = b"".join(peer.client.data_to_send())
    for i in range(len(request)):
        peer.conn.receive_data(request[i : i + 1])
    assert peer.messages(peer.receive()) == [subscribed([])]


def test_frames_sent_with_the_request_are_read_after_the_upgrade(world: World) -> None:
    peer = Peer(world, "/public", {})
    request = b"".join(peer.client.data_to_send())
    subscribe = masked(frames.OP_TEXT, b'{"event":"subscribe","streams":["x.y"]}')
    peer.conn.receive_data(request + subscribe)
    assert peer.messages(peer.receive()) == [subscribed([]), subscribed(["x.y"])]


@pytest.mark.parametrize(
    ("path", "headers", "status"),
    [
        ("/private", {}, 401),
        ("/private", {"Authorization": "Bearer nope"}, 401),
        ("/public", {"Origin": "https://evil.example"}, 403),
        ("/public", {"Sec_WebSocket_Protocol": "x", "Origin": "https://evil.example"}, 403),
    ],
)
def test_refusals_answer_and_end(world: World, path: str, headers: dict[str, str],
                                 status: int) -> None:
    peer = world.connect(path, **headers)
    assert peer.response is not None and peer.response.status_code == status
    assert peer.ended and not peer.conn.registered
    assert world.events.seen == [("rejected", status)]
    assert world.hub.clients == 0


def test_private_with_a_token(world: World) -> None:
    peer = world.connect("/private?stream=orders", Authorization=f"Bearer {world.token()}")
    assert peer.messages(peer.receive()) == []  # already read by connect
    assert peer.conn.auth.uid == UID
    assert world.hub.private[UID]["orders"] == {peer.conn}


def test_connection_cap_refuses_with_503(signing_key: ec.EllipticCurvePrivateKey) -> None:
    world = World(signing_key, max_connections=1)
    assert world.connect().response.status_code == 101  # type: ignore[union-attr]
    assert world.connect().response.status_code == 503  # type: ignore[union-attr]
    assert ("rejected", 503) in world.events.seen


def test_malformed_request_is_refused_by_websockets_and_counted(world: World) -> None:
    conn = Connection(world.gateway)
    conn.receive_data(b"GET / HTTP/1.1\r\nBad Header\r\n\r\n")
    assert conn.data_to_send() == b""  # websockets closes such a request unanswered
    assert conn in world.gateway.ends
    assert world.events.seen == [("rejected", 400)]


@pytest.mark.parametrize(("path", "status"), [(b"/public", 431), (b"/private", 401)])
def test_oversized_request(world: World, path: bytes, status: int) -> None:
    conn = Connection(world.gateway)
    conn.receive_data(b"GET " + path + b" HTTP/1.1\r\nX-Big: " + b"a" * 20_000)
    assert conn.data_to_send().startswith(b"HTTP/1.1 %d " % status)
    assert conn in world.gateway.ends
    conn.receive_data(b"more\r\n\r\n")  # the rest of the request is discarded
    assert conn.data_to_send() == b""
    assert world.events.seen == [("rejected", status)]


def test_eof_before_the_request_ends_quietly(world: World) -> None:
    conn = Connection(world.gateway)
    conn.receive_data(b"GET / HTTP/1.1\r\n")
    conn.receive_eof()
    assert conn.data_to_send() == b"" and world.hub.clients == 0


# Frames.


def test_requests_and_answers(world: World) -> None:
    peer = world.connect()
    assert peer.send_text('{"event":"subscribe","streams":["a.b","c.d"]}') == [
        subscribed(["a.b", "c.d"])
    ]
    assert peer.send_text('{"event":"unsubscribe","streams":["a.b"]}') == [
        {"success": {"message": "unsubscribed", "streams": ["c.d"]}}
    ]
    assert peer.send_text("not json")[0]["error"].startswith("could not parse message")
    assert peer.send_text("   ") == []


def test_text_ping_answers_pong(world: World) -> None:
    peer = world.connect()
    peer.client.send_text(b"ping")
    events = peer.pump()
    assert [e.data for e in events if isinstance(e, Frame)] == [b"pong"]


def test_binary_frame_is_an_error(world: World) -> None:
    peer = world.connect()
    peer.client.send_binary(b"\x00")
    assert peer.messages(peer.pump()) == [{"error": "binary frames are not supported, send text"}]


def test_fragmented_message_is_reassembled(world: World) -> None:
    peer = world.connect()
    text = b'{"event":"subscribe","streams":["f.g"]}'
    data = masked(frames.OP_TEXT, text[:10], fin=False) + masked(frames.OP_CONT, text[10:])
    assert peer.messages(peer.send_raw(data)) == [subscribed(["f.g"])]


def test_invalid_utf8_closes_with_1007(world: World) -> None:
    peer = world.connect()
    events = peer.send_raw(masked(frames.OP_TEXT, b'{"event":"\xff"}'))
    closes = [Close.parse(e.data) for e in events
              if isinstance(e, Frame) and e.opcode is Opcode.CLOSE]
    assert [c.code for c in closes] == [1007]
    assert peer.ended and not peer.conn.registered


def test_oversized_frame_closes_with_1009(world: World) -> None:
    peer = world.connect()
    events = peer.send_raw(masked(frames.OP_TEXT, b"x" * 5000))
    assert [Close.parse(e.data).code for e in events
            if isinstance(e, Frame) and e.opcode is Opcode.CLOSE] == [1009]


def test_ping_control_frame_is_answered_without_websockets(world: World) -> None:
    peer = world.connect()
    peer.conn.receive_data(masked(frames.OP_PING, b"hey"))
    assert peer.conn.ws is None
    assert peer.conn.data_to_send() == frames.pong(b"hey")


def test_pong_needs_no_answer_and_no_protocol(world: World) -> None:
    peer = world.connect()
    peer.conn.receive_data(masked(frames.OP_PONG, b""))
    assert peer.conn.ws is None and peer.conn.data_to_send() == b""


@pytest.mark.parametrize("payload", [b"", b"\x03\xe8", b"\x03\xe9"])
def test_client_close_is_echoed_on_the_fast_path(world: World, payload: bytes) -> None:
    peer = world.connect("/public?stream=a.b")
    peer.conn.receive_data(masked(frames.OP_CLOSE, payload))
    assert peer.conn.ws is None
    assert peer.conn.data_to_send() == frames.close(payload)
    assert peer.ended and not peer.conn.registered and world.hub.public == {}
    peer.conn.receive_data(masked(frames.OP_TEXT, b"ping"))  # discarded after the close
    assert peer.conn.data_to_send() == b""


def test_other_close_codes_go_through_websockets(world: World) -> None:
    peer = world.connect()
    peer.client.send_close(4000, "bye")
    events = peer.pump()
    assert peer.conn.ws is not None
    assert [Close.parse(e.data).code for e in events if isinstance(e, Frame)] == [4000]
    assert peer.ended and world.hub.clients == 0


# Rate limit.


def test_rate_limit_closes_with_1008(signing_key: ec.EllipticCurvePrivateKey) -> None:
    world = World(signing_key, rate_burst=3, rate_limit=1.0)
    peer = world.connect()
    for _ in range(3):
        peer.conn.receive_data(masked(frames.OP_PING))
    assert not peer.ended
    events = peer.send_raw(masked(frames.OP_PING))
    assert [Close.parse(e.data).code for e in events
            if isinstance(e, Frame) and e.opcode is Opcode.CLOSE] == [1008]
    assert ("closed", "rate_limit") in world.events.seen


def test_rate_limit_refills_with_time(signing_key: ec.EllipticCurvePrivateKey) -> None:
    world = World(signing_key, rate_burst=2, rate_limit=1.0)
    peer = world.connect()
    for _ in range(10):
        peer.conn.receive_data(masked(frames.OP_PING))
        peer.conn.receive_data(masked(frames.OP_PING))
        world.clock.now += 2.0
    assert not peer.ended and world.events.seen == []


# Keepalive and timeouts.


def test_keepalive_ping_then_close_with_1011(world: World) -> None:
    peer = world.connect()
    world.clock.now += world.config.ping_interval - 1
    assert peer.conn.tick(world.clock.now) is False
    assert peer.conn.data_to_send() == b""
    world.clock.now += 1
    assert peer.conn.tick(world.clock.now) is False
    assert peer.conn.data_to_send() == frames.PING
    world.clock.now += world.config.ping_timeout + 0.01
    assert peer.conn.tick(world.clock.now) is False
    closes = [Close.parse(e.data).code for e in peer.receive()
              if isinstance(e, Frame) and e.opcode is Opcode.CLOSE]
    assert closes == [1011] and ("closed", "keepalive_timeout") in world.events.seen
    # The closing handshake then gets ping_timeout before the stream is aborted.
    world.clock.now += world.config.ping_timeout + 0.01
    assert peer.conn.tick(world.clock.now) is True


def test_any_frame_answers_the_keepalive_ping(world: World) -> None:
    peer = world.connect()
    world.clock.now += world.config.ping_interval
    peer.conn.tick(world.clock.now)
    peer.conn.data_to_send()
    peer.conn.receive_data(masked(frames.OP_PONG))
    world.clock.now += world.config.ping_timeout + 1
    peer.conn.tick(world.clock.now)
    assert peer.conn.data_to_send() == b"" and world.events.seen == []


def test_handshake_timeout_aborts(world: World) -> None:
    conn = Connection(world.gateway)
    conn.receive_data(b"GET / HTTP/1.1\r\n")
    world.clock.now += world.config.handshake_timeout
    assert conn.tick(world.clock.now) is False
    world.clock.now += 0.01
    assert conn.tick(world.clock.now) is True


def test_peer_close_handshake_timeout_aborts(world: World) -> None:
    peer = world.connect()
    peer.conn.receive_data(masked(frames.OP_CLOSE, b"\x03\xe8"))
    assert peer.conn.tick(world.clock.now) is False  # starts the closing clock
    world.clock.now += world.config.ping_timeout + 0.01
    assert peer.conn.tick(world.clock.now) is True


# Closing from the server side, and the order of frames.


def test_frames_routed_before_a_close_go_first_and_none_after(world: World) -> None:
    peer = world.connect("/public?stream=m.trades")
    peer.receive()
    world.hub.wake = world.gateway.schedule_flush
    world.hub.route("public.m.trades", b'{"n":1}')
    peer.conn.close(1001, "server shutting down")
    world.hub.route("public.m.trades", b'{"n":2}')
    events = peer.receive()
    kinds = [(e.opcode, e.data) for e in events if isinstance(e, Frame)]
    assert kinds[0] == (Opcode.TEXT, b'{"m.trades":{"n":1}}')
    assert kinds[1][0] is Opcode.CLOSE and Close.parse(kinds[1][1]).code == 1001
    assert len(kinds) == 2 and not peer.conn.registered


def test_close_is_a_no_op_unless_open(world: World) -> None:
    conn = Connection(world.gateway)
    conn.close()
    assert conn.data_to_send() == b"" and conn.ws is None


def test_failing_ends_the_stream(world: World) -> None:
    peer = world.connect()
    peer.conn.close(1008, "x", fail=True)
    assert peer.ended


def test_upgrade_while_draining_is_closed_with_1001(world: World) -> None:
    world.gateway.draining = True
    peer = Peer(world, "/public?stream=a.b", {})
    frames_ = [e for e in peer.pump() if isinstance(e, Frame)]
    messages = [orjson.loads(f.data) for f in frames_ if f.opcode is Opcode.TEXT]
    assert messages == [subscribed(["a.b"])]
    assert peer.client.close_rcvd is not None and peer.client.close_rcvd.code == 1001
    assert world.hub.clients == 0


def test_eof_after_the_upgrade_ends_and_lost_leaves_the_hub(world: World) -> None:
    peer = world.connect("/public?stream=a.b")
    peer.conn.receive_eof()
    assert peer.ended and world.hub.clients == 0
    other = world.connect("/public?stream=a.b")
    other.conn.lost()
    assert world.hub.clients == 0 and world.hub.public == {}
    other.conn.lost()  # twice is harmless
    assert world.hub.clients == 0


def test_push_queues_one_reference_then_a_list(world: World) -> None:
    peer = world.connect()
    peer.conn.data_to_send()
    world.gateway.dirty.clear()
    frame = frames.encode(b"x")
    peer.conn.push(frame)
    assert peer.conn.pending is frame and world.gateway.dirty == [peer.conn]
    peer.conn.push(frame)
    assert peer.conn.pending == [frame, frame] and world.gateway.dirty == [peer.conn]


# permessage-deflate (RFC 7692): both handshake paths, frames both ways.

DEFLATE = [ClientPerMessageDeflateFactory()]  # websockets' default client offer
BIG = {"asks": [[f"{100 + i / 100:.2f}", "1.5000"] for i in range(60)]}


def zworld(key: ec.EllipticCurvePrivateKey, **settings: Any) -> World:
    return World(key, compression=True, compression_min_size=256, **settings)


@pytest.mark.parametrize("subprotocol", [False, True], ids=["fast-path", "websockets-path"])
def test_compression_negotiated_on_both_handshake_paths(signing_key, subprotocol):
    world = zworld(signing_key)
    headers = {"Sec_WebSocket_Protocol": "x"} if subprotocol else {}
    peer = world.connect("/public?stream=eurusd.trades", extensions=DEFLATE, **headers)
    assert peer.response is not None and peer.response.status_code == 101
    assert peer.response.headers["Sec-WebSocket-Extensions"] == (
        "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
    )
    assert peer.conn.deflate == 15
    assert world.hub.deflating == 1
    world.hub.route("public.eurusd.trades", orjson.dumps(BIG))
    world.hub.route("public.eurusd.trades", b'{"n":1}')
    world.hub.flush()
    data = peer.conn.data_to_send()
    assert data[0] == 0xC1, "RSV1 set on the large frame"
    peer.client.receive_data(data)
    got = [orjson.loads(e.data) for e in peer.client.events_received()]
    assert got == [{"eurusd.trades": BIG}, {"eurusd.trades": {"n": 1}}]
    peer.conn.lost()
    assert world.hub.deflating == 0


def test_compression_off_ignores_the_offer(signing_key):
    world = World(signing_key)
    peer = world.connect("/public", extensions=DEFLATE)
    assert peer.response is not None
    assert "Sec-WebSocket-Extensions" not in peer.response.headers
    assert peer.conn.deflate == 0


def test_compressed_client_frames_are_inflated_and_bounded(signing_key):
    world = zworld(signing_key, max_frame_size=4096)
    peer = world.connect("/public", extensions=DEFLATE)
    peer.messages()
    answers = peer.send_text(orjson.dumps({"event": "subscribe", "streams": ["a.trades"]}))
    assert answers[0]["success"]["streams"] == ["a.trades"]
    bomb = orjson.dumps({"event": "subscribe", "streams": ["b" * 100_000]})
    peer.client.send_text(bomb)  # ~200 bytes on the wire, 100 KB inflated
    events = peer.pump()
    closes = [
        Close.parse(e.data) for e in events if isinstance(e, Frame) and e.opcode is Opcode.CLOSE
    ]
    assert closes and closes[0].code == 1009, events


def test_hub_compresses_once_per_window_and_keeps_order(signing_key):
    world = zworld(signing_key)
    deflated = [world.connect("/public?stream=x.trades", extensions=DEFLATE) for _ in range(3)]
    plain = [world.connect("/public?stream=x.trades") for _ in range(2)]
    for peer in [*deflated, *plain]:
        peer.messages()
    calls = []
    compress = world.hub.deflater.compress  # type: ignore[union-attr]
    world.hub.deflater.compress = lambda p, b=15: calls.append(b) or compress(p, b)  # type: ignore[union-attr,method-assign]
    bodies = [BIG, {"n": 1}, {**BIG, "k": 2}]
    for body in bodies:
        world.hub.route("public.x.trades", orjson.dumps(body))
    world.hub.flush()
    assert calls == [15, 15], "each large frame compressed once for all three clients"
    for peer in [*deflated, *plain]:
        assert peer.messages() == [{"x.trades": body} for body in bodies]


def test_websockets_protocol_is_dropped_between_messages(signing_key):
    """After a subscribe frame the connection keeps no websockets protocol (the
    browser-like connection costs what a listening one does); a frame cut across
    segments, or a fragmented message, keeps it until the message is complete."""
    world = World(signing_key)
    peer = world.connect("/public")
    peer.messages()
    answers = peer.send_text('{"event":"subscribe","streams":["a.trades"]}')
    assert answers[0]["success"]["streams"] == ["a.trades"]
    assert peer.conn.ws is None
    frame = masked(0x1, b'{"event":"subscribe","streams":["b.trades"]}')
    peer.send_raw(frame[:3])
    assert peer.conn.ws is not None  # mid-frame
    got = peer.send_raw(frame[3:])
    assert peer.messages(got)[0]["success"]["streams"] == ["a.trades", "b.trades"]
    assert peer.conn.ws is None
    peer.send_raw(masked(0x1, b'{"event":"unsubscribe",', fin=False))
    assert peer.conn.ws is not None  # mid-message
    got = peer.send_raw(masked(0x0, b'"streams":["a.trades"]}'))
    assert peer.messages(got)[0]["success"]["streams"] == ["b.trades"]
    assert peer.conn.ws is None
