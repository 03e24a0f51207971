"""PROTOCOL §3, end to end: every kind of client frame and its answer."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from support.answers import (
    answered_with_an_error,
    assert_alive,
    expect,
    expect_error,
    request,
    subscribe,
    subscribed,
    unsubscribed,
)
from support.broker import unique
from support.gateway import Rango
from support.tokens import KeyPair
from support.wire import OP_CLOSE, OP_CONT, OP_PING, OP_PONG, OP_TEXT, RawClient
from websockets.exceptions import ConnectionClosed, ConnectionClosedError


def closed_with(ws: Any, code: int) -> None:
    """The server closes the connection with ``code``, sending nothing else first."""
    with pytest.raises(ConnectionClosedError) as info:
        ws.recv(timeout=5)
    assert info.value.rcvd is not None, "no close frame received"
    assert info.value.rcvd.code == code


def send_too_big(ws: Any, message: Any, code: int = 1009) -> None:
    """Send ``message``; the server closes with ``code`` (maybe while it is being sent)."""
    try:
        ws.send(message)
    except ConnectionClosedError as exc:  # closed before the last fragment went out
        assert exc.rcvd is not None and exc.rcvd.code == code
        return
    closed_with(ws, code)


def padded(text: str, size: int) -> str:
    """``text`` padded with trailing spaces (still the same JSON) to ``size`` bytes."""
    assert len(text.encode()) <= size
    return text + " " * (size - len(text.encode()))


# ping


@pytest.mark.parametrize("frame", ["ping", " ping", "ping\n", "\t ping \r\n "])
def test_ping_answers_pong(rango, frame):
    with rango.connect() as ws:
        expect(ws, subscribed([]))
        ws.send(frame)
        assert ws.recv(timeout=5) == "pong"
        ws.send(frame)
        assert ws.recv(timeout=5) == "pong"


@pytest.mark.parametrize("frame", ["PING", "pingping", "p ing", '"ping"'])
def test_not_quite_ping_is_an_error(rango, frame):
    answered_with_an_error(rango, frame)


# subscribe / unsubscribe


def test_subscribe_and_unsubscribe_answer_full_lists(rango):
    m = unique()
    a, b, c = f"{m}.trades", f"{m}.ob-inc", f"global.{m}"
    with rango.connect("/public", f"stream={a}") as ws:
        expect(ws, subscribed([a]))
        assert subscribe(ws, [b]) == subscribed([a, b])
        assert subscribe(ws, [c]) == subscribed([a, b, c])
        request(ws, "unsubscribe", [b])
        expect(ws, unsubscribed([a, c]))
        request(ws, "unsubscribe", [a, c])
        expect(ws, unsubscribed([]))
        assert subscribe(ws, [a]) == subscribed([a])


def test_subscribe_with_private_streams_authenticated(rango, keys):
    m = unique()
    with rango.connect("/private", additional_headers=keys.bearer()) as ws:
        expect(ws, subscribed([]))
        assert subscribe(ws, ["order", f"{m}.trades", "trade"]) == subscribed(
            ["order", f"{m}.trades", "trade"]
        )
        request(ws, "unsubscribe", ["order"])
        expect(ws, unsubscribed([f"{m}.trades", "trade"]))


def test_duplicate_subscribe_is_a_noop(rango, publisher):
    m = unique()
    s = f"{m}.trades"
    with rango.connect("/public", f"stream={s}&stream={s}") as ws:
        expect(ws, subscribed([s]))
        assert subscribe(ws, [s, s]) == subscribed([s])
        assert subscribe(ws, [s]) == subscribed([s])
        # One subscription: one frame per event, and one unsubscribe removes it.
        publisher.publish(f"public.{m}.trades", {"n": 1})
        publisher.publish(f"public.{m}.trades", {"n": 2})
        expect(ws, {s: {"n": 1}})
        expect(ws, {s: {"n": 2}})
        request(ws, "unsubscribe", [s])
        expect(ws, unsubscribed([]))
        publisher.publish(f"public.{m}.trades", {"n": 3})
        assert_alive(ws)


def test_unsubscribe_not_subscribed_is_a_noop(rango, publisher):
    m = unique()
    s = f"{m}.trades"
    with rango.connect("/public", f"stream={s}") as ws:
        expect(ws, subscribed([s]))
        request(ws, "unsubscribe", [f"{m}.other", "order", "admin.x.y", ""])
        expect(ws, unsubscribed([s]))
        request(ws, "unsubscribe", [])
        expect(ws, unsubscribed([s]))
        publisher.publish(f"public.{m}.trades", {"n": 1})
        expect(ws, {s: {"n": 1}})


def test_subscribe_with_empty_list_answers_current_list(rango):
    m = unique()
    with rango.connect("/public", f"stream={m}.trades") as ws:
        expect(ws, subscribed([f"{m}.trades"]))
        assert subscribe(ws, []) == subscribed([f"{m}.trades"])


# Bad requests: an error frame, and the connection keeps working.

BAD_FRAMES = {
    "not JSON": "hello",
    "truncated JSON": '{"event":"subscribe","streams":["a.b"]',
    "JSON array": '["subscribe", ["a.b"]]',
    "JSON string": '"subscribe"',
    "JSON number": "42",
    "JSON null": "null",
    "other event": '{"event":"foo","streams":["a.b"]}',
    "event not a string": '{"event":1,"streams":["a.b"]}',
    "no event": '{"streams":["a.b"]}',
    "missing streams": '{"event":"subscribe"}',
    "unsubscribe missing streams": '{"event":"unsubscribe"}',
    "streams null": '{"event":"subscribe","streams":null}',
    "streams a string": '{"event":"subscribe","streams":"a.b"}',
    "streams an object": '{"event":"subscribe","streams":{"a.b":1}}',
    "streams with a number": '{"event":"subscribe","streams":["a.b",1]}',
    "streams with null": '{"event":"unsubscribe","streams":[null]}',
    "streams nested list": '{"event":"subscribe","streams":[["a.b"]]}',
}


@pytest.mark.parametrize("name", list(BAD_FRAMES))
def test_bad_request_answers_error_and_connection_stays_open(rango, publisher, name):
    m = unique()
    s = f"{m}.trades"
    with rango.connect("/public", f"stream={s}") as ws:
        expect(ws, subscribed([s]))
        ws.send(BAD_FRAMES[name])
        expect_error(ws)
        # Still open, still subscribed, still answering requests.
        publisher.publish(f"public.{m}.trades", {"n": 1})
        expect(ws, {s: {"n": 1}})
        assert subscribe(ws, [f"{m}.tickers"]) == subscribed([s, f"{m}.tickers"])
        assert_alive(ws)


def test_bad_request_changes_no_subscription(rango):
    m = unique()
    with rango.connect("/public", f"stream={m}.a") as ws:
        expect(ws, subscribed([f"{m}.a"]))
        ws.send(orjson.dumps({"event": "subscribe", "streams": [f"{m}.b", 7]}).decode())
        expect_error(ws)
        ws.send(orjson.dumps({"event": "unsubscribe", "streams": [f"{m}.a", None]}).decode())
        expect_error(ws)
        assert subscribe(ws, []) == subscribed([f"{m}.a"])


def test_many_errors_in_a_row(rango):
    with rango.connect() as ws:
        expect(ws, subscribed([]))
        for frame in BAD_FRAMES.values():
            ws.send(frame)
        for _ in BAD_FRAMES:
            expect_error(ws)
        assert_alive(ws)


# Empty frames


@pytest.mark.parametrize("frame", ["", " ", "\n", " \t\r\n "])
def test_empty_or_whitespace_frames_are_ignored(rango, frame):
    with rango.connect() as ws:
        expect(ws, subscribed([]))
        ws.send(frame)
        ws.send(frame)
        ws.send("ping")
        assert ws.recv(timeout=5) == "pong"  # nothing was answered to the empty frames


# Size limit


def test_frame_at_default_limit_is_accepted(rango):
    m = unique()
    with rango.connect() as ws:
        expect(ws, subscribed([]))
        text = orjson.dumps({"event": "subscribe", "streams": [f"{m}.trades"]}).decode()
        ws.send(padded(text, 4096))
        expect(ws, subscribed([f"{m}.trades"]))


@pytest.mark.parametrize("size", [4097, 5000, 70000])
def test_frame_over_default_limit_closes_1009(rango, size):
    with rango.connect() as ws:
        expect(ws, subscribed([]))
        send_too_big(ws, padded("ping", size))


def test_binary_frame_over_limit_closes_1009(rango):
    with rango.connect() as ws:
        expect(ws, subscribed([]))
        send_too_big(ws, b"x" * 4097)


def test_fragmented_message_over_limit_closes_1009(rango):
    """The limit applies to the whole message, not to each fragment."""
    with rango.connect() as ws:
        expect(ws, subscribed([]))
        send_too_big(ws, ["ping" + " " * 1996, " " * 2000, " " * 200])


def test_oversize_close_leaves_other_clients_alone(rango, publisher):
    m = unique()
    with rango.connect("/public", f"stream={m}.trades") as other:
        expect(other, subscribed([f"{m}.trades"]))
        with rango.connect() as ws:
            expect(ws, subscribed([]))
            send_too_big(ws, "x" * 10000)
        publisher.publish(f"public.{m}.trades", {"n": 1})
        expect(other, {f"{m}.trades": {"n": 1}})


@pytest.fixture(scope="module")
def small_rango(keys: KeyPair, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rango]:
    with Rango(
        keys, tmp_path_factory.mktemp("small"), env={"RANGO_MAX_FRAME_SIZE": "100"}
    ) as instance:
        yield instance


def test_configured_limit_accepts_frame_at_limit(small_rango):
    with small_rango.connect() as ws:
        expect(ws, subscribed([]))
        text = orjson.dumps({"event": "subscribe", "streams": ["abc.trades"]}).decode()
        ws.send(padded(text, 100))
        expect(ws, subscribed(["abc.trades"]))
        ws.send(["pi", "ng", " " * 96])  # fragmented, 100 bytes in all
        assert ws.recv(timeout=5) == "pong"


@pytest.mark.parametrize("message", ["ping" + " " * 97, ["ping", " " * 60, " " * 37]])
def test_configured_limit_closes_1009_above(small_rango, message):
    with small_rango.connect() as ws:
        expect(ws, subscribed([]))
        send_too_big(ws, message)


# Fragmentation


def test_fragmented_ping(rango):
    with rango.connect() as ws:
        expect(ws, subscribed([]))
        ws.send(["p", "i", "n", "g"])
        assert ws.recv(timeout=5) == "pong"


def test_fragmented_subscribe(rango, publisher):
    m = unique()
    text = orjson.dumps({"event": "subscribe", "streams": [f"{m}.trades", f"{m}.x"]}).decode()
    with rango.connect() as ws:
        expect(ws, subscribed([]))
        ws.send([text[:5], text[5:17], text[17:18], text[18:]])
        expect(ws, subscribed([f"{m}.trades", f"{m}.x"]))
        publisher.publish(f"public.{m}.trades", {"n": 1})
        expect(ws, {f"{m}.trades": {"n": 1}})


def test_fragmented_bad_request_is_an_error(rango):
    with rango.connect() as ws:
        expect(ws, subscribed([]))
        ws.send(['{"event":', '"nope","streams":[]}'])
        expect_error(ws)
        assert_alive(ws)


def test_fragments_interleaved_with_control_frames(rango):
    """A ping control frame between fragments is answered, then the message is whole."""
    with RawClient(rango.port) as raw:
        assert raw.status == 101
        assert orjson.loads(raw.recv_text()) == subscribed([])
        raw.send(RawClient.frame(OP_TEXT, b"pi", fin=False))
        raw.send(RawClient.frame(OP_PING, b"hello"))
        raw.send(RawClient.frame(OP_CONT, b"n", fin=False))
        raw.send(RawClient.frame(OP_PONG, b"unsolicited"))
        raw.send(RawClient.frame(OP_CONT, b"g", fin=True))
        # Both answers come; how the control pong and the data frame are ordered is
        # not specified (RFC 6455 only asks for the pong "as soon as practical").
        answers = {raw.recv_frame(), raw.recv_frame()}
        assert answers == {(True, OP_PONG, b"hello"), (True, OP_TEXT, b"pong")}
        raw.send(RawClient.frame(OP_TEXT, b"ping"))
        assert raw.recv_text() == "pong"


def test_frames_split_across_tcp_segments(rango):
    """Bytes of several frames arrive one at a time; each message is parsed whole."""
    m = unique()
    with RawClient(rango.port) as raw:
        assert orjson.loads(raw.recv_text()) == subscribed([])
        text = orjson.dumps({"event": "subscribe", "streams": [f"{m}.trades"]})
        data = (
            RawClient.frame(OP_TEXT, b" ping ")
            + RawClient.frame(OP_TEXT, text[:10], fin=False)
            + RawClient.frame(OP_CONT, text[10:])
        )
        raw.sock.setsockopt(6, 1, 1)  # TCP_NODELAY: small segments
        for i in range(len(data)):
            raw.send(data[i : i + 1])
            if i % 8 == 0:
                time.sleep(0.001)  # give the server separate reads
        assert raw.recv_text() == "pong"
        assert orjson.loads(raw.recv_text()) == subscribed([f"{m}.trades"])


def test_several_frames_in_one_segment(rango):
    m = unique()
    with RawClient(rango.port) as raw:
        assert orjson.loads(raw.recv_text()) == subscribed([])
        raw.send(
            RawClient.frame(OP_TEXT, b"ping")
            + RawClient.frame(OP_TEXT, b"")
            + RawClient.frame(OP_TEXT, b"nonsense")
            + RawClient.frame(OP_TEXT, orjson.dumps({"event": "subscribe", "streams": [m + ".a"]}))
            + RawClient.frame(OP_TEXT, b"ping")
        )
        assert raw.recv_text() == "pong"
        assert set(orjson.loads(raw.recv_text())) == {"error"}
        assert orjson.loads(raw.recv_text()) == subscribed([m + ".a"])
        assert raw.recv_text() == "pong"


def test_frames_pipelined_with_the_upgrade_request(rango):
    """Frames sent right behind the request (same write) are answered after the answer."""
    with RawClient(rango.port, pipelined=RawClient.frame(OP_TEXT, b"ping")) as raw:
        assert raw.status == 101
        assert orjson.loads(raw.recv_text()) == subscribed([])
        assert raw.recv_text() == "pong"


# Binary frames


@pytest.mark.parametrize(
    "message",
    [b"ping", b'{"event":"subscribe","streams":["a.b"]}', b"\x00\xff", [b"pi", b"ng"]],
    ids=["ping", "subscribe", "bytes", "fragmented"],
)
def test_binary_frame_answers_error(rango, message):
    with rango.connect() as ws:
        expect(ws, subscribed([]))
        ws.send(message)
        expect_error(ws)
        assert subscribe(ws, []) == subscribed([])  # nothing was subscribed
        assert_alive(ws)


def test_client_close_is_answered(rango):
    with rango.connect() as ws:
        expect(ws, subscribed([]))
        ws.close(1000, "bye")
        with pytest.raises(ConnectionClosed) as info:
            ws.recv(timeout=5)
        assert info.value.rcvd is not None and info.value.rcvd.code == 1000


def test_received_frames_are_utf8_text(rango):
    """Answers are text frames (str on the client), never binary."""
    with rango.connect() as ws:
        assert isinstance(ws.recv(timeout=5), str)
        ws.send("nonsense")
        assert isinstance(ws.recv(timeout=5), str)


def test_no_data_frame_after_the_servers_close_frame(rango_factory, publisher_factory):
    """Once the server has sent its close frame (here: keepalive timeout), events for the
    connection's streams are no longer written to it (RFC 6455 §5.5.1)."""
    gw = rango_factory(env={"RANGO_PING_INTERVAL": "0.2", "RANGO_PING_TIMEOUT": "0.5"})
    pub = publisher_factory(gw.exchange)
    m = unique()
    with RawClient(gw.port, f"/public?stream={m}.trades") as raw:  # never answers pings
        assert orjson.loads(raw.recv_text()) == subscribed([f"{m}.trades"])
        while (frame := raw.recv_frame())[1] != OP_CLOSE:
            assert frame[1] == OP_PING, frame
        for n in range(3):
            pub.publish(f"public.{m}.trades", {"n": n})
        after = []
        with pytest.raises((EOFError, ConnectionResetError)):  # the server closes TCP
            while True:
                after.append(raw.recv_frame())
        assert after == []


# Control frames a listening client sends (answered without websockets' protocol
# object when alone in a segment), and their odd variants (answered by websockets).


def frames_until_eof(raw: RawClient) -> list[tuple[bool, int, bytes]]:
    frames = []
    while True:
        try:
            frames.append(raw.recv_frame())
        except EOFError:
            return frames


@pytest.mark.parametrize(
    "payload", [b"\x03\xe8", b"\x03\xe9", b""], ids=["1000", "1001", "empty"]
)
def test_client_close_is_echoed_then_tcp_closed(rango, publisher, payload):
    m = unique()
    with RawClient(rango.port, f"/public?stream={m}.trades") as raw:
        assert orjson.loads(raw.recv_text()) == subscribed([f"{m}.trades"])
        raw.send(RawClient.frame(OP_CLOSE, payload))
        publisher.publish(f"public.{m}.trades", {"n": 1})  # nothing may follow the close
        assert frames_until_eof(raw) == [(True, OP_CLOSE, payload)]


@pytest.mark.parametrize(
    ("payload", "answer"),
    [
        (b"\x03\xe8bye", b"\x03\xe8bye"),  # with a reason: echoed as is
        (b"\x0b\xb8", b"\x0b\xb8"),  # 3000, an application code
        (b"\x03\xed", b"\x03\xea"),  # 1005 must never be sent: 1002 protocol error
        (b"\x03", b"\x03\xea"),  # one byte: 1002
        (b"\x03\xe8\xff", b"\x03\xef"),  # reason not UTF-8: 1007
    ],
    ids=["reason", "3000", "1005", "short", "bad-utf8"],
)
def test_other_close_frames_get_websockets_answer(rango, payload, answer):
    with RawClient(rango.port) as raw:
        assert orjson.loads(raw.recv_text()) == subscribed([])
        raw.send(RawClient.frame(OP_CLOSE, payload))
        frames = frames_until_eof(raw)
        assert frames[0][:2] == (True, OP_CLOSE)
        assert frames[0][2][:2] == answer[:2]
        if answer[2:]:
            assert frames[0][2] == answer


@pytest.mark.parametrize("size", [0, 1, 4, 5, 125])
def test_ping_payload_is_echoed_in_the_pong(rango, size):
    payload = os.urandom(size)
    with RawClient(rango.port) as raw:
        assert orjson.loads(raw.recv_text()) == subscribed([])
        raw.send(RawClient.frame(OP_PING, payload))
        assert raw.recv_frame() == (True, OP_PONG, payload)
        raw.send(RawClient.frame(OP_PONG, b"unsolicited"))  # ignored
        raw.send(RawClient.frame(OP_TEXT, b"ping"))
        assert raw.recv_text() == "pong"


def test_unmasked_ping_is_a_protocol_error(rango):
    with RawClient(rango.port) as raw:
        assert orjson.loads(raw.recv_text()) == subscribed([])
        raw.send(bytes([0x89, 0x02]) + b"hi")
        frames = frames_until_eof(raw)
        assert frames[0][:2] == (True, OP_CLOSE) and frames[0][2][:2] == b"\x03\xea"
