"""PROTOCOL §4, end to end: private, public and prefixed (RBAC) streams.

The module's gateway runs with ``RANGO_RBAC_ADMIN=admin,superadmin`` (conftest).
"""

from __future__ import annotations

from typing import Any

import pytest
from support.answers import cannot, expect, request, subscribe, subscribed, unsubscribed
from support.broker import Publisher, unique
from websockets.sync.client import ClientConnection


def refused_and_not_delivered(
    ws: ClientConnection, publisher: Publisher, m: str, streams: list[str], body: Any
) -> None:
    """``ws``, subscribed to ``<m>.marker`` only, asks for ``streams``: each is refused
    (``cannot``), the answer lists the marker alone, and an event published to the first
    of them is not delivered (the marker published after it is)."""
    request(ws, "subscribe", streams)
    for stream in streams:
        expect(ws, cannot(stream))
    expect(ws, subscribed([f"{m}.marker"]))
    publisher.publish(streams[0], body)
    publisher.publish(f"public.{m}.marker", {"marker": 1})
    expect(ws, {f"{m}.marker": {"marker": 1}})


# Private streams (no dot)


def test_private_streams_for_authenticated_connections(rango, keys, publisher):
    uid = unique("ID")
    with rango.connect("/", additional_headers=keys.bearer(uid=uid)) as ws:
        expect(ws, subscribed([]))
        assert subscribe(ws, ["order", "trade", "balance"]) == subscribed(
            ["order", "trade", "balance"]
        )
        publisher.publish(f"private.{uid}.balance", {"eur": "1.0"})
        expect(ws, {"balance": {"eur": "1.0"}})


@pytest.mark.parametrize("path", ["/", "/public"])
def test_private_streams_silently_refused_to_anonymous(rango, publisher, path):
    m = unique()
    with rango.connect(path, "stream=order") as ws:
        expect(ws, subscribed([]))
        # No "cannot subscribe" answer either: just not in the list.
        assert subscribe(ws, ["order", f"{m}.trades", "trade"]) == subscribed([f"{m}.trades"])
        request(ws, "unsubscribe", ["order"])
        expect(ws, unsubscribed([f"{m}.trades"]))


def test_member_role_may_use_private_and_public_streams(rango, keys):
    m = unique()
    with rango.connect("/private", additional_headers=keys.bearer(role="member")) as ws:
        expect(ws, subscribed([]))
        assert subscribe(ws, ["order", f"{m}.trades"]) == subscribed(["order", f"{m}.trades"])


# Public streams (one dot)


@pytest.mark.parametrize("auth", ["anonymous", "member", "admin"])
def test_public_streams_for_anyone(rango, keys, publisher, auth):
    m = unique()
    headers = {} if auth == "anonymous" else keys.bearer(role=auth)
    with rango.connect("/", additional_headers=headers) as ws:
        expect(ws, subscribed([]))
        streams = [f"{m}.trades", f"{m}.ob-inc", "global.tickers"]
        assert subscribe(ws, streams) == subscribed(streams)
        publisher.publish(f"public.{m}.trades", [1])
        expect(ws, {f"{m}.trades": [1]})


# Prefixed streams (two dots): RBAC


@pytest.mark.parametrize("role", ["admin", "superadmin"])
def test_admin_roles_subscribe_and_receive_prefixed_events(rango, keys, publisher, role):
    m = unique()
    stream = f"admin.{m}.ob-inc"
    with rango.connect(
        "/private", f"stream={stream}", additional_headers=keys.bearer(role=role)
    ) as ws:
        expect(ws, subscribed([stream]))
        assert subscribe(ws, [f"admin.{m}.orders"]) == subscribed([stream, f"admin.{m}.orders"])
        publisher.publish(f"admin.{m}.ob-inc", {"bids": [["1000.0", "0"]], "sequence": 1})
        publisher.publish(f"admin.{m}.orders", {"id": 3})
        expect(ws, {f"{m}.ob-inc": {"bids": [["1000.0", "0"]], "sequence": 1}})
        expect(ws, {f"{m}.orders": {"id": 3}})


@pytest.mark.parametrize("role", ["member", "Admin", "", "admin,superadmin", "trader"])
def test_other_roles_cannot_subscribe_to_prefixed_streams(rango, keys, publisher, role):
    m = unique()
    stream = f"admin.{m}.ob-inc"
    with rango.connect(
        "/private", f"stream={m}.marker", additional_headers=keys.bearer(role=role)
    ) as ws:
        expect(ws, subscribed([f"{m}.marker"]))
        refused_and_not_delivered(ws, publisher, m, [stream], {"sequence": 1})


def test_token_without_role_cannot_subscribe_to_prefixed_streams(rango, keys):
    m = unique()
    stream = f"admin.{m}.x"
    with rango.connect("/private", additional_headers=keys.bearer(role=None)) as ws:
        expect(ws, subscribed([]))
        request(ws, "subscribe", [stream])
        expect(ws, cannot(stream))
        expect(ws, subscribed([]))


def test_refused_prefixed_stream_in_query_string(rango, keys):
    m = unique()
    with rango.connect(
        "/", f"stream=admin.{m}.x,{m}.trades", additional_headers=keys.bearer(role="member")
    ) as ws:
        expect(ws, cannot(f"admin.{m}.x"))
        expect(ws, subscribed([f"{m}.trades"]))


@pytest.mark.parametrize("path", ["/", "/public"])
def test_anonymous_cannot_subscribe_to_prefixed_streams(rango, publisher, path):
    m = unique()
    stream = f"admin.{m}.ob-inc"
    with rango.connect(path, f"stream={m}.marker") as ws:
        expect(ws, subscribed([f"{m}.marker"]))
        refused_and_not_delivered(ws, publisher, m, [stream], {"sequence": 1})


@pytest.mark.parametrize("role", ["admin", "superadmin", "member"])
def test_prefix_without_rbac_variable_is_closed_to_all(rango, keys, publisher, role):
    m = unique()
    streams = [f"finex.{m}.orders", f"ops.{m}.x", f"superadmin.{m}.x", f"{m}.a.b"]
    with rango.connect(
        "/private", f"stream={m}.marker", additional_headers=keys.bearer(role=role)
    ) as ws:
        expect(ws, subscribed([f"{m}.marker"]))
        refused_and_not_delivered(ws, publisher, m, streams, {"id": 1})


def test_rbac_from_another_variable(rango_factory, keys, publisher_factory):
    """Each RANGO_RBAC_<PREFIX> opens its own prefix to its own roles."""
    gw = rango_factory(env={"RANGO_RBAC_FINEX": "broker", "RANGO_RBAC_ADMIN": "superadmin"})
    pub = publisher_factory(gw.exchange)
    m = unique()
    with (
        gw.connect("/private", additional_headers=keys.bearer(role="broker")) as broker,
        gw.connect("/private", additional_headers=keys.bearer(role="admin")) as admin,
    ):
        expect(broker, subscribed([]))
        expect(admin, subscribed([]))
        request(broker, "subscribe", [f"finex.{m}.orders", f"admin.{m}.orders"])
        expect(broker, cannot(f"admin.{m}.orders"))
        expect(broker, subscribed([f"finex.{m}.orders"]))
        request(admin, "subscribe", [f"finex.{m}.orders", f"admin.{m}.orders"])
        expect(admin, cannot(f"finex.{m}.orders"))
        expect(admin, cannot(f"admin.{m}.orders"))  # only superadmin here
        expect(admin, subscribed([]))
        pub.publish(f"finex.{m}.orders", {"id": 9})
        expect(broker, {f"{m}.orders": {"id": 9}})


def test_role_is_per_connection(rango, keys, publisher):
    """An admin's prefixed subscription does not leak to a member's connection."""
    m = unique()
    stream = f"admin.{m}.orders"
    with (
        rango.connect(
            "/private", f"stream={stream}", additional_headers=keys.bearer(role="admin")
        ) as admin,
        rango.connect(
            "/private", f"stream={m}.marker", additional_headers=keys.bearer(role="member")
        ) as member,
    ):
        expect(admin, subscribed([stream]))
        expect(member, subscribed([f"{m}.marker"]))
        publisher.publish(f"admin.{m}.orders", {"id": 1})
        publisher.publish(f"public.{m}.marker", {"marker": 1})
        expect(admin, {f"{m}.orders": {"id": 1}})
        expect(member, {f"{m}.marker": {"marker": 1}})


def test_unsubscribe_prefixed_stream(rango, keys, publisher):
    m = unique()
    stream = f"admin.{m}.orders"
    with rango.connect(
        "/private", f"stream={stream},{m}.marker", additional_headers=keys.bearer(role="admin")
    ) as ws:
        expect(ws, subscribed([stream, f"{m}.marker"]))
        request(ws, "unsubscribe", [stream])
        expect(ws, unsubscribed([f"{m}.marker"]))
        publisher.publish(f"admin.{m}.orders", {"id": 1})
        publisher.publish(f"public.{m}.marker", {"marker": 1})
        expect(ws, {f"{m}.marker": {"marker": 1}})
