"""Real clients against a real gateway: wscat (npm) and headless Chromium (Debian).

The events come from ``rango publish`` or a RabbitMQ publisher; what the clients print
or render is checked. Skipped, with the reason, where scripts/setup could not install
the client (see tests/support/clients.py).
"""

from __future__ import annotations

import json
import os
import pty
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest
from support import REPO
from support.answers import subscribed
from support.broker import unique
from support.clients import (
    Lines,
    page_url,
    publish_lines,
    serve_directory,
    status_has,
    wscat_path,
)
from support.tokens import UID

EXAMPLES = REPO / "examples"


@pytest.fixture
def wscat() -> Iterator[Any]:
    """Start wscat with arguments; returns (process, stdout lines, stderr lines)."""
    path = wscat_path()
    procs: list[subprocess.Popen[bytes]] = []

    def start(*args: str) -> tuple[subprocess.Popen[bytes], Lines, Lines]:
        proc = subprocess.Popen(
            [path, "--no-color", *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        procs.append(proc)
        return proc, Lines(proc.stdout, "wscat stdout"), Lines(proc.stderr, "wscat stderr")  # type: ignore[arg-type]

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_wscat_public_query_string_and_subscribe_frame(rango, wscat):
    """`wscat -c` as in the README: frames printed one a line; typed frames are sent."""
    market = unique()
    url = rango.url("/public", f"stream={market}.trades&stream=global.tickers")
    proc, out, _ = wscat("-c", url)
    assert out.expect_json() == subscribed([f"{market}.trades", "global.tickers"])

    publish_lines(rango.exchange, [
        f'public.{market}.trades {{"trades":[{{"tid":7,"taker_type":"buy","date":1588000798,'
        f'"price":"1020.0","amount":"0.001"}}]}}',
        f'public.global.tickers {{"{market}":{{"last":"1020.0"}}}}',
    ])  # fmt: skip
    assert out.expect_json() == {f"{market}.trades": {"trades": [{
        "tid": 7, "taker_type": "buy", "date": 1588000798, "price": "1020.0", "amount": "0.001",
    }]}}  # fmt: skip
    assert out.expect_json() == {"global.tickers": {market: {"last": "1020.0"}}}

    # Lines written to wscat's stdin are sent as frames.
    assert proc.stdin is not None
    proc.stdin.write(
        json.dumps({"event": "subscribe", "streams": [f"{market}.kline-12h"]}).encode() + b"\n"
    )
    proc.stdin.write(b"ping\n")
    proc.stdin.flush()
    assert out.expect_json() == subscribed([f"{market}.trades", "global.tickers",
                                            f"{market}.kline-12h"])
    assert out.expect(lambda line: line.strip() == "pong") == "pong"
    publish_lines(rango.exchange,
                  [f"public.{market}.kline-12h [1588204800,215.3,226.82,201.91566271,212.43,1.5]"])
    assert out.expect_json() == {f"{market}.kline-12h": [1588204800, 215.3, 226.82,
                                                          201.91566271, 212.43, 1.5]}
    proc.stdin.close()  # end of input: wscat closes the connection and exits
    assert proc.wait(timeout=10) == 0


def test_wscat_private_with_authorization_header(rango, wscat, keys):
    """`wscat -H "Authorization: Bearer ..."` on /private; `-x` sends the subscribe frame."""
    token = keys.token()
    frame = json.dumps({"event": "subscribe", "streams": ["trade"]})
    proc, out, _ = wscat(
        "-c", rango.url("/private", "stream=order"),
        "-H", f"Authorization: Bearer {token}", "-x", frame, "-w", "-1",
    )  # fmt: skip
    assert out.expect_json() == subscribed(["order"])
    assert out.expect_json() == subscribed(["order", "trade"])
    publish_lines(rango.exchange, [
        f'private.{UID}.order {{"id":22,"at":1588000798,"market":"eurusd","kind":"bid",'
        f'"price":"1026.0","state":"wait","volume":"0.001","origin_volume":"0.001"}}',
        'private.IDOTHER00001.order {"id":99}',
        f'private.{UID}.trade {{"id":7,"kind":"ask","market":"eurusd"}}',
    ])  # fmt: skip
    assert out.expect_json()["order"]["id"] == 22
    assert out.expect_json() == {"trade": {"id": 7, "kind": "ask", "market": "eurusd"}}
    assert all("IDOTHER" not in line and '"id":99' not in line for line in out.seen)
    proc.terminate()
    proc.wait(timeout=10)


def test_wscat_private_without_token_is_refused(rango, wscat):
    proc, _, err = wscat("-c", rango.url("/private", "stream=order"))
    assert "401" in err.expect("401")
    assert proc.wait(timeout=10) != 0


def test_wscat_in_a_terminal(rango, keys):
    """Interactive wscat on a pseudo-terminal, typed at as a person would."""
    path = wscat_path()
    market = unique()
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [path, "-c", rango.url("/"), "-H", f"Authorization: Bearer {keys.token()}"],
        stdin=follower, stdout=follower, stderr=follower, start_new_session=True,
    )  # fmt: skip
    os.close(follower)
    screen = Lines(leader, "wscat tty")

    def received() -> Any:  # wscat marks what it receives with "< "
        return json.loads(screen.expect(lambda line: line.startswith("< "))[2:])

    try:
        screen.expect("Connected (press CTRL+C to quit)")
        assert received() == subscribed([])  # the answer to the (empty) query string
        typed = json.dumps({"event": "subscribe", "streams": [f"{market}.trades", "order"]})
        os.write(leader, typed.encode() + b"\r")
        assert received() == subscribed([f"{market}.trades", "order"])
        assert any(typed in line for line in screen.seen)  # echoed after the "> " prompt
        publish_lines(rango.exchange, [f'public.{market}.trades {{"trades":[{{"tid":8}}]}}',
                                       f'private.{UID}.order {{"id":23}}'])
        assert received() == {f"{market}.trades": {"trades": [{"tid": 8}]}}
        assert received() == {"order": {"id": 23}}
        os.write(leader, b"\x03")  # ^C
        assert proc.wait(timeout=10) is not None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(leader)


# Headless Chromium


def text_is(selector: str, value: str) -> str:
    return f"document.querySelector({json.dumps(selector)}).textContent === {json.dumps(value)}"


def test_orderbook_page_in_chromium(rango_factory, publisher_factory, browser):
    """examples/orderbook.html in Chromium: snapshot + increments, trades, tickers, a gap."""
    market = unique()
    with serve_directory(EXAMPLES) as base:
        # A page from another origin: the gateway must list it (API_CORS_ORIGINS).
        gateway = rango_factory(env={"API_CORS_ORIGINS": base})
        publisher = publisher_factory(gateway.exchange)
        assert browser.goto(page_url(base, gateway.url("/public"), market)) == 200
        browser.wait(status_has(f"{market}.ob-inc", f"{market}.trades", "global.tickers"),
                     what="subscribed")
        # Anonymous on /public: the private streams were silently not granted.
        assert "order" not in browser.text("#status").split(": ", 1)[1].split(", ")

        now = int(time.time())
        publisher.publish(f"public.{market}.ob-snap", {
            "bids": [["1000.0", "0.25"], ["999.0", "0.005"]],
            "asks": [["1020.0", "0.005"], ["1026.0", "0.03"]], "sequence": 100,
        })  # fmt: skip
        publisher.publish(f"public.{market}.ob-inc", {"asks": [["1020.0", "0.015"]],
                                                      "sequence": 101})
        publisher.publish(f"public.{market}.ob-inc", {
            "bids": [["999.0", "0"], ["1001.5", "0.1"]], "sequence": 102,
        })  # fmt: skip
        publisher.publish(f"public.{market}.trades", {"trades": [
            {"tid": 7, "taker_type": "buy", "date": now, "price": "1020.0", "amount": "0.001"},
            {"tid": 8, "taker_type": "sell", "date": now, "price": "1000.0", "amount": "0.2"},
        ]})  # fmt: skip
        publisher.publish("public.global.tickers", {market: {
            "name": "M/USD", "low": "999.0", "high": "1020.0", "last": "1000.0", "open": 1010.0,
            "volume": "0.201", "sell": "1020.0", "buy": "1001.5",
            "price_change_percent": "-0.99%", "at": now,
        }})  # fmt: skip

        browser.wait(text_is("#sequence", "102") + " && document.querySelectorAll("
                     "'#trades tbody tr').length === 2 && document.querySelector("
                     "'#tickers tbody tr') !== null", what="book at 102, trades, tickers")
        assert browser.rows("#asks tbody tr") == [["1026.0", "0.03"], ["1020.0", "0.015"]]
        assert browser.rows("#bids tbody tr") == [["1001.5", "0.1"], ["1000.0", "0.25"]]
        assert browser.text("#spread") == "spread 18.5"
        trades = browser.rows("#trades tbody tr")
        assert [row[1:] for row in trades] == [["1000.0", "0.2", "sell"],
                                               ["1020.0", "0.001", "buy"]]
        assert browser.rows("#tickers tbody tr") == [
            [market, "1000.0", "-0.99%", "0.201", "1001.5", "1020.0"]
        ]
        assert browser.evaluate("document.querySelector('#notice').hidden") is True

        # The engine re-snapshots at 200: the page, at 102, sees 201 arrive, shows the
        # gap and subscribes again, which brings the new snapshot and 201.
        publisher.publish(f"public.{market}.ob-snap", {
            "bids": [["1005.0", "1"]], "asks": [["1010.0", "2"]], "sequence": 200,
        })  # fmt: skip
        publisher.publish(f"public.{market}.ob-inc", {"bids": [["1006.0", "0.5"]],
                                                      "sequence": 201})
        browser.wait(text_is("#sequence", "201"), what="resynced at 201")
        notice = browser.text("#notice")
        assert "expected 103, got 201" in notice, notice
        assert "Resynced from a snapshot at sequence 200" in notice, notice
        assert browser.rows("#asks tbody tr") == [["1010.0", "2"]]
        assert browser.rows("#bids tbody tr") == [["1006.0", "0.5"], ["1005.0", "1"]]
        browser.screenshot("orderbook.png")

        # Clicking another market's ticker switches the book to that market.
        other = unique()
        publisher.publish(f"public.{other}.ob-snap", {
            "bids": [["5.0", "1"]], "asks": [["6.0", "1"]], "sequence": 7,
        })  # fmt: skip
        publisher.publish("public.global.tickers", {other: {"last": "5.5"}})
        browser.wait(f"document.querySelector('#tickers tr[data-market={other}]') !== null",
                     what="the other ticker")
        browser.command("click", selector=f"#tickers tr[data-market={other}]")
        browser.wait(text_is("#book-market", other) + " && " + text_is("#sequence", "7"),
                     what="the other market's book")
        assert browser.rows("#asks tbody tr") == [["6.0", "1"]]
        assert browser.rows("#trades tbody tr") == []
        assert other in browser.text("#status") and f"{market}.ob-inc" not in browser.text(
            "#status"
        )


# Compression (RFC 7692) with real clients, as they offer it by default.

ZENV = {"RANGO_COMPRESSION": "1", "RANGO_COMPRESSION_MIN_SIZE": "64"}


def deep_book(levels: int, sequence: int) -> dict[str, Any]:
    return {
        "bids": [[f"{1000 - i * 0.5:.1f}", f"{0.001 * (i + 1):.3f}"] for i in range(levels)],
        "asks": [[f"{1001 + i * 0.5:.1f}", f"{0.002 * (i + 1):.3f}"] for i in range(levels)],
        "sequence": sequence,
    }


def test_wscat_negotiates_compression_and_prints_frames(rango_factory, wscat):
    gateway = rango_factory(env=ZENV)
    market = unique()
    proc, out, _ = wscat("-c", gateway.url("/public", f"stream={market}.trades"))
    assert out.expect_json() == subscribed([f"{market}.trades"])
    book = deep_book(50, 1)  # ~2 KB: compressed on the wire
    publish_lines(gateway.exchange, [f"public.{market}.trades {json.dumps(book)}"])
    assert out.expect_json() == {f"{market}.trades": book}
    assert proc.stdin is not None
    proc.stdin.close()
    assert proc.wait(timeout=10) == 0


def test_orderbook_page_in_chromium_with_compression(rango_factory, publisher_factory, browser):
    """Chromium negotiates permessage-deflate (its default offer) and the page builds its
    book from compressed frames: a 50-level snapshot and increments."""
    market = unique()
    with serve_directory(EXAMPLES) as base:
        gateway = rango_factory(env={"API_CORS_ORIGINS": base, **ZENV})
        publisher = publisher_factory(gateway.exchange)
        assert browser.goto(page_url(base, gateway.url("/public"), market)) == 200
        browser.wait(status_has(f"{market}.ob-inc"), what="subscribed")
        extensions = browser.evaluate("ws.extensions")
        assert extensions.startswith("permessage-deflate"), extensions
        assert "server_no_context_takeover" in extensions, extensions
        publisher.publish(f"public.{market}.ob-snap", deep_book(50, 10))
        publisher.publish(f"public.{market}.ob-inc", {"bids": [["2000.0", "1.5"]], "sequence": 11})
        browser.wait(text_is("#sequence", "11"), what="book at 11")
        bids = browser.rows("#bids tbody tr")
        assert bids[0] == ["2000.0", "1.5"], bids[:2]
        assert ["1000.0", "0.001"] in bids, bids[:3]
