"""The gateway's Prometheus endpoint (PROTOCOL §7): scraping and parsing it, reading a
sample or a counter, waiting for one, and a watcher that checks every scrape.
"""

from __future__ import annotations

import math
import re
import threading
import urllib.error
import urllib.request
from typing import Any

from support.polling import async_wait_for, wait_for

_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text as ``{'name{labels}': value}``."""
    found = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            found[name] = float(value)
    return found


def scrape(port: int) -> dict[str, float]:
    """The samples of ``/metrics`` as ``{'name{labels}': value}``; raises OSError if down
    (or answering other than 200)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return parse_metrics(resp.read().decode())


def samples(metrics: dict[str, float], name: str) -> list[tuple[dict[str, str], float]]:
    """Samples of metric ``name`` as ``(labels, value)``."""
    found = []
    for key, value in metrics.items():
        metric, _, labels = key.partition("{")
        if metric == name:
            found.append((dict(_LABEL.findall(labels)), value))
    return found


def sample(metrics: dict[str, float], name: str, **labels: str) -> float | None:
    """The value of the sample of ``name`` with exactly ``labels``; None if absent."""
    for found, value in samples(metrics, name):
        if found == labels:
            return value
    return None


def counter(gateway: Any, name: str, **labels: str) -> float:
    """A counter (or gauge) of ``gateway``'s endpoint; an absent series reads 0."""
    return sample(gateway.metrics(), name, **labels) or 0.0


def wait_counter(gateway: Any, name: str, value: float, **labels: str) -> float:
    """Until the counter reaches ``value`` (workers' counters arrive asynchronously)."""
    wait_for(
        lambda: counter(gateway, name, **labels) >= value,
        10,
        f"{name}{labels} >= {value} (now {counter(gateway, name, **labels)})",
    )
    return counter(gateway, name, **labels)


def clients_gauge(port: int) -> float | None:
    """``rango_hub_clients_count`` on the endpoint at ``port``; None if absent."""
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
