"""Shared fixtures: a dev key pair, real Rango processes, a real RabbitMQ publisher.

Every Rango started here listens on free ports and consumes its own exchange
(``rango.test.<random>``), so tests never see each other's events.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import orjson
import pika
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from websockets.sync.client import ClientConnection, connect

REPO = Path(__file__).resolve().parents[1]
AMQP_URL = os.environ.get("RANGO_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
UID = "IDABC0000001"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class KeyPair:
    """An RSA key pair on disk, and a way to mint tokens with it."""

    def __init__(self, directory: Path) -> None:
        self.private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.private_pem = self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        self.public_pem = self.private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.private_path = directory / "rsa-key"
        self.public_path = directory / "rsa-key.pub"
        self.private_path.write_bytes(self.private_pem)
        self.public_path.write_bytes(self.public_pem)

    def token(self, uid: str | None = UID, role: str = "member", **claims: Any) -> str:
        """A token as barong issues it (PROTOCOL §8); ``claims`` override or add."""
        now = int(time.time())
        payload: dict[str, Any] = {
            "iat": now, "exp": now + 3600, "sub": "session", "iss": "barong",
            "aud": ["peatio", "barong"], "jti": secrets.token_hex(12).upper(),
            "uid": uid, "email": "user@example.com", "role": role, "level": 4,
            "state": "active",
        }  # fmt: skip
        if uid is None:
            del payload["uid"]
        payload.update(claims)
        payload = {k: v for k, v in payload.items() if v is not None}
        return jwt.encode(payload, self.private_key, algorithm="RS256")  # no PEM parse per token

    def bearer(self, **kwargs: Any) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(**kwargs)}"}


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> KeyPair:
    return KeyPair(tmp_path_factory.mktemp("keys"))


class Rango:
    """A Rango process (``python -m rango.cli``) on free ports with its own exchange."""

    def __init__(
        self,
        keys: KeyPair,
        log_dir: Path,
        env: dict[str, str] | None = None,
        args: list[str] | None = None,
        exchange: str | None = None,
    ) -> None:
        self.port = free_port()
        self.metrics_port = free_port()
        self.exchange = exchange or f"rango.test.{secrets.token_hex(4)}"
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("RANGO_", "JWT_"))},
            "RANGER_HOST": "127.0.0.1",
            "RANGER_PORT": str(self.port),
            "RANGO_METRICS_HOST": "127.0.0.1",
            "RANGO_METRICS_PORT": str(self.metrics_port),
            "LOG_LEVEL": "debug",
            "RANGO_WORKERS": "1",
            "PYTHONUNBUFFERED": "1",
            **(env or {}),
        }
        self.args = [
            "--pubKey", str(keys.public_path),
            "--exchange", self.exchange,
            "--amqp-addr", AMQP_URL,
            *(args or []),
        ]  # fmt: skip
        self.log_path = log_dir / f"rango-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait: bool = True) -> Rango:
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "rango.cli", *self.args],
            cwd=REPO,
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        if wait:
            self.wait_ready()
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def worker_pids(self) -> list[int]:
        """Pids of the worker processes (children of the supervisor), oldest first."""
        return child_pids(self.pid)

    def url(self, path: str = "/public", query: str = "") -> str:
        return f"ws://127.0.0.1:{self.port}{path}" + (f"?{query}" if query else "")

    def http(self, path: str) -> tuple[int, str]:
        url = f"http://127.0.0.1:{self.metrics_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def ready(self) -> bool:
        try:
            return self.http("/ready")[0] == 200
        except OSError:
            return False

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Wait until the websocket port accepts and the consumer is bound."""
        wait_for(lambda: self.exited() or self.ready(), timeout, "rango ready")
        if self.exited():
            raise AssertionError(f"rango exited early:\n{self.log()}")

    def exited(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def metrics(self) -> dict[str, float]:
        """Metric samples as ``{'name{labels}': value}``."""
        status, text = self.http("/metrics")
        assert status == 200
        return parse_metrics(text)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def send_signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def connect(self, path: str = "/public", query: str = "", **kwargs: Any) -> ClientConnection:
        """A websocket client; the first frame (the ``subscribed`` answer) is left unread."""
        return connect(self.url(path, query), open_timeout=5, **kwargs)


def child_pids(parent: int) -> list[int]:
    """Pids whose parent is ``parent``, by start time (from /proc)."""
    children = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rpartition(b")")[2].split()
        except OSError:
            continue
        if int(fields[1]) == parent:
            children.append((int(fields[19]), int(entry)))
    return [pid for _, pid in sorted(children)]


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text as ``{'name{labels}': value}``."""
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def wait_for(predicate: Any, timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy (for state with no event to await)."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


@pytest.fixture
def rango_factory(keys: KeyPair, tmp_path: Path) -> Iterator[Any]:
    """Start Rango processes with extra env/args; all are stopped at teardown."""
    started: list[Rango] = []

    def start(env: dict[str, str] | None = None, args: list[str] | None = None,
              wait: bool = True, exchange: str | None = None) -> Rango:
        rango = Rango(keys, tmp_path, env, args, exchange)
        started.append(rango)
        return rango.start(wait=wait)

    yield start
    for rango in started:
        rango.stop(signal.SIGKILL if rango.exited() else signal.SIGTERM)


@pytest.fixture(scope="module")
def rango(keys: KeyPair, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rango]:
    """One Rango shared by a test module (tests use their own stream names)."""
    instance = Rango(
        keys, tmp_path_factory.mktemp("rango"), env={"RANGO_RBAC_ADMIN": "admin,superadmin"}
    ).start()
    yield instance
    instance.stop()


class Publisher:
    """Publishes events to a topic exchange like the trading engine does."""

    def __init__(self, exchange: str) -> None:
        self.exchange = exchange
        self.conn = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
        self.channel = self.conn.channel()
        self.channel.exchange_declare(exchange, exchange_type="topic", durable=False)

    def publish(self, routing_key: str, body: Any) -> None:
        if not isinstance(body, bytes):
            body = body.encode() if isinstance(body, str) else orjson.dumps(body)
        self.channel.basic_publish(self.exchange, routing_key, body)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.conn.close()


@pytest.fixture
def publisher_factory() -> Iterator[Any]:
    publishers: list[Publisher] = []

    def make(exchange: str) -> Publisher:
        pub = Publisher(exchange)
        publishers.append(pub)
        return pub

    yield make
    for pub in publishers:
        pub.close()


@pytest.fixture
def publisher(rango: Rango, publisher_factory: Any) -> Publisher:
    return publisher_factory(rango.exchange)


def recv_json(ws: ClientConnection, timeout: float = 5.0) -> Any:
    return orjson.loads(ws.recv(timeout=timeout))


def unique(prefix: str = "m") -> str:
    """A market name no other test uses."""
    return f"{prefix}{secrets.token_hex(4)}"
