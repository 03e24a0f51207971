"""permessage-deflate end to end (RFC 7692): real Rango with RANGO_COMPRESSION=1, the
real broker, clients over TCP (websockets' own client and a hand-written one).

What a client must see: the offer accepted with both no-context-takeover
parameters; large event frames with RSV1 set and small ones without; every
compressed frame inflating on its own with a fresh decompressor; the same
decoded frames, in the same order, as an uncompressed client of the same
stream; compressed client frames inflated and bounded. Offers Rango cannot
honour are declined, never refused.
"""

from __future__ import annotations

import asyncio
import os
import zlib
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from support.broker import Publisher, unique
from support.gateway import Rango
from support.tokens import KeyPair
from support.wire import OP_TEXT, RawClient
from websockets.asyncio.client import connect
from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory
from websockets.sync.client import connect as sync_connect

MIN_SIZE = 256
TAIL = b"\x00\x00\xff\xff"


@pytest.fixture(scope="module")
def zrango(keys: KeyPair, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rango]:
    env = {
        "RANGO_COMPRESSION": "1",
        "RANGO_COMPRESSION_MIN_SIZE": str(MIN_SIZE),
        "RANGO_MAX_FRAME_SIZE": "65536",
    }
    with Rango(keys, tmp_path_factory.mktemp("zrango"), env=env) as instance:
        yield instance


@pytest.fixture
def zpublisher(zrango: Rango, publisher_factory: Any) -> Publisher:
    return publisher_factory(zrango.exchange)  # type: ignore[no-any-return]


def book_levels(n: int, seed: int) -> dict[str, Any]:
    """An order-book-like body: ``n`` levels of price and amount strings."""
    return {
        "asks": [[f"{100 + i * 0.01 + seed:.2f}", f"{(i * 7) % 13 + 0.5:.4f}"] for i in range(n)],
        "bids": [[f"{99 - i * 0.01 + seed:.2f}", f"{(i * 5) % 11 + 0.25:.4f}"] for i in range(n)],
    }


def inflate(payload: bytes, window_bits: int = 15) -> bytes:
    """One message inflated with a fresh decompressor: no context from earlier ones."""
    return zlib.decompressobj(-window_bits).decompress(payload + TAIL)


def raw(rango: Rango, path: str, offer: str | None, **headers: str) -> RawClient:
    extra = dict(headers)
    if offer is not None:
        extra["Sec-WebSocket-Extensions"] = offer
    return RawClient(rango.port, path, extra).upgraded()


def frames_of(client: RawClient, count: int) -> list[tuple[bool, bytes]]:
    """The next ``count`` text frames as ``(rsv1, payload)``."""
    out = []
    while len(out) < count:
        rsv1, opcode, payload = client.recv_frame_rsv()
        assert opcode == OP_TEXT, (opcode, payload[:80])
        out.append((rsv1, payload))
    return out


def test_websockets_client_default_offer_is_accepted_and_decodes(zrango, zpublisher):
    stream = f"{unique()}.ob-snap"
    market = stream.split(".")[0]
    big = book_levels(50, 1)
    with sync_connect(zrango.url(query=f"stream={market}.trades")) as ws:
        agreed = ws.response.headers["Sec-WebSocket-Extensions"]
        assert agreed == (
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
        ), agreed
        assert orjson.loads(ws.recv(5))["success"]["message"] == "subscribed"
        zpublisher.publish(f"public.{market}.trades", big)
        zpublisher.publish(f"public.{market}.trades", {"tiny": 1})
        assert orjson.loads(ws.recv(5)) == {f"{market}.trades": big}
        assert orjson.loads(ws.recv(5)) == {f"{market}.trades": {"tiny": 1}}
        # A compressed request (websockets compresses what it sends) is answered.
        ws.send(orjson.dumps({"event": "subscribe", "streams": [f"{market}.tickers"]}).decode())
        assert orjson.loads(ws.recv(5))["success"]["streams"] == [
            f"{market}.trades", f"{market}.tickers"
        ]


@pytest.mark.parametrize("path", ["fast", "websockets"])
def test_large_frames_are_compressed_once_small_ones_not(zrango, zpublisher, path):
    """RSV1 on large frames only; each compressed frame inflates on its own. Both
    handshake paths (a subprotocol offer sends the request through websockets)."""
    market = unique()
    headers = {"Sec-WebSocket-Protocol": "x-none"} if path == "websockets" else {}
    client = raw(zrango, f"/public?stream={market}.trades", "permessage-deflate", **headers)
    assert client.headers["sec-websocket-extensions"] == (
        "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
    )
    frames_of(client, 1)  # subscribed
    bodies = [book_levels(40, n) if n % 2 == 0 else {"n": n} for n in range(8)]
    for body in bodies:
        zpublisher.publish(f"public.{market}.trades", body)
    got = frames_of(client, len(bodies))
    for (rsv1, payload), body in zip(got, bodies, strict=True):
        expected = orjson.dumps({f"{market}.trades": body})
        if len(expected) >= MIN_SIZE:
            assert rsv1, "a large frame went out uncompressed"
            assert inflate(payload) == expected
            assert len(payload) * 3 < len(expected), (len(payload), len(expected))
        else:
            assert not rsv1, "a small frame was compressed"
            assert payload == expected
    client.close()


def test_mixed_subscribers_see_identical_frames_in_order(zrango, zpublisher):
    market = unique()
    path = f"/public?stream={market}.trades"
    compressed = raw(zrango, path, "permessage-deflate; client_max_window_bits")
    plain = raw(zrango, path, None)
    assert "sec-websocket-extensions" not in plain.headers
    frames_of(compressed, 1)
    frames_of(plain, 1)
    count = 30
    for n in range(count):
        zpublisher.publish(f"public.{market}.trades", book_levels(n % 7 * 10, n))
    zgot = [inflate(p) if rsv1 else p for rsv1, p in frames_of(compressed, count)]
    pgot = [p for rsv1, p in frames_of(plain, count) if not rsv1]
    assert len(pgot) == count
    assert zgot == pgot
    compressed.close()
    plain.close()


def test_honours_server_max_window_bits(zrango, zpublisher):
    market = unique()
    client = raw(zrango, f"/public?stream={market}.trades",
                 "permessage-deflate; server_max_window_bits=10")  # fmt: skip
    assert client.headers["sec-websocket-extensions"].endswith("; server_max_window_bits=10")
    frames_of(client, 1)
    body = {"p": os.urandom(3000).hex()}  # 6 KB: distances beyond a 1 KB window if allowed
    zpublisher.publish(f"public.{market}.trades", body)
    [(rsv1, payload)] = frames_of(client, 1)
    assert rsv1
    assert inflate(payload, 10) == orjson.dumps({f"{market}.trades": body})
    client.close()


@pytest.mark.parametrize(
    "offer",
    [
        "permessage-deflate; server_max_window_bits=8",
        "permessage-deflate; server_max_window_bits=16",
        "permessage-deflate; server_max_window_bits",
        "permessage-deflate; client_max_window_bits=7",
        "permessage-deflate; server_no_context_takeover=1",
        "permessage-deflate; client_no_context_takeover; client_no_context_takeover",
        "permessage-deflate; x-unknown",
        "x-webkit-deflate-frame",
        "permessage-deflate;;",
        ",,,=",
        'permessage-deflate; server_max_window_bits="1"0',
    ],
)
def test_offers_that_cannot_be_honoured_are_declined_not_refused(zrango, zpublisher, offer):
    market = unique()
    client = raw(zrango, f"/public?stream={market}.trades", offer)
    assert "sec-websocket-extensions" not in client.headers, client.head
    frames_of(client, 1)
    body = book_levels(40, 3)
    zpublisher.publish(f"public.{market}.trades", body)
    [(rsv1, payload)] = frames_of(client, 1)
    assert not rsv1 and orjson.loads(payload) == {f"{market}.trades": body}
    client.close()


def test_first_acceptable_offer_wins(zrango):
    client = raw(zrango, "/public", "permessage-deflate; x-bad, permessage-deflate; "
                 "server_max_window_bits=12")  # fmt: skip
    assert client.headers["sec-websocket-extensions"].endswith("server_max_window_bits=12")
    client.close()


def test_snapshot_and_increments_replayed_compressed(zrango, zpublisher):
    market = unique()
    snap = book_levels(50, 0)
    incs = [{"asks": [[f"{100 + n}.00", "1.0"]], "bids": []} for n in range(3)]
    incs.append(book_levels(30, 9))  # a large increment too
    expected = [orjson.dumps({f"{market}.ob-snap": snap})] + [
        orjson.dumps({f"{market}.ob-inc": inc}) for inc in incs
    ]
    # A witness already subscribed sees the last increment live: only then has
    # Rango cached the whole book (publishing is asynchronous).
    witness = raw(zrango, f"/public?stream={market}.ob-inc", None)
    frames_of(witness, 1)
    zpublisher.publish(f"public.{market}.ob-snap", snap)
    for inc in incs:
        zpublisher.publish(f"public.{market}.ob-inc", inc)
    while frames_of(witness, 1)[0][1] != expected[-1]:
        pass
    witness.close()
    # Two compressed clients in turn: the second gets the variants the first made.
    for _ in range(2):
        client = raw(zrango, f"/public?stream={market}.ob-inc", "permessage-deflate")
        frames = frames_of(client, 2 + len(incs))
        client.close()
        decoded = [inflate(p) if rsv1 else p for rsv1, p in frames]
        assert decoded[:-1] == expected, decoded[:2]
        assert orjson.loads(decoded[-1])["success"]["message"] == "subscribed"
        assert [rsv1 for rsv1, _ in frames[:-1]] == [len(f) >= MIN_SIZE for f in expected]


def test_compressed_client_frames_inflate_and_are_bounded(zrango, zpublisher):
    """A client frame is inflated on its own; one that inflates past
    RANGO_MAX_FRAME_SIZE (a bomb) closes that connection with 1009, corrupt data
    with 1002 (websockets' code), and the worker serves everyone else."""
    market = unique()
    bystander = raw(zrango, f"/public?stream={market}.trades", None)
    frames_of(bystander, 1)

    def compressed_frame(message: bytes) -> bytes:
        c = zlib.compressobj(9, zlib.DEFLATED, -15)
        data = c.compress(message) + c.flush(zlib.Z_SYNC_FLUSH)
        frame = bytearray(RawClient.frame(OP_TEXT, data[:-4]))
        frame[0] |= 0x40  # RSV1: compressed
        return bytes(frame)

    ok = raw(zrango, "/public", "permessage-deflate")
    frames_of(ok, 1)
    ok.send(compressed_frame(orjson.dumps({"event": "subscribe", "streams": [f"{market}.x"]})))
    [(_, answer)] = frames_of(ok, 1)
    assert orjson.loads(answer)["success"]["streams"] == [f"{market}.x"]

    bomb = raw(zrango, "/public", "permessage-deflate")
    frames_of(bomb, 1)
    payload = b'{"event":"subscribe","streams":["' + b"a" * 10_000_000 + b'"]}'
    frame = compressed_frame(payload)
    assert len(frame) < 20_000
    bomb.send(frame)
    assert close_code(bomb) == 1009

    corrupt = raw(zrango, "/public", "permessage-deflate")
    frames_of(corrupt, 1)
    bad = bytearray(RawClient.frame(OP_TEXT, b"\xff\xff\xff\xff garbage"))
    bad[0] |= 0x40
    corrupt.send(bytes(bad))
    assert close_code(corrupt) == 1002

    zpublisher.publish(f"public.{market}.trades", {"still": "here"})
    [(_, payload_)] = frames_of(bystander, 1)
    assert orjson.loads(payload_) == {f"{market}.trades": {"still": "here"}}
    ok.close()
    bystander.close()


def close_code(client: RawClient) -> int:
    """The code of the server's close frame (frames before it skipped)."""
    while True:
        _, opcode, payload = client.recv_frame()
        if opcode == 0x8:
            return int.from_bytes(payload[:2], "big")


def test_rsv1_without_negotiation_is_a_protocol_error(zrango):
    client = raw(zrango, "/public", None)
    frames_of(client, 1)
    frame = bytearray(RawClient.frame(OP_TEXT, b'{"event":"subscribe","streams":[]}'))
    frame[0] |= 0x40
    client.send(bytes(frame))
    assert close_code(client) == 1002
    client.close()


def test_off_by_default_offer_ignored(rango):
    client = raw(rango, "/public", "permessage-deflate")
    assert "sec-websocket-extensions" not in client.headers
    client.close()


def test_many_compressed_clients_share_one_compression(zrango, zpublisher):
    """200 compressed clients of one stream: every frame decodes; the worker did the
    work once per event (its CPU is not measured here; bench/compression.py does)."""

    async def scenario() -> None:
        market = unique()
        url = zrango.url(query=f"stream={market}.trades")
        clients = await asyncio.gather(*(
            connect(url, extensions=[ClientPerMessageDeflateFactory()]) for _ in range(200)
        ))  # fmt: skip
        for ws in clients:
            await ws.recv()
        body = book_levels(50, 5)
        zpublisher.publish(f"public.{market}.trades", body)
        got = await asyncio.gather(*(asyncio.wait_for(ws.recv(), 10) for ws in clients))
        assert {bytes(g, "utf-8") if isinstance(g, str) else g for g in got} == {
            orjson.dumps({f"{market}.trades": body})
        }
        await asyncio.gather(*(ws.close() for ws in clients))

    asyncio.run(scenario())
