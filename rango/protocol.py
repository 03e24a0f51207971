"""Rango's message layer, sans I/O: client requests, server answers, frames.

Nothing here touches a socket. The functions turn client text into requests
(PROTOCOL §3) and build the server's answers and event payloads as bytes;
:func:`text_frame` (:func:`rango.frames.encode`) wraps them in a websocket frame,
once per event for every subscriber.
"""

from __future__ import annotations

import functools
from enum import Enum
from typing import NamedTuple
from urllib.parse import parse_qsl, urlsplit

import orjson

from .frames import encode as text_frame

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
    "target_streams",
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


@functools.lru_cache(maxsize=256)
def _query_streams(query: str) -> tuple[str, ...]:
    return tuple(parse_query_streams(query))


def target_streams(target: str) -> tuple[str, ...]:
    """The streams a request target's query string names (cached: clients share URLs)."""
    query = urlsplit(target).query
    return _query_streams(query) if query else ()


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


PONG = text_frame(b"pong")
