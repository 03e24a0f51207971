"""supervisord.conf end to end: ``supervisord -n -c supervisord.conf`` runs two workers
and the metrics exporter; clients reach both workers, metrics sum, SIGTERM cleans up.

The conf names fixed paths under /tmp (pidfile, control socket, metrics directory)
and runs workers on the default exchange; two runs at once would share them. The
test runs a copy of the conf with only those paths (and ``%(here)s``, which the
copy's location would change) rewritten, and the test's exchange added.
"""

from __future__ import annotations

import asyncio
import base64
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.parse
from pathlib import Path

import pytest
from support import AMQP_URL, REPO
from support.broker import queues_of, unique
from support.crowd import open_clients, wait_counts
from support.gateway import free_port, gateway_env, http_get
from support.metrics import (
    MetricsWatch,
    check_scrape,
    clients_gauge,
    gauge_reaches,
    samples,
    scrape,
)
from support.polling import wait_for
from support.procfs import alive, child_pids, cmdline, socket_owners, worker_index

BIN = Path(sys.executable).parent
SUPERVISORD = shutil.which("supervisord", path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")


def _conf(directory: Path, exchange: str) -> Path:
    """supervisord.conf with its fixed paths moved into ``directory``."""
    text = (REPO / "supervisord.conf").read_text()
    replacements = {
        "%(here)s": str(REPO),
        "/tmp/rango-supervisord.pid": str(directory / "supervisord.pid"),
        "/tmp/rango-supervisord.sock": str(directory / "supervisord.sock"),
        "/tmp/rango-metrics": str(directory / "metrics"),
        "childlogdir=/tmp\n": f"childlogdir={directory}\n",
        "command=python3 -m workers.worker\n": (
            f"command=python3 -m workers.worker --exchange {exchange}\n"
        ),
    }
    for old, new in replacements.items():
        assert old in text, f"supervisord.conf no longer has {old!r}: update this test"
        text = text.replace(old, new)
    path = directory / "supervisord.conf"
    path.write_text(text)
    return path


@pytest.mark.skipif(SUPERVISORD is None, reason="supervisord is not installed")
def test_supervisord_runs_workers_and_exporter(keys, tmp_path, publisher_factory):
    # A short directory: the control socket's path must fit in sun_path.
    directory = Path(tempfile.mkdtemp(prefix="rango-sv-"))
    exchange = f"rango.test.{secrets.token_hex(4)}"
    port, metrics_port = free_port(), free_port()
    amqp = urllib.parse.urlsplit(AMQP_URL)
    env = gateway_env(
        port, metrics_port,
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        JWT_PUBLIC_KEY=base64.b64encode(keys.public_pem).decode(),
        RABBITMQ_HOST=amqp.hostname or "127.0.0.1",
        RABBITMQ_PORT=str(amqp.port or 5672),
        RABBITMQ_USER=urllib.parse.unquote(amqp.username or "guest"),
        RABBITMQ_PASSWORD=urllib.parse.unquote(amqp.password or "guest"),
    )  # fmt: skip
    log_path = tmp_path / "supervisord.log"
    log = open(log_path, "wb")  # noqa: SIM115 - closed below
    assert SUPERVISORD is not None
    proc = subprocess.Popen(
        [SUPERVISORD, "-n", "-c", str(_conf(directory, exchange))],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip

    def programs() -> tuple[list[int], list[int]]:
        children = child_pids(proc.pid)
        workers = [p for p in children if "workers.worker" in cmdline(p)]
        exporters = [p for p in children if "workers.exporter" in cmdline(p)]
        return workers, exporters

    def ready() -> bool:
        try:
            return http_get(metrics_port, "/ready")[0] == 200
        except OSError:
            return False

    workers: list[int] = []
    exporters: list[int] = []
    try:
        wait_for(lambda: proc.poll() is not None or ready(), 30, "/ready 200")
        assert proc.poll() is None, log_path.read_text()
        workers, exporters = programs()
        assert len(workers) == 2 and len(exporters) == 1, (workers, exporters)
        assert sorted(worker_index(p) for p in workers) == ["0", "1"]
        publisher = publisher_factory(exchange)
        stream = f"{unique()}.trades"
        url = f"ws://127.0.0.1:{port}/public?stream={stream}"

        async def scenario() -> None:
            clients = await open_clients(url, 20, stream)
            for _ in range(10):
                owners = socket_owners(port, workers)
                if {owners.get(c.port) for c in clients} == set(workers):
                    break
                clients += await open_clients(url, 20, stream)
            assert {owners.get(c.port) for c in clients} == set(workers), owners
            await gauge_reaches(metrics_port, len(clients))

            for n in range(3):
                publisher.publish(f"public.{stream}", {"n": n})
            await wait_counts(clients, 3)
            assert all(c.numbers == [0, 1, 2] for c in clients)

            metrics = scrape(metrics_port)
            assert check_scrape(metrics, {"0", "1"}, "exporter") == []
            amqp_states = {
                labels["worker"]: v for labels, v in samples(metrics, "rango_amqp_connected")
            }
            assert amqp_states == {"0": 1.0, "1": 1.0}, amqp_states
            parts = {
                labels["worker"]
                for labels, _ in samples(metrics, "rango_worker_resident_memory_bytes")
            }
            assert parts == {"0", "1", "exporter"}, parts

            proc.send_signal(signal.SIGTERM)
            codes = await asyncio.wait_for(asyncio.gather(*(c.closed for c in clients)), 20)
            assert set(codes) == {1001}, codes

        with MetricsWatch(metrics_port, 2, own="exporter") as watch:
            asyncio.run(scenario())
            assert proc.wait(30) == 0, log_path.read_text()[-3000:]
        watch.check()
        assert not [p for p in [*workers, *exporters] if alive(p)]
        assert queues_of(*workers) == {pid: [] for pid in workers}
        with pytest.raises(OSError):
            clients_gauge(metrics_port)
    finally:
        if proc.poll() is None:  # the test failed: stop everything it started
            left = [*workers, *exporters, *child_pids(proc.pid)]
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
            for pid in left:
                if alive(pid):
                    os.kill(pid, signal.SIGKILL)
        log.close()
        shutil.rmtree(directory, ignore_errors=True)

