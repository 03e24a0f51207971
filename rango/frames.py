"""Websocket frames on the wire (RFC 6455 §5), sans I/O: every byte layout Rango writes
or reads itself is here.

Two directions, two costs:

* Server frames are built once per event and written to every subscriber, so
  :func:`encode` is one ``struct`` pack and one concatenation.
* Client frames are parsed by websockets' own parser, except the few control
  frames an idle client sends (keepalive pong, ping, close 1000/1001):
  :func:`parse_control` recognises exactly those in one segment, so that a
  client which only listens never needs a websockets protocol object.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

__all__ = [
    "OP_BINARY",
    "OP_CLOSE",
    "OP_CONT",
    "OP_PING",
    "OP_PONG",
    "OP_TEXT",
    "PING",
    "Control",
    "close",
    "encode",
    "encode_compressed",
    "parse_control",
    "payload_of",
    "payload_size",
    "pong",
    "skip",
    "unmask",
]

# Opcodes (RFC 6455 §5.2).
OP_CONT, OP_TEXT, OP_BINARY = 0x0, 0x1, 0x2
OP_CLOSE, OP_PING, OP_PONG = 0x8, 0x9, 0xA

_FIN = 0x80
_RSV1 = 0x40  # "compressed" under permessage-deflate (RFC 7692 §6)
_MASKED = 0x80

_PACK2 = struct.Struct("!BB").pack
_PACK4 = struct.Struct("!BBH").pack
_PACK10 = struct.Struct("!BBQ").pack


def encode(payload: bytes, opcode: int = OP_TEXT) -> bytes:
    """An unmasked, final server frame around ``payload`` (RFC 6455 §5.2).

    Servers never mask, so the frame is the same for every client: build it
    once, write it to all of them (those that negotiated compression get
    :func:`encode_compressed`'s, also built once).
    """
    n = len(payload)
    head = _FIN | opcode
    if n < 126:
        return _PACK2(head, n) + payload
    if n < 65536:
        return _PACK4(head, 126, n) + payload
    return _PACK10(head, 127, n) + payload


def encode_compressed(payload: bytes) -> bytes:
    """A final text frame around a deflated message, RSV1 set (RFC 7692 §6.1)."""
    return encode(payload, _RSV1 | OP_TEXT)


def _head_size(frame: bytes) -> int:
    """The header length of a server frame built by :func:`encode` (unmasked, §5.2)."""
    n = frame[1]
    return 2 if n < 126 else 4 if n == 126 else 10


def payload_of(frame: bytes) -> bytes:
    """The payload of a server frame built by :func:`encode`."""
    return frame[_head_size(frame) :]


def payload_size(frame: bytes) -> int:
    """The payload length of a server frame built by :func:`encode`, without a copy."""
    return len(frame) - _head_size(frame)


PING = encode(b"", OP_PING)


def pong(payload: bytes) -> bytes:
    """The pong answering a ping with ``payload`` (≤ 125 bytes; RFC 6455 §5.5.3)."""
    return bytes((_FIN | OP_PONG, len(payload))) + payload


def close(payload: bytes) -> bytes:
    """A close frame with ``payload`` (≤ 125 bytes), e.g. the echo of a client's close."""
    return bytes((_FIN | OP_CLOSE, len(payload))) + payload


def unmask(frame: bytes, n: int) -> bytes:
    """The payload of a masked frame with a 6-byte header and ``n`` < 126 bytes (§5.3)."""
    if not n:
        return b""
    mask = int.from_bytes((frame[2:6] * (n // 4 + 1))[:n], "big")
    return (int.from_bytes(frame[6:], "big") ^ mask).to_bytes(n, "big")


class Control(NamedTuple):
    """A client control frame that needs no websockets protocol to answer."""

    opcode: int  #: OP_PING, OP_PONG or OP_CLOSE
    payload: bytes  #: unmasked


def parse_control(data: bytes) -> Control | None:
    """``data`` as exactly one masked, final ping, pong, or close with 1000/1001 or no code.

    Anything else returns ``None``: data frames, fragments, several frames in
    one segment, RSV bits, unmasked frames, other close codes. The caller hands
    those to websockets, which checks and answers them as it always does; this
    parser therefore only accepts what websockets would accept too.
    """
    n = len(data) - 6  # 2-byte header and 4-byte mask, payload < 126 bytes
    if n < 0 or n > 125 or data[1] != _MASKED | n:
        return None
    opcode = data[0] ^ _FIN  # anything but FIN set and no RSV bit is out of range below
    if opcode == OP_CLOSE:
        if n == 2:
            code = (data[2] ^ data[6]) << 8 | (data[3] ^ data[7])
            if code != 1000 and code != 1001:
                return None  # other codes (and their reasons) need websockets' checks
        elif n:
            return None
    elif opcode != OP_PING and opcode != OP_PONG:
        return None
    return Control(opcode, unmask(data, n))


def skip(state: int | bytes, data: bytes) -> int | bytes:
    """Walk client frames' boundaries in a stream (RFC 6455 §5.2), without parsing them.

    ``state`` is what the previous call returned: 0 at a frame boundary, the
    number of bytes the current frame still needs, or the bytes of a frame
    header cut short. The result is the same after ``data``. Used to know when
    websockets' parser stands between frames, so that its protocol object can go.
    """
    if isinstance(state, int):
        if state >= len(data):
            return state - len(data)
        i = state
    else:
        data, i = state + data, 0
    n = len(data)
    while i < n:
        if n - i < 2:
            return data[i:]
        length, head = data[i + 1] & 0x7F, 2
        if length == 126:
            if n - i < 4:
                return data[i:]
            length, head = int.from_bytes(data[i + 2 : i + 4], "big"), 4
        elif length == 127:
            if n - i < 10:
                return data[i:]
            length, head = int.from_bytes(data[i + 2 : i + 10], "big"), 10
        if data[i + 1] & _MASKED:
            head += 4
        end = i + head + length
        if end > n:
            return end - n
        i = end
    return 0
