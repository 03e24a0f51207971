"""The ``rango`` command: run the gateway, or one of its developer tools.

``rango [flags]`` runs the gateway. ``rango keygen``, ``rango token``,
``rango publish``, ``rango listen`` and ``rango demo`` are the developer tools
(see :mod:`rango.tools`, a module each). Go Rango's single-dash flags (``-ws-addr``,
``-amqp-addr``, ``-pubKey``, ``-exchange``) are accepted as aliases.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from . import __version__, settings
from .config import Config, ConfigError
from .contract import config_error

__all__ = ["config_from_args", "main", "parse_args"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rango",
        description="Websocket gateway for exchanges: events from a RabbitMQ topic "
        "exchange to the websocket clients subscribed to them.",
        epilog=settings.help_text(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"rango {__version__}")
    add_run_flags(parser)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    from . import tools

    tools.add_parsers(commands)
    return parser


def add_run_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of the run command (Go Rango's names, with single-dash aliases).

    Their spellings, help and checks are :data:`rango.settings.FLAGS`, so a flag
    and the variable it overrides accept the same values.
    """
    for flag in settings.FLAGS:
        parser.add_argument(
            *flag.spellings,
            dest=flag.dest,
            metavar=flag.metavar,
            type=settings.flag_type(flag),
            help=settings.flag_help(flag),
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def config_from_args(args: argparse.Namespace) -> Config:
    """The config of the environment with the run flags of ``args`` on top."""
    return Config.from_env(**{flag.dest: getattr(args, flag.dest) for flag in settings.FLAGS})


def main(argv: list[str] | None = None) -> int:
    """``rango``: run the supervisor and its workers, or a tool sub-command."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.command is not None:
        return int(args.func(args) or 0)
    try:
        config = config_from_args(args)
    except ConfigError as exc:
        return config_error(exc)
    from .limits import raise_nofile
    from .logs import setup_logging
    from .supervisor import run

    setup_logging(config.log_level_no, config.log_format, "supervisor")
    fds = raise_nofile()  # the workers inherit it, and each says what it allows
    if fds.soft != fds.before:
        logging.getLogger("rango.supervisor").info(
            "file-descriptor limit %d (raised from %d)", fds.soft, fds.before)
    workers = config.workers or len(os.sched_getaffinity(0))
    return run(config, argv, workers)


if __name__ == "__main__":
    sys.exit(main())
