#!/usr/bin/env python3
"""``wss://`` served by Rango, beside the do-nothing uvloop TLS floor, in one run.

    .venv/bin/python bench/tls.py [--rounds 3] [--rows memory,connect,fanout]

Each round runs every row once per target, the targets alternating (Rango, then
``bench/floor_server.py`` with the same certificate), all through bench/run.py's
benchmarks with ``--tls``: the C load client does a full TLS handshake per connection
(OpenSSL, non-blocking, no resumption, no verification) and the server an ECDSA P-256
certificate (bench/out/tls-*.pem).

* ``memory``: ``idle-memory --tls --connections N`` (10,000), RSS per idle connection.
* ``connect``: ``connect-rate --tls`` (2 workers, 200 connections cycling through TCP
  connect, TLS handshake, upgrade, close), upgrades/s and CPU per connection.
* ``fanout``: ``fanout --tls --clients 1000 --search`` (max sustained frames/s), or at
  a fixed rate with ``--fanout-rate R`` (CPU per frame at R events/s). The floor consumes
  the run's exchange with Rango's own AMQP consumer and writes each loop iteration's
  events to every connection with one write.

Prints run.py's JSON line for every run, then one ``"summary"`` line per row: the
medians per target and each target's ratio to the floor (CPU per connection and per
frame are server CPU seconds over the window divided by what it served). ``--target
LABEL=CMD`` adds a server (run.py's placeholders, plus ``{certfile} {keyfile}``), e.g.
another checkout: ``--target 'before=env -C /path/to/checkout .venv/bin/python -m
rango.cli --workers {workers} --pubKey {pubkey} --exchange {exchange} --amqp-addr
{amqp_url}'`` (TLS comes from RANGO_TLS_CERTFILE/KEYFILE in its environment).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import run as bench  # noqa: E402

FLOOR = (
    f"{sys.executable} {BENCH / 'floor_server.py'} {{port}} {{workers}} {{certfile}} {{keyfile}}"
)
ROWS = ("memory", "connect", "fanout")


def row_argv(row: str, args: argparse.Namespace) -> list[str]:
    common = ["--tls", "--amqp-host", args.amqp_host, "--amqp-port", str(args.amqp_port)]
    if row == "memory":
        return ["idle-memory", "--connections", str(args.connections), *common]
    if row == "connect":
        return ["connect-rate", "--seconds", str(args.seconds), "--workers", "2", *common]
    fanout = ["fanout", "--clients", str(args.clients), *common]
    if args.fanout_rate:
        return [*fanout, "--rate", str(args.fanout_rate), "--step-seconds", "5"]
    return [*fanout, "--search", "--start-rate", str(args.start_rate)]


def floor_command(row: str) -> str:
    return FLOOR + (" --fanout {amqp_url} {exchange}" if row == "fanout" else "")


def headline(row: str, line: dict[str, Any]) -> dict[str, float | None]:
    """The numbers a row compares, from one run's line."""
    results, cpu = line["results"], line["cpu_seconds"]
    if row == "memory":
        return {"per_connection_bytes": results["per_connection_bytes"],
                "connections_per_s": results["connections_per_s"]}  # fmt: skip
    if row == "connect":
        upgrades = results["upgrades"] or None
        return {
            "upgrades_per_s": results["upgrades_per_s"],
            "failures": results["failures"],
            "server_us_per_connection": upgrades and round(cpu["server"] / upgrades * 1e6, 1),
            "client_us_per_connection": upgrades and round(cpu["client"] / upgrades * 1e6, 1),
        }
    if "max_sustained_frames_per_s" in results:  # --search
        at_max = results["at_max"] or {}
        return {
            "max_sustained_frames_per_s": results["max_sustained_frames_per_s"],
            "server_cores_at_max": at_max.get("server_cores"),
            "p99_ms_at_max": (at_max.get("latency_ms") or {}).get("p99"),
        }
    frames = results["frames"] or None
    return {
        "frames_per_s": results["frames_per_s"],
        "lost": results["lost"],
        "server_cores": results.get("server_cores"),
        "server_us_per_frame": frames and round(cpu["server"] / frames * 1e6, 3),
        "client_us_per_frame": frames and round(cpu["client"] / frames * 1e6, 3),
        "p99_ms": results["latency_ms"]["p99"],
    }


def summary(row: str, runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    medians: dict[str, dict[str, float]] = {}
    for label, lines in runs.items():
        values: dict[str, list[float]] = {}
        for line in lines:
            for key, value in headline(row, line).items():
                if isinstance(value, int | float):
                    values.setdefault(key, []).append(value)
        medians[label] = {k: statistics.median(v) for k, v in values.items()}
    floor = medians.get("floor", {})
    ratios = {
        label: {k: round(v / floor[k], 3) for k, v in m.items() if floor.get(k)}
        for label, m in medians.items() if label != "floor"
    }  # fmt: skip
    loads = [line["loadavg_before"][0] for lines in runs.values() for line in lines]
    return {
        "bench": "tls", "summary": "median", "row": row,
        "runs": {label: len(lines) for label, lines in runs.items()},
        "median": medians, "ratio_to_floor": ratios,
        "loadavg_1min_range": [min(loads), max(loads)] if loads else None,
        "git": bench.git_sha(), "source": bench.source_digest(),
    }  # fmt: skip


def run_with_retries(
    args: argparse.Namespace, target: bench.Target, round_: int, sha: str | None
) -> dict[str, Any]:
    """run.py's run, again (up to twice, 20 s later) if it failed: on a shared machine
    the broker is sometimes away for another user's tests."""
    for attempt in range(3):
        try:
            return bench.run_line(args, target, round_, sha)
        except Exception as exc:
            if attempt == 2:
                raise
            bench.log(f"{args.bench} {target.label} failed ({exc!r}); again in 20 s")
            time.sleep(20)
    raise AssertionError("unreachable")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rows", default=",".join(ROWS), help="comma list of " + ", ".join(ROWS))
    parser.add_argument("--connections", type=int, default=10000, help="memory row")
    parser.add_argument("--seconds", type=float, default=5.0, help="connect row")
    parser.add_argument("--clients", type=int, default=1000, help="fanout row")
    parser.add_argument("--fanout-rate", type=float, help="fanout at this rate, not a search")
    parser.add_argument("--start-rate", type=float, default=100.0, help="fanout search")
    parser.add_argument("--target", action="append", default=[], metavar="LABEL=CMD",
                        help="another server beside rango and the floor")  # fmt: skip
    parser.add_argument("--amqp-host", default="127.0.0.1")
    parser.add_argument("--amqp-port", type=int, default=5672)
    parser.add_argument("--output", type=Path, help="also append the JSON lines to this file")
    args = parser.parse_args()
    rows = [r for r in args.rows.split(",") if r]
    unknown = set(rows) - set(ROWS)
    if unknown:
        parser.error(f"unknown rows: {', '.join(sorted(unknown))}")
    bench.build("loadclient")
    bench.build("amqppub")
    sha = bench.git_sha()
    collected: dict[str, dict[str, list[dict[str, Any]]]] = {row: {} for row in rows}
    for round_ in range(1, args.rounds + 1):
        for row in rows:
            run_args = bench.parse_args(row_argv(row, args))
            targets = [bench.Target("rango"), bench.Target(f"floor={floor_command(row)}"),
                       *(bench.Target(spec) for spec in args.target)]  # fmt: skip
            for target in targets:
                line = run_with_retries(run_args, target, round_, sha)
                line["suite"] = "tls"
                bench.emit(line, args.output)
                collected[row].setdefault(target.label, []).append(line)
    for row in rows:
        bench.emit(summary(row, collected[row]), args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
