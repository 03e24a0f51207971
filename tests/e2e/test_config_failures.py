"""Bad configuration: ``rango`` exits with status 2 and one clear line naming the
variable or flag, never a traceback."""

from __future__ import annotations

import base64
import re
import signal
import socket

import pytest
from support.gateway import Rango

# A log record as rango.logs formats it (text format): "2026-01-01 12:00:00 LEVEL ...".
LOG_RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR|CRITICAL) ")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


CASES = [
    # id, env, extra args, words the line must contain
    ("port-out-of-range", {"RANGER_PORT": "70000"}, [], ["RANGER_PORT", "70000"]),
    ("port-not-a-number", {"RANGER_PORT": "eighty"}, [], ["RANGER_PORT", "eighty"]),
    ("ws-addr-bad-port", {}, ["--ws-addr", "127.0.0.1:http"], ["--ws-addr"]),
    ("jwt-key-not-base64", {"JWT_PUBLIC_KEY": "not*base64!"}, [], ["JWT_PUBLIC_KEY", "base64"]),
    (
        "jwt-key-base64-not-pem",
        {"JWT_PUBLIC_KEY": _b64(b"hello, I am not a key\n")},
        [],
        ["JWT_PUBLIC_KEY", "PEM"],
    ),
    ("log-level", {"LOG_LEVEL": "verbose"}, [], ["LOG_LEVEL", "verbose"]),
    ("rbac-empty-role", {"RANGO_RBAC_ADMIN": "admin,,root"}, [], ["RANGO_RBAC_ADMIN"]),
    ("rbac-blank", {"RANGO_RBAC_ADMIN": " "}, [], ["RANGO_RBAC_ADMIN"]),
    ("pubkey-missing", {}, ["--pubKey", "/nonexistent/rsa-key.pub"], ["--pubKey"]),
    ("amqp-addr-scheme", {}, ["--amqp-addr", "http://127.0.0.1:5672/"], ["--amqp-addr"]),
    ("amqp-addr-port", {}, ["--amqp-addr", "amqp://127.0.0.1:99999/"], ["--amqp-addr"]),
    # pika could not parse these: each worker died with a traceback, restarted forever.
    ("amqp-addr-bracket", {}, ["--amqp-addr", "amqp://127.0.0.1:5672@[::1/"], ["--amqp-addr"]),
    ("jwt-algorithm-hmac", {"JWT_ALGORITHM": "HS256"}, [], ["JWT_ALGORITHM", "HS256"]),
    ("jwt-algorithm-unknown", {"JWT_ALGORITHM": "RS999"}, [], ["JWT_ALGORITHM", "RS999"]),
]


def _exit(rango, timeout: float = 20.0) -> tuple[int, str]:
    code = rango.proc.wait(timeout)
    return code, rango.log()


def _assert_no_traceback(output: str) -> None:
    assert "Traceback" not in output, output


@pytest.fixture(scope="module")
def outcomes(keys, tmp_path_factory) -> dict[str, tuple[int, str]]:
    """Run every bad configuration at once (each is a Python start-up) and collect
    ``(exit status, output)`` by case id."""
    log_dir = tmp_path_factory.mktemp("bad-config")
    started = {}
    for case_id, env, args, _words in CASES:
        started[case_id] = Rango(keys, log_dir, env, args).start(wait=False)
    results = {}
    try:
        for case_id, rango in started.items():
            results[case_id] = _exit(rango)
    finally:
        for rango in started.values():
            rango.stop(signal.SIGKILL)
    return results


@pytest.mark.parametrize(
    ("case_id", "env", "words"), [(c[0], c[1], c[3]) for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_setting_exits_2_with_one_line(outcomes, case_id, env, words):
    code, output = outcomes[case_id]
    _assert_no_traceback(output)
    lines = output.strip().splitlines()
    assert code == 2, output
    assert len(lines) == 1, output
    line = lines[0]
    assert line.startswith("rango: "), line
    for word in words:
        assert word in line, f"{word!r} not named in {line!r}"
    # The value of a secret is not echoed (it may be a real key).
    if "JWT_PUBLIC_KEY" in env:
        assert env["JWT_PUBLIC_KEY"] not in line


def _taken_port() -> socket.socket:
    """A listening socket on a free port (without SO_REUSEPORT: nobody may share it)."""
    return socket.create_server(("127.0.0.1", 0))


def _one_error_line(output: str) -> str:
    """The single ``rango:`` line; every other line is an ordinary log record."""
    _assert_no_traceback(output)
    errors = [line for line in output.splitlines() if line.startswith("rango: ")]
    others = [
        line
        for line in output.splitlines()
        if line.strip() and not line.startswith("rango: ") and not LOG_RECORD.match(line)
    ]
    assert len(errors) == 1, output
    assert not others, output
    return errors[0]


def test_websocket_port_in_use(rango_factory):
    with _taken_port() as taken:
        port = taken.getsockname()[1]
        rango = rango_factory(env={"RANGER_PORT": str(port)}, args=["--workers", "1"], wait=False)
        code, output = _exit(rango)
    assert code == 2, output
    line = _one_error_line(output)
    assert "RANGER_PORT" in line, line
    assert str(port) in line and "in use" in line.lower(), line


def test_websocket_port_in_use_by_flag(rango_factory):
    with _taken_port() as taken:
        port = taken.getsockname()[1]
        rango = rango_factory(args=["--ws-addr", f"127.0.0.1:{port}", "--workers", "1"], wait=False)
        code, output = _exit(rango)
    assert code == 2, output
    line = _one_error_line(output)
    assert "--ws-addr" in line, line
    assert str(port) in line and "in use" in line.lower(), line


def test_metrics_port_in_use(rango_factory):
    with _taken_port() as taken:
        port = taken.getsockname()[1]
        rango = rango_factory(
            env={"RANGO_METRICS_PORT": str(port)}, args=["--workers", "1"], wait=False
        )
        code, output = _exit(rango)
    assert code == 2, output
    line = _one_error_line(output)
    assert "RANGO_METRICS_PORT" in line and str(port) in line, line
