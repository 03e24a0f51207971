"""`rango demo`: a live synthetic feed, through a real gateway to real clients."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from support import AMQP_URL, REPO
from support.answers import recv_json
from support.clients import Browser, Lines, chromium_path, page_url, serve_directory
from support.tokens import UID

from rango.tools import parse_event

MARKETS = ("btcusd", "ethusd")


@pytest.fixture
def demo() -> Iterator[Any]:
    """Start ``rango demo --print`` with arguments; returns the process and its stdout lines."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(exchange: str, *args: str) -> tuple[subprocess.Popen[bytes], Lines]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "rango.cli", "demo", "--print", "--exchange", exchange,
             "--amqp-addr", AMQP_URL, *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO,
        )  # fmt: skip
        procs.append(proc)
        return proc, Lines(proc.stdout, "rango demo")  # type: ignore[arg-type]

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()  # type: ignore[union-attr]
        proc.stderr.close()  # type: ignore[union-attr]


def finish(proc: subprocess.Popen[bytes], lines: Lines, timeout: float = 15) -> list[Any]:
    """Wait for the demo to end; return the events it printed, parsed, as published."""
    assert proc.wait(timeout=timeout) == 0, proc.stderr.read()  # type: ignore[union-attr]
    with pytest.raises(AssertionError, match="ended without"):
        lines.expect(lambda line: False, timeout=5)  # the rest of its output
    stderr = proc.stderr.read().decode()  # type: ignore[union-attr]
    events = [parse_event(line.encode()) for line in lines.seen if line]
    assert f"published {len(events)} events" in stderr, stderr
    return [(event.routing_key, orjson.loads(event.body)) for event in events if event]


def replay(events: list[Any], market: str) -> tuple[dict[str, dict[str, str]], int]:
    """The order book of ``market`` after ``events``: checks sequences and crossing."""
    book: dict[str, dict[str, str]] = {}
    sequence = -1
    for key, body in events:
        if key == f"public.{market}.ob-snap":
            book = {side: dict(body[side]) for side in ("bids", "asks")}
            sequence = body["sequence"]
        elif key == f"public.{market}.ob-inc":
            assert book, "an increment before the first snapshot"
            assert body["sequence"] == sequence + 1, (sequence, body)
            sequence = body["sequence"]
            for side in ("bids", "asks"):
                for price, amount in body.get(side, []):
                    if amount == "0":
                        book[side].pop(price)
                    else:
                        book[side][price] = amount
            assert book["bids"] and book["asks"]
            assert max(map(float, book["bids"])) < min(map(float, book["asks"]))
    return book, sequence


def test_demo_feed_through_the_gateway(rango_factory, keys, demo):
    """Every kind of event, consecutive sequences, exactly what the demo published."""
    gateway = rango_factory()
    market = MARKETS[0]
    streams = [f"{market}.ob-inc", f"{market}.trades", f"{market}.kline-1m", "global.tickers"]
    public = gateway.connect(query="stream=" + ",".join(streams))
    private = gateway.connect("/private", "stream=order,trade", additional_headers=keys.bearer())
    with public, private:
        assert recv_json(public)["success"]["message"] == "subscribed"
        assert recv_json(private) == {
            "success": {"message": "subscribed", "streams": ["order", "trade"]}
        }
        proc, lines = demo(gateway.exchange, "--duration", "3", "--rate", "60", "--seed", "7",
                           "--market", ",".join(MARKETS))
        events = finish(proc, lines)

        # The client gets exactly the events of its streams, in order: the first
        # snapshot (sent to -inc subscribers waiting for one; later ones are only
        # stored), then every increment, trade, kline and ticker.
        expected: list[Any] = []
        for key, body in events:
            name = key.split(".", 1)[1]
            if key == f"public.{market}.ob-snap":
                if not expected or f"{market}.ob-snap" not in expected[0]:
                    expected.insert(0, {f"{market}.ob-snap": body})
            elif key.startswith("public.") and name in streams:
                expected.append({name: body})
        assert next(iter(expected[0])) == f"{market}.ob-snap"
        assert [recv_json(public) for _ in expected] == expected

        mine = [
            {key.split(".")[2]: body} for key, body in events if key.startswith(f"private.{UID}.")
        ]
        assert [recv_json(private) for _ in mine] == mine

    names = {key.rsplit(".", 1)[1] for key, _ in events}
    assert {"ob-snap", "ob-inc", "trades", "kline-1m", "tickers", "order", "trade"} <= names
    assert {key.split(".")[1] for key, _ in events if key.startswith("private.")} == {UID}
    for name in MARKETS:
        book, sequence = replay(events, name)
        assert sequence > 0 and len(book["bids"]) >= 6 and len(book["asks"]) >= 6
    snapshots = [key for key, _ in events if key.endswith(".ob-snap")]
    assert len(snapshots) >= len(MARKETS) + 1  # at start, then every --snapshot-every
    tickers = [body for key, body in events if key == "public.global.tickers"]
    assert len(tickers) >= 3 and set(tickers[-1]) == set(MARKETS)
    assert tickers[-1]["btcusd"]["name"] == "BTC/USD"
    assert float(tickers[-1]["btcusd"]["buy"]) < float(tickers[-1]["btcusd"]["sell"])


def test_demo_moves_the_example_page(rango_factory, demo, tmp_path):
    """The README's last step: the demo feed, the page joining mid-stream, no gap."""
    chromium = chromium_path()
    with serve_directory(REPO / "examples") as base:
        gateway = rango_factory(env={"API_CORS_ORIGINS": base})
        # Long enough for a cold Chromium start on a busy machine, so that the page
        # is subscribed while tickers (one a second) are still being published.
        proc, lines = demo(gateway.exchange, "--duration", "8", "--rate", "50",
                           "--snapshot-every", "1", "--market", ",".join(MARKETS))
        for _ in range(20):  # the page joins a feed already running
            lines.expect(lambda line: True)
        browser = Browser(chromium, tmp_path / "profile", tmp_path / "browser.log")
        try:
            assert browser.goto(page_url(base, gateway.url("/public"), "btcusd")) == 200
            browser.wait(
                "document.querySelector('#status').textContent.startsWith('subscribed')",
                what="the page subscribed",
            )
            assert proc.poll() is None, "the demo ended before the page subscribed"
            events = finish(proc, lines)
            book, sequence = replay(events, "btcusd")
            browser.wait(
                f"document.querySelector('#sequence').textContent === '{sequence}'",
                what=f"the last btcusd sequence, {sequence}",
            )
            assert browser.evaluate("document.querySelector('#notice').hidden") is True
            asks = sorted(book["asks"].items(), key=lambda level: float(level[0]))[:12]
            bids = sorted(book["bids"].items(), key=lambda level: -float(level[0]))[:12]
            assert browser.rows("#asks tbody tr") == [list(level) for level in asks[::-1]]
            assert browser.rows("#bids tbody tr") == [list(level) for level in bids]
            trades = [t for key, body in events if key == "public.btcusd.trades"
                      for t in body["trades"]]
            assert browser.rows("#trades tbody tr")[0][1:3] == [trades[-1]["price"],
                                                               trades[-1]["amount"]]
            ticker = [body for key, body in events if key == "public.global.tickers"][-1]
            assert browser.rows("#tickers tbody tr") == [
                [name, t["last"], t["price_change_percent"], t["volume"], t["buy"], t["sell"]]
                for name, t in sorted(ticker.items())
            ]
            browser.screenshot("orderbook-demo.png")
        finally:
            browser.close()


@pytest.mark.parametrize(
    ("args", "status", "message"),
    [
        (["--market", "eur.usd"], 2, "--market 'eur.usd': use letters, digits, _ or - (no dots)"),
        (["--uid", "a.b"], 2, "--uid 'a.b': a uid cannot be empty or contain dots"),
        (["--amqp-addr", "amqp://guest:guest@127.0.0.1:1/"], 1, "cannot connect to amqp://"),
        (["--rate", "0"], 2, "argument --rate: '0' is not a finite number above zero"),
    ],
)
def test_demo_bad_input_is_one_line(args, status, message):
    result = subprocess.run(
        [sys.executable, "-m", "rango.cli", "demo", "--duration", "1", *args],
        capture_output=True, text=True, cwd=REPO, timeout=20,
    )  # fmt: skip
    assert result.returncode == status
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert "guest:guest" not in result.stderr  # the password is never printed
    if status == 1:
        assert len(result.stderr.strip().splitlines()) == 1


def test_print_into_a_closed_pipe_ends_quietly():
    """``rango demo --print | head -1``: the reader leaving is no broker error."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "rango.cli", "demo", "--print", "--amqp-addr", AMQP_URL,
         "--exchange", "rango.test.demo-pipe"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline().startswith(b"public.")
    proc.stdout.close()  # as head does after its line
    assert proc.wait(timeout=15) == 0
    stderr = proc.stderr.read().decode()
    proc.stderr.close()
    assert "stdout closed: published" in stderr, stderr
    assert "Broken pipe" not in stderr and "Traceback" not in stderr, stderr
