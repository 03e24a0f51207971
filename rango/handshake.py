"""The opening handshake's fast path (RFC 6455 §4.2), sans I/O.

Almost every upgrade request a gateway sees has the same shape: ``GET`` with
HTTP/1.1, a handful of well-formed headers, one ``Upgrade: websocket``, one key.
:func:`parse` reads exactly that shape in a few microseconds and returns what
Rango needs from it; :func:`accept` builds the ``101`` answer.

Anything else (duplicate handshake headers, a subprotocol offer, a request
body, a malformed line, a wrong method or version) makes :func:`parse` return
``None``, and the caller hands the request to websockets' own
:class:`~websockets.server.ServerProtocol`, which answers it the way it always
has (400, 405, 426, 505 …). The fast path therefore only ever *accepts*: for
every request it accepts, websockets would have accepted it too, with the same
``Sec-WebSocket-Accept``, path and header values (``tests/unit/test_handshake.py``
checks this with Hypothesis against websockets itself).
"""

from __future__ import annotations

import binascii
import email.utils
import hashlib
import re
import time
from typing import NamedTuple

__all__ = ["MAX_HEADERS", "Upgrade", "accept", "parse", "refusal"]

# websockets' own limit (http11.MAX_NUM_HEADERS); more goes to websockets.
MAX_HEADERS = 128

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

# RFC 9110 field names and values, as websockets' http11 checks them, over the
# whole header block at once. Values never contain CR or LF, so each line ends
# at its CRLF and stripping a value's spaces cannot change its validity.
_HEADER_BLOCK = re.compile(rb"(?:[-!#$%&'*+.^_`|~0-9a-zA-Z]+:[\x09\x20-\x7e\x80-\xff]*\r\n)*")
_TOKEN = re.compile(rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+")
# An origin-form target of visible ASCII only; anything else is websockets' call.
_TARGET = re.compile(rb"/[\x21-\x7e]*")

# Headers Rango reads: a second copy of any of them is left to websockets.
_READ = frozenset(
    (b"upgrade", b"connection", b"sec-websocket-key", b"sec-websocket-version",
     b"authorization", b"origin", b"host")
)
# Headers websockets checks and Rango does not want to re-implement.
_SLOW = frozenset((b"sec-websocket-protocol", b"transfer-encoding", b"content-length"))


class Upgrade(NamedTuple):
    """A valid websocket upgrade request: what the server needs to answer it."""

    target: str  #: request target, e.g. ``/public?stream=btcusd.trades``
    accept: bytes  #: ``Sec-WebSocket-Accept`` value for the key
    authorization: str | None
    origin: str | None
    host: str | None
    #: every ``Sec-WebSocket-Extensions`` value, in order (RFC 6455 §9.1 allows several)
    extensions: tuple[str, ...] = ()


def parse(head: bytes) -> Upgrade | None:
    """Parse a request head (up to, not including, the blank line's CRLF CRLF).

    Return ``None`` for anything but a plain, valid websocket upgrade request.
    """
    request_line, _, block = head.partition(b"\r\n")
    if not (request_line.startswith(b"GET ") and request_line.endswith(b" HTTP/1.1")):
        return None
    target = request_line[4:-9]
    if _TARGET.fullmatch(target) is None:
        return None
    if block:
        block += b"\r\n"
        if _HEADER_BLOCK.fullmatch(block) is None or block.count(b"\r\n") > MAX_HEADERS:
            return None
    found: dict[bytes, bytes] = {}
    extensions: list[str] = []
    for line in block.split(b"\r\n"):
        name, _, value = line.partition(b":")
        name = name.lower()
        if name in _READ:
            if name in found:
                return None
            found[name] = value.strip(b" \t")
        elif name == b"sec-websocket-extensions":
            extensions.append(value.strip(b" \t").decode("iso-8859-1"))
        elif name in _SLOW:
            return None
    if found.get(b"upgrade", b"").lower() != b"websocket":
        return None
    if found.get(b"sec-websocket-version") != b"13":
        return None
    connection = found.get(b"connection")
    if connection is None or not _has_upgrade(connection):
        return None
    key = found.get(b"sec-websocket-key")
    if key is None or not _valid_key(key):
        return None
    return Upgrade(
        target.decode("ascii"),
        binascii.b2a_base64(hashlib.sha1(key + _GUID).digest(), newline=False),
        _text(found.get(b"authorization")),
        _text(found.get(b"origin")),
        _text(found.get(b"host")),
        tuple(extensions),
    )


def accept(upgrade: Upgrade, extensions: str = "") -> bytes:
    """The ``101 Switching Protocols`` answer, with websockets' headers in its order;
    ``extensions`` is the agreed ``Sec-WebSocket-Extensions`` value, if any."""
    return b"".join((
        b"HTTP/1.1 101 Switching Protocols\r\nDate: ",
        _date(),
        b"\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ",
        upgrade.accept,
        b"\r\nSec-WebSocket-Extensions: " + extensions.encode() if extensions else b"",
        b"\r\n\r\n",
    ))


_PHRASES = {401: "Unauthorized", 431: "Request Header Fields Too Large"}


def refusal(status: int) -> bytes:
    """An empty HTTP answer with ``status`` (401 or 431) that closes the connection.

    For requests refused before they are parsed (too large): websockets never
    sees them, so Rango words the answer itself.
    """
    return (
        f"HTTP/1.1 {status} {_PHRASES[status]}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        .encode()
    )


def _has_upgrade(value: bytes) -> bool:
    """``Connection`` lists ``upgrade``, and every listed option is a token."""
    if value.lower() == b"upgrade":
        return True
    found = False
    for item in value.split(b","):
        item = item.strip(b" \t")
        if not item:
            continue  # RFC 9110 5.6.1: empty list elements are allowed
        if _TOKEN.fullmatch(item) is None:
            return False
        if item.lower() == b"upgrade":
            found = True
    return found


def _valid_key(key: bytes) -> bool:
    """A key is the base64 encoding of 16 bytes (RFC 6455 §4.2.1, item 5)."""
    if len(key) != 24:
        return False
    try:
        # strict_mode is what base64.b64decode(validate=True) does, as websockets calls it.
        return len(binascii.a2b_base64(key, strict_mode=True)) == 16
    except binascii.Error:
        return False


def _text(value: bytes | None) -> str | None:
    # As websockets does: header bytes are opaque, ISO-8859-1 keeps them all.
    return None if value is None else value.decode("iso-8859-1")


_date_second = 0
_date_value = b""


def _date() -> bytes:
    """The ``Date`` header's value, formatted once a second rather than per request."""
    global _date_second, _date_value
    now = int(time.time())
    if now != _date_second:
        _date_value = email.utils.formatdate(now, usegmt=True).encode()
        _date_second = now
    return _date_value
