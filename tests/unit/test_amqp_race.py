"""The loop exception handler rango.amqp installs for pika's connect race
(ValueError "Expected connected socket" from a loop callback): one debug line,
no traceback; any other exception still reaches the previous handler."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from rango.amqp import _ignore_pika_connect_race


def test_the_race_is_a_debug_line_and_the_rest_goes_on(caplog: Any) -> None:
    loop = asyncio.new_event_loop()
    seen: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: seen.append(context))
    try:
        _ignore_pika_connect_race(loop)
        _ignore_pika_connect_race(loop)  # a second consumer: installed once
        race = ValueError("Expected connected socket, but getpeername() failed: error=...")
        with caplog.at_level(logging.DEBUG, logger="rango.amqp"):
            loop.call_exception_handler({"message": "cb", "exception": race})
        assert seen == []
        assert [r.levelno for r in caplog.records] == [logging.DEBUG]
        other = {"message": "cb", "exception": ValueError("something else")}
        loop.call_exception_handler(other)
        assert seen == [other]
    finally:
        loop.close()
