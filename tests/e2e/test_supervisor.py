"""``rango --workers N`` end to end: real worker processes, real signals, the real broker.

The kernel spreads connections over the workers (SO_REUSEPORT); which worker
holds a client is read from /proc (socket inodes), never assumed.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from support.broker import queues_of, unique
from support.crowd import Client, open_clients, wait_counts
from support.gateway import Rango
from support.metrics import MetricsWatch, gauge_reaches, samples, scrape
from support.polling import async_wait_for, wait_for
from support.procfs import alive, cpu_seconds, socket_owners, worker_index
from websockets.sync.client import connect as sync_connect

TWO = {"RANGO_WORKERS": "2"}
FDS = "rango_worker_open_fds"


def two_workers(rango_factory: Any) -> tuple[Rango, list[int]]:
    rango = rango_factory(env=TWO)
    pids = wait_for(lambda: len(rango.worker_pids()) == 2 and rango.worker_pids(), 10, "2 workers")
    return rango, pids


def owners_of(rango: Rango, clients: list[Client], pids: list[int]) -> dict[int, list[Client]]:
    """The clients by the worker pid that holds their server-side socket."""
    owners = socket_owners(rango.port, pids)
    missing = [c.port for c in clients if c.port not in owners]
    assert not missing, f"no worker among {pids} holds the clients on ports {missing[:5]}"
    by_pid: dict[int, list[Client]] = {pid: [] for pid in pids}
    for client in clients:
        by_pid[owners[client.port]].append(client)
    return by_pid


async def spread_clients(
    rango: Rango, stream: str, pids: list[int], count: int
) -> dict[int, list[Client]]:
    """At least ``count`` clients, with some on every worker of ``pids`` (bounded)."""
    clients = await open_clients(rango.url(query=f"stream={stream}"), count, stream)
    for _ in range(10):
        by_pid = owners_of(rango, clients, pids)
        if all(by_pid.values()):
            return by_pid
        clients += await open_clients(rango.url(query=f"stream={stream}"), count, stream)
    raise AssertionError(f"{len(clients)} connections never reached every worker: {by_pid}")


async def publish_numbers(
    publisher: Any, key: str, numbers: range, at: dict[int, Any] | None = None
) -> None:
    """Publish ``{"n": n}`` paced a little, running ``at[n]()`` right after ``n``."""
    for n in numbers:
        publisher.publish(key, {"n": n})
        if at and n in at:
            at[n]()
        await asyncio.sleep(0.005)


def test_connections_spread_over_workers_and_all_get_every_event(rango_factory, publisher_factory):
    rango, pids = two_workers(rango_factory)
    publisher = publisher_factory(rango.exchange)
    market = unique()
    stream = f"{market}.trades"

    async def scenario() -> None:
        clients = await open_clients(rango.url(query=f"stream={stream}"), 200, stream)
        by_pid = owners_of(rango, clients, pids)
        counts = {pid: len(group) for pid, group in by_pid.items()}
        # 200 connections hashed over 2 listeners: far from all on one.
        assert all(count >= 20 for count in counts.values()), counts
        await gauge_reaches(rango.metrics_port, 200)

        await publish_numbers(publisher, f"public.{stream}", range(5))
        await wait_counts(clients, 5)
        for client in clients:
            assert client.numbers == [0, 1, 2, 3, 4], (client.port, client.numbers)
            assert not client.closed.done()

        await asyncio.gather(*(c.close() for c in clients))
        await gauge_reaches(rango.metrics_port, 0)

    with MetricsWatch(rango.metrics_port, 2) as watch:
        asyncio.run(scenario())
    watch.check()


def test_kill_9_of_a_worker(rango_factory, publisher_factory):
    rango, pids = two_workers(rango_factory)
    publisher = publisher_factory(rango.exchange)
    stream = f"{unique()}.trades"
    key = f"public.{stream}"

    async def scenario() -> None:
        by_pid = await spread_clients(rango, stream, pids, 40)
        victim, survivor = pids
        victims, survivors = by_pid[victim], by_pid[survivor]
        victim_index = worker_index(victim)
        await gauge_reaches(rango.metrics_port, len(victims) + len(survivors))

        total = 60
        await publish_numbers(
            publisher, key, range(total), at={20: lambda: os.kill(victim, signal.SIGKILL)}
        )
        # The victim's clients are cut (no close frame: 1006), the others miss nothing.
        await asyncio.wait_for(asyncio.gather(*(c.closed for c in victims)), 10)
        for client in victims:
            assert client.closed.result() == 1006, client.closed.result()
        await wait_counts(survivors, total)
        for client in survivors:
            assert client.numbers == list(range(total)), (client.port, client.numbers)
            assert not client.closed.done()

        # The dead worker leaves the sums by the first scrape after it is reaped.
        await async_wait_for(lambda: victim not in rango.worker_pids(), 10, "victim reaped")
        metrics = scrape(rango.metrics_port)
        assert samples(metrics, "rango_hub_clients_count") == [({}, len(survivors))], metrics

        # A replacement appears, consumes, and serves new connections.
        new = await async_wait_for(
            lambda: [p for p in rango.worker_pids() if p not in pids], 15, "a new worker"
        )
        assert len(new) == 1 and worker_index(new[0]) == victim_index, new
        assert sorted(rango.worker_pids()) == sorted([survivor, new[0]])
        await async_wait_for(rango.ready, 15, "ready with the new worker")
        on_new: list[Client] = []
        extra: list[Client] = []
        for _ in range(100):
            (client,) = await open_clients(rango.url(query=f"stream={stream}"), 1, stream)
            owner = socket_owners(rango.port, [survivor, new[0]]).get(client.port)
            assert owner in (survivor, new[0]), owner
            (on_new if owner == new[0] else extra).append(client)
            if len(on_new) == 3:
                break
        assert len(on_new) == 3, f"no connection reached the new worker in {len(extra)} tries"
        open_now = survivors + on_new + extra
        await gauge_reaches(rango.metrics_port, len(open_now))
        publisher.publish(key, {"n": total})
        await wait_counts(on_new + extra, 1)
        await wait_counts(survivors, 1 + total)
        assert all(c.numbers == [total] for c in on_new + extra)
        assert all(c.numbers == list(range(total + 1)) for c in survivors)

        metrics = scrape(rango.metrics_port)
        workers = {labels["worker"] for labels, _ in samples(metrics, "rango_amqp_connected")}
        assert workers == {"0", "1"}, metrics
        await asyncio.gather(*(c.close() for c in open_now))
        await gauge_reaches(rango.metrics_port, 0)

    with MetricsWatch(rango.metrics_port, 2) as watch:
        asyncio.run(scenario())
    watch.check()


def test_sigterm_drains_everything(rango_factory):
    rango, pids = two_workers(rango_factory)
    stream = f"{unique()}.trades"
    queues = wait_for(lambda: all(queues_of(*pids).values()) and queues_of(*pids), 10, "2 queues")
    assert all(len(names) == 1 for names in queues.values()), queues

    async def scenario(watch: MetricsWatch) -> None:
        by_pid = await spread_clients(rango, stream, pids, 20)
        clients = [c for group in by_pid.values() for c in group]
        # The watch has seen the workers up before the drain it watches (a drain of
        # forked workers can be over in less than its few scrapes).
        await async_wait_for(lambda: watch.scrapes >= 3, 10, "three scrapes")
        rango.send_signal(signal.SIGTERM)
        codes = await asyncio.wait_for(asyncio.gather(*(c.closed for c in clients)), 15)
        assert set(codes) == {1001}, codes

    with MetricsWatch(rango.metrics_port, 2) as watch:
        asyncio.run(scenario(watch))
        assert rango.proc is not None
        assert rango.proc.wait(20) == 0, rango.log()[-3000:]
    watch.check()
    assert not [pid for pid in pids if alive(pid)]
    assert queues_of(*pids) == {pid: [] for pid in pids}
    assert "killing" not in rango.log()


@pytest.mark.parametrize("workers", [1, 2])
def test_sighup_rolls_workers_without_refusing_or_losing(rango_factory, publisher_factory, workers):
    rango = rango_factory(env={"RANGO_WORKERS": str(workers)})
    pids = wait_for(lambda: len(rango.worker_pids()) == workers and rango.worker_pids(), 10, "pids")
    publisher = publisher_factory(rango.exchange)
    stream = f"{unique()}.trades"
    key = f"public.{stream}"
    by_index = {worker_index(pid): pid for pid in pids}  # index 0 is replaced first
    connects = {"ok": 0, "failed": 0}
    failures: list[str] = []
    done = threading.Event()

    def connect_loop() -> None:
        deadline = time.monotonic() + 60
        while not done.is_set() and time.monotonic() < deadline:
            try:
                with sync_connect(rango.url(), open_timeout=2, close_timeout=2):
                    pass
                connects["ok"] += 1
            except Exception as exc:
                connects["failed"] += 1
                failures.append(repr(exc))

    def restarted() -> bool:
        now = rango.worker_pids()
        return len(now) == workers and not set(now) & set(pids)

    async def scenario() -> None:
        by_pid = await spread_clients(rango, stream, pids, 20)
        old_clients = [c for group in by_pid.values() for c in group]
        connector = threading.Thread(target=connect_loop, daemon=True)
        connector.start()
        await async_wait_for(lambda: connects["ok"] >= 5, 10, "connect loop running")

        published = 0
        rango.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 40
        while True:
            publisher.publish(key, {"n": published})
            published += 1
            if restarted():
                break
            assert time.monotonic() < deadline, f"restart not done: {rango.worker_pids()}"
            await asyncio.sleep(0.01)
        done.set()
        await asyncio.to_thread(connector.join, 10)

        codes = await asyncio.wait_for(asyncio.gather(*(c.closed for c in old_clients)), 15)
        assert set(codes) == {1001}, codes
        for client in old_clients:
            # Every number from the first on, in order, up to its own worker's drain.
            assert client.numbers == list(range(len(client.numbers))), client.numbers
        if workers == 2:
            # Worker 1 kept receiving while worker 0 drained and was replaced: it is
            # told to drain only once worker 0's successor consumes.
            drained_0_at = max(len(c.numbers) for c in by_pid[by_index["0"]])
            for client in by_pid[by_index["1"]]:
                assert len(client.numbers) > drained_0_at, (drained_0_at, client.numbers[-3:])

        new_pids = rango.worker_pids()
        assert sorted(worker_index(p) for p in new_pids) == [str(i) for i in range(workers)]
        await async_wait_for(rango.ready, 10, "ready after the restart")
        await gauge_reaches(rango.metrics_port, 0)
        by_pid = await spread_clients(rango, stream, new_pids, 10)
        clients = [c for group in by_pid.values() for c in group]
        await gauge_reaches(rango.metrics_port, len(clients))
        publisher.publish(key, {"n": 0})
        await wait_counts(clients, 1)
        assert all(c.numbers == [0] for c in clients)
        await asyncio.gather(*(c.close() for c in clients))

    with MetricsWatch(rango.metrics_port, workers) as watch:
        asyncio.run(scenario())
    watch.check()
    assert connects["failed"] == 0, (connects, failures[:5])
    assert connects["ok"] >= 20, connects
    assert queues_of(*pids) == {pid: [] for pid in pids}
    assert "rolling restart done" in rango.log()


def test_sigterm_during_sighup_stops_old_and_new_workers(rango_factory):
    rango, pids = two_workers(rango_factory)
    stream = f"{unique()}.trades"

    async def scenario() -> list[int]:
        by_pid = await spread_clients(rango, stream, pids, 10)
        clients = [c for group in by_pid.values() for c in group]
        rango.send_signal(signal.SIGHUP)
        # Stop while the first new worker starts: old and new are running.
        spawned = await async_wait_for(
            lambda: [p for p in rango.worker_pids() if p not in pids], 10, "a new worker"
        )
        rango.send_signal(signal.SIGTERM)
        codes = await asyncio.wait_for(asyncio.gather(*(c.closed for c in clients)), 15)
        assert set(codes) == {1001}, codes
        return spawned

    spawned = asyncio.run(scenario())
    assert rango.proc is not None
    assert rango.proc.wait(20) == 0, rango.log()[-3000:]
    left = [pid for pid in [*pids, *spawned] if alive(pid)]
    assert not left, f"workers left running: {left}"
    assert queues_of(*pids) == {pid: [] for pid in pids}


def exits_2_on_a_taken_port(
    rango_factory: Any, tmp_path: Path, variable: str
) -> tuple[Rango, int, Path]:
    """Two workers with ``variable`` naming a port that is bound and listening already;
    the gateway exits with status 2. Returns it, the port and its TMPDIR (where the
    supervisor's metrics directory goes)."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    with socket.socket() as blocker:  # no SO_REUSEPORT: nobody else may bind it
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        env = {**TWO, variable: str(port), "TMPDIR": str(scratch)}
        rango = rango_factory(env=env, wait=False)
        assert rango.proc is not None
        assert rango.proc.wait(20) == 2
    return rango, port, scratch


def test_port_taken_exits_2_without_restart_loop(rango_factory, tmp_path):
    rango, port, scratch = exits_2_on_a_taken_port(rango_factory, tmp_path, "RANGER_PORT")
    assert list(scratch.iterdir()) == []
    log = rango.log()
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in log, log
    assert "restarting in" not in log, log
    # Refused once by the supervisor, before any worker starts.
    assert log.count("cannot listen on") == 1, log
    assert not re.findall(r"worker \d started", log), log


def test_metrics_port_taken_exits_2_at_once(rango_factory, tmp_path):
    rango, port, scratch = exits_2_on_a_taken_port(rango_factory, tmp_path, "RANGO_METRICS_PORT")
    log = rango.log()
    assert log.strip() == (
        f"rango: RANGO_METRICS_PORT: cannot listen on 127.0.0.1:{port}: Address already in use"
    ), log
    assert list(scratch.iterdir()) == []


# The restart delay: the real supervisor, with its cap lowered so the test sees it.
CAPPED = (
    "import sys, rango.supervisor as s; s.BACKOFF_CAP = 1.0; "
    "from rango.cli import main; sys.exit(main())"
)


def test_worker_dying_at_start_is_restarted_with_capped_backoff(keys, tmp_path):
    rango = Rango(keys, tmp_path)
    rango.command = [sys.executable, "-c", CAPPED]
    rango.start(wait=False)
    try:
        seen: list[int] = []
        gaps = []
        cpu_before = None
        killed_at = 0.0
        for _ in range(5):
            pid = wait_for(
                lambda: [p for p in rango.worker_pids() if p not in seen], 10, "a new worker"
            )[0]
            if seen:
                gaps.append(time.monotonic() - killed_at)
            else:
                cpu_before = cpu_seconds(rango.pid), time.monotonic()
            seen.append(pid)
            os.kill(pid, signal.SIGKILL)
            killed_at = time.monotonic()
        wait_for(lambda: len(re.findall("restarting in", rango.log())) == 5, 10, "5 restarts")
        assert cpu_before is not None
        cpu = cpu_seconds(rango.pid) - cpu_before[0]
        wall = time.monotonic() - cpu_before[1]
        delays = [float(d) for d in re.findall(r"restarting in ([\d.]+) s", rango.log())]
        assert delays == [0.0, 0.5, 1.0, 1.0, 1.0], delays
        for gap, delay in zip(gaps, delays, strict=False):
            assert gap >= delay * 0.9, (gaps, delays)
        assert cpu < 0.5 * wall, f"supervisor used {cpu:.2f} s CPU in {wall:.2f} s"
        sixth = wait_for(
            lambda: [p for p in rango.worker_pids() if p not in seen], 10, "a sixth worker"
        )
        assert rango.worker_pids() == sixth
    finally:
        code = rango.stop()
    assert code == 0, rango.log()[-3000:]


def test_rolling_restart_keeps_the_old_worker_when_the_new_one_cannot_start(
    rango_factory, keys, tmp_path, publisher_factory
):
    """A SIGHUP whose new worker exits before listening (here: a broken key file)
    gives up at once and keeps the old worker serving; a later SIGHUP can succeed."""
    key = tmp_path / "rolling-key.pub"
    key.write_bytes(keys.public_pem)
    rango = rango_factory(args=["--pubKey", str(key)])
    publisher = publisher_factory(rango.exchange)
    [old] = wait_for(lambda: rango.worker_pids(), 10, "the worker")
    stream = f"{unique()}.trades"
    with sync_connect(rango.url(query=f"stream={stream}")) as ws:
        assert orjson.loads(ws.recv(timeout=5))["success"]["streams"] == [stream]
        key.write_text("not a key\n")
        rango.send_signal(signal.SIGHUP)
        # Well before READY_TIMEOUT (30 s): the failure is noticed when the worker exits.
        # Refused by the new template (RANGO_PRELOAD=1), in one line naming the setting,
        # or by the new worker.
        wait_for(lambda: "keeping the old" in rango.log(), 10, "the failed restart")
        assert re.search("exited with status 2 before listening|"
                         "--pubKey .*: not a PEM public key .*; keeping the old workers",
                         rango.log()), rango.log()[-2000:]  # fmt: skip
        wait_for(lambda: rango.worker_pids() == [old], 10, "only the old worker")
        publisher.publish(f"public.{stream}", {"n": 1})
        assert ws.recv(timeout=5) == f'{{"{stream}":{{"n":1}}}}'
    assert not rango.exited()
    assert rango.ready()

    key.write_bytes(keys.public_pem)
    rango.send_signal(signal.SIGHUP)
    wait_for(lambda: "rolling restart done" in rango.log(), 30, "the second restart")
    wait_for(lambda: old not in rango.worker_pids() and len(rango.worker_pids()) == 1, 15, "new")
    with sync_connect(rango.url(query=f"stream={stream}")) as ws:
        ws.recv(timeout=5)
        publisher.publish(f"public.{stream}", {"n": 2})
        assert ws.recv(timeout=5) == f'{{"{stream}":{{"n":2}}}}'


def test_a_draining_worker_stays_in_the_process_sums(rango_factory):
    """During a rolling restart the old worker drains beside its successor: both are
    counted in ``process_*`` and in their index's breakdown until the old one exits.

    Silent clients (they never answer the close frame) keep the old worker draining
    for its whole drain timeout, so the moment is seconds long, not a race.
    """
    from support.procfs import open_fds
    from support.wire import RawClient

    rango = rango_factory(env={"RANGO_WORKERS": "1"})
    old = wait_for(lambda: rango.worker_pids(), 10, "a worker")[0]
    wait_for(rango.ready, 10, "ready")
    silent = [RawClient(rango.port) for _ in range(40)]
    try:
        assert {c.status for c in silent} == {101}
        rango.send_signal(signal.SIGHUP)
        # The old worker drains once its successor listens.
        wait_for(lambda: "worker 0 draining" in rango.log(), 20, "the old worker draining")
        new = next(p for p in rango.worker_pids() if p != old)
        assert alive(old)
        metrics = scrape(rango.metrics_port)
        both = open_fds(old) + open_fds(new)
        assert alive(old), "the old worker exited during the scrape: drain too short"
        index_0 = [v for labels, v in samples(metrics, "rango_worker_open_fds")
                   if labels["worker"] == "0"]  # fmt: skip
        assert index_0 and index_0[0] >= both - 5, (index_0, open_fds(old), open_fds(new))
        for name in (FDS, "rango_worker_max_fds", "rango_worker_resident_memory_bytes"):
            labels = [labels["worker"] for labels, _ in samples(metrics, name)]
            assert len(labels) == len(set(labels)), (name, labels)  # one sample per index
        assert open_fds(old) > 40  # the silent clients: the old worker is what is counted
    finally:
        for client in silent:
            client.sock.close()
    wait_for(lambda: not alive(old), 15, "the old worker gone")
    metrics = scrape(rango.metrics_port)
    after = [v for labels, v in samples(metrics, FDS) if labels["worker"] == "0"]
    assert after and after[0] < 40, after
