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
from typing import cast

from .config import LOG_LEVELS, ConfigError, EnvReader
from .contract import ENV_METRICS_DIR, METRICS_LISTENER, Exit, cannot_listen, config_error, run_loop

__all__ = ["main", "serve"]

PROG = "rango exporter"


async def serve(host: str, port: int, directory: str) -> None:
    """Serve the aggregated metrics until SIGTERM or SIGINT."""
    from .metrics import Exporter, serve_http

    exporter = Exporter(directory, name="exporter")
    exporter.wipe_dead()
    try:
        http = await serve_http(host, port, collect=exporter.render, ready=exporter.ready)
    except OSError as exc:
        raise cannot_listen(METRICS_LISTENER, host, port, exc) from None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    http.close()


def main() -> int:
    from .logs import setup_logging

    reader = EnvReader(os.environ)
    try:
        host = str(reader.setting("RANGO_METRICS_HOST"))
        port = cast(int, reader.setting("RANGO_METRICS_PORT"))  # the row parses a port
        directory = str(reader.setting(ENV_METRICS_DIR) or "")
        if not directory:
            raise ConfigError(f"{ENV_METRICS_DIR}: must name the workers' metrics directory")
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                f"{ENV_METRICS_DIR}: cannot create {directory}: {exc.strerror}"
            ) from None
    except ConfigError as exc:
        return config_error(exc, PROG)
    try:
        level = LOG_LEVELS[str(reader.setting("LOG_LEVEL"))]
        fmt = str(reader.setting("LOG_FORMAT"))
    except ConfigError as exc:
        return config_error(exc, PROG)
    setup_logging(level, fmt, "exporter")
    # The exporter's own registry is separate; it must not write multiprocess files.
    os.environ.pop(ENV_METRICS_DIR, None)
    try:
        run_loop(serve(host, port, directory))
    except ConfigError as exc:
        return config_error(exc, PROG)
    return Exit.OK


if __name__ == "__main__":
    sys.exit(main())
