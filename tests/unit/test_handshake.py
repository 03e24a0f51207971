"""The opening handshake's fast path (rango.handshake) against websockets itself.

The fast path may only ever accept what websockets accepts, with the same answer;
anything else it hands to websockets. The unit tests and the Hypothesis
differential test check that in-process; e2e/test_handshake_answers.py checks that a
real server answers odd requests exactly as websockets' own protocol would.
"""

from __future__ import annotations

import base64
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.wire import BASE_HEADERS as BASE
from support.wire import RFC_KEY as KEY
from support.wire import request_head as head
from support.wire import websockets_answer
from websockets.client import ClientProtocol
from websockets.server import ServerProtocol
from websockets.uri import parse_uri

from rango import handshake

# Accepted: the shapes real clients send.


def test_rfc_example_key():
    upgrade = handshake.parse(head(*BASE))
    assert upgrade is not None
    assert upgrade.accept == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="  # RFC 6455 §1.3
    assert upgrade.target == "/public"
    assert (upgrade.authorization, upgrade.origin, upgrade.host) == (None, None, "example.com")


def test_websockets_client_request():
    request = ClientProtocol(parse_uri("ws://127.0.0.1:8080/public?stream=a.b")).connect()
    raw = request.serialize()
    upgrade = handshake.parse(raw[: raw.index(b"\r\n\r\n")])
    assert upgrade is not None and upgrade.target == "/public?stream=a.b"


BROWSER = (  # Chromium's, with a cookie and an extension offer
    "Host: exchange.example",
    "Connection: Upgrade",
    "Pragma: no-cache",
    "Cache-Control: no-cache",
    "User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/156.0 Safari/537.36",
    "Upgrade: websocket",
    "Origin: https://exchange.example",
    "Sec-WebSocket-Version: 13",
    "Accept-Encoding: gzip, deflate, br",
    "Accept-Language: en-US,en;q=0.9",
    "Cookie: session=abc; theme=dark",
    f"Sec-WebSocket-Key: {KEY}",
    "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits",
)


@pytest.mark.parametrize(
    "lines",
    [
        BASE,
        BROWSER,
        # Firefox lists keep-alive too; header names in any case; spaces around values.
        (*BASE[:2], "Connection: keep-alive, Upgrade", *BASE[3:]),
        ("host: example.com", "upgrade: WebSocket", "connection: upgrade",
         f"sec-websocket-key: {KEY}", "sec-websocket-version: 13"),
        (*BASE[:4], "Sec-WebSocket-Version:13", "Authorization:  Bearer a.b.c \t"),
        (*BASE, "X-Forwarded-For: 10.0.0.1", "X-Empty:"),
        BASE[1:],  # no Host: websockets does not require one either
    ],
    ids=["minimal", "browser", "keep-alive", "lower-case", "spacing", "extra", "no-host"],
)
def test_usual_requests_take_the_fast_path_with_websockets_answer(lines):
    raw = head(*lines, target="/public?stream=btcusd.trades")
    upgrade = handshake.parse(raw)
    assert upgrade is not None
    request, status, headers = websockets_answer(raw)
    assert request is not None and status == 101
    assert upgrade.accept.decode() == headers["Sec-WebSocket-Accept"]
    assert "Sec-WebSocket-Extensions" not in headers  # no extension is negotiated
    assert upgrade.target == request.path
    assert upgrade.authorization == request.headers.get("Authorization")
    assert upgrade.origin == request.headers.get("Origin")
    assert upgrade.host == request.headers.get("Host")


def test_accept_answer_matches_websockets_but_for_the_date():
    raw = head(*BASE)
    upgrade = handshake.parse(raw)
    assert upgrade is not None
    answer = handshake.accept(upgrade)
    ws = ServerProtocol()
    ws.receive_data(raw + b"\r\n\r\n")
    [request] = ws.events_received()
    ws.send_response(ws.accept(request))
    [expected] = ws.data_to_send()

    def without_date(data: bytes) -> list[bytes]:
        return [line for line in data.split(b"\r\n") if not line.startswith(b"Date: ")]

    assert without_date(answer) == without_date(expected)
    assert answer.count(b"\r\nDate: ") == 1


# Handed to websockets: everything else.


@pytest.mark.parametrize(
    "raw",
    [
        head(*BASE, first="POST /public HTTP/1.1"),
        head(*BASE, first="GET /public HTTP/1.0"),
        head(*BASE, first="GET /a b HTTP/1.1"),
        head(*BASE, first="GET  /public HTTP/1.1"),
        head(*BASE, first="GET http://example.com/public HTTP/1.1"),
        head(*BASE, target="/caf\u00e9"),
        head(*BASE[:1], *BASE[2:]),  # no Upgrade
        head(*BASE[:2], *BASE[3:]),  # no Connection
        head(*BASE[:3], *BASE[4:]),  # no key
        head(*BASE[:4]),  # no version
        head(*BASE[:4], "Sec-WebSocket-Version: 8"),
        head(*BASE[:1], "Upgrade: websocket, h2c", *BASE[2:]),
        head(*BASE[:1], "Upgrade: websocket/13", *BASE[2:]),
        head(*BASE[:2], "Connection: keep-alive", *BASE[3:]),
        head(*BASE[:2], "Connection: Upgrade; x", *BASE[3:]),
        head(*BASE[:3], "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ", *BASE[4:]),
        head(*BASE[:3], "Sec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAAAAAAAAAA", *BASE[4:]),
        head(*BASE[:3], "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25j*Q==", *BASE[4:]),
        head(*BASE, f"Sec-WebSocket-Key: {KEY}"),  # twice
        head(*BASE, "Upgrade: websocket"),
        head(*BASE, "Authorization: Bearer a", "Authorization: Bearer b"),
        head(*BASE, "Origin: https://a", "Origin: https://b"),
        head(*BASE, "Host: other"),
        head(*BASE, "Sec-WebSocket-Protocol: chat"),
        head(*BASE, "Content-Length: 0"),
        head(*BASE, "Transfer-Encoding: chunked"),
        head(*BASE, "Bad Name: x"),
        head(*BASE, "X-Ctl: a\x01b"),
        head(*BASE, "NoColon"),
        head(*BASE, " X-Folded: continued"),
        head(*BASE).replace(b"\r\nUpgrade", b"\nUpgrade"),  # a bare LF
        head(*BASE, *(f"X-{i}: v" for i in range(handshake.MAX_HEADERS))),
    ],
)
def test_anything_unusual_is_left_to_websockets(raw):
    assert handshake.parse(raw) is None


# Differential: whatever the fast path accepts, websockets accepts the same way.

_token = st.text("-!#$%&'*+.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
                 min_size=1, max_size=12)
_value = st.one_of(
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=20),
    st.text(st.characters(min_codepoint=0, max_codepoint=0xFF), max_size=20),
)
_known = st.sampled_from(
    ["Host", "Upgrade", "Connection", "Sec-WebSocket-Key", "Sec-WebSocket-Version",
     "Authorization", "Origin", "Sec-WebSocket-Protocol", "Content-Length",
     "Transfer-Encoding", "Sec-WebSocket-Extensions"]
)
_known_value = st.sampled_from(
    ["websocket", "WebSocket", "Upgrade", "upgrade", "keep-alive, Upgrade", ", upgrade ,",
     "Upgrade,", "13", " 13 ", "8", KEY, base64.b64encode(os.urandom(16)).decode(),
     base64.b64encode(os.urandom(15)).decode(), "0", "chat", "Bearer x.y.z", "null",
     "https://example.com", "example.com", ""]
)
_case = st.sampled_from([str, str.lower, str.upper])
_header = st.one_of(
    st.tuples(st.tuples(_known, _case).map(lambda nc: nc[1](nc[0])), _known_value),
    st.tuples(_token, _value),
)


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    lines = list(BASE)
    extra = draw(st.lists(_header, max_size=6))
    lines += [f"{name}:{draw(st.sampled_from(['', ' ', '  ', chr(9)]))}{value}"
              for name, value in extra]
    drop = draw(st.sets(st.integers(0, len(BASE) - 1), max_size=2))
    lines = [line for i, line in enumerate(lines) if i not in drop]
    lines = draw(st.permutations(lines))
    first = draw(st.sampled_from(
        ["GET /public HTTP/1.1", "GET /private?stream=a.b HTTP/1.1", "GET / HTTP/1.1",
         "get / HTTP/1.1", "GET / HTTP/1.0", "GET /%20 HTTP/1.1", "GET / HTTP/1.1 "]
    ))
    return head(*lines, first=first)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests())
def test_fast_path_accepts_only_what_websockets_accepts(raw):
    upgrade = handshake.parse(raw)
    if upgrade is None:
        return
    request, status, headers = websockets_answer(raw)
    assert request is not None and status == 101, (raw, status)
    assert upgrade.accept.decode() == headers["Sec-WebSocket-Accept"]
    assert "Sec-WebSocket-Protocol" not in headers
    assert upgrade.target == request.path
    for name, value in (("Authorization", upgrade.authorization), ("Origin", upgrade.origin),
                        ("Host", upgrade.host)):
        assert request.headers.get_all(name) == ([] if value is None else [value])
