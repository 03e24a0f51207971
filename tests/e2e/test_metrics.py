"""PROTOCOL §7, end to end: the Prometheus endpoint follows clients and subscriptions.

The module's gateway is used by this module only, so client counts are exact.
Disconnects and the once-a-second counter sync are asynchronous: values are polled.
"""

from __future__ import annotations

import contextlib
import socket
from typing import Any

import pytest
from support.answers import cannot, expect, request, subscribed, unsubscribed
from support.broker import unique
from support.metrics import counter, sample, samples
from support.polling import wait_for
from websockets.exceptions import ConnectionClosedError, InvalidStatus

CLIENTS = "rango_hub_clients_count"
SUBS = "rango_hub_subscriptions_count"


def clients(gw: Any) -> float | None:
    return sample(gw.metrics(), CLIENTS)


def wait_clients(gw: Any, n: int) -> None:
    wait_for(lambda: clients(gw) == n, 10, f"{CLIENTS} == {n} (now {clients(gw)})")


def subs(gw: Any, kind: str, topic: str) -> float:
    """The subscription gauge; a series that is gone counts as 0."""
    return sample(gw.metrics(), SUBS, type=kind, topic=topic) or 0.0


def wait_subs(gw: Any, kind: str, topic: str, n: int) -> None:
    wait_for(
        lambda: subs(gw, kind, topic) == n,
        10,
        f"{SUBS}{{type={kind},topic={topic}}} == {n} (now {subs(gw, kind, topic)})",
    )


def test_clients_count_follows_connects_and_disconnects(rango):
    wait_clients(rango, 0)
    with rango.connect() as a:
        expect(a, subscribed([]))
        wait_clients(rango, 1)
        with rango.connect("/") as b, rango.connect("/anything") as c:
            expect(b, subscribed([]))
            expect(c, subscribed([]))
            wait_clients(rango, 3)
        wait_clients(rango, 1)
    wait_clients(rango, 0)


def test_clients_count_after_abrupt_disconnect(rango):
    wait_clients(rango, 0)
    with rango.connect() as ws:
        expect(ws, subscribed([]))
        wait_clients(rango, 1)
        ws.socket.shutdown(socket.SHUT_RDWR)  # no closing handshake
        wait_clients(rango, 0)


def test_clients_count_after_server_side_close(rango):
    wait_clients(rango, 0)
    with rango.connect() as ws:
        expect(ws, subscribed([]))
        wait_clients(rango, 1)
        with pytest.raises(ConnectionClosedError):
            ws.send("x" * 5000)  # over the frame limit: closed with 1009
            ws.recv(timeout=5)
    wait_clients(rango, 0)


def test_refused_and_unfinished_upgrades_are_not_clients(rango, keys):
    wait_clients(rango, 0)
    for path, kwargs in [("/private", {}), ("/public", {"origin": "http://evil.example"})]:
        for _ in range(3):
            with pytest.raises(InvalidStatus):
                rango.connect(path, **kwargs).close()
    # A plain HTTP request, garbage, and a connection that never finishes its request.
    with socket.create_connection(("127.0.0.1", rango.port), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.1 4")
    with socket.create_connection(("127.0.0.1", rango.port), timeout=5) as sock:
        sock.sendall(b"\x00\x01garbage\r\n\r\n")
    # Requests cut short by the client's EOF (these left the count at -1, see
    # Connection.registered in rango/server.py).
    for data in (
        b"GET /public HTTP/1.1\r\n",
        b"GET /public HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n",
        b"GET /private HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    ):
        with socket.create_connection(("127.0.0.1", rango.port), timeout=5) as sock:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(4096):
                pass  # until the server closes
    with rango.connect() as ws:
        expect(ws, subscribed([]))
        wait_clients(rango, 1)
        assert clients(rango) == 1
    wait_clients(rango, 0)
    assert clients(rango) == 0


def test_public_subscriptions_count(rango):
    m = unique()
    topic = f"{m}.trades"
    with rango.connect("/", f"stream={topic}") as a, rango.connect("/") as b:
        expect(a, subscribed([topic]))
        expect(b, subscribed([]))
        wait_subs(rango, "public", topic, 1)
        request(b, "subscribe", [topic, topic])
        expect(b, subscribed([topic]))
        wait_subs(rango, "public", topic, 2)
        request(b, "subscribe", [topic])  # duplicate: still 2
        expect(b, subscribed([topic]))
        request(b, "unsubscribe", [f"{m}.other"])  # not subscribed: still 2
        expect(b, unsubscribed([topic]))
        assert subs(rango, "public", topic) == 2
        request(a, "unsubscribe", [topic])
        expect(a, unsubscribed([]))
        wait_subs(rango, "public", topic, 1)
    wait_subs(rango, "public", topic, 0)


def test_private_subscriptions_are_labelled_by_event_never_uid(rango, keys):
    uid1, uid2 = unique("ID"), unique("ID")
    event = unique("ev")
    with (
        rango.connect("/private", f"stream={event}", additional_headers=keys.bearer(uid=uid1)) as a,
        rango.connect("/", f"stream={event},order", additional_headers=keys.bearer(uid=uid2)) as b,
        rango.connect("/", f"stream={event}") as anonymous,
    ):
        expect(a, subscribed([event]))
        expect(b, subscribed([event, "order"]))
        expect(anonymous, subscribed([]))  # not subscribed, not counted
        wait_subs(rango, "private", event, 2)
        status, text = rango.http("/metrics")
        assert status == 200
        assert uid1 not in text and uid2 not in text
        for labels, _ in samples(rango.metrics(), SUBS):
            assert set(labels) == {"type", "topic"}
            assert labels["type"] in ("public", "private", "prefixed")
        request(b, "unsubscribe", [event])
        expect(b, unsubscribed(["order"]))
        wait_subs(rango, "private", event, 1)
    wait_subs(rango, "private", event, 0)


def test_prefixed_subscriptions_count(rango, keys):
    m = unique()
    topic = f"admin.{m}.orders"
    with (
        rango.connect(
            "/private", f"stream={topic}", additional_headers=keys.bearer(role="superadmin")
        ) as admin,
        rango.connect("/private", additional_headers=keys.bearer(role="member")) as member,
    ):
        expect(admin, subscribed([topic]))
        expect(member, subscribed([]))
        request(member, "subscribe", [topic])
        expect(member, cannot(topic))
        expect(member, subscribed([]))
        wait_subs(rango, "prefixed", topic, 1)
        assert subs(rango, "prefixed", topic) == 1  # the refused one is not counted
    wait_subs(rango, "prefixed", topic, 0)


def test_process_and_python_series_present(rango):
    names = {key.partition("{")[0] for key in rango.metrics()}
    for name in (
        "process_resident_memory_bytes", "process_cpu_seconds_total", "process_open_fds",
        "python_info", "python_gc_collections_total",
    ):  # fmt: skip
        assert name in names, name
    metrics = rango.metrics()
    assert sample(metrics, "process_resident_memory_bytes") > 1e6
    assert sample(metrics, "process_open_fds") > 0
    assert not any(name.startswith(("go_", "promhttp_")) for name in names)


def test_events_received_and_frames_sent_advance(rango, publisher):
    m = unique()
    topic = f"{m}.trades"
    events0 = counter(rango, "rango_events_received_total")
    frames0 = counter(rango, "rango_frames_sent_total")
    with rango.connect("/", f"stream={topic}") as a, rango.connect("/", f"stream={topic}") as b:
        expect(a, subscribed([topic]))
        expect(b, subscribed([topic]))
        for n in range(5):
            publisher.publish(f"public.{m}.trades", {"n": n})
        publisher.publish(f"public.{m}.nobody", {"n": 0})  # received, no frame
        for n in range(5):
            expect(a, {topic: {"n": n}})
            expect(b, {topic: {"n": n}})
    wait_for(
        lambda: counter(rango, "rango_events_received_total") >= events0 + 6,
        5,
        "rango_events_received_total to advance by 6",
    )
    wait_for(
        lambda: counter(rango, "rango_frames_sent_total") >= frames0 + 10,
        5,
        "rango_frames_sent_total to advance by 10",
    )


def test_clients_and_subscriptions_summed_over_workers(rango_factory, keys):
    """Six clients spread by the kernel over two workers: the gauges are sums."""
    gw = rango_factory(args=["--workers", "2"])
    m = unique()
    topic = f"{m}.trades"
    with contextlib.ExitStack() as all_conns:
        with contextlib.ExitStack() as some:
            for i in range(6):
                stack = some if i < 4 else all_conns
                ws = stack.enter_context(
                    gw.connect(
                        "/", f"stream={topic},order", additional_headers=keys.bearer(uid=f"U{i}")
                    )
                )
                expect(ws, subscribed([topic, "order"]))
            wait_clients(gw, 6)
            wait_subs(gw, "public", topic, 6)
            wait_subs(gw, "private", "order", 6)
        wait_clients(gw, 2)
        wait_subs(gw, "public", topic, 2)
    wait_clients(gw, 0)
