"""PROTOCOL §5, end to end: routing keys, bodies, order, order-book snapshots and increments.

"Nothing delivered" is proven with a marker: after the event that must not arrive,
a marker event is published on a stream the client watches; RabbitMQ keeps the
order of one publisher's messages, so the marker must be the very next frame.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Any

import orjson
import pytest
from support.answers import expect, recv_json, request, subscribe, subscribed, unsubscribed
from support.broker import Publisher, unique
from websockets.sync.client import ClientConnection

# Routing keys


def test_public_event(rango, publisher):
    m = unique()
    body = {"trades": [{"tid": 7, "taker_type": "buy", "date": 1588000798, "price": "1020.0",
                        "amount": "0.001"}]}  # fmt: skip
    with rango.connect("/public", f"stream={m}.trades") as ws:
        expect(ws, subscribed([f"{m}.trades"]))
        publisher.publish(f"public.{m}.trades", body)
        expect(ws, {f"{m}.trades": body})


def test_private_event(rango, keys, publisher):
    uid = unique("ID")
    body = {"id": 22, "at": 1588000798, "market": "eurusd", "kind": "bid", "price": "1026.0",
            "state": "wait", "volume": "0.001", "origin_volume": "0.001"}  # fmt: skip
    with rango.connect("/private", "stream=order", additional_headers=keys.bearer(uid=uid)) as ws:
        expect(ws, subscribed(["order"]))
        publisher.publish(f"private.{uid}.order", body)
        expect(ws, {"order": body})


def test_prefixed_event(rango, keys, publisher):
    m = unique()
    with rango.connect(
        "/private", f"stream=admin.{m}.ob-inc", additional_headers=keys.bearer(role="admin")
    ) as ws:
        expect(ws, subscribed([f"admin.{m}.ob-inc"]))
        publisher.publish(f"admin.{m}.ob-inc", {"bids": [["1000.0", "0"]], "sequence": 497776})
        expect(ws, {f"{m}.ob-inc": {"bids": [["1000.0", "0"]], "sequence": 497776}})


@pytest.mark.parametrize("scope", ["global", "public"])
def test_two_part_public_and_global_keys(rango, publisher, scope):
    event = unique("tickers")
    with rango.connect("/", f"stream={scope}.{event}") as ws:
        expect(ws, subscribed([f"{scope}.{event}"]))
        publisher.publish(f"{scope}.{event}", {"eurusd": {"last": "1000.0"}})
        expect(ws, {f"{scope}.{event}": {"eurusd": {"last": "1000.0"}}})


def test_global_tickers_as_three_part_public_key(rango, publisher):
    """``public.<scope>.tickers`` (like §8's ``public.global.tickers``) -> ``<scope>.tickers``."""
    scope = unique("g")
    with rango.connect("/", f"stream={scope}.tickers") as ws:
        expect(ws, subscribed([f"{scope}.tickers"]))
        publisher.publish(f"public.{scope}.tickers", {"n": 1})
        expect(ws, {f"{scope}.tickers": {"n": 1}})


def test_events_for_other_streams_are_not_delivered(rango, publisher):
    m = unique()
    with rango.connect("/", f"stream={m}.trades") as ws:
        expect(ws, subscribed([f"{m}.trades"]))
        publisher.publish(f"public.{m}.tickers", {"n": 0})
        publisher.publish(f"public.{unique()}.trades", {"n": 0})
        publisher.publish(f"global.{m}", {"n": 0})
        publisher.publish(f"public.{m}.trades", {"n": 1})
        expect(ws, {f"{m}.trades": {"n": 1}})


# Dropped events


@pytest.fixture
def watcher(rango, keys):
    """A connection that watches every stream a dropped event could reach."""
    m, uid = unique(), unique("ID")
    other = unique("x")
    streams = [
        f"{m}.trades", f"{m}.marker", "order", f"{other}.bar", f"admin.{m}.x",
        f"global.{m}", m,
    ]  # fmt: skip
    with rango.connect("/private", additional_headers=keys.bearer(uid=uid, role="admin")) as ws:
        expect(ws, subscribed([]))
        request(ws, "subscribe", streams)
        expect(ws, subscribed(streams))
        yield ws, m, uid, other


def drop_cases(m: str, uid: str, other: str) -> dict[str, tuple[str, bytes]]:
    ok = b'{"dropped":true}'
    return {
        "other two-part key": (f"{other}.bar", ok),
        "two-part private": (f"private.{uid}", ok),
        "one part": (m, ok),
        "one part private": ("order", ok),
        "four parts public": (f"public.{m}.trades.x", ok),
        "four parts private": (f"private.{uid}.order.x", ok),
        "four parts prefixed": (f"admin.{m}.x.y", ok),
        "five parts": (f"public.{m}.trades.x.y", ok),
        "empty middle": (f"public..{m}", ok),
        "empty event": (f"public.{m}.", ok),
        "empty scope": (f".{m}.trades", ok),
        "two-part empty event": ("global.", ok),
        "body not JSON": (f"public.{m}.trades", b"not json"),
        "body empty": (f"public.{m}.trades", b""),
        "body truncated": (f"public.{m}.trades", b'{"a":'),
        "body two values": (f"public.{m}.trades", b"1 2"),
        "body NaN": (f"public.{m}.trades", b"NaN"),
        "body invalid UTF-8": (f"public.{m}.trades", b'"\xff\xfe"'),
        "private body not JSON": (f"private.{uid}.order", b"{oops}"),
        "prefixed body not JSON": (f"admin.{m}.x", b"<xml/>"),
        "global body not JSON": (f"global.{m}", b"nope"),
    }


DROP_NAMES = list(drop_cases("m", "u", "o"))


@pytest.mark.parametrize("name", DROP_NAMES)
def test_dropped_events_deliver_nothing(watcher, publisher, name):
    ws, m, uid, other = watcher
    key, body = drop_cases(m, uid, other)[name]
    publisher.publish(key, body)
    publisher.publish(f"public.{m}.marker", {"marker": 1})
    expect(ws, {f"{m}.marker": {"marker": 1}})
    # ... and nothing else changed: the next good event is delivered as usual.
    publisher.publish(f"public.{m}.trades", {"n": 2})
    expect(ws, {f"{m}.trades": {"n": 2}})


def test_many_drops_then_good_events(watcher, publisher):
    ws, m, uid, other = watcher
    for key, body in drop_cases(m, uid, other).values():
        publisher.publish(key, body)
    publisher.publish(f"private.{uid}.order", {"n": 1})
    publisher.publish(f"admin.{m}.x", {"n": 2})
    publisher.publish(f"global.{m}", {"n": 3})
    expect(ws, {"order": {"n": 1}})
    expect(ws, {f"{m}.x": {"n": 2}})
    expect(ws, {f"global.{m}": {"n": 3}})


def test_non_json_snapshot_is_not_stored(rango, publisher):
    m = unique()
    with rango.connect("/", f"stream={m}.ob-inc,{m}.marker") as ws:
        expect(ws, subscribed([f"{m}.ob-inc", f"{m}.marker"]))
        publisher.publish(f"public.{m}.ob-snap", b"not json")
        publisher.publish(f"public.{m}.ob-inc", {"sequence": 1})  # still no book: dropped
        publisher.publish(f"public.{m}.marker", {"marker": 1})
        expect(ws, {f"{m}.marker": {"marker": 1}})
    with rango.connect("/", f"stream={m}.ob-inc") as ws:
        expect(ws, subscribed([f"{m}.ob-inc"]))


# Bodies: any JSON value, forwarded as it is

BODIES = [
    b'{"a":1}',
    b"[1588204800,215.3,226.82,201.91566271,212.43,168224.36548725003]",
    b"42",
    b"-1.5e-7",
    b'"text"',
    b"true",
    b"false",
    b"null",
    b"{}",
    b"[]",
    b'{"nested":{"list":[1,{"x":[null,true]}],"s":"\\u00e9\\"q\\""}}',
    '{"unicode":"日本語 €"}'.encode(),
    b"  \n [1, 2] \t\n",
    b'{"big":"' + b"x" * 300 + b'"}',  # 16-bit frame length
    b'{"huge":"' + b"y" * 200_000 + b'"}',  # 64-bit frame length
]


@pytest.mark.parametrize("body", BODIES, ids=[f"body{i}" for i in range(len(BODIES))])
def test_any_json_body_is_delivered(rango, keys, publisher, body):
    m, uid = unique(), unique("ID")
    value = orjson.loads(body)
    with rango.connect(
        "/",
        f"stream={m}.kline-12h,order,admin.{m}.x",
        additional_headers=keys.bearer(uid=uid, role="admin"),
    ) as ws:
        expect(ws, subscribed([f"{m}.kline-12h", "order", f"admin.{m}.x"]))
        publisher.publish(f"public.{m}.kline-12h", body)
        publisher.publish(f"private.{uid}.order", body)
        publisher.publish(f"admin.{m}.x", body)
        expect(ws, {f"{m}.kline-12h": value})
        expect(ws, {"order": value})
        expect(ws, {f"{m}.x": value})


# Private events: the right user, the right stream


def test_private_events_only_to_the_right_uid_and_when_subscribed(rango, keys, publisher):
    m = unique()
    uid1, uid2 = unique("ID"), unique("ID")

    def conn(uid: str | None, streams: str) -> Any:
        headers = keys.bearer(uid=uid) if uid else {}
        return rango.connect("/", f"stream={streams},{m}.marker", additional_headers=headers)

    with (
        conn(uid1, "order") as a,
        conn(uid1, "order") as a2,
        conn(uid2, "order") as b,
        conn(uid1, "trade") as c,
        conn(None, "order") as anon,
    ):
        for ws, streams in (
            (a, ["order"]),
            (a2, ["order"]),
            (b, ["order"]),
            (c, ["trade"]),
            (anon, []),
        ):
            expect(ws, subscribed([*streams, f"{m}.marker"]))
        publisher.publish(f"private.{uid1}.order", {"to": uid1})
        publisher.publish(f"private.{uid2}.balance", {"to": uid2})
        publisher.publish(f"public.{m}.marker", {"marker": 1})
        expect(a, {"order": {"to": uid1}})
        expect(a2, {"order": {"to": uid1}})
        for ws in (a, a2, b, c, anon):
            expect(ws, {f"{m}.marker": {"marker": 1}})
        # Unsubscribed: no more private events.
        request(a, "unsubscribe", ["order"])
        expect(a, unsubscribed([f"{m}.marker"]))
        publisher.publish(f"private.{uid1}.order", {"n": 2})
        publisher.publish(f"public.{m}.marker", {"marker": 2})
        expect(a, {f"{m}.marker": {"marker": 2}})
        expect(a2, {"order": {"n": 2}})


def test_private_uid_is_not_a_pattern(rango, keys, publisher):
    """Routing keys are matched exactly: ``private.#`` or a uid prefix reach no one."""
    uid, m = unique("ID"), unique()
    with rango.connect(
        "/", f"stream=order,{m}.marker", additional_headers=keys.bearer(uid=uid)
    ) as ws:
        expect(ws, subscribed(["order", f"{m}.marker"]))
        publisher.publish("private.*.order", {"n": 0})
        publisher.publish(f"private.{uid[:-1]}.order", {"n": 0})
        publisher.publish(f"private.{uid.lower()}.order", {"n": 0})
        publisher.publish(f"public.{m}.marker", {"marker": 1})
        expect(ws, {f"{m}.marker": {"marker": 1}})


# Order of frames


def test_interleaved_events_arrive_in_publish_order(rango, keys, publisher):
    m, uid = unique(), unique("ID")
    streams = [f"{m}.trades", "order", f"admin.{m}.orders", f"global.{m}", f"{m}.ob-inc", "trade"]
    with rango.connect(
        "/",
        "stream=" + ",".join(streams),
        additional_headers=keys.bearer(uid=uid, role="superadmin"),
    ) as ws:
        expect(ws, subscribed(streams))
        publisher.publish(f"public.{m}.ob-snap", {"sequence": 0})
        expected: list[Any] = [{f"{m}.ob-snap": {"sequence": 0}}]
        kinds = [
            (f"public.{m}.trades", f"{m}.trades"),
            (f"private.{uid}.order", "order"),
            (f"admin.{m}.orders", f"{m}.orders"),
            (f"global.{m}", f"global.{m}"),
            (f"public.{m}.ob-inc", f"{m}.ob-inc"),
            (f"private.{uid}.trade", "trade"),
        ]
        for n in range(1, 121):
            key, topic = kinds[(n * 7) % len(kinds)]
            publisher.publish(key, {"sequence": n})
            expected.append({topic: {"sequence": n}})
        received = [recv_json(ws) for _ in expected]
        assert received == expected


# Order book: snapshots and increments


def snap(m: str, seq: int) -> dict[str, Any]:
    return {f"{m}.ob-snap": {"bids": [["1000.0", "0.25"]], "asks": [], "sequence": seq}}


def inc(m: str, seq: int) -> dict[str, Any]:
    return {f"{m}.ob-inc": {"asks": [["1020.0", "0.015"]], "sequence": seq}}


def publish_snap(publisher: Publisher, m: str, seq: int) -> None:
    publisher.publish(f"public.{m}.ob-snap", snap(m, seq)[f"{m}.ob-snap"])


def publish_inc(publisher: Publisher, m: str, seq: int) -> None:
    publisher.publish(f"public.{m}.ob-inc", inc(m, seq)[f"{m}.ob-inc"])


def expect_book(ws: ClientConnection, m: str, snapshot: int, increments: Iterable[int]) -> None:
    """The next frames are ``m``'s snapshot ``snapshot``, then these increments in order."""
    expect(ws, snap(m, snapshot))
    for seq in increments:
        expect(ws, inc(m, seq))


def test_first_snapshot_goes_to_waiting_inc_subscribers_later_ones_do_not(rango, publisher):
    m = unique()
    with (
        rango.connect("/", f"stream={m}.ob-inc,{m}.marker") as a,
        rango.connect("/", f"stream={m}.ob-inc") as b,
        rango.connect("/", f"stream={m}.ob-snap,{m}.marker") as snap_only,
    ):
        expect(a, subscribed([f"{m}.ob-inc", f"{m}.marker"]))
        expect(b, subscribed([f"{m}.ob-inc"]))
        expect(snap_only, subscribed([f"{m}.ob-snap", f"{m}.marker"]))
        publish_snap(publisher, m, 100)
        expect(a, snap(m, 100))
        expect(b, snap(m, 100))
        publish_inc(publisher, m, 101)
        expect(a, inc(m, 101))
        expect(b, inc(m, 101))
        publish_snap(publisher, m, 200)  # not broadcast: a snapshot was stored
        publish_inc(publisher, m, 201)
        expect(a, inc(m, 201))
        expect(b, inc(m, 201))
        # Snapshots are never sent to subscribers of the -snap stream itself.
        publisher.publish(f"public.{m}.marker", {"marker": 1})
        expect(snap_only, {f"{m}.marker": {"marker": 1}})
        expect(a, {f"{m}.marker": {"marker": 1}})


def test_increment_before_any_snapshot_is_dropped(rango, publisher):
    m = unique()
    with rango.connect("/", f"stream={m}.ob-inc,{m}.marker") as ws:
        expect(ws, subscribed([f"{m}.ob-inc", f"{m}.marker"]))
        publish_inc(publisher, m, 1)
        publish_inc(publisher, m, 2)
        publisher.publish(f"public.{m}.marker", {"marker": 1})
        expect(ws, {f"{m}.marker": {"marker": 1}})
        publish_snap(publisher, m, 10)
        publish_inc(publisher, m, 11)
        expect_book(ws, m, 10, [11])
    # The dropped increments were not stored either.
    with rango.connect("/", f"stream={m}.ob-inc") as ws:
        expect_book(ws, m, 10, [11])
        expect(ws, subscribed([f"{m}.ob-inc"]))


def test_new_subscriber_gets_snapshot_then_stored_increments_then_answer(rango, publisher):
    m = unique()
    with rango.connect("/", f"stream={m}.ob-inc") as first:
        expect(first, subscribed([f"{m}.ob-inc"]))
        publish_snap(publisher, m, 0)
        for seq in range(1, 6):
            publish_inc(publisher, m, seq)
        expect_book(first, m, 0, range(1, 6))  # all stored by now
        with rango.connect("/", f"stream={m}.trades") as ws:
            expect(ws, subscribed([f"{m}.trades"]))
            request(ws, "subscribe", [f"{m}.ob-inc"])
            expect_book(ws, m, 0, range(1, 6))
            expect(ws, subscribed([f"{m}.trades", f"{m}.ob-inc"]))
            publish_inc(publisher, m, 6)
            expect(ws, inc(m, 6))
            expect(first, inc(m, 6))
            # Subscribing again is a no-op: no second copy of the book.
            assert subscribe(ws, [f"{m}.ob-inc"]) == subscribed([f"{m}.trades", f"{m}.ob-inc"])
            # Unsubscribe and subscribe again: the whole book again.
            request(ws, "unsubscribe", [f"{m}.ob-inc"])
            expect(ws, unsubscribed([f"{m}.trades"]))
            request(ws, "subscribe", [f"{m}.ob-inc"])
            expect_book(ws, m, 0, range(1, 7))
            expect(ws, subscribed([f"{m}.trades", f"{m}.ob-inc"]))


def test_book_in_query_string_comes_before_the_connect_answer(rango, publisher):
    """As for a subscribe request (§5): snapshot, stored increments, then the answer."""
    m = unique()
    with rango.connect("/", f"stream={m}.ob-inc") as first:
        expect(first, subscribed([f"{m}.ob-inc"]))
        publish_snap(publisher, m, 0)
        publish_inc(publisher, m, 1)
        expect_book(first, m, 0, [1])
    with rango.connect("/", f"stream={m}.trades,{m}.ob-inc") as ws:
        expect_book(ws, m, 0, [1])
        expect(ws, subscribed([f"{m}.trades", f"{m}.ob-inc"]))


def test_new_snapshot_replaces_book_and_empties_increments(rango, publisher):
    m = unique()
    with rango.connect("/", f"stream={m}.ob-inc") as first:
        expect(first, subscribed([f"{m}.ob-inc"]))
        publish_snap(publisher, m, 0)
        publish_inc(publisher, m, 1)
        publish_inc(publisher, m, 2)
        publish_snap(publisher, m, 50)
        publish_inc(publisher, m, 51)
        expect_book(first, m, 0, [1, 2, 51])
    with rango.connect("/") as ws:
        expect(ws, subscribed([]))
        request(ws, "subscribe", [f"{m}.ob-inc"])
        expect_book(ws, m, 50, [51])
        expect(ws, subscribed([f"{m}.ob-inc"]))


def test_books_are_per_market_and_base(rango, publisher):
    m1, m2 = unique(), unique()
    with rango.connect("/", f"stream={m1}.ob-inc,{m2}.ob-inc,{m1}.book-inc") as ws:
        expect(ws, subscribed([f"{m1}.ob-inc", f"{m2}.ob-inc", f"{m1}.book-inc"]))
        publish_snap(publisher, m1, 0)
        publish_inc(publisher, m2, 1)  # no book for m2: dropped
        publisher.publish(f"public.{m1}.book-inc", {"sequence": 1})  # no m1.book: dropped
        publish_inc(publisher, m1, 1)
        expect_book(ws, m1, 0, [1])


def test_subscribe_while_increments_stream_loses_and_repeats_nothing(rango):
    """A client subscribing mid-stream sees every sequence number exactly once."""
    m = unique()
    stop, started = threading.Event(), threading.Event()
    last: list[int] = []

    def stream() -> None:
        pub = Publisher(rango.exchange)
        try:
            publish_snap(pub, m, 0)
            seq = 0
            while seq < 5000 and (seq < 100 or not stop.is_set()):
                seq += 1
                publish_inc(pub, m, seq)
                started.set()
            last.append(seq)
            pub.publish(f"public.{m}.ob-inc", {"last": seq})
        finally:
            pub.close()

    def read_incs(ws: Any, frames: list[Any], until: Any) -> None:
        while True:
            frame = recv_json(ws)
            frames.append(frame)
            if until(frame):
                return

    # Both clients read without client-side flow control (max_queue=None).
    with (
        rango.connect("/", f"stream={m}.ob-inc", max_queue=None) as watcher,
        rango.connect("/", max_queue=None) as late,
    ):
        expect(watcher, subscribed([f"{m}.ob-inc"]))
        expect(late, subscribed([]))
        thread = threading.Thread(target=stream)
        thread.start()
        try:
            seen: list[Any] = []
            # Wait until increments are flowing and stored, then subscribe.
            read_incs(watcher, seen, lambda f: f.get(f"{m}.ob-inc", {}).get("sequence", 0) >= 50)
            request(late, "subscribe", [f"{m}.ob-inc"])
            frames: list[Any] = []
            read_incs(late, frames, lambda f: "success" in f)
            live: list[Any] = []
            read_incs(late, live, lambda f: len(live) >= 100 or "last" in f.get(f"{m}.ob-inc", {}))
            stop.set()
            if "last" not in live[-1][f"{m}.ob-inc"]:
                read_incs(late, live, lambda f: "last" in f[f"{m}.ob-inc"])
            read_incs(watcher, seen, lambda f: "last" in f.get(f"{m}.ob-inc", {}))
        finally:
            stop.set()
            thread.join()

    n = last[0]
    # The late client: the snapshot, stored increments 1..k, the answer, then k+1..n.
    assert frames[0] == snap(m, 0)
    assert frames[-1] == subscribed([f"{m}.ob-inc"])
    stored = [f[f"{m}.ob-inc"]["sequence"] for f in frames[1:-1]]
    live_seq = [f[f"{m}.ob-inc"]["sequence"] for f in live[:-1]]
    assert live[-1] == {f"{m}.ob-inc": {"last": n}}
    k = len(stored)
    assert k >= 50, "the late client subscribed while increments were stored"
    assert len(live_seq) >= 50, "increments were still flowing after the answer"
    assert stored + live_seq == list(range(1, n + 1))
    # The early client saw the first snapshot and every increment.
    assert seen[0] == snap(m, 0)
    assert [f[f"{m}.ob-inc"]["sequence"] for f in seen[1:-1]] == list(range(1, n + 1))


# RANGO_MAX_INCREMENTS


def test_max_increments_discards_book_until_next_snapshot(rango_factory, publisher_factory):
    gw = rango_factory(env={"RANGO_MAX_INCREMENTS": "3"})
    pub = publisher_factory(gw.exchange)
    m = unique()
    marker = f"{m}.marker"
    with gw.connect("/", f"stream={m}.ob-inc,{marker}") as a:
        expect(a, subscribed([f"{m}.ob-inc", marker]))
        publish_snap(pub, m, 0)
        for seq in (1, 2, 3):
            publish_inc(pub, m, seq)
        expect(a, snap(m, 0))
        for seq in (1, 2, 3):
            expect(a, inc(m, seq))
        # At the bound, the book is still whole for a new subscriber.
        with gw.connect("/", f"stream={m}.ob-inc") as b:
            expect(b, snap(m, 0))
            for seq in (1, 2, 3):
                expect(b, inc(m, seq))
            expect(b, subscribed([f"{m}.ob-inc"]))
        # Past it: the book is discarded; this and later increments are dropped.
        publish_inc(pub, m, 4)
        publish_inc(pub, m, 5)
        pub.publish(f"public.{marker}", {"marker": 1})
        expect(a, {marker: {"marker": 1}})
        # No book now: a new subscriber gets only the answer.
        with gw.connect("/", f"stream={m}.ob-inc,{marker}") as c:
            expect(c, subscribed([f"{m}.ob-inc", marker]))
            # The next snapshot is a first one again: it goes to every subscriber.
            publish_snap(pub, m, 10)
            publish_inc(pub, m, 11)
            for ws in (a, c):
                expect_book(ws, m, 10, [11])
        with gw.connect("/", f"stream={m}.ob-inc") as d:
            expect_book(d, m, 10, [11])
            expect(d, subscribed([f"{m}.ob-inc"]))
