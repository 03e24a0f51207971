"""supervisord.conf end to end: ``supervisord -n -c supervisord.conf`` runs two workers
and the metrics exporter; clients reach both workers, metrics sum, SIGTERM cleans up.

The repository's own conf runs, unchanged: its files (control socket, pidfile,
metrics directory) are named after ``RANGER_PORT``, so two instances run side by
side here, each on its own exchange (``RANGO_EXCHANGE``), as on a shared host.
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
import threading
import urllib.parse
from pathlib import Path
from typing import IO

import pytest
from support import AMQP_URL, REPO
from support.broker import queues_of, unique
from support.crowd import Client, open_clients, wait_counts
from support.gateway import free_port, gateway_env, http_get
from support.metrics import MetricsWatch, check_scrape, gauge_reaches, samples, scrape
from support.polling import async_wait_for, wait_for
from support.procfs import alive, child_pids, cmdline, socket_owners, worker_index
from support.wire import RawClient

BIN = Path(sys.executable).parent
PATH = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
SUPERVISORD = shutil.which("supervisord", path=PATH)
SUPERVISORCTL = shutil.which("supervisorctl", path=PATH)
CONF = REPO / "supervisord.conf"

pytestmark = pytest.mark.skipif(SUPERVISORD is None, reason="supervisord is not installed")


class Instance:
    """One ``supervisord -n -c supervisord.conf`` on its own ports and exchange."""

    def __init__(self, public_pem: bytes, log_path: Path) -> None:
        self.exchange = f"rango.test.{secrets.token_hex(4)}"
        self.port, self.metrics_port = free_port(), free_port()
        amqp = urllib.parse.urlsplit(AMQP_URL)
        self.env = gateway_env(
            self.port, self.metrics_port,
            PATH=PATH,
            RANGO_EXCHANGE=self.exchange,
            JWT_PUBLIC_KEY=base64.b64encode(public_pem).decode(),
            RABBITMQ_HOST=amqp.hostname or "127.0.0.1",
            RABBITMQ_PORT=str(amqp.port or 5672),
            RABBITMQ_USER=urllib.parse.unquote(amqp.username or "guest"),
            RABBITMQ_PASSWORD=urllib.parse.unquote(amqp.password or "guest"),
        )  # fmt: skip
        self.files = [
            Path(f"/tmp/rango-{self.port}.supervisord.pid"),
            Path(f"/tmp/rango-{self.port}.supervisord.sock"),
            Path(f"/tmp/rango-{self.port}.metrics"),
        ]
        self.log_path = log_path
        self._log: IO[bytes] = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        assert SUPERVISORD is not None
        self.proc = subprocess.Popen(
            [SUPERVISORD, "-n", "-c", str(CONF)],
            cwd=REPO, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.workers: list[int] = []
        self.exporters: list[int] = []

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def programs(self) -> tuple[list[int], list[int]]:
        children = child_pids(self.proc.pid)
        workers = [p for p in children if "workers.worker" in cmdline(p)]
        exporters = [p for p in children if "workers.exporter" in cmdline(p)]
        return workers, exporters

    def started(self) -> bool:
        """Both workers and the exporter run, and the exporter sees both consuming."""
        if self.proc.poll() is not None:
            return True  # let the caller report the log
        self.workers, self.exporters = self.programs()
        if len(self.workers) != 2 or len(self.exporters) != 1:
            return False
        try:
            if http_get(self.metrics_port, "/ready")[0] != 200:
                return False
            states = samples(scrape(self.metrics_port), "rango_amqp_connected")
        except OSError:
            return False
        return {labels["worker"]: v for labels, v in states} == {"0": 1.0, "1": 1.0}

    def wait_started(self) -> None:
        wait_for(self.started, 30, f"supervisord on port {self.port}")
        assert self.proc.poll() is None, self.log()[-3000:]
        assert sorted(worker_index(p) for p in self.workers) == ["0", "1"]

    def supervisorctl(self, *args: str) -> str:
        assert SUPERVISORCTL is not None
        done = subprocess.run(
            [SUPERVISORCTL, "-c", str(CONF), *args],
            env=self.env, capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        return done.stdout + done.stderr

    def status(self) -> str:
        """``supervisorctl status`` once all three programs are past startsecs."""
        return wait_for(
            lambda: (out := self.supervisorctl("status")).count("RUNNING") == 3 and out,
            15, "RUNNING x3",
        )  # fmt: skip

    async def clients_on_both_workers(self, stream: str) -> list[Client]:
        url = f"ws://127.0.0.1:{self.port}/public?stream={stream}"
        clients = await open_clients(url, 20, stream)
        for _ in range(10):
            owners = socket_owners(self.port, self.workers)
            if {owners.get(c.port) for c in clients} == set(self.workers):
                return clients
            clients += await open_clients(url, 20, stream)
        raise AssertionError(f"clients never reached both workers: {owners}")

    def stop(self) -> None:
        """Stop whatever is left (a failed test) and remove the instance's files."""
        if self.proc.poll() is None:
            left = [*self.workers, *self.exporters, *child_pids(self.proc.pid)]
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
            for pid in left:
                if alive(pid):
                    os.kill(pid, signal.SIGKILL)
        self._log.close()
        for path in self.files:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


class Scraper(threading.Thread):
    """Scrapes ``/metrics`` until told to stop, noting for each try whether any of
    ``pids`` was alive and whether the scrape was answered."""

    def __init__(self, port: int, pids: list[int]) -> None:
        super().__init__(daemon=True)
        self.port, self.pids = port, pids
        self.tries: list[tuple[bool, bool]] = []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            before = any(alive(p) for p in self.pids)
            try:
                scrape(self.port)
                answered = True
            except OSError:
                answered = False
            after = any(alive(p) for p in self.pids)
            self.tries.append((before and after, answered))
            self.halt.wait(0.02)


def test_supervisord_runs_workers_and_exporter(keys, tmp_path, publisher_factory):
    """One instance: both workers serve, metrics sum, supervisorctl reaches it,
    and on SIGTERM ``/metrics`` answers until its workers are gone."""
    instance = Instance(keys.public_pem, tmp_path / "supervisord.log")
    try:
        instance.wait_started()
        instance.status()
        publisher = publisher_factory(instance.exchange)
        stream = f"{unique()}.trades"

        async def scenario() -> None:
            with MetricsWatch(instance.metrics_port, 2, own="exporter") as watch:
                clients = await instance.clients_on_both_workers(stream)
                await gauge_reaches(instance.metrics_port, len(clients))
                for n in range(3):
                    publisher.publish(f"public.{stream}", {"n": n})
                await wait_counts(clients, 3)
                assert all(c.numbers == [0, 1, 2] for c in clients)
                metrics = scrape(instance.metrics_port)
                assert check_scrape(metrics, {"0", "1"}, "exporter") == []
                parts = {
                    labels["worker"]
                    for labels, _ in samples(metrics, "rango_worker_resident_memory_bytes")
                }
                assert parts == {"0", "1", "exporter"}, parts
                await async_wait_for(lambda: watch.scrapes >= 3, 10, "3 scrapes")
            watch.check()

            # Clients that never answer the close frame hold each worker in its
            # drain for seconds: long enough to see /metrics answer meanwhile.
            silent = [RawClient(instance.port) for _ in range(20)]
            try:
                await async_wait_for(lambda: len(scraper.tries) >= 3, 10, "scrapes")
                instance.proc.send_signal(signal.SIGTERM)
                codes = await asyncio.wait_for(asyncio.gather(*(c.closed for c in clients)), 20)
                assert set(codes) == {1001}, codes
                assert await asyncio.to_thread(instance.proc.wait, 30) == 0, instance.log()
            finally:
                for client in silent:
                    client.sock.close()

        scraper = Scraper(instance.metrics_port, instance.workers)
        scraper.start()
        try:
            asyncio.run(scenario())
        finally:
            scraper.halt.set()
            scraper.join(5)
        during = [answered for workers_alive, answered in scraper.tries if workers_alive]
        assert len(during) >= 10 and all(during), (len(during), during.count(False))
        assert not [p for p in [*instance.workers, *instance.exporters] if alive(p)]
        assert queues_of(*instance.workers) == {pid: [] for pid in instance.workers}
        with pytest.raises(OSError):
            scrape(instance.metrics_port)
    finally:
        instance.stop()


def test_two_instances_side_by_side(keys, tmp_path, publisher_factory):
    """Two supervisord instances of the same conf on one host: own files, own
    control socket, own metrics; stopping one leaves the other serving."""
    first = Instance(keys.public_pem, tmp_path / "first.log")
    second = Instance(keys.public_pem, tmp_path / "second.log")
    try:
        first.wait_started()
        second.wait_started()
        for instance in (first, second):
            assert all(path.exists() for path in instance.files), instance.files
            status = instance.status()
            for pid in (*instance.workers, *instance.exporters):
                assert f"pid {pid}," in status, status  # its own programs, not the other's
        stream = f"{unique()}.trades"

        async def scenario() -> None:
            ones = await first.clients_on_both_workers(stream)
            twos = await second.clients_on_both_workers(stream)
            await gauge_reaches(first.metrics_port, len(ones))
            await gauge_reaches(second.metrics_port, len(twos))
            publisher_factory(first.exchange).publish(f"public.{stream}", {"n": 0})
            publisher_factory(second.exchange).publish(f"public.{stream}", {"n": 1})
            await wait_counts(ones, 1)
            await wait_counts(twos, 1)
            assert all(c.numbers == [0] for c in ones)
            assert all(c.numbers == [1] for c in twos)

            first.proc.send_signal(signal.SIGTERM)
            codes = await asyncio.wait_for(asyncio.gather(*(c.closed for c in ones)), 20)
            assert set(codes) == {1001}, codes
            assert await asyncio.to_thread(first.proc.wait, 30) == 0, first.log()[-3000:]
            publisher_factory(second.exchange).publish(f"public.{stream}", {"n": 2})
            await wait_counts(twos, 2)
            assert all(c.numbers == [1, 2] for c in twos)
            assert not any(c.closed.done() for c in twos)
            await asyncio.gather(*(c.close() for c in twos))

        asyncio.run(scenario())
        assert http_get(second.metrics_port, "/ready")[0] == 200
    finally:
        first.stop()
        second.stop()
