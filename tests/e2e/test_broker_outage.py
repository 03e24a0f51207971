"""RabbitMQ outages: down at start, connection closed by the broker, connection cut.

The gateway reaches the broker through :class:`support.broker.TcpProxy` where a test
needs to switch it off and on; the real RabbitMQ server is never stopped (others use it).
"""

from __future__ import annotations

import re
from contextlib import ExitStack
from typing import Any

import orjson
from support.answers import recv_json, subscribed
from support.broker import BROKER, TcpProxy, amqp_connections_of, close_amqp_connection, unique
from support.gateway import accepts
from support.outage import RECOVERY, SNAP1, amqp_problems, check_recovered, open_book, proxied
from support.polling import wait_for, wait_logged


def test_broker_down_at_start(rango_factory, publisher_factory):
    # Nothing listens on the broker's port at first: connections are refused.
    proxy = TcpProxy(BROKER, enabled=False, listening=False)
    try:
        _broker_down_at_start(rango_factory, publisher_factory, proxy)
    finally:
        proxy.close()


def _broker_down_at_start(rango_factory: Any, publisher_factory: Any, proxy: TcpProxy) -> None:
    rango = rango_factory(args=proxied(proxy), wait=False)
    publisher = publisher_factory(rango.exchange)
    market = unique()

    wait_for(lambda: rango.exited() or accepts(rango.port), 20, "the websocket port")
    assert not rango.exited(), rango.log()
    assert rango.ready_status() == 503
    # Clients are served while the broker is away: connect, subscribe both ways.
    with rango.connect(query=f"stream={market}.trades") as ws:
        assert recv_json(ws) == subscribed([f"{market}.trades"])
        ws.send(orjson.dumps({"event": "subscribe", "streams": [f"{market}.ob-inc"]}).decode())
        assert recv_json(ws) == subscribed([f"{market}.trades", f"{market}.ob-inc"])

        [line] = wait_logged(rango, lambda: amqp_problems(rango.log()), 10, "an AMQP error")
        # It says what failed, where: the operator's first question.
        assert f"127.0.0.1:{proxy.port}" in line and "refused" in line.lower(), line
        # Then attempts fail differently (accepted, then reset): still not one line each.
        proxy.listen()
        wait_logged(rango, lambda: proxy.refused >= 2, 15, "two more connection attempts")
        assert rango.ready_status() == 503
        assert not rango.exited()
        assert amqp_problems(rango.log()) == [line]

        proxy.on()
        wait_logged(rango, lambda: rango.ready_status() == 200, RECOVERY, "/ready answering 200")
        publisher.publish(f"public.{market}.trades", {"tid": 1})
        assert recv_json(ws) == {f"{market}.trades": {"tid": 1}}
        publisher.publish(f"public.{market}.ob-snap", SNAP1)  # first snapshot: sent
        assert recv_json(ws) == {f"{market}.ob-snap": SNAP1}

    log = rango.log()
    assert len(amqp_problems(log)) == 2, log  # unreachable once, back once
    assert len(re.findall(r"RabbitMQ is back", log)) == 1, log


def test_connection_closed_by_broker(rango_factory, publisher_factory):
    rango = rango_factory(args=["--workers", "1"])
    publisher = publisher_factory(rango.exchange)
    market = unique()
    with ExitStack() as stack:
        trades, book = open_book(stack, rango, publisher, market)
        [worker] = rango.worker_pids()
        connections = amqp_connections_of(worker)
        assert len(connections) == 1, connections
        close_amqp_connection(connections[0], "test")

        # Once the broker has let the old one go no marker can come through it; a
        # single new one means no connection leaked on the way.
        def replaced() -> list[str]:
            now = amqp_connections_of(worker)
            return now if now and connections[0] not in now else []

        current = wait_logged(rango, replaced, 10, "a new connection in place of the old one")
        assert len(current) == 1, current
        check_recovered(rango, publisher, market, trades, book)
    assert rango.worker_pids() == [worker], "the worker was replaced"
    log = rango.log()
    assert len(amqp_problems(log)) == 2, log  # "connection lost" once, "back" once
    assert "CONNECTION_FORCED" in log


def test_connection_cut_mid_run(rango_factory, publisher_factory, proxy):
    rango = rango_factory(args=proxied(proxy))
    publisher = publisher_factory(rango.exchange)
    market = unique()
    with ExitStack() as stack:
        trades, book = open_book(stack, rango, publisher, market)
        assert proxy.accepted == 1
        proxy.off()
        wait_logged(rango, lambda: rango.ready_status() == 503, 10, "/ready answering 503")
        wait_logged(rango, lambda: proxy.refused >= 2, 10, "two reconnection attempts")
        proxy.on()
        wait_logged(rango, lambda: rango.ready_status() == 200, RECOVERY, "/ready answering 200")
        assert proxy.accepted == 2
        check_recovered(rango, publisher, market, trades, book)
    log = rango.log()
    assert len(amqp_problems(log)) == 2, log  # lost once (not once per attempt), back once
