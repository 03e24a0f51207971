"""Several hosts behind a real load balancer (issue 12): three "hosts", each a network
namespace running ``rango --workers 2`` on its own address against a three-node RabbitMQ
cluster (in a namespace of its own on the same private network), with Debian's HAProxy
in front in the root namespace running ``deploy/haproxy.cfg`` as it is.

The network (support.netns): 10.213.0.0/24 exists only inside the test's namespaces,
joined by a bridge in a switch namespace; the cluster's nodes listen on 10.213.0.2
(ports 5681-5683), the hosts on 10.213.0.11-13 (websocket 8080, metrics 4242). HAProxy
reaches each host through ``namespace <netns>`` on its server line, so the root
namespace gets no address and no route; the test reaches the hosts' metrics and the
brokers the same way (sockets made inside the namespace). Nothing leaves the machine.

Root only (namespaces); CI runs as root. Measured times are printed (``pytest -s``).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest
from support import cluster as cluster_support
from support import haproxy as haproxy_support
from support import netns as netns_support
from support.answers import subscribed
from support.broker import unique
from support.cluster import Cluster, NodePublisher
from support.haproxy import HAProxy
from support.metrics import sample
from support.netns import HostRango, Network, entered
from support.polling import async_wait_for
from support.procfs import alive
from support.tokens import KeyPair
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

pytestmark = pytest.mark.slow

HOSTS = ("host1", "host2", "host3")  # HAProxy's server names, in deploy/haproxy.cfg
BROKER_HOST = 2  # 10.213.0.2: every node of the cluster
HOST_ADDRESSES = (11, 12, 13)
WORKERS = 2  # per host (HostRango's default)
EVENT_PERIOD = 0.02  # seconds between two numbered events while a scenario runs


def rotated(nodes: list[str], by: int) -> str:
    """``RABBITMQ_HOST`` for one host, as the README's recipe says: every node, the
    list rotated by the workers of the hosts before it. Worker i starts at entry i mod n,
    so with the same list everywhere every host's two workers would sit on the first
    two nodes and the third would have no consumer until a failure."""
    by %= len(nodes)
    return ",".join(nodes[by:] + nodes[:by])


def skip_reason() -> str | None:
    return (
        netns_support.unavailable()
        or haproxy_support.unavailable()
        or cluster_support.unavailable(netns="any")
    )


@dataclass
class Topology:
    """The module's parts: the network, the cluster in its namespace, the three hosts,
    HAProxy, and a publisher connected to node 1 from inside the cluster's namespace."""

    network: Network
    cluster: Cluster
    broker_netns: str
    hosts: dict[str, HostRango]  # by HAProxy server name
    haproxy: HAProxy
    exchange: str
    publisher: NodePublisher

    def heal(self) -> None:
        """Every path up, every host running and ready, HAProxy seeing all of them UP."""
        for role in self.network.members:
            self.network.restore(role)
        for host in self.hosts.values():
            if host.exited():
                host.start(wait=False)
        for host in self.hosts.values():
            host.wait_ready(60)
        for backend in ("rango", "rango_any"):
            for name in HOSTS:
                self.haproxy.wait_status(name, "UP", 15, backend)

    def clients_on(self) -> dict[str, float]:
        """``rango_hub_clients_count`` of each host (workers report it once a second)."""
        return {name: sample(host.metrics(), "rango_hub_clients_count") or 0.0
                for name, host in self.hosts.items()}  # fmt: skip


def _remove_leftover_clusters() -> None:
    """The cluster directories of crashed earlier runs (their namespaces' processes are
    killed by Network.remove_leftovers)."""
    for path in Path("/tmp").glob("rango-cluster-rango-h-rt*-mq"):
        pid = int(path.name.removeprefix("rango-cluster-rango-h-rt").removesuffix("-mq"))
        if not alive(pid):
            shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def topology(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Topology]:
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    log_dir = tmp_path_factory.mktemp("hosts")
    keys = KeyPair(log_dir)
    started = time.monotonic()
    network = Network()
    _remove_leftover_clusters()
    cluster: Cluster | None = None
    hosts: dict[str, HostRango] = {}
    haproxy: HAProxy | None = None
    publisher: NodePublisher | None = None
    try:
        broker_netns = network.add("mq", BROKER_HOST)
        cluster = Cluster(netns=broker_netns, listen=network.address(BROKER_HOST),
                          prefix="rango-h")  # fmt: skip
        cluster.create()
        exchange = f"rango.test.{secrets.token_hex(4)}"
        nodes = cluster.rabbitmq_host().split(",")
        for i, (name, host) in enumerate(zip(HOSTS, HOST_ADDRESSES, strict=True)):
            netns = network.add(f"h{i + 1}", host)
            hosts[name] = HostRango(keys, log_dir, netns, network.address(host),
                                    rotated(nodes, WORKERS * i), exchange)  # fmt: skip
        for host in hosts.values():
            host.start(wait=False)
        for host in hosts.values():
            host.wait_ready(60)
        servers = [(f"{h.address}:{h.port}", f"namespace {h.netns}") for h in hosts.values()]
        haproxy = HAProxy(log_dir, servers).start()
        with entered(broker_netns):
            publisher = NodePublisher(exchange, cluster.nodes[0])
        topo = Topology(network, cluster, broker_netns, hosts, haproxy, exchange, publisher)
        topo.heal()
        print(f"\nhosts topology up in {time.monotonic() - started:.1f} s; logs in {log_dir}")
        yield topo
    finally:
        if publisher is not None:
            publisher.close()
        if haproxy is not None:
            haproxy.stop()
        for host in hosts.values():
            host.stop(signal.SIGKILL if host.exited() else signal.SIGTERM)
        if cluster is not None:
            cluster.stop()
        network.close()


@pytest.fixture
def topo(topology: Topology) -> Iterator[Topology]:
    """The module's topology, whole again after whatever the last test did."""
    topology.heal()
    yield topology


# --- what a browser page does ------------------------------------------------------------


class Page:
    """A browser-like client through HAProxy: connects, subscribes (``?stream=``), reads
    numbered events ``{"n": n}``; when the connection closes, connects again after a
    moment and subscribes again, as a page's reconnect logic does."""

    RECONNECT_DELAY = 0.2  # seconds; pages wait a moment rather than spin

    def __init__(self, url: str, stream: str) -> None:
        self.url = url
        self.stream = stream
        self.received: list[tuple[float, int]] = []  # (monotonic time, n)
        self.ports: list[int] = []  # local port of each connection, in order
        self.closed_at: list[float] = []  # when each connection ended
        self.refused: list[str] = []  # connection attempts that failed
        self.subscribed = asyncio.Event()
        self._ws: ClientConnection | None = None
        self._stopping = False
        self.task = asyncio.ensure_future(self._run())

    @property
    def numbers(self) -> list[int]:
        return [n for _, n in self.received]

    async def _run(self) -> None:
        while not self._stopping:
            try:
                ws = await connect(self.url, open_timeout=10)
                answer = orjson.loads(await asyncio.wait_for(ws.recv(), 10))
            except (OSError, InvalidStatus, ConnectionClosed, TimeoutError) as exc:
                self.refused.append(repr(exc))
                await asyncio.sleep(self.RECONNECT_DELAY)
                continue
            if answer != subscribed([self.stream]):  # the test fails on any refusal
                self.refused.append(f"answered {answer!r}")
                await ws.close()
                continue
            self._ws = ws
            self.ports.append(ws.local_address[1])
            self.subscribed.set()
            with contextlib.suppress(ConnectionClosed):
                async for message in ws:
                    frame = orjson.loads(message)
                    if isinstance(frame, dict) and self.stream in frame:
                        self.received.append((time.monotonic(), frame[self.stream]["n"]))
            self._ws = None
            if self._stopping:
                return
            self.closed_at.append(time.monotonic())
            self.subscribed.clear()
            await asyncio.sleep(self.RECONNECT_DELAY)

    def after(self, moment: float) -> list[int]:
        return [n for t, n in self.received if t > moment]

    async def stop(self) -> None:
        self._stopping = True
        if self._ws is not None:
            await self._ws.close()
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


async def open_pages(url: str, stream: str, count: int) -> list[Page]:
    """``count`` pages, each connected and subscribed once."""
    pages = [Page(url, stream) for _ in range(count)]
    await asyncio.wait_for(asyncio.gather(*(p.subscribed.wait() for p in pages)), 30)
    return pages


class Ticker:
    """Publishes ``{"n": 0}``, ``{"n": 1}``... every EVENT_PERIOD on the event loop."""

    def __init__(self, topo: Topology, key: str) -> None:
        self.topo = topo
        self.key = key
        self.next = 0
        self.task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while True:
            self.topo.publisher.publish(self.key, {"n": self.next})
            self.next += 1
            await asyncio.sleep(EVENT_PERIOD)

    async def stop(self) -> int:
        """Stop publishing; how many events were published (0 .. n-1)."""
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        return self.next


async def all_received(pages: list[Page], last: int, timeout: float = 15.0) -> None:
    def behind() -> list[Page]:
        return [p for p in pages if not (p.numbers and p.numbers[-1] >= last)]

    try:
        await async_wait_for(lambda: not behind(), timeout, f"every page to receive event {last}")
    except AssertionError as exc:
        late = [(p.ports, p.numbers[-3:], len(p.closed_at), p.refused[-1:]) for p in behind()]
        raise AssertionError(f"{exc}: {len(late)} behind (ports, last numbers, closes, "
                             f"refusals): {late[:5]}") from None  # fmt: skip


def contiguous(numbers: list[int]) -> bool:
    return numbers == list(range(numbers[0], numbers[0] + len(numbers))) if numbers else True


async def ticking_pages(
    topo: Topology, stream: str, count: int
) -> tuple[list[Page], dict[str, list[Page]], Ticker]:
    """``count`` pages subscribed to ``stream`` through HAProxy, on every host, by host,
    and a Ticker publishing on it that every page has heard from."""
    pages = await open_pages(topo.haproxy.url(query=f"stream={stream}"), stream, count)
    groups = by_server(topo, pages)
    assert all(groups.values()), {n: len(g) for n, g in groups.items()}
    ticker = Ticker(topo, f"public.{stream}")
    await all_received(pages, 5)
    return pages, groups, ticker


def by_server(topo: Topology, pages: list[Page]) -> dict[str, list[Page]]:
    """The pages by the host HAProxy sent their current connection to."""
    sessions = topo.haproxy.sessions()
    missing = [p.ports[-1] for p in pages if p.ports[-1] not in sessions]
    assert not missing, f"HAProxy holds no session for client ports {missing[:5]}"
    groups: dict[str, list[Page]] = {name: [] for name in HOSTS}
    for page in pages:
        groups[sessions[page.ports[-1]]].append(page)
    return groups


def servers_of(topo: Topology, pages: list[Page]) -> set[str]:
    """The hosts HAProxy sent the pages' current connections to."""
    return {name for name, group in by_server(topo, pages).items() if group}


async def wait_clients(topo: Topology, expected: dict[str, int], timeout: float = 10) -> None:
    seen: list[dict[str, float]] = []

    def check() -> bool:
        seen.append(topo.clients_on())
        return seen[-1] == expected

    try:
        await async_wait_for(check, timeout, f"clients per host {expected}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last seen {seen[-1]}") from None


def stot(topo: Topology, name: str) -> int:
    """Sessions HAProxy has sent to server ``name`` since it started."""
    return int(topo.haproxy.stats()[name]["stot"])


# --- the tests -------------------------------------------------------------------------


def test_300_clients_spread_over_the_hosts_and_an_event_reaches_each_once(topo):
    stream = f"{unique()}.trades"

    async def scenario() -> None:
        pages = await open_pages(topo.haproxy.url(query=f"stream={stream}"), stream, 300)
        groups = by_server(topo, pages)
        counts = {name: len(group) for name, group in groups.items()}
        # leastconn over three hosts: about 100 each, far from all on one or two.
        assert all(count >= 60 for count in counts.values()), counts
        await wait_clients(topo, counts)  # each host's own count agrees with HAProxy's
        # The six workers consume from all three nodes (the rotated lists).
        pids = {pid for host in topo.hosts.values() for pid in host.worker_pids()}
        on = {pid: node for pid, node in topo.cluster.workers_on().items() if pid in pids}
        assert len(on) == len(HOSTS) * WORKERS, on
        assert set(on.values()) == {node.name for node in topo.cluster.nodes}, on

        topo.publisher.publish(f"public.{stream}", {"n": 0})
        topo.publisher.publish(f"public.{stream}", {"n": 1})  # a duplicate 0 would precede it
        await all_received(pages, 1)
        for page in pages:
            assert page.numbers == [0, 1], (page.ports, page.numbers)
            assert not page.closed_at and not page.refused, (page.closed_at, page.refused)
        await asyncio.gather(*(p.stop() for p in pages))
        await wait_clients(topo, dict.fromkeys(HOSTS, 0))

    asyncio.run(scenario())


def test_a_host_killed_is_taken_out_and_its_clients_come_back_through_haproxy(topo):
    stream = f"{unique()}.trades"
    victim = "host1"

    async def scenario() -> None:
        pages, groups, ticker = await ticking_pages(topo, stream, 300)

        redispatched = int(topo.haproxy.stats()[victim]["wredis"])
        killed = time.monotonic()
        topo.hosts[victim].kill()
        await async_wait_for(lambda: topo.haproxy.status()[victim] == "DOWN", 10,
                             f"HAProxy to mark {victim} DOWN")  # fmt: skip
        down = time.monotonic() - killed
        sent_before = stot(topo, victim)
        # Every page of the victim reconnects through HAProxy and gets events again.
        moved = groups[victim]
        await async_wait_for(lambda: all(p.after(p.closed_at[-1]) for p in moved if p.closed_at)
                             and all(p.closed_at for p in moved), 20,
                             "the killed host's clients to receive events again")  # fmt: skip
        recovery = [next(t for t, _ in p.received if t > p.closed_at[-1]) - killed for p in moved]
        # New connections after the check: none to the dead host.
        fresh = await open_pages(topo.haproxy.url(query=f"stream={stream}"), stream, 30)
        assert stot(topo, victim) == sent_before
        assert victim not in servers_of(topo, fresh)
        await all_received(fresh, ticker.next)  # an event published after they subscribed
        published = await ticker.stop()
        await all_received([*pages, *fresh], published - 1)
        # Reconnections sent to the dead host before its check failed (leastconn: it had
        # the fewest) were refused there and redispatched: no page saw a failure.
        redispatched = int(topo.haproxy.stats()[victim]["wredis"]) - redispatched
        assert not [p.refused for p in [*pages, *fresh] if p.refused]

        for name in HOSTS:
            for page in groups[name]:
                if name == victim:
                    assert len(page.closed_at) == 1 and len(page.ports) == 2, page.closed_at
                    assert contiguous(page.after(page.closed_at[-1])), page.numbers
                    assert page.numbers[-1] == published - 1
                else:  # never disconnected, missed nothing
                    assert not page.closed_at, (name, page.closed_at)
                    assert page.numbers == list(range(published)), (name, page.numbers[:10])
        await asyncio.gather(*(p.stop() for p in [*pages, *fresh]))
        print(f"\n{victim} SIGKILLed: HAProxy marked it DOWN after {down:.2f} s; its "
              f"{len(moved)} clients received events again after {min(recovery):.2f}-"
              f"{max(recovery):.2f} s, {redispatched} connection attempts redispatched")

    asyncio.run(scenario())


def test_a_host_whose_broker_path_is_cut_is_taken_out_until_it_is_back(topo):
    stream = f"{unique()}.trades"
    victim, role = "host2", "h2"
    host = topo.hosts[victim]

    async def scenario() -> None:
        pages, groups, ticker = await ticking_pages(topo, stream, 90)

        cut = time.monotonic()
        topo.network.cut(role)
        await async_wait_for(lambda: host.ready_status() == 503, 60,
                             f"{victim} /ready 503 after its path is cut")  # fmt: skip
        unready = time.monotonic() - cut
        await async_wait_for(lambda: topo.haproxy.status()[victim] == "DOWN", 10,
                             f"HAProxy to mark {victim} DOWN")  # fmt: skip
        down = time.monotonic() - cut
        # on-marked-down shutdown-sessions: its clients are cut, reconnect elsewhere.
        moved = groups[victim]
        await async_wait_for(lambda: all(p.closed_at and p.after(p.closed_at[-1]) for p in moved),
                             20, "the cut host's clients to receive events again elsewhere")
        moved_in = max(next(t for t, _ in p.received if t > p.closed_at[-1]) for p in moved) - cut
        sent_before = stot(topo, victim)
        fresh = await open_pages(topo.haproxy.url(query=f"stream={stream}"), stream, 30)
        assert stot(topo, victim) == sent_before, "HAProxy sent new clients to the cut host"
        assert victim not in servers_of(topo, fresh)
        await async_wait_for(lambda: topo.clients_on()[victim] == 0, 10,
                             f"{victim} to hold no client")  # fmt: skip

        restored = time.monotonic()
        topo.network.restore(role)
        await async_wait_for(lambda: host.ready_status() == 200, 30, f"{victim} ready again")
        ready_again = time.monotonic() - restored
        await async_wait_for(lambda: topo.haproxy.status()[victim] == "UP", 10,
                             f"HAProxy to mark {victim} UP")  # fmt: skip
        up_again = time.monotonic() - restored
        # leastconn: the host back with no client gets the next ones.
        back = await open_pages(topo.haproxy.url(query=f"stream={stream}"), stream, 10)
        assert servers_of(topo, back) == {victim}
        mark = ticker.next
        await all_received(back, mark + 5)
        published = await ticker.stop()
        await all_received([*pages, *fresh, *back], published - 1)
        for name in HOSTS:
            for page in groups[name]:
                if name != victim:
                    assert not page.closed_at, (name, page.closed_at)
                    assert page.numbers == list(range(published)), (name, page.numbers[:10])
        for page in back:
            assert contiguous(page.numbers) and not page.closed_at, page.numbers
        assert not [p.refused for p in [*pages, *fresh, *back] if p.refused]
        await asyncio.gather(*(p.stop() for p in [*pages, *fresh, *back]))
        print(f"\n{victim}'s path cut: /ready 503 after {unready:.1f} s, DOWN after "
              f"{down:.1f} s, its {len(moved)} clients receiving again elsewhere after "
              f"{moved_in:.1f} s; restored: ready after {ready_again:.1f} s, UP after "
              f"{up_again:.1f} s")  # fmt: skip

    asyncio.run(scenario())


def test_with_no_host_ready_haproxy_still_connects_clients_to_the_hosts(topo):
    stream = f"{unique()}.trades"
    roles = list(topo.network.members)
    roles.remove("mq")

    async def scenario() -> None:
        pages = await open_pages(topo.haproxy.url(query=f"stream={stream}"), stream, 30)
        ticker = Ticker(topo, f"public.{stream}")
        await all_received(pages, 5)

        cut = time.monotonic()
        for role in roles:  # every host loses the brokers; the cluster itself runs
            topo.network.cut(role)
        await async_wait_for(lambda: set(topo.haproxy.status().values()) == {"DOWN"}, 60,
                             "HAProxy to mark every host DOWN")  # fmt: skip
        all_down = time.monotonic() - cut
        # Their pages were disconnected (shutdown-sessions) and connect again through
        # rango_any: 101 and subscribed, not 503; so do new ones.
        await async_wait_for(lambda: all(p.closed_at and p.subscribed.is_set() for p in pages),
                             20, "the pages to be connected again")  # fmt: skip
        fresh = await open_pages(topo.haproxy.url(query=f"stream={stream}"), stream, 10)
        stats = topo.haproxy.stats("rango_any")
        assert sum(int(row["scur"]) for row in stats.values()) == len(pages) + len(fresh)

        restored = time.monotonic()
        for role in roles:
            topo.network.restore(role)
        mark = ticker.next
        await all_received([*pages, *fresh], mark, 30)
        delivering = time.monotonic() - restored
        published = await ticker.stop()
        await all_received([*pages, *fresh], published - 1)
        # Hosts fall one after the other: a page cut from the first may land on a host
        # that falls next, and be cut again: once per host at most.
        closes = [len(page.closed_at) for page in pages]
        for page in pages:
            assert 1 <= len(page.closed_at) <= len(HOSTS), page.closed_at
            assert contiguous(page.after(page.closed_at[-1])), page.numbers
        for page in fresh:
            assert contiguous(page.numbers) and not page.closed_at, page.numbers
        assert not [p.refused for p in [*pages, *fresh] if p.refused]
        await asyncio.gather(*(p.stop() for p in [*pages, *fresh]))
        print(f"\nevery host's path cut: all DOWN after {all_down:.1f} s, clients connected "
              f"through rango_any meanwhile (each cut {min(closes)}-{max(closes)} times); "
              f"restored: events to all after {delivering:.1f} s")  # fmt: skip

    asyncio.run(scenario())


def test_a_rolling_restart_behind_haproxy_refuses_no_connection(topo):
    stream = f"{unique()}.trades"
    victim = "host3"
    host = topo.hosts[victim]
    old = set(host.worker_pids())
    assert len(old) == 2, old
    before = topo.haproxy.stats()[victim]

    async def connect_loop(results: list[int], failures: list[str], done: asyncio.Event) -> None:
        while not done.is_set():
            try:
                async with connect(topo.haproxy.url(query=f"stream={stream}"),
                                   open_timeout=10) as ws:  # fmt: skip
                    answer = orjson.loads(await asyncio.wait_for(ws.recv(), 10))
                    assert answer == subscribed([stream]), answer
                    results.append(ws.response.status_code)
            except (OSError, InvalidStatus, ConnectionClosed, TimeoutError) as exc:
                failures.append(repr(exc))

    async def scenario() -> tuple[int, list[str], float]:
        results: list[int] = []
        failures: list[str] = []
        done = asyncio.Event()
        loops = [asyncio.ensure_future(connect_loop(results, failures, done)) for _ in range(4)]
        await async_wait_for(lambda: len(results) >= 20, 10, "connections before the roll")
        started = time.monotonic()
        host.send_signal(signal.SIGHUP)
        await async_wait_for(
            lambda: len(pids := set(host.worker_pids())) == 2 and not pids & old, 60,
            f"{victim}'s two workers replaced")  # fmt: skip
        rolled = time.monotonic() - started
        at_end = len(results)
        await async_wait_for(lambda: len(results) >= at_end + 20, 10,
                             "connections after the roll")  # fmt: skip
        done.set()
        await asyncio.gather(*loops)
        return len(results), failures, rolled

    count, failures, rolled = asyncio.run(scenario())
    after = topo.haproxy.stats()[victim]
    assert not failures, failures[:5]
    assert int(after["stot"]) > int(before["stot"]), "no connection reached the host rolled"
    # Nothing refused by Rango and hidden by HAProxy's retries, and never out of rotation.
    for counter in ("econ", "wretr", "wredis", "chkdown"):
        assert after[counter] == before[counter], (counter, before[counter], after[counter])
    host.wait_ready()
    print(f"\nSIGHUP on {victim}: rolled in {rolled:.1f} s, {count} connections through "
          f"HAProxy meanwhile ({int(after['stot']) - int(before['stot'])} to {victim}), "
          f"none refused")  # fmt: skip
