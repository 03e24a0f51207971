"""Developer tools: ``rango keygen``, ``rango token``, ``rango publish``, ``rango listen``.

They stand in for Go Rango's ``tools/`` programs and cover a local setup end to end::

    rango keygen                                  # config/rsa-key, config/rsa-key.pub
    rango                                         # the gateway, with config/rsa-key.pub
    rango listen --key config/rsa-key --stream eurusd.trades --stream order
    rango publish events.txt                      # from another terminal

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
import secrets
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, NamedTuple
from urllib.parse import urlencode, urlsplit, urlunsplit

import orjson

from .config import JWT_ALGORITHMS, ConfigError, amqp_url_from_env

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
DEFAULT_EXCHANGE = "peatio.events.ranger"
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
    parser.add_argument(
        "--amqp-addr", "-amqp-addr", dest="amqp_addr", metavar="URL",
        help="RabbitMQ URL (default: built from RABBITMQ_HOST, _PORT, _USER, _PASSWORD)",
    )  # fmt: skip
    parser.add_argument(
        "--exchange", "-exchange", default=DEFAULT_EXCHANGE, metavar="NAME",
        help=f"topic exchange (default: {DEFAULT_EXCHANGE})",
    )  # fmt: skip
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
    """Publish the events of ``args.files`` (or stdin) to ``args.exchange``."""
    try:
        url = amqp_url_from_env(addr=args.amqp_addr)
    except ConfigError as exc:
        raise ToolError(str(exc)) from None
    skipped = 0

    def skip(message: str) -> None:
        nonlocal skipped
        skipped += 1
        _warn("publish", message)

    with contextlib.ExitStack() as stack:
        inputs = [_open_input(name, stack) for name in args.files or ["-"]]
        channel = stack.enter_context(_amqp_channel(url, args.exchange))
        events: Iterable[Event] = _read_events(inputs, args.raw, skip)
        if args.repeat > 1:
            events = list(events) * args.repeat
        count = _publish_events(channel, args.exchange, events, args.rate)
    _warn("publish", f"published {_plural(count, 'event')} to {args.exchange}, "
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
