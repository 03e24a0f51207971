"""Soak: steady events to thousands of readers while connections churn and slow clients stall.

    python bench/soak.py                      # 10 minutes, 2 workers, 2,000 readers
    python bench/soak.py --seconds 60         # a short rehearsal

Not part of the test suite. Prints one JSON line: RSS per worker at the start, middle and
end (and every 30 s), frames lost by the readers that keep up (must be 0), connections
opened and closed by the churn, slow clients dropped, and what the server closed and why.
Uses bench/run.py's server, C load client and C publisher.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench
import websockets


def churn(port: int, stream: str, stop: threading.Event, stats: dict[str, int]) -> None:
    """Open, subscribe and close connections in batches of 50 until ``stop``."""

    async def one() -> None:
        try:
            async with websockets.connect(
                f"ws://127.0.0.1:{port}/public?stream={stream}", open_timeout=10
            ) as ws:
                await asyncio.wait_for(ws.recv(), 10)
                await ws.send(json.dumps({"event": "subscribe", "streams": ["soak.tickers"]}))
                await asyncio.wait_for(ws.recv(), 10)
            stats["opened"] += 1
        except Exception as exc:  # counted, not raised: the soak goes on
            key = f"failed_{type(exc).__name__}"
            stats[key] = stats.get(key, 0) + 1

    async def main() -> None:
        while not stop.is_set():
            await asyncio.gather(*(one() for _ in range(50)))

    asyncio.run(main())


def slow_client(port: int, stream: str) -> socket.socket:
    """A client that completes the upgrade, subscribes, then never reads."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        f"GET /public?stream={stream} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    return sock


def peer_closed(sock: socket.socket) -> bool:
    """True once the server has closed or reset a stalled client.

    Its receive buffer is full of unread frames, so a peek cannot see the end of
    the stream: read everything that is there now, then look for EOF or a reset.
    """
    try:
        while True:
            if not sock.recv(1 << 20, socket.MSG_DONTWAIT):
                return True
    except BlockingIOError:
        return False
    except OSError:
        return True


def closed_by_reason(port: int) -> dict[str, float]:
    """``rango_clients_closed_total`` by reason, from the metrics endpoint."""
    import re
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    pattern = re.compile(r'^rango_clients_closed_total\{reason="([^"]+)"\} (\S+)$', re.M)
    return {reason: float(value) for reason, value in pattern.findall(text)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--readers", type=int, default=2000)
    parser.add_argument("--rate", type=float, default=20.0, help="events per second")
    parser.add_argument("--slow", type=int, default=5, help="clients that never read")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--max-pending", type=int, default=256 * 1024,
                        help="RANGO_MAX_PENDING_BYTES, small so slow clients hit it")
    parser.add_argument("--ping-interval", type=float, default=300.0,
                        help="RANGO_PING_INTERVAL: long, so stalled clients meet the "
                        "pending bound before the keepalive (which also closes them)")
    args = parser.parse_args()
    # bench/run.py's defaults for everything else (broker, body size, timeouts).
    common = argparse.Namespace(
        amqp_host="127.0.0.1", amqp_port=5672, amqp_user="guest", amqp_password="guest",
        amqp_url="amqp://guest:guest@127.0.0.1:5672/", log_level="info",
        size=bench.BODY_SIZE, inflight=500, ready_timeout=180.0, workers=args.workers,
    )  # fmt: skip
    stream, key = "soak.trades", "public.soak.trades"
    env = {
        "RANGO_MAX_PENDING_BYTES": str(args.max_pending),
        "RANGO_PING_INTERVAL": str(args.ping_interval),
    }
    server = bench.Server(common, bench.Target("rango"), "soak", env=env).start()
    samples: list[dict[str, Any]] = []
    stop = threading.Event()
    churned: dict[str, int] = {"opened": 0}
    loadavg_before = bench.loadavg()
    try:
        readers = bench.LoadClient(common, server, "subscribe", args.readers, [stream])
        readers.wait_ready(180)
        slow = [slow_client(server.port, stream) for _ in range(args.slow)]
        churner = threading.Thread(target=churn, args=(server.port, stream, stop, churned))
        churner.start()
        events = int(args.rate * args.seconds)
        publisher: dict[str, Any] = {}
        pub = threading.Thread(
            target=lambda: publisher.update(bench.publish(common, server, key, events, args.rate))
        )
        started = time.monotonic()
        rss = {str(pid): bench.rss_bytes(pid) for pid in server.worker_pids()}
        samples.append({"t": 0, "rss_workers": rss})
        pub.start()
        while pub.is_alive():
            pub.join(timeout=30)
            rss = {str(pid): bench.rss_bytes(pid) for pid in server.worker_pids()}
            samples.append({"t": round(time.monotonic() - started), "rss_workers": rss})
        stop.set()
        churner.join(60)
        # The churn's clients also subscribed to soak.trades: readers are what count.
        report = bench.wait_frames(readers, args.readers * events, 5.0, 120)
        metrics = server.metrics()
        closed = closed_by_reason(server.metrics_port)
        final = readers.close()
        slow_dropped = sum(peer_closed(sock) for sock in slow)
        for sock in slow:
            sock.close()
    finally:
        stop.set()
        server.stop()
    expected = args.readers * events
    line = {
        "bench": "soak",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()),
        "params": vars(args),
        "results": {
            "events_published": events,
            "reader_frames_expected": expected,
            "reader_frames_received": report["frames"],
            "reader_frames_lost": expected - report["frames"],
            "reader_seq_gaps": report.get("seq_gaps"),
            "readers_closed_by_server": (final or report).get("closed_by_server"),
            "churn": churned,
            "slow_clients_dropped_seen_by_clients": slow_dropped,
            "slow_clients_dropped_metric": metrics.get("rango_slow_clients_dropped_total"),
            "clients_closed_by_reason": closed,
            "rss_start": samples[0] if samples else None,
            "rss_middle": samples[len(samples) // 2] if samples else None,
            "rss_end": samples[-1] if samples else None,
            "rss_samples": samples,
            "clients_gauge_at_end": metrics.get("rango_hub_clients_count"),
        },
        "loadavg_before": loadavg_before,
        "loadavg_after": bench.loadavg(),
        "git": bench.git_sha(),
    }
    print(json.dumps(line), flush=True)
    return 0 if line["results"]["reader_frames_lost"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
