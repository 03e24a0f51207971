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

One module a command (:mod:`.keygen`, :mod:`.tokens`, :mod:`.publish`,
:mod:`.listen`, :mod:`.demo`), each with its ``add_parser``; the demo's markets in
:mod:`.market`; what they share in :mod:`._common` and, for the two that publish,
:mod:`._broker`. Each tool imports the heavy libraries it needs (cryptography,
PyJWT, pika, websockets) when it runs: ``rango keygen`` or ``rango --help`` need
not load them all.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import demo, keygen, listen, publish, tokens
from ._broker import Event
from ._common import ToolError
from .publish import parse_event
from .tokens import mint_token

if TYPE_CHECKING:
    from ._common import Commands

__all__ = ["Event", "ToolError", "add_parsers", "mint_token", "parse_event"]


def add_parsers(commands: Commands) -> None:
    """Register the tool sub-commands on the ``rango`` parser."""
    for module in (keygen, tokens, publish, listen, demo):
        module.add_parser(commands)
