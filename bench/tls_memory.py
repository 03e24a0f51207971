#!/usr/bin/env python3
"""Idle memory per ``wss://`` connection: Rango serving TLS itself, side by side with
the do-nothing uvloop TLS server (bench/floor_server.py), which shows what OpenSSL and
the event loop cost by themselves. Plain ``ws://`` of both in the same run for scale.

    .venv/bin/python bench/tls_memory.py [--connections 2000] [--rounds 2]

The clients are Python (asyncio + ssl): only the server's RSS is measured (its whole
process tree, /proc), so their own cost does not matter here. One JSON line per run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent / "tests"))

import run as bench  # noqa: E402
from support.gateway import free_port  # noqa: E402
from support.procfs import descendants, rss_bytes  # noqa: E402

REQUEST = (
    b"GET /public HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def certificate(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost"],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


async def hold(port: int, count: int, tls: bool) -> list[asyncio.StreamWriter]:
    context = None
    if tls:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    writers = []

    async def one() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
        writer.write(REQUEST)
        await reader.readuntil(b"\r\n\r\n")
        writers.append(writer)

    for start in range(0, count, 200):
        await asyncio.gather(*(one() for _ in range(min(200, count - start))))
    return writers


def tree_rss(pid: int) -> int:
    return sum(rss_bytes(p, default=0) for p in [pid, *descendants(pid)])


async def measure(label: str, argv: list[str], port: int, count: int, tls: bool,
                  ready: float) -> dict[str, object]:  # fmt: skip
    proc = subprocess.Popen(argv, cwd=BENCH.parent, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            preexec_fn=bench._raise_nofile)  # fmt: skip
    try:
        deadline = time.monotonic() + ready
        while not bench.accepts(port):
            assert time.monotonic() < deadline, f"{label} did not listen"
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)  # workers settle (and consume, for Rango)
        before = tree_rss(proc.pid)
        writers = await hold(port, count, tls)
        await asyncio.sleep(3.0)
        after = tree_rss(proc.pid)
        for writer in writers:
            writer.close()
        return {"bench": "tls-idle-memory", "server": label, "tls": tls, "connections": count,
                "per_connection_bytes": round((after - before) / count),
                "rss_before_bytes": before, "rss_after_bytes": after}  # fmt: skip
    finally:
        proc.terminate()
        proc.wait(30)


async def main_async(args: argparse.Namespace) -> None:
    directory = Path(tempfile.mkdtemp(prefix="rango-tls-bench-"))
    cert, key = certificate(directory)
    pubkey = bench.ensure_keys()
    py = sys.executable
    for _ in range(args.rounds):
        for tls in (True, False):
            for label in ("rango", "floor"):
                port = free_port()
                if label == "floor":
                    argv = [py, str(BENCH / "floor_server.py"), str(port), "1",
                            *([str(cert), str(key)] if tls else [])]  # fmt: skip
                else:
                    os.environ.update(
                        RANGER_HOST="127.0.0.1", RANGER_PORT=str(port),
                        RANGO_METRICS_PORT=str(free_port()), LOG_LEVEL="warn",
                    )  # fmt: skip
                    tls_flags = ["--certfile", str(cert), "--keyfile", str(key)] if tls else []
                    argv = [
                        py, "-m", "rango.cli", "--workers", "1", "--pubKey", str(pubkey),
                        "--exchange", "rango.bench.tls", "--amqp-addr", args.amqp_url,
                        *tls_flags,
                    ]  # fmt: skip
                line = await measure(label, argv, port, args.connections, tls, 30.0)
                line.update(loadavg=list(os.getloadavg()), date=time.strftime("%FT%T%z"))
                print(json.dumps(line), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672/")
    asyncio.run(main_async(parser.parse_args()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
