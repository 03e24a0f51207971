"""permessage-deflate (RFC 7692) with no state per connection, sans I/O.

Rango builds one frame per event for all its subscribers, so it compresses that
frame once and sends the same bytes to every client that negotiated the
extension. For that it always answers with ``server_no_context_takeover`` and
``client_no_context_takeover`` (§7.1.1.1, §7.1.1.2: a server may add both
whether or not the client asked): each message is compressed on its own, by the
worker's one compressor per window size, and each message a client sends is
inflated on its own by a decompressor that lives for that message only. No
connection keeps a compressor or a decompressor between messages.

:func:`negotiate` picks the first offer Rango can honour; :class:`Deflater`
compresses messages; :class:`Inflate` is the extension websockets' frame parser
uses for compressed client frames (and never compresses what websockets sends).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Sequence
from typing import NamedTuple

from websockets.exceptions import InvalidHeader, PayloadTooBig, ProtocolError
from websockets.extensions.base import Extension
from websockets.frames import CTRL_OPCODES, Frame, Opcode
from websockets.headers import parse_extension
from websockets.typing import ExtensionName

__all__ = ["EXTENSION", "Agreement", "Deflater", "Inflate", "negotiate"]

EXTENSION = "permessage-deflate"
# zlib cannot make raw deflate streams with an 8-bit window (madler/zlib#171):
# an offer that limits the server to 8 bits is declined, as websockets does.
MIN_WINDOW_BITS = 9
MAX_WINDOW_BITS = 15
_BITS_VALUES = {str(bits): bits for bits in range(8, 16)}
_TAIL = b"\x00\x00\xff\xff"  # the empty stored block a flush ends with (§7.2.1)


class Agreement(NamedTuple):
    """An accepted offer: the response header value and the server's window bits."""

    header: str  #: the ``Sec-WebSocket-Extensions`` value of the 101 answer
    window_bits: int  #: the LZ77 window Rango compresses with for this client


_DEFAULT = Agreement(
    f"{EXTENSION}; server_no_context_takeover; client_no_context_takeover", MAX_WINDOW_BITS
)


def negotiate(values: Iterable[str]) -> Agreement | None:
    """The agreement for the first ``permessage-deflate`` offer Rango can honour
    among the ``Sec-WebSocket-Extensions`` header ``values``, else None (§7).

    An offer is declined, and the next one considered, when it repeats a
    parameter, names one RFC 7692 does not define, gives a value where none is
    allowed, or a window size outside 8 to 15 (8 for the server's window, which
    zlib cannot honour). A header that does not parse declines everything: the
    connection proceeds uncompressed, as before compression existed.
    """
    try:
        offers = [offer for value in values for offer in parse_extension(value)]
    except InvalidHeader:
        return None
    for name, params in offers:
        if name == EXTENSION:
            agreement = _accept(params)
            if agreement is not None:
                return agreement
    return None


def _accept(params: Sequence[tuple[str, str | None]]) -> Agreement | None:
    seen: set[str] = set()
    server_bits: int | None = None
    for key, value in params:
        if key in seen:
            return None  # §7: a repeated parameter makes the offer invalid
        seen.add(key)
        if key in ("server_no_context_takeover", "client_no_context_takeover"):
            if value is not None:
                return None
        elif key == "server_max_window_bits":
            bits = _BITS_VALUES.get(value) if value is not None else None
            if bits is None or bits < MIN_WINDOW_BITS:
                return None
            server_bits = bits
        elif key == "client_max_window_bits":
            # A hint that the client can take a limit (§7.1.2.2); Rango sets
            # none and inflates with a 15-bit window, which suits any size.
            if value is not None and value not in _BITS_VALUES:
                return None
        else:
            return None
    if server_bits is None:
        return _DEFAULT
    # §7.1.2.1: the response repeats the limit (the same value: Rango honours it).
    return Agreement(f"{_DEFAULT.header}; server_max_window_bits={server_bits}", server_bits)


class Deflater:
    """Compresses whole messages, each one decodable on its own (§7.2.1).

    One zlib stream per window size serves every message of the worker: a full
    flush after each message empties the LZ77 window and ends the data on a byte
    boundary, so no message refers to an earlier one. That is exactly what
    ``server_no_context_takeover`` promises, without allocating a compressor
    (~256 KB) per message.
    """

    def __init__(self, level: int = 6) -> None:
        self.level = level
        self._streams: dict[int, zlib._Compress] = {}

    def compress(self, payload: bytes, window_bits: int = MAX_WINDOW_BITS) -> bytes:
        """The message's compressed payload, without the trailing ``00 00 ff ff``."""
        stream = self._streams.get(window_bits)
        if stream is None:
            stream = self._streams[window_bits] = zlib.compressobj(
                self.level, zlib.DEFLATED, -window_bits
            )
        data = stream.compress(payload) + stream.flush(zlib.Z_FULL_FLUSH)
        return data[:-4]


class Inflate(Extension):
    """The extension websockets' frame parser runs for a connection that negotiated
    compression: it inflates compressed client messages, and compresses nothing.

    Incoming (§7.2.2): a decompressor per message, dropped at the message's end
    (no context takeover), so an idle connection holds none; the inflated size
    is bounded by the ``max_size`` websockets passes (PayloadTooBig: close 1009),
    corrupt data is a protocol error (close 1002), as in websockets' own
    ``PerMessageDeflate``. Outgoing: frames websockets sends (close, pong) pass
    as they are; Rango's event frames are compressed by the :class:`Deflater`
    before they reach any connection. ``__slots__`` keep the object small (no
    attribute lands in an instance dict); it exists only while the connection
    has a websockets protocol, i.e. around the frames it sends.
    """

    __slots__ = ("_decoder",)

    name = ExtensionName(EXTENSION)

    def __init__(self) -> None:
        # The current fragmented compressed message's decompressor, else None.
        self._decoder: zlib._Decompress | None = None

    def decode(self, frame: Frame, *, max_size: int | None = None) -> Frame:
        if frame.opcode in CTRL_OPCODES:
            return frame
        if frame.opcode is Opcode.CONT:
            decoder = self._decoder
            if decoder is None:
                return frame  # the continuation of an uncompressed message
            if frame.rsv1:
                raise ProtocolError("RSV1 bit set in continuation frame")
        elif not frame.rsv1:
            return frame
        else:
            decoder = zlib.decompressobj(wbits=-MAX_WINDOW_BITS)
            self._decoder = None if frame.fin else decoder
        data = bytes(frame.data) + _TAIL if frame.fin else frame.data
        try:
            inflated = decoder.decompress(data, max_size or 0)
        except zlib.error as exc:
            raise ProtocolError("decompression failed") from exc
        if decoder.unconsumed_tail:
            raise PayloadTooBig(None, max_size)
        if frame.fin:
            self._decoder = None
        return Frame(frame.opcode, inflated, frame.fin, False, frame.rsv2, frame.rsv3)

    def encode(self, frame: Frame) -> Frame:
        return frame
