"""Gateway processes on free ports: :class:`Gateway` starts a command with the gateway's
environment and a log file, waits for ``/ready`` and stops the whole process tree;
:class:`Rango` is the tests' ``python -m rango.cli`` with its own exchange (bench/run.py
builds its server on :class:`Gateway` too).

Every gateway listens on 127.0.0.1 on ports nobody else uses, and inherits no
``RANGO_*`` or ``JWT_*`` variable from the caller's environment.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Self

from websockets.sync.client import ClientConnection, connect

from support import AMQP_URL, REPO
from support.metrics import scrape
from support.polling import wait_for
from support.procfs import child_pids, comm, descendants
from support.tokens import KeyPair

RANGO_COMMAND = [sys.executable, "-m", "rango.cli"]


def is_template(pid: int) -> bool:
    """A worker template: its name (templates and forked workers keep the supervisor's
    command line and name themselves, rango.contract.name_process)."""
    return comm(pid) == "rango-template"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def accepts(port: int) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:``port``."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def http_get(port: int, path: str) -> tuple[int, str]:
    """``GET http://127.0.0.1:<port><path>``: the status and body, whatever the status;
    OSError if nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def gateway_env(port: int, metrics_port: int, **extra: str) -> dict[str, str]:
    """The environment for a gateway on 127.0.0.1:``port`` with metrics on
    ``metrics_port``: the caller's, less its ``RANGO_*`` and ``JWT_*``, plus ``extra``."""
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith(("RANGO_", "JWT_"))},
        "RANGER_HOST": "127.0.0.1",
        "RANGER_PORT": str(port),
        "RANGO_METRICS_HOST": "127.0.0.1",
        "RANGO_METRICS_PORT": str(metrics_port),
        "PYTHONUNBUFFERED": "1",
        **extra,
    }


def rango_args(pub_key: Path | str, exchange: str, amqp_url: str = AMQP_URL) -> list[str]:
    """The flags every gateway started here gets: its key, its exchange, the broker."""
    return ["--pubKey", str(pub_key), "--exchange", exchange, "--amqp-addr", amqp_url]


class Gateway:
    """A gateway process tree on two free ports (websocket, metrics), its output in
    ``<log_dir>/<name>-<port>.log``. Subclasses say what to run (:meth:`argv`)."""

    def __init__(self, log_dir: Path, name: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.metrics_port = free_port()
        self.name = name
        self.env = gateway_env(self.port, self.metrics_port, **(env or {}))
        self.log_path = log_dir / f"{name}-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def argv(self) -> list[str]:
        raise NotImplementedError

    def start(self, wait: bool = True, timeout: float = 20.0, **popen: Any) -> Self:
        """Start the process (``popen``: more arguments for :class:`subprocess.Popen`);
        with ``wait``, until :meth:`ready`. Returns ``self``."""
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            self.argv(), cwd=REPO, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
            **popen,
        )  # fmt: skip
        if wait:
            self.wait_ready(timeout)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def worker_pids(self) -> list[int]:
        """Pids of the worker processes (children of the supervisor, forked ones
        re-parented there), oldest first; not the worker template."""
        return [pid for pid in child_pids(self.pid) if not is_template(pid)]

    def template_pids(self) -> list[int]:
        """Pids of the supervisor's worker templates (one, two while a SIGHUP renews it)."""
        return [pid for pid in child_pids(self.pid) if is_template(pid)]

    def url(self, path: str = "/public", query: str = "") -> str:
        return f"ws://127.0.0.1:{self.port}{path}" + (f"?{query}" if query else "")

    def http(self, path: str) -> tuple[int, str]:
        """``GET`` on the metrics port: status and body."""
        return http_get(self.metrics_port, path)

    def ready_status(self) -> int | None:
        """The HTTP status of ``/ready``; None if the metrics port is not listening yet."""
        try:
            return self.http("/ready")[0]
        except OSError:
            return None

    def ready(self) -> bool:
        return self.ready_status() == 200

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Wait until the websocket port accepts and the consumer is bound (``/ready``)."""
        wait_for(lambda: self.exited() or self.ready(), timeout, f"{self.name} ready")
        if self.exited():
            raise AssertionError(f"{self.name} exited early:\n{self.log()}")

    def exited(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def metrics(self) -> dict[str, float]:
        """Metric samples as ``{'name{labels}': value}``."""
        return scrape(self.metrics_port)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def send_signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
        """Send ``sig`` (if still running) and wait; after ``timeout``, SIGKILL the whole
        tree. The exit status (None if never started)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                for pid in reversed(descendants(self.pid)):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


class Rango(Gateway):
    """``python -m rango.cli`` (``command``) with ``keys``' public key, its own exchange
    (``rango.test.<random>``) unless given one, one worker and debug logs unless told."""

    def __init__(
        self,
        keys: KeyPair,
        log_dir: Path,
        env: dict[str, str] | None = None,
        args: list[str] | None = None,
        exchange: str | None = None,
    ) -> None:
        defaults = {"LOG_LEVEL": "debug", "RANGO_WORKERS": "1"}
        super().__init__(log_dir, "rango", {**defaults, **(env or {})})
        self.exchange = exchange or f"rango.test.{secrets.token_hex(4)}"
        self.command = RANGO_COMMAND
        self.args = [*rango_args(keys.public_path, self.exchange), *(args or [])]

    def argv(self) -> list[str]:
        return [*self.command, *self.args]

    def __enter__(self) -> Rango:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def connect(self, path: str = "/public", query: str = "", **kwargs: Any) -> ClientConnection:
        """A websocket client; the first frame (the ``subscribed`` answer) is left unread."""
        return connect(self.url(path, query), open_timeout=5, **kwargs)
