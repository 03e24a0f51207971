"""``rango demo``: a live synthetic market feed published to the exchange.

The command: its flags, their checks, and the publishing loop with its counts.
The markets and the events they make are :mod:`rango.tools.market`'s.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from ._broker import Event, add_amqp_flags, amqp_channel, amqp_urls_of, exchange_of, publish_events
from ._common import DEFAULT_UID, OK, ToolError, add_command, plural, positive, warn
from .market import DEMO_MARKETS, DemoMarket, demo_events

if TYPE_CHECKING:
    from ._common import Commands


def add_parser(commands: Commands) -> None:
    parser = add_command(
        commands,
        "demo",
        demo,
        help="publish a live synthetic market feed",
        description="Publish a synthetic market feed, as a trading engine would: for each "
        "market an order book (an ob-snap at start and every --snapshot-every seconds, "
        "ob-inc increments with consecutive sequence numbers in between), trades and "
        "1-minute klines; public.global.tickers every second; and the private order and "
        "trade events of one user (--uid). Runs until --duration or ^C.",
    )
    add_amqp_flags(parser)
    parser.add_argument(
        "--rate", type=positive(float), default=20.0, metavar="N",
        help="events per second (default: 20)",
    )  # fmt: skip
    parser.add_argument(
        "--duration", type=positive(float), metavar="SECONDS",
        help="stop after SECONDS (default: run until interrupted)",
    )  # fmt: skip
    parser.add_argument(
        "--market", action="append", default=[], dest="markets", metavar="NAME",
        help=f"market to simulate (repeat, or a comma list; default: {','.join(DEMO_MARKETS)})",
    )  # fmt: skip
    parser.add_argument(
        "--uid", default=DEFAULT_UID, help=f"owner of the private events (default: {DEFAULT_UID})"
    )
    parser.add_argument(
        "--snapshot-every", type=positive(float), default=5.0, metavar="SECONDS",
        help="publish each order book's ob-snap this often (default: 5)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, help="random seed, for a repeatable feed")
    parser.add_argument(
        "--print", action="store_true", dest="echo",
        help="also print each event to stdout, in the format rango publish reads",
    )  # fmt: skip


class _StdoutClosed(Exception):
    """The reader of ``--print`` went away (not an OSError: the broker's are those)."""


def demo(args: argparse.Namespace) -> int:
    """Publish the synthetic feed of ``args`` until ``args.duration`` or ^C."""
    names = [name for value in args.markets for name in value.split(",") if name] or list(
        DEMO_MARKETS
    )
    for name in names:
        if not name.replace("_", "").replace("-", "").isalnum() or not name.isascii():
            raise ToolError(f"--market {name!r}: use letters, digits, _ or - (no dots)")
    if "." in args.uid or not args.uid:
        raise ToolError(f"--uid {args.uid!r}: a uid cannot be empty or contain dots")
    rng = random.Random(args.seed)
    markets = [DemoMarket(name, rng) for name in dict.fromkeys(names)]
    urls = amqp_urls_of(args)
    exchange = exchange_of(args)
    published = 0

    def counted(events: Iterable[Event]) -> Iterator[Event]:
        nonlocal published
        for event in events:
            if args.echo:
                try:
                    sys.stdout.write(f"{event.routing_key} {event.body.decode()}\n")
                    sys.stdout.flush()
                except BrokenPipeError:
                    raise _StdoutClosed from None
            yield event
            published += 1  # resumed once the event is published

    events = demo_events(markets, args.uid, rng, args.snapshot_every, args.duration)
    with amqp_channel(urls, exchange) as channel:
        warn(
            "demo",
            f"publishing {', '.join(m.name for m in markets)} at {args.rate:g} "
            f"events/s to {exchange} (private events of {args.uid}); ^C stops",
        )
        try:
            publish_events(channel, exchange, counted(events), args.rate)
        except KeyboardInterrupt:
            warn("demo", f"interrupted: published {plural(published, 'event')}")
            return OK
        except _StdoutClosed:
            # `rango demo --print | head`: the reader has what it wanted, as with ^C.
            # Python's docs: point stdout at devnull so the exit flush cannot fail.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            warn("demo", f"stdout closed: published {plural(published, 'event')}")
            return OK
    warn("demo", f"published {plural(published, 'event')} to {exchange}")
    return OK
