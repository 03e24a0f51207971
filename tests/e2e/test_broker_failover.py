"""Several brokers (issue Topology): a worker whose node is lost moves on to the next entry
of ``--amqp-addr`` / ``RABBITMQ_HOST`` at once, and its clients stay connected.

The nodes here are :class:`support.broker.TcpProxy` ports in front of the one real broker
(others share it: it is never stopped), so that each can be lost on its own and cheaply;
tests/e2e/test_cluster.py does the same against a real three-node RabbitMQ cluster.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

from support.answers import assert_alive, recv_json, subscribed
from support.broker import BROKER, StallingBroker, TcpProxy, unique
from support.metrics import samples
from support.outage import (
    RESUME,
    amqp_problems,
    check_recovered,
    first_marker_after,
    open_book,
)
from support.polling import wait_logged


def addr(*ports: int) -> list[str]:
    """``--amqp-addr`` with one URL per local port, in that order."""
    urls = ",".join(f"amqp://guest:guest@127.0.0.1:{port}/" for port in ports)
    return ["--amqp-addr", urls]


def nodes(rango: Any) -> dict[str, tuple[str, float]]:
    """``rango_amqp_connected``: worker -> (node, state); one series per worker."""
    found: dict[str, tuple[str, float]] = {}
    for labels, value in samples(rango.metrics(), "rango_amqp_connected"):
        assert labels["worker"] not in found, f"two series for worker {labels['worker']}"
        found[labels["worker"]] = (labels["node"], value)
    return found


def consuming_on(rango: Any, port: int) -> Callable[[], bool]:
    """Whether worker 0 consumes from the node on ``port`` (False until metrics answer)."""

    def check() -> bool:
        try:
            return nodes(rango).get("0") == (f"127.0.0.1:{port}", 1.0)
        except OSError:  # the metrics port is not up yet
            return False

    return check


def delivers(rango: Any, publisher: Any) -> None:
    """A new client of a fresh stream receives what is published now."""
    stream = f"{unique()}.trades"
    with rango.connect(query=f"stream={stream}") as ws:
        assert recv_json(ws) == subscribed([stream])
        first_marker_after(publisher, ws, stream, time.monotonic())


def test_worker_moves_to_the_next_node_at_once(rango_factory, publisher_factory):
    lost, spare = TcpProxy(BROKER), TcpProxy(BROKER)
    with ExitStack() as stack:
        stack.callback(lost.close)
        stack.callback(spare.close)
        rango = rango_factory(args=[*addr(lost.port, spare.port), "--workers", "1"])
        [worker] = rango.worker_pids()
        publisher = publisher_factory(rango.exchange)  # straight to the broker
        market = unique()
        trades, book = open_book(stack, rango, publisher, market)
        assert nodes(rango) == {"0": (f"127.0.0.1:{lost.port}", 1.0)}
        offset = len(rango.log())

        lost.off()  # the node goes: its connection is reset, new ones refused
        took = first_marker_after(publisher, trades, f"{market}.trades", time.monotonic())
        assert took <= RESUME, f"delivery resumed {took:.2f} s after the node was lost"
        assert_alive(book)
        # No backoff: the next node was tried at once, and the refusing one not again.
        assert lost.refused == 0, lost.refused
        [line] = amqp_problems(rango.log()[offset:])
        assert f"127.0.0.1:{lost.port} lost" in line and f"trying 127.0.0.1:{spare.port}" in line
        assert "guest" not in line, line
        assert f"on 127.0.0.1:{spare.port}" in rango.log()[offset:]
        # The metric names the new node; the node left has no series any more.
        wait_logged(rango, lambda: nodes(rango) == {"0": (f"127.0.0.1:{spare.port}", 1.0)},
                    5, "rango_amqp_connected on the new node")
        assert rango.ready_status() == 200
        # Events may have been missed in between: the stored book was dropped.
        check_recovered(rango, publisher, market, trades, book)
        assert rango.worker_pids() == [worker]


def test_workers_spread_over_the_nodes(rango_factory, publisher_factory):
    first, second = TcpProxy(BROKER), TcpProxy(BROKER)
    with ExitStack() as stack:
        stack.callback(first.close)
        stack.callback(second.close)
        rango = rango_factory(args=[*addr(first.port, second.port), "--workers", "3"])
        wait_logged(rango, lambda: len(nodes(rango)) == 3, 10, "three workers' series")
        assert nodes(rango) == {
            "0": (f"127.0.0.1:{first.port}", 1.0),
            "1": (f"127.0.0.1:{second.port}", 1.0),
            "2": (f"127.0.0.1:{first.port}", 1.0),
        }
        assert (first.accepted, second.accepted) == (2, 1)


def test_every_node_lost_then_one_back(rango_factory, publisher_factory):
    one, two = TcpProxy(BROKER), TcpProxy(BROKER)
    with ExitStack() as stack:
        stack.callback(one.close)
        stack.callback(two.close)
        rango = rango_factory(args=[*addr(one.port, two.port), "--workers", "1"])
        publisher = publisher_factory(rango.exchange)
        market = unique()
        trades, book = open_book(stack, rango, publisher, market)
        offset = len(rango.log())
        one.off()
        two.off()
        wait_logged(rango, lambda: rango.ready_status() == 503, 10, "/ready answering 503")
        # Both were tried, then the list again, with backoff: said once, not per attempt.
        wait_logged(rango, lambda: one.refused >= 2 and two.refused >= 2, 15, "a second round")
        problems = amqp_problems(rango.log()[offset:])
        assert len(problems) == 2, problems  # the move, then the outage
        assert "no node of 2 reachable" in problems[1], problems
        assert_alive(trades)

        two.on()
        took = first_marker_after(publisher, trades, f"{market}.trades", time.monotonic())
        assert took <= RESUME, f"delivery resumed {took:.2f} s after a node was back"
        assert "RabbitMQ is back" in rango.log()[offset:]
        assert rango.ready_status() == 200
        check_recovered(rango, publisher, market, trades, book)


def test_a_node_that_accepts_and_stalls_is_given_up(rango_factory, publisher_factory):
    """A listening socket nobody serves: TCP connects (the kernel's backlog), the AMQP
    handshake never answers. The worker gives that node up after pika's stack timeout
    (5 s, not pika's default 15 s) and consumes from the next."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    spare = TcpProxy(BROKER)
    with ExitStack() as stack:
        stack.callback(silent.close)
        stack.callback(spare.close)
        started = time.monotonic()
        rango = rango_factory(
            args=[*addr(silent.getsockname()[1], spare.port), "--workers", "1"], wait=False
        )
        wait_logged(rango, consuming_on(rango, spare.port), 15, "consuming from the second node")
        took = time.monotonic() - started
        assert 4.0 <= took < 12.0, f"moved after {took:.1f} s"
        [line] = amqp_problems(rango.log())
        assert f"127.0.0.1:{silent.getsockname()[1]}" in line and "trying" in line, line
        delivers(rango, publisher_factory(rango.exchange))


def test_nodes_that_drop_every_connection_get_backoff_not_a_loop(rango_factory):
    """Each node accepts, lets the worker consume, and resets the connection 0.3 s later.
    A consume that did not last 1 s is no success: the failure count goes on, so the
    moves slow down to the 2 s backoff instead of reconnecting every 0.3 s forever."""
    one, two = TcpProxy(BROKER, cut_after=0.3), TcpProxy(BROKER, cut_after=0.3)
    with ExitStack() as stack:
        stack.callback(one.close)
        stack.callback(two.close)
        rango = rango_factory(args=[*addr(one.port, two.port), "--workers", "1"], wait=False)
        wait_logged(rango, lambda: one.accepted + two.accepted >= 2, 10, "a first move")
        start, accepted = time.monotonic(), one.accepted + two.accepted
        # Reconnecting at once would make ~8 connections a second; with the backoff
        # (0.25, 0.5, 1, 2 s per round of both nodes) it is a few in all.
        wait_logged(rango, lambda: time.monotonic() - start >= 6, 10, "six seconds")
        made = one.accepted + two.accepted - accepted
        assert made <= 10, f"{made} connections in 6 s"
        assert not rango.exited()
        problems = amqp_problems(rango.log())
        assert len(problems) <= 2 * made + 4, problems


def test_a_node_that_stalls_after_the_login_is_given_up(rango_factory, publisher_factory):
    """A node that completes the AMQP handshake, then never opens the channel (heartbeats
    would keep such a connection alive for good): the worker ends the attempt when no
    consume came within 10 s of connecting, and consumes from the next node."""
    stalling, spare = StallingBroker(), TcpProxy(BROKER)
    with ExitStack() as stack:
        stack.callback(stalling.close)
        stack.callback(spare.close)
        started = time.monotonic()
        rango = rango_factory(
            args=[*addr(stalling.port, spare.port), "--workers", "1"], wait=False
        )
        wait_logged(rango, lambda: stalling.stalled >= 1, 10, "the channel left unanswered")
        wait_logged(rango, consuming_on(rango, spare.port), 20, "consuming from the second node")
        took = time.monotonic() - started
        assert 9.0 <= took < 16.0, f"moved after {took:.1f} s"
        [line] = amqp_problems(rango.log())
        assert "no consume within 10 s" in line and f"trying 127.0.0.1:{spare.port}" in line
        delivers(rango, publisher_factory(rango.exchange))
