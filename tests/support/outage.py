"""The broker-outage scenario the broker tests share (e2e/test_broker_*.py): clients with
an order book stored in the gateway before the outage, the wait through it, and the
proof after it that delivery resumed and no stale book survived (PROTOCOL §5).
"""

from __future__ import annotations

import re
import time
from contextlib import ExitStack
from typing import Any

from websockets.sync.client import ClientConnection

from support.answers import assert_alive, recv_json, subscribed
from support.broker import TcpProxy
from support.polling import wait_logged

# The consumer retries at most every 2 s, so it must be back within this after the broker is.
RECOVERY = 8.0
# Delivery resumes this soon after the broker (or the exchange) is back.
RESUME = 3.0
OUTAGE = 30.0

SNAP1 = {"bids": [["1000.0", "0.25"]], "asks": [["1020.0", "0.005"]], "sequence": 1}
INC1 = {"asks": [["1020.0", "0.015"]], "sequence": 2}
SNAP2 = {"bids": [["990.0", "1.0"]], "asks": [["1010.0", "2.0"]], "sequence": 100}
INC_LOST = {"asks": [["1011.0", "9.9"]], "sequence": 101}
INC2 = {"asks": [["1010.0", "0"]], "sequence": 102}


def proxied(proxy: TcpProxy) -> list[str]:
    """Gateway flags: one worker, reaching the broker through ``proxy``."""
    return ["--amqp-addr", f"amqp://guest:guest@127.0.0.1:{proxy.port}/", "--workers", "1"]


def amqp_problems(log: str) -> list[str]:
    """Warning and error lines of the AMQP consumer."""
    return [
        line
        for line in log.splitlines()
        if " rango.amqp: " in line and re.search(r" (WARNING|ERROR|CRITICAL) ", line)
    ]


def first_marker(
    publisher: Any, ws: ClientConnection, stream: str, every: float, deadline: float, failure: str
) -> float:
    """Publish a numbered marker to ``stream`` every ``every`` seconds until ``ws``
    receives one (by the monotonic ``deadline``, else ``failure``); return when it
    arrived. The markers still in flight are read too: in order, none twice, and
    ``ws`` receives nothing else.

    Markers published while the gateway has no queue are lost, which is expected;
    the first one received proves delivery resumed.
    """
    n = 0
    due = time.monotonic()
    while True:
        if time.monotonic() >= due:
            publisher.publish(f"public.{stream}", {"marker": n})
            n += 1
            due += every
        try:
            frame = recv_json(ws, timeout=max(0.005, due - time.monotonic()))
            break
        except TimeoutError:
            assert time.monotonic() < deadline, failure
    arrived = time.monotonic()
    assert list(frame) == [stream] and "marker" in frame[stream], frame
    last = frame[stream]["marker"]
    # Later markers may still be in flight: a sentinel marks the end of them.
    publisher.publish(f"public.{stream}", {"sentinel": True})
    while (frame := recv_json(ws)) != {stream: {"sentinel": True}}:
        assert frame[stream]["marker"] > last, frame  # in order, none repeated
        last = frame[stream]["marker"]
    return arrived


def first_marker_after(publisher: Any, ws: ClientConnection, stream: str, since: float) -> float:
    """:func:`first_marker` every 100 ms; the seconds from ``since`` until it arrived."""
    deadline = since + RESUME + 10
    return first_marker(publisher, ws, stream, 0.1, deadline, "delivery did not resume") - since


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
    first_marker(
        publisher, trades, f"{market}.trades", 0.2, time.monotonic() + RECOVERY,
        "no event delivered after the reconnect",
    )  # fmt: skip
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


def sit_out_outage(rango: Any, worker: int, clients: list[ClientConnection]) -> None:
    """Wait OUTAGE seconds with the broker away, checking all the while that clients stay
    connected and served, /ready answers 503, and the worker neither exits nor is replaced."""
    wait_logged(rango, lambda: rango.ready_status() == 503, 10, "/ready answering 503")
    back_at = time.monotonic() + OUTAGE
    while (left := back_at - time.monotonic()) > 0:
        for ws in clients:
            assert_alive(ws)
        assert rango.ready_status() == 503
        assert rango.worker_pids() == [worker], rango.log()
        time.sleep(min(1.0, left))  # the outage itself: nothing to wait for
