"""Debian's real nginx in front of a gateway, with the repository's own configuration
(``deploy/nginx/rango.conf``), and the two small services around it: the session check
that nginx asks (:class:`SessionCheck`) and an upstream that only records what nginx
forwards (:class:`Recorder`); and the slow-reader scenario (:func:`slow_readers`), which
the test asserts on and ``python -m support.nginx`` measures for other settings.

The tests write a few lines around an ``include`` of the repository's file (the
``upstream`` blocks it names, a ``server`` on a free port serving ``examples/``, logs
and temporary files in the test's directory) so that what runs is exactly what the
README tells an operator to include. Where nginx is not installed the tests are
skipped with the reason, as the Chromium tests are.
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.server
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from support import REPO
from support.broker import Publisher
from support.gateway import Rango, accepts, free_port
from support.polling import wait_for
from support.procfs import child_pids, rss_bytes
from support.wire import RawClient

CONF = REPO / "deploy" / "nginx" / "rango.conf"
PREFIX = "/api/v2/ranger"  # where rango.conf puts Rango on the frontend's origin


def nginx_path() -> str:
    """Debian's nginx, or skip the test."""
    for candidate in (shutil.which("nginx"), "/usr/sbin/nginx"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    pytest.skip("nginx is not installed: scripts/setup installs Debian's nginx with "
                "apt-get (apt-get was not available or failed)")


def wrapper(
    directory: Path, port: int, rango_port: int, session_port: int, static: Path, include: Path
) -> str:
    """The nginx.conf the tests run: ``include`` inside a server on 127.0.0.1:``port``,
    its upstreams on the given ports, and nothing outside ``directory`` written to."""
    temp = {name: directory / name for name in ("body", "proxy", "fastcgi", "uwsgi", "scgi")}
    for path in temp.values():
        path.mkdir(exist_ok=True)
    # As root (CI), nginx's workers would run as nobody, who may not reach a checkout
    # under a private home directory, nor the test's own 0700 temporary directory.
    user = "user root;" if os.geteuid() == 0 else ""
    return f"""
{user}
worker_processes 1;
pid {directory}/nginx.pid;
error_log {directory}/error.log info;
events {{ worker_connections 1024; }}
http {{
    log_format rango '$request_method $request_uri $status $http_user_agent';
    access_log {directory}/access.log rango;
    client_body_temp_path {temp["body"]};
    proxy_temp_path {temp["proxy"]};
    fastcgi_temp_path {temp["fastcgi"]};
    uwsgi_temp_path {temp["uwsgi"]};
    scgi_temp_path {temp["scgi"]};
    upstream rango {{ server 127.0.0.1:{rango_port}; }}
    upstream rango_session_check {{ server 127.0.0.1:{session_port}; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{ root {static}; }}
        include {include};
    }}
}}
"""


class Nginx:
    """``nginx -p DIR -c DIR/nginx.conf -g 'daemon off;'`` as a child process: master and
    one worker, on a free port, until :meth:`stop`."""

    def __init__(
        self,
        directory: Path,
        rango_port: int,
        session_port: int,
        static: Path = REPO / "examples",
        include: Path = CONF,
    ) -> None:
        self.binary = nginx_path()
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.conf = directory / "nginx.conf"
        self.conf.write_text(
            wrapper(directory, self.port, rango_port, session_port, static, include)
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Nginx:
        self._out = open(self.directory / "stderr.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [self.binary, "-p", str(self.directory), "-e", str(self.directory / "error.log"),
             "-c", str(self.conf), "-g", "daemon off;"],
            stdout=self._out, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            wait_for(lambda: self.proc.poll() is not None or  # type: ignore[union-attr]
                     (accepts(self.port) and self.worker_pids()), 10, "nginx listening")
        except AssertionError as exc:
            self.stop()
            raise AssertionError(f"{exc}\n{self.log()}") from None
        if self.proc.poll() is not None:
            raise AssertionError(f"nginx exited with {self.proc.returncode}:\n{self.log()}")
        return self

    def url(self, path: str) -> str:
        """The websocket URL of Rango's ``path`` (``/private``) through nginx."""
        return f"ws://127.0.0.1:{self.port}{PREFIX}{path}"

    @property
    def base(self) -> str:
        """The frontend's origin: the pages and the websocket behind one host."""
        return f"http://127.0.0.1:{self.port}"

    def worker_pids(self) -> list[int]:
        assert self.proc is not None
        return child_pids(self.proc.pid)

    def rss(self) -> int:
        """Resident bytes of the master and its workers, now."""
        assert self.proc is not None
        return sum(rss_bytes(pid, 0) for pid in [self.proc.pid, *self.worker_pids()])

    def access_log(self) -> list[str]:
        path = self.directory / "access.log"
        return path.read_text().splitlines() if path.exists() else []

    def log(self) -> str:
        parts = []
        for name in ("stderr.log", "error.log"):
            path = self.directory / name
            if path.exists():
                parts.append(f"--- nginx {name} ---\n{path.read_text(errors='replace')[-4000:]}")
        return "\n".join(parts)

    def stop(self) -> None:
        """SIGQUIT (graceful), then SIGKILL after 10 s; the worker goes with the master."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            workers = self.worker_pids()
            self.proc.send_signal(signal.SIGQUIT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                for pid in [self.proc.pid, *workers]:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                self.proc.wait()
        self._out.close()

    def __enter__(self) -> Nginx:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _Server:
    """A threading HTTP server on a free port of 127.0.0.1, stopped by :meth:`close`."""

    def __init__(self, handler: type[http.server.BaseHTTPRequestHandler]) -> None:
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.port: int = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SessionCheck(_Server):
    """The exchange's session check, as nginx's ``auth_request`` asks it: ``GET /session``
    with the client's cookies; 200 with ``Authorization: Bearer <JWT>`` for a known
    ``session=<id>``, 401 otherwise. ``asked`` keeps the headers of every request."""

    def __init__(self, sessions: dict[str, str]) -> None:
        self.sessions = sessions
        self.asked: list[dict[str, str]] = []
        check = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                check.asked.append({"path": self.path, **dict(self.headers.items())})
                cookies = dict(
                    part.strip().split("=", 1)
                    for part in self.headers.get("Cookie", "").split(";") if "=" in part
                )  # fmt: skip
                token = sessions.get(cookies.get("session", ""))
                if self.path != "/session":
                    token = None
                self.send_response(200 if token else 401)
                if token:
                    self.send_header("Authorization", f"Bearer {token}")
                self.send_header("Content-Length", "0")
                self.end_headers()

        super().__init__(Handler)


class Recorder:
    """An upstream that records the head of each request nginx forwards, answers 400
    and closes: what reaches Rango, header by header."""

    def __init__(self) -> None:
        self.heads: list[tuple[str, list[tuple[str, str]]]] = []
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port: int = self.sock.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:  # closed
                return
            with conn:
                conn.settimeout(5)
                data = b""
                with contextlib.suppress(OSError):
                    while b"\r\n\r\n" not in data and (chunk := conn.recv(65536)):
                        data += chunk
                head = data.partition(b"\r\n\r\n")[0].decode("latin-1")
                request_line, *lines = head.split("\r\n")
                fields = [line.partition(":") for line in lines]
                self.heads.append((request_line, [(n.strip(), v.strip()) for n, _, v in fields]))
                with contextlib.suppress(OSError):
                    conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n"
                                 b"Connection: close\r\n\r\n")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the thread's accept()
        self.sock.close()
        self._thread.join(5)


def with_directives(conf: str, directives: str) -> str:
    """``conf`` (rango.conf's text) with ``directives`` added to each websocket location,
    after its ``proxy_http_version``, each directive named there replacing rango.conf's
    own: the variants the slow-reader measurement compares."""
    websockets, marker, session = conf.partition("location = /_rango_session")
    for name in re.findall(r"(\w+)\s[^;]*;", directives):
        websockets = re.sub(rf"(?m)^(\s*)({name}\s[^;]*;)", r"\1# \2", websockets)
    websockets = websockets.replace("proxy_http_version 1.1;",
                                    f"proxy_http_version 1.1; {directives}")
    return websockets + marker + session


@dataclasses.dataclass
class SlowReaders:
    """What :func:`slow_readers` saw: events published, seconds until every slow client
    was dropped, nginx's resident bytes (before the clients, once connected, at most
    while publishing) and the clients themselves (still to be read and closed)."""

    clients: list[RawClient]
    sent: int
    seconds: float
    rss_before: int
    rss_connected: int
    rss_peak: int

    def as_dict(self) -> dict[str, Any]:
        fields = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        fields["clients"] = len(self.clients)
        return fields


def slow_readers(
    rango: Rango, nginx: Nginx, publisher: Publisher, stream: str, count: int,
    *, limit: int = 50_000, before: Callable[[], None] = lambda: None,
) -> SlowReaders:  # fmt: skip
    """``count`` clients through nginx subscribe to ``stream`` (a receive buffer of 4 KiB)
    and never read; events of 2,000 bytes are published on it, 100 at a time, until
    Rango has dropped them all (``rango_slow_clients_dropped_total``), sampling nginx's
    memory after each hundred. ``before`` runs once they are connected. An
    AssertionError if ``limit`` events were not enough."""
    metric = "rango_slow_clients_dropped_total"
    dropped_before = rango.metrics().get(metric, 0.0)
    rss_before = nginx.rss()
    clients = [RawClient(nginx.port, f"{PREFIX}/public?stream={stream}", rcvbuf=4096).upgraded()
               for _ in range(count)]
    before()
    rss_connected = rss_peak = nginx.rss()
    pad = "x" * 2000
    sent = 0
    started = time.monotonic()
    while rango.metrics().get(metric, 0.0) < dropped_before + count:
        assert sent < limit, (f"slow clients still connected after {sent} events\n"
                              f"{rango.log()[-4000:]}\n{nginx.log()}")
        for _ in range(100):
            publisher.publish(f"public.{stream}", {"seq": sent, "pad": pad})
            sent += 1
        rss_peak = max(rss_peak, nginx.rss())
    seconds = round(time.monotonic() - started, 2)
    return SlowReaders(clients, sent, seconds, rss_before, rss_connected, rss_peak)


def main() -> None:
    """``PYTHONPATH=tests .venv/bin/python -m support.nginx [--clients N] [--pending B]
    [--directives '...']``: the slow-reader scenario of tests/e2e/test_nginx.py with a
    variant of rango.conf; one JSON line (README, "Private streams from a browser")."""
    import argparse
    import tempfile

    from support.broker import unique
    from support.tokens import KeyPair

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--pending", help="RANGO_MAX_PENDING_BYTES (default: Rango's)")
    parser.add_argument("--directives", default="", help="added to each websocket location")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as name:
        directory = Path(name)
        conf = directory / "rango.conf"
        conf.write_text(with_directives(CONF.read_text(), args.directives))
        env = {"LOG_LEVEL": "info"}
        if args.pending:
            env["RANGO_MAX_PENDING_BYTES"] = args.pending
        with ExitStack() as stack:
            rango = stack.enter_context(Rango(KeyPair(directory), directory, env=env))
            check = stack.enter_context(SessionCheck({}))
            proxy = stack.enter_context(Nginx(directory / "nginx", rango.port, check.port,
                                              include=conf))
            publisher = Publisher(rango.exchange)
            stack.callback(publisher.close)
            seen = slow_readers(rango, proxy, publisher, f"{unique()}.trades", args.clients)
            closed = sum(client.read_until_closed(10) for client in seen.clients)
            for client in seen.clients:
                client.close(reset=True)
            print(json.dumps({"directives": args.directives, "pending": args.pending,
                              **seen.as_dict(), "closed": closed}))


if __name__ == "__main__":
    main()
