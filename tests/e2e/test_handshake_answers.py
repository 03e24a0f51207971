"""The opening handshake end to end: a real server answers odd upgrade requests exactly
as websockets' own protocol would, and a usual one takes the fast path (rango.handshake)
straight to the ``subscribed`` frame. The fast path itself is tested in-process in
unit/test_handshake.py.
"""

from __future__ import annotations

import pytest
from support.wire import BASE_HEADERS as BASE
from support.wire import RFC_KEY as KEY
from support.wire import exchange, websockets_answer
from support.wire import request_head as head

from rango import handshake
from rango.protocol import success, text_frame

SUBSCRIBED = text_frame(success("subscribed", []))


@pytest.mark.parametrize(
    "lines",
    [
        (*BASE, "Sec-WebSocket-Protocol: chat"),
        (*BASE, "Content-Length: 0"),
        (*BASE, "Content-Length: 5"),
        (*BASE, "Transfer-Encoding: chunked"),
        (*BASE, f"Sec-WebSocket-Key: {KEY}"),
        BASE[:1] + BASE[2:],
        (*BASE[:2], "Connection: keep-alive", *BASE[3:]),
        (*BASE[:4], "Sec-WebSocket-Version: 8"),
        (*BASE[:3], "Sec-WebSocket-Key: short", *BASE[4:]),
        (*BASE, "Bad Name: x"),
    ],
    ids=["subprotocol", "content-length-0", "content-length-5", "chunked", "two-keys",
         "no-upgrade", "no-connection-upgrade", "version-8", "bad-key", "bad-header"],
)
def test_unusual_requests_get_websockets_own_answer(rango, lines):
    raw = head(*lines)
    assert handshake.parse(raw) is None  # this really is the other path
    _, expected, expected_headers = websockets_answer(raw)
    answer = exchange(rango.port, raw + b"\r\n\r\n", SUBSCRIBED)
    if expected == 0:  # websockets closes on a request it cannot parse, without answering
        assert answer == b""
        return
    assert answer.startswith(f"HTTP/1.1 {expected} ".encode()), (expected, answer[:200])
    if expected == 101:
        accept = expected_headers["Sec-WebSocket-Accept"]
        assert f"\r\nSec-WebSocket-Accept: {accept}\r\n".encode() in answer
        assert b"Sec-WebSocket-Protocol" not in answer
        # The connection then works like any other: the subscribed answer follows.
        assert answer.endswith(b"\r\n\r\n" + SUBSCRIBED)
    else:
        assert SUBSCRIBED not in answer


def test_fast_path_answer_is_followed_by_the_subscribed_frame(rango):
    raw = head(*BASE, target="/public?stream=a.b")
    assert handshake.parse(raw) is not None
    expected = text_frame(success("subscribed", ["a.b"]))
    answer = exchange(rango.port, raw + b"\r\n\r\n", until=expected)
    status, _, rest = answer.partition(b"\r\n")
    assert status == b"HTTP/1.1 101 Switching Protocols"
    assert b"\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n" in answer
    assert rest.endswith(b"\r\n\r\n" + expected)
