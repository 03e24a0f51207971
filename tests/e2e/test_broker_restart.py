"""RabbitMQ itself stopped for 30 s and started again (``rabbitmqctl stop_app/start_app``).

Unlike the proxy tests, the broker really goes away: connections are closed by it, and
the non-durable exchange and the exclusive queues are gone when it comes back, so the
worker must declare and bind everything again. It stops the shared broker, so it runs
only where nothing else uses it: in CI (``CI`` set, tests run one at a time) or with
``RANGO_TEST_BROKER_RESTART=1``.
"""

from __future__ import annotations

import os
import time
from contextlib import ExitStack

import pytest
from support.broker import rabbitmqctl, unique
from support.outage import (
    RESUME,
    amqp_problems,
    check_recovered,
    first_marker_after,
    open_book,
    sit_out_outage,
)
from support.procfs import cpu_seconds

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (os.environ.get("CI") or os.environ.get("RANGO_TEST_BROKER_RESTART") == "1"),
        reason="stops the shared RabbitMQ: runs in CI or with RANGO_TEST_BROKER_RESTART=1",
    ),
]


def test_rabbitmq_stopped_for_30_seconds_and_started_again(rango_factory, publisher_factory):
    rango = rango_factory()
    [worker] = rango.worker_pids()
    market = unique()
    with ExitStack() as stack:
        trades, book = open_book(stack, rango, publisher_factory(rango.exchange), market)
        offset = len(rango.log())
        cpu = cpu_seconds(worker)
        rabbitmqctl("stop_app", timeout=120)
        try:
            sit_out_outage(rango, worker, [trades, book])
        finally:
            rabbitmqctl("start_app", timeout=120)
            rabbitmqctl("await_startup", timeout=120)
        back = time.monotonic()
        used = cpu_seconds(worker) - cpu
        assert used < 1.0, f"the worker used {used:.2f} s of CPU while the broker was away"
        publisher = publisher_factory(rango.exchange)  # the old connection died with it
        took = first_marker_after(publisher, trades, f"{market}.trades", back)
        assert took <= RESUME, f"delivery resumed {took:.2f} s after the broker was back"
        check_recovered(rango, publisher, market, trades, book)
        # One line when lost, one when back: not one per retry.
        problems = amqp_problems(rango.log()[offset:])
        assert len(problems) == 2, rango.log()[offset:]
        assert " ERROR " in problems[0] and "back" in problems[1], problems
    assert rango.worker_pids() == [worker]
    assert "Traceback" not in rango.log(), rango.log()
