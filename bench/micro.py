"""Python cost of Rango's hot paths in-process, with no sockets and no broker.

Drives the real ``Server``/``Connection``/``Hub`` objects with a fake transport
that only collects bytes, so what is timed is Rango's own Python (plus the
libraries it calls), not the kernel:

* ``connection``: one connection's life: upgrade request with one query-string
  stream, the ``101`` + ``subscribed`` write, a close frame from the client and
  its echo, the connection lost.
* ``fanout``: one event routed to N subscribers and written (one ``write()`` call
  on each fake transport).

Prints one JSON line; ``--profile`` prints cProfile's top functions instead.

    .venv/bin/python bench/micro.py [--connections 20000] [--subscribers 1000] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# Workers run prometheus-client in multiprocess mode: measure that path.
os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="rango-micro-"))

from rango.config import Config  # noqa: E402
from rango.hub import Hub  # noqa: E402
from rango.metrics import Metrics  # noqa: E402
from rango.server import Server, ServerConnection  # noqa: E402

REQUEST = (
    b"GET /public?stream=benchusd.trades HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"
    b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)
CLOSE_1000 = bytes([0x88, 0x82, 1, 2, 3, 4, 0x03 ^ 1, 0xE8 ^ 2])
BODY = b'{"t":1795736696977084843,"s":1,"p":"' + b"x" * 58 + b'"}'


class Transport:
    """Collects writes; enough of asyncio.Transport for Rango's server."""

    __slots__ = ("closing", "written")

    def __init__(self) -> None:
        self.written = 0
        self.closing = False

    def write(self, data: bytes) -> None:
        self.written += len(data)

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    abort = close

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0


def make_server() -> Server:
    key = ROOT / "bench" / "out" / "rsa-key.pub"
    if not key.exists():
        from rango.cli import main as rango_main

        key.parent.mkdir(parents=True, exist_ok=True)
        rango_main(["keygen", "--out", str(key.with_suffix("")), "--force"])
    config = Config.from_env({}, pub_key=str(key))
    metrics = Metrics("0")
    return Server(config, Hub(config.rbac, observer=metrics), metrics)


def connection_life(server: Server) -> None:
    conn = ServerConnection(server)
    conn.connection_made(Transport())  # type: ignore[arg-type]
    conn.data_received(REQUEST)
    server.flush()
    conn.data_received(CLOSE_1000)
    server.flush()
    conn.connection_lost(None)


def per_call_us(fn: object, count: int) -> float:
    start = time.perf_counter()
    for _ in range(count):
        fn()  # type: ignore[operator]
    return (time.perf_counter() - start) / count * 1e6


async def run(args: argparse.Namespace) -> None:
    server = make_server()
    if args.profile:
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(args.connections):
            connection_life(server)
        profile.disable()
        pstats.Stats(profile).sort_stats("tottime").print_stats(25)
        return
    per_call_us(lambda: connection_life(server), 1000)  # warm up
    connection_us = min(
        per_call_us(lambda: connection_life(server), args.connections // 5) for _ in range(5)
    )

    conns = []
    for _ in range(args.subscribers):
        conn = ServerConnection(server)
        conn.connection_made(Transport())  # type: ignore[arg-type]
        conn.data_received(REQUEST)
        conns.append(conn)
    server.flush()

    def event() -> None:
        server.hub.route("public.benchusd.trades", BODY)
        server.flush()

    event_us = min(per_call_us(event, 200) for _ in range(5))
    print(json.dumps({
        "bench": "micro",
        "python": sys.version.split()[0],
        "loadavg": os.getloadavg(),
        "connection_life_us": round(connection_us, 2),
        "fanout_subscribers": args.subscribers,
        "event_us": round(event_us, 1),
        "per_frame_us": round(event_us / args.subscribers, 3),
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=20000)
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument("--profile", action="store_true")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
