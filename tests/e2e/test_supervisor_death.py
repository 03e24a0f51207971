"""The supervisor dies (``kill -9``): its workers drain and exit, and a new ``rango`` serves.

Real processes, real signals: nothing here stops the workers but their own check
that the supervisor which started them is still their parent.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from typing import Any

from support.broker import queues_of, unique
from support.crowd import open_clients
from support.gateway import REPO, Rango, accepts, gateway_env
from support.polling import wait_for
from support.procfs import alive
from websockets.sync.client import connect as sync_connect

TWO = {"RANGO_WORKERS": "2", "LOG_LEVEL": "debug"}


def test_kill_9_of_the_supervisor_drains_the_workers_and_frees_the_port(
    rango_factory: Any, keys: Any, tmp_path: Any
) -> None:
    rango = rango_factory(env=TWO)
    pids = wait_for(lambda: len(rango.worker_pids()) == 2 and rango.worker_pids(), 10, "2 workers")
    wait_for(lambda: all(queues_of(*pids).values()), 10, "2 queues")
    stream = f"{unique()}.trades"

    async def scenario() -> list[int | None]:
        clients = await open_clients(rango.url(query=f"stream={stream}"), 20, stream)
        rango.send_signal(signal.SIGKILL)
        return list(await asyncio.wait_for(asyncio.gather(*(c.closed for c in clients)), 10))

    codes = asyncio.run(scenario())
    assert set(codes) == {1001}, codes  # drained as on SIGTERM, not reset
    wait_for(lambda: not any(alive(pid) for pid in pids), 10, "the orphaned workers to exit")
    assert queues_of(*pids) == {pid: [] for pid in pids}  # each deleted its queue
    assert not accepts(rango.port)
    assert rango.log().count(f"supervisor (pid {rango.pid}) is gone") == 2, rango.log()[-2000:]

    # A new rango on the same ports starts at once and serves.
    again = Rango(keys, tmp_path, TWO)
    again.port, again.metrics_port = rango.port, rango.metrics_port
    again.env = gateway_env(again.port, again.metrics_port, **TWO)
    again.log_path = tmp_path / "rango-again.log"
    try:
        again.start()
        with sync_connect(again.url(query=f"stream={stream}"), open_timeout=5) as ws:
            assert "subscribed" in str(ws.recv(5))
    finally:
        again.stop()


def test_a_worker_started_on_its_own_ignores_its_parent(keys: Any, tmp_path: Any) -> None:
    """``python -m workers.worker`` from a shell (or supervisord) keeps running when the
    process that started it exits: only rango's supervisor passes its pid."""
    rango = Rango(keys, tmp_path, {"LOG_LEVEL": "debug"})
    launcher = (
        "import subprocess, sys\n"
        "log = open(sys.argv[1], 'wb')\n"
        "p = subprocess.Popen([sys.executable, '-m', 'workers.worker', *sys.argv[2:]],"
        " stdout=log, stderr=log)\n"
        "print(p.pid)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", launcher, str(rango.log_path), *rango.args],
        cwd=REPO, env=rango.env, capture_output=True, check=True, timeout=10,
    )  # fmt: skip
    worker = int(done.stdout)  # its parent has exited: the worker is reparented now
    try:
        wait_for(lambda: rango.ready(), 20, "the worker to be ready")
        with sync_connect(rango.url(), open_timeout=5) as ws:
            assert "subscribed" in str(ws.recv(5))
        assert alive(worker)
        assert "is gone" not in rango.log()
    finally:
        os.kill(worker, signal.SIGTERM)
        wait_for(lambda: not alive(worker), 15, "the worker to stop")
