#!/usr/bin/env python3
"""Why a forked worker's private memory is what it is: each of its private pages
compared with the template's page at the same address.

    .venv/bin/python bench/cow.py [--python PY ...] [--rounds 1]

Starts ``rango --workers 1`` (workers forked from the template), lets it settle, then
reads the worker's and the template's ``/proc/PID/pagemap`` and ``/proc/PID/mem``
(root, or ptrace rights over them). Every page mapped in the worker alone (pagemap
bit 56, "exclusively mapped") is one of:

- ``new``: the template has no page there (memory the worker allocated afresh);
- ``identical``: copied on write, and now byte for byte the template's again, i.e.
  written and put back: a reference count raised and dropped by code that ran;
- ``counts_only``: copied, and every 8-byte word that differs differs by less than 64
  (reference counts and counters);
- ``changed``: copied and changed otherwise (objects allocated into the template's free
  blocks, pointers, the interpreter's caches).

One JSON line per interpreter and round: pages (and MB) per class, per kind of mapping
(``heap``: the C heap; ``anon``: pymalloc's arenas and other anonymous memory;
``python``: libpython's data; ``other``), with the load average.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import struct
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import footprint  # noqa: E402
import run as bench  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")
PRESENT = 1 << 63
EXCLUSIVE = 1 << 56


def writable_maps(pid: int) -> list[tuple[int, int, str]]:
    """(start, end, kind) of each writable mapping of ``pid``."""
    out = []
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            fields = line.split()
            if "w" not in fields[1]:
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            name = fields[5] if len(fields) > 5 else ""
            kind = (
                "heap" if name == "[heap]"
                else "anon" if not name
                else "python" if "libpython" in name
                else "other"
            )  # fmt: skip
            out.append((start, end, kind))
    return out


def entries(pagemap: Any, start: int, count: int) -> tuple[int, ...]:
    pagemap.seek(start // PAGE * 8)
    data = pagemap.read(count * 8)
    return struct.unpack(f"{len(data) // 8}Q", data)


def classify(worker: int, template: int) -> Counter[tuple[str, str]]:
    """(kind of mapping, class) -> pages, for every page mapped in ``worker`` alone."""
    pages: Counter[tuple[str, str]] = Counter()
    words = PAGE // 8
    with (
        open(f"/proc/{worker}/pagemap", "rb") as wmap,
        open(f"/proc/{template}/pagemap", "rb") as tmap,
        open(f"/proc/{worker}/mem", "rb") as wmem,
        open(f"/proc/{template}/mem", "rb") as tmem,
    ):
        for start, end, kind in writable_maps(worker):
            count = (end - start) // PAGE
            mine = entries(wmap, start, count)
            theirs = entries(tmap, start, count)
            for i, entry in enumerate(mine):
                if not (entry & PRESENT and entry & EXCLUSIVE):
                    continue
                if i >= len(theirs) or not theirs[i] & PRESENT:
                    pages[kind, "new"] += 1
                    continue
                address = start + i * PAGE
                try:
                    wmem.seek(address)
                    a = struct.unpack(f"{words}q", wmem.read(PAGE))
                    tmem.seek(address)
                    b = struct.unpack(f"{words}q", tmem.read(PAGE))
                except (OSError, struct.error):
                    pages[kind, "unreadable"] += 1
                    continue
                diffs = [(x, y) for x, y in zip(a, b, strict=True) if x != y]
                if not diffs:
                    pages[kind, "identical"] += 1
                elif all(abs(x - y) < 64 for x, y in diffs):
                    pages[kind, "counts_only"] += 1
                else:
                    pages[kind, "changed"] += 1
    return pages


def one(args: argparse.Namespace, python: footprint.Interpreter) -> dict[str, Any]:
    env = {"RANGO_PRELOAD": "1", "LOG_LEVEL": "info"}
    server = bench.Server(args, python, "cow", workers=1, env=env)
    server.start(wait=False)
    try:
        footprint.wait(lambda: footprint.workers_up(server, 1), 120, "worker up")
        time.sleep(footprint.SETTLE)
        procs = footprint.tree(server.pid)
        worker = next(p["pid"] for p in procs if p["role"] == "worker")
        template = next(p["pid"] for p in procs if p["role"] == "template")
        pages = classify(worker, template)
    finally:
        server.stop()
    by_class: Counter[str] = Counter()
    by_kind: dict[str, dict[str, int]] = {}
    for (kind, cls), n in sorted(pages.items()):
        by_class[cls] += n
        by_kind.setdefault(kind, {})[cls] = n
    total = sum(by_class.values())
    return {
        "bench": "cow",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "python": python.version,
        "results": {
            "private_pages": total,
            "private_mb": round(total * PAGE / footprint.MB, 2),
            "pages": dict(by_class),
            "mb": {cls: round(n * PAGE / footprint.MB, 2) for cls, n in by_class.items()},
            "pages_by_mapping": by_kind,
        },
        "loadavg": list(os.getloadavg()),
        "git": bench.git_sha(),
        "nproc": os.cpu_count(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    footprint.add_python_argument(parser)
    parser.add_argument("--rounds", type=int, default=1)
    own = parser.parse_args()
    pythons = footprint.interpreters(own.python)
    if pythons is None:
        return 2
    args = footprint.server_args()
    for _ in range(own.rounds):
        for python in pythons:
            print(json.dumps(one(args, python), separators=(",", ":")), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
