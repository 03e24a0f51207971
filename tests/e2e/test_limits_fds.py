"""The file-descriptor limit, under ``prlimit``: raised to the hard limit, or known and enforced.

Go Rango serves 500 clients with ``--nofile=300:2000`` because the Go runtime
raises the soft limit; so does Rango. With ``300:300`` it cannot: the excess is
refused with 503, the same answer as RANGO_MAX_CONNECTIONS, and a warning says why.
"""

from __future__ import annotations

import asyncio
import shutil
from typing import Any

import pytest
from support.broker import unique
from support.crowd import open_clients
from support.gateway import Rango
from support.wire import upgrade_status

pytestmark = pytest.mark.skipif(shutil.which("prlimit") is None, reason="needs util-linux prlimit")


def start_limited(keys: Any, tmp_path: Any, nofile: str) -> Rango:
    rango = Rango(keys, tmp_path, {"RANGO_WORKERS": "1", "LOG_LEVEL": "info"})
    rango.command = ["prlimit", f"--nofile={nofile}", "--", *rango.command]
    return rango.start()


async def connect_in_batches(url: str, stream: str, count: int) -> list[Any]:
    clients: list[Any] = []
    while len(clients) < count:
        clients += await open_clients(url, min(50, count - len(clients)), stream)
    return clients


def test_soft_limit_is_raised_to_the_hard_one(keys: Any, tmp_path: Any) -> None:
    rango = start_limited(keys, tmp_path, "300:2000")
    try:
        stream = f"{unique()}.trades"
        clients = asyncio.run(connect_in_batches(rango.url(query=f"stream={stream}"), stream, 500))
        assert len(clients) == 500
        assert "file-descriptor limit 2000 (raised from 300)" in rango.log(), rango.log()
    finally:
        rango.stop()


def test_excess_over_the_limit_is_refused_with_503(keys: Any, tmp_path: Any) -> None:
    rango = start_limited(keys, tmp_path, "300:300")
    try:
        log = rango.log()
        assert "RANGO_MAX_CONNECTIONS=50000 cannot be reached" in log, log
        room = int(log.split("leaves room for ")[1].split(";")[0])
        assert 100 < room < 300, room
        stream = f"{unique()}.trades"

        async def scenario() -> tuple[int, list[int]]:
            clients = await connect_in_batches(rango.url(query=f"stream={stream}"), stream, room)
            statuses = [upgrade_status(rango.port, "/public") for _ in range(20)]
            return len(clients), statuses

        upgraded, statuses = asyncio.run(scenario())
        assert upgraded == room
        assert set(statuses) == {503}, statuses
        assert "refusing connections" in rango.log()
        assert "file-descriptor limit (RLIMIT_NOFILE)" in rango.log()
    finally:
        rango.stop()


def test_accept_out_of_descriptors_is_logged_counted_and_resumed(keys: Any, tmp_path: Any) -> None:
    """Past the room and its reserve, ``accept()`` fails with EMFILE: one log line and
    a counter, no busy loop, no connection dropped from the accept queue; once
    descriptors are free again the waiting clients are served.

    Sockets that connect and send nothing hold a descriptor each for the handshake
    timeout (raised here to 60 s), so the worker reaches its limit on purpose.
    """
    import socket

    from support.metrics import counter, wait_counter
    from support.polling import async_wait_for, wait_logged
    from support.procfs import cpu_seconds
    from websockets.asyncio.client import connect

    rango = Rango(
        keys, tmp_path, {"RANGO_WORKERS": "1", "LOG_LEVEL": "info", "RANGO_HANDSHAKE_TIMEOUT": "60"}
    )
    rango.command = ["prlimit", "--nofile=300:300", "--", *rango.command]
    rango.start()
    silent: list[socket.socket] = []
    try:
        [worker] = rango.worker_pids()
        for _ in range(320):  # more than the whole limit: some wait in the accept queue
            sock = socket.create_connection(("127.0.0.1", rango.port))
            silent.append(sock)
        wait_logged(rango, lambda: "accept() failed: EMFILE" in rango.log(), 10, "EMFILE logged")
        assert wait_counter(rango, "rango_accept_failures_total", 1, reason="EMFILE") >= 1

        async def scenario() -> None:
            # Queued behind the silent sockets while the worker is out of descriptors.
            waiting = asyncio.ensure_future(connect(rango.url(), open_timeout=20))
            spent = cpu_seconds(worker)
            await asyncio.sleep(1.0)  # a window to measure CPU in, not an event to await
            assert cpu_seconds(worker) - spent < 0.3, "the worker spins on EMFILE"
            assert not waiting.done(), "the queued client was answered while out of fds"
            for sock in silent:
                sock.close()
            ws = await waiting  # accepted once descriptors are free: not dropped
            await ws.send('{"event":"subscribe","streams":["x.trades"]}')
            await async_wait_for(lambda: ws.protocol.state.name == "OPEN", 5, "open")
            await ws.close()

        asyncio.run(scenario())
        failures = counter(rango, "rango_accept_failures_total", reason="EMFILE")
        assert failures < 50, f"{failures} failed accepts: the listener retried in a loop"
        assert rango.log().count("accept() failed: EMFILE") == 1, rango.log()
    finally:
        for sock in silent:
            sock.close()
        rango.stop()
