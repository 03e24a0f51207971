"""The tests' shared code, one module per job (``pythonpath = ["tests"]`` makes
``import support`` work from every test directory, and bench/ adds tests/ itself):

* :mod:`support.wire` — raw websocket bytes: upgrade requests, frames, one raw client;
* :mod:`support.answers` — the gateway's expected answers and the ways to ask for them;
* :mod:`support.tokens` — key pairs and tokens, barong's (``rango.tools.mint_token``) and forged;
* :mod:`support.gateway` — gateway processes on free ports (tests' ``Rango``, bench's server);
* :mod:`support.metrics` — the Prometheus endpoint: parsing, counters, a checking watcher;
* :mod:`support.polling` — bounded waits for state that has no event to await;
* :mod:`support.procfs` — /proc readers: children, CPU, memory, sockets, environment;
* :mod:`support.broker` — RabbitMQ: a publisher, ``rabbitmqctl``, a fault-injecting proxy;
* :mod:`support.outage` — the broker-outage scenario shared by the broker tests;
* :mod:`support.crowd` — many asyncio websocket clients at once;
* :mod:`support.clients` — the real external clients: wscat, Chromium;
* :mod:`support.nginx` — Debian's nginx with deploy/nginx/rango.conf, a session check.

Nothing here imports a test module, and no test module imports another.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
AMQP_URL = os.environ.get("RANGO_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
