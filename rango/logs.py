"""Logging set-up (``LOG_LEVEL``, ``LOG_FORMAT``) and rate-limited warnings."""

from __future__ import annotations

import logging
import os
import sys
import time

import orjson

__all__ = ["RateLimited", "setup_logging"]


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, pid, message."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()


def setup_logging(level: int, fmt: str = "text", name: str = "") -> None:
    """Send logs to stderr at ``level``; ``name`` tags each line (e.g. ``worker 2``)."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        formatter: logging.Formatter = JsonFormatter()
        formatter.converter = time.gmtime
    else:
        tag = f"[{name}] " if name else ""
        formatter = logging.Formatter(
            f"%(asctime)s %(levelname)s {tag}%(name)s: %(message)s", "%Y-%m-%d %H:%M:%S"
        )
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # websockets and pika log every connection at info; Rango logs what matters.
    logging.getLogger("websockets").setLevel(max(level, logging.WARNING))
    logging.getLogger("pika").setLevel(max(level, logging.CRITICAL))
    os.environ.setdefault("PYTHONUNBUFFERED", "1")


class RateLimited:
    """Log at most one line per ``interval`` seconds per key, counting the rest.

    Under a flood of bad events a worker must not write a line per event; the
    next line that gets through says how many were suppressed.
    """

    def __init__(self, logger: logging.Logger, interval: float = 10.0) -> None:
        self.logger = logger
        self.interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def log(self, level: int, key: str, msg: str, *args: object, exc_info: bool = False) -> None:
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return
        if len(self._last) > 1000:  # keys come from events: keep the table bounded
            self._last.clear()
        self._last[key] = now
        suppressed = self._suppressed.pop(key, 0)
        if suppressed:
            msg += f" (and {suppressed} more in the last {self.interval:g}s)"
        self.logger.log(level, msg, *args, exc_info=exc_info)
