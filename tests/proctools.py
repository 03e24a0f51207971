"""Helpers for the process tests (supervisor, supervisord): who owns a socket,
many asyncio websocket clients, a metrics watcher, RabbitMQ queue look-ups.

Everything here looks at real processes from the outside (/proc, rabbitmqctl,
HTTP); nothing imports Rango's code.
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from typing import Any

import orjson
from conftest import parse_metrics
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from wsutil import samples

# Processes.


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rpartition(b")")[2].split()[0]
    except OSError:
        return False
    return state != b"Z"


def worker_index(pid: int) -> str:
    """The ``RANGO_WORKER_INDEX`` a worker process was started with."""
    with open(f"/proc/{pid}/environ", "rb") as f:
        for item in f.read().split(b"\0"):
            if item.startswith(b"RANGO_WORKER_INDEX="):
                return item.partition(b"=")[2].decode()
    raise AssertionError(f"pid {pid} has no RANGO_WORKER_INDEX")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid``."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rpartition(b")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` (``VmRSS`` of /proc/<pid>/status)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"pid {pid} has no VmRSS")


def socket_owners(server_port: int, pids: Iterable[int]) -> dict[int, int]:
    """Client port -> pid of the process that holds the server side of that connection.

    Matches the inodes of the TCP sockets on ``server_port`` (/proc/net/tcp*)
    with the socket fds of ``pids`` (/proc/<pid>/fd).
    """
    inode_pid: dict[int, int] = {}
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                inode_pid[int(link[8:-1])] = pid
    owners: dict[int, int] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                lines = f.readlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, remote, inode = fields[1], fields[2], int(fields[9])
            remote_port = int(remote.rpartition(":")[2], 16)
            if int(local.rpartition(":")[2], 16) != server_port or not remote_port:
                continue
            if inode in inode_pid:
                owners[remote_port] = inode_pid[inode]
    return owners


# RabbitMQ.


def queues_of(pids: Iterable[int]) -> list[str]:
    """The broker's queues named after one of ``pids`` (rango.instance.<host>.<pid>.<hex>)."""
    wanted = {str(pid) for pid in pids}
    out = subprocess.run(
        ["rabbitmqctl", "list_queues", "name", "-q"],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout  # fmt: skip
    found = []
    for line in out.splitlines():
        match = re.fullmatch(r"rango\.instance\.\S+\.(\d+)\.[0-9a-f]+", line.strip())
        if match and match.group(1) in wanted:
            found.append(line.strip())
    return found


# Websocket clients.


class Client:
    """An asyncio websocket client subscribed to one stream of ``{"n": number}`` events.

    A reader task collects the numbers until the connection closes.
    """

    def __init__(self, ws: ClientConnection, stream: str) -> None:
        self.ws = ws
        self.stream = stream
        self.port: int = ws.local_address[1]
        self.numbers: list[int] = []
        self.other: list[Any] = []  # frames that are not numbered events
        self.closed: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        self._changed = asyncio.Condition()
        self.task = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        try:
            async for message in self.ws:
                frame = orjson.loads(message)
                async with self._changed:
                    if isinstance(frame, dict) and self.stream in frame:
                        self.numbers.append(frame[self.stream]["n"])
                    else:
                        self.other.append(frame)
                    self._changed.notify_all()
        except ConnectionClosed:
            pass
        finally:
            self.closed.set_result(self.ws.close_code)
            async with self._changed:
                self._changed.notify_all()

    async def wait_count(self, count: int) -> None:
        """Until ``count`` numbers arrived or the connection closed."""
        async with self._changed:
            await self._changed.wait_for(lambda: len(self.numbers) >= count or self.closed.done())

    async def close(self) -> None:
        await self.ws.close()
        await self.task


async def open_clients(url: str, count: int, stream: str) -> list[Client]:
    """``count`` clients connected at once, each past its ``subscribed`` answer."""

    async def one() -> Client:
        ws = await connect(url, open_timeout=10)
        answer = orjson.loads(await asyncio.wait_for(ws.recv(), 10))
        assert answer == {"success": {"message": "subscribed", "streams": [stream]}}, answer
        return Client(ws, stream)

    return list(await asyncio.gather(*(one() for _ in range(count))))


async def wait_counts(clients: Iterable[Client], count: int, timeout: float = 10.0) -> None:
    await asyncio.wait_for(asyncio.gather(*(c.wait_count(count) for c in clients)), timeout)


async def async_wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll ``predicate`` without blocking the loop (state that has no event to await)."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.1)


# Metrics.

def scrape(port: int) -> dict[str, float]:
    """The samples of ``/metrics`` as ``{'name{labels}': value}``; raises OSError if down."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return parse_metrics(resp.read().decode())


def clients_gauge(port: int) -> float | None:
    found = samples(scrape(port), "rango_hub_clients_count")
    return found[0][1] if found else None


async def gauge_reaches(port: int, count: int, timeout: float = 10.0) -> None:
    """Until ``rango_hub_clients_count`` is ``count``; the last value seen on failure."""
    seen: list[float | None] = []

    def check() -> bool:
        seen.append(clients_gauge(port))
        return seen[-1] == count

    try:
        await async_wait_for(check, timeout, f"rango_hub_clients_count == {count}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last values {seen[-5:]}") from None


def check_scrape(metrics: dict[str, float], indexes: set[str], own: str) -> list[str]:
    """What is wrong with one scrape (PROTOCOL §7): negative counts, unbounded labels,
    an AMQP state other than 0/1, a process total that is not the sum of its parts."""
    problems = []
    for name in ("rango_hub_clients_count", "rango_hub_subscriptions_count"):
        for labels, value in samples(metrics, name):
            if value < 0:
                problems.append(f"{name}{labels} = {value}")
    for labels, value in samples(metrics, "rango_amqp_connected"):
        if labels.get("worker") not in indexes or value not in (0.0, 1.0):
            problems.append(f"rango_amqp_connected{labels} = {value}")
    for name in ("rango_worker_resident_memory_bytes", "rango_worker_open_fds"):
        for labels, _ in samples(metrics, name):
            if set(labels) != {"worker"} or labels["worker"] not in indexes | {own}:
                problems.append(f"{name} has label {labels}")
    parts = samples(metrics, "rango_worker_resident_memory_bytes")
    total = samples(metrics, "process_resident_memory_bytes")
    if not parts or len(total) != 1:
        problems.append("process_resident_memory_bytes or its breakdown is missing")
    elif not math.isclose(total[0][1], sum(v for _, v in parts), rel_tol=1e-12):
        problems.append(f"process_resident_memory_bytes {total[0][1]} != sum of {parts}")
    return problems


class MetricsWatch(threading.Thread):
    """Scrapes ``/metrics`` continuously and records every scrape that breaks a rule.

    ``own`` is the label of the serving process's own series ("supervisor" or
    "exporter"); ``indexes`` the worker indexes that may appear.
    """

    def __init__(self, port: int, workers: int, own: str = "supervisor") -> None:
        super().__init__(daemon=True)
        self.port = port
        self.indexes = {str(i) for i in range(workers)}
        self.own = own
        self.scrapes = 0
        self.problems: list[str] = []
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                metrics = scrape(self.port)
            except (OSError, urllib.error.URLError):
                metrics = None  # starting or stopping
            if metrics is not None:
                self.scrapes += 1
                self.problems.extend(check_scrape(metrics, self.indexes, self.own))
            self._halt.wait(0.05)

    def __enter__(self) -> MetricsWatch:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._halt.set()
        self.join(10)

    def check(self) -> None:
        assert self.scrapes >= 3, f"only {self.scrapes} scrapes"
        assert not self.problems, self.problems[:10]
