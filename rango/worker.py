"""A Rango worker: websocket listener, hub and RabbitMQ consumer on one event loop.

Run through ``rango`` (which supervises N of them) or on its own with
``python -m workers.worker [flags]`` under another supervisor such as
supervisord. Several workers may share a port: each binds with
``SO_REUSEPORT`` and consumes its own exclusive queue. What a supervisor tells
a worker, and what the worker reports back, is :mod:`rango.contract`.

Data flows one way: the consumer hands each delivery to :meth:`Worker.on_event`,
which routes it through the hub (one frame built per event, pushed to every
subscriber's queue); the server writes the queues at the end of the loop
iteration.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from time import perf_counter

from .amqp import Consumer, State
from .config import Config, ConfigError
from .contract import (
    METRICS_LISTENER,
    WS_LISTENER,
    Exit,
    Placement,
    Status,
    StatusWriter,
    cannot_listen,
    config_error,
    name_process,
    run_loop,
)
from .deflate import Deflater
from .hub import Drop, DropReason, Hub
from .limits import raise_nofile
from .logs import RateLimited
from .metrics import Metrics, pid_file_name, register_own_collectors, serve_http, write_pid_file
from .server import Server

__all__ = ["DRAIN_TIMEOUT", "Worker", "main", "run_forked", "serve"]

log = logging.getLogger("rango.worker")

# Seconds clients get to answer the 1001 close frame when the worker stops.
DRAIN_TIMEOUT = 5.0
# How often a supervised worker checks that its supervisor is still its parent.
# A pid comparison is two cheap syscalls; 0.25 s keeps the promise of "within 1 s".
ORPHAN_CHECK = 0.25


class Worker:
    """One worker's parts, wired together: metrics, hub, server, consumer."""

    def __init__(self, config: Config, placement: Placement) -> None:
        self.config = config
        self.name = placement.label
        # Managed workers leave /metrics to their supervisor (or the exporter).
        self.serves_metrics = not placement.managed
        self.metrics_dir = placement.metrics_dir
        self.status = StatusWriter(placement.status_fd)
        self.metrics = Metrics(self.name)
        self.hub = Hub(
            config.rbac,
            max_increments=config.max_increments,
            max_subscriptions=config.max_subscriptions,
            max_event_size=config.max_event_size,
            observer=self.metrics,
            deflater=Deflater(config.compression_level) if config.compression else None,
            min_size=config.compression_min_size,
        )
        self.server = Server(config, self.hub, self.metrics)
        self.server.routing = self.metrics.routing
        self._delivered = self.server.delivered.append
        self._bound_connections()
        # Worker i starts at node i mod n, so that a host's workers spread over a cluster.
        first = int(self.name) if self.name.isdigit() else 0
        self.consumer = Consumer(
            config.amqp_urls, config.exchange, self.on_event, self.on_state, first=first
        )
        self._drops = RateLimited(log, interval=10.0)
        self._http: asyncio.AbstractServer | None = None
        self._syncer: asyncio.Task[None] | None = None

    def _bound_connections(self) -> None:
        """Raise the descriptor limit; bound the connections by what it allows."""
        fds = raise_nofile()
        room = fds.room()
        raised = f" (raised from {fds.before})" if fds.soft != fds.before else ""
        log.info("worker %s: file-descriptor limit %d%s, room for %d connections", self.name,
                 fds.soft, raised, room)
        if room < self.config.max_connections:
            log.warning(
                "worker %s: RANGO_MAX_CONNECTIONS=%d cannot be reached: the file-descriptor "
                "limit (hard %d) leaves room for %d; more are refused with 503 (raise it: "
                "ulimit -n, LimitNOFILE=, supervisord's minfds)",
                self.name, self.config.max_connections, fds.hard, room,
            )
            self.server.admission.bound_by_descriptors(room)

    def on_event(self, routing_key: str | bytes, body: bytes) -> None:
        """One delivery: route it, or count and log why it was dropped."""
        self._delivered(perf_counter())  # the routing time ends at the flush
        server = self.server
        if not server.flush_scheduled:
            server.schedule_flush()  # also for an event no one gets: its time ends too
        try:
            if routing_key.__class__ is not str:
                # pika hands over a routing key that is not UTF-8 as bytes.
                raise Drop(DropReason.BAD_ROUTING_KEY, repr(routing_key))
            self.hub.route(routing_key, body)
        except Drop as drop:
            self._dropped(drop.reason, drop.detail)
        except Exception:
            # A bug must cost one event, never the AMQP connection (pika would
            # close it, losing events in flight and every stored book).
            self._dropped(DropReason.INTERNAL_ERROR, routing_key, exc_info=True)

    def _dropped(self, reason: DropReason, detail: object, exc_info: bool = False) -> None:
        self.metrics.dropped(reason.value)
        level = logging.ERROR if reason is DropReason.INTERNAL_ERROR else logging.WARNING
        self._drops.log(level, reason.value, "dropped event %.120r: %s", detail,
                        reason.explanation, exc_info=exc_info)

    def on_state(self, state: State) -> None:
        self.metrics.amqp_connected(state is State.CONSUMING, self.consumer.address)
        if state is State.DISCONNECTED:
            # Events may be missed while away: a stored book would have a gap.
            self.hub.reset_books()
        self.status(Status.CONSUMING if state is State.CONSUMING else Status.DISCONNECTED)

    async def start(self) -> None:
        """Listen, report it, start consuming; raises ConfigError if a port is unusable."""
        config = self.config
        try:
            await self.server.start()
        except OSError as exc:
            raise cannot_listen(WS_LISTENER, config.ws_host, config.ws_port, exc) from None
        self.status(Status.LISTENING)
        if self.metrics_dir and not self.serves_metrics:
            write_pid_file(self.metrics_dir, self.name)
        self.consumer.start()
        if self.serves_metrics:
            register_own_collectors()
            try:
                self._http = await serve_http(
                    config.metrics_host, config.metrics_port,
                    ready=lambda: self.consumer.consuming,
                )  # fmt: skip
            except OSError as exc:
                raise cannot_listen(
                    METRICS_LISTENER, config.metrics_host, config.metrics_port, exc
                ) from None
        self._syncer = asyncio.create_task(self._sync_metrics())
        log.info("worker %s listening on %s:%d", self.name, config.ws_host, config.ws_port)

    async def _sync_metrics(self) -> None:
        while True:
            self.metrics.sync(self.hub)
            await asyncio.sleep(1.0)

    async def stop(self) -> None:
        """Drain the clients with 1001, delete the queue, write the last metrics."""
        log.info("worker %s draining %d connections", self.name, len(self.server.connections))
        await self.server.drain(DRAIN_TIMEOUT)
        await self.consumer.stop()
        if self._syncer is not None:
            self._syncer.cancel()
        self.metrics.sync(self.hub)
        if self._http is not None:
            self._http.close()
        log.info("worker %s stopped", self.name)


async def serve(config: Config, placement: Placement) -> None:
    """Run one worker until SIGTERM, SIGINT or its supervisor's death, then drain."""
    worker = Worker(config, placement)
    await worker.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    watch = None
    if placement.supervisor:
        watch = asyncio.create_task(_watch_supervisor(placement, stop))
    await stop.wait()
    if watch is not None:
        watch.cancel()
    await worker.stop()
    if placement.orphaned() and placement.metrics_dir:
        _forget_metrics(placement.metrics_dir)


async def _watch_supervisor(placement: Placement, stop: asyncio.Event) -> None:
    """Set ``stop`` when the supervisor is gone.

    The parent pid is polled (as gunicorn's workers do) rather than asking for
    PR_SET_PDEATHSIG: that signal fires when the forking *thread* exits, needs
    ctypes, and is lost if the supervisor died before the worker asked for it;
    a changed parent pid is certain whatever killed the supervisor.
    """
    while not placement.orphaned():
        await asyncio.sleep(ORPHAN_CHECK)
    log.warning("supervisor (pid %d) is gone: draining and exiting", placement.supervisor)
    stop.set()


def _forget_metrics(directory: str) -> None:
    """Remove this process's metrics files; the last worker out removes the directory.

    Normally the supervisor does this when it sees a worker exit; a worker that
    outlived its supervisor cleans up after itself so nothing is left in /tmp.
    """
    own = (f"_{os.getpid()}.db", pid_file_name(Placement.from_env().label, os.getpid()))
    with contextlib.suppress(OSError):
        for name in os.listdir(directory):
            if name.endswith(own):
                os.unlink(os.path.join(directory, name))
        os.rmdir(directory)  # only once empty: other workers may still be draining


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m workers.worker``: the same flags as ``rango``."""
    from .cli import config_from_args, parse_args

    args = parse_args(argv)
    try:
        config = config_from_args(args)
    except ConfigError as exc:
        return config_error(exc)
    return run_forked(config)


def run_forked(config: Config) -> int:
    """Run a worker with ``config`` in this process (a fresh interpreter, or one
    forked from the template); return its exit status."""
    from .logs import setup_logging

    placement = Placement.from_env()
    if placement.metrics_dir:
        # prometheus-client writes there from the first metric on.
        os.makedirs(placement.metrics_dir, exist_ok=True)
    name_process(f"rango-worker-{placement.label}")
    setup_logging(config.log_level_no, config.log_format, f"worker {placement.label}")
    try:
        run_loop(serve(config, placement))
    except ConfigError as exc:
        return config_error(exc)
    return Exit.OK


if __name__ == "__main__":
    sys.exit(main())
