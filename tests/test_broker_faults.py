"""Broker faults while running: the exchange deleted, the worker's queue deleted, RabbitMQ
unreachable for 30 s. Clients stay connected throughout and delivery resumes within 3 s.

The real broker is never stopped (others share it): it is made unreachable through
:class:`faults.TcpProxy`. Covered in test_failures_broker.py, not repeated here: the
connection closed by the broker (test_connection_closed_by_broker), the broker
unreachable at start (test_broker_down_at_start), a connection cut for a few seconds
(test_connection_cut_mid_run).
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import pytest
from conftest import recv_json, unique
from faults import TcpProxy, amqp_connections_of, queues_of, ready_status, worker_pids
from proctools import cpu_seconds
from test_failures_broker import (
    BROKER,
    amqp_problems,
    check_recovered,
    open_book,
    proxied,
    wait_logged,
)
from websockets.sync.client import ClientConnection
from wsutil import assert_alive, expect, subscribed

# Delivery resumes this soon after the broker (or the exchange) is back.
RESUME = 3.0
OUTAGE = 30.0


@pytest.fixture
def proxy() -> Iterator[TcpProxy]:
    p = TcpProxy(BROKER)
    yield p
    p.close()


def first_marker_after(publisher: Any, ws: ClientConnection, stream: str, since: float) -> float:
    """Publish a numbered marker every 100 ms until ``ws`` receives one; return the
    seconds from ``since`` to then. The markers still in flight are read too: in
    order, none twice."""
    n = 0
    due = time.monotonic()
    while True:
        if time.monotonic() >= due:
            publisher.publish(f"public.{stream}", {"marker": n})
            n += 1
            due += 0.1
        try:
            frame = recv_json(ws, timeout=max(0.005, due - time.monotonic()))
        except TimeoutError:
            assert time.monotonic() - since < RESUME + 10, "delivery did not resume"
            continue
        took = time.monotonic() - since
        break
    assert list(frame) == [stream] and "marker" in frame[stream], frame
    last = frame[stream]["marker"]
    publisher.publish(f"public.{stream}", {"sentinel": True})
    while (frame := recv_json(ws)) != {stream: {"sentinel": True}}:
        assert frame[stream]["marker"] > last, frame
        last = frame[stream]["marker"]
    return took


def test_exchange_deleted_while_running(rango_factory, publisher_factory):
    rango = rango_factory()
    [worker] = worker_pids(rango.pid)
    publisher = publisher_factory(rango.exchange)
    stream = f"{unique()}.trades"
    with rango.connect(query=f"stream={stream}") as ws:
        expect(ws, subscribed([stream]))
        publisher.publish(f"public.{stream}", {"before": True})
        expect(ws, {stream: {"before": True}})
        connections = amqp_connections_of(worker)
        # Deleting the exchange deletes its bindings: the worker's queue is cut off.
        publisher.channel.exchange_delete(rango.exchange)
        publisher.channel.exchange_declare(rango.exchange, exchange_type="topic", durable=False)
        took = first_marker_after(publisher, ws, stream, time.monotonic())
        assert took <= RESUME, f"delivery resumed {took:.2f} s after the exchange was back"
    # Bound again on the same connection: no reconnect, no reset of the books.
    assert amqp_connections_of(worker) == connections
    assert ready_status(rango) == 200
    assert not amqp_problems(rango.log()), rango.log()


def test_queue_deleted_by_an_operator(rango_factory, publisher_factory):
    rango = rango_factory()
    [worker] = worker_pids(rango.pid)
    publisher = publisher_factory(rango.exchange)
    stream = f"{unique()}.trades"
    with rango.connect(query=f"stream={stream}") as ws:
        expect(ws, subscribed([stream]))
        [queue] = queues_of(worker)[worker]
        subprocess.run(
            ["rabbitmqctl", "delete_queue", queue], capture_output=True, timeout=30, check=True
        )
        took = first_marker_after(publisher, ws, stream, time.monotonic())
        assert took <= RESUME, f"delivery resumed {took:.2f} s after the queue was deleted"
        assert_alive(ws)
    assert queues_of(worker)[worker] == [queue], "the worker did not declare its queue again"
    assert worker_pids(rango.pid) == [worker]


@pytest.mark.slow
def sit_out_outage(rango: Any, worker: int, clients: list[ClientConnection]) -> None:
    """Wait OUTAGE seconds with the broker away, checking all the while that clients stay
    connected and served, /ready answers 503, and the worker neither exits nor is replaced."""
    wait_logged(rango, lambda: ready_status(rango) == 503, 10, "/ready answering 503")
    back_at = time.monotonic() + OUTAGE
    while (left := back_at - time.monotonic()) > 0:
        for ws in clients:
            assert_alive(ws)
        assert ready_status(rango) == 503
        assert worker_pids(rango.pid) == [worker], rango.log()
        time.sleep(min(1.0, left))  # the outage itself: nothing to wait for


def test_broker_unreachable_for_30_seconds(rango_factory, publisher_factory, proxy):
    rango = rango_factory(args=proxied(proxy))
    [worker] = worker_pids(rango.pid)
    publisher = publisher_factory(rango.exchange)  # straight to the broker, not proxied
    market = unique()
    with ExitStack() as stack:
        trades, book = open_book(stack, rango, publisher, market)
        offset = len(rango.log())
        cpu = cpu_seconds(worker)
        proxy.off()
        sit_out_outage(rango, worker, [trades, book])
        used = cpu_seconds(worker) - cpu
        assert used < 1.0, f"the worker used {used:.2f} s of CPU in {OUTAGE:.0f} s away"
        # It kept retrying (at most every 2 s), and said so once, not once per attempt.
        assert 8 <= proxy.refused <= 60, proxy.refused
        assert len(amqp_problems(rango.log()[offset:])) == 1, rango.log()[offset:]

        proxy.on()
        took = first_marker_after(publisher, trades, f"{market}.trades", time.monotonic())
        assert took <= RESUME, f"delivery resumed {took:.2f} s after the broker was back"
        # The stored book went with the outage: no stale snapshot, the next one goes out.
        check_recovered(rango, publisher, market, trades, book)
    assert worker_pids(rango.pid) == [worker]
    assert "exited" not in rango.log() and "Traceback" not in rango.log(), rango.log()
