"""Prometheus metrics (PROTOCOL §7) and the small HTTP endpoint that serves them.

Gauges that are sums over workers use ``multiprocess_mode="livesum"`` so the
same code works in one process and under the supervisor, where
``PROMETHEUS_MULTIPROC_DIR`` is set before this module is imported and the
supervisor aggregates the workers' files.

Per-event counters are kept as plain integers on the hub (one add on the hot
path) and copied into Prometheus once a second by :meth:`Metrics.sync`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import re
import struct
from bisect import bisect_left
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from .hub import Hub, Observer

if TYPE_CHECKING:
    from prometheus_client.multiprocess import MultiProcessCollector

__all__ = [
    "Exporter",
    "Metrics",
    "pid_file_name",
    "register_own_collectors",
    "serve_http",
    "write_pid_file",
]

log = logging.getLogger("rango.metrics")

# prometheus-client chose its value storage from this variable at import time.
_MULTIPROCESS = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))

CLIENTS = Gauge(
    "rango_hub_clients_count",
    "Websocket connections open now",
    multiprocess_mode="livesum",
)
SUBSCRIPTIONS = Gauge(
    "rango_hub_subscriptions_count",
    "Subscriptions now, by stream type and topic (private: the event name)",
    ["type", "topic"],
    multiprocess_mode="livesum",
)
EVENTS_RECEIVED = Counter("rango_events_received", "Events received from RabbitMQ")
EVENTS_DROPPED = Counter(
    "rango_events_dropped", "Events dropped, by reason (PROTOCOL §5)", ["reason"]
)
FRAMES_SENT = Counter("rango_frames_sent", "Event frames queued to websocket clients")
SLOW_CLIENTS = Counter(
    "rango_slow_clients_dropped", "Clients disconnected for not reading fast enough"
)
CONNECTIONS_REJECTED = Counter(
    "rango_connections_rejected", "Upgrade requests refused, by HTTP status", ["status"]
)
CLIENTS_CLOSED = Counter(
    "rango_clients_closed",
    "Clients closed by the server, by reason (rate_limit, keepalive_timeout)",
    ["reason"],
)
ACCEPT_FAILURES = Counter(
    "rango_accept_failures",
    "accept() calls that failed, by errno name (EMFILE, ENFILE: out of descriptors)",
    ["reason"],
)
# Measured (README, Metrics): one write() per client costs ~9 us here, so an event
# to 1,000 clients is written 5-10 ms after its delivery at 100-1,000 ev/s and
# 10-50 ms at 4,000 ev/s; a few clients take well under a millisecond.
ROUTING_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05,
    0.075, 0.1, 0.25, 0.5, 1.0, 2.5,
)  # fmt: skip
EVENT_ROUTING = Histogram(
    "rango_event_routing_seconds",
    "Seconds from an event's AMQP delivery until its frame is written to every subscriber "
    "(events with no subscriber or dropped: until the same write pass)",
    ["worker"],
    buckets=ROUTING_BUCKETS,
)
LEFT_NODE = -1.0  # rango_amqp_connected of a node the worker has left: never exported
AMQP_CONNECTED = Gauge(
    "rango_amqp_connected",
    "1 while the worker consumes from RabbitMQ, else 0; node: the broker it uses or tries",
    ["worker", "node"],
    multiprocess_mode="livemax",
)


class RoutingTimes:
    """The routing-time histogram, counted locally and copied by :meth:`Metrics.sync`.

    :meth:`observe` runs once per event on the hot path, so it is a bisect and two
    list updates; a multiprocess histogram write (a lock and mmap writes) per event
    would cost more than many events' routing.
    """

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(ROUTING_BUCKETS) + 1)  # the last: above every bound
        self.total = 0.0

    def observe_since(self, now: float, starts: list[float]) -> None:
        """Record one event per start time in ``starts``, each ending at ``now``."""
        counts = self.counts
        for start in starts:
            seconds = now - start
            counts[bisect_left(ROUTING_BUCKETS, seconds)] += 1
            self.total += seconds


class Metrics(Observer):
    """Exports a hub's counts; one per worker process."""

    def __init__(self, worker: str = "0") -> None:
        self.worker = worker
        self._events = 0
        self._frames = 0
        self._subscriptions_changed = False
        self._clients = 0
        self._clients_written = -1
        self.routing = RoutingTimes()
        self._routing = EVENT_ROUTING.labels(worker)
        self._node: str | None = None

    def clients(self, count: int) -> None:
        # Written by sync(): a multiprocess gauge write takes a lock and an
        # mmap write, a measurable share of a connection's cost at high rates.
        self._clients = count

    def subscriptions(self, kind: str, topic: str, count: int) -> None:
        if _MULTIPROCESS:
            # prometheus-client's multiprocess files never forget a label set,
            # and stream names come from clients: sync() writes the current
            # counts to a file of this worker's instead, once a second.
            self._subscriptions_changed = True
        elif count:
            SUBSCRIPTIONS.labels(kind, topic).set(count)
        else:
            # Forget a topic nobody watches: the label set stays bounded by
            # what is subscribed now.
            SUBSCRIPTIONS.remove(kind, topic)

    def amqp_connected(self, connected: bool, node: str) -> None:
        """The worker's AMQP state and node: one series per worker, of its current node."""
        if node != self._node and self._node is not None:
            if _MULTIPROCESS:
                # Multiprocess files never forget a label set: -1 marks the node
                # left, and the exporter leaves those series out. (Not NaN: the
                # livemax merge of two processes of one index, in a rolling
                # restart, compares with >, which NaN always loses or wins by order.)
                AMQP_CONNECTED.labels(self.worker, self._node).set(LEFT_NODE)
            else:
                AMQP_CONNECTED.remove(self.worker, self._node)
        self._node = node
        AMQP_CONNECTED.labels(self.worker, node).set(1 if connected else 0)

    def dropped(self, reason: str) -> None:
        EVENTS_DROPPED.labels(reason).inc()

    def slow_client(self) -> None:
        SLOW_CLIENTS.inc()

    def closed(self, reason: str) -> None:
        CLIENTS_CLOSED.labels(reason).inc()

    def rejected(self, status: int) -> None:
        CONNECTIONS_REJECTED.labels(str(status)).inc()

    def accept_failed(self, reason: str) -> None:
        ACCEPT_FAILURES.labels(reason).inc()

    def sync(self, hub: Hub) -> None:
        """Copy the hub's hot-path counters and gauges into Prometheus (about once a second)."""
        if self._clients != self._clients_written:
            CLIENTS.set(self._clients)
            self._clients_written = self._clients
        events, frames = hub.events_received, hub.frames_sent
        if events != self._events:
            EVENTS_RECEIVED.inc(events - self._events)
            self._events = events
        if frames != self._frames:
            FRAMES_SENT.inc(frames - self._frames)
            self._frames = frames
        if self._subscriptions_changed:
            self._subscriptions_changed = False
            _write_subscriptions(hub.subscription_counts())
        routing = self.routing
        if routing.total:
            # prometheus-client keeps a histogram as per-bucket (non-cumulative)
            # counts and a sum: add what was counted since the last sync.
            child = self._routing
            for bucket, count in zip(child._buckets, routing.counts, strict=True):
                if count:
                    bucket.inc(count)
            child._sum.inc(routing.total)
            routing.counts = [0] * len(routing.counts)
            routing.total = 0.0


class ScrapeStats:
    """``promhttp_metric_handler_requests_total{code}`` and ``..._in_flight``: the
    scrapes of this process's ``/metrics``, as Go's promhttp counts them (the
    scrape being served is in flight while the families are collected)."""

    def __init__(self) -> None:
        self.codes: dict[str, int] = {}
        self.in_flight = 0

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        total = CounterMetricFamily(
            "promhttp_metric_handler_requests",
            "Total number of scrapes by HTTP status code.",
            labels=["code"],
        )
        for code in ("200", "500", *sorted(set(self.codes) - {"200", "500"})):
            total.add_metric([code], self.codes.get(code, 0))
        yield total
        yield GaugeMetricFamily(
            "promhttp_metric_handler_requests_in_flight",
            "Current number of scrapes being served.",
            self.in_flight,
        )


SCRAPES = ScrapeStats()


class _AddressSpace:
    """``process_virtual_memory_max_bytes`` for a worker serving its own metrics
    (prometheus-client's process collector has the other process_* series)."""

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import GaugeMetricFamily

        limits = _proc_limits(os.getpid())
        if limits is not None:
            yield GaugeMetricFamily(
                "process_virtual_memory_max_bytes",
                "Maximum amount of virtual memory available in bytes (RLIMIT_AS)",
                limits[1],
            )


def register_own_collectors() -> None:
    """Add the scrape counts and the address-space limit to the default registry."""
    from prometheus_client import REGISTRY

    REGISTRY.register(SCRAPES)
    REGISTRY.register(_AddressSpace())


async def serve_http(
    host: str,
    port: int,
    collect: Callable[[], bytes] = generate_latest,
    ready: Callable[[], bool] = lambda: True,
) -> asyncio.AbstractServer:
    """Serve ``GET /metrics`` and ``GET /ready`` (200 ready, 503 not) on the event loop.

    A few lines of HTTP/1.0 instead of ``start_http_server``: no thread in a
    worker, and the readiness answer reads the worker's state directly.
    """

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            method, _, rest = head.decode("latin-1").partition(" ")
            path = rest.partition(" ")[0].partition("?")[0]
            if method != "GET":
                status, ctype, body = "405 Method Not Allowed", "text/plain", b"GET only\n"
            elif path == "/metrics":
                SCRAPES.in_flight += 1
                try:
                    status, ctype, body = "200 OK", CONTENT_TYPE_LATEST, collect()
                    code = "200"
                except Exception:
                    log.exception("collecting metrics failed")
                    status, ctype, body = "500 Internal Server Error", "text/plain", b"error\n"
                    code = "500"
                finally:
                    SCRAPES.in_flight -= 1
                SCRAPES.codes[code] = SCRAPES.codes.get(code, 0) + 1
            elif path in ("/ready", "/health/ready"):
                ok = ready()
                status = "200 OK" if ok else "503 Service Unavailable"
                ctype, body = "text/plain", b"ready\n" if ok else b"not ready\n"
            elif path in ("/health", "/health/live"):
                status, ctype, body = "200 OK", "text/plain", b"alive\n"
            else:
                status, ctype, body = "404 Not Found", "text/plain", b"not found\n"
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError,
                ConnectionError, UnicodeDecodeError):
            pass
        except Exception:
            log.exception("metrics endpoint failed")
        finally:
            writer.close()

    return await asyncio.start_server(handle, host, port, reuse_address=True)


# Multi-process aggregation (served by the supervisor or by the exporter process).

_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")
_PID_FILE = re.compile(r"^worker-(\d+)\.(\d+)\.pid$")
_DB_FILE = re.compile(r"_(\d+)\.db$")


def pid_file_name(worker: str, pid: int) -> str:
    """``worker-<index>.<pid>.pid``: one file per process, not per slot, so that a
    worker draining during a rolling restart stays in the ``process_*`` sums beside
    its successor until it exits."""
    return f"worker-{worker}.{pid}.pid"


def write_pid_file(directory: str, worker: str) -> None:
    """Record that this process serves worker ``worker``, for the ``process_*`` series."""
    path = os.path.join(directory, pid_file_name(worker, os.getpid()))
    with open(path, "w"):
        pass  # the name says it all; an empty file is never half-written


_RLIM_INFINITY = float(2**64 - 1)  # as Go's process collector reports "unlimited"


def _proc_limits(pid: int) -> tuple[float, float] | None:
    """``(max open files, max address space bytes)``: the soft limits of a live process."""
    found: dict[str, float] = {}
    try:
        with open(f"/proc/{pid}/limits") as f:
            for line in f:
                for name in ("Max open files", "Max address space"):
                    if line.startswith(name):
                        soft = line[len(name):].split()[0]
                        found[name] = _RLIM_INFINITY if soft == "unlimited" else float(soft)
    except OSError:
        return None
    return found.get("Max open files", 0.0), found.get("Max address space", _RLIM_INFINITY)


def _start_time(pid: int) -> float | None:
    """The process's start, seconds since the epoch (as process_start_time_seconds)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            ticks = int(f.read().rpartition(b")")[2].split()[19])
        with open("/proc/stat", "rb") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith(b"btime"))
    except (OSError, StopIteration, ValueError, IndexError):
        return None
    return boot + ticks / _CLK_TCK


def _proc_stats(pid: int) -> tuple[float, float, float, float] | None:
    """``(rss bytes, cpu seconds, open fds, virtual bytes)`` of a live process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rpartition(b")")[2].split()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None
    # Fields after "(comm)": state is [0], utime [11], stime [12], vsize [20], rss [21].
    cpu = (int(fields[11]) + int(fields[12])) / _CLK_TCK
    return int(fields[21]) * _PAGE, cpu, fds, int(fields[20])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_SUBSCRIPTIONS_FILE = re.compile(r"^subscriptions_(\d+)\.json$")


def _write_subscriptions(counts: dict[tuple[str, str], int]) -> None:
    """Replace this worker's ``subscriptions_<pid>.json`` in the multiprocess directory."""
    directory = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    path = os.path.join(directory, f"subscriptions_{os.getpid()}.json")
    data = orjson.dumps([[kind, topic, count] for (kind, topic), count in counts.items()])
    with open(path + ".tmp", "wb") as f:
        f.write(data)
    os.replace(path + ".tmp", path)


class _Subscriptions:
    """``rango_hub_subscriptions_count``: the sum of the live workers' current counts."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import GaugeMetricFamily

        totals: dict[tuple[str, str], int] = {}
        for name in os.listdir(self.directory):
            match = _SUBSCRIPTIONS_FILE.match(name)
            if match is None or not _alive(int(match.group(1))):
                continue
            try:
                with open(os.path.join(self.directory, name), "rb") as f:
                    rows = orjson.loads(f.read())
            except (OSError, orjson.JSONDecodeError):
                continue  # replaced while reading: the next scrape has it
            for kind, topic, count in rows:
                totals[(kind, topic)] = totals.get((kind, topic), 0) + count
        family = GaugeMetricFamily(
            "rango_hub_subscriptions_count", SUBSCRIPTIONS._documentation, labels=["type", "topic"]
        )
        for (kind, topic), count in totals.items():
            family.add_metric([kind, topic], count)
        yield family


class _WithoutLeftNodes(Collector):
    """The workers' multiprocess metrics without the ``rango_amqp_connected`` series
    of nodes a worker has left (:meth:`Metrics.amqp_connected` marks them ``-1``),
    and without the files a process is creating at this instant.

    prometheus-client creates a file empty, then sizes it: read in between, it
    raises struct.error (seen in a scrape while workers moved between nodes). Such
    a file holds nothing yet, so it is left for the next scrape.
    """

    def __init__(self, collector: MultiProcessCollector, directory: str) -> None:
        self.collector = collector
        self.directory = directory

    def collect(self) -> Iterator[Metric]:
        for attempt in range(3):
            files = [entry.path for entry in os.scandir(self.directory)
                     if entry.name.endswith(".db") and _sized(entry)]  # fmt: skip
            try:
                families = list(self.collector.merge(files, accumulate=True))
                break
            except (struct.error, OSError):  # a file created or removed meanwhile
                if attempt == 2:
                    raise
        for family in families:
            if family.name == "rango_amqp_connected":
                family.samples = [sample for sample in family.samples
                                  if sample.value != LEFT_NODE]
            yield family


def _sized(entry: os.DirEntry[str]) -> bool:
    """True once a multiprocess file has its header (its first 8 bytes)."""
    try:
        return entry.stat().st_size >= 8
    except OSError:
        return False


class Exporter:
    """Serves the workers' metrics from a ``PROMETHEUS_MULTIPROC_DIR``.

    On each scrape it forgets the live gauges of pids that are gone (a killed
    worker leaves the sums by the next scrape), then adds the whole server's
    ``process_*`` series (summed over this process and the live workers, with
    Go Rango's names) and a per-worker breakdown labelled by worker index.
    """

    def __init__(self, directory: str, name: str = "supervisor") -> None:
        from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector
        from prometheus_client.multiprocess import MultiProcessCollector

        self.directory = directory
        self.name = name
        self.registry = CollectorRegistry()
        self._workers_collector = _WithoutLeftNodes(
            MultiProcessCollector(None, path=directory), directory
        )
        self.registry.register(self._workers_collector)
        self.registry.register(_Subscriptions(directory))
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self.registry.register(self)
        self.registry.register(SCRAPES)
        self._dead: set[int] = set()

    def workers(self) -> dict[int, str]:
        """Worker index by live pid, from the pid files the workers write.

        An index can have two processes: the one draining in a rolling restart
        and its successor. Files of processes that are gone are removed.
        """
        found = {}
        for name in os.listdir(self.directory):
            match = _PID_FILE.match(name)
            if match is None:
                continue
            pid = int(match.group(2))
            if _alive(pid):
                found[pid] = match.group(1)
            else:
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(self.directory, name))
        return found

    def wipe_dead(self) -> None:
        """Delete every file of processes that are gone (a previous run's leftovers)."""
        for name in os.listdir(self.directory):
            match = _DB_FILE.search(name)
            if match is not None and not _alive(int(match.group(1))):
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(self.directory, name))

    def prune(self) -> None:
        """Remove the live-gauge files of processes that no longer exist."""
        from prometheus_client.multiprocess import mark_process_dead

        for name in os.listdir(self.directory):
            match = _DB_FILE.search(name) or _SUBSCRIPTIONS_FILE.match(name)
            if match is None or not name.startswith(("gauge_live", "subscriptions_")):
                continue
            pid = int(match.group(1))
            if _alive(pid):
                continue
            if name.startswith("subscriptions_"):
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(self.directory, name))
            else:
                mark_process_dead(pid, self.directory)

    def collect(self) -> Iterator[Metric]:
        """The ``process_*`` sums and the per-worker breakdown."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        rss = GaugeMetricFamily(
            "rango_worker_resident_memory_bytes", "Resident memory per process", labels=["worker"]
        )
        cpu = CounterMetricFamily(
            "rango_worker_cpu_seconds", "CPU seconds per process", labels=["worker"]
        )
        fds = GaugeMetricFamily("rango_worker_open_fds", "Open fds per process", labels=["worker"])
        max_fds = GaugeMetricFamily(
            "rango_worker_max_fds", "Soft limit of open fds per process", labels=["worker"]
        )
        totals = [0.0, 0.0, 0.0, 0.0]
        lowest = [math.inf, math.inf]  # max fds, max address space
        # One sample per worker index: a draining process and its successor add up
        # (their usage) or give the lower (their fd limit).
        per_worker: dict[str, list[float]] = {}
        per_worker_fds: dict[str, float] = {}
        for pid, worker in {os.getpid(): self.name, **self.workers()}.items():
            stats = _proc_stats(pid)
            if stats is None:
                continue
            mine = per_worker.setdefault(worker, [0.0, 0.0, 0.0, 0.0])
            mine[:] = [a + b for a, b in zip(mine, stats, strict=True)]
            totals = [a + b for a, b in zip(totals, stats, strict=True)]
            limits = _proc_limits(pid)
            if limits is not None:
                per_worker_fds[worker] = min(per_worker_fds.get(worker, math.inf), limits[0])
                lowest = [min(a, b) for a, b in zip(lowest, limits, strict=True)]
        for worker, (resident, seconds, open_fds, _virtual) in per_worker.items():
            rss.add_metric([worker], resident)
            cpu.add_metric([worker], seconds)
            fds.add_metric([worker], open_fds)
        for worker, limit in per_worker_fds.items():
            max_fds.add_metric([worker], limit)
        yield GaugeMetricFamily(
            "process_resident_memory_bytes", "Resident memory of all Rango processes", totals[0]
        )
        yield CounterMetricFamily(
            "process_cpu_seconds", "CPU seconds of all Rango processes", totals[1]
        )
        yield GaugeMetricFamily("process_open_fds", "Open fds of all Rango processes", totals[2])
        yield GaugeMetricFamily(
            "process_virtual_memory_bytes", "Virtual memory of all Rango processes", totals[3]
        )
        # Go's names, one value for the whole server: the lowest limit any of its
        # processes has (the one that runs out first); per process: rango_worker_max_fds.
        if lowest[0] != math.inf:
            yield GaugeMetricFamily(
                "process_max_fds", "Lowest soft limit of open fds of the Rango processes",
                lowest[0],
            )
            yield GaugeMetricFamily(
                "process_virtual_memory_max_bytes",
                "Lowest soft limit of virtual memory of the Rango processes (RLIMIT_AS)",
                lowest[1],
            )
        started = _start_time(os.getpid())
        if started is not None:
            yield GaugeMetricFamily(
                "process_start_time_seconds",
                f"Start time of the {self.name} since unix epoch in seconds",
                started,
            )
        yield rss
        yield cpu
        yield fds
        yield max_fds

    def render(self) -> bytes:
        self.prune()
        return generate_latest(self.registry)

    def ready(self) -> bool:
        """True when every live worker consumes from RabbitMQ (and there is one)."""
        workers = set(self.workers().values())
        if not workers:
            return False
        self.prune()
        states: dict[str | None, float] = {}
        for family in self._workers_collector.collect():
            if family.name == "rango_amqp_connected":
                for sample in family.samples:
                    worker = sample.labels.get("worker")
                    states[worker] = max(states.get(worker, 0.0), sample.value)
        return all(states.get(worker) == 1 for worker in workers)
