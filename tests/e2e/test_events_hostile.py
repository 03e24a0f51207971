"""Hostile events from RabbitMQ: oversized, not JSON, not UTF-8, bad routing keys, storms
of increments without a book and of snapshots (PROTOCOL §5).

Each is dropped or handled as PROTOCOL §5 says, counted in
``rango_events_dropped_total{reason}``, logged at a bounded rate (one line per reason
per 10 s), and the worker keeps serving: a marker published after is delivered.

Each kind of bad routing key and body, one at a time, is in
test_events.py::test_dropped_events_deliver_nothing; here they come in storms.
"""

from __future__ import annotations

import collections
import re
import time
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from support.answers import expect, recv_json, subscribed
from support.broker import Publisher, unique
from support.gateway import Rango
from support.metrics import counter, wait_counter

MAX_EVENT = 1024
ENV = {"RANGO_MAX_EVENT_SIZE": str(MAX_EVENT)}
DROPPED = "rango_events_dropped_total"
STORM = 5000
# The worker's log line for each reason (workers/worker.py), to count them.
DESCRIPTIONS = {
    "bad_routing_key": "routing key is not",
    "bad_body": "body is not JSON",
    "too_large": "larger than RANGO_MAX_EVENT_SIZE",
    "no_snapshot": "increment before any snapshot",
}


@pytest.fixture(scope="module")
def ev(keys: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rango]:
    with Rango(keys, tmp_path_factory.mktemp("events"), env=ENV) as instance:
        yield instance


@pytest.fixture
def pub(ev: Rango, publisher_factory: Any) -> Publisher:
    return publisher_factory(ev.exchange)


def drop_lines(log: str) -> collections.Counter[str]:
    """``dropped event`` lines by reason."""
    found: collections.Counter[str] = collections.Counter()
    for line in log.splitlines():
        if "dropped event" in line:
            assert " WARNING " in line, line
            reasons = [r for r, text in DESCRIPTIONS.items() if text in line]
            assert len(reasons) == 1, line
            found[reasons[0]] += 1
    return found


def exact_count(rango: Rango, reason: str, value: float) -> None:
    """The drop counter reaches ``value`` and stays there (nothing counted twice)."""
    assert wait_counter(rango, DROPPED, value, reason=reason) == value


def test_body_over_max_event_size_is_dropped(ev, pub):
    m, uid = unique(), unique("ID")
    before = counter(ev, DROPPED, reason="too_large")
    fits = b'{"pad":"' + b"x" * (MAX_EVENT - 10) + b'"}'
    assert len(fits) == MAX_EVENT
    over = fits[:-2] + b'x"}'
    with ev.connect(query=f"stream={m}.trades,{m}.ob-inc,{m}.marker") as ws:
        expect(ws, subscribed([f"{m}.trades", f"{m}.ob-inc", f"{m}.marker"]))
        pub.publish(f"public.{m}.trades", fits)
        pub.publish(f"public.{m}.trades", over)
        pub.publish(f"public.{m}.trades", b"[" + b"1," * (1 << 19) + b"1]")  # 1 MB
        pub.publish(f"private.{uid}.order", over)
        pub.publish(f"public.{m}.ob-snap", b'{"bids":[' + b'["1.0","2.0"],' * 100 + b"[]]}")
        pub.publish(f"public.{m}.marker", {"marker": 1})
        expect(ws, {f"{m}.trades": orjson.loads(fits)})
        expect(ws, {f"{m}.marker": {"marker": 1}})  # and the snapshot was not sent
    exact_count(ev, "too_large", before + 4)
    with ev.connect(query=f"stream={m}.ob-inc") as late:  # ... nor stored
        expect(late, subscribed([f"{m}.ob-inc"]))


def test_storm_of_bad_events(rango_factory, publisher_factory):
    """5000 bad events of every kind: counted exactly, a handful of log lines, still serving."""
    rango = rango_factory(env=ENV)
    publisher = publisher_factory(rango.exchange)
    m = unique()
    ok = b'{"n":1}'
    kinds = [
        (f"public.{m}.trades", b"not json", "bad_body"),
        (f"public.{m}.trades", b'"\xff\xfe"', "bad_body"),
        (f"global.{m}", b"\xef\xbb\xbf{}", "bad_body"),  # a UTF-8 byte order mark
        (f"public.{m}.trades", b'"' + b"x" * 2000 + b'"', "too_large"),
        (f"public..{m}", ok, "bad_routing_key"),
        (f"public.{m}.", ok, "bad_routing_key"),
        (m, ok, "bad_routing_key"),
        (f"public.{m}.trades.x", ok, "bad_routing_key"),
        (f"{m}.trades", ok, "bad_routing_key"),  # two parts, scope neither public nor global
        (f"public.{m}.ob-inc", ok, "no_snapshot"),
    ]
    expected = collections.Counter(kinds[n % len(kinds)][2] for n in range(STORM))
    received = counter(rango, "rango_events_received_total")
    with rango.connect(query=f"stream={m}.trades,{m}.ob-inc,global.{m},{m}.marker") as ws:
        expect(ws, subscribed([f"{m}.trades", f"{m}.ob-inc", f"global.{m}", f"{m}.marker"]))
        offset = len(rango.log())
        started = time.monotonic()
        for n in range(STORM):
            key, body, _ = kinds[n % len(kinds)]
            publisher.publish(key, body)
        # Three-part keys with an unknown scope are prefixed events (PROTOCOL §5):
        # routed to no one here, not dropped.
        for n in range(100):
            publisher.publish(f"x{m}.{m}.trades", {"n": n})
        publisher.publish(f"public.{m}.marker", {"marker": 1})
        expect(ws, {f"{m}.marker": {"marker": 1}}, timeout=30)  # and nothing before it
        elapsed = time.monotonic() - started
    for reason, count in expected.items():
        exact_count(rango, reason, count)
    wait_counter(rango, "rango_events_received_total", received + STORM + 101)
    lines = drop_lines(rango.log()[offset:])
    # One line per reason per 10 s (plus the first of each).
    assert set(lines) == set(expected), lines
    assert all(n <= 2 + elapsed / 10 for n in lines.values()), (lines, elapsed)
    assert "Traceback" not in rango.log()


def test_increment_storm_without_snapshot(ev, pub):
    m = unique()
    before = counter(ev, DROPPED, reason="no_snapshot")
    offset = len(ev.log())
    with ev.connect(query=f"stream={m}.ob-inc,{m}.marker") as ws:
        expect(ws, subscribed([f"{m}.ob-inc", f"{m}.marker"]))
        started = time.monotonic()
        for n in range(STORM):
            pub.publish(f"public.{m}.ob-inc", {"sequence": n})
        pub.publish(f"public.{m}.marker", {"marker": 1})
        expect(ws, {f"{m}.marker": {"marker": 1}}, timeout=30)  # no increment came through
        elapsed = time.monotonic() - started
        pub.publish(f"public.{m}.ob-snap", {"sequence": STORM})
        pub.publish(f"public.{m}.ob-inc", {"sequence": STORM + 1})
        expect(ws, {f"{m}.ob-snap": {"sequence": STORM}})
        expect(ws, {f"{m}.ob-inc": {"sequence": STORM + 1}})
    exact_count(ev, "no_snapshot", before + STORM)
    assert drop_lines(ev.log()[offset:])["no_snapshot"] <= 2 + elapsed / 10


def test_snapshot_storm(ev, pub):
    m = unique()
    with ev.connect(query=f"stream={m}.ob-inc,{m}.marker") as waiting:
        expect(waiting, subscribed([f"{m}.ob-inc", f"{m}.marker"]))
        for n in range(STORM):
            pub.publish(f"public.{m}.ob-snap", {"sequence": n})
        pub.publish(f"public.{m}.marker", {"marker": 1})
        # Only the first snapshot goes out, to the subscriber that was waiting for a book.
        expect(waiting, {f"{m}.ob-snap": {"sequence": 0}}, timeout=30)
        expect(waiting, {f"{m}.marker": {"marker": 1}})
        with ev.connect(query=f"stream={m}.ob-inc") as late:
            expect(late, {f"{m}.ob-snap": {"sequence": STORM - 1}})
            expect(late, subscribed([f"{m}.ob-inc"]))
            pub.publish(f"public.{m}.ob-inc", {"sequence": STORM})
            for ws in (waiting, late):
                expect(ws, {f"{m}.ob-inc": {"sequence": STORM}})


def _marker_or_lost(rango: Rango, ws: Any, frame: Any, offset: int) -> bool:
    """True once ``ws`` receives ``frame``; False once the log says the AMQP connection
    was lost (the marker then never comes: the worker's queue went with it)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            got = recv_json(ws, timeout=0.1)
        except TimeoutError:
            if re.search(r"RabbitMQ .* lost", rango.log()[offset:]):
                return False
            continue
        assert got == frame, got
        return True
    raise AssertionError("neither the marker nor a lost connection within 10 s")


def test_routing_key_not_utf8_is_dropped_without_reconnecting(ev, pub):
    m = unique()
    before = counter(ev, DROPPED, reason="bad_routing_key")
    offset = len(ev.log())
    with ev.connect(query=f"stream={m}.ob-inc,{m}.marker") as ws:
        expect(ws, subscribed([f"{m}.ob-inc", f"{m}.marker"]))
        pub.publish(f"public.{m}.ob-snap", {"sequence": 1})
        expect(ws, {f"{m}.ob-snap": {"sequence": 1}})
        pub.channel.basic_publish(ev.exchange, f"public.{m}.".encode() + b"\xff\xfe", b"{}")
        pub.publish(f"public.{m}.marker", {"marker": 1})
        assert _marker_or_lost(ev, ws, {f"{m}.marker": {"marker": 1}}, offset), ev.log()[offset:]
        with ev.connect(query=f"stream={m}.ob-inc") as late:  # the book was kept
            expect(late, {f"{m}.ob-snap": {"sequence": 1}})
            expect(late, subscribed([f"{m}.ob-inc"]))
    exact_count(ev, "bad_routing_key", before + 1)
    assert ev.ready()
