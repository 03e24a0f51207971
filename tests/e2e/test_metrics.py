"""PROTOCOL §7, end to end: the Prometheus endpoint follows clients and subscriptions.

The module's gateway is used by this module only, so client counts are exact.
Disconnects and the once-a-second counter sync are asynchronous: values are polled.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from typing import Any

import pytest
from support.answers import cannot, expect, recv_json, request, subscribed, unsubscribed
from support.broker import unique
from support.gateway import http_get
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
    assert not any(name.startswith("go_") for name in names)


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


PROMTOOL = shutil.which("promtool")
# Names the original Rango and Ranger export, kept for drop-in dashboards, that
# promtool's linter would name otherwise.
COMPATIBLE = ("rango_hub_clients_count", "rango_hub_subscriptions_count")


def _limit(pid: int, name: str) -> float:
    with open(f"/proc/{pid}/limits") as f:
        line = next(line for line in f if line.startswith(name))
    soft = line[len(name):].split()[0]
    return float(2**64 - 1) if soft == "unlimited" else float(soft)


def _started(pid: int) -> float:
    with open(f"/proc/{pid}/stat", "rb") as f:
        ticks = int(f.read().rpartition(b")")[2].split()[19])
    with open("/proc/stat", "rb") as f:
        boot = next(int(line.split()[1]) for line in f if line.startswith(b"btime"))
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def test_go_rangos_process_and_scrape_series(rango_factory):
    """process_max_fds (the lowest soft limit of the processes, each one in
    rango_worker_max_fds), process_virtual_memory_max_bytes, process_start_time_seconds
    (the supervisor's), and the scrape counters of promhttp."""
    gw = rango_factory(args=["--workers", "2"])
    pids = wait_for(lambda: len(gw.worker_pids()) == 2 and gw.worker_pids(), 10, "2 workers")
    metrics = wait_for(
        lambda: len(samples(m := gw.metrics(), "rango_worker_max_fds")) == 3 and m,
        10, "both workers in the breakdown",
    )  # fmt: skip
    every = [gw.pid, *pids]
    assert sample(metrics, "process_max_fds") == min(_limit(p, "Max open files") for p in every)
    per = {labels["worker"]: v for labels, v in samples(metrics, "rango_worker_max_fds")}
    assert set(per) == {"0", "1", "supervisor"}, per
    assert per["supervisor"] == _limit(gw.pid, "Max open files")
    assert sample(metrics, "process_virtual_memory_max_bytes") == min(
        _limit(p, "Max address space") for p in every
    )
    started = sample(metrics, "process_start_time_seconds")
    assert started is not None and abs(started - _started(gw.pid)) < 0.05
    assert started <= time.time()
    before = sample(metrics, "promhttp_metric_handler_requests_total", code="200") or 0
    for _ in range(3):
        metrics = gw.metrics()
    after = sample(metrics, "promhttp_metric_handler_requests_total", code="200")
    # The scrape being served counts once it is answered; it is in flight meanwhile.
    assert after == before + 3, (before, after)
    assert sample(metrics, "promhttp_metric_handler_requests_in_flight") == 1
    assert sample(metrics, "promhttp_metric_handler_requests_total", code="500") == 0


@pytest.mark.skipif(PROMTOOL is None, reason="promtool (Debian's prometheus) is not installed")
def test_live_scrape_passes_promtool(rango_factory, keys, publisher_factory):
    """`promtool check metrics` on a scrape of two workers with clients, public and
    private subscriptions and events routed: no error, and no warning but those the
    original names force."""
    gw = rango_factory(args=["--workers", "2"])
    publisher = publisher_factory(gw.exchange)
    topic = f"{unique()}.trades"
    with contextlib.ExitStack() as stack:
        for i in range(6):
            bearer = keys.bearer(uid=f"U{i}")
            ws = stack.enter_context(
                gw.connect("/", f"stream={topic},order", additional_headers=bearer)
            )
            expect(ws, subscribed([topic, "order"]))
        publisher.publish(f"public.{topic}", {"n": 1})
        publisher.publish("nodots", {"n": 1})  # a drop, so that its series exists
        wait_clients(gw, 6)
        wait_subs(gw, "private", "order", 6)
        wait_for(lambda: counter(gw, "rango_events_dropped_total", reason="bad_routing_key"),
                 10, "the drop counted")
        text = http_get(gw.metrics_port, "/metrics")[1]
    assert "rango_hub_subscriptions_count{" in text, text
    assert "rango_events_dropped_total{" in text, text
    assert PROMTOOL is not None
    checked = subprocess.run(
        [PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )
    lines = [line for line in (checked.stdout + checked.stderr).splitlines() if line.strip()]
    unexpected = [line for line in lines if not line.startswith(COMPATIBLE)]
    assert not unexpected, lines
    assert checked.returncode == 0 or (lines and not unexpected), checked


def test_event_routing_histogram(rango, publisher):
    """rango_event_routing_seconds{worker}: one observation per event, delivered or
    not, from the AMQP delivery to the write; cumulative buckets, a plausible sum."""
    topic = f"{unique()}.trades"
    before = sample(rango.metrics(), "rango_event_routing_seconds_count", worker="0") or 0
    with rango.connect("/", f"stream={topic}") as ws:
        expect(ws, subscribed([topic]))
        for n in range(20):
            publisher.publish(f"public.{topic}", {"n": n})
        publisher.publish(f"public.{unique()}.trades", {"nobody": "listens"})
        for n in range(20):
            assert recv_json(ws) == {topic: {"n": n}}
    metrics = wait_for(
        lambda: (m := rango.metrics())
        and (sample(m, "rango_event_routing_seconds_count", worker="0") or 0) >= before + 21
        and m,
        10, "21 events in the histogram",
    )  # fmt: skip
    buckets = sorted(
        (float(labels["le"]), v)
        for labels, v in samples(metrics, "rango_event_routing_seconds_bucket")
        if labels["worker"] == "0"
    )
    counts = [v for _, v in buckets]
    assert counts == sorted(counts) and buckets[-1][0] == float("inf")
    assert buckets[-1][1] == sample(metrics, "rango_event_routing_seconds_count", worker="0")
    total = sample(metrics, "rango_event_routing_seconds_sum", worker="0")
    assert total is not None and 0 < total < 21 * 1.0
