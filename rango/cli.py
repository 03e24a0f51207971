"""The ``rango`` command: run the gateway, or one of its developer tools.

``rango [flags]`` runs the gateway. ``rango keygen``, ``rango token``,
``rango publish``, ``rango listen`` and ``rango demo`` are the developer tools
(see :mod:`rango.tools`, a module each). Go Rango's single-dash flags (``-ws-addr``,
``-amqp-addr``, ``-pubKey``, ``-exchange``) are accepted as aliases.
"""

from __future__ import annotations

import argparse
import os
import sys

from . import __version__
from .config import Config, ConfigError

__all__ = ["config_from_args", "main", "parse_args"]

ENVIRONMENT = """\
environment (same names and defaults as Ranger and Go Rango):
  RANGER_HOST, RANGER_PORT        websocket listener (0.0.0.0, 8080)
  RABBITMQ_HOST, RABBITMQ_PORT    broker (localhost, 5672)
  RABBITMQ_USER, RABBITMQ_PASSWORD  broker credentials (guest, guest)
  JWT_PUBLIC_KEY                  base64 of the PEM public key (else --pubKey file)
  JWT_ALGORITHM                   RS256 (the only algorithm accepted)
  JWT_ISSUER, JWT_AUDIENCE        checked when set (audience: comma list)
  JWT_DEFAULT_LEEWAY, JWT_ISSUED_AT_LEEWAY, JWT_EXPIRATION_LEEWAY,
  JWT_NOT_BEFORE_LEEWAY           clock leeways in seconds (0)
  API_CORS_ORIGINS                allowed Origin hosts/URLs, comma list (same host)
  RANGO_RBAC_<PREFIX>             roles allowed on <prefix>.*.* streams, comma list
  LOG_LEVEL                       debug, info, warn, error (info)
  LOG_FORMAT                      text or json (text)
Rango's own:
  RANGO_METRICS_HOST, RANGO_METRICS_PORT  Prometheus endpoint (0.0.0.0, 4242)
  RANGO_EXCHANGE                  exchange when --exchange is not given (peatio.events.ranger)
  RANGO_WORKERS                   worker processes (CPUs usable by the process)
  RANGO_MAX_FRAME_SIZE            largest client frame in bytes (4096)
  RANGO_MAX_PENDING_BYTES         unread bytes before a slow client is dropped (4194304)
  RANGO_MAX_INCREMENTS            stored order-book increments per book (10000)
  RANGO_PING_INTERVAL             seconds of silence before a ping (54)
  RANGO_PING_TIMEOUT              seconds to answer a ping (6)
  RANGO_HANDSHAKE_TIMEOUT         seconds to finish the upgrade request (10)
  RANGO_MAX_CONNECTIONS           connections per worker before HTTP 503 (50000)
  RANGO_MAX_SUBSCRIPTIONS         streams per connection (1024)
  RANGO_RATE_LIMIT, RANGO_RATE_BURST  client frames per second and burst (20, 100)
  RANGO_MAX_EVENT_SIZE            largest event body in bytes (8388608)
  RANGO_TLS_CERTFILE, RANGO_TLS_KEYFILE  serve wss:// (or --certfile, --keyfile)
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rango",
        description="Websocket gateway for exchanges: events from a RabbitMQ topic "
        "exchange to the websocket clients subscribed to them.",
        epilog=ENVIRONMENT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"rango {__version__}")
    add_run_flags(parser)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    from . import tools

    tools.add_parsers(commands)
    return parser


def add_run_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of the run command (Go Rango's names, with single-dash aliases)."""
    parser.add_argument(
        "--ws-addr", "-ws-addr", dest="ws_addr", metavar="HOST:PORT",
        help="websocket listener (overrides RANGER_HOST and RANGER_PORT)",
    )
    parser.add_argument(
        "--amqp-addr", "-amqp-addr", dest="amqp_addr", metavar="URL",
        help="RabbitMQ URL, e.g. amqp://guest:guest@localhost:5672/ (overrides RABBITMQ_*)",
    )
    parser.add_argument(
        "--pubKey", "-pubKey", "--pub-key", dest="pub_key", metavar="FILE",
        help="PEM public key file, used when JWT_PUBLIC_KEY is unset "
        "(default: config/rsa-key.pub)",
    )
    parser.add_argument(
        "--exchange", "-exchange", dest="exchange", metavar="NAME",
        help="topic exchange of the events (default: RANGO_EXCHANGE, else peatio.events.ranger)",
    )
    parser.add_argument(
        "--certfile", dest="certfile", metavar="FILE",
        help="serve wss:// with this PEM certificate chain (RANGO_TLS_CERTFILE)",
    )
    parser.add_argument(
        "--keyfile", dest="keyfile", metavar="FILE",
        help="private key of --certfile, if not in it (RANGO_TLS_KEYFILE)",
    )
    parser.add_argument(
        "--workers", "-workers", dest="workers", type=_workers, metavar="N",
        help="worker processes (default: RANGO_WORKERS, else the CPUs usable)",
    )


def _workers(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if not 1 <= number <= 256:
        raise argparse.ArgumentTypeError("must be from 1 to 256")
    return number


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def config_from_args(args: argparse.Namespace) -> Config:
    return Config.from_env(
        ws_addr=args.ws_addr,
        amqp_addr=args.amqp_addr,
        pub_key=args.pub_key,
        exchange=args.exchange,
        workers=args.workers,
        certfile=args.certfile,
        keyfile=args.keyfile,
    )


def main(argv: list[str] | None = None) -> int:
    """``rango``: run the supervisor and its workers, or a tool sub-command."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.command is not None:
        return int(args.func(args) or 0)
    try:
        config = config_from_args(args)
    except ConfigError as exc:
        print(f"rango: {exc}", file=sys.stderr)
        return 2
    from .logs import setup_logging
    from .supervisor import run

    setup_logging(config.log_level_no, config.log_format, "supervisor")
    workers = config.workers or len(os.sched_getaffinity(0))
    return run(config, argv, workers)


if __name__ == "__main__":
    sys.exit(main())
