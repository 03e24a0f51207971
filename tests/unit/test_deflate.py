"""rango.deflate without sockets: the RFC 7692 negotiation and the shared compressor."""

from __future__ import annotations

import os
import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st
from websockets.exceptions import InvalidHeader
from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory
from websockets.headers import parse_extension

from rango.deflate import Deflater, negotiate

BOTH = "permessage-deflate; server_no_context_takeover; client_no_context_takeover"


@pytest.mark.parametrize(
    ("offer", "answer", "bits"),
    [
        # What real clients send by default.
        ("permessage-deflate; client_max_window_bits", BOTH, 15),  # Chromium, ws, websockets
        ("permessage-deflate", BOTH, 15),
        ("permessage-deflate; client_max_window_bits=15", BOTH, 15),
        ("permessage-deflate; server_no_context_takeover; client_no_context_takeover", BOTH, 15),
        # A client that limits the server's window (websockets' low-memory advice).
        ("permessage-deflate; server_max_window_bits=12; client_max_window_bits=12",
         f"{BOTH}; server_max_window_bits=12", 12),
        ("permessage-deflate; server_max_window_bits=9", f"{BOTH}; server_max_window_bits=9", 9),
        ('permessage-deflate; server_max_window_bits="10"',
         f"{BOTH}; server_max_window_bits=10", 10),
        # The first offer Rango can honour.
        ("permessage-deflate; server_max_window_bits=8, permessage-deflate", BOTH, 15),
        ("x-webkit-deflate-frame, permessage-deflate; client_max_window_bits", BOTH, 15),
    ],
)  # fmt: skip
def test_accepted_offers(offer: str, answer: str, bits: int) -> None:
    agreement = negotiate([offer])
    assert agreement is not None
    assert (agreement.header, agreement.window_bits) == (answer, bits)


@pytest.mark.parametrize(
    "offer",
    [
        "permessage-deflate; server_max_window_bits=8",  # zlib cannot
        "permessage-deflate; server_max_window_bits=16",
        "permessage-deflate; server_max_window_bits=09",
        "permessage-deflate; server_max_window_bits",
        "permessage-deflate; client_max_window_bits=7",
        "permessage-deflate; client_max_window_bits=16",
        "permessage-deflate; server_no_context_takeover=1",
        "permessage-deflate; client_no_context_takeover=yes",
        "permessage-deflate; client_max_window_bits; client_max_window_bits",
        "permessage-deflate; x-unknown",
        "x-webkit-deflate-frame",
        "permessage-deflate;;",  # malformed: websockets' parser refuses it
        "",
        ",",
    ],
)
def test_declined_offers(offer: str) -> None:
    assert negotiate([offer]) is None


def test_offers_over_several_header_lines() -> None:
    agreement = negotiate(["foo", "permessage-deflate; server_max_window_bits=11"])
    assert agreement is not None and agreement.window_bits == 11
    assert negotiate(["permessage-deflate", "(bad"]) is None  # one bad line: none at all


_PARAMS = st.sampled_from([
    "server_no_context_takeover", "client_no_context_takeover", "server_max_window_bits",
    "client_max_window_bits", "x", "server_max_window_bits=", "",
])  # fmt: skip
_VALUES = st.one_of(st.none(), st.integers(0, 20).map(str), st.text(max_size=4))
_OFFER = st.builds(
    lambda name, params: "; ".join(
        [name, *(p if v is None else f"{p}={v}" for p, v in params)]
    ),
    st.sampled_from(["permessage-deflate", "x-webkit-deflate-frame", "permessage-deflate "]),
    st.lists(st.tuples(_PARAMS, _VALUES), max_size=5),
)


@given(st.lists(st.one_of(_OFFER, st.text(max_size=40)), max_size=3).map(", ".join))
def test_any_offer_negotiates_what_rfc7692_allows_or_declines(header: str) -> None:
    agreement = negotiate([header])  # never raises
    if agreement is None:
        return
    # The answer is one that websockets' own client accepts for one of the offers.
    [(name, params)] = parse_extension(agreement.header)
    assert name == "permessage-deflate"
    assert ("server_no_context_takeover", None) in params
    assert ("client_no_context_takeover", None) in params
    offered = _offers(header)
    bits = dict(params).get("server_max_window_bits")
    assert bits is None or any(("server_max_window_bits", bits) in o for o in offered)
    client = ClientPerMessageDeflateFactory(
        server_max_window_bits=int(bits) if bits else None, client_max_window_bits=True
    )
    extension = client.process_response_params(params, [])
    assert extension.local_no_context_takeover and extension.remote_no_context_takeover
    assert agreement.window_bits == (int(bits) if bits else 15)


def _offers(header: str) -> list[list[tuple[str, str | None]]]:
    try:
        return [list(p) for n, p in parse_extension(header) if n == "permessage-deflate"]
    except InvalidHeader:
        return []


@pytest.mark.parametrize("bits", [9, 12, 15])
def test_every_message_inflates_on_its_own(bits: int) -> None:
    """No context takeover, with one zlib stream for all messages: a message inflates
    with a fresh decompressor whatever came before it, repeated data included."""
    deflater = Deflater()
    message = b'{"asks":[["100.00","1.5"],["100.01","2.5"]]}' * 50
    others = [os.urandom(200).hex().encode(), message, b"x" * 3000, message]
    for data in others:
        payload = deflater.compress(data, bits)
        assert not payload.endswith(b"\x00\x00\xff\xff")
        assert zlib.decompressobj(-bits).decompress(payload + b"\x00\x00\xff\xff") == data
    # The second copy of ``message`` is no smaller than the first: no reference back.
    assert len(deflater.compress(message, bits)) == len(deflater.compress(message, bits))


def test_levels_trade_size_for_time() -> None:
    message = b"".join(b'["%d.%02d","%d.5"],' % (100 + i, i % 100, i % 7) for i in range(500))
    sizes = [len(Deflater(level).compress(message)) for level in (1, 6, 9)]
    assert sizes[0] >= sizes[1] >= sizes[2]
    assert sizes[2] * 3 < len(message)
