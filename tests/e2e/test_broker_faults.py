"""Broker faults while running: the exchange deleted, the worker's queue deleted, RabbitMQ
unreachable for 30 s. Clients stay connected throughout and delivery resumes within 3 s.

The real broker is never stopped (others share it): it is made unreachable through
:class:`support.broker.TcpProxy`. Covered in test_broker_outage.py, not repeated here: the
connection closed by the broker (test_connection_closed_by_broker), the broker
unreachable at start (test_broker_down_at_start), a connection cut for a few seconds
(test_connection_cut_mid_run).
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from typing import Any

import pytest
from support.answers import assert_alive, expect, subscribed
from support.broker import Publisher, amqp_connections_of, queues_of, rabbitmqctl, unique
from support.gateway import Rango
from support.outage import (
    OUTAGE,
    RESUME,
    amqp_problems,
    check_recovered,
    first_marker_after,
    open_book,
    proxied,
    sit_out_outage,
)
from support.procfs import cpu_seconds


def one_worker(rango_factory: Any, publisher_factory: Any) -> tuple[Rango, int, Publisher, str]:
    """A gateway with one worker, that worker's pid, a publisher to its exchange, and a
    stream of the test's own."""
    rango = rango_factory()
    [worker] = rango.worker_pids()
    return rango, worker, publisher_factory(rango.exchange), f"{unique()}.trades"


def test_exchange_deleted_while_running(rango_factory, publisher_factory):
    rango, worker, publisher, stream = one_worker(rango_factory, publisher_factory)
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
    assert rango.ready_status() == 200
    assert not amqp_problems(rango.log()), rango.log()


def test_queue_deleted_by_an_operator(rango_factory, publisher_factory):
    rango, worker, publisher, stream = one_worker(rango_factory, publisher_factory)
    with rango.connect(query=f"stream={stream}") as ws:
        expect(ws, subscribed([stream]))
        [queue] = queues_of(worker)[worker]
        rabbitmqctl("delete_queue", queue)
        took = first_marker_after(publisher, ws, stream, time.monotonic())
        assert took <= RESUME, f"delivery resumed {took:.2f} s after the queue was deleted"
        assert_alive(ws)
    # A new queue on a new connection: the old name may still be held on its node
    # (a connection cut silently keeps its exclusive queue until the broker notices).
    [again] = queues_of(worker)[worker]
    assert again != queue and again.startswith(queue.rsplit(".", 1)[0] + "."), again
    assert rango.worker_pids() == [worker]


@pytest.mark.slow
def test_broker_unreachable_for_30_seconds(rango_factory, publisher_factory, proxy):
    rango = rango_factory(args=proxied(proxy))
    [worker] = rango.worker_pids()
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
    assert rango.worker_pids() == [worker]
    assert "exited" not in rango.log() and "Traceback" not in rango.log(), rango.log()
