"""The markets that ``rango demo`` simulates, and the feed of events made from them.

:class:`DemoMarket` is one market: an order book kept in whole price ticks and
amount steps, from which its ob-snap and ob-inc bodies are printed, and the
statistics of its ticker and klines. :func:`demo_events` mixes the events of all
the markets with the orders and trades of one user, as a trading engine would.
Apart from ``rango demo`` itself, so that the command reads as flags and a loop.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from typing import Any

import orjson

from ._broker import Event

# name: (opening price, price tick, typical order size, amount step)
DEMO_MARKETS: dict[str, tuple[float, float, float, float]] = {
    "btcusd": (65000.0, 0.5, 0.4, 0.0001),
    "ethusd": (3400.0, 0.05, 6.0, 0.001),
    "xrpusd": (0.52, 0.0001, 2500.0, 1.0),
}
DEMO_OTHER_MARKET = (100.0, 0.01, 10.0, 0.01)
DEMO_DEPTH = 12  # price levels a side, about


def _decimals(step: float) -> int:
    """Decimal places to print multiples of ``step`` with (at least one)."""
    text = f"{step:.10f}".rstrip("0")
    return max(1, len(text.partition(".")[2]))


class DemoMarket:
    """One market of the demo: an order book in whole ticks and steps, and its statistics."""

    def __init__(self, name: str, rng: random.Random) -> None:
        price, self.tick, size, self.step = DEMO_MARKETS.get(name, DEMO_OTHER_MARKET)
        self.name, self.rng = name, rng
        self.base, self.quote = (name[:-3], name[-3:]) if len(name) > 3 else (name, "usd")
        self.price_places, self.amount_places = _decimals(self.tick), _decimals(self.step)
        self.size = max(1.0, size / self.step)  # typical order size in steps
        mid = round(price / self.tick)
        self.bids: dict[int, int] = {}  # price in ticks -> amount in steps
        self.asks: dict[int, int] = {}
        for book, direction in ((self.bids, -1), (self.asks, 1)):
            level = mid + direction
            for _ in range(DEMO_DEPTH):
                book[level] = self.random_amount()
                level += direction * rng.choice((1, 1, 2, 3))
        self.sequence = rng.randrange(100_000, 1_000_000)
        self.open = self.high = self.low = self.last = mid * self.tick
        self.volume = 0.0
        self.candle: list[float] | None = None

    def random_amount(self, scale: float = 1.0) -> int:
        """An order size in amount steps, exponentially distributed around the typical one."""
        return max(1, round(self.rng.expovariate(1 / (self.size * scale))))

    def price(self, ticks: int) -> str:
        return f"{ticks * self.tick:.{self.price_places}f}"

    def amount(self, steps: int) -> str:
        return f"{steps * self.step:.{self.amount_places}f}" if steps else "0"

    def best(self, side: str) -> int:
        return max(self.bids) if side == "bids" else min(self.asks)

    def snapshot(self) -> dict[str, Any]:
        return {
            "bids": [[self.price(p), self.amount(a)] for p, a in sorted(self.bids.items())[::-1]],
            "asks": [[self.price(p), self.amount(a)] for p, a in sorted(self.asks.items())],
            "sequence": self.sequence,
        }

    def _increment(self, side: str, changes: dict[int, int]) -> dict[str, Any]:
        self.sequence += 1
        levels = [[self.price(p), self.amount(a)] for p, a in changes.items()]
        return {side: levels, "sequence": self.sequence}

    def book_change(self) -> dict[str, Any]:
        """Change one side of the book a little: an ob-inc body."""
        side = self.rng.choice(("bids", "asks"))
        book = self.bids if side == "bids" else self.asks
        changes: dict[int, int] = {}
        roll = self.rng.random()
        if roll < 0.45:  # an order added to or cancelled from a level
            level = self.rng.choice(list(book))
            book[level] = changes[level] = self.random_amount()
        elif roll < 0.65 and len(book) > DEMO_DEPTH // 2:  # a level emptied
            level = self.rng.choice(list(book))
            del book[level]
            changes[level] = 0
        else:  # a new level, inside the spread now and then
            direction = -1 if side == "bids" else 1
            best, other = self.best(side), self.best("asks" if side == "bids" else "bids")
            if abs(other - best) > 1 and self.rng.random() < 0.4:
                level = best - direction * self.rng.randint(1, abs(other - best) - 1)
            elif len(book) < DEMO_DEPTH + 4:
                level = best + direction * self.rng.randint(1, 2 * DEMO_DEPTH)
            else:  # within the book, so that _trim does not drop it at once
                worst = min(book) if side == "bids" else max(book)
                level = best + direction * self.rng.randint(1, abs(worst - best))
            book[level] = changes[level] = self.random_amount()
        changes.update(self._trim(side))
        return self._increment(side, changes)

    def _trim(self, side: str) -> dict[int, int]:
        """Keep a side between DEPTH/2 and DEPTH+4 levels; return the levels changed."""
        book = self.bids if side == "bids" else self.asks
        direction = -1 if side == "bids" else 1
        changes = {}
        while len(book) > DEMO_DEPTH + 4:
            worst = min(book) if side == "bids" else max(book)
            del book[worst]
            changes[worst] = 0
        while len(book) < DEMO_DEPTH // 2:
            worst = min(book) if side == "bids" else max(book)
            level = worst + direction * self.rng.randint(1, 3)
            book[level] = changes[level] = self.random_amount()
        return changes

    def trade(self, tid: int, now: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """A taker order against the best level: the trade and the ob-inc body it causes."""
        taker = self.rng.choice(("buy", "sell"))
        side = "asks" if taker == "buy" else "bids"
        book = self.asks if side == "asks" else self.bids
        level = self.best(side)
        volume = min(book[level], self.random_amount(0.5))
        book[level] -= volume
        changes = {level: book[level]}
        if not book[level]:
            del book[level]
        changes.update(self._trim(side))
        self.record(level * self.tick, volume * self.step, now)
        trade = {
            "tid": tid, "taker_type": taker, "date": now,
            "price": self.price(level), "amount": self.amount(volume),
        }  # fmt: skip
        return trade, self._increment(side, changes)

    def record(self, price: float, volume: float, now: int) -> None:
        self.last, self.volume = price, self.volume + volume
        self.high, self.low = max(self.high, price), min(self.low, price)
        start = now - now % 60
        if self.candle is None or self.candle[0] != start:
            self.candle = [start, price, price, price, price, 0.0]
        candle = self.candle
        candle[2], candle[3], candle[4] = max(candle[2], price), min(candle[3], price), price
        candle[5] += volume

    def ticker(self, now: int) -> dict[str, Any]:
        change = (self.last - self.open) / self.open * 100 if self.open else 0.0
        return {
            "name": f"{self.base.upper()}/{self.quote.upper()}",
            "base_unit": self.base, "quote_unit": self.quote,
            "low": self._float(self.low), "high": self._float(self.high),
            "last": self._float(self.last), "open": round(self.open, self.price_places),
            "volume": f"{self.volume:.{self.amount_places}f}",
            "sell": self.price(self.best("asks")), "buy": self.price(self.best("bids")),
            "price_change_percent": f"{round(change, 2) + 0.0:+.2f}%", "at": now,
        }  # fmt: skip

    def kline(self, now: int) -> list[float]:
        start = now - now % 60
        if self.candle is None or self.candle[0] != start:
            self.candle = [start, self.last, self.last, self.last, self.last, 0.0]
        places = [0, *[self.price_places] * 4, self.amount_places]
        return [
            round(value, n) if n else int(value)
            for value, n in zip(self.candle, places, strict=True)
        ]

    def _float(self, value: float) -> str:
        return f"{value:.{self.price_places}f}"


def demo_events(
    markets: list[DemoMarket],
    uid: str,
    rng: random.Random,
    snapshot_every: float,
    duration: float | None,
) -> Iterator[Event]:
    """The demo feed: snapshots first, then a mix of increments, trades, tickers and klines."""

    def event(routing_key: str, body: Any) -> Event:
        return Event(routing_key, orjson.dumps(body))

    def tickers(now: int) -> Event:
        return event("public.global.tickers", {m.name: m.ticker(now) for m in markets})

    start = time.monotonic()
    deadline = None if duration is None else start + duration
    tids, order_ids = iter(range(rng.randrange(1000, 9000), 1 << 62)), iter(range(100, 1 << 62))
    for market in markets:
        yield event(f"public.{market.name}.ob-snap", market.snapshot())
    yield tickers(int(time.time()))
    # Snapshots spread over the period, not all at once.
    next_snapshot = {
        m.name: start + snapshot_every * (i + 1) / len(markets) for i, m in enumerate(markets)
    }
    next_second, seconds = start + 1.0, 0
    next_private, pending = start + 0.5, None  # the user's resting order: (market, body)
    while deadline is None or time.monotonic() < deadline:
        now, wall = time.monotonic(), int(time.time())
        if now >= next_second:
            next_second, seconds = now + 1.0, seconds + 1
            yield tickers(wall)
            if seconds % 2 == 0:
                for market in markets:
                    yield event(f"public.{market.name}.kline-1m", market.kline(wall))
            continue
        due = [m for m in markets if now >= next_snapshot[m.name]]
        if due:
            market = due[0]
            next_snapshot[market.name] = now + snapshot_every
            yield event(f"public.{market.name}.ob-snap", market.snapshot())
            continue
        if now >= next_private:
            next_private = now + 1.0
            if pending is None:
                market = rng.choice(markets)
                kind = rng.choice(("bid", "ask"))
                level = market.best("bids" if kind == "bid" else "asks")
                volume = market.amount(market.random_amount(0.3))
                order: dict[str, Any] = {
                    "id": next(order_ids), "at": wall, "market": market.name, "kind": kind,
                    "price": market.price(level), "state": "wait", "volume": volume,
                    "origin_volume": volume,
                }  # fmt: skip
                pending = (market, order)
                yield event(f"private.{uid}.order", order)
            else:  # a taker fills the user's order
                market, order = pending
                pending, tid = None, next(tids)
                other_id = next(order_ids)
                bid_id, ask_id = (
                    (order["id"], other_id) if order["kind"] == "bid" else (other_id, order["id"])
                )
                market.record(float(order["price"]), float(order["volume"]), wall)
                yield event(f"public.{market.name}.trades", {"trades": [{
                    "tid": tid, "taker_type": "sell" if order["kind"] == "bid" else "buy",
                    "date": wall, "price": order["price"], "amount": order["volume"],
                }]})  # fmt: skip
                yield event(f"private.{uid}.trade", {
                    "id": tid, "kind": order["kind"], "at": wall, "price": order["price"],
                    "volume": order["volume"], "ask_id": ask_id, "bid_id": bid_id,
                    "market": market.name,
                })  # fmt: skip
                yield event(
                    f"private.{uid}.order", {**order, "state": "done", "volume": "0", "at": wall}
                )
            continue
        market = rng.choice(markets)
        if rng.random() < 0.25:
            trade, increment = market.trade(next(tids), wall)
            yield event(f"public.{market.name}.trades", {"trades": [trade]})
            yield event(f"public.{market.name}.ob-inc", increment)
        else:
            yield event(f"public.{market.name}.ob-inc", market.book_change())
