#!/usr/bin/env python3
"""The idle footprint of ``rango --workers N``: RSS, PSS and private dirty memory of
every process of the tree (/proc/PID/smaps_rollup), for 1, 2, 4 and 8 workers, each
worker started from the template (``RANGO_PRELOAD=1``, the default) and as a fresh
interpreter (``RANGO_PRELOAD=0``, the old way), alternating in one run. Also timed:
start-up (launch to every worker consuming, and each worker's spawn to ``listening``
from the supervisor's log) and a SIGHUP rolling restart of all workers.

    .venv/bin/python bench/footprint.py [--workers 1 2 4 8] [--rounds 1]

No client is connected: this is what the processes cost by themselves. One JSON line
per (mode, workers) with the load average. Pss moves with the other Python processes
of the machine (they share the libraries' pages); Pss_Anon is the tree's own.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent / "tests"))

import run as bench  # noqa: E402
from support import procfs  # noqa: E402

MB = 1024 * 1024
SETTLE = 3.0  # seconds after ready: the first metrics syncs and AMQP set-up are done


def rollup(pid: int) -> dict[str, int]:
    """Rss, Pss (all, anonymous) and Private_Dirty of ``pid`` in bytes (0 where it is gone).

    Pss counts a shared library's pages shared with every process that maps them, other
    Python processes on the machine included, so it moves with what else runs; Pss_Anon
    (heap and arenas, shared only by forking inside the tree) does not."""
    wanted = {"Rss:": "rss", "Pss:": "pss", "Pss_Anon:": "pss_anon",
              "Private_Dirty:": "private_dirty"}  # fmt: skip
    out = dict.fromkeys(wanted.values(), 0)
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                key, _, rest = line.partition(" ")
                if key in wanted:
                    out[wanted[key]] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return out


def role(pid: int, root: int) -> str:
    if pid == root:
        return "supervisor"
    comm = procfs.comm(pid)
    if not comm:
        return "gone"
    if comm.startswith("rango-worker"):
        return "worker"
    if comm == "rango-template":
        return "template"
    return "worker" if "workers.worker" in procfs.cmdline(pid) else comm


def tree(root: int) -> list[dict[str, Any]]:
    return [
        {"pid": pid, "role": role(pid, root), **rollup(pid)} for pid in procfs.descendants(root)
    ]


def workers_up(server: bench.Server, count: int) -> bool:
    return server.ready() and sum(p["role"] == "worker" for p in tree(server.pid)) == count


def wait(predicate: Any, timeout: float, what: str) -> float:
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise TimeoutError(what)
        time.sleep(0.02)
    return time.monotonic() - start


LISTENING = re.compile(rb"worker (\d+) \(pid \d+\) listening after ([0-9.]+) s")


def _log_after(server: bench.Server, offset: int) -> bytes:
    with open(server.log_path, "rb") as f:
        f.seek(offset)
        return f.read()


def listening_times(server: bench.Server, since: int) -> list[float]:
    """Each worker's spawn-to-listening time, from the supervisor's log after ``since``."""
    return [float(m.group(2)) for m in LISTENING.finditer(_log_after(server, since))]


def one(args: argparse.Namespace, preload: bool, workers: int) -> dict[str, Any]:
    env = {"RANGO_PRELOAD": "1" if preload else "0", "LOG_LEVEL": "info"}
    server = bench.Server(args, bench.Target("rango"), "footprint", workers=workers, env=env)
    server.start(wait=False)
    try:
        started = wait(lambda: workers_up(server, workers), 120, "workers up")
        startup = listening_times(server, 0)
        time.sleep(SETTLE)
        procs = tree(server.pid)
        offset = os.path.getsize(server.log_path)
        os.kill(server.pid, signal.SIGHUP)
        t0 = time.monotonic()
        wait(lambda: b"rolling restart done" in _log_after(server, offset), 180, "roll-out")
        rolled = time.monotonic() - t0
        rolled_listening = listening_times(server, offset)
    finally:
        server.stop()
    by_role: dict[str, list[dict[str, Any]]] = {}
    for proc in procs:
        by_role.setdefault(proc["role"], []).append(proc)
    worker_dirty = [p["private_dirty"] for p in by_role.get("worker", [])]
    return {
        "bench": "footprint",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "mode": "template" if preload else "spawn",
        "workers": workers,
        "results": {
            "rss_mb": round(sum(p["rss"] for p in procs) / MB, 1),
            "pss_mb": round(sum(p["pss"] for p in procs) / MB, 1),
            "pss_anon_mb": round(sum(p["pss_anon"] for p in procs) / MB, 1),
            "private_dirty_mb": round(sum(p["private_dirty"] for p in procs) / MB, 1),
            "worker_private_dirty_mb": {
                "max": round(max(worker_dirty) / MB, 1),
                "median": round(statistics.median(worker_dirty) / MB, 1),
            },
            "processes": [
                {
                    "role": p["role"],
                    "rss_mb": round(p["rss"] / MB, 1),
                    "pss_mb": round(p["pss"] / MB, 1),
                    "pss_anon_mb": round(p["pss_anon"] / MB, 1),
                    "private_dirty_mb": round(p["private_dirty"] / MB, 1),
                }
                for p in procs
            ],
            "start_all_consuming_s": round(started, 2),
            "worker_spawn_to_listening_s": _spread(startup),
            "rolling_restart_s": round(rolled, 2),
            "rolling_worker_spawn_to_listening_s": _spread(rolled_listening),
        },
        "loadavg": list(os.getloadavg()),
        "git": bench.git_sha(),
        "nproc": os.cpu_count(),
    }


def _spread(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"median": round(statistics.median(values), 3), "max": round(max(values), 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--output", type=Path, help="also append the lines to this file")
    own = parser.parse_args()
    args = argparse.Namespace(
        workers=1, log_level="info", amqp_url="amqp://guest:guest@127.0.0.1:5672/",
        server_env=None,
    )  # fmt: skip
    for _ in range(own.rounds):
        for workers in own.workers:
            for preload in (False, True):  # side by side: the old way, then the new
                line = one(args, preload, workers)
                text = json.dumps(line, separators=(",", ":"))
                print(text, flush=True)
                if own.output:
                    with open(own.output, "a") as f:
                        f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
