"""What the tool commands share: exit statuses, :class:`ToolError`, how a command is
registered and how its error is printed.

Also the defaults and the argparse type used by more than one command. It imports
nothing heavy, so that registering the commands for ``rango --help`` stays cheap.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import TypeAlias

    # What `add_parser(commands)` of each command module receives.
    Commands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"

DEFAULT_KEY = "config/rsa-key"
DEFAULT_UID = "IDABC0000001"
DEFAULT_ROLE = "member"

# Exit statuses.
OK, FAILED, BAD_INPUT = 0, 1, 2


class ToolError(Exception):
    """A tool cannot go on; ``str(exc)`` is printed, ``status`` is the exit status."""

    def __init__(self, message: str, status: int = BAD_INPUT) -> None:
        super().__init__(message)
        self.status = status


def add_command(
    commands: Commands,
    name: str,
    tool: Callable[[argparse.Namespace], int],
    *,
    help: str,
    description: str,
) -> argparse.ArgumentParser:
    """Add the sub-command ``name``, which runs ``tool`` through :func:`command`.

    Return its parser, for the command's own flags.
    """
    parser = commands.add_parser(name, help=help, description=description)
    parser.set_defaults(func=command(name, tool))
    return parser


def command(
    name: str, tool: Callable[[argparse.Namespace], int]
) -> Callable[[argparse.Namespace], int]:
    """Wrap ``tool``: print a :class:`ToolError` as one line, end quietly on ^C."""

    def run(args: argparse.Namespace) -> int:
        try:
            return tool(args)
        except ToolError as exc:
            warn(name, str(exc))
            return exc.status
        except KeyboardInterrupt:
            return 130
        except BrokenPipeError:  # e.g. `rango listen | head -1`
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            return OK

    return run


def warn(name: str, message: str) -> None:
    """Print ``message`` on stderr as ``rango NAME: message``."""
    print(f"rango {name}: {message}", file=sys.stderr, flush=True)


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def positive(kind: type[int] | type[float]) -> Callable[[str], int | float]:
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
