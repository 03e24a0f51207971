"""Misbehaving clients and shutdown: slow readers, oversized frames, silent peers
(keepalive, handshake timeout), and SIGTERM with clients connected.

Raw sockets (:class:`support.wire.RawClient`) stand in for clients a websocket library
would not let us write: one that never reads, never answers a ping, or never
sends its upgrade request.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from contextlib import ExitStack
from typing import Any

import pytest
from support.answers import recv_json, subscribed
from support.broker import queues_of, unique
from support.polling import wait_logged
from support.wire import OP_CLOSE, OP_PING, OP_TEXT, RawClient
from websockets.exceptions import ConnectionClosed


def close_code(ws: Any, timeout: float = 5.0) -> int | None:
    """Read until the server closes ``ws``; the code of the close frame it sent."""
    deadline = time.monotonic() + timeout
    with pytest.raises(ConnectionClosed) as info:
        while True:
            ws.recv(timeout=max(0.01, deadline - time.monotonic()))
    rcvd = info.value.rcvd
    return None if rcvd is None else rcvd.code


def still_served(rango: Any, publisher: Any, market: str, ws: Any) -> None:
    """``ws`` (subscribed to ``market.trades``) still receives events."""
    publisher.publish(f"public.{market}.trades", {"alive": True})
    assert recv_json(ws) == {f"{market}.trades": {"alive": True}}


# Slow clients (PROTOCOL §6).


def test_slow_client_is_dropped_others_lose_nothing(rango_factory, publisher_factory):
    rango = rango_factory(env={"RANGO_MAX_PENDING_BYTES": "65536"}, args=["--workers", "1"])
    publisher = publisher_factory(rango.exchange)
    market = unique()
    stream = f"{market}.trades"
    dropped_before = rango.metrics().get("rango_slow_clients_dropped_total", 0.0)

    slow = RawClient(rango.port, f"/public?stream={stream}", rcvbuf=4096).upgraded()
    # ... and it never reads again
    with rango.connect(query=f"stream={stream}") as ws:
        assert recv_json(ws) == subscribed([stream])
        received: list[Any] = []
        failure: list[BaseException] = []

        def read() -> None:
            try:
                while True:
                    frame = recv_json(ws, timeout=10)
                    received.append(frame)
                    if frame == {stream: {"end": True}}:
                        return
            except BaseException as exc:  # reported by the test thread
                failure.append(exc)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        pad = "x" * 2000
        sent = 0
        deadline = time.monotonic() + 30
        while rango.metrics().get("rango_slow_clients_dropped_total", 0.0) <= dropped_before:
            # Well past 64 KiB plus what the kernels buffer on both ends, yet bounded.
            assert sent < 10_000 and time.monotonic() < deadline, (
                f"slow client still connected after {sent} events\n{rango.log()}"
            )
            for _ in range(100):
                publisher.publish(f"public.{stream}", {"seq": sent, "pad": pad})
                sent += 1
        publisher.publish(f"public.{stream}", {"end": True})
        reader.join(20)
        assert not failure, (failure, len(received), sent)
        assert not reader.is_alive(), f"reader stuck after {len(received)} of {sent}"
        seqs = [frame[stream]["seq"] for frame in received[:-1]]
        assert seqs == list(range(sent)), "the reading client lost or reordered events"

        # The slow client's socket is closed by the server (EOF or reset).
        assert slow.read_until_closed(5), "the slow client is still connected"
        slow.close(reset=True)
        assert rango.metrics()["rango_slow_clients_dropped_total"] == dropped_before + 1
        still_served(rango, publisher, market, ws)
    with rango.connect(query=f"stream={stream}") as again:
        assert recv_json(again) == subscribed([stream])
        still_served(rango, publisher, market, again)


# Oversized client frames (PROTOCOL §3).


@pytest.mark.parametrize("limit", [None, 512], ids=["default-4096", "configured-512"])
def test_oversized_frame_closes_with_1009(rango_factory, publisher_factory, limit):
    env = {"RANGO_MAX_FRAME_SIZE": str(limit)} if limit else {}
    rango = rango_factory(env=env, args=["--workers", "1"])
    size = limit or 4096
    publisher = publisher_factory(rango.exchange)
    market = unique()
    with rango.connect(query=f"stream={market}.trades") as other, rango.connect() as big:
        assert recv_json(other) == subscribed([f"{market}.trades"])
        assert recv_json(big) == subscribed([])
        big.send("x" * size)  # at the limit: just not JSON
        assert "error" in recv_json(big)
        big.send("x" * (size + 1))
        assert close_code(big) == 1009
        # Other connections do not notice.
        other.send("ping")
        assert other.recv(timeout=5) == "pong"
        still_served(rango, publisher, market, other)


# Keepalive (PROTOCOL §6).


class _PingCounter(logging.Handler):
    """Counts the pings a websockets client receives (from its debug log)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.pings = 0

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("< PING"):
            self.pings += 1


def test_keepalive_closes_a_client_that_does_not_answer(rango_factory, publisher_factory):
    rango = rango_factory(
        env={"RANGO_PING_INTERVAL": "0.3", "RANGO_PING_TIMEOUT": "0.5"}, args=["--workers", "1"]
    )
    publisher = publisher_factory(rango.exchange)
    market = unique()
    counter = _PingCounter()
    client_log = logging.getLogger(f"test.keepalive.{market}")
    client_log.setLevel(logging.DEBUG)
    client_log.propagate = False
    client_log.addHandler(counter)

    with rango.connect(query=f"stream={market}.trades", logger=client_log) as ws:
        assert recv_json(ws) == subscribed([f"{market}.trades"])
        raw = RawClient(rango.port, f"/public?stream={market}.trades").upgraded()
        started = time.monotonic()
        opcodes: list[int | None] = []
        while not opcodes or opcodes[-1] not in (OP_CLOSE, None):
            assert time.monotonic() - started < 5, f"not closed; frames: {opcodes}"
            try:
                opcodes.append(raw.recv_frame(timeout=5)[1])
            except (EOFError, ConnectionResetError):
                opcodes.append(None)
        raw.close(reset=True)
        assert OP_PING in opcodes, opcodes
        assert opcodes.index(OP_PING) < len(opcodes) - 1, opcodes  # pinged, then closed
        assert set(opcodes[:-1]) <= {OP_TEXT, OP_PING}, opcodes
        elapsed = time.monotonic() - started
        assert elapsed >= 0.5, f"closed after {elapsed:.2f}s, before the ping timeout"

        # The library client answers pings: it outlives several rounds of them.
        wait_logged(rango, lambda: counter.pings >= 3, 5, "three pings to the good client")
        still_served(rango, publisher, market, ws)


# Handshake timeout.


def test_handshake_timeout_disconnects_a_silent_client(rango_factory):
    rango = rango_factory(env={"RANGO_HANDSHAKE_TIMEOUT": "0.5"}, args=["--workers", "1"])
    with socket.create_connection(("127.0.0.1", rango.port), timeout=5) as sock:
        started = time.monotonic()
        try:
            data = sock.recv(1024)
        except ConnectionResetError:
            data = b""
        elapsed = time.monotonic() - started
    assert data == b"", data
    assert 0.4 <= elapsed < 4, f"disconnected after {elapsed:.2f}s"
    with rango.connect() as ws:  # the worker still accepts
        assert recv_json(ws) == subscribed([])


def test_handshake_timeout_is_not_reset_by_a_trickling_request(rango_factory):
    rango = rango_factory(env={"RANGO_HANDSHAKE_TIMEOUT": "0.5"}, args=["--workers", "1"])
    request = f"GET /public HTTP/1.1\r\nHost: 127.0.0.1:{rango.port}\r\nX-Pad: {'a' * 200}"
    with socket.create_connection(("127.0.0.1", rango.port), timeout=5) as sock:
        sock.settimeout(0.2)
        started = time.monotonic()
        for byte in request.encode():
            assert time.monotonic() - started < 3, "still connected 3 s into the handshake"
            try:
                sock.sendall(bytes([byte]))
                if sock.recv(1024) == b"":
                    break
            except TimeoutError:
                continue
            except OSError:
                break
        else:
            pytest.fail("the whole request was trickled in without a disconnect")


# SIGTERM.


def _connect_clients(stack: ExitStack, rango: Any, market: str, count: int) -> list[Any]:
    clients = []
    for n in range(count):
        ws = stack.enter_context(rango.connect(query=f"stream={market}.trades,{market}.c{n}"))
        assert recv_json(ws) == subscribed([f"{market}.trades", f"{market}.c{n}"])
        clients.append(ws)
    return clients


def test_sigterm_closes_clients_with_1001_and_deletes_queues(rango_factory):
    rango = rango_factory(args=["--workers", "2"])
    workers = rango.worker_pids()
    assert len(workers) == 2, workers
    before = queues_of(*workers)
    assert all(len(names) == 1 for names in before.values()), before
    market = unique()
    with ExitStack() as stack:
        clients = _connect_clients(stack, rango, market, 6)
        rango.send_signal(signal.SIGTERM)
        codes = [close_code(ws) for ws in clients]
        assert codes == [1001] * len(clients), codes
    assert rango.proc.wait(15) == 0, rango.log()
    assert not rango.log().count("Traceback"), rango.log()
    after = queues_of(*workers)
    assert after == {pid: [] for pid in workers}, f"queues left behind: {after}"


def test_sigterm_to_one_worker(rango_factory, publisher_factory):
    """A worker stopped alone (e.g. by an orchestrator) drains the same way; the
    supervisor replaces it."""
    rango = rango_factory(args=["--workers", "1"])
    [worker] = rango.worker_pids()
    assert len(queues_of(worker)[worker]) == 1
    market = unique()
    with ExitStack() as stack:
        clients = _connect_clients(stack, rango, market, 3)
        os.kill(worker, signal.SIGTERM)
        codes = [close_code(ws) for ws in clients]
        assert codes == [1001] * len(clients), codes
    wait_logged(
        rango,
        lambda: f"(pid {worker}) exited with status 0" in rango.log(),
        10,
        "the worker exiting with status 0",
    )
    assert queues_of(worker)[worker] == [], "the stopped worker left its queue behind"
    wait_logged(rango, lambda: rango.worker_pids() not in ([], [worker]), 10, "a new worker")
    rango.wait_ready()
    publisher = publisher_factory(rango.exchange)
    with rango.connect(query=f"stream={market}.trades") as ws:
        assert recv_json(ws) == subscribed([f"{market}.trades"])
        still_served(rango, publisher, market, ws)
