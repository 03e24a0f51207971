"""Rango on a RabbitMQ cluster (issue 12): ``rango --workers 3`` with ``RABBITMQ_HOST``
listing the three nodes of the tests' own cluster (support.cluster), while nodes are
stopped, killed and the whole cluster is stopped; then the validation of such lists
(no cluster needed) and the tools that take them.

Which worker consumes from which node is read two ways: the broker's own
(``rabbitmqctl -n NODE list_connections`` by the worker's connection name) and
Rango's (``rango_amqp_connected{worker,node}``). Every measured time is printed
(``pytest -s``).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pika
import pytest
from support import REPO
from support.broker import unique
from support.cluster import Cluster, Node, NodePublisher
from support.crowd import Client, open_client
from support.gateway import RANGO_COMMAND, Rango, free_port, gateway_env
from support.metrics import samples, scrape
from support.outage import INC1, INC2, INC_LOST, RESUME, SNAP1, SNAP2
from support.polling import async_wait_for, wait_for
from support.procfs import socket_owners, worker_index
from support.tokens import KeyPair

WORKERS = 3
OUTAGE = 20.0  # the whole cluster away this long
PER_WORKER = 3  # clients on each worker at least


# The gateway and where its workers are.


def cluster_rango(keys: KeyPair, log_dir: Path, cluster: Cluster) -> Rango:
    """``rango --workers 3`` with ``RABBITMQ_HOST`` = the cluster's nodes (not started)."""
    rango = Rango(keys, log_dir, env={
        "RABBITMQ_HOST": cluster.rabbitmq_host(), "RANGO_WORKERS": str(WORKERS),
    })  # fmt: skip
    # The tests' Rango names the shared broker with --amqp-addr, which would win over
    # RABBITMQ_HOST: drop it.
    at = rango.args.index("--amqp-addr")
    del rango.args[at : at + 2]
    return rango


@pytest.fixture
def gateway(rabbitmq_cluster: Cluster, keys: KeyPair, tmp_path: Path) -> Iterator[Rango]:
    rango = cluster_rango(keys, tmp_path, rabbitmq_cluster)
    started = time.monotonic()
    try:  # stopped even if it never gets ready (its workers would haunt the cluster)
        rango.start(timeout=30)
        wait_for(lambda: len(rango.worker_pids()) == WORKERS, 10, f"{WORKERS} workers")
        print(f"\nrango --workers {WORKERS} ready in {time.monotonic() - started:.1f} s")
        yield rango
    finally:
        rango.stop()


def connected(rango: Rango) -> dict[str, str]:
    """Worker index -> the node (host:port) it consumes from, by its metric."""
    found = {}
    for labels, value in samples(scrape(rango.metrics_port), "rango_amqp_connected"):
        if value == 1:
            assert labels["worker"] not in found, f"worker {labels['worker']} on two nodes"
            found[labels["worker"]] = labels["node"]
    return found


def placement(rango: Rango, cluster: Cluster) -> dict[str, Node]:
    """Worker index -> its node, once every worker consumes, the broker's view and
    Rango's metric agreeing."""
    pids = {worker_index(pid): pid for pid in rango.worker_pids()}

    seen: list[Any] = []

    def agreed() -> dict[str, Node] | None:
        metric = connected(rango)
        broker = cluster.workers_on() if len(metric) == WORKERS else {}
        seen[:] = [metric, broker]
        if any(pid not in broker for pid in pids.values()):
            return None
        on = {index: cluster.node(broker[pid]) for index, pid in pids.items()}
        return on if {i: n.address for i, n in on.items()} == metric else None

    try:
        return wait_for(agreed, 20, "every worker consuming, the broker and the metric agreeing")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; metric {seen[0]}, broker {seen[1]} (pids {pids})") from None


# Clients, spread over the workers, each subscribed to numbered trades and a book.


async def spread(rango: Rango, market: str) -> dict[str, list[Client]]:
    """Worker index -> its clients (at least PER_WORKER each), subscribed to
    ``<market>.trades`` (numbered) and ``<market>.ob-inc``."""
    streams = [f"{market}.trades", f"{market}.ob-inc"]
    url = rango.url(query="&".join(f"stream={s}" for s in streams))
    pids = rango.worker_pids()
    index = {pid: worker_index(pid) for pid in pids}
    clients: list[Client] = []
    for _ in range(20):
        clients += await asyncio.gather(*(open_client(url, streams[0], streams)
                                          for _ in range(10)))  # fmt: skip
        owners = socket_owners(rango.port, pids)
        by_worker: dict[str, list[Client]] = {i: [] for i in index.values()}
        for client in clients:
            by_worker[index[owners[client.port]]].append(client)
        if all(len(group) >= PER_WORKER for group in by_worker.values()):
            return by_worker
    raise AssertionError(f"{len(clients)} connections never reached every worker: {by_worker}")


def book(market: str, frame: dict[str, Any]) -> dict[str, Any]:
    kind = "ob-snap" if "bids" in frame else "ob-inc"
    return {f"{market}.{kind}": frame}


async def store_book(publisher: NodePublisher, market: str, clients: list[Client]) -> None:
    """SNAP1 and INC1 reach every client (each worker now stores the book)."""
    publisher.publish(f"public.{market}.ob-snap", SNAP1)
    publisher.publish(f"public.{market}.ob-inc", INC1)
    expected = [book(market, SNAP1), book(market, INC1)]
    await async_wait_for(lambda: all(len(c.other) >= 2 for c in clients), 10, "SNAP1 + INC1")
    for client in clients:
        assert client.other == expected, client.other


async def check_books(publisher: NodePublisher, market: str, reset: list[Client],
                      kept: list[Client]) -> None:  # fmt: skip
    """The workers of ``reset`` forgot their book (PROTOCOL §5): an increment is dropped
    and the next snapshot goes out; those of ``kept`` still have it: the increment goes
    out and the snapshot does not (only a first snapshot is sent)."""
    for client in reset + kept:
        client.other.clear()
    publisher.publish(f"public.{market}.ob-inc", INC_LOST)
    publisher.publish(f"public.{market}.ob-snap", SNAP2)
    publisher.publish(f"public.{market}.ob-inc", INC2)
    await async_wait_for(lambda: all(len(c.other) >= 2 for c in reset + kept), 10,
                         "the book events after the outage")  # fmt: skip
    for client in reset:
        assert client.other == [book(market, SNAP2), book(market, INC2)], client.other
    for client in kept:
        assert client.other == [book(market, INC_LOST), book(market, INC2)], client.other


class Numbers(threading.Thread):
    """Publishes ``{"n": 0}``, ``{"n": 1}``... to ``key`` every ``every`` s until
    :meth:`finish`; ``count`` is how many went out."""

    def __init__(self, publisher: NodePublisher, key: str, every: float = 0.01) -> None:
        super().__init__(daemon=True)
        self.publisher, self.key, self.every = publisher, key, every
        self.count = 0
        self.error: BaseException | None = None
        self._done = threading.Event()

    def run(self) -> None:
        try:
            while not self._done.wait(self.every):
                self.publisher.publish(self.key, {"n": self.count})
                self.count += 1
        except BaseException as exc:
            self.error = exc

    def finish(self) -> int:
        self._done.set()
        self.join(10)
        assert self.error is None, f"publishing on {self.publisher.node.name}: {self.error!r}"
        return self.count


class RefusedAt(threading.Thread):
    """Notes when ``node``'s AMQP port first refuses a connection (polled every 5 ms)."""

    def __init__(self, node: Node) -> None:
        super().__init__(daemon=True)
        self.node = node
        self.at: float | None = None
        self._over = threading.Event()
        self.start()

    def run(self) -> None:
        while not self._over.wait(0.005):
            try:
                with socket.create_connection((self.node.host, self.node.amqp_port), 1):
                    pass
            except OSError:
                self.at = time.monotonic()
                return

    def wait(self) -> float:
        self.join(10)
        self._over.set()
        assert self.at is not None, f"{self.node.name} still accepts connections"
        return self.at


def increasing(numbers: list[int]) -> bool:
    return all(a < b for a, b in itertools.pairwise(numbers))


def test_events_published_on_any_node_reach_every_worker(rabbitmq_cluster, gateway):
    cluster, rango = rabbitmq_cluster, gateway
    on = placement(rango, cluster)
    # Worker i starts at entry i mod 3: one worker per node.
    assert {i: n.index for i, n in on.items()} == {"0": 1, "1": 2, "2": 3}, on
    # One consumer per worker, on its node.
    pids = "|".join(str(pid) for pid in rango.worker_pids())
    consumers = {queue: node for queue, node in cluster.consumers_on().items()
                 if re.fullmatch(rf"rango\.instance\.\S+\.({pids})\.[0-9a-f]+", queue)}  # fmt: skip
    assert sorted(consumers.values()) == sorted(n.name for n in cluster.nodes), consumers
    market = unique()
    publishers = [NodePublisher(rango.exchange, node) for node in cluster.nodes]

    async def scenario() -> None:
        by_worker = await spread(rango, market)
        everyone = [c for group in by_worker.values() for c in group]
        for n, publisher in enumerate(publishers):
            publisher.publish(f"public.{market}.trades", {"n": n})
        await async_wait_for(lambda: all(len(c.numbers) >= 3 for c in everyone), 10,
                             "an event from each node to every client")  # fmt: skip
        for client in everyone:
            assert sorted(client.numbers) == [0, 1, 2], client.numbers
        await asyncio.gather(*(c.close() for c in everyone))

    try:
        asyncio.run(scenario())
    finally:
        for publisher in publishers:
            publisher.close()


# A worker's node lost.


@pytest.mark.slow
@pytest.mark.parametrize(("how", "victim"), [("stop_app", "1"), ("SIGKILL", "2")])
def test_node_lost_worker_moves_on(rabbitmq_cluster, gateway, how, victim):
    cluster, rango = rabbitmq_cluster, gateway
    market = unique()
    trades = f"public.{market}.trades"
    pids = {worker_index(pid): pid for pid in rango.worker_pids()}
    on = placement(rango, cluster)
    assert {i: n.index for i, n in on.items()} == {"0": 1, "1": 2, "2": 3}, on
    lost = on[victim]
    # Events are published on a node that stays up, other than the victim's.
    publish_on = next(n for n in cluster.nodes if n is not lost)
    publisher = NodePublisher(rango.exchange, publish_on)
    log_at = len(rango.log())

    async def scenario() -> None:
        by_worker = await spread(rango, market)
        everyone = [c for group in by_worker.values() for c in group]
        moved = by_worker[victim]
        others = [c for i, group in by_worker.items() if i != victim for c in group]
        await store_book(publisher, market, everyone)

        numbers = Numbers(publisher, trades)
        numbers.start()
        await async_wait_for(lambda: all(len(c.numbers) >= 5 for c in everyone), 10,
                             "numbered events flowing to everyone")  # fmt: skip
        refusing = RefusedAt(lost)
        issued = time.monotonic()
        if how == "stop_app":
            await asyncio.to_thread(cluster.stop_app, lost)
        else:
            await asyncio.to_thread(cluster.kill, lost)
        # The stop: when the node stopped taking connections (stop_app closes its
        # listener, then its connections), or the SIGKILL itself.
        stopped = refusing.wait() if how == "stop_app" else issued

        def elsewhere() -> str | None:
            node = connected(rango).get(victim)
            return node if node not in (None, lost.address) else None

        new_address = await async_wait_for(elsewhere, 15, f"worker {victim} on another node")
        back = time.monotonic()
        took = back - stopped
        print(f"\n{how} of {lost.name}: worker {victim} consumes from {new_address} "
              f"{took:.3f} s after the node stopped ({back - issued:.2f} s after the command "
              "was issued)")
        assert took <= RESUME, f"worker {victim} consumed again {took:.2f} s after the {how}"
        assert rango.ready_status() == 200  # 503 only while a worker has no node at all
        # The broker agrees, and the worker's consumer is on that node.
        broker = await asyncio.to_thread(cluster.workers_on)
        assert broker[pids[victim]] == cluster.node(new_address).name, broker
        consumers = await asyncio.to_thread(cluster.consumers_on)
        assert cluster.node(new_address).name in consumers.values(), consumers
        # Its clients receive again.
        since = {c.port: len(c.numbers) for c in moved}
        await async_wait_for(lambda: all(len(c.numbers) > since[c.port] for c in moved), 10,
                             f"worker {victim}'s clients served again")  # fmt: skip

        restart = time.monotonic()
        await asyncio.to_thread(cluster.start, lost)
        await asyncio.to_thread(cluster.check_running)  # the node rejoined: 3 running
        print(f"{lost.name} back and in the cluster in {time.monotonic() - restart:.1f} s")
        total = numbers.finish()

        # Nobody was disconnected; the other workers' clients missed nothing; the
        # victim's lost some while away, but in order and none twice.
        assert not [c.port for c in everyone if c.closed.done()], "a client was disconnected"
        await async_wait_for(lambda: all(len(c.numbers) >= total for c in others), 10,
                             f"{total} numbers to the other workers' clients")  # fmt: skip
        for client in others:
            assert client.numbers == list(range(total)), (client.port, client.numbers[-5:])
        await async_wait_for(lambda: all(c.numbers[-1] == total - 1 for c in moved), 10,
                             "the last number to the victim's clients")  # fmt: skip
        for client in moved:
            assert increasing(client.numbers), client.numbers
        missed = total - len(moved[0].numbers)
        print(f"{total} numbered events: others got all, worker {victim}'s clients {missed} fewer")

        # Events flow through the restarted node too; the victim's book was reset.
        via_restarted = NodePublisher(rango.exchange, lost)
        try:
            await check_books(via_restarted, market, reset=moved, kept=others)
            via_restarted.publish(trades, {"n": total})
            await async_wait_for(lambda: all(c.numbers[-1] == total for c in everyone), 10,
                                 "an event published on the restarted node")  # fmt: skip
        finally:
            via_restarted.close()
        assert not [c.port for c in everyone if c.closed.done()]
        await asyncio.gather(*(c.close() for c in everyone))

    try:
        asyncio.run(scenario())
    finally:
        publisher.close()
    log = rango.log()[log_at:]
    assert sorted(rango.worker_pids()) == sorted(pids.values()), "a worker was replaced"
    assert "Traceback" not in log, log
    where = re.escape(lost.address)
    assert re.search(rf"RabbitMQ connection to {where} lost: .*; trying ", log), log
    assert re.search(rf"consuming \S+ from exchange \S+ on (?!{where})", log), log


# The whole cluster stopped.


@pytest.mark.slow
def test_whole_cluster_stopped_for_20_seconds(rabbitmq_cluster, gateway):
    cluster, rango = rabbitmq_cluster, gateway
    market = unique()
    trades = f"public.{market}.trades"
    pids = sorted(rango.worker_pids())
    placement(rango, cluster)
    publisher = NodePublisher(rango.exchange, cluster.nodes[0])

    async def scenario() -> None:
        by_worker = await spread(rango, market)
        everyone = [c for group in by_worker.values() for c in group]
        await store_book(publisher, market, everyone)
        publisher.close()  # its node goes away

        await asyncio.to_thread(cluster.stop_all)
        await async_wait_for(lambda: rango.ready_status() == 503, 10, "/ready answering 503")
        assert not cluster.accepting()
        back_at = time.monotonic() + OUTAGE
        while (left := back_at - time.monotonic()) > 0:
            pongs = await asyncio.gather(*(c.ws.ping() for c in everyone))
            await asyncio.wait_for(asyncio.gather(*pongs), 5)  # every client still answered
            assert not [c.port for c in everyone if c.closed.done()]
            assert rango.ready_status() == 503
            assert sorted(rango.worker_pids()) == pids
            await asyncio.sleep(min(1.0, left))  # the outage itself: nothing to wait for

        starting = asyncio.ensure_future(asyncio.to_thread(cluster.start_all))
        first = await async_wait_for(lambda: cluster.accepting() or starting.done(),
                                     120, "a node accepting AMQP")  # fmt: skip
        assert not isinstance(first, bool), starting.result()
        returned = time.monotonic()
        print(f"\n{first[0].name} accepts AMQP again")
        # The node may accept TCP a moment before it takes logins.
        markers = await asyncio.to_thread(
            wait_for, lambda: _publisher_or_none(rango.exchange, first[0]), 10, "a login"
        )
        # A marker every 50 ms until a client of each worker has one.
        seen: dict[str, float] = {}
        counts = {i: len(group[0].numbers) for i, group in by_worker.items()}
        n = 0
        while len(seen) < WORKERS:
            markers.publish(trades, {"n": 10_000 + n})
            n += 1
            await asyncio.sleep(0.05)
            for index, group in by_worker.items():
                if index not in seen and len(group[0].numbers) > counts[index]:
                    seen[index] = time.monotonic() - returned
            assert time.monotonic() - returned < RESUME + 10, f"delivery back only to {seen}"
        print("delivery back after the first node's return, by worker: "
              + ", ".join(f"{i}: {t:.2f} s" for i, t in sorted(seen.items())))
        await starting
        await asyncio.to_thread(cluster.check_running)
        print(f"all nodes back {time.monotonic() - returned:.1f} s after the first")
        assert max(seen.values()) <= RESUME, seen

        # Every worker lost its node: every book was reset.
        await check_books(markers, market, reset=everyone, kept=[])
        markers.close()
        assert not [c.port for c in everyone if c.closed.done()], "a client was disconnected"
        await asyncio.gather(*(c.close() for c in everyone))

    asyncio.run(scenario())
    placement(rango, cluster)
    assert sorted(rango.worker_pids()) == pids, "a worker was replaced"
    assert "Traceback" not in rango.log()


def _publisher_or_none(exchange: str, node: Node) -> NodePublisher | None:
    try:
        return NodePublisher(exchange, node)
    except pika.exceptions.AMQPError:
        return None


# Validation of the lists (no cluster needed), and the tools that take them.


BAD_LISTS = [
    ("unclosed-bracket", {"RABBITMQ_HOST": "[::1"}, [], "RABBITMQ_HOST"),
    ("port-not-a-number", {"RABBITMQ_HOST": "a:b"}, [], "RABBITMQ_HOST"),
    ("empty-entry", {"RABBITMQ_HOST": "h1,,h2"}, [], "RABBITMQ_HOST"),
    ("url-list-bogus", {}, ["--amqp-addr", "amqp://a/,bogus"], "--amqp-addr"),
]


@pytest.fixture(scope="module")
def bad_list_outcomes(keys: KeyPair) -> dict[str, subprocess.CompletedProcess[str]]:
    """Each bad list given to ``rango`` (all started at once): exit status and output."""
    procs = {}
    for case, env, args, _name in BAD_LISTS:
        procs[case] = subprocess.Popen(
            [*RANGO_COMMAND, "--pubKey", str(keys.public_path), "--exchange", "rango.test.bad",
             "--workers", "2", *args],
            env=gateway_env(free_port(), free_port(), **env), cwd=REPO, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
    results = {}
    try:
        for case, proc in procs.items():
            # A restart loop would never exit: the timeout fails the test.
            out, err = proc.communicate(timeout=30)
            results[case] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return results


@pytest.mark.parametrize(("case", "name"), [(c[0], c[3]) for c in BAD_LISTS],
                         ids=[c[0] for c in BAD_LISTS])  # fmt: skip
def test_bad_broker_list_stops_start_up(bad_list_outcomes, case, name):
    result = bad_list_outcomes[case]
    assert "Traceback" not in result.stdout + result.stderr, result
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and name in lines[0], result.stderr
    assert "guest" not in lines[0]  # never the credentials


def _queue_on(node: Node, exchange: str) -> tuple[Any, Any, str]:
    """A connection to ``node`` and a queue there bound to everything of ``exchange``."""
    conn = pika.BlockingConnection(pika.URLParameters(node.url))
    channel = conn.channel()
    channel.exchange_declare(exchange, exchange_type="topic", durable=False)
    queue = channel.queue_declare("", exclusive=True).method.queue
    channel.queue_bind(queue, exchange, "#")
    return conn, channel, queue


def _received(channel: Any, queue: str, count: int) -> list[tuple[str, bytes]]:
    got = []
    for method, _props, body in channel.consume(queue, auto_ack=True, inactivity_timeout=10):
        if method is None:
            break
        got.append((method.routing_key, body))
        if len(got) == count:
            break
    channel.cancel()
    return got


def test_publish_takes_the_first_node_that_answers(rabbitmq_cluster):
    """``rango publish`` with RABBITMQ_HOST = a refusing entry, then the cluster's nodes:
    it publishes on node 1, and a queue on node 3 gets the event."""
    cluster = rabbitmq_cluster
    exchange = f"rango.test.{unique()}"
    conn, channel, queue = _queue_on(cluster.nodes[2], exchange)
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "RANGO_"))}
        env["RABBITMQ_HOST"] = f"127.0.0.1:{free_port()},{cluster.rabbitmq_host()}"
        result = subprocess.run(
            [sys.executable, "-m", "rango.cli", "publish", "--exchange", exchange],
            input='public.m.trades {"tid": 1}\n', env=env, cwd=REPO, capture_output=True,
            text=True, timeout=30,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert _received(channel, queue, 1) == [("public.m.trades", b'{"tid": 1}')]
    finally:
        conn.close()


def test_demo_takes_a_list_of_urls(rabbitmq_cluster):
    """``rango demo --print`` with --amqp-addr = a refusing URL, then the cluster's: what
    it printed is what a queue on node 2 got, in order."""
    cluster = rabbitmq_cluster
    exchange = f"rango.test.{unique()}"
    conn, channel, queue = _queue_on(cluster.nodes[1], exchange)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "rango.cli", "demo", "--print", "--exchange", exchange,
             "--amqp-addr", f"amqp://guest:guest@127.0.0.1:{free_port()}/,{cluster.amqp_addr()}",
             "--duration", "1", "--market", "btcusd"],
            cwd=REPO, capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        printed = [line.split(" ", 1) for line in result.stdout.splitlines() if line.strip()]
        assert printed, result.stdout
        got = _received(channel, queue, len(printed))
        assert [(key, orjson.loads(body)) for key, body in got] == [
            (key, orjson.loads(body)) for key, body in printed
        ]
    finally:
        conn.close()
