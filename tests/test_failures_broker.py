"""RabbitMQ failures: down at start, connection closed by the broker, connection cut.

The gateway reaches the broker through :class:`faults.TcpProxy` where a test needs to
switch it off and on; the real RabbitMQ server is never stopped (others use it).
"""

from __future__ import annotations

import itertools
import re
import time
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import orjson
import pytest
from conftest import recv_json, unique, wait_for
from faults import (
    TcpProxy,
    accepts,
    amqp_connections_of,
    close_amqp_connection,
    ready_status,
    worker_pids,
)
from websockets.sync.client import ClientConnection

BROKER = ("127.0.0.1", 5672)
# The consumer retries at most every 2 s, so it must be back within this after the broker is.
RECOVERY = 8.0

SNAP1 = {"bids": [["1000.0", "0.25"]], "asks": [["1020.0", "0.005"]], "sequence": 1}
INC1 = {"asks": [["1020.0", "0.015"]], "sequence": 2}
SNAP2 = {"bids": [["990.0", "1.0"]], "asks": [["1010.0", "2.0"]], "sequence": 100}
INC_LOST = {"asks": [["1011.0", "9.9"]], "sequence": 101}
INC2 = {"asks": [["1010.0", "0"]], "sequence": 102}


def wait_logged(rango: Any, predicate: Any, timeout: float, what: str) -> Any:
    """:func:`wait_for`, with the gateway's log in the failure message."""
    try:
        return wait_for(predicate, timeout, what)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n--- rango log ---\n{rango.log()}") from None


def subscribed(streams: list[str]) -> dict[str, Any]:
    return {"success": {"message": "subscribed", "streams": streams}}


@pytest.fixture
def proxy() -> Iterator[TcpProxy]:
    p = TcpProxy(BROKER)
    yield p
    p.close()


def proxied(proxy: TcpProxy) -> list[str]:
    return ["--amqp-addr", f"amqp://guest:guest@127.0.0.1:{proxy.port}/", "--workers", "1"]


def amqp_problems(log: str) -> list[str]:
    """Warning and error lines of the AMQP consumer."""
    return [
        line
        for line in log.splitlines()
        if " rango.amqp: " in line and re.search(r" (WARNING|ERROR|CRITICAL) ", line)
    ]


def publish_until_received(
    publisher: Any, market: str, ws: ClientConnection, timeout: float = RECOVERY
) -> None:
    """Publish numbered markers until ``ws`` receives one, then drain the later ones.

    Markers published while the gateway has no queue are lost, which is expected;
    the first one received proves delivery resumed. ``ws`` receives nothing else.
    """
    deadline = time.monotonic() + timeout
    stream = f"{market}.trades"
    for n in itertools.count():
        publisher.publish(f"public.{stream}", {"marker": n})
        try:
            frame = recv_json(ws, timeout=0.2)
        except TimeoutError:
            assert time.monotonic() < deadline, "no event delivered after the reconnect"
            continue
        assert set(frame) == {stream} and "marker" in frame[stream], frame
        last = n
        break
    # Later markers may still be in flight: a sentinel marks the end of them.
    publisher.publish(f"public.{stream}", {"sentinel": True})
    while (frame := recv_json(ws)) != {stream: {"sentinel": True}}:
        assert frame[stream]["marker"] > last, frame  # in order, none repeated
        last = frame[stream]["marker"]


def open_book(
    stack: ExitStack, rango: Any, publisher: Any, market: str
) -> tuple[ClientConnection, ClientConnection]:
    """A trades client and an order-book client, with SNAP1 + INC1 stored in the gateway."""
    trades = stack.enter_context(rango.connect(query=f"stream={market}.trades"))
    assert recv_json(trades) == subscribed([f"{market}.trades"])
    book = stack.enter_context(rango.connect(query=f"stream={market}.ob-inc"))
    assert recv_json(book) == subscribed([f"{market}.ob-inc"])
    publisher.publish(f"public.{market}.ob-snap", SNAP1)
    assert recv_json(book) == {f"{market}.ob-snap": SNAP1}  # the first snapshot goes out
    publisher.publish(f"public.{market}.ob-inc", INC1)
    assert recv_json(book) == {f"{market}.ob-inc": INC1}
    publisher.publish(f"public.{market}.trades", {"tid": 1})
    assert recv_json(trades) == {f"{market}.trades": {"tid": 1}}
    # Control: before any reconnect a new subscriber gets the stored book.
    with rango.connect(query=f"stream={market}.ob-inc") as probe:
        assert recv_json(probe) == {f"{market}.ob-snap": SNAP1}
        assert recv_json(probe) == {f"{market}.ob-inc": INC1}
        assert recv_json(probe) == subscribed([f"{market}.ob-inc"])
    return trades, book


def check_recovered(
    rango: Any, publisher: Any, market: str, trades: ClientConnection, book: ClientConnection
) -> None:
    """After a reconnect: delivery resumed to the same clients, and the stored book is gone."""
    publish_until_received(publisher, market, trades)
    # PROTOCOL §5: no snapshot survives a reconnect (events may have been missed).
    with rango.connect(query=f"stream={market}.ob-inc") as fresh:
        assert recv_json(fresh) == subscribed([f"{market}.ob-inc"]), "stale snapshot sent"
        publisher.publish(f"public.{market}.ob-inc", INC_LOST)  # no snapshot: dropped
        publisher.publish(f"public.{market}.ob-snap", SNAP2)
        publisher.publish(f"public.{market}.ob-inc", INC2)
        for ws in (fresh, book):  # the next snapshot goes to every waiting subscriber
            assert recv_json(ws) == {f"{market}.ob-snap": SNAP2}
            assert recv_json(ws) == {f"{market}.ob-inc": INC2}
    with rango.connect(query=f"stream={market}.ob-inc") as late:
        assert recv_json(late) == {f"{market}.ob-snap": SNAP2}
        assert recv_json(late) == {f"{market}.ob-inc": INC2}
        assert recv_json(late) == subscribed([f"{market}.ob-inc"])
    publisher.publish(f"public.{market}.trades", {"tid": 2})
    assert recv_json(trades) == {f"{market}.trades": {"tid": 2}}


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
    assert ready_status(rango) == 503
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
        assert ready_status(rango) == 503
        assert not rango.exited()
        assert amqp_problems(rango.log()) == [line]

        proxy.on()
        wait_logged(rango, lambda: ready_status(rango) == 200, RECOVERY, "/ready answering 200")
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
        [worker] = worker_pids(rango.pid)
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
    assert worker_pids(rango.pid) == [worker], "the worker was replaced"
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
        wait_logged(rango, lambda: ready_status(rango) == 503, 10, "/ready answering 503")
        wait_logged(rango, lambda: proxy.refused >= 2, 10, "two reconnection attempts")
        proxy.on()
        wait_logged(rango, lambda: ready_status(rango) == 200, RECOVERY, "/ready answering 200")
        assert proxy.accepted == 2
        check_recovered(rango, publisher, market, trades, book)
    log = rango.log()
    assert len(amqp_problems(log)) == 2, log  # lost once (not once per attempt), back once
