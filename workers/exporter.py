"""The metrics exporter process, for workers run by another supervisor (supervisord).

``python -m workers.exporter`` serves ``/metrics`` and ``/ready`` on
``RANGO_METRICS_HOST:RANGO_METRICS_PORT`` from ``PROMETHEUS_MULTIPROC_DIR``,
where workers started with ``RANGO_WORKER_MANAGED=1`` write their values:
the same aggregated view ``rango --workers N`` serves from its supervisor.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys

from rango.config import LOG_LEVELS, ConfigError, EnvReader


async def serve(host: str, port: int, directory: str) -> None:
    """Serve the aggregated metrics until SIGTERM or SIGINT."""
    from rango.metrics import Exporter, serve_http

    exporter = Exporter(directory, name="exporter")
    exporter.wipe_dead()
    http = await serve_http(host, port, collect=exporter.render, ready=exporter.ready)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    http.close()


def main() -> int:
    from rango.logs import setup_logging

    reader = EnvReader(os.environ)
    try:
        host = reader.str("RANGO_METRICS_HOST", "0.0.0.0")
        port = reader.port("RANGO_METRICS_PORT", 4242)
        directory = reader.str("PROMETHEUS_MULTIPROC_DIR", "")
        if not directory:
            raise ConfigError("PROMETHEUS_MULTIPROC_DIR: must name the workers' metrics directory")
        os.makedirs(directory, exist_ok=True)
    except (ConfigError, OSError) as exc:
        print(f"rango exporter: {exc}", file=sys.stderr)
        return 2
    level = LOG_LEVELS.get(reader.str("LOG_LEVEL", "info").lower(), LOG_LEVELS["info"])
    setup_logging(level, reader.str("LOG_FORMAT", "text"), "exporter")
    # The exporter's own registry is separate; it must not write multiprocess files.
    os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
    try:
        asyncio.run(serve(host, port, directory))
    except OSError as exc:
        print(f"rango exporter: RANGO_METRICS_PORT: cannot listen on {host}:{port}: "
              f"{exc.strerror}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
