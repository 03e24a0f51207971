"""Developer tools: ``rango keygen``, ``rango token``, ``rango publish``, ``rango listen``."""

from __future__ import annotations

import argparse


def add_parsers(commands: argparse._SubParsersAction) -> None:
    """Register the tool sub-commands on the ``rango`` parser."""
