"""Developer tools: ``rango keygen``, ``token``, ``publish``, ``listen`` and ``demo``.

They stand in for Go Rango's ``tools/`` programs and cover a local setup end to end::

    rango keygen                                  # config/rsa-key, config/rsa-key.pub
    rango                                         # the gateway, with config/rsa-key.pub
    rango listen --key config/rsa-key --stream eurusd.trades --stream order
    rango publish events.txt                      # from another terminal
    rango demo                                    # a live synthetic market feed

Errors are printed as one line on stderr. Exit status: 0 on success; 1 when
something failed at run time (a line skipped, the broker or the server refused
or unreachable, frames missing); 2 when local inputs are wrong (arguments, key
file, input file, URL, a file that keygen would overwrite).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import os
import random
import secrets
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, NamedTuple
from urllib.parse import urlencode, urlsplit, urlunsplit

import orjson

from .config import (
    DEFAULT_EXCHANGE,
    JWT_ALGORITHMS,
    ConfigError,
    amqp_url_from_env,
    exchange_from_env,
)

# Each tool imports the heavy libraries it needs (cryptography, PyJWT, pika,
# websockets) when it runs: `rango keygen` or `rango --help` need not load them all.
if TYPE_CHECKING:
    from pika.adapters.blocking_connection import BlockingChannel
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import ClientConnection

__all__ = ["Event", "ToolError", "add_parsers", "mint_token", "parse_event"]

DEFAULT_KEY = "config/rsa-key"
DEFAULT_UID = "IDABC0000001"
DEFAULT_ROLE = "member"
DEFAULT_LISTEN_URL = "ws://127.0.0.1:8080/public"

# Exit statuses.
OK, FAILED, BAD_INPUT = 0, 1, 2


class ToolError(Exception):
    """A tool cannot go on; ``str(exc)`` is printed, ``status`` is the exit status."""

    def __init__(self, message: str, status: int = BAD_INPUT) -> None:
        super().__init__(message)
        self.status = status


def add_parsers(commands: argparse._SubParsersAction) -> None:
    """Register the tool sub-commands on the ``rango`` parser."""
    _add_keygen(commands)
    _add_token(commands)
    _add_publish(commands)
    _add_listen(commands)
    _add_demo(commands)


def _command(name: str, tool: Callable[[argparse.Namespace], int]) -> Callable[..., int]:
    """Wrap ``tool``: print a :class:`ToolError` as one line, end quietly on ^C."""

    def run(args: argparse.Namespace) -> int:
        try:
            return tool(args)
        except ToolError as exc:
            _warn(name, str(exc))
            return exc.status
        except KeyboardInterrupt:
            return 130
        except BrokenPipeError:  # e.g. `rango listen | head -1`
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            return OK

    return run


def _warn(name: str, message: str) -> None:
    print(f"rango {name}: {message}", file=sys.stderr, flush=True)


# keygen


def _add_keygen(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "keygen",
        help="create an RSA 2048 key pair for development",
        description="Create an RSA 2048 key pair: the private key (PEM, mode 0600) at "
        "PATH and the public key at PATH.pub, the gateway's default --pubKey. Prints "
        "the JWT_PUBLIC_KEY=... line that configures the gateway without the file.",
    )
    parser.add_argument(
        "--out", default=DEFAULT_KEY, metavar="PATH",
        help=f"private key file; the public key goes to PATH.pub (default: {DEFAULT_KEY})",
    )  # fmt: skip
    parser.add_argument("--force", action="store_true", help="overwrite existing files")
    parser.set_defaults(func=_command("keygen", keygen))


def keygen(args: argparse.Namespace) -> int:
    """Write a new key pair to ``args.out`` and ``args.out + ".pub"``."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    private_path, public_path = Path(args.out), Path(f"{args.out}.pub")
    if not args.force:
        for path in (private_path, public_path):
            if path.exists():
                raise ToolError(f"{path} already exists (use --force to overwrite it)")
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    # PKCS#1 and SubjectPublicKeyInfo, as Go Rango writes them.
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    try:
        private_path.parent.mkdir(parents=True, exist_ok=True)
        _write_file(private_path, private_pem, 0o600)
        _write_file(public_path, public_pem, 0o644)
    except OSError as exc:
        raise ToolError(f"cannot write {exc.filename or args.out}: {exc.strerror}") from None
    print(f"private key: {private_path}")
    print(f"public key:  {public_path}")
    print(f"JWT_PUBLIC_KEY={base64.b64encode(public_pem).decode()}")
    return OK


def _write_file(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` with permissions ``mode``, set before any byte is written."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as file:
        os.fchmod(fd, mode)  # the file may have existed with other permissions
        file.write(data)


# token


def _add_token(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "token",
        help="print a JWT as barong issues it",
        description="Print a JWT with the claims barong issues (iat, exp, sub, iss, aud, "
        "jti, uid, email, role, level, state), signed with a PEM private key.",
    )
    parser.add_argument(
        "--key", default=DEFAULT_KEY, metavar="PATH",
        help=f"PEM private key (default: {DEFAULT_KEY})",
    )  # fmt: skip
    parser.add_argument("--uid", default=DEFAULT_UID, help=f"uid claim (default: {DEFAULT_UID})")
    parser.add_argument(
        "--role", default=DEFAULT_ROLE, help=f"role claim (default: {DEFAULT_ROLE})"
    )
    parser.add_argument(
        "--ttl", type=int, default=3600, metavar="SECONDS",
        help="lifetime; negative for an expired token (default: 3600)",
    )  # fmt: skip
    parser.add_argument(
        "--claim", action="append", type=_claim, default=[], dest="claims",
        metavar="NAME=VALUE",
        help="add or replace a claim; VALUE is read as JSON when it is valid JSON "
        "(level=3, aud='[\"peatio\"]'), else as a string; NAME=null removes the claim",
    )  # fmt: skip
    parser.add_argument(
        "--algorithm", default="RS256", choices=JWT_ALGORITHMS, metavar="ALG",
        help="signing algorithm; it must suit the key (default: RS256)",
    )  # fmt: skip
    parser.set_defaults(func=_command("token", token))


def _claim(value: str) -> tuple[str, Any]:
    name, sep, raw = value.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"{value!r} is not NAME=VALUE")
    try:
        return name, orjson.loads(raw)
    except orjson.JSONDecodeError:
        return name, raw


def token(args: argparse.Namespace) -> int:
    """Print a token minted from ``args``."""
    print(
        mint_token(
            args.key,
            uid=args.uid,
            role=args.role,
            ttl=args.ttl,
            claims=args.claims,
            algorithm=args.algorithm,
        )
    )
    return OK


def mint_token(
    key_path: str,
    *,
    uid: str = DEFAULT_UID,
    role: str = DEFAULT_ROLE,
    ttl: int = 3600,
    claims: Iterable[tuple[str, Any]] = (),
    algorithm: str = "RS256",
) -> str:
    """Return a JWT as barong issues it (PROTOCOL §8), signed with the key at ``key_path``.

    ``claims`` are ``(name, value)`` pairs applied last; a ``None`` value removes
    the claim. Raises :class:`ToolError` if the key cannot be read or cannot sign
    with ``algorithm``.
    """
    import jwt

    key = _load_private_key(key_path)
    now = int(time.time())
    payload: dict[str, Any] = {
        "iat": now, "exp": now + ttl, "sub": "session", "iss": "barong",
        "aud": ["peatio", "barong"], "jti": secrets.token_hex(12).upper(),
        "uid": uid, "email": "user@example.com", "role": role, "level": 4,
        "state": "active",
    }  # fmt: skip
    for name, value in claims:
        if value is None:
            payload.pop(name, None)
        else:
            payload[name] = value
    try:
        return jwt.encode(payload, key, algorithm=algorithm)  # type: ignore[arg-type]
    except (jwt.PyJWTError, TypeError, ValueError):
        kind = type(key).__name__.removeprefix("_").removesuffix("PrivateKey")
        raise ToolError(f"cannot sign {algorithm} with the {kind} key {key_path}") from None


def _load_private_key(path: str) -> Any:
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    try:
        pem = Path(path).read_bytes()
    except FileNotFoundError:
        raise ToolError(f"no private key at {path} (run `rango keygen` to create one)") from None
    except OSError as exc:
        raise ToolError(f"cannot read {path}: {exc.strerror}") from None
    try:
        return serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ToolError(f"{path} is not an unencrypted PEM private key") from None


# publish


def _add_publish(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "publish",
        help="publish events to the RabbitMQ exchange",
        description="Publish events, one a line: the routing key, a space, the JSON "
        "body. Blank lines and lines starting with # are skipped; a malformed line is "
        "reported with its number and skipped (exit status 1).",
    )
    parser.add_argument(
        "files", nargs="*", default=[], metavar="FILE",
        help="files of events; - or none for stdin",
    )  # fmt: skip
    _add_amqp_flags(parser)
    parser.add_argument(
        "--raw", action="store_true", help="publish bodies without checking they are JSON"
    )
    parser.add_argument(
        "--rate", type=_positive(float), metavar="N", help="events per second (default: no limit)"
    )
    parser.add_argument(
        "--repeat", type=_positive(int), default=1, metavar="N",
        help="publish the events N times (default: 1)",
    )  # fmt: skip
    parser.set_defaults(func=_command("publish", publish))


class Event(NamedTuple):
    """One event to publish."""

    routing_key: str
    body: bytes


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
    """Publish the events of ``args.files`` (or stdin) to the exchange (see _exchange)."""
    url = _amqp_url(args)
    exchange = _exchange(args)
    skipped = 0

    def skip(message: str) -> None:
        nonlocal skipped
        skipped += 1
        _warn("publish", message)

    with contextlib.ExitStack() as stack:
        inputs = [_open_input(name, stack) for name in args.files or ["-"]]
        channel = stack.enter_context(_amqp_channel(url, exchange))
        events: Iterable[Event] = _read_events(inputs, args.raw, skip)
        if args.repeat > 1:
            events = list(events) * args.repeat
        count = _publish_events(channel, exchange, events, args.rate)
    _warn("publish", f"published {_plural(count, 'event')} to {exchange}, "
          f"skipped {_plural(skipped, 'line')}")
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


def _add_amqp_flags(parser: argparse.ArgumentParser) -> None:
    """``--amqp-addr`` and ``--exchange``, the broker flags of ``publish`` and ``demo``.

    The server's parser has the same flags, so ``rango --exchange X publish`` works
    too: SUPPRESS keeps the tool's parser from overwriting them with its defaults.
    """
    parser.add_argument(
        "--amqp-addr", "-amqp-addr", dest="amqp_addr", metavar="URL",
        default=argparse.SUPPRESS,
        help="RabbitMQ URL (default: built from RABBITMQ_HOST, _PORT, _USER, _PASSWORD)",
    )  # fmt: skip
    parser.add_argument(
        "--exchange", "-exchange", dest="exchange", metavar="NAME", default=argparse.SUPPRESS,
        help=f"topic exchange (default: RANGO_EXCHANGE, else {DEFAULT_EXCHANGE})",
    )  # fmt: skip


def _exchange(args: argparse.Namespace) -> str:
    """``--exchange``, else ``RANGO_EXCHANGE``, else the default: the server's own rule."""
    try:
        return exchange_from_env(flag=getattr(args, "exchange", None))
    except ConfigError as exc:
        raise ToolError(str(exc)) from None


def _amqp_url(args: argparse.Namespace) -> str:
    """The broker URL from ``--amqp-addr``, else from the ``RABBITMQ_*`` variables."""
    try:
        return amqp_url_from_env(addr=getattr(args, "amqp_addr", None))
    except ConfigError as exc:
        raise ToolError(str(exc)) from None


@contextlib.contextmanager
def _amqp_channel(url: str, exchange: str) -> Iterator[BlockingChannel]:
    """Yield a channel with publisher confirms to ``exchange``, declared as publishers do.

    pika errors, on connecting or later, become a :class:`ToolError`.
    """
    import pika
    import pika.exceptions

    try:
        parameters = pika.URLParameters(url)
    except ValueError as exc:
        raise ToolError(f"--amqp-addr: {exc}") from None
    if "heartbeat" not in urlsplit(url).query:
        parameters.heartbeat = 0  # stdin may stay idle for long: keep the connection
    where = _redact(url)
    try:
        connection = pika.BlockingConnection(parameters)
    except (pika.exceptions.AMQPError, OSError) as exc:
        raise ToolError(f"cannot connect to {where}: {_amqp_reason(exc)}", FAILED) from None
    try:
        channel = connection.channel()
        channel.exchange_declare(exchange, exchange_type="topic", durable=False)
        channel.confirm_delivery()
        yield channel
    except (pika.exceptions.AMQPError, OSError) as exc:
        raise ToolError(f"{where}: {_amqp_reason(exc)}", FAILED) from None
    finally:
        with contextlib.suppress(pika.exceptions.AMQPError, OSError):
            if connection.is_open:
                connection.close()


def _publish_events(
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


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _redact(url: str) -> str:
    """``url`` without its password."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{netloc}"))


def _amqp_reason(exc: BaseException) -> str:
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


# listen


def _add_listen(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "listen",
        help="print the frames a websocket client receives",
        description="Connect to the gateway, subscribe to streams through the query "
        "string and print every frame received, one a line. Exit status 0 once --count "
        "frames arrived or, without --count, when --timeout expires or the server "
        "closes the connection cleanly; 1 otherwise.",
    )
    parser.add_argument(
        "url", nargs="?", default=DEFAULT_LISTEN_URL, metavar="URL",
        help=f"websocket URL (default: {DEFAULT_LISTEN_URL})",
    )  # fmt: skip
    parser.add_argument(
        "--stream", action="append", default=[], dest="streams", metavar="S",
        help="subscribe to S (repeat, or a comma list)",
    )  # fmt: skip
    auth = parser.add_mutually_exclusive_group()
    auth.add_argument("--token", help="send Authorization: Bearer TOKEN")
    auth.add_argument(
        "--key", metavar="PATH",
        help="mint a token with this private key; --uid or --role alone use "
        f"{DEFAULT_KEY} (default: no token, anonymous)",
    )  # fmt: skip
    parser.add_argument("--uid", help=f"uid of the minted token (default: {DEFAULT_UID})")
    parser.add_argument("--role", help=f"role of the minted token (default: {DEFAULT_ROLE})")
    parser.add_argument(
        "--count", type=_positive(int), metavar="N",
        help="exit after N frames, the subscription answer included",
    )  # fmt: skip
    parser.add_argument(
        "--timeout", type=_positive(float), metavar="SECONDS",
        help="exit SECONDS after connecting (connecting itself may take 10 s)",
    )  # fmt: skip
    parser.set_defaults(func=_command("listen", listen))


def listen(args: argparse.Namespace) -> int:
    """Print the frames received on ``args.url`` until done."""
    token = args.token
    if token is None and (args.key or args.uid or args.role):
        token = mint_token(
            args.key or DEFAULT_KEY, uid=args.uid or DEFAULT_UID, role=args.role or DEFAULT_ROLE
        )
    with _connect(_with_streams(args.url, args.streams), token) as ws:
        deadline = None if args.timeout is None else time.monotonic() + args.timeout
        return _print_frames(ws, args.count, deadline)


def _with_streams(url: str, streams: list[str]) -> str:
    """``url`` with ``stream=S`` appended to its query string for each of ``streams``."""
    if not streams:
        return url
    parts = urlsplit(url)
    extra = urlencode([("stream", stream) for stream in streams], safe=",")
    query = f"{parts.query}&{extra}" if parts.query else extra
    return urlunsplit(parts._replace(query=query))


def _connect(url: str, token: str | None) -> ClientConnection:
    from websockets.exceptions import InvalidHandshake, InvalidStatus, InvalidURI
    from websockets.sync.client import connect

    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        return connect(
            url,
            additional_headers=headers,
            open_timeout=10.0,
            max_size=None,
        )
    except InvalidURI as exc:
        raise ToolError(str(exc)) from None
    except InvalidStatus as exc:
        response = exc.response
        detail = response.body.decode(errors="replace").strip().split("\n")[0][:200]
        raise ToolError(
            f"{url} refused the upgrade: HTTP {response.status_code} "
            f"{response.reason_phrase}"
            + (f" ({detail})" if detail and detail != response.reason_phrase else ""),
            FAILED,
        ) from None
    except (OSError, TimeoutError, InvalidHandshake) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ToolError(f"cannot connect to {url}: {reason or 'timed out'}", FAILED) from None


def _print_frames(ws: ClientConnection, count: int | None, deadline: float | None) -> int:
    """Print frames until ``count`` of them, ``deadline`` or the end of the connection."""
    from websockets.exceptions import ConnectionClosedError, ConnectionClosedOK

    received = 0
    while count is None or received < count:
        try:
            frame = ws.recv(timeout=None if deadline is None else _remaining(deadline))
        except TimeoutError:
            if count is None:
                return OK
            raise ToolError(f"timed out with {received} of {count} frames", FAILED) from None
        except ConnectionClosedOK as exc:
            if count is None:
                _warn("listen", _closed(exc))
                return OK
            raise ToolError(f"{_closed(exc)} after {received} of {count} frames", FAILED) from None
        except ConnectionClosedError as exc:
            raise ToolError(_closed(exc), FAILED) from None
        print(frame if isinstance(frame, str) else frame.decode(errors="replace"), flush=True)
        received += 1
    return OK


def _closed(exc: ConnectionClosed) -> str:
    close = exc.rcvd
    if close is None:
        return "connection lost"
    return f"connection closed by the server ({close})"


def _remaining(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())


def _positive(kind: type[int] | type[float]) -> Callable[[str], int | float]:
    """An argparse type: a finite number of ``kind`` above zero."""

    def parse(value: str) -> int | float:
        try:
            number = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
        if not 0 < number < float("inf"):
            raise argparse.ArgumentTypeError(f"{value!r} is not a finite number above zero")
        return number

    return parse


# demo

# name: (opening price, price tick, typical order size, amount step)
DEMO_MARKETS: dict[str, tuple[float, float, float, float]] = {
    "btcusd": (65000.0, 0.5, 0.4, 0.0001),
    "ethusd": (3400.0, 0.05, 6.0, 0.001),
    "xrpusd": (0.52, 0.0001, 2500.0, 1.0),
}
DEMO_OTHER_MARKET = (100.0, 0.01, 10.0, 0.01)
DEMO_DEPTH = 12  # price levels a side, about


def _add_demo(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "demo",
        help="publish a live synthetic market feed",
        description="Publish a synthetic market feed, as a trading engine would: for each "
        "market an order book (an ob-snap at start and every --snapshot-every seconds, "
        "ob-inc increments with consecutive sequence numbers in between), trades and "
        "1-minute klines; public.global.tickers every second; and the private order and "
        "trade events of one user (--uid). Runs until --duration or ^C.",
    )
    _add_amqp_flags(parser)
    parser.add_argument(
        "--rate", type=_positive(float), default=20.0, metavar="N",
        help="events per second (default: 20)",
    )  # fmt: skip
    parser.add_argument(
        "--duration", type=_positive(float), metavar="SECONDS",
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
        "--snapshot-every", type=_positive(float), default=5.0, metavar="SECONDS",
        help="publish each order book's ob-snap this often (default: 5)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, help="random seed, for a repeatable feed")
    parser.add_argument(
        "--print", action="store_true", dest="echo",
        help="also print each event to stdout, in the format rango publish reads",
    )  # fmt: skip
    parser.set_defaults(func=_command("demo", demo))


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
    markets = [_DemoMarket(name, rng) for name in dict.fromkeys(names)]
    url = _amqp_url(args)
    exchange = _exchange(args)
    published = 0

    def counted(events: Iterable[Event]) -> Iterator[Event]:
        nonlocal published
        for event in events:
            if args.echo:
                sys.stdout.write(f"{event.routing_key} {event.body.decode()}\n")
                sys.stdout.flush()
            yield event
            published += 1  # resumed once the event is published

    events = _demo_events(markets, args.uid, rng, args.snapshot_every, args.duration)
    with _amqp_channel(url, exchange) as channel:
        _warn(
            "demo",
            f"publishing {', '.join(m.name for m in markets)} at {args.rate:g} "
            f"events/s to {exchange} (private events of {args.uid}); ^C stops",
        )
        try:
            _publish_events(channel, exchange, counted(events), args.rate)
        except KeyboardInterrupt:
            _warn("demo", f"interrupted: published {_plural(published, 'event')}")
            return OK
    _warn("demo", f"published {_plural(published, 'event')} to {exchange}")
    return OK


def _decimals(step: float) -> int:
    """Decimal places to print multiples of ``step`` with (at least one)."""
    text = f"{step:.10f}".rstrip("0")
    return max(1, len(text.partition(".")[2]))


class _DemoMarket:
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


def _demo_events(
    markets: list[_DemoMarket],
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
                order = {
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
