"""Debian's real nginx in front of a real Rango, with the repository's own
``deploy/nginx/rango.conf`` (README, "Private streams from a browser").

Browsers cannot set an ``Authorization`` header on a websocket: nginx asks a session
check (a tiny HTTP service of the test's own, :class:`support.nginx.SessionCheck`) about
the cookie and hands Rango the JWT it answers. Checked here: what nginx forwards, header
by header; Chromium with the session cookie gets its private orders, without it (or
with an ``Authorization`` of its own) 401; a reader that stops reading is still dropped
by Rango's bound and costs nginx a bounded amount of memory. Skipped, with the reason,
where nginx (or Chromium, for the browser test) is not installed.
"""

from __future__ import annotations

import dataclasses
import re
import threading
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import pytest
from support.answers import recv_json, subscribed
from support.broker import unique
from support.clients import page_url, status_has
from support.nginx import CONF, PREFIX, Nginx, Recorder, SessionCheck, nginx_path, slow_readers
from support.polling import wait_for, wait_logged
from support.tokens import UID
from support.wire import RawClient
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from rango.config import Config

SESSION = "s3ss10n"
BIG_SESSION = "b1g"  # its JWT (8,014 bytes) is near Rango's 8 KiB bound


@pytest.fixture(scope="module")
def session_check(keys) -> Iterator[SessionCheck]:
    sessions = {SESSION: keys.token(), BIG_SESSION: keys.token(pad="x" * 5500)}
    assert 7900 < len(sessions[BIG_SESSION]) <= 8192
    with SessionCheck(sessions) as check:
        yield check


@pytest.fixture(scope="module")
def nginx(rango, session_check, tmp_path_factory) -> Iterator[Nginx]:
    """nginx with deploy/nginx/rango.conf in front of the module's Rango."""
    nginx_path()
    with Nginx(tmp_path_factory.mktemp("nginx"), rango.port, session_check.port) as instance:
        yield instance


def refused(url: str, headers: dict[str, str]) -> int:
    """The HTTP status a websocket upgrade to ``url`` is refused with."""
    with pytest.raises(InvalidStatus) as info:
        connect(url, additional_headers=headers, open_timeout=5)
    return info.value.response.status_code


def test_what_nginx_forwards(keys, session_check, tmp_path):
    """Header by header, what reaches the upstream: the session's JWT instead of the
    client's cookie and Authorization, the client's Host, the upgrade headers."""
    nginx_path()
    recorder = Recorder()
    stack = ExitStack()
    stack.callback(recorder.close)
    try:
        proxy = stack.enter_context(Nginx(tmp_path / "nginx", recorder.port, session_check.port))
        own = f"Bearer {keys.token(uid='IDOTHER00001')}"

        def forwarded(path: str, headers: dict[str, str]) -> tuple[str, dict[str, str]]:
            before = len(recorder.heads)
            answer = RawClient(proxy.port, f"{PREFIX}{path}", headers)
            assert answer.status == 400, answer.head  # the recorder's answer, relayed
            answer.close()
            assert len(recorder.heads) == before + 1
            request_line, fields = recorder.heads[-1]
            names = [name.lower() for name, _ in fields]
            assert len(names) == len(set(names)), fields  # nothing sent twice
            return request_line, {name.lower(): value for name, value in fields}

        line, head = forwarded("/private?stream=order",
                               {"Cookie": f"theme=dark; session={SESSION}", "Authorization": own})
        assert line == "GET /private?stream=order HTTP/1.1"
        assert head["authorization"] == f"Bearer {session_check.sessions[SESSION]}"
        assert session_check.asked[-1]["path"] == "/session"
        # The cookie alone decides: the check never sees the client's Authorization.
        assert "authorization" not in {name.lower() for name in session_check.asked[-1]}
        assert session_check.asked[-1]["X-Original-URI"] == f"{PREFIX}/private?stream=order"
        assert "cookie" not in head
        assert head["host"] == f"127.0.0.1:{proxy.port}"  # Rango compares Origin with it
        assert head["upgrade"] == "websocket"
        assert head["connection"] == "upgrade"

        _, head = forwarded("/private", {"Cookie": f"session={BIG_SESSION}"})
        assert head["authorization"] == f"Bearer {session_check.sessions[BIG_SESSION]}"

        line, head = forwarded("/public?stream=global.tickers",
                               {"Cookie": f"session={SESSION}", "Authorization": own})
        assert line == "GET /public?stream=global.tickers HTTP/1.1"
        assert "authorization" not in head and "cookie" not in head
        assert head["host"] == f"127.0.0.1:{proxy.port}"
        assert head["upgrade"] == "websocket" and head["connection"] == "upgrade"

        # No session: nginx answers 401 itself, and nothing reaches the upstream.
        before = len(recorder.heads)
        for headers in ({}, {"Cookie": "session=wrong"}, {"Authorization": own}):
            answer = RawClient(proxy.port, f"{PREFIX}/private", headers)
            assert answer.status == 401, answer.head
            answer.close()
        assert len(recorder.heads) == before
    finally:
        stack.close()


def test_idle_connections_outlast_rangos_keepalive():
    """nginx closes an upgraded connection after proxy_read_timeout without data; on a
    quiet stream the first data is Rango's ping (RANGO_PING_INTERVAL) and the client's
    answer (RANGO_PING_TIMEOUT), so both websocket locations must wait longer than that,
    leaving silent clients to Rango's keepalive (waiting a minute here would prove no more)."""
    timeouts = [int(value) for value in re.findall(r"(?m)^\s*proxy_read_timeout (\d+)s;",
                                                   CONF.read_text())]
    assert len(timeouts) == 2, timeouts
    defaults = {field.name: field.default for field in dataclasses.fields(Config)}
    keepalive = defaults["ping_interval"] + defaults["ping_timeout"]
    assert all(value > keepalive for value in timeouts), (timeouts, keepalive)


# Headless Chromium through nginx.


def test_browser_gets_private_orders_through_nginx(rango, nginx, publisher, keys, browser):
    """examples/orderbook.html from nginx, its websocket to /private behind the same
    origin: refused without the session cookie, its own orders and trades with it."""
    market = unique()
    url = page_url(nginx.base, nginx.url("/private"), market)
    try:
        # Without a session the page's upgrade is refused (and the page keeps retrying).
        assert browser.goto(url) == 200
        wait_for(lambda: any(line.startswith(f"GET {PREFIX}/private 401 ")
                             and "HeadlessChrome" in line for line in nginx.access_log()),
                 10, "the browser's upgrade refused with 401")
        assert not browser.text("#status").startswith("subscribed")
        # ... as is anyone's without the session, even with a header of its own.
        own = keys.bearer()
        for headers in ({}, {"Cookie": "session=wrong"}, own, {**own, "Cookie": "session=x"}):
            assert refused(nginx.url("/private"), headers) == 401, headers

        browser.command("cookie", name="session", value=SESSION, url=nginx.base)
        assert browser.goto(url) == 200
        browser.wait(status_has(f"{market}.ob-inc", "order", "trade"), what="private subscribed")

        publisher.publish("private.IDOTHER00001.order", {"id": 99, "market": market})
        publisher.publish(f"private.{UID}.order", {
            "id": 22, "market": market, "kind": "bid", "price": "1026.0", "state": "wait",
            "volume": "0.001",
        })  # fmt: skip
        publisher.publish(f"private.{UID}.trade", {
            "id": 7, "market": market, "kind": "bid", "price": "1026.0", "volume": "0.001",
        })  # fmt: skip
        browser.wait("document.querySelectorAll('#private li').length === 2", what="private")
        items = browser.evaluate(
            "Array.from(document.querySelectorAll('#private li'), li => li.textContent)"
        )
        assert items == [f"trade #7 {market} bid 0.001 @ 1026.0",
                         f"order #22 {market} bid 0.001 @ 1026.0: wait"]
        browser.screenshot("orderbook-private.png")
    finally:
        browser.goto("about:blank")


# A reader that stops reading, through nginx.

SLOW_CLIENTS = 10
# What nginx may add while the slow clients' data piles up: it relays an upgraded
# connection through one proxy_buffer_size buffer each way (4k in rango.conf), so a
# few pages each. With `proxy_buffer_size 1m` the same test measures ~1 MiB each.
GROWTH_PER_SLOW_CLIENT = 256 * 1024


def test_slow_reader_through_nginx_is_dropped_by_rango(rango, nginx, publisher):
    """Clients through nginx that never read: Rango drops each at its bound
    (RANGO_MAX_PENDING_BYTES, 4 MiB), a reader through nginx misses nothing, and
    nginx's memory does not follow the data that piles up."""
    stream = f"{unique()}.trades"
    dropped_before = rango.metrics().get("rango_slow_clients_dropped_total", 0.0)
    drops_logged = rango.log().count("dropping slow client")
    with connect(nginx.url(f"/public?stream={stream}"), open_timeout=5) as ws:
        assert recv_json(ws) == subscribed([stream])
        received: list[Any] = []
        failure: list[BaseException] = []

        def read() -> None:
            try:
                while (frame := recv_json(ws, timeout=20)) != {stream: {"end": True}}:
                    received.append(frame)
            except BaseException as exc:  # reported by the test thread
                failure.append(exc)

        reader = threading.Thread(target=read, daemon=True)
        seen = slow_readers(rango, nginx, publisher, stream, SLOW_CLIENTS, before=reader.start)
        try:
            publisher.publish(f"public.{stream}", {"end": True})
            reader.join(30)
            assert not failure, (failure, len(received), seen.sent)
            assert not reader.is_alive(), f"reader stuck after {len(received)} of {seen.sent}"
            assert [frame[stream]["seq"] for frame in received] == list(range(seen.sent)), (
                "the reader through nginx lost or reordered events")

            # Rango dropped them (not nginx): one log line each; once read, nginx passes
            # the close on (what it still held, then EOF).
            wait_logged(rango, lambda: rango.log().count("dropping slow client")
                        >= drops_logged + SLOW_CLIENTS, 5, "the drops logged")
            assert all(client.read_until_closed(10) for client in seen.clients), (
                "a slow client is still connected")
            growth = seen.rss_peak - seen.rss_connected
            assert growth < SLOW_CLIENTS * GROWTH_PER_SLOW_CLIENT, (
                f"nginx grew {growth} B while {SLOW_CLIENTS} clients did not read: {seen}")
            assert seen.rss_peak - seen.rss_before < 64 * 1024 * 1024, seen
            assert rango.metrics()["rango_slow_clients_dropped_total"] == (
                dropped_before + SLOW_CLIENTS)
        finally:
            for client in seen.clients:
                client.close(reset=True)
    # nginx and Rango still serve new clients.
    with connect(nginx.url(f"/public?stream={stream}"), open_timeout=5) as again:
        assert recv_json(again) == subscribed([stream])
        publisher.publish(f"public.{stream}", {"alive": True})
        assert recv_json(again) == {stream: {"alive": True}}
