"""Unit tests of the message layer (PROTOCOL §2, §3): requests, answers, frames."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.frames import Frame, Opcode
from websockets.streams import StreamReader

from rango.frames import PING
from rango.protocol import (
    MAX_STREAM_NAME,
    MAX_STREAMS_PER_REQUEST,
    PONG,
    ClientError,
    Kind,
    Request,
    error,
    event_payload,
    parse_query_streams,
    parse_request,
    stream_kind,
    success,
    text_frame,
)

# parse_request: PROTOCOL §3.


@pytest.mark.parametrize("event", ["subscribe", "unsubscribe"])
def test_valid_request(event: str) -> None:
    text = orjson.dumps({"event": event, "streams": ["eurusd.trades", "order"]}).decode()
    assert parse_request(text) == Request(event, ["eurusd.trades", "order"])


def test_valid_request_details() -> None:
    assert parse_request('{"event":"subscribe","streams":[]}') == Request("subscribe", [])
    # Other keys are ignored, whitespace is fine, key order does not matter.
    assert parse_request(' { "streams" : ["a.b"], "id": 7, "event" : "unsubscribe" } ') == (
        Request("unsubscribe", ["a.b"])
    )
    # Names are passed on as sent: the hub decides what they mean.
    assert parse_request('{"event":"subscribe","streams":["", "a.b.c.d", "é"]}').streams == [
        "",
        "a.b.c.d",
        "é",
    ]


def assert_client_error(text: str, *words: str) -> str:
    with pytest.raises(ClientError) as info:
        parse_request(text)
    message = str(info.value)
    # Readable: a short sentence, not a repr or a traceback, and it fits an error frame.
    assert message and len(message) < 200 and message.isprintable()
    assert "Traceback" not in message and "JSONDecodeError" not in message
    for word in words:
        assert word in message
    assert orjson.loads(error(message)) == {"error": message}
    return message


@pytest.mark.parametrize(
    "text",
    ["hello", "{", '{"event":"subscribe"', "{'event':'subscribe'}", "ping", "", "   ",
     '{"event":"subscribe","streams":["a.b",]}', "NaN", "\x00", "[1e400]"],
)  # fmt: skip
def test_not_json(text: str) -> None:
    assert_client_error(text, "could not parse")


def test_deeply_nested_json_is_a_client_error() -> None:
    assert_client_error('{"event":"subscribe","streams":' + "[" * 5000 + "]" * 5000 + "}")


@pytest.mark.parametrize("text", ["[]", '["subscribe"]', "1", '"subscribe"', "null", "true"])
def test_json_not_an_object(text: str) -> None:
    assert_client_error(text, "JSON object")


@pytest.mark.parametrize(
    "text",
    ['{"event":"ping","streams":[]}', '{"event":"SUBSCRIBE","streams":[]}',
     '{"event":"subscribe ","streams":[]}', '{"event":1,"streams":[]}',
     '{"event":["subscribe"],"streams":[]}', '{"event":{},"streams":[]}',
     '{"event":true,"streams":[]}'],
)  # fmt: skip
def test_other_event(text: str) -> None:
    assert_client_error(text, "unsupported event", "subscribe")


@pytest.mark.parametrize("text", ['{"streams":["a.b"]}', '{"event":null,"streams":[]}', "{}"])
def test_missing_event(text: str) -> None:
    assert_client_error(text, "missing event")


@pytest.mark.parametrize(
    "text", ['{"event":"subscribe"}', '{"event":"unsubscribe","streams":null}']
)
def test_missing_streams(text: str) -> None:
    assert_client_error(text, "missing streams")


@pytest.mark.parametrize(
    "streams",
    ['"eurusd.trades"', "1", "1.5", "true", "{}", '{"a":"b"}', "[1]", "[null]", '["a.b", 2]',
     '[["a.b"]]', '[{"a":"b"}]', '["a.b", null]', "[true]", '[["a.b","c.d"]]', "false"],
)  # fmt: skip
def test_streams_not_a_list_of_strings(streams: str) -> None:
    assert_client_error(f'{{"event":"subscribe","streams":{streams}}}', "list of strings")


def test_stream_count_limit() -> None:
    names = [f"m{i}.trades" for i in range(MAX_STREAMS_PER_REQUEST)]
    text = orjson.dumps({"event": "subscribe", "streams": names}).decode()
    assert parse_request(text) == Request("subscribe", names)
    text = orjson.dumps({"event": "subscribe", "streams": [*names, "x.y"]}).decode()
    assert_client_error(text, "too many streams", str(MAX_STREAMS_PER_REQUEST))


def test_stream_name_length_limit() -> None:
    longest = "m." + "x" * (MAX_STREAM_NAME - 2)
    text = orjson.dumps({"event": "subscribe", "streams": ["a.b", longest]}).decode()
    assert parse_request(text) == Request("subscribe", ["a.b", longest])
    text = orjson.dumps({"event": "subscribe", "streams": ["a.b", longest + "x"]}).decode()
    assert_client_error(text, "longer than", str(MAX_STREAM_NAME))


def test_error_message_does_not_echo_the_frame() -> None:
    secret = "eyJhbGciOiJSUzI1NiJ9.SECRET"
    message = assert_client_error(f"Bearer {secret}")
    assert secret not in message


# Hypothesis: anything a client sends gives a Request or a ClientError.

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=5),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=10,
)
events = st.one_of(st.sampled_from(["subscribe", "unsubscribe"]), json_values)
streams = st.one_of(
    st.lists(st.text(max_size=MAX_STREAM_NAME + 2), max_size=4),
    st.lists(st.sampled_from(["eurusd.trades", "order", "x" * MAX_STREAM_NAME]), max_size=4),
    st.builds(
        lambda n, names: ["x.y"] * n + names,
        st.integers(MAX_STREAMS_PER_REQUEST - 2, MAX_STREAMS_PER_REQUEST),
        st.lists(st.text(max_size=3), max_size=2),
    ),
    st.lists(json_values, max_size=3),
    json_values,
)
requests = st.one_of(
    st.fixed_dictionaries({"event": events, "streams": streams}, optional={"x": json_values}),
    st.fixed_dictionaries({}, optional={"event": events, "streams": streams}),
)


def valid_shape(value: Any) -> bool:
    if not isinstance(value, dict) or value.get("event") not in ("subscribe", "unsubscribe"):
        return False
    streams = value.get("streams")
    return (
        isinstance(streams, list)
        and all(isinstance(s, str) for s in streams)
        and len(streams) <= MAX_STREAMS_PER_REQUEST
        and all(len(s) <= MAX_STREAM_NAME for s in streams)
    )


def check(text: str) -> Request | None:
    try:
        result = parse_request(text)
    except ClientError as exc:
        assert str(exc)
        return None
    assert isinstance(result, Request)
    return result


@settings(max_examples=300, deadline=None)
@given(st.one_of(requests, json_values))
def test_parse_request_on_json_values(value: Any) -> None:
    result = check(orjson.dumps(value).decode())
    if valid_shape(value):
        assert result == Request(value["event"], value["streams"])
    else:
        assert result is None


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_parse_request_on_arbitrary_text(text: str) -> None:
    result = check(text)
    if result is not None:
        assert valid_shape(orjson.loads(text))


# parse_query_streams: PROTOCOL §2.


@pytest.mark.parametrize(
    ("query", "streams"),
    [
        ("stream=eurusd.trades&stream=order", ["eurusd.trades", "order"]),
        ("stream=eurusd.trades,order", ["eurusd.trades", "order"]),
        ("stream=a.b,c.d&stream=e.f&stream=g.h,order", ["a.b", "c.d", "e.f", "g.h", "order"]),
        ("", []),
        ("stream=", []),
        ("stream=&stream=a.b", ["a.b"]),
        ("stream=,a.b,,c.d,", ["a.b", "c.d"]),
        ("stream", []),
        ("token=abc&stream=a.b&foo=c.d&streams=e.f", ["a.b"]),
        ("Stream=a.b", []),
        ("stream=a.b%2Cc.d", ["a.b", "c.d"]),
        ("stream=eur%2Eusd.trades", ["eur.usd.trades"]),
        ("stream=a%20b.c", ["a b.c"]),
        ("stream=a+b.c", ["a b.c"]),
        ("stream=%C3%A9.trades", ["é.trades"]),
        ("stream=a.b&stream=a.b", ["a.b", "a.b"]),  # duplicates: the hub ignores them
        ("stream=a.b;stream=c.d", ["a.b;stream=c.d"]),  # ';' is not a separator
        ("&&stream=a.b&&", ["a.b"]),
    ],
)
def test_parse_query_streams(query: str, streams: list[str]) -> None:
    assert parse_query_streams(query) == streams


def test_parse_query_streams_is_bounded() -> None:
    query = "&".join(f"stream=m{i}.trades" for i in range(MAX_STREAMS_PER_REQUEST + 50))
    streams = parse_query_streams(query)
    assert streams == [f"m{i}.trades" for i in range(MAX_STREAMS_PER_REQUEST)]


# Answers and payloads.


def test_success() -> None:
    assert success("subscribed", ["eurusd.trades", "order"]) == (
        b'{"success":{"message":"subscribed","streams":["eurusd.trades","order"]}}'
    )
    assert success("unsubscribed", []) == b'{"success":{"message":"unsubscribed","streams":[]}}'
    assert success("cannot subscribe to admin.eurusd.ob-inc") == (
        b'{"success":{"message":"cannot subscribe to admin.eurusd.ob-inc"}}'
    )
    assert orjson.loads(success("subscribed", ['a"b', "é"])) == {
        "success": {"message": "subscribed", "streams": ['a"b', "é"]}
    }


def test_error() -> None:
    assert error("could not parse message") == b'{"error":"could not parse message"}'
    assert orjson.loads(error('quote " and \\ and \n')) == {"error": 'quote " and \\ and \n'}


@pytest.mark.parametrize("body", [b'{"tid":1}', b"[1,2.5]", b"42", b'"s"', b"null", b' {"a" : 1} '])
def test_event_payload(body: bytes) -> None:
    payload = event_payload("eurusd.trades", body)
    assert payload == b'{"eurusd.trades":' + body + b"}"
    assert orjson.loads(payload) == {"eurusd.trades": orjson.loads(body)}


def test_event_payload_escapes_the_topic() -> None:
    payload = event_payload('a"b\\c.é', b"1")
    assert orjson.loads(payload) == {'a"b\\c.é': 1}


# Frames (RFC 6455 §5.2).


def parse_frame(data: bytes) -> Frame:
    reader = StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    parser = Frame.parse(reader.read_exact, mask=False)
    try:
        next(parser)
    except StopIteration as done:
        frame = done.value
    else:
        raise AssertionError("incomplete frame")
    return frame


@pytest.mark.parametrize(
    ("length", "header"),
    [
        (0, b"\x81\x00"),
        (1, b"\x81\x01"),
        (125, b"\x81\x7d"),
        (126, b"\x81\x7e\x00\x7e"),
        (127, b"\x81\x7e\x00\x7f"),
        (65535, b"\x81\x7e\xff\xff"),
        (65536, b"\x81\x7f\x00\x00\x00\x00\x00\x01\x00\x00"),
        (70000, b"\x81\x7f\x00\x00\x00\x00\x00\x01\x11\x70"),
    ],
)
def test_text_frame(length: int, header: bytes) -> None:
    payload = bytes(i % 251 for i in range(length))
    data = text_frame(payload)
    assert data == header + payload
    frame = parse_frame(data)
    assert frame.opcode is Opcode.TEXT
    assert frame.fin is True
    assert frame.data == payload
    assert (frame.rsv1, frame.rsv2, frame.rsv3) == (False, False, False)


def test_control_frames() -> None:
    assert PONG == b"\x81\x04pong"
    assert parse_frame(PONG).data == b"pong"
    assert PING == b"\x89\x00"
    frame = parse_frame(PING)
    assert frame.opcode is Opcode.PING and frame.data == b"" and frame.fin


def test_binary_opcode() -> None:
    frame = parse_frame(text_frame(b"\x00\xff", opcode=0x2))
    assert frame.opcode is Opcode.BINARY and frame.data == b"\x00\xff"


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("order", Kind.PRIVATE),
        ("balance", Kind.PRIVATE),
        ("", Kind.PRIVATE),
        ("eurusd.trades", Kind.PUBLIC),
        ("global.tickers", Kind.PUBLIC),
        (".", Kind.PUBLIC),
        ("admin.eurusd.ob-inc", Kind.PREFIXED),
        ("a..b", Kind.PREFIXED),
        ("a.b.c.d", None),
        ("...", None),
    ],
)
def test_stream_kind(name: str, kind: Kind | None) -> None:
    assert stream_kind(name) is kind
