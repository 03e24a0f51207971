"""Rango's message layer, sans I/O: client requests, server answers, frames.

Nothing here touches a socket. The functions turn client text into requests
(PROTOCOL §3), build the server's answers as bytes, and encode websocket frames
so that one event's frame is built once and written to every subscriber.
"""

from __future__ import annotations

import struct
from enum import Enum
from typing import NamedTuple
from urllib.parse import parse_qsl

import orjson

__all__ = [
    "PONG",
    "ClientError",
    "Kind",
    "Request",
    "error",
    "event_payload",
    "parse_query_streams",
    "parse_request",
    "stream_kind",
    "success",
    "text_frame",
]

# Subscribe/unsubscribe requests name at most this many streams; a frame that
# fits the size limit can hold hundreds of one-letter names, but none of them
# would be useful.
MAX_STREAMS_PER_REQUEST = 256
MAX_STREAM_NAME = 256


class Kind(Enum):
    """Stream kinds of PROTOCOL §4, by the number of dots in the name."""

    PRIVATE = "private"
    PUBLIC = "public"
    PREFIXED = "prefixed"


def stream_kind(name: str) -> Kind | None:
    """Classify a stream name; ``None`` for names no event can ever match."""
    dots = name.count(".")
    if dots == 1:
        return Kind.PUBLIC
    if dots == 0:
        return Kind.PRIVATE
    if dots == 2:
        return Kind.PREFIXED
    return None


class Request(NamedTuple):
    """A subscribe or unsubscribe request from a client."""

    event: str  # "subscribe" or "unsubscribe"
    streams: list[str]


class ClientError(ValueError):
    """A client frame Rango cannot act on; the message is sent back as ``error``."""


def parse_request(text: str) -> Request:
    """Parse one client text frame that is not ``ping`` and not empty.

    The caller answers ``ping`` and ignores empty frames itself (PROTOCOL §3);
    here they are not JSON. Raises :class:`ClientError` with a readable reason
    for anything that is not a valid request.
    """
    try:
        msg = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise ClientError(f"could not parse message: {str(exc).split(':')[0]}") from None
    if not isinstance(msg, dict):
        raise ClientError("message must be a JSON object")
    event = msg.get("event")
    if event not in ("subscribe", "unsubscribe"):
        if event is None:
            raise ClientError("missing event (subscribe or unsubscribe)")
        raise ClientError("unsupported event, expected subscribe or unsubscribe")
    streams = msg.get("streams")
    if streams is None:
        raise ClientError("missing streams (a list of stream names)")
    if not isinstance(streams, list) or not all(isinstance(s, str) for s in streams):
        raise ClientError("streams must be a list of strings")
    if len(streams) > MAX_STREAMS_PER_REQUEST:
        raise ClientError(f"too many streams in one request (max {MAX_STREAMS_PER_REQUEST})")
    if any(len(s) > MAX_STREAM_NAME for s in streams):
        raise ClientError(f"stream name longer than {MAX_STREAM_NAME} characters")
    return Request(event, streams)


def parse_query_streams(query: str) -> list[str]:
    """Streams of ``?stream=a.b&stream=c.d`` and ``?stream=a.b,c.d`` (may be mixed)."""
    streams: list[str] = []
    for key, value in parse_qsl(query, keep_blank_values=False):
        if key == "stream":
            streams.extend(s for s in value.split(",") if s)
    return streams[:MAX_STREAMS_PER_REQUEST]


def success(message: str, streams: list[str] | None = None) -> bytes:
    """``{"success":{"message":...,"streams":[...]}}`` as bytes."""
    body: dict[str, object] = {"message": message}
    if streams is not None:
        body["streams"] = streams
    return orjson.dumps({"success": body})


def error(reason: str) -> bytes:
    """``{"error":"reason"}`` as bytes."""
    return orjson.dumps({"error": reason})


def event_payload(topic: str, body: bytes) -> bytes:
    """``{"<topic>": BODY}`` without decoding BODY again: it is already valid JSON."""
    return b"".join((b"{", orjson.dumps(topic), b":", body, b"}"))


_PACK2 = struct.Struct("!BB").pack
_PACK4 = struct.Struct("!BBH").pack
_PACK10 = struct.Struct("!BBQ").pack


def text_frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """Encode an unmasked, final server frame (RFC 6455 §5.2) around ``payload``.

    Servers never mask and Rango negotiates no extension by default, so the frame
    is the same for every client: build it once, write it to all of them.
    """
    n = len(payload)
    head = 0x80 | opcode
    if n < 126:
        return _PACK2(head, n) + payload
    if n < 65536:
        return _PACK4(head, 126, n) + payload
    return _PACK10(head, 127, n) + payload


PONG = text_frame(b"pong")
PING = text_frame(b"", opcode=0x9)
