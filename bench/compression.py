#!/usr/bin/env python3
"""permessage-deflate in numbers: bytes per client by stream kind, CPU per event, the
threshold, and the cost of inflating a client frame. One JSON line per measurement.

    .venv/bin/python bench/compression.py            # all of it, about 20 s
    .venv/bin/python bench/compression.py --seconds 5

It runs Rango's own Hub (the code a worker runs) with two subscribers of every
stream, one that negotiated compression and one that did not, and counts the
bytes each is given: the frames exactly as the worker writes them to the socket.
The feed is `rango demo`'s markets, with order books 50 levels deep, plus a
`global.tickers` of 200 markets. CPU is the time the hub spends per event with
compression on minus off (the same feed, alternated). The fan-out and memory
rows with real sockets are bench/run.py's (README, Compression):

    bench/run.py fanout --clients 1000 --search --size 2000 --book \\
        --server-env RANGO_COMPRESSION=1 --deflate        # and without --deflate
    bench/run.py idle-memory --connections 10000 --server-env RANGO_COMPRESSION=1 --deflate
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rango import frames  # noqa: E402
from rango.auth import Auth  # noqa: E402
from rango.deflate import Deflater, Inflate  # noqa: E402
from rango.hub import Hub  # noqa: E402
from rango.settings import COMPRESSION_LEVEL, COMPRESSION_MIN_SIZE  # noqa: E402
from rango.tools import market as demo  # noqa: E402

TOTALS = [0, 0]  # bytes given to plain and to compressed subscribers


class Counter:
    """A subscriber that only counts the bytes it is given (into :data:`TOTALS`)."""

    def __init__(self, deflate: int) -> None:
        self.auth = Auth("IDBENCH00001", "member")
        self.subscriptions: dict[str, None] = {}
        self.deflate = deflate
        self.slot = 1 if deflate else 0

    def push(self, frame: bytes) -> None:
        TOTALS[self.slot] += len(frame)


def kind_of(routing_key: str) -> str:
    event = routing_key.rsplit(".", 1)[-1]
    if routing_key == "public.global.tickers":
        return "global.tickers (200 markets)"
    if routing_key.startswith("private."):
        return "private"
    return event


def feed(seconds: float, seed: int = 1) -> list[tuple[str, bytes]]:
    rng = random.Random(seed)
    demo.DEMO_DEPTH = 50  # a liquid market's book: 50 levels a side
    markets = [demo.DemoMarket(name, rng) for name in demo.DEMO_MARKETS]
    extra = [demo.DemoMarket(f"m{i:03d}usd", rng) for i in range(200 - len(markets))]
    events = []
    for event in demo.demo_events(markets + extra, "IDBENCH00001", rng, 2.0, seconds):
        events.append((event.routing_key, event.body))
    return events


def stream_of(key: str) -> str:
    scope, _, rest = key.partition(".")
    stream = rest.partition(".")[2] if scope == "private" else rest
    return stream[:-5] + "-inc" if stream.endswith("-snap") else stream


def run_feed(events: list[tuple[str, bytes]], compress: bool, min_size: int, level: int
             ) -> tuple[dict[str, list[int]], float]:  # fmt: skip
    """Bytes per kind ``[plain, compressed]`` given to one client of each kind, and
    the CPU seconds the hub spent routing the feed.

    Each stream has one plain and one compressed subscriber. A book's snapshot
    is only sent live once (PROTOCOL 5): its row is what a client subscribing to
    the book later is given, the stored snapshot, replayed at the end.
    """
    hub = Hub(deflater=Deflater(level) if compress else None, min_size=min_size)
    streams = {stream_of(key) for key, _ in events}
    for stream in sorted(streams):
        for client in (Counter(0), Counter(15 if compress else 0)):
            hub.connect(client, [stream])
    kinds: dict[str, list[int]] = {}
    TOTALS[:] = [0, 0]
    start = time.process_time()
    for key, body in events:
        before = TOTALS[:]
        hub.route(key, body)
        hub.flush()  # a worker flushes once per loop iteration; per event is the worst case
        row = kinds.setdefault(kind_of(key), [0, 0])
        row[0] += TOTALS[0] - before[0]
        row[1] += TOTALS[1] - before[1]
    spent = time.process_time() - start
    replay = kinds.setdefault("ob-snap (replayed on subscribe)", [0, 0])
    for base in list(hub.books):
        for client in (Counter(0), Counter(15 if compress else 0)):
            before = TOTALS[client.slot]
            hub.connect(client, [f"{base}-inc"])
            answer = b'{"success":{"message":"subscribed","streams":["%s-inc"]}}' % base.encode()
            replay[client.slot] += TOTALS[client.slot] - before - len(frames.encode(answer))
    kinds = {k: v for k, v in kinds.items() if v[0]}
    return kinds, spent


def measure_wire(args: argparse.Namespace, events: list[tuple[str, bytes]]) -> list[dict[str, Any]]:
    kinds, _ = run_feed(events, True, args.min_size, args.level)
    counts: dict[str, int] = {}
    sizes: dict[str, int] = {}
    for key, body in events:
        counts[kind_of(key)] = counts.get(kind_of(key), 0) + 1
        sizes[kind_of(key)] = sizes.get(kind_of(key), 0) + len(body)
    lines = []
    for kind, (plain, compressed) in sorted(kinds.items()):
        lines.append({
            "bench": "compression-wire", "kind": kind, "events": counts.get(kind, 0),
            "mean_body_bytes": round(sizes.get(kind, 0) / max(1, counts.get(kind, 1))),
            "plain_bytes": plain, "compressed_bytes": compressed,
            "ratio": round(plain / compressed, 2) if compressed else None,
        })  # fmt: skip
    total_plain = sum(p for p, _ in kinds.values())
    total_z = sum(z for _, z in kinds.values())
    lines.append({"bench": "compression-wire", "kind": "all", "events": len(events),
                  "plain_bytes": total_plain, "compressed_bytes": total_z,
                  "ratio": round(total_plain / total_z, 2)})  # fmt: skip
    return lines


def measure_cpu(args: argparse.Namespace, events: list[tuple[str, bytes]]) -> dict[str, Any]:
    off: list[float] = []
    on: list[float] = []
    for _ in range(args.rounds):  # alternated, so that both see the same machine
        off.append(run_feed(events, False, args.min_size, args.level)[1])
        on.append(run_feed(events, True, args.min_size, args.level)[1])
    off_s, on_s = sorted(off)[len(off) // 2], sorted(on)[len(on) // 2]
    large = sum(1 for _, body in events if len(body) >= args.min_size)
    return {
        "bench": "compression-cpu", "events": len(events), "compressed_events": large,
        "level": args.level, "min_size": args.min_size,
        "hub_us_per_event_off": round(off_s / len(events) * 1e6, 2),
        "hub_us_per_event_on": round(on_s / len(events) * 1e6, 2),
        # All of the difference, spread over every event (most are below min_size).
        "extra_us_per_event": round((on_s - off_s) / len(events) * 1e6, 2),
        "on_over_off": round(on_s / off_s, 2),
    }


def measure_levels(events: list[tuple[str, bytes]]) -> list[dict[str, Any]]:
    bodies = [body for key, body in events if key.endswith((".ob-snap", ".tickers"))][:200]
    lines = []
    for level in (1, 3, 6, 9):
        deflater = Deflater(level)
        start = time.process_time()
        out = sum(len(deflater.compress(body)) for body in bodies)
        spent = time.process_time() - start
        lines.append({
            "bench": "compression-level", "level": level, "bodies": len(bodies),
            "ratio": round(sum(map(len, bodies)) / out, 2),
            "us_per_body": round(spent / len(bodies) * 1e6, 1),
        })  # fmt: skip
    return lines


def measure_threshold() -> list[dict[str, Any]]:
    """What deflate makes of frames of each size: where it stops paying. The bodies
    are order books of 1 to 40 levels a side (real JSON of every size)."""
    rng = random.Random(2)
    market = demo.DemoMarket("btcusd", rng)
    deflater = Deflater(COMPRESSION_LEVEL)
    lines = []
    for levels in (1, 2, 3, 4, 6, 8, 12, 20, 40):
        book = market.snapshot()
        body = json.dumps({"asks": book["asks"][:levels], "bids": book["bids"][:levels]},
                          separators=(",", ":")).encode()  # fmt: skip
        plain = len(frames.encode(body))
        start = time.process_time()
        for _ in range(200):
            packed = len(frames.encode_compressed(deflater.compress(body)))
        spent = (time.process_time() - start) / 200
        lines.append({
            "bench": "compression-threshold", "levels": levels, "body_bytes": len(body),
            "frame_bytes": plain, "compressed_frame_bytes": packed,
            "saved_bytes": plain - packed, "us_per_compress": round(spent * 1e6, 1),
        })  # fmt: skip
    return lines


def measure_inflate() -> dict[str, Any]:
    """The cost of one compressed client frame (a subscribe request), per message."""
    from websockets.frames import Frame, Opcode

    request = json.dumps({"event": "subscribe", "streams": [
        f"m{i:03d}usd.trades" for i in range(20)]}).encode()  # fmt: skip
    payload = Deflater().compress(request)
    frame = Frame(Opcode.TEXT, payload, rsv1=True)
    extension = Inflate()
    n = 20000
    start = time.process_time()
    for _ in range(n):
        extension.decode(frame, max_size=1 << 20)
    spent = time.process_time() - start
    return {"bench": "compression-inflate", "request_bytes": len(request),
            "compressed_bytes": len(payload), "us_per_frame": round(spent / n * 1e6, 2),
            "cores_at_rate_limit_per_10k_clients": round(spent / n * 20 * 10_000, 3)}


def _public_pem() -> bytes:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def measure_memory(count: int = 2000) -> list[dict[str, Any]]:
    """Python heap per browser-like connection (upgraded, then one subscribe frame sent
    and answered), with and without compression negotiated: the state machine's own
    objects, measured with tracemalloc on Rango's sans-I/O Connection."""
    import gc
    import tracemalloc

    from websockets.client import ClientProtocol
    from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory
    from websockets.uri import parse_uri

    from rango.config import Config
    from rango.connection import Connection, Gateway

    class Quiet:
        def rejected(self, status: int) -> None: ...
        def closed(self, reason: str) -> None: ...
        def slow_client(self) -> None: ...
        def accept_failed(self, reason: str) -> None: ...

    lines = []
    for offer in (False, True):
        config = Config(compression=True, jwt_public_key=_public_pem(), jwt_algorithm="ES256")
        hub = Hub(deflater=Deflater(), min_size=COMPRESSION_MIN_SIZE)
        gateway = Gateway(config, hub, Quiet())
        clients = []
        for _ in range(50):  # warm up websockets' and zlib's caches
            clients.append(ClientProtocol(parse_uri("ws://h/"),
                           extensions=[ClientPerMessageDeflateFactory()] if offer else None))
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        conns = []
        for _ in range(count):
            peer = ClientProtocol(parse_uri("ws://h/public"),
                                  extensions=[ClientPerMessageDeflateFactory()] if offer else None)
            peer.send_request(peer.connect())
            conn = Connection(gateway)
            conn.receive_data(b"".join(peer.data_to_send()))
            hub.flush()
            peer.receive_data(conn.data_to_send())
            peer.send_text(b'{"event":"subscribe","streams":["btcusd.trades"]}')
            conn.receive_data(b"".join(peer.data_to_send()))
            hub.flush()
            conn.data_to_send()
            conns.append(conn)
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        assert all(c.deflate == (15 if offer else 0) for c in conns)
        lines.append({"bench": "compression-memory", "negotiated": offer, "connections": count,
                      "python_heap_bytes_per_connection": round((after - before) / count)})
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="of demo feed")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--level", type=int, default=COMPRESSION_LEVEL)
    parser.add_argument("--min-size", type=int, default=COMPRESSION_MIN_SIZE)
    args = parser.parse_args()
    common = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "loadavg_before": list(os.getloadavg())}  # fmt: skip
    events = feed(args.seconds)
    lines = [*measure_wire(args, events), measure_cpu(args, events), *measure_levels(events),
             *measure_threshold(), measure_inflate(), *measure_memory()]  # fmt: skip
    for line in lines:
        print(json.dumps({**line, **common, "loadavg_after": list(os.getloadavg())}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
