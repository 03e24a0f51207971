"""The ``rango`` command: run the gateway, or one of its developer tools.

``rango [flags]`` runs the gateway. ``rango keygen``, ``rango token``,
``rango publish``, ``rango listen`` and ``rango demo`` are the developer tools
(see :mod:`rango.tools`, a module each). Go Rango's single-dash flags (``-ws-addr``,
``-amqp-addr``, ``-pubKey``, ``-exchange``) are accepted as aliases.

The supervisor of ``rango --workers N`` stays small (it is one more process that
lives as long as the server): it imports neither the tools nor, when a worker
template checks the configuration (``RANGO_PRELOAD=1``), the libraries those
checks need (pika, cryptography). It reads the settings it uses itself and leaves
the rest to the template, whose refusal it prints as the one line.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from typing import NoReturn

from . import __version__, settings
from .config import Config, ConfigError
from .contract import config_error

__all__ = ["config_from_args", "main", "parse_args", "supervisor_config"]

#: The Config fields the supervisor itself uses; their rows need no heavy library.
SUPERVISOR_FIELDS = frozenset(
    {"ws_host", "ws_port", "metrics_host", "metrics_port", "workers", "preload",
     "log_level", "log_format"}
)  # fmt: skip


class _NotTheRunCommand(Exception):
    """The run command's own parser cannot take these arguments (a tool, or an error)."""


class _RunParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _NotTheRunCommand(message)


def build_parser(tools: bool = True) -> argparse.ArgumentParser:
    parser = (argparse.ArgumentParser if tools else _RunParser)(
        prog="rango",
        description="Websocket gateway for exchanges: events from a RabbitMQ topic "
        "exchange to the websocket clients subscribed to them.",
        epilog=settings.help_text(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"rango {__version__}")
    add_run_flags(parser)
    if not tools:
        parser.set_defaults(command=None)
        return parser
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    from . import tools as commands_of_tools

    commands_of_tools.add_parsers(commands)
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
    """The arguments of ``rango``. The run command's are parsed without importing the
    tools (each imports its libraries); anything else, help and errors included, by
    the whole parser, so its answers are the same either way."""
    argv = sys.argv[1:] if argv is None else argv
    if not {"-h", "--help"} & set(argv):
        try:
            args, rest = build_parser(tools=False).parse_known_args(argv)
        except _NotTheRunCommand:
            rest = ["?"]
        if not rest:
            return args
    return build_parser().parse_args(argv)


def _flags(args: argparse.Namespace) -> dict[str, object]:
    return {flag.dest: getattr(args, flag.dest) for flag in settings.FLAGS}


def config_from_args(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> Config:
    """The config of the environment (the process's unless given) with the run flags
    of ``args`` on top."""
    return Config.from_env(env, **_flags(args))


def supervisor_config(args: argparse.Namespace, env: Mapping[str, str]) -> Config:
    """What the supervisor needs of the config, every setting checked where it runs.

    With a worker template (``RANGO_PRELOAD=1``) only the supervisor's own fields are
    read (the rest keep their defaults here); the template reads and checks all of
    them. Otherwise, or when one of its own is bad, everything is read here, so the
    error reported is the first of the table's order, as always.
    """
    source = settings.Source(env, _flags(args))
    try:
        values = {row.field: row.read(source) for row in settings.SETTINGS
                  if row.field in SUPERVISOR_FIELDS}  # fmt: skip
        if values["preload"]:
            return Config(**values)
    except ConfigError:
        pass
    return config_from_args(args, env)


def main(argv: list[str] | None = None) -> int:
    """``rango``: run the supervisor and its workers, or a tool sub-command."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.command is not None:
        return int(args.func(args) or 0)
    try:
        env = settings.environment()
        config = supervisor_config(args, env)
    except ConfigError as exc:
        return config_error(exc)
    from .logs import setup_logging
    from .supervisor import run

    setup_logging(config.log_level_no, config.log_format, "supervisor")
    workers = config.workers or len(os.sched_getaffinity(0))
    return run(config, argv, workers, env, args)


if __name__ == "__main__":
    sys.exit(main())
