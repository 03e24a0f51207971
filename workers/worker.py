"""A Rango worker process: websocket listener, hub and RabbitMQ consumer on one loop.

Run it through ``rango`` (which supervises N of them) or directly with
``python -m workers.worker [flags]`` under another supervisor such as
supervisord. Several workers may run on one port: each binds with
``SO_REUSEPORT`` and consumes its own exclusive queue.

Environment set by a supervisor:

``RANGO_WORKER_INDEX``
    The worker's index, used as the ``worker`` label of per-worker metrics.
``RANGO_WORKER_MANAGED=1``
    Metrics are served by the supervisor (or the exporter process) from
    ``PROMETHEUS_MULTIPROC_DIR``; the worker does not listen on the metrics
    port itself and writes ``worker-<index>.pid`` there.
``RANGO_STATUS_FD``
    A pipe on which the worker reports ``listening``, ``consuming`` and
    ``disconnected``, one word per line, so the supervisor knows when a new
    worker can take over from an old one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable

from rango.config import Config, ConfigError

log = logging.getLogger("rango.worker")

# Seconds clients get to answer the 1001 close frame when the worker stops.
DRAIN_TIMEOUT = 5.0

_DROP_REASONS = {
    "bad_routing_key": "routing key is not scope.id.event, public.event or global.event",
    "bad_body": "body is not JSON",
    "too_large": "body larger than RANGO_MAX_EVENT_SIZE",
    "no_snapshot": "order-book increment before any snapshot",
    "increments_full": "stored increments reached RANGO_MAX_INCREMENTS; book discarded "
    "until the next snapshot",
}


async def serve(config: Config, *, worker: str = "0", serve_metrics: bool = True) -> None:
    """Run one worker until SIGTERM or SIGINT, then drain and return."""
    from rango.amqp import Consumer, State
    from rango.hub import Drop, Hub
    from rango.logs import RateLimited
    from rango.metrics import Metrics, serve_http, write_pid_file
    from rango.server import Server

    loop = asyncio.get_running_loop()
    metrics = Metrics(worker)
    hub = Hub(
        config.rbac,
        max_increments=config.max_increments,
        max_subscriptions=config.max_subscriptions,
        max_event_size=config.max_event_size,
        observer=metrics,
    )
    server = Server(config, hub, metrics)
    drops = RateLimited(log, interval=10.0)
    route = hub.route

    def on_event(routing_key: str | bytes, body: bytes) -> None:
        try:
            if routing_key.__class__ is not str:
                # pika hands over a routing key that is not UTF-8 as bytes.
                raise Drop("bad_routing_key", repr(routing_key))
            route(routing_key, body)  # type: ignore[arg-type]
        except Drop as drop:
            metrics.dropped(drop.reason)
            drops.log(
                logging.WARNING, drop.reason, "dropped event %.120r: %s",
                drop.detail, _DROP_REASONS.get(drop.reason, drop.reason),
            )
        except Exception:
            # A bug must cost one event, never the AMQP connection (pika would
            # close it, losing events in flight and every stored book).
            metrics.dropped("internal_error")
            drops.log(logging.ERROR, "internal_error", "failed to route event %.120r",
                      routing_key, exc_info=True)

    status = _status_reporter()

    def on_state(state: State) -> None:
        metrics.amqp_connected(state is State.CONSUMING)
        if state is State.DISCONNECTED:
            # Events may be missed while away: a stored book would have a gap.
            hub.reset_books()
        status("consuming" if state is State.CONSUMING else "disconnected")

    consumer = Consumer(config.amqp_url, config.exchange, on_event, on_state)

    try:
        await server.start()
    except OSError as exc:
        # Name the settings (uvloop's strerror repeats the address: use errno's text).
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise ConfigError(
            f"RANGER_HOST/RANGER_PORT (or --ws-addr): cannot listen on "
            f"{config.ws_host}:{config.ws_port}: {reason}"
        ) from None
    status("listening")
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory and not serve_metrics:
        write_pid_file(directory, worker)
    consumer.start()
    http = None
    if serve_metrics:
        try:
            http = await serve_http(
                config.metrics_host, config.metrics_port, ready=lambda: consumer.consuming
            )
        except OSError as exc:
            raise ConfigError(
                f"RANGO_METRICS_PORT: cannot listen on "
                f"{config.metrics_host}:{config.metrics_port}: {exc.strerror}"
            ) from None
    log.info("worker %s listening on %s:%d", worker, config.ws_host, config.ws_port)

    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async def sync_metrics() -> None:
        while True:
            metrics.sync(hub)
            await asyncio.sleep(1.0)

    syncer = asyncio.create_task(sync_metrics())
    await stop.wait()

    log.info("worker %s draining %d connections", worker, len(server.connections))
    await server.drain(DRAIN_TIMEOUT)
    await consumer.stop()
    syncer.cancel()
    metrics.sync(hub)
    if http is not None:
        http.close()
    log.info("worker %s stopped", worker)


def _status_reporter() -> Callable[[str], None]:
    """A function that writes a status word to ``RANGO_STATUS_FD`` (or does nothing)."""
    fd = int(os.environ.get("RANGO_STATUS_FD", "-1") or -1)
    if fd < 0:
        return lambda word: None

    def report(word: str) -> None:
        with contextlib.suppress(OSError):  # the supervisor is gone: nothing to tell
            os.write(fd, word.encode() + b"\n")

    return report


def run(config: Config, *, worker: str = "0", serve_metrics: bool = True) -> int:
    """Run a worker on uvloop; return the process exit status."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        uvloop = None
    try:
        if uvloop is not None:
            uvloop.run(serve(config, worker=worker, serve_metrics=serve_metrics))
        else:
            asyncio.run(serve(config, worker=worker, serve_metrics=serve_metrics))
    except ConfigError as exc:
        print(f"rango: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m workers.worker``: the same flags as ``rango``."""
    from rango.cli import config_from_args, parse_args
    from rango.logs import setup_logging

    args = parse_args(argv)
    try:
        config = config_from_args(args)
    except ConfigError as exc:
        print(f"rango: {exc}", file=sys.stderr)
        return 2
    worker = os.environ.get("RANGO_WORKER_INDEX", "0")
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory:
        # prometheus-client writes there from the first metric on.
        os.makedirs(directory, exist_ok=True)
    setup_logging(config.log_level_no, config.log_format, f"worker {worker}")
    managed = os.environ.get("RANGO_WORKER_MANAGED") == "1"
    return run(config, worker=worker, serve_metrics=not managed)


if __name__ == "__main__":
    sys.exit(main())
