"""``RANGO_PRELOAD=1``: workers forked from a template process (rango/template.py).

Real supervisor, template and workers, real RabbitMQ and clients: the workers are
forked (they carry the supervisor's command line and their own name), re-parented
to the supervisor, and serve events; a worker killed with SIGKILL is replaced by a
new fork; SIGHUP renews the template, so a new key file is used by the new workers;
a key the new template refuses ends that roll-out and keeps the old workers;
SIGHUP reads ``RANGO_ENV_FILE`` again, and a file or value that cannot be used ends
the roll-out with one error line; at start it stops ``rango`` with one line.
"""

from __future__ import annotations

import os
import signal
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import orjson
import pytest
from support.answers import recv_json, subscribed
from support.broker import unique
from support.gateway import Rango, free_port
from support.polling import wait_for
from support.procfs import PPID, cmdline, comm, stat_fields
from support.tokens import KeyPair
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect as sync_connect

PRELOAD = {"RANGO_PRELOAD": "1", "RANGO_WORKERS": "2"}


def parent(pid: int) -> int:
    fields = stat_fields(pid)
    assert fields is not None, pid
    return int(fields[PPID])


def two_workers(rango: Rango, old: list[int] | None = None) -> list[int]:
    def ready() -> list[int] | None:
        pids = [p for p in rango.worker_pids() if p not in (old or [])]
        named = [p for p in pids if comm(p).startswith("rango-worker-")]
        return named if len(named) == 2 and rango.ready() else None

    found: list[int] = wait_for(ready, 20, "two forked workers")
    return found


def test_workers_are_forked_from_the_template_and_serve(rango_factory, publisher_factory):
    rango = rango_factory(env=PRELOAD)
    publisher = publisher_factory(rango.exchange)
    workers = two_workers(rango)
    [template] = rango.template_pids()
    assert comm(template) == "rango-template"
    assert cmdline(template) == cmdline(rango.pid)  # forked from the supervisor
    assert parent(template) == rango.pid
    for pid in workers:
        assert cmdline(pid) == cmdline(rango.pid)  # forked, never a fresh interpreter
        assert parent(pid) == rango.pid  # re-parented to the supervisor (subreaper)
    assert sorted(comm(p) for p in workers) == ["rango-worker-0", "rango-worker-1"]
    stream = f"{unique()}.trades"
    with ExitStack() as stack:
        clients = [stack.enter_context(sync_connect(rango.url(query=f"stream={stream}")))
                   for _ in range(8)]  # fmt: skip
        for ws in clients:
            ws.recv(timeout=5)
        publisher.publish(f"public.{stream}", {"n": 1})
        for ws in clients:
            assert orjson.loads(ws.recv(timeout=5)) == {stream: {"n": 1}}

    # A killed worker is reaped by the supervisor and a new one forked in its slot.
    os.kill(workers[0], signal.SIGKILL)
    wait_for(lambda: "killed by SIGKILL" in rango.log(), 10, "the supervisor to see it")
    survivors = wait_for(
        lambda: [p for p in rango.worker_pids() if p != workers[0]]
        if len(rango.worker_pids()) == 2 and rango.ready() else None,
        20, "the replacement",
    )  # fmt: skip
    assert workers[1] in survivors
    assert rango.template_pids() == [template]
    assert rango.stop() == 0, rango.log()[-3000:]
    assert not rango.worker_pids()


def private(rango: Rango, keys: KeyPair) -> int | None:
    """The status of a /private handshake with a token of ``keys`` (None: accepted)."""
    try:
        with sync_connect(rango.url("/private"), additional_headers=keys.bearer(),
                          open_timeout=5) as ws:  # fmt: skip
            ws.recv(timeout=5)
        return None
    except InvalidStatus as exc:
        return exc.response.status_code


def test_sighup_renews_the_template_with_the_new_key(
    rango_factory, keys: KeyPair, tmp_path: Path, tmp_path_factory: Any
):
    key = tmp_path / "preload-key.pub"
    key.write_bytes(keys.public_pem)
    rango = rango_factory(env=PRELOAD, args=["--pubKey", str(key)])
    old = two_workers(rango)
    [old_template] = rango.template_pids()
    new_keys = KeyPair(tmp_path_factory.mktemp("new-keys"))
    assert private(rango, keys) is None
    assert private(rango, new_keys) == 401

    # A key the new template refuses: no worker is replaced, the old template stays.
    key.write_text("not a key\n")
    rango.send_signal(signal.SIGHUP)
    wait_for(lambda: "keeping the old workers" in rango.log(), 20, "the refused roll-out")
    assert sorted(rango.worker_pids()) == sorted(old)
    assert rango.template_pids() == [old_template]
    assert private(rango, keys) is None

    key.write_bytes(new_keys.public_pem)
    rango.send_signal(signal.SIGHUP)
    wait_for(lambda: "rolling restart done" in rango.log(), 30, "the roll-out")
    two_workers(rango, old)
    wait_for(lambda: not set(old) & set(rango.worker_pids()), 15, "the old workers gone")
    wait_for(lambda: rango.template_pids() not in ([], [old_template]), 10, "a new template")
    assert private(rango, new_keys) is None
    assert private(rango, keys) == 401


@pytest.mark.parametrize("preload", ["0", "1"])
def test_sigterm_stops_every_process(rango_factory, preload):
    rango = rango_factory(env={**PRELOAD, "RANGO_PRELOAD": preload})
    wait_for(lambda: len(rango.worker_pids()) == 2 and rango.ready(), 20, "workers")
    everyone = [*rango.worker_pids(), *rango.template_pids()]
    assert rango.stop() == 0, rango.log()[-3000:]
    for pid in everyone:
        assert stat_fields(pid) is None or stat_fields(pid)[0] == b"Z"  # type: ignore[index]


def first_answer(rango: Rango, streams: list[str]) -> Any:
    """The answer to a connection asking for ``streams`` in its URL."""
    with sync_connect(rango.url(query="stream=" + ",".join(streams)), open_timeout=5) as ws:
        return recv_json(ws)


def too_many(stream: str) -> dict[str, Any]:
    return {"success": {"message": f"cannot subscribe to {stream}: too many subscriptions"}}


def errors_after(rango: Rango, offset: int) -> list[str]:
    return [line for line in rango.log()[offset:].splitlines() if " ERROR " in line]


def test_sighup_reads_the_env_file_again(
    rango_factory, keys: KeyPair, tmp_path: Path, tmp_path_factory: Any
):
    key = tmp_path / "env-key.pub"
    key.write_bytes(keys.public_pem)
    env_file = tmp_path / "rango.env"
    env_file.write_text("# as systemd's EnvironmentFile= has it\n\nRANGO_MAX_SUBSCRIPTIONS = '2'\n")
    started = time.time() - 1  # file times have coarse granularity
    rango = rango_factory(
        env={**PRELOAD, "RANGO_ENV_FILE": str(env_file)}, args=["--pubKey", str(key)]
    )
    old = two_workers(rango)
    [old_template] = rango.template_pids()
    # Its private directory: leftovers of earlier runs may hold a reused pid's files.
    own_dirs = [d for d in template_dirs(old_template) if d.stat().st_mtime >= started]
    assert len(own_dirs) == 1, own_dirs
    streams = [f"{unique()}.s{i}" for i in range(3)]
    assert first_answer(rango, streams) == too_many(streams[2])
    new_keys = KeyPair(tmp_path_factory.mktemp("env-new-keys"))

    # A file the supervisor cannot read (line 2), then a value the new template refuses:
    # each ends its roll-out with one error line naming it; the old workers serve on.
    for text, named in (
        ("RANGO_MAX_SUBSCRIPTIONS=3\nthis line is no setting\n", "RANGO_ENV_FILE"),
        ("RANGO_MAX_SUBSCRIPTIONS=many\n", "RANGO_MAX_SUBSCRIPTIONS"),
        # New workers on another port than the old ones, or logging in another format
        # than the supervisor: a restart's job.
        (f"RANGER_PORT={free_port()}\nLOG_FORMAT=json\n", "RANGER_PORT, LOG_FORMAT changed"),
    ):
        env_file.write_text(text)
        offset = len(rango.log())
        rango.send_signal(signal.SIGHUP)
        wait_for(lambda at=offset: "keeping the old workers" in rango.log()[at:], 20, "refusal")
        [error] = errors_after(rango, offset)
        assert named in error and "keeping the old workers" in error, error
        assert "line 2" in error or named != "RANGO_ENV_FILE", error
        assert "Traceback" not in rango.log()[offset:]
        assert sorted(rango.worker_pids()) == sorted(old)
        assert rango.template_pids() == [old_template]
        assert first_answer(rango, streams) == too_many(streams[2])

    # A new key and a new value: the new workers use both.
    env_file.write_text('RANGO_MAX_SUBSCRIPTIONS="3"\n')
    key.write_bytes(new_keys.public_pem)
    offset = len(rango.log())
    rango.send_signal(signal.SIGHUP)
    wait_for(lambda: "rolling restart done" in rango.log()[offset:], 30, "the roll-out")
    two_workers(rango, old)
    wait_for(lambda: not set(old) & set(rango.worker_pids()), 15, "the old workers gone")
    assert first_answer(rango, streams) == subscribed(streams)
    assert private(rango, new_keys) is None
    assert private(rango, keys) == 401
    assert not errors_after(rango, offset)
    # The old template, ended by SIGTERM, removed its private metrics directory.
    wait_for(lambda: not own_dirs[0].exists(), 10, "the old template's directory gone")


def template_dirs(pid: int) -> list[Path]:
    """The private metrics directories holding files of template ``pid``."""
    return [d for d in Path(tempfile.gettempdir()).glob("rango-template-*")
            if any(d.glob(f"*_{pid}.db"))]  # fmt: skip


@pytest.mark.parametrize(
    ("text", "named"),
    [
        (None, "RANGO_ENV_FILE"),  # no such file
        ("RANGER_PORT\n", "RANGO_ENV_FILE"),
        ("RANGER_PORT=80\\\n", "RANGO_ENV_FILE"),  # systemd's line continuation
        ("JWT_ALGORITHM=HS256\n", "JWT_ALGORITHM"),  # refused by the template
        ("RANGER_PORT=eighty\n", "RANGER_PORT"),  # refused by the supervisor
    ],
    ids=["missing", "not-name-value", "continuation", "template-refuses", "supervisor-refuses"],
)
def test_a_bad_env_file_stops_start_up_with_one_line(
    rango_factory, tmp_path: Path, text: str | None, named: str
):
    env_file = tmp_path / "bad.env"
    if text is not None:
        env_file.write_text(text)
    rango = rango_factory(env={**PRELOAD, "RANGO_ENV_FILE": str(env_file)}, wait=False)
    assert rango.proc is not None
    code = rango.proc.wait(20)
    lines = rango.log().strip().splitlines()
    assert code == 2, lines
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"rango: {named}"), lines


def test_sighup_keeps_consuming_workers_when_the_new_broker_settings_reach_no_broker(
    keys: KeyPair, tmp_path: Path, publisher_factory
):
    """RABBITMQ_PORT changed in RANGO_ENV_FILE to a port nothing listens on: well-formed,
    so the template accepts it, but the first new worker never consumes; the roll-out
    stops there and the consuming old workers stay."""
    env_file = tmp_path / "rango.env"
    env_file.write_text("RABBITMQ_HOST=127.0.0.1\nRABBITMQ_PORT=5672\n")
    rango = Rango(keys, tmp_path, {**PRELOAD, "RANGO_ENV_FILE": str(env_file)})
    flag = rango.args.index("--amqp-addr")
    del rango.args[flag:flag + 2]  # the broker from the file, not the tests' flag
    with rango:
        old = two_workers(rango)
        publisher = publisher_factory(rango.exchange)
        stream = f"{unique()}.trades"
        env_file.write_text(f"RABBITMQ_HOST=127.0.0.1\nRABBITMQ_PORT={free_port()}\n")
        offset = len(rango.log())
        rango.send_signal(signal.SIGHUP)
        wait_for(lambda: "keeping the old one" in rango.log()[offset:], 30, "the stopped roll")
        [error] = errors_after(rango, offset)[-1:]
        assert "does not consume from RabbitMQ" in error, error
        assert sorted(rango.worker_pids()) == sorted(old)
        assert rango.ready()
        with rango.connect(query=f"stream={stream}") as ws:
            assert recv_json(ws) == subscribed([stream])
            publisher.publish(f"public.{stream}", {"n": 1})
            assert recv_json(ws) == {stream: {"n": 1}}
        # Fixed: the next SIGHUP rolls out.
        env_file.write_text("RABBITMQ_HOST=127.0.0.1\nRABBITMQ_PORT=5672\n")
        offset = len(rango.log())
        rango.send_signal(signal.SIGHUP)
        wait_for(lambda: "rolling restart done" in rango.log()[offset:], 30, "the roll-out")
        two_workers(rango, old)
