"""``rango publish``: events from files or stdin to the exchange, one a line.

The line format, ``<routing key> <JSON body>``, is :func:`parse_event`'s; it is also
what ``rango demo --print`` writes, so a recorded feed can be published again.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, BinaryIO

import orjson

from ._broker import (
    Event,
    add_amqp_flags,
    amqp_channel,
    amqp_urls_of,
    exchange_of,
    publish_events,
)
from ._common import FAILED, OK, ToolError, add_command, plural, positive, warn

if TYPE_CHECKING:
    from ._common import Commands


def add_parser(commands: Commands) -> None:
    parser = add_command(
        commands,
        "publish",
        publish,
        help="publish events to the RabbitMQ exchange",
        description="Publish events, one a line: the routing key, a space, the JSON "
        "body. Blank lines and lines starting with # are skipped; a malformed line is "
        "reported with its number and skipped (exit status 1).",
    )
    parser.add_argument(
        "files", nargs="*", default=[], metavar="FILE",
        help="files of events; - or none for stdin",
    )  # fmt: skip
    add_amqp_flags(parser)
    parser.add_argument(
        "--raw", action="store_true", help="publish bodies without checking they are JSON"
    )
    parser.add_argument(
        "--rate", type=positive(float), metavar="N", help="events per second (default: no limit)"
    )
    parser.add_argument(
        "--repeat", type=positive(int), default=1, metavar="N",
        help="publish the events N times (default: 1)",
    )  # fmt: skip


def parse_event(line: bytes, raw: bool = False) -> Event | None:
    """Parse a line ``<routing key> <JSON body>`` of an events file.

    Return ``None`` for a blank line or a ``#`` comment. Raise :class:`ValueError`
    with the reason if the line has no routing key and body or, unless ``raw``,
    if the body is not JSON.
    """
    text = line.rstrip(b"\r\n").lstrip()
    if not text or text.startswith(b"#"):
        return None
    key, sep, body = text.partition(b" ")
    if not sep:
        raise ValueError("expected '<routing key> <JSON body>'")
    if len(key) > 255:
        raise ValueError("routing key longer than 255 bytes")
    try:
        routing_key = key.decode()
    except UnicodeDecodeError:
        raise ValueError("routing key is not UTF-8") from None
    if not raw:
        try:
            orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise ValueError(f"body is not JSON ({exc})") from None
    return Event(routing_key, body)


def publish(args: argparse.Namespace) -> int:
    """Publish the events of ``args.files`` (or stdin) to the exchange (see exchange_of)."""
    urls = amqp_urls_of(args)
    exchange = exchange_of(args)
    skipped = 0

    def skip(message: str) -> None:
        nonlocal skipped
        skipped += 1
        warn("publish", message)

    with contextlib.ExitStack() as stack:
        inputs = [_open_input(name, stack) for name in args.files or ["-"]]
        channel = stack.enter_context(amqp_channel(urls, exchange))
        events: Iterable[Event] = _read_events(inputs, args.raw, skip)
        if args.repeat > 1:
            events = list(events) * args.repeat
        count = publish_events(channel, exchange, events, args.rate)
    warn(
        "publish",
        f"published {plural(count, 'event')} to {exchange}, skipped {plural(skipped, 'line')}",
    )
    return FAILED if skipped else OK


def _open_input(name: str, stack: contextlib.ExitStack) -> tuple[str, BinaryIO]:
    if name == "-":
        return "<stdin>", sys.stdin.buffer
    try:
        return name, stack.enter_context(open(name, "rb"))
    except OSError as exc:
        raise ToolError(f"cannot read {name}: {exc.strerror}") from None


def _read_events(
    inputs: list[tuple[str, BinaryIO]], raw: bool, skip: Callable[[str], None]
) -> Iterator[Event]:
    """Yield the events of ``inputs``; report each malformed line to ``skip``."""
    for name, file in inputs:
        for number, line in enumerate(file, 1):
            try:
                event = parse_event(line, raw)
            except ValueError as exc:
                skip(f"{name}:{number}: {exc}")
                continue
            if event is not None:
                yield event
