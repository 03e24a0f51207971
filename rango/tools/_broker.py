"""The RabbitMQ side of ``rango publish`` and ``rango demo``, which both publish events.

Their broker flags and how the URL and exchange are resolved from them, a channel
with publisher confirms, paced publishing, and pika errors turned into one line.
pika is imported when a channel is opened, not with this module.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, NamedTuple
from urllib.parse import urlsplit

from ..config import DEFAULT_EXCHANGE, ConfigError, amqp_urls_from_env, exchange_from_env
from ..settings import without_password
from ._common import FAILED, ToolError

if TYPE_CHECKING:
    # pika has no type hints (pyproject's mypy section): BlockingChannel is Any.
    from pika.adapters.blocking_connection import BlockingChannel


class Event(NamedTuple):
    """One event to publish."""

    routing_key: str
    body: bytes


def add_amqp_flags(parser: argparse.ArgumentParser) -> None:
    """``--amqp-addr`` and ``--exchange``, the broker flags of ``publish`` and ``demo``.

    The server's parser has the same flags, so ``rango --exchange X publish`` works
    too: SUPPRESS keeps the tool's parser from overwriting them with its defaults.
    """
    parser.add_argument(
        "--amqp-addr", "-amqp-addr", dest="amqp_addr", metavar="URL",
        default=argparse.SUPPRESS,
        help="RabbitMQ URL, or a comma list of a cluster's (default: built from "
        "RABBITMQ_HOST, _PORT, _USER, _PASSWORD); the first that answers is used",
    )  # fmt: skip
    parser.add_argument(
        "--exchange", "-exchange", dest="exchange", metavar="NAME", default=argparse.SUPPRESS,
        help=f"topic exchange (default: RANGO_EXCHANGE, else {DEFAULT_EXCHANGE})",
    )  # fmt: skip


def exchange_of(args: argparse.Namespace) -> str:
    """``--exchange``, else ``RANGO_EXCHANGE``, else the default: the server's own rule."""
    try:
        return exchange_from_env(flag=getattr(args, "exchange", None))
    except ConfigError as exc:
        raise ToolError(str(exc)) from None


def amqp_urls_of(args: argparse.Namespace) -> tuple[str, ...]:
    """The broker URLs from ``--amqp-addr``, else from the ``RABBITMQ_*`` variables."""
    try:
        return amqp_urls_from_env(addr=getattr(args, "amqp_addr", None))
    except ConfigError as exc:
        raise ToolError(str(exc)) from None


@contextlib.contextmanager
def amqp_channel(urls: str | Sequence[str], exchange: str) -> Iterator[BlockingChannel]:
    """Yield a channel with publisher confirms to ``exchange``, declared as publishers do,
    on the first of ``urls`` (a cluster's nodes) that answers.

    pika errors, on connecting or later, become a :class:`ToolError`.
    """
    import pika
    import pika.exceptions

    failures = []
    for url in [urls] if isinstance(urls, str) else urls:
        try:
            parameters = pika.URLParameters(url)
        except ValueError as exc:
            raise ToolError(f"--amqp-addr: {exc}") from None
        if "heartbeat" not in urlsplit(url).query:
            parameters.heartbeat = 0  # stdin may stay idle for long: keep the connection
        where = without_password(url)
        try:
            connection = pika.BlockingConnection(parameters)
            break
        except (pika.exceptions.AMQPError, OSError) as exc:
            failures.append(f"{where}: {amqp_reason(exc)}")
    else:
        raise ToolError(f"cannot connect to {'; '.join(failures)}", FAILED)
    try:
        channel = connection.channel()
        channel.exchange_declare(exchange, exchange_type="topic", durable=False)
        channel.confirm_delivery()
        yield channel
    except (pika.exceptions.AMQPError, OSError) as exc:
        raise ToolError(f"{where}: {amqp_reason(exc)}", FAILED) from None
    finally:
        with contextlib.suppress(pika.exceptions.AMQPError, OSError):
            if connection.is_open:
                connection.close()


def publish_events(
    channel: BlockingChannel, exchange: str, events: Iterable[Event], rate: float | None
) -> int:
    """Publish ``events`` in order, at most ``rate`` a second; return how many."""
    interval = 1 / rate if rate else 0.0
    next_at, count = time.monotonic(), 0
    for event in events:
        if interval:
            delay = next_at - time.monotonic()
            if delay > 0:
                channel.connection.sleep(delay)  # serves the connection meanwhile
            # After a pause in the input, no burst to catch up.
            next_at = max(next_at, time.monotonic()) + interval
        channel.basic_publish(exchange, event.routing_key, event.body)
        count += 1
    return count


def amqp_reason(exc: BaseException) -> str:
    """The innermost reason of a pika error, e.g. ``Connection refused``."""
    import pika.exceptions

    while True:  # pika nests the cause in args[0] or, for connector errors, .exception
        inner = exc.args[0] if exc.args else getattr(exc, "exception", None)
        if not isinstance(inner, BaseException):
            break
        exc = inner
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    if isinstance(exc, pika.exceptions.ChannelClosedByBroker | pika.exceptions.ConnectionClosed):
        return f"{exc.reply_text} ({exc.reply_code})"
    return str(exc).strip() or type(exc).__name__
