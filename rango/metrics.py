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
import logging
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, generate_latest

from .hub import Hub, Observer

__all__ = ["Metrics", "serve_http"]

log = logging.getLogger("rango.metrics")

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
AMQP_CONNECTED = Gauge(
    "rango_amqp_connected",
    "1 while the worker consumes from RabbitMQ, else 0",
    ["worker"],
    multiprocess_mode="livemax",
)


class Metrics(Observer):
    """Exports a hub's counts; one per worker process."""

    def __init__(self, worker: str = "0") -> None:
        self.worker = worker
        self._events = 0
        self._frames = 0
        AMQP_CONNECTED.labels(worker).set(0)

    def clients(self, count: int) -> None:
        CLIENTS.set(count)

    def subscriptions(self, kind: str, topic: str, count: int) -> None:
        if count:
            SUBSCRIPTIONS.labels(kind, topic).set(count)
        else:
            # Stream names come from clients: forget a topic nobody watches so
            # the label set stays bounded by what is subscribed now.
            SUBSCRIPTIONS.labels(kind, topic).set(0)
            SUBSCRIPTIONS.remove(kind, topic)

    def amqp_connected(self, connected: bool) -> None:
        AMQP_CONNECTED.labels(self.worker).set(1 if connected else 0)

    def dropped(self, reason: str) -> None:
        EVENTS_DROPPED.labels(reason).inc()

    def slow_client(self) -> None:
        SLOW_CLIENTS.inc()

    def rejected(self, status: int) -> None:
        CONNECTIONS_REJECTED.labels(str(status)).inc()

    def sync(self, hub: Hub) -> None:
        """Copy the hub's hot-path counters into Prometheus."""
        events, frames = hub.events_received, hub.frames_sent
        if events != self._events:
            EVENTS_RECEIVED.inc(events - self._events)
            self._events = events
        if frames != self._frames:
            FRAMES_SENT.inc(frames - self._frames)
            self._frames = frames


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
                status, ctype, body = "200 OK", CONTENT_TYPE_LATEST, collect()
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
