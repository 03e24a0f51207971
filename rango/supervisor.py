"""The supervisor of ``rango --workers N``: spawn, watch, restart, signal, drain.

Each worker is a separate process (``python -m workers.worker``, started as
:mod:`rango.contract` says) that binds the
websocket port with ``SO_REUSEPORT`` and consumes its own exclusive queue, so
every worker sees every event and the kernel spreads connections among them.
The supervisor holds no client connection and routes nothing: it restarts
workers that die, drains them on SIGTERM/SIGINT, rolls them on SIGHUP, and
serves the aggregated metrics of all workers on the metrics port.

Signals:

SIGTERM, SIGINT
    Graceful stop: each worker stops accepting, closes its clients with 1001
    and deletes its queue; workers still alive after the shutdown timeout are
    killed. A second signal kills at once.
SIGHUP
    Rolling restart, one worker at a time: start the new worker, wait until it
    listens and consumes, then drain the old one. Connections are never
    refused and events never lack a consumer. Use it to roll out new code, a
    new key file (``--pubKey``) or new settings: the file of ``RANGO_ENV_FILE``
    is read again, and the new workers get the same flags and the supervisor's
    environment with that file's values on top. A file or setting that cannot
    be used ends the roll-out before it starts, with one error line, and the old
    workers keep serving.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Coroutine, Mapping
from typing import Any, Protocol

from .config import Config, ConfigError
from .contract import (
    METRICS_LISTENER,
    WS_LISTENER,
    Exit,
    Status,
    cannot_listen,
    config_error,
    parse_statuses,
    run_loop,
    worker_command,
    worker_env,
)
from .forking import Refusal, Template, become_subreaper, trim_heap
from .limits import raise_nofile
from .settings import environment, tcp_migrate_req

__all__ = ["Supervisor"]

log = logging.getLogger("rango.supervisor")

# Restart delays for a worker that keeps dying soon after it starts.
BACKOFF_FIRST = 0.5
BACKOFF_CAP = 15.0
STABLE_AFTER = 10.0  # a worker that lived this long restarts at once
READY_TIMEOUT = 30.0  # a new worker must listen (and consume, if it can) by then
MIGRATE_REQ = "/proc/sys/net/ipv4/tcp_migrate_req"


class Process(Protocol):
    """What the supervisor uses of a worker process: spawned or forked from the template."""

    @property
    def pid(self) -> int: ...

    @property
    def returncode(self) -> int | None: ...

    async def wait(self) -> int: ...

    def send_signal(self, sig: int) -> None: ...


# Settings a rolling restart cannot change: (variable, Config field).
_RESTART_ONLY = (("RANGER_HOST", "ws_host"), ("RANGER_PORT", "ws_port"),
                 ("LOG_FORMAT", "log_format"))  # fmt: skip
# Seconds a rolling restart waits for a new worker to consume before it replaces a
# consuming one: above a failover over a silent node (pika's 5 s stack timeout).
CONSUME_TIMEOUT = 10.0


class Worker:
    """One worker process and what the supervisor knows of it."""

    def __init__(self, index: int, process: Process, status_fd: int) -> None:
        self.index = index
        self.process = process
        self.status_fd = status_fd
        self.started = time.monotonic()
        self.status = "starting"
        self.draining = False
        # Started by a rolling restart and not listening yet: if it dies, the
        # restart keeps the old worker instead of _watch replacing this one.
        self.trial = False
        self.listening = asyncio.get_running_loop().create_future()
        self.ready = asyncio.get_running_loop().create_future()

    @property
    def pid(self) -> int:
        return self.process.pid

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(sig)


class Supervisor:
    """Runs and watches ``workers`` worker processes with the given flags."""

    def __init__(
        self,
        config: Config,
        argv: list[str],
        workers: int,
        env: Mapping[str, str] | None = None,
        args: argparse.Namespace | None = None,
    ) -> None:
        self.config = config
        self.argv = argv
        # The workers' environment: ours with RANGO_ENV_FILE's values on top, as read
        # at start or at the last SIGHUP that rolled out.
        self.env: Mapping[str, str] = dict(os.environ) if env is None else env
        self.args = args  # the flags, to check a SIGHUP's new settings as at start
        self.count = workers
        self.workers: dict[int, Worker] = {}  # by index: the current generation
        self.retired: set[Worker] = set()  # draining after a rolling restart
        self.failures = dict.fromkeys(range(workers), 0)
        self.stopping = False
        self.shutdown_timeout = 15.0
        self.exit_code = 0
        self.directory = tempfile.mkdtemp(prefix="rango-metrics-")
        self.preload = config.preload
        self.template: Template | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._done: asyncio.Event | None = None
        self._rolling: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    # Life cycle.

    async def run(self) -> int:
        """Start the workers and serve until stopped; return the exit status."""
        from .metrics import Exporter, serve_http

        self._loop = asyncio.get_running_loop()
        self._done = asyncio.Event()
        fds = raise_nofile()  # the workers inherit it, and each says what it allows
        reason = _port_taken(self.config.ws_host, self.config.ws_port)
        if reason:
            # Workers bind with SO_REUSEPORT and would silently share the port
            # with another server; refuse here, once, before any worker starts.
            return self._refuse(
                cannot_listen(WS_LISTENER, self.config.ws_host, self.config.ws_port, reason)
            )
        exporter = Exporter(self.directory)
        try:
            http = await serve_http(
                self.config.metrics_host,
                self.config.metrics_port,
                collect=exporter.render,
                ready=exporter.ready,
            )
        except OSError as exc:
            return self._refuse(cannot_listen(
                METRICS_LISTENER, self.config.metrics_host, self.config.metrics_port, exc
            ))
        if self.preload and not become_subreaper():
            log.warning("cannot become a child subreaper (PR_SET_CHILD_SUBREAPER): "
                        "starting each worker as a fresh interpreter (RANGO_PRELOAD=0)")
            self.preload = False
        if self.preload:
            # First, before anything is logged: the template checks the settings the
            # supervisor did not, and a bad one must be the only line printed.
            template = await Template.start(self.argv, self.directory, READY_TIMEOUT, self.env)
            if isinstance(template, Refusal):
                http.close()
                if template.setting:
                    return self._refuse(ConfigError(template.reason))
                shutil.rmtree(self.directory, ignore_errors=True)
                log.error("%s; stopping", template.reason)
                return Exit.CONFIG
            self.template = template
        _enable_listener_migration(self.env)
        for sig, handler in (
            (signal.SIGTERM, self.stop),
            (signal.SIGINT, self.stop),
            (signal.SIGHUP, self.reload),
        ):
            self._loop.add_signal_handler(sig, handler)
        log.info(
            "supervisor %d starting %d workers on %s:%d, metrics on %s:%d",
            os.getpid(), self.count, self.config.ws_host, self.config.ws_port,
            self.config.metrics_host, self.config.metrics_port,
        )  # fmt: skip
        if fds.soft != fds.before:
            log.info("file-descriptor limit %d (raised from %d)", fds.soft, fds.before)
        for index in range(self.count):
            if await self.spawn(index) is None:
                break
        trim_heap()  # what start-up freed (≈0.8 MB): the supervisor lives as long as the server
        await self._done.wait()
        http.close()
        shutil.rmtree(self.directory, ignore_errors=True)
        log.info("supervisor stopped")
        return self.exit_code

    def _refuse(self, error: ConfigError) -> int:
        """Print why a setting cannot be used, clean up, and return Exit.CONFIG."""
        shutil.rmtree(self.directory, ignore_errors=True)
        return config_error(error)

    def stop(self) -> None:
        """SIGTERM/SIGINT: drain every worker; a second signal kills them."""
        if self.stopping:
            log.warning("second stop signal: killing workers")
            for worker in self._all():
                worker.signal(signal.SIGKILL)
            return
        self.stopping = True
        log.info("stopping: draining %d workers", len(self._all()))
        if self._rolling is not None:
            self._rolling.cancel()
        self._track(self._shutdown())

    def reload(self) -> None:
        """SIGHUP: read the settings again, then replace the workers one by one without
        refusing a connection."""
        if self.stopping:
            return
        if self._rolling is not None and not self._rolling.done():
            log.warning("SIGHUP ignored: a rolling restart is already running")
            return
        try:
            env = self._new_environment()
        except ConfigError as exc:
            log.error("SIGHUP: %s; keeping the old workers", exc)
            return
        self._rolling = asyncio.ensure_future(self._rolling_restart(env))

    def _new_environment(self) -> dict[str, str]:
        """The environment for new workers: ours with RANGO_ENV_FILE read again, its
        settings checked as at start (ConfigError if one cannot be used)."""
        env = environment(os.environ)
        if self.args is not None:
            from .cli import supervisor_config

            # The supervisor's own settings here; the rest by the new template (or,
            # without one, all of them here). The supervisor keeps its own ports,
            # worker count and logging until it is restarted.
            new = supervisor_config(self.args, env)
            # New workers on another address than the old (and than the port check
            # at start), or logging in another format than the supervisor: refused.
            moved = [name for name, field in _RESTART_ONLY
                     if getattr(new, field) != getattr(self.config, field)]  # fmt: skip
            if moved:
                raise ConfigError(
                    f"{', '.join(moved)} changed: that takes a restart, not a SIGHUP"
                )
        return env

    # Workers.

    async def spawn(self, index: int) -> Worker | None:
        """Start worker ``index``; it reports its state on a pipe. None if the
        template cannot be renewed (a configuration error: the supervisor stops)."""
        read_fd, write_fd = os.pipe()
        started = time.monotonic()
        try:
            process = await self._start_process(index, write_fd)
        finally:
            os.close(write_fd)
        if process is None:
            os.close(read_fd)
            self.exit_code = Exit.CONFIG
            self.stop()
            return None
        worker = Worker(index, process, read_fd)
        worker.started = started
        self.workers[index] = worker
        os.set_blocking(read_fd, False)
        assert self._loop is not None
        self._loop.add_reader(read_fd, self._on_status, worker)
        self._track(self._watch(worker))
        log.debug("worker %d started (pid %d)", index, worker.pid)
        return worker

    async def _start_process(self, index: int, status_fd: int) -> Process | None:
        """A new process for slot ``index``: forked by the template (renewed if it
        died), or a fresh interpreter."""
        if not self.preload:
            env = worker_env(index, status_fd, self.directory, self.env)
            return await asyncio.create_subprocess_exec(
                *worker_command(self.argv), env=env,
                pass_fds=(status_fd,), stdin=asyncio.subprocess.DEVNULL,
            )  # fmt: skip
        for attempt in (1, 2):
            template = self.template
            if template is not None and template.alive:
                try:
                    return await template.fork(index, status_fd)
                except (OSError, TimeoutError) as exc:
                    log.error("template (pid %d) cannot fork worker %d: %s", template.process.pid,
                              index, exc)  # fmt: skip
                    template.close()
            if attempt == 2:
                break
            log.warning("starting a new worker template")
            renewed = await Template.start(self.argv, self.directory, READY_TIMEOUT, self.env)
            if isinstance(renewed, Refusal):
                log.error("%s; stopping", renewed.reason)
                return None
            self.template = renewed
        return None

    def _on_status(self, worker: Worker) -> None:
        try:
            data = os.read(worker.status_fd, 4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            assert self._loop is not None
            self._loop.remove_reader(worker.status_fd)
            os.close(worker.status_fd)
            return
        for word in parse_statuses(data):
            worker.status = word
            if word in (Status.LISTENING, Status.CONSUMING) and not worker.listening.done():
                worker.listening.set_result(None)
                log.info("worker %d (pid %d) listening after %.3f s", worker.index, worker.pid,
                         time.monotonic() - worker.started)
            if word == Status.CONSUMING and not worker.ready.done():
                worker.ready.set_result(None)

    async def _watch(self, worker: Worker) -> None:
        """Wait for a worker to exit; replace it unless it was asked to go."""
        from prometheus_client.multiprocess import mark_process_dead

        code = await worker.process.wait()
        mark_process_dead(worker.pid, self.directory)
        self.retired.discard(worker)
        current = self.workers.get(worker.index) is worker
        if current:
            del self.workers[worker.index]
        lived = time.monotonic() - worker.started
        how = (
            f"killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"
        )
        if self.stopping or worker.draining:
            log.info("worker %d (pid %d) %s", worker.index, worker.pid, how)
            if self.stopping and not self._all():
                assert self._done is not None
                self._done.set()
            return
        if worker.trial:
            return  # _rolling_restart logs it and keeps the old worker
        if code == Exit.CONFIG and not worker.listening.done():
            # A configuration error (e.g. the port is taken): a new worker
            # would fail the same way, so stop rather than loop.
            log.error("worker %d (pid %d) could not start (%s); stopping", worker.index,
                      worker.pid, how)
            self.exit_code = Exit.CONFIG
            self.stop()
            return
        if lived >= STABLE_AFTER:
            self.failures[worker.index] = 0
        delay = 0.0
        if self.failures[worker.index]:
            delay = min(BACKOFF_FIRST * 2 ** (self.failures[worker.index] - 1), BACKOFF_CAP)
        self.failures[worker.index] += 1
        if current:
            log.error("worker %d (pid %d) %s after %.1f s; restarting in %.1f s",
                      worker.index, worker.pid, how, lived, delay)
        else:
            log.error("worker %d (pid %d) %s after %.1f s while being replaced",
                      worker.index, worker.pid, how, lived)
        await asyncio.sleep(delay)
        await self._reconcile(worker.index)

    async def _reconcile(self, index: int) -> None:
        """Start a worker in slot ``index`` if it has none: the one place that decides it.

        A slot has a worker while its current process runs, including a new
        one a rolling restart is trying out. Called after every unplanned exit
        (after the backoff) and when a rolling restart gives a slot back.
        """
        if not self.stopping and index not in self.workers:
            await self.spawn(index)

    async def _rolling_restart(self, env: Mapping[str, str]) -> None:
        log.info("SIGHUP: rolling restart of %d workers", len(self.workers))
        if self.preload:
            # New code, configuration, keys and certificates are read by a new template;
            # the old one goes (its workers are ours and drain as they are replaced).
            template = await Template.start(self.argv, self.directory, READY_TIMEOUT, env)
            if self.stopping:
                if not isinstance(template, Refusal):
                    template.close()
                return
            if isinstance(template, Refusal):
                what = template.reason if template.setting else f"the new {template.reason}"
                log.error("rolling restart: %s; keeping the old workers", what)
                return
            if self.template is not None:
                self.template.close()
            self.template = template
        self.env = env
        for index in range(self.count):
            old = self.workers.get(index)
            if old is not None:
                # Still tracked while its successor starts: a SIGTERM now must stop it too.
                self.retired.add(old)
            new = await self.spawn(index)
            if new is None:
                return
            new.trial = True
            failure = await self._started(new)
            new.trial = False
            if self.stopping:
                return  # _shutdown stops old and new alike
            if failure is None:
                # Wait for the consumer too, unless RabbitMQ is down anyway.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(new.ready), CONSUME_TIMEOUT)
                if not new.ready.done() and old is not None and old.status == Status.CONSUMING:
                    # Broker settings that parse but reach no broker (a new password or
                    # host from RANGO_ENV_FILE) would otherwise replace every consuming
                    # worker by one that consumes nothing.
                    failure = (f"does not consume from RabbitMQ within {CONSUME_TIMEOUT:.0f} s "
                               "while the old one does")
            if failure is not None:
                log.error("rolling restart: worker %d (pid %d) %s; keeping the old one",
                          index, new.pid, failure)
                new.draining = True
                new.signal(signal.SIGKILL)
                if self.workers.get(index) is new:
                    del self.workers[index]
                if old is not None and old.process.returncode is None:
                    self.retired.discard(old)
                    self.workers[index] = old
                # The old one may have died meanwhile (its own exit found the
                # slot taken by the new one): the slot is refilled as any other.
                await self._reconcile(index)
                return
            if old is not None and old.process.returncode is None:
                old.draining = True
                old.signal(signal.SIGTERM)
        trim_heap()
        log.info("rolling restart done")

    async def _started(self, worker: Worker) -> str | None:
        """Wait until a new worker listens; return why it did not, or None if it does."""
        exited = asyncio.ensure_future(worker.process.wait())
        try:
            await asyncio.wait(
                (worker.listening, exited), timeout=READY_TIMEOUT,
                return_when=asyncio.FIRST_COMPLETED,
            )  # fmt: skip
        finally:
            exited.cancel()
        if worker.listening.done():
            return None
        code = worker.process.returncode
        if code is not None:
            return f"exited with status {code} before listening"
        return f"not listening after {READY_TIMEOUT:.0f} s"

    async def _shutdown(self) -> None:
        if self.template is not None:
            self.template.close()
        workers = self._all()
        for worker in workers:
            worker.draining = True
            worker.signal(signal.SIGTERM)
        if not workers:
            assert self._done is not None
            self._done.set()
            return
        await asyncio.sleep(self.shutdown_timeout)
        for worker in self._all():
            log.warning("worker %d (pid %d) still running after %.0f s: killing",
                        worker.index, worker.pid, self.shutdown_timeout)
            worker.signal(signal.SIGKILL)

    def _all(self) -> list[Worker]:
        return [*self.workers.values(), *self.retired]

    def _track(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _port_taken(host: str, port: int) -> str:
    """Why ``host:port`` cannot be listened on (another server holds it), or ``""``."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return exc.strerror or str(exc)
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            return os.strerror(exc.errno) if exc.errno else str(exc)
    return ""


def _enable_listener_migration(env: Mapping[str, str]) -> None:
    """Let a closing ``SO_REUSEPORT`` listener hand its queued connections to the others.

    Without ``net.ipv4.tcp_migrate_req`` (Linux ≥ 5.14, per network namespace),
    connections waiting in a draining worker's accept queue are reset when it
    stops listening. Set ``RANGO_TCP_MIGRATE_REQ=0`` to leave the sysctl alone.
    """
    if not tcp_migrate_req(env):  # the environment with RANGO_ENV_FILE's values
        return
    try:
        with open(MIGRATE_REQ) as f:
            if f.read().strip() == "1":
                return
        with open(MIGRATE_REQ, "w") as f:
            f.write("1")
        log.info("enabled net.ipv4.tcp_migrate_req: draining workers hand over queued "
                 "connections")
    except OSError as exc:
        log.warning("cannot enable net.ipv4.tcp_migrate_req (%s): a restart may reset "
                    "connections queued at the instant a worker stops listening", exc.strerror)


def run(
    config: Config,
    argv: list[str],
    workers: int,
    env: Mapping[str, str] | None = None,
    args: argparse.Namespace | None = None,
) -> int:
    """Run a supervisor on uvloop; return the exit status."""
    return run_loop(Supervisor(config, argv, workers, env, args).run())
