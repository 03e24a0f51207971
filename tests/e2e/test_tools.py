"""The developer tools, run as ``python -m rango.cli TOOL`` against a real gateway and broker."""

from __future__ import annotations

import base64
import os
import selectors
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import jwt
import orjson
import pika
import pytest
from cryptography.hazmat.primitives import serialization
from support import AMQP_URL, REPO
from support.answers import recv_json
from support.broker import unique
from support.gateway import free_port
from support.tokens import UID
from websockets.exceptions import InvalidStatus

from rango.config import load_public_key_pem


def run_tool(
    *args: str, input: str | None = None, cwd: Path = REPO, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``rango <args>`` to completion."""
    return subprocess.run(
        [sys.executable, "-m", "rango.cli", *args],
        input=input, capture_output=True, text=True, cwd=cwd, env=env, timeout=20,
    )  # fmt: skip


@pytest.fixture
def spawn() -> Iterator[Any]:
    """Start ``rango <args>`` in the background; still running at teardown, it is killed."""
    procs: list[subprocess.Popen[str]] = []

    def start(*args: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "rango.cli", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
        )  # fmt: skip
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()  # type: ignore[union-attr]
        proc.stderr.close()  # type: ignore[union-attr]


def read_line(proc: subprocess.Popen[str], timeout: float = 10.0) -> str:
    """The next line ``proc`` prints, waiting at most ``timeout`` seconds for it."""
    assert proc.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        if not selector.select(timeout):
            raise AssertionError(f"no output within {timeout}s")
    return proc.stdout.readline()


def finish(proc: subprocess.Popen[str], timeout: float = 10.0) -> tuple[int, str, str]:
    """Wait for ``proc`` to exit; return its status and the rest of its stdout and stderr."""
    returncode = proc.wait(timeout)
    assert proc.stdout is not None and proc.stderr is not None
    return returncode, proc.stdout.read(), proc.stderr.read()


def amqp_env() -> dict[str, str]:
    """An environment naming the test broker through ``RABBITMQ_*``, as the gateway reads it."""
    url = urlsplit(AMQP_URL)
    return {
        **os.environ,
        "RABBITMQ_HOST": url.hostname or "localhost",
        "RABBITMQ_PORT": str(url.port or 5672),
        "RABBITMQ_USER": unquote(url.username or "guest"),
        "RABBITMQ_PASSWORD": unquote(url.password or "guest"),
    }


def one_line(stderr: str) -> str:
    """Assert ``stderr`` is a single line of error, not a traceback; return it."""
    assert "Traceback" not in stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


def subscribed(*streams: str) -> dict[str, Any]:
    return {"success": {"message": "subscribed", "streams": list(streams)}}


# keygen


def test_keygen_writes_a_key_pair_at_the_default_paths(tmp_path):
    result = run_tool("keygen", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    private_path, public_path = tmp_path / "config/rsa-key", tmp_path / "config/rsa-key.pub"
    assert stat.S_IMODE(private_path.stat().st_mode) == 0o600
    private_key = serialization.load_pem_private_key(private_path.read_bytes(), None)
    public_pem = public_path.read_bytes()
    assert private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ) == public_pem
    assert private_key.key_size == 2048  # type: ignore[union-attr]
    lines = result.stdout.splitlines()
    assert "config/rsa-key" in lines[0] and "config/rsa-key.pub" in lines[1]
    name, _, value = lines[-1].partition("=")
    assert name == "JWT_PUBLIC_KEY"
    assert base64.b64decode(value) == public_pem
    # The gateway's own loader takes the printed value.
    assert load_public_key_pem({"JWT_PUBLIC_KEY": value}, "unused") == public_pem


@pytest.mark.parametrize("existing", ["dev", "dev.pub"])
def test_keygen_refuses_to_overwrite_without_force(tmp_path, existing):
    out, public = tmp_path / "dev", tmp_path / "dev.pub"
    (tmp_path / existing).write_bytes(b"precious")
    (tmp_path / existing).chmod(0o644)

    result = run_tool("keygen", "--out", str(out))
    assert result.returncode == 2
    assert "already exists" in one_line(result.stderr)
    assert (tmp_path / existing).read_bytes() == b"precious"
    assert sorted(path.name for path in tmp_path.iterdir()) == [existing]

    result = run_tool("keygen", "--out", str(out), "--force")
    assert result.returncode == 0, result.stderr
    assert b"PRIVATE KEY" in out.read_bytes() and b"PUBLIC KEY" in public.read_bytes()
    assert stat.S_IMODE(out.stat().st_mode) == 0o600


def test_keygen_key_pair_is_accepted_by_the_gateway(tmp_path, rango_factory, keys, spawn):
    """keygen, then token and listen with the new key, on a gateway started with it."""
    out = tmp_path / "rsa-key"
    assert run_tool("keygen", "--out", str(out)).returncode == 0
    gateway = rango_factory(env={"RANGO_WORKERS": "1"}, args=["--pubKey", f"{out}.pub"])
    token = run_tool("token", "--key", str(out)).stdout.strip()

    with gateway.connect("/private", additional_headers={"Authorization": f"Bearer {token}"}) as ws:
        assert recv_json(ws) == subscribed()
    # Tokens of another key are refused: the gateway really uses the new one.
    with pytest.raises(InvalidStatus) as refused:
        gateway.connect("/private", additional_headers=keys.bearer())
    assert refused.value.response.status_code == 401

    # listen exits cleanly when the gateway shuts down.
    proc = spawn("listen", gateway.url("/private"), "--key", str(out), "--timeout", "15")
    assert orjson.loads(read_line(proc)) == subscribed()
    gateway.stop()
    returncode, printed, err = finish(proc)
    assert (returncode, printed) == (0, "")
    assert "connection closed by the server (1001" in one_line(err)


# token


def test_token_has_barong_claims(keys):
    result = run_tool(
        "token", "--key", str(keys.private_path), "--uid", "IDXYZ", "--role", "admin",
        "--ttl", "120", "--claim", "email=dev@example.com", "--claim", "level=2",
        "--claim", "state=null",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    assert jwt.get_unverified_header(token)["alg"] == "RS256"
    claims = jwt.decode(
        token, keys.public_pem, algorithms=["RS256"], audience="peatio", issuer="barong"
    )
    iat, exp = claims.pop("iat"), claims.pop("exp")
    assert exp - iat == 120
    assert abs(iat - time.time()) < 60
    jti = claims.pop("jti")
    assert len(jti) == 24 and jti == jti.upper()
    assert claims == {
        "sub": "session", "iss": "barong", "aud": ["peatio", "barong"], "uid": "IDXYZ",
        "email": "dev@example.com", "role": "admin", "level": 2,
    }  # fmt: skip


def test_token_is_accepted_on_private(rango, keys, publisher):
    uid = unique("ID").upper()
    token = run_tool("token", "--key", str(keys.private_path), "--uid", uid).stdout.strip()
    headers = {"Authorization": f"Bearer {token}"}
    with rango.connect("/private", query="stream=order", additional_headers=headers) as ws:
        assert recv_json(ws) == subscribed("order")
        publisher.publish(f"private.{uid}.order", {"id": 1})
        assert recv_json(ws) == {"order": {"id": 1}}


@pytest.mark.parametrize("content", [None, b"not a key\n"], ids=["missing", "not-a-key"])
def test_token_without_a_usable_key(tmp_path, content):
    key = tmp_path / "rsa-key"
    if content is not None:
        key.write_bytes(content)
    result = run_tool("token", "--key", str(key))
    assert result.returncode == 2
    assert result.stdout == ""
    assert str(key) in one_line(result.stderr)


# publish


def test_publish_delivers_good_events_in_order_and_reports_bad_lines(rango, keys, tmp_path):
    market, uid = unique(), unique("ID").upper()
    events = tmp_path / "events.txt"
    events.write_text(
        "# sample events\n"
        "\n"
        f'public.{market}.trades {{"tid":1}}\n'
        f"public.{market}.trades\n"  # line 4: no body
        f'public.{market}.trades {{"tid":2}}\n'
        f"public.{market}.trades {{tid:3}}\n"  # line 6: not JSON
        f"public.{market}.kline-1m [1588204800,215.3,226.82]\n"
        f'private.{uid}.order {{"id":22,"state":"wait"}}\n'
        f'public.{market}.trades {{"tid":4}}\n'
    )
    streams = f"stream={market}.trades,{market}.kline-1m&stream=order"
    with rango.connect("/private", query=streams, additional_headers=keys.bearer(uid=uid)) as ws:
        assert recv_json(ws) == subscribed(f"{market}.trades", f"{market}.kline-1m", "order")
        result = run_tool(
            "publish", "--amqp-addr", AMQP_URL, "--exchange", rango.exchange, str(events)
        )
        assert [recv_json(ws) for _ in range(5)] == [
            {f"{market}.trades": {"tid": 1}},
            {f"{market}.trades": {"tid": 2}},
            {f"{market}.kline-1m": [1588204800, 215.3, 226.82]},
            {"order": {"id": 22, "state": "wait"}},
            {f"{market}.trades": {"tid": 4}},
        ]
    assert result.returncode == 1
    errors = result.stderr.splitlines()
    assert errors[0].startswith(f"rango publish: {events}:4: ")
    assert errors[1].startswith(f"rango publish: {events}:6: body is not JSON")
    assert "published 5 events" in errors[2] and "skipped 2 lines" in errors[2]
    assert len(errors) == 3


def test_publish_reads_stdin_with_the_broker_from_env(rango):
    market = unique()
    lines = "".join(f'public.{market}.trades {{"tid":{n}}}\n' for n in range(3))
    with rango.connect(query=f"stream={market}.trades") as ws:
        assert recv_json(ws) == subscribed(f"{market}.trades")
        proc = subprocess.Popen(
            [sys.executable, "-m", "rango.cli", "publish", "--exchange", rango.exchange,
             "--repeat", "2", "--rate", "20"],
            stdin=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=amqp_env(),
        )  # fmt: skip
        proc.stdin.write(lines)  # type: ignore[union-attr]
        proc.stdin.close()  # type: ignore[union-attr]
        frames, arrivals = [], []
        for _ in range(6):  # timed as they arrive, while the publisher runs
            frames.append(recv_json(ws))
            arrivals.append(time.monotonic())
        assert proc.wait(timeout=20) == 0, proc.stderr.read()  # type: ignore[union-attr]
        proc.stderr.close()  # type: ignore[union-attr]
    assert frames == [{f"{market}.trades": {"tid": n}} for n in (0, 1, 2, 0, 1, 2)]
    # 20 events a second: the last goes out 250 ms after the first.
    assert arrivals[-1] - arrivals[0] > 0.15


@pytest.mark.parametrize(
    "where", ["before-the-tool", "RANGO_EXCHANGE"], ids=["flags-first", "env"]
)
def test_publish_finds_the_exchange_as_the_server_does(rango, where):
    """``rango --exchange X publish`` and ``RANGO_EXCHANGE`` both name the exchange."""
    market = unique()
    line = f'public.{market}.trades {{"tid":1}}\n'
    if where == "RANGO_EXCHANGE":
        args, env = ["publish"], {**amqp_env(), "RANGO_EXCHANGE": rango.exchange}
    else:
        args = ["--exchange", rango.exchange, "--amqp-addr", AMQP_URL, "publish"]
        env = {k: v for k, v in os.environ.items() if k != "RANGO_EXCHANGE"}
    with rango.connect(query=f"stream={market}.trades") as ws:
        assert recv_json(ws) == subscribed(f"{market}.trades")
        result = run_tool(*args, input=line, env=env)
        assert result.returncode == 0, result.stderr
        assert f"to {rango.exchange}" in result.stderr
        assert recv_json(ws) == {f"{market}.trades": {"tid": 1}}


def test_publish_raw_sends_bodies_unchecked(rango):
    """--raw lets a test feed the gateway bad bodies: it drops them, delivers the rest."""
    market = unique()
    lines = (
        f"public.{market}.trades {{not json\n"
        f'public.{market}.trades {{"tid":1}}\n'
        f"public.{market}.trades \n"
        f'public.{market}.trades {{"tid":2}}\n'
    )
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    try:
        channel = connection.channel()
        queue = channel.queue_declare("", exclusive=True, auto_delete=True).method.queue
        channel.queue_bind(queue, rango.exchange, f"public.{market}.#")
        with rango.connect(query=f"stream={market}.trades") as ws:
            assert recv_json(ws) == subscribed(f"{market}.trades")
            result = run_tool(
                "publish", "--raw", "--amqp-addr", AMQP_URL, "--exchange", rango.exchange, "-",
                input=lines,
            )  # fmt: skip
            assert result.returncode == 0, result.stderr
            assert recv_json(ws) == {f"{market}.trades": {"tid": 1}}
            assert recv_json(ws) == {f"{market}.trades": {"tid": 2}}
        bodies = []
        for method, _, body in channel.consume(queue, auto_ack=True, inactivity_timeout=5):
            assert method is not None, f"only {bodies} reached the exchange"
            bodies.append(body)
            if len(bodies) == 4:
                break
        assert bodies == [b"{not json", b'{"tid":1}', b"", b'{"tid":2}']
    finally:
        connection.close()


def test_publish_unreachable_broker():
    env = {**amqp_env(), "RABBITMQ_HOST": "127.0.0.1", "RABBITMQ_PORT": str(free_port())}
    result = run_tool("publish", input="public.eurusd.trades {}\n", env=env)
    assert result.returncode == 1
    assert "Connection refused" in one_line(result.stderr)


def test_publish_takes_a_cluster_list_and_uses_the_first_node_that_answers(rango):
    """RABBITMQ_HOST as the server takes it: a refusing node first, then the broker."""
    market = unique()
    down = f"127.0.0.1:{free_port()}"
    env = {**amqp_env(), "RABBITMQ_HOST": f"{down},127.0.0.1:{urlsplit(AMQP_URL).port or 5672}"}
    with rango.connect(query=f"stream={market}.trades") as ws:
        assert recv_json(ws) == subscribed(f"{market}.trades")
        result = run_tool(
            "publish", "--exchange", rango.exchange, input=f'public.{market}.trades {{"tid":7}}\n',
            env=env,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert recv_json(ws) == {f"{market}.trades": {"tid": 7}}
    # Every node refusing: one line naming each, no password.
    env["RABBITMQ_HOST"] = f"{down},127.0.0.1:{free_port()}"
    result = run_tool("publish", input="public.eurusd.trades {}\n", env=env)
    assert result.returncode == 1
    line = one_line(result.stderr)
    assert down in line and line.count("Connection refused") == 2 and "guest@" not in line, line


def test_publish_missing_file(tmp_path):
    result = run_tool("publish", "--amqp-addr", AMQP_URL, str(tmp_path / "missing.txt"))
    assert result.returncode == 2
    assert "missing.txt" in one_line(result.stderr)


# listen


def test_listen_prints_the_frames_publish_sends(rango, keys, spawn):
    market, uid = unique(), unique("ID").upper()
    proc = spawn(
        "listen", rango.url("/private"), "--stream", f"{market}.trades", "--stream", "order",
        "--key", str(keys.private_path), "--uid", uid, "--count", "3", "--timeout", "15",
    )  # fmt: skip
    # Once the subscription answer is printed, events reach the listener.
    assert orjson.loads(read_line(proc)) == subscribed(f"{market}.trades", "order")
    published = run_tool(
        "publish", "--amqp-addr", AMQP_URL, "--exchange", rango.exchange,
        input=f'public.{market}.trades {{"tid":1}}\nprivate.{uid}.order {{"id":2}}\n',
    )  # fmt: skip
    assert published.returncode == 0, published.stderr
    returncode, out, err = finish(proc)
    assert (returncode, err) == (0, "")
    assert [orjson.loads(line) for line in out.splitlines()] == [
        {f"{market}.trades": {"tid": 1}},
        {"order": {"id": 2}},
    ]


@pytest.mark.parametrize("ttl", [None, "-60"], ids=["no-token", "expired-token"])
def test_listen_refused_upgrade(rango, keys, ttl):
    args = ["listen", rango.url("/private")]
    if ttl is not None:
        token = run_tool("token", "--key", str(keys.private_path), "--ttl", ttl).stdout.strip()
        args += ["--token", token]
    result = run_tool(*args)
    assert result.returncode == 1
    assert result.stdout == ""
    assert "HTTP 401" in one_line(result.stderr)


def test_listen_timeout(rango):
    quiet = f"{unique()}.trades"
    result = run_tool("listen", rango.url(), "--stream", quiet, "--count", "2", "--timeout", "0.5")
    assert result.returncode == 1
    assert orjson.loads(result.stdout) == subscribed(quiet)
    assert "1 of 2 frames" in one_line(result.stderr)
    # Without --count, the timeout is the normal end.
    result = run_tool("listen", rango.url(), "--stream", quiet, "--timeout", "0.5")
    assert (result.returncode, result.stderr) == (0, "")
    assert orjson.loads(result.stdout) == subscribed(quiet)


def test_listen_cannot_connect():
    result = run_tool("listen", f"ws://127.0.0.1:{free_port()}/public", "--count", "1")
    assert result.returncode == 1
    assert "Connection refused" in one_line(result.stderr)


def test_listen_default_uid_is_barongs(keys, rango, publisher, spawn):
    """--key alone mints a token for the sample uid of PROTOCOL §8."""
    proc = spawn("listen", rango.url("/private"), "--stream", "trade",
                 "--key", str(keys.private_path), "--count", "2", "--timeout", "15")  # fmt: skip
    assert orjson.loads(read_line(proc)) == subscribed("trade")
    publisher.publish(f"private.{UID}.trade", {"id": 7})
    returncode, out, err = finish(proc)
    assert (returncode, err) == (0, "")
    assert orjson.loads(out) == {"trade": {"id": 7}}
