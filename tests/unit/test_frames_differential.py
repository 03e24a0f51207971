"""Client frames through Rango's connection, which drops websockets' protocol between
messages and parses an idle client's control frames itself, against one continuous
websockets ``ServerProtocol``: for any byte stream, cut anywhere, both accept the same
messages in the same order and fail at the same frame with the same close code.

Every check websockets makes (masking, RSV bits, opcodes, UTF-8, the size limit,
fragmentation rules, close codes, compressed frames when negotiated) therefore
stays, whether Rango keeps a protocol object or not.
"""

from __future__ import annotations

import os
import struct
import zlib
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.frames import Close, Frame, Opcode
from websockets.protocol import State
from websockets.server import ServerProtocol

from rango.config import Config
from rango.connection import Connection, Gateway
from rango.deflate import Inflate
from rango.hub import Hub

MAX_SIZE = 300


class Quiet:
    def rejected(self, status: int) -> None: ...
    def closed(self, reason: str) -> None: ...
    def slow_client(self) -> None: ...
    def accept_failed(self, reason: str) -> None: ...


class Recording(Connection):
    """A connection that records the text messages it would act on."""

    __slots__ = ("messages",)

    def _message(self, data: bytes) -> None:
        self.messages.append(data)


def client_frame(opcode: int, payload: bytes, fin: bool, rsv: int, masked: bool) -> bytes:
    head = bytes([(0x80 if fin else 0) | rsv << 4 | opcode])
    n = len(payload)
    length = (
        bytes([n]) if n < 126
        else bytes([126]) + struct.pack("!H", n) if n < 65536
        else bytes([127]) + struct.pack("!Q", n)
    )  # fmt: skip
    if not masked:
        return head + length + payload
    mask = os.urandom(4)
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + bytes([length[0] | 0x80]) + length[1:] + mask + body


def deflated(payload: bytes) -> bytes:
    c = zlib.compressobj(6, zlib.DEFLATED, -15)
    return (c.compress(payload) + c.flush(zlib.Z_SYNC_FLUSH))[:-4]


PAYLOADS = st.one_of(
    st.sampled_from([b"", b"ping", b'{"event":"subscribe","streams":["a.trades"]}', b"\xff\xfe",
                     "caf\u00e9".encode(), b"x" * 200, b"y" * 400]),
    st.binary(max_size=40),
)  # fmt: skip
CLOSE_PAYLOADS = st.one_of(
    st.sampled_from([b"", b"\x03\xe8", b"\x03\xe9bye", b"\x03\xf2", b"\x0b\xb8", b"\x00\x01",
                     b"\x03", b"\x03\xe8\xff"]),
    st.binary(max_size=6),
)  # fmt: skip
FRAMES = st.lists(
    st.one_of(
        st.tuples(st.sampled_from([0x1, 0x2, 0x0]), PAYLOADS, st.booleans(),
                  st.sampled_from([0, 0, 0, 4, 2, 1]), st.just(True)),
        st.tuples(st.sampled_from([0x9, 0xA]), st.binary(max_size=10), st.just(True),
                  st.just(0), st.just(True)),
        st.tuples(st.just(0x8), CLOSE_PAYLOADS, st.just(True), st.just(0), st.just(True)),
        st.tuples(st.sampled_from([0x3, 0xB]), st.binary(max_size=4), st.just(True),
                  st.just(0), st.booleans()),
        st.tuples(st.just(0x1), PAYLOADS, st.booleans(), st.just(0), st.just(False)),
    ),
    max_size=8,
)  # fmt: skip


def encode(frames: list[tuple[int, bytes, bool, int, bool]], compressed: bool) -> bytes:
    out = []
    for opcode, payload, fin, rsv, masked in frames:
        if compressed and rsv == 4 and opcode in (0x1, 0x2):
            payload = deflated(payload)  # a compressed message (RSV1), as negotiated
        out.append(client_frame(opcode, payload, fin, rsv, masked))
    return b"".join(out)


def through_websockets(data: bytes, chunks: list[int], compressed: bool) -> tuple[list[bytes], Any]:
    """The text messages one continuous ServerProtocol yields, and its close code."""
    ws = ServerProtocol(state=State.OPEN, max_size=MAX_SIZE)
    if compressed:
        ws.extensions = [Inflate()]
    messages: list[bytes] = []
    parts: list[bytes] = []
    text = False
    for piece in split(data, chunks):
        ws.receive_data(piece)
        for event in ws.events_received():
            assert isinstance(event, Frame)
            if event.opcode in (Opcode.TEXT, Opcode.BINARY):
                text, parts = event.opcode is Opcode.TEXT, []
            elif event.opcode is not Opcode.CONT:
                continue
            parts.append(bytes(event.data))
            if event.fin and text:
                messages.append(b"".join(parts))
        if ws.state is not State.OPEN:
            break
    code = ws.close_sent.code if ws.close_sent is not None else None
    return messages, code


def through_rango(data: bytes, chunks: list[int], compressed: bool) -> tuple[list[bytes], Any]:
    config = Config(jwt_public_key=b"", max_frame_size=MAX_SIZE, rate_limit=1e9,
                    rate_burst=1 << 30)  # fmt: skip
    gateway: Gateway[Any] = Gateway(config, Hub(), Quiet(), admission=_Admit())
    conn = Recording(gateway)
    conn.messages = []
    conn.receive_data(
        b"GET /public HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    conn.deflate = 15 if compressed else 0
    conn.data_to_send()
    out = b""
    for piece in split(data, chunks):
        conn.receive_data(piece)
        gateway.hub.flush()
        out += conn.data_to_send()
        if conn.state is not State.OPEN:
            break
    return conn.messages, close_code(out)


class _Admit:
    """Admission that lets everyone in (the handshake is not under test here)."""

    def check(self, *args: Any) -> Any:
        from rango.admission import Verdict
        from rango.auth import ANONYMOUS

        return Verdict(0, "", ANONYMOUS)


def close_code(out: bytes) -> int | None:
    """The code of the first close frame among Rango's server frames."""
    i = 0
    while i + 2 <= len(out):
        b0, b1 = out[i], out[i + 1] & 0x7F
        head = 2
        if b1 == 126:
            b1, head = struct.unpack("!H", out[i + 2 : i + 4])[0], 4
        elif b1 == 127:
            b1, head = struct.unpack("!Q", out[i + 2 : i + 10])[0], 10
        payload = out[i + head : i + head + b1]
        if b0 & 0x0F == 0x8:
            return Close.parse(payload).code if payload else 1005
        i += head + b1
    return None


def split(data: bytes, chunks: list[int]) -> list[bytes]:
    pieces, at = [], 0
    for size in chunks:
        if at >= len(data):
            break
        pieces.append(data[at : at + size])
        at += size
    if at < len(data):
        pieces.append(data[at:])
    return pieces


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(FRAMES, st.lists(st.integers(1, 64), max_size=12), st.booleans())
def test_rango_and_websockets_accept_and_reject_the_same_streams(
    frames: list[tuple[int, bytes, bool, int, bool]], chunks: list[int], compressed: bool
) -> None:
    data = encode(frames, compressed)
    ws_messages, ws_code = through_websockets(data, chunks, compressed)
    rango_messages, rango_code = through_rango(data, chunks, compressed)
    assert rango_code == ws_code, (rango_code, ws_code, frames)
    # Rango acts on text messages (binary ones get an error answer). Messages that
    # arrive in the same segment as a close frame, or before a frame that fails the
    # connection, are not acted on: the connection is already closing.
    assert rango_messages == ws_messages[: len(rango_messages)], frames
    if ws_code is None:
        assert rango_messages == ws_messages, frames
