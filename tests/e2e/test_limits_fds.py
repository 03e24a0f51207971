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
