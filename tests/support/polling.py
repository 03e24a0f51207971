"""Bounded polling, for state that has no event to await (a process's children, a log
line, a counter that workers report once a second). Every wait has a timeout and
fails with an AssertionError that says what it waited for.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from typing import Any


def _delays(timeout: float, what: str, cap: float) -> Iterator[float]:
    """The pauses before each poll: none before the first, then doubling up to ``cap``;
    an AssertionError once a poll has come back false after ``timeout``."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    yield 0.0
    while time.monotonic() <= deadline:
        yield delay
        delay = min(delay * 2, cap)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy; return that."""
    for delay in _delays(timeout, what, 0.2):
        time.sleep(delay)
        if result := predicate():
            return result
    raise AssertionError("unreachable")  # _delays raises first


async def async_wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    """:func:`wait_for` without blocking the event loop."""
    for delay in _delays(timeout, what, 0.1):
        await asyncio.sleep(delay)
        if result := predicate():
            return result
    raise AssertionError("unreachable")


def wait_logged(gateway: Any, predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    """:func:`wait_for`, with the gateway's log in the failure message."""
    try:
        return wait_for(predicate, timeout, what)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n--- rango log ---\n{gateway.log()}") from None
