"""Unit tests of the routing core (PROTOCOL §4, §5): no sockets, no broker.

Subscribers are trivial objects that record what the hub pushes. The hub is built
with ``encode=lambda b: b`` so every pushed frame is the JSON payload itself.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.answers import cannot, subscribed, unsubscribed
from support.tokens import UID

from rango.auth import Auth
from rango.hub import SHARED_MAX, Drop, Hub, Observer
from rango.protocol import stream_kind

RBAC = {"admin": frozenset({"admin", "superadmin"})}
OTHER_UID = "IDABC0000002"

SNAP = b'{"bids":[["1000.0","0.25"]],"asks":[["1020.0","0.005"]],"sequence":1}'
INC1 = b'{"asks":[["1020.0","0.015"]],"sequence":2}'
INC2 = b'{"bids":[["1000.0","0"]],"sequence":3}'
INC3 = b'{"bids":[["999.0","1"]],"sequence":4}'


class Client:
    """What the hub needs of a connection, recording every pushed frame."""

    def __init__(self, uid: str = "", role: str = "", deflate: int = 0) -> None:
        self.auth = Auth(uid, role)
        self.subscriptions: dict[str, None] = {}
        self.frames: list[bytes] = []
        self.deflate = deflate

    def push(self, frame: bytes) -> None:
        self.frames.append(frame)

    def take(self) -> list[Any]:
        """The JSON of every frame pushed since the last call."""
        out = [orjson.loads(frame) for frame in self.frames]
        self.frames.clear()
        return out


class Recorder(Observer):
    def __init__(self) -> None:
        self.client_counts: list[int] = []
        self.calls: list[tuple[str, str, int]] = []
        self.current: dict[tuple[str, str], int] = {}

    def clients(self, count: int) -> None:
        self.client_counts.append(count)

    def subscriptions(self, kind: str, topic: str, count: int) -> None:
        self.calls.append((kind, topic, count))
        self.current[(kind, topic)] = count


@pytest.fixture
def observer() -> Recorder:
    return Recorder()


@pytest.fixture
def hub(observer: Recorder) -> Hub:
    return Hub(RBAC, encode=lambda b: b, observer=observer)


def connect(hub: Hub, *streams: str, uid: str = "", role: str = "") -> Client:
    """A connected client whose connect answer has been checked and consumed."""
    client = Client(uid, role)
    hub.connect(client, streams)
    answer = client.take()
    assert answer[-1]["success"]["message"] == "subscribed"
    return client


def state(hub: Hub) -> Any:
    """Everything a dropped event must leave unchanged."""
    return (
        {k: set(v) for k, v in hub.public.items()},
        {k: set(v) for k, v in hub.prefixed.items()},
        {u: {e: set(s) for e, s in t.items()} for u, t in hub.private.items()},
        {k: (b.snapshot, list(b.increments)) for k, b in hub.books.items()},
        hub.clients,
        hub.frames_sent,
        dict(hub._counts),
    )


# PROTOCOL §2: the connect answer.


def test_connect_answers_subscribed_even_without_streams(hub: Hub, observer: Recorder) -> None:
    client = Client()
    hub.connect(client)
    assert client.take() == [subscribed([])]
    assert hub.clients == 1
    assert observer.client_counts == [1]


def test_connect_subscribes_query_streams(hub: Hub) -> None:
    client = Client(UID, "member")
    hub.connect(client, ["eurusd.trades", "order", "global.tickers"])
    assert client.take() == [subscribed(["eurusd.trades", "order", "global.tickers"])]
    assert hub.public == {"eurusd.trades": {client}, "global.tickers": {client}}
    assert hub.private == {UID: {"order": {client}}}


# PROTOCOL §4: who may subscribe to what.


@pytest.mark.parametrize("auth", [("", ""), (UID, "member")])
def test_public_stream_open_to_anyone(hub: Hub, auth: tuple[str, str]) -> None:
    client = connect(hub, uid=auth[0], role=auth[1])
    hub.subscribe(client, ["eurusd.trades"])
    assert client.take() == [subscribed(["eurusd.trades"])]
    assert hub.public == {"eurusd.trades": {client}}
    assert list(client.subscriptions) == ["eurusd.trades"]


def test_private_stream_for_authenticated(hub: Hub) -> None:
    client = connect(hub, uid=UID, role="member")
    hub.subscribe(client, ["order", "trade"])
    assert client.take() == [subscribed(["order", "trade"])]
    assert hub.private == {UID: {"order": {client}, "trade": {client}}}
    assert hub.public == {}


def test_private_stream_from_anonymous_is_silently_not_subscribed(
    hub: Hub, observer: Recorder
) -> None:
    client = connect(hub)
    hub.subscribe(client, ["order", "eurusd.trades", "balance"])
    # No error, no "cannot subscribe": just absent from the list.
    assert client.take() == [subscribed(["eurusd.trades"])]
    assert hub.private == {}
    assert client.subscriptions == {"eurusd.trades": None}
    assert ("private", "order") not in observer.current


@pytest.mark.parametrize("role", ["admin", "superadmin"])
def test_prefixed_stream_for_allowed_roles(hub: Hub, role: str) -> None:
    client = connect(hub, uid=UID, role=role)
    hub.subscribe(client, ["admin.eurusd.ob-inc"])
    assert client.take() == [subscribed(["admin.eurusd.ob-inc"])]
    assert hub.prefixed == {"admin.eurusd.ob-inc": {client}}


@pytest.mark.parametrize(
    ("uid", "role"),
    [("", ""), (UID, "member"), (UID, ""), (UID, "Admin"), (UID, "admin ")],
)
def test_prefixed_stream_denied_to_other_roles(hub: Hub, uid: str, role: str) -> None:
    client = connect(hub, "eurusd.trades", uid=uid, role=role)
    hub.subscribe(client, ["admin.eurusd.ob-inc"])
    assert client.take() == [cannot("admin.eurusd.ob-inc"), subscribed(["eurusd.trades"])]
    assert hub.prefixed == {}
    assert "admin.eurusd.ob-inc" not in client.subscriptions


def test_prefix_without_rule_is_closed_to_everyone(hub: Hub) -> None:
    for role in ("admin", "superadmin", "member", ""):
        client = connect(hub, uid=UID if role else "", role=role)
        hub.subscribe(client, ["finance.eurusd.trades"])
        assert client.take() == [cannot("finance.eurusd.trades"), subscribed([])]
    assert hub.prefixed == {}


def test_empty_rbac_closes_every_prefix() -> None:
    hub = Hub(encode=lambda b: b)
    client = connect(hub, uid=UID, role="admin")
    hub.subscribe(client, ["admin.eurusd.ob-inc"])
    assert client.take() == [cannot("admin.eurusd.ob-inc"), subscribed([])]


@pytest.mark.parametrize("name", ["a.b.c.d", "", ".", "eurusd.", ".trades", "a..b", "..", "a.b."])
def test_names_no_event_can_match_are_not_subscribed(hub: Hub, name: str) -> None:
    client = connect(hub, uid=UID, role="admin")
    hub.subscribe(client, [name, "eurusd.trades"])
    assert client.take() == [subscribed(["eurusd.trades"])]
    assert client.subscriptions == {"eurusd.trades": None}
    assert hub.private == {} and hub.prefixed == {}


def test_subscribe_answer_lists_all_current_subscriptions_in_order(hub: Hub) -> None:
    client = connect(hub, "eurusd.trades", uid=UID, role="admin")
    hub.subscribe(client, ["order"])
    assert client.take() == [subscribed(["eurusd.trades", "order"])]
    hub.subscribe(client, ["admin.eurusd.ob-inc", "global.tickers"])
    assert client.take() == [
        subscribed(["eurusd.trades", "order", "admin.eurusd.ob-inc", "global.tickers"])
    ]


def test_connections_subscribed_alike_share_one_read_only_mapping(hub: Hub) -> None:
    """A subscription mapping per connection would cost ~180 B each: connections with
    the same streams share one, which the hub replaces and never changes in place."""
    first = connect(hub, "eurusd.trades")
    second = connect(hub, "eurusd.trades")
    hub.subscribe(first, ["global.tickers"])
    hub.subscribe(second, ["global.tickers", "eurusd.trades"])
    assert first.subscriptions is second.subscriptions
    assert list(first.subscriptions) == ["eurusd.trades", "global.tickers"]
    with pytest.raises(TypeError):
        first.subscriptions["x.trades"] = None  # type: ignore[index]
    hub.unsubscribe(second, ["eurusd.trades"])
    assert list(second.subscriptions) == ["global.tickers"]
    assert list(first.subscriptions) == ["eurusd.trades", "global.tickers"]
    assert hub.public == {"eurusd.trades": {first}, "global.tickers": {first, second}}
    hub.disconnect(first)
    assert list(first.subscriptions) == []
    assert list(second.subscriptions) == ["global.tickers"]
    assert hub.public == {"global.tickers": {second}}


def test_long_subscription_lists_are_each_connection_own(hub: Hub) -> None:
    streams = [f"m{i}.trades" for i in range(SHARED_MAX + 1)]
    first, second = connect(hub), connect(hub)
    hub.subscribe(first, streams)
    hub.subscribe(second, streams)
    assert first.subscriptions == second.subscriptions
    assert first.subscriptions is not second.subscriptions
    assert list(first.subscriptions) == streams
    hub.unsubscribe(first, streams[:1])
    assert list(first.subscriptions) == streams[1:]
    assert list(second.subscriptions) == streams


def test_duplicate_subscribe_is_a_noop_answering_the_full_list(
    hub: Hub, observer: Recorder
) -> None:
    client = connect(hub, "eurusd.trades", "order", uid=UID)
    calls = len(observer.calls)
    hub.subscribe(client, ["eurusd.trades", "order", "eurusd.trades"])
    assert client.take() == [subscribed(["eurusd.trades", "order"])]
    assert hub.public == {"eurusd.trades": {client}}
    assert len(observer.calls) == calls  # no count changed
    assert observer.current[("public", "eurusd.trades")] == 1


def test_duplicate_in_one_request_subscribes_once(hub: Hub, observer: Recorder) -> None:
    client = connect(hub)
    hub.subscribe(client, ["eurusd.trades", "eurusd.trades"])
    assert client.take() == [subscribed(["eurusd.trades"])]
    assert observer.calls == [("public", "eurusd.trades", 1)]


def test_unsubscribe_answers_remaining(hub: Hub) -> None:
    client = connect(hub, "eurusd.trades", "order", "admin.x.y", uid=UID, role="admin")
    hub.unsubscribe(client, ["order", "admin.x.y"])
    assert client.take() == [unsubscribed(["eurusd.trades"])]
    assert hub.private == {}  # the uid entry is gone, not left empty
    assert hub.prefixed == {}
    assert hub.public == {"eurusd.trades": {client}}
    hub.unsubscribe(client, ["eurusd.trades"])
    assert client.take() == [unsubscribed([])]
    assert hub.public == {}


def test_unsubscribe_not_subscribed_is_a_noop_answering_the_full_list(
    hub: Hub, observer: Recorder
) -> None:
    client = connect(hub, "eurusd.trades", uid=UID)
    calls = len(observer.calls)
    hub.unsubscribe(client, ["btcusd.trades", "order", "nope", "a.b.c.d", ""])
    assert client.take() == [unsubscribed(["eurusd.trades"])]
    assert len(observer.calls) == calls
    assert hub.public == {"eurusd.trades": {client}}


def test_unsubscribe_keeps_other_clients(hub: Hub) -> None:
    a = connect(hub, "eurusd.trades", "order", uid=UID)
    b = connect(hub, "eurusd.trades", "order", uid=UID)
    hub.unsubscribe(a, ["eurusd.trades", "order"])
    assert hub.public == {"eurusd.trades": {b}}
    assert hub.private == {UID: {"order": {b}}}


def test_max_subscriptions_cap(observer: Recorder) -> None:
    hub = Hub(RBAC, encode=lambda b: b, observer=observer, max_subscriptions=2)
    client = connect(hub, uid=UID)
    hub.subscribe(client, ["a.b", "c.d", "e.f", "order"])
    assert client.take() == [
        {"success": {"message": "cannot subscribe to e.f: too many subscriptions"}},
        {"success": {"message": "cannot subscribe to order: too many subscriptions"}},
        subscribed(["a.b", "c.d"]),
    ]
    assert set(hub.public) == {"a.b", "c.d"} and hub.private == {}
    # Re-subscribing to a stream already held is not refused at the cap.
    hub.subscribe(client, ["a.b"])
    assert client.take() == [subscribed(["a.b", "c.d"])]
    hub.unsubscribe(client, ["a.b"])
    client.take()
    hub.subscribe(client, ["e.f"])
    assert client.take() == [subscribed(["c.d", "e.f"])]


# PROTOCOL §5: routing.


def test_public_event(hub: Hub) -> None:
    sub = connect(hub, "eurusd.trades")
    other = connect(hub, "btcusd.trades", "eurusd.ob-inc")
    body = b'{"trades":[{"tid":7,"price":"1020.0"}]}'
    assert hub.route("public.eurusd.trades", body) == 1
    assert sub.frames == [b'{"eurusd.trades":' + body + b"}"]
    assert other.frames == []
    assert hub.events_received == 1 and hub.frames_sent == 1


def test_event_without_subscribers(hub: Hub) -> None:
    client = connect(hub, "btcusd.trades")
    assert hub.route("public.eurusd.trades", b"{}") == 0
    assert hub.route("private.NOBODY.order", b"{}") == 0
    assert hub.route("admin.eurusd.x", b"{}") == 0
    assert client.frames == []


def test_private_event_reaches_only_that_uid_and_event(hub: Hub) -> None:
    mine = connect(hub, "order", uid=UID)
    mine2 = connect(hub, "order", "trade", uid=UID)
    theirs = connect(hub, "order", "trade", uid=OTHER_UID)
    anon = connect(hub, "order")  # silently not subscribed
    body = b'{"id":22,"market":"eurusd"}'
    assert hub.route(f"private.{UID}.order", body) == 2
    assert mine.take() == [{"order": {"id": 22, "market": "eurusd"}}]
    assert mine2.take() == [{"order": {"id": 22, "market": "eurusd"}}]
    assert theirs.frames == [] and anon.frames == []
    # mine is not subscribed to trade
    assert hub.route(f"private.{UID}.trade", b"[1]") == 1
    assert mine.frames == []
    assert mine2.take() == [{"trade": [1]}]
    # An event for a uid that is a public market name reaches nobody public.
    public = connect(hub, f"{UID}.order")
    assert hub.route(f"private.{UID}.balance", b"1") == 0
    assert public.frames == []


def test_prefixed_event(hub: Hub) -> None:
    admin = connect(hub, "admin.eurusd.ob-inc", uid=UID, role="admin")
    member = connect(hub, "admin.eurusd.ob-inc", "eurusd.ob-inc", uid=OTHER_UID, role="member")
    other = connect(hub, "admin.btcusd.ob-inc", uid=UID, role="superadmin")
    body = b'{"bids":[["1000.0","0"]],"sequence":497776}'
    # A prefixed -inc is not an order-book increment: no snapshot needed.
    assert hub.route("admin.eurusd.ob-inc", body) == 1
    assert admin.frames == [b'{"eurusd.ob-inc":' + body + b"}"]
    assert member.frames == [] and other.frames == []
    assert hub.books == {}


@pytest.mark.parametrize("scope", ["global", "public"])
def test_two_part_public_keys(hub: Hub, scope: str) -> None:
    client = connect(hub, f"{scope}.tickers")
    other = connect(hub, "tickers", uid=UID)  # private "tickers" must not match
    body = b'{"eurusd":{"last":"1000.0"}}'
    assert hub.route(f"{scope}.tickers", body) == 1
    assert client.frames == [f'{{"{scope}.tickers":'.encode() + body + b"}"]
    assert other.frames == []


def test_public_global_three_parts(hub: Hub) -> None:
    client = connect(hub, "global.tickers")
    assert hub.route("public.global.tickers", b'{"a":1}') == 1
    assert client.take() == [{"global.tickers": {"a": 1}}]


BAD_KEYS = [
    "foo.bar",  # any other two-part key
    "private.order",
    "admin.tickers",
    "eurusd",  # one part
    "",
    "public",
    "a.b.c.d",  # four parts and more
    "public.eurusd.trades.x",
    "private.UID.order.x",
    "a.b.c.d.e",
    "public..trades",  # empty parts
    ".eurusd.trades",
    "public.eurusd.",
    "private..order",
    "private.UID.",
    "admin..x",
    "..",
    ".",
    "global.",
    "public.",
    ".tickers",
]


@pytest.mark.parametrize("key", BAD_KEYS)
def test_bad_routing_key_is_dropped(hub: Hub, key: str) -> None:
    clients = [
        connect(hub, "eurusd.trades", "global.tickers", "eurusd.ob-inc", uid=UID, role="admin"),
        connect(hub, "order", "admin.eurusd.x", uid="UID", role="admin"),
    ]
    hub.route("public.eurusd.ob-snap", SNAP)
    for client in clients:
        client.frames.clear()
    before = state(hub)
    with pytest.raises(Drop) as info:
        hub.route(key, b'{"a":1}')
    assert info.value.reason == "bad_routing_key"
    assert info.value.detail == key
    assert state(hub) == before
    assert all(client.frames == [] for client in clients)


BAD_BODIES = [
    b"",
    b"not json",
    b"{",
    b'{"a":1',
    b"{'a':1}",
    b"\xff\xfe",
    b"NaN",
    b"Infinity",
    b'{"a":1} x',
    b"[1,]",
    b"   ",
]


@pytest.mark.parametrize("body", BAD_BODIES)
@pytest.mark.parametrize(
    "key",
    ["public.eurusd.trades", "public.eurusd.ob-inc", "public.eurusd.ob-snap",
     f"private.{UID}.order", "admin.eurusd.x", "global.tickers"],
)  # fmt: skip
def test_body_not_json_is_dropped(hub: Hub, key: str, body: bytes) -> None:
    client = connect(
        hub, "eurusd.trades", "eurusd.ob-inc", "order", "admin.eurusd.x", "global.tickers",
        uid=UID, role="admin",
    )  # fmt: skip
    hub.route("public.eurusd.ob-snap", SNAP)
    hub.route("public.eurusd.ob-inc", INC1)
    client.frames.clear()
    before = state(hub)
    with pytest.raises(Drop) as info:
        hub.route(key, body)
    assert info.value.reason == "bad_body"
    assert state(hub) == before  # a bad snapshot does not replace the stored book
    assert client.frames == []


def test_bad_first_snapshot_stores_no_book(hub: Hub) -> None:
    client = connect(hub, "eurusd.ob-inc")
    with pytest.raises(Drop):
        hub.route("public.eurusd.ob-snap", b"{oops")
    assert hub.books == {}
    with pytest.raises(Drop) as info:
        hub.route("public.eurusd.ob-inc", INC1)
    assert info.value.reason == "no_snapshot"
    assert client.frames == []


@pytest.mark.parametrize(
    ("body", "value"),
    [
        (b'{"tid":1}', {"tid": 1}),
        (b"[1588204800,215.3,226.82,201.91566271,212.43,168224.36548725003]",
         [1588204800, 215.3, 226.82, 201.91566271, 212.43, 168224.36548725003]),
        (b"42", 42),
        (b"-1.5e3", -1500.0),
        (b'"a string"', "a string"),
        (b"true", True),
        (b"null", None),
        (b"[]", []),
        (b'{"nested":{"deep":[{"x":"\\u00e9\\n"}]}}', {"nested": {"deep": [{"x": "é\n"}]}}),
        (b'  {"spaced" : 1}\n', {"spaced": 1}),
        (b"123456789012345678901234567890", 123456789012345678901234567890),
    ],
)  # fmt: skip
def test_any_json_value_is_a_body(hub: Hub, body: bytes, value: Any) -> None:
    client = connect(hub, "eurusd.kline-12h", "order", uid=UID)
    assert hub.route("public.eurusd.kline-12h", body) == 1
    assert hub.route(f"private.{UID}.order", body) == 1
    # The body is forwarded byte for byte, never re-encoded.
    assert client.frames == [
        b'{"eurusd.kline-12h":' + body + b"}",
        b'{"order":' + body + b"}",
    ]
    decoded = [orjson.loads(f) for f in client.frames]
    if isinstance(value, int) and abs(value) > 2**63:
        value = float(value)  # orjson's reading of a huge integer; the bytes are intact
    assert decoded == [{"eurusd.kline-12h": value}, {"order": value}]


def test_topic_is_json_escaped(hub: Hub) -> None:
    client = connect(hub, 'eu"r\\usd.trades')
    assert hub.route('public.eu"r\\usd.trades', b"1") == 1
    assert client.take() == [{'eu"r\\usd.trades': 1}]


class CountingEncoder:
    def __init__(self) -> None:
        self.calls: list[bytes] = []

    def __call__(self, payload: bytes) -> bytes:
        self.calls.append(payload)
        return b"FRAME:" + payload


@pytest.mark.parametrize(
    ("streams", "key"),
    [
        (["eurusd.trades"], "public.eurusd.trades"),
        (["global.tickers"], "global.tickers"),
        (["order"], f"private.{UID}.order"),
        (["admin.eurusd.x"], "admin.eurusd.x"),
        (["eurusd.ob-inc"], "public.eurusd.ob-inc"),
    ],
)
def test_one_frame_object_for_every_subscriber(streams: list[str], key: str) -> None:
    encode = CountingEncoder()
    hub = Hub(RBAC, encode=encode)
    clients = [Client(UID, "admin") for _ in range(5)]
    for client in clients:
        hub.connect(client, streams)
    hub.route("public.eurusd.ob-snap", SNAP)
    for client in clients:
        client.frames.clear()
    encode.calls.clear()
    assert hub.route(key, b'{"x":1}') == 5
    assert len(encode.calls) == 1  # encoded once
    frame = clients[0].frames[0]
    assert frame.startswith(b"FRAME:{")
    assert all(len(c.frames) == 1 and c.frames[0] is frame for c in clients)


def test_default_encoder_makes_websocket_frames() -> None:
    from rango.protocol import text_frame

    hub = Hub(RBAC)
    client = Client()
    hub.connect(client, ["eurusd.trades"])
    assert client.frames == [
        text_frame(b'{"success":{"message":"subscribed","streams":["eurusd.trades"]}}')
    ]
    hub.route("public.eurusd.trades", b"[1]")
    payload = b'{"eurusd.trades":[1]}'
    assert client.frames[-1] == bytes([0x81, len(payload)]) + payload


def test_frames_keep_event_order(hub: Hub) -> None:
    client = connect(hub, "eurusd.trades", "order", "global.tickers", uid=UID)
    for i in range(20):
        key = ["public.eurusd.trades", f"private.{UID}.order", "global.tickers"][i % 3]
        hub.route(key, str(i).encode())
    assert [next(iter(f.values())) for f in client.take()] == list(range(20))


# PROTOCOL §5: order books.


def test_first_snapshot_goes_to_current_inc_subscribers(hub: Hub) -> None:
    waiting = connect(hub, "eurusd.ob-inc")
    waiting2 = connect(hub, "eurusd.ob-inc", "eurusd.trades")
    snap_sub = connect(hub, "eurusd.ob-snap")
    other = connect(hub, "btcusd.ob-inc")
    assert hub.route("public.eurusd.ob-snap", SNAP) == 2
    expected = [b'{"eurusd.ob-snap":' + SNAP + b"}"]
    assert waiting.frames == expected and waiting2.frames == expected
    assert waiting.frames[0] is waiting2.frames[0]
    assert snap_sub.frames == [] and other.frames == []


def test_first_snapshot_without_subscribers_is_stored(hub: Hub) -> None:
    assert hub.route("public.eurusd.ob-snap", SNAP) == 0
    assert set(hub.books) == {"eurusd.ob"}
    assert hub.books["eurusd.ob"].snapshot == b'{"eurusd.ob-snap":' + SNAP + b"}"
    assert hub.books["eurusd.ob"].increments == []


def test_later_snapshot_is_not_broadcast_and_replaces_the_book(hub: Hub) -> None:
    client = connect(hub, "eurusd.ob-inc", "eurusd.ob-snap")
    hub.route("public.eurusd.ob-snap", SNAP)
    hub.route("public.eurusd.ob-inc", INC1)
    client.frames.clear()
    snap2 = b'{"bids":[],"asks":[],"sequence":10}'
    assert hub.route("public.eurusd.ob-snap", snap2) == 0
    assert client.frames == []
    assert hub.books["eurusd.ob"].increments == []  # emptied
    late = connect(hub)
    hub.subscribe(late, ["eurusd.ob-inc"])
    assert late.take() == [{"eurusd.ob-snap": orjson.loads(snap2)}, subscribed(["eurusd.ob-inc"])]


def test_increment_before_snapshot_is_dropped(hub: Hub) -> None:
    client = connect(hub, "eurusd.ob-inc")
    before = state(hub)
    with pytest.raises(Drop) as info:
        hub.route("public.eurusd.ob-inc", INC1)
    assert info.value.reason == "no_snapshot"
    assert client.frames == []
    assert state(hub) == before


def test_increments_are_broadcast_stored_and_replayed(hub: Hub) -> None:
    early = connect(hub, "eurusd.ob-inc")
    trades = connect(hub, "eurusd.trades")
    hub.route("public.eurusd.ob-snap", SNAP)
    assert hub.route("public.eurusd.ob-inc", INC1) == 1
    assert hub.route("public.eurusd.ob-inc", INC2) == 1
    assert early.take() == [
        {"eurusd.ob-snap": orjson.loads(SNAP)},
        {"eurusd.ob-inc": orjson.loads(INC1)},
        {"eurusd.ob-inc": orjson.loads(INC2)},
    ]
    assert trades.frames == []
    # A new subscriber: snapshot, stored increments in order, then the answer.
    late = connect(hub, "eurusd.trades")
    hub.subscribe(late, ["eurusd.ob-inc"])
    assert late.take() == [
        {"eurusd.ob-snap": orjson.loads(SNAP)},
        {"eurusd.ob-inc": orjson.loads(INC1)},
        {"eurusd.ob-inc": orjson.loads(INC2)},
        subscribed(["eurusd.trades", "eurusd.ob-inc"]),
    ]
    # Then live increments reach both, once.
    assert hub.route("public.eurusd.ob-inc", INC3) == 2
    assert early.take() == [{"eurusd.ob-inc": orjson.loads(INC3)}]
    assert late.take() == [{"eurusd.ob-inc": orjson.loads(INC3)}]


def test_replay_on_connect_comes_before_the_connect_answer(hub: Hub) -> None:
    hub.route("public.eurusd.ob-snap", SNAP)
    hub.route("public.eurusd.ob-inc", INC1)
    client = Client()
    hub.connect(client, ["eurusd.ob-inc"])
    assert client.take() == [
        {"eurusd.ob-snap": orjson.loads(SNAP)},
        {"eurusd.ob-inc": orjson.loads(INC1)},
        subscribed(["eurusd.ob-inc"]),
    ]


def test_resubscribing_to_inc_does_not_replay_again(hub: Hub) -> None:
    hub.route("public.eurusd.ob-snap", SNAP)
    client = connect(hub, "eurusd.ob-inc")
    hub.subscribe(client, ["eurusd.ob-inc"])
    assert client.take() == [subscribed(["eurusd.ob-inc"])]


def test_books_are_per_market_and_base(hub: Hub) -> None:
    eur = connect(hub, "eurusd.ob-inc")
    btc = connect(hub, "btcusd.ob-inc")
    depth = connect(hub, "eurusd.depth-inc")
    hub.route("public.eurusd.ob-snap", SNAP)
    with pytest.raises(Drop):
        hub.route("public.btcusd.ob-inc", INC1)
    with pytest.raises(Drop):
        hub.route("public.eurusd.depth-inc", INC1)
    assert hub.route("public.eurusd.depth-snap", b"[0]") == 1
    assert hub.route("public.eurusd.depth-inc", b"[1]") == 1
    assert set(hub.books) == {"eurusd.ob", "eurusd.depth"}
    assert eur.take() == [{"eurusd.ob-snap": orjson.loads(SNAP)}]
    assert btc.frames == []
    assert depth.take() == [{"eurusd.depth-snap": [0]}, {"eurusd.depth-inc": [1]}]


def test_two_part_order_book(hub: Hub) -> None:
    client = connect(hub, "global.ob-inc")
    assert hub.route("global.ob-snap", b"[0]") == 1
    assert hub.route("global.ob-inc", b"[1]") == 1
    assert client.take() == [{"global.ob-snap": [0]}, {"global.ob-inc": [1]}]


def test_increment_bound_discards_the_book_until_the_next_snapshot(observer: Recorder) -> None:
    hub = Hub(RBAC, encode=lambda b: b, observer=observer, max_increments=2)
    early = connect(hub, "eurusd.ob-inc")
    hub.route("public.eurusd.ob-snap", SNAP)
    assert hub.route("public.eurusd.ob-inc", INC1) == 1
    assert hub.route("public.eurusd.ob-inc", INC2) == 1
    early.frames.clear()
    with pytest.raises(Drop) as info:
        hub.route("public.eurusd.ob-inc", INC3)
    assert info.value.reason == "increments_full"
    assert hub.books == {}
    assert early.frames == []
    # Until a new snapshot: increments dropped, new subscribers get no stale book.
    with pytest.raises(Drop) as info:
        hub.route("public.eurusd.ob-inc", INC3)
    assert info.value.reason == "no_snapshot"
    late = connect(hub)
    hub.subscribe(late, ["eurusd.ob-inc"])
    assert late.take() == [subscribed(["eurusd.ob-inc"])]
    # The next snapshot goes to every -inc subscriber, like a first one.
    snap2 = b'{"sequence":100}'
    assert hub.route("public.eurusd.ob-snap", snap2) == 2
    assert early.take() == [{"eurusd.ob-snap": {"sequence": 100}}]
    assert late.take() == [{"eurusd.ob-snap": {"sequence": 100}}]
    assert hub.route("public.eurusd.ob-inc", INC1) == 2
    assert hub.books["eurusd.ob"].increments == [b'{"eurusd.ob-inc":' + INC1 + b"}"]


def test_increment_bound_of_one(observer: Recorder) -> None:
    hub = Hub(encode=lambda b: b, max_increments=1)
    hub.route("public.eurusd.ob-snap", SNAP)
    hub.route("public.eurusd.ob-inc", INC1)
    assert len(hub.books["eurusd.ob"].increments) == 1
    with pytest.raises(Drop):
        hub.route("public.eurusd.ob-inc", INC2)
    assert hub.books == {}


def test_reset_books(hub: Hub) -> None:
    client = connect(hub, "eurusd.ob-inc")
    hub.route("public.eurusd.ob-snap", SNAP)
    hub.route("public.btcusd.ob-snap", SNAP)
    hub.route("public.eurusd.ob-inc", INC1)
    client.frames.clear()
    hub.reset_books()
    assert hub.books == {}
    assert hub.public == {"eurusd.ob-inc": {client}}  # subscriptions are kept
    with pytest.raises(Drop) as info:
        hub.route("public.eurusd.ob-inc", INC2)
    assert info.value.reason == "no_snapshot"
    assert hub.route("public.eurusd.ob-snap", b"[9]") == 1  # first again: sent
    assert client.take() == [{"eurusd.ob-snap": [9]}]


# Disconnect and counts.


def test_disconnect_removes_every_subscription(hub: Hub, observer: Recorder) -> None:
    client = connect(
        hub, "eurusd.trades", "eurusd.ob-inc", "order", "trade", "admin.eurusd.x",
        uid=UID, role="admin",
    )  # fmt: skip
    stay = connect(hub, "eurusd.trades", "order", uid=UID)
    assert hub.clients == 2
    hub.disconnect(client)
    assert client.subscriptions == {}
    assert hub.clients == 1
    assert hub.public == {"eurusd.trades": {stay}}
    assert hub.private == {UID: {"order": {stay}}}
    assert hub.prefixed == {}
    hub.route("public.eurusd.trades", b"1")
    hub.route(f"private.{UID}.order", b"1")
    assert client.frames == []
    assert len(stay.frames) == 2
    hub.disconnect(stay)
    assert (hub.public, hub.private, hub.prefixed, hub.clients) == ({}, {}, {}, 0)
    assert hub._counts == {}
    assert observer.client_counts == [1, 2, 1, 0]
    assert set(observer.current.values()) == {0}


def test_observer_counts(hub: Hub, observer: Recorder) -> None:
    a = connect(hub, "eurusd.trades", "order", "admin.eurusd.ob-inc", uid=UID, role="admin")
    b = connect(hub, "eurusd.trades", "order", uid=OTHER_UID, role="member")
    anon = connect(hub, "order", "admin.eurusd.ob-inc")  # neither is subscribed
    hub.subscribe(b, ["admin.eurusd.ob-inc"])  # denied
    assert observer.client_counts == [1, 2, 3]
    assert observer.calls == [
        ("public", "eurusd.trades", 1),
        ("private", "order", 1),
        ("prefixed", "admin.eurusd.ob-inc", 1),
        ("public", "eurusd.trades", 2),
        ("private", "order", 2),
    ]
    # Private topics are event names: no uid anywhere in the labels.
    assert all(UID not in topic and OTHER_UID not in topic for _, topic, _ in observer.calls)
    hub.unsubscribe(a, ["order"])
    assert observer.calls[-1] == ("private", "order", 1)
    hub.disconnect(b)
    assert observer.current == {
        ("public", "eurusd.trades"): 1,
        ("private", "order"): 0,
        ("prefixed", "admin.eurusd.ob-inc"): 1,
    }
    hub.disconnect(a)
    hub.disconnect(anon)
    assert set(observer.current.values()) == {0}
    assert observer.client_counts[-3:] == [2, 1, 0]


def test_counts_match_index_sizes(hub: Hub, observer: Recorder) -> None:
    for i in range(5):
        connect(hub, "eurusd.trades", "order", uid=f"U{i % 2}")
    assert observer.current[("public", "eurusd.trades")] == 5
    assert observer.current[("private", "order")] == 5
    assert len(hub.private["U0"]["order"]) == 3
    assert len(hub.private["U1"]["order"]) == 2


# Property: the indexes always equal what the clients' subscriptions imply.

STREAMS = [
    "eurusd.trades", "global.tickers", "eurusd.ob-inc", "order", "trade",
    "admin.eurusd.ob-inc", "admin.btcusd.x", "finance.eurusd.x", "a..b", "a.b.c.d", "",
]  # fmt: skip
KEYS = [
    "public.eurusd.trades", "global.tickers", "public.eurusd.ob-inc", "public.eurusd.ob-snap",
    "private.U1.order", "private.U2.trade", "private.U1.trade", "admin.eurusd.ob-inc",
    "finance.eurusd.x",
]  # fmt: skip
IDENTITIES = [("", ""), ("U1", "member"), ("U1", "admin"), ("U2", "superadmin")]

operations = st.lists(
    st.one_of(
        st.tuples(
            st.sampled_from(["subscribe", "unsubscribe"]),
            st.integers(0, len(IDENTITIES) - 1),
            st.lists(st.sampled_from(STREAMS), max_size=5),
        ),
        st.tuples(st.just("disconnect"), st.integers(0, len(IDENTITIES) - 1), st.just([])),
        st.tuples(st.just("route"), st.just(0), st.lists(st.sampled_from(KEYS), max_size=3)),
    ),
    max_size=40,
)


def expected_indexes(clients: list[Client]) -> tuple[dict, dict, dict]:
    public: dict[str, set] = {}
    private: dict[str, dict[str, set]] = {}
    prefixed: dict[str, set] = {}
    for client in clients:
        for stream in client.subscriptions:
            kind = stream_kind(stream)
            assert kind is not None
            if kind.value == "public":
                public.setdefault(stream, set()).add(client)
            elif kind.value == "private":
                assert client.auth.uid, "anonymous client holds a private stream"
                private.setdefault(client.auth.uid, {}).setdefault(stream, set()).add(client)
            else:
                assert client.auth.role in RBAC.get(stream.split(".")[0], ())
                prefixed.setdefault(stream, set()).add(client)
    return public, private, prefixed


def recipients(key: str, clients: list[Client]) -> set[Client]:
    scope, middle, event = key.split(".") if key.count(".") == 2 else (*key.split("."), "")
    out = set()
    for c in clients:
        if scope == "private":
            if c.auth.uid == middle and event in c.subscriptions:
                out.add(c)
        elif scope == "public":
            if f"{middle}.{event}" in c.subscriptions:
                out.add(c)
        elif key in c.subscriptions:  # prefixed and global.tickers
            out.add(c)
    return out


@settings(max_examples=200, deadline=None)
@given(operations)
def test_indexes_follow_subscriptions(ops: list[tuple[str, int, list[str]]]) -> None:
    observer = Recorder()
    hub = Hub(RBAC, encode=lambda b: b, observer=observer)
    clients = [Client(uid, role) for uid, role in IDENTITIES]
    connected = [False] * len(clients)
    hub.route("public.eurusd.ob-snap", b"{}")  # so that -inc events are routed
    for op, index, args in ops:
        client = clients[index]
        if op == "route":
            live = [c for c, up in zip(clients, connected, strict=True) if up]
            for key in args:
                for c in clients:
                    c.frames.clear()
                if key.endswith("-snap"):
                    hub.route(key, b"{}")  # stored, not broadcast
                    assert all(c.frames == [] for c in clients)
                    continue
                count = hub.route(key, b"[1]")
                got = {c for c in clients if c.frames}
                assert got == recipients(key, live)
                assert count == len(got)
                assert all(len(c.frames) == 1 for c in got)
            continue
        if not connected[index]:
            hub.connect(client)
            connected[index] = True
            assert orjson.loads(client.frames[-1]) == subscribed([])
        if op == "subscribe":
            hub.subscribe(client, args)
            assert orjson.loads(client.frames[-1]) == subscribed(list(client.subscriptions))
        elif op == "unsubscribe":
            hub.unsubscribe(client, args)
            assert orjson.loads(client.frames[-1]) == unsubscribed(list(client.subscriptions))
            assert not set(args) & set(client.subscriptions)
        else:
            hub.disconnect(client)
            connected[index] = False
            assert client.subscriptions == {}
        public, private, prefixed = expected_indexes(clients)
        assert hub.public == public
        assert hub.private == private
        assert hub.prefixed == prefixed
        assert hub.clients == sum(connected) == observer.client_counts[-1]
        counts = Counter(
            (stream_kind(s).value, s)  # type: ignore[union-attr]
            for c in clients
            for s in c.subscriptions
        )
        assert hub._counts == dict(counts)
        assert {k: v for k, v in observer.current.items() if v} == dict(counts)
    for client, up in zip(clients, connected, strict=True):
        if up:
            hub.disconnect(client)
    assert (hub.public, hub.private, hub.prefixed, hub._counts) == ({}, {}, {}, {})
    assert hub.clients == 0
    assert all(count == 0 for count in observer.current.values())


# Runs: consecutive events for the same subscribers are joined once per flush.


class Waker:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1


def lines(frames: list[bytes]) -> list[Any]:
    """Frames encoded with a trailing newline, split back into JSON values."""
    return [orjson.loads(line) for frame in frames for line in frame.splitlines()]


@pytest.fixture
def batching() -> tuple[Hub, Waker]:
    waker = Waker()
    return Hub(RBAC, encode=lambda b: b + b"\n", wake=waker), waker


def test_run_is_pushed_once_per_flush_as_one_joined_bytes(batching):
    hub, waker = batching
    a, b = connect(hub, "eurusd.trades"), connect(hub, "eurusd.trades")
    for n in range(5):
        assert hub.route("public.eurusd.trades", b"%d" % n) == 2
    assert a.frames == [] and b.frames == []  # nothing until the flush
    assert waker.calls == 1  # one wake-up for the whole run
    assert hub.frames_sent == 0
    hub.flush()
    assert len(a.frames) == 1 and a.frames[0] is b.frames[0]  # joined once, shared
    assert lines(a.frames) == [{"eurusd.trades": n} for n in range(5)]
    assert hub.frames_sent == 10
    hub.flush()  # nothing pending: nothing pushed again
    assert len(a.frames) == 1


def test_interleaved_streams_keep_the_publish_order(batching):
    hub, _ = batching
    both = connect(hub, "eurusd.trades", "usdbtc.trades")
    only = connect(hub, "usdbtc.trades")
    keys = ["eurusd", "eurusd", "usdbtc", "eurusd", "usdbtc", "usdbtc"]
    for n, market in enumerate(keys):
        hub.route(f"public.{market}.trades", b"%d" % n)
    hub.flush()
    assert lines(both.frames) == [{f"{m}.trades": n} for n, m in enumerate(keys)]
    assert lines(only.frames) == [
        {"usdbtc.trades": n} for n, m in enumerate(keys) if m == "usdbtc"
    ]


def test_subscribing_during_a_run_sees_only_later_events(batching):
    hub, _ = batching
    old = connect(hub, "eurusd.ob-inc")
    hub.route("public.eurusd.ob-snap", SNAP)  # first snapshot: to the waiting subscriber
    hub.route("public.eurusd.ob-inc", INC1)
    late = Client()
    hub.connect(late, ["eurusd.ob-inc"])  # the pending run is pushed first
    hub.route("public.eurusd.ob-inc", INC2)
    hub.flush()
    snap, inc1, inc2 = orjson.loads(SNAP), orjson.loads(INC1), orjson.loads(INC2)
    assert lines(old.frames) == [
        {"eurusd.ob-snap": snap}, {"eurusd.ob-inc": inc1}, {"eurusd.ob-inc": inc2},
    ]
    # Snapshot and stored increment once each, the answer, then the live increment.
    assert lines(late.frames) == [
        {"eurusd.ob-snap": snap}, {"eurusd.ob-inc": inc1}, subscribed(["eurusd.ob-inc"]),
        {"eurusd.ob-inc": inc2},
    ]


def test_disconnect_during_a_run_delivers_it_first(batching):
    hub, _ = batching
    gone, stays = connect(hub, "eurusd.trades"), connect(hub, "eurusd.trades")
    hub.route("public.eurusd.trades", b"1")
    hub.disconnect(gone)
    hub.route("public.eurusd.trades", b"2")
    hub.flush()
    assert lines(gone.frames) == [{"eurusd.trades": 1}]
    assert lines(stays.frames) == [{"eurusd.trades": 1}, {"eurusd.trades": 2}]


def test_a_failing_push_costs_its_run_only() -> None:
    """An exception while a run is pushed (a bug, MemoryError in zlib) loses that run;
    the hub's state stays consistent and the next events are delivered."""
    from rango.deflate import Deflater

    class Failing(Client):
        fail = False

        def push(self, frame: bytes) -> None:
            if self.fail:
                self.fail = False
                raise RuntimeError("boom")
            super().push(frame)

    hub = Hub(deflater=Deflater(), min_size=0, wake=lambda: None)
    bad, good = Failing(deflate=15), Client()
    hub.connect(bad, ["eurusd.trades"])
    hub.connect(good, ["eurusd.trades"])
    bad.frames.clear()
    good.frames.clear()
    bad.fail = True
    hub.route("public.eurusd.trades", b'{"n":1}')
    with pytest.raises(RuntimeError):
        hub.flush()
    hub.route("public.eurusd.trades", b'{"n":2}')
    hub.route("public.eurusd.trades", b'{"n":3}')
    hub.flush()
    assert bad.frames and bad.frames[-1][0] == 0xC1  # compressed, delivered
    assert good.frames[-1].endswith(b'{"eurusd.trades":{"n":3}}')
