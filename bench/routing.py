#!/usr/bin/env python3
"""The distribution of rango_event_routing_seconds under fan-out: what its buckets are
chosen from. One server, 1,000 clients on one stream (bench/run.py's load client and
publisher), 5 s of events at 100, 1,000 and 4,000 ev/s; prints, per rate, the share of
events at or under each bucket bound, as one JSON line with the load average.

    .venv/bin/python bench/routing.py [--clients 1000]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent / "tests"))

import run as bench  # noqa: E402
from support.metrics import parse_metrics  # noqa: E402


def buckets(server: bench.Server) -> dict[float, float]:
    text = server.http("/metrics")[1]
    found = {}
    for key, value in parse_metrics(text).items():
        if key.startswith("rango_event_routing_seconds_bucket"):
            found[float(key.split('le="')[1].split('"')[0])] = value
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--rates", type=float, nargs="+", default=[100, 1000, 4000])
    own = parser.parse_args()
    args = argparse.Namespace(
        workers=1, log_level="warn", amqp_url="amqp://guest:guest@127.0.0.1:5672/",
        amqp_host="127.0.0.1", amqp_port=5672, amqp_user="guest", amqp_password="guest",
        inflight=500, ready_timeout=120.0, size=100, server_env=None, deflate=False, book=False,
    )  # fmt: skip
    server = bench.Server(args, bench.Target("rango"), "routing").start()
    client = bench.LoadClient(args, server, "subscribe", own.clients, ["benchusd.trades"])
    try:
        client.wait_ready(180)
        for rate in own.rates:
            load = list(os.getloadavg())
            before = buckets(server)
            bench.publish(args, server, "public.benchusd.trades", int(rate * 5), rate)
            time.sleep(2)  # the last events written and synced (once a second)
            after = buckets(server)
            total = after[float("inf")] - before.get(float("inf"), 0)
            share = {
                str(le): round((count - before.get(le, 0)) / total, 3)
                for le, count in sorted(after.items())
            }
            print(json.dumps({"bench": "routing", "clients": own.clients, "rate": rate,
                              "events": total, "cumulative_share": share,
                              "loadavg_before": load, "loadavg_after": list(os.getloadavg())}))
    finally:
        client.close()
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
