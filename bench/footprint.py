#!/usr/bin/env python3
"""The idle footprint of ``rango --workers N``: RSS, PSS and private dirty memory of
every process of the tree (/proc/PID/smaps_rollup), for 1, 2, 4 and 8 workers, each
worker started from the template (``RANGO_PRELOAD=1``, the default) and as a fresh
interpreter (``RANGO_PRELOAD=0``, the old way), alternating in one run. Also timed:
start-up (launch to every worker consuming, and each worker's spawn to ``listening``
from the supervisor's log) and a SIGHUP rolling restart of all workers.

    .venv/bin/python bench/footprint.py [--workers 1 2 4 8] [--rounds 1] [--python PY ...]

No client is connected: this is what the processes cost by themselves. One JSON line
per (interpreter, mode, workers) with the load average. Pss moves with the other Python
processes of the machine (they share the libraries' pages); Pss_Anon is the tree's own.

``--python`` (repeatable) runs Rango from this checkout under other interpreters too,
side by side in the same run; each needs Rango's dependencies, e.g.
``python3.12 -m venv bench/out/venv-3.12 && bench/out/venv-3.12/bin/pip install -e .``
(then ``--python bench/out/venv-3.12/bin/python``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import os
import re
import signal
import statistics
import subprocess
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


class Interpreter(bench.Target):
    """``rango`` of this checkout (``python -m rango.cli`` in it) run by ``python``."""

    def __init__(self, python: str) -> None:
        super().__init__("rango")
        self.python = python
        self.version = subprocess.run(
            [python, "-c", "import platform; print(platform.python_version())"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        self.label = f"rango-py{self.version}"

    def argv(self, ctx: dict[str, Any]) -> list[str]:
        return [self.python, *super().argv(ctx)[1:]]  # this interpreter for sys.executable

    def check(self) -> str | None:
        """Why this interpreter cannot run Rango from here, or None."""
        imports = "import jwt, orjson, pika, prometheus_client, uvloop, websockets"
        done = subprocess.run(
            [self.python, "-c", imports], cwd=bench.REPO, capture_output=True, text=True
        )
        if done.returncode == 0:
            return None
        last = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        return (
            f"--python {self.python} (Python {self.version}) cannot import Rango's "
            f"dependencies ({last}): give it a venv with `pip install -e .`"
        )


def one(
    args: argparse.Namespace, preload: bool, workers: int, python: Interpreter
) -> dict[str, Any]:
    env = {"RANGO_PRELOAD": "1" if preload else "0", "LOG_LEVEL": "info"}
    server = bench.Server(args, python, "footprint", workers=workers, env=env)
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
        "python": python.version,
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


def add_python_argument(parser: argparse.ArgumentParser) -> None:
    """``--python PY`` (repeatable), read by :func:`interpreters`."""
    parser.add_argument(
        "--python", action="append", metavar="PY",
        help="an interpreter to run Rango with (repeatable; default: this one)",
    )  # fmt: skip


def interpreters(paths: list[str] | None) -> list[Interpreter] | None:
    """The interpreters of ``--python`` (default: this one); None, with the reason
    printed, if one cannot run Rango from this checkout."""
    try:
        pythons = [Interpreter(path) for path in paths or [sys.executable]]
    except (OSError, subprocess.CalledProcessError) as exc:
        print(f"{sys.argv[0]}: an interpreter of --python does not run: {exc}", file=sys.stderr)
        return None
    for python in pythons:
        problem = python.check()
        if problem:
            print(f"{sys.argv[0]}: {problem}", file=sys.stderr)
            return None
    return pythons


def server_args() -> argparse.Namespace:
    """What :class:`bench.Server` needs of ``bench/run.py``'s options."""
    return argparse.Namespace(
        workers=1, log_level="info", amqp_url="amqp://guest:guest@127.0.0.1:5672/",
        server_env=None,
    )  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--output", type=Path, help="also append the lines to this file")
    add_python_argument(parser)
    own = parser.parse_args()
    pythons = interpreters(own.python)
    if pythons is None:
        return 2
    args = server_args()
    for _ in range(own.rounds):
        for workers in own.workers:
            for python, preload in itertools.product(pythons, (False, True)):
                # side by side: the old way, then the new, under each interpreter
                line = one(args, preload, workers, python)
                text = json.dumps(line, separators=(",", ":"))
                print(text, flush=True)
                if own.output:
                    with open(own.output, "a") as f:
                        f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
