#!/usr/bin/env python3
"""Benchmarks of Rango's fast path: one JSON line per run on stdout.

    python bench/run.py fanout --clients 1000 --search
    python bench/run.py fanout --clients 1000 --rate 200 --events 2000
    python bench/run.py latency --clients 1000 --rate 100 --seconds 20
    python bench/run.py idle-memory --connections 10000
    python bench/run.py connect-rate --workers 2 --seconds 5
    python bench/run.py burst --readers 100 --events 10000

Each run starts its own server (``python -m rango.cli --workers 1`` unless told
otherwise) on free ports with its own exchange and a dev key pair in bench/out/,
waits for ``/ready``, drives it with the C load client (bench/loadclient.c) and
the C AMQP publisher (bench/amqppub.c), both compiled into bench/out/ when
missing or older than their source, and stops it with SIGTERM. CPU seconds of
the server's process tree, RabbitMQ (beam.smp), the load client and the
publisher come from /proc/<pid>/stat deltas and wait4() rusage. See
bench/README.md for what each number means.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import resource
import secrets
import select
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO / "tests"))  # tests/support: /proc readers, the gateway launcher

from support import procfs  # noqa: E402
from support.gateway import RANGO_COMMAND, Gateway, accepts, rango_args  # noqa: E402
from support.metrics import parse_metrics  # noqa: E402
from support.tokens import KeyPair  # noqa: E402

OUT = BENCH / "out"
LOGS = OUT / "logs"
NOFILE = 1 << 17
BODY_SIZE = 100


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# Building the C tools.


# Libraries a tool links with (the load client's --tls is OpenSSL's).
LIBS = {"loadclient": ["-lssl", "-lcrypto"]}


def build(name: str) -> Path:
    """Compile bench/<name>.c into bench/out/<name> when missing or older than the source."""
    source = BENCH / f"{name}.c"
    binary = OUT / name
    OUT.mkdir(exist_ok=True)
    if not binary.exists() or binary.stat().st_mtime < source.stat().st_mtime:
        cc = os.environ.get("CC", "cc")
        log(f"compiling {source.name}")
        subprocess.run(
            [cc, "-O2", "-Wall", "-o", str(binary), str(source), *LIBS.get(name, [])], check=True
        )
    return binary


# /proc helpers (tests/support/procfs.py); soak.py reads these two through this module.

loadavg = procfs.loadavg


def rss_bytes(pid: int) -> int:
    """Resident memory of ``pid``; 0 once it is gone."""
    return procfs.rss_bytes(pid, default=0)


def git_sha() -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return None
    sha = out.stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    return sha + ("-dirty" if dirty else "")


def source_digest() -> str:
    """A short digest of the server's source (rango/, workers/): the tree may be dirty."""
    import hashlib

    digest = hashlib.sha1()
    for folder in ("rango", "workers"):
        for path in sorted((REPO / folder).glob("*.py")):
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:10]


class CpuMeter:
    """CPU seconds of the server tree, RabbitMQ and the load client over a window.

    ``machine`` is the busy time of all cores, ``other`` what processes outside the
    benchmark used meanwhile, ``cpu_pressure_pct`` the share of the window in which
    some task waited for a CPU (PSI): how contended the machine was.
    """

    def __init__(self, server_root: int | None, client_pids: list[int]) -> None:
        self.server_root = server_root
        self.client_pids = client_pids
        self.beam = procfs.pids_named("beam.smp")
        self.extra: dict[str, float] = {}
        self.start = self._snapshot()
        self.detail0 = self._server_detail
        self.sched0 = self._sched
        self.machine0 = procfs.machine_busy_ticks()
        self.pressure0 = procfs.cpu_pressure_us()
        self.t0 = time.monotonic()
        self.end: dict[str, dict[int, int]] | None = None

    def _snapshot(self) -> dict[str, dict[int, int]]:
        server = procfs.descendants(self.server_root) if self.server_root else []
        self._server_detail = {
            pid: (procfs.user_system_ticks(pid), procfs.io_counters(pid)) for pid in server
        }
        self._sched = {
            "server": {pid: procfs.schedstat(pid) for pid in server},
            "client": {pid: procfs.schedstat(pid) for pid in self.client_pids},
        }
        return {
            "server": {pid: procfs.cpu_ticks(pid) for pid in server},
            "rabbitmq": {pid: procfs.cpu_ticks(pid) for pid in self.beam},
            "client": {pid: procfs.cpu_ticks(pid) for pid in self.client_pids},
        }

    def add(self, name: str, seconds: float) -> None:
        """CPU of a process that lived inside the window (e.g. the publisher, from wait4)."""
        self.extra[name] = self.extra.get(name, 0.0) + seconds

    def server_io(self) -> dict[str, int]:
        """write()-family syscalls and bytes of the server tree in the window.

        From /proc/<pid>/io: uvloop writes sockets with write()/writev(), which
        are counted; recv()/send() (pika's socket) are not.
        """
        names = {"syscw": "write_syscalls", "wchar": "bytes_written"}
        totals: dict[str, int] = {}
        for pid, (_, io) in self.detail1.items():
            before = self.detail0.get(pid, ((0, 0), {}))[1]
            for name, label in names.items():
                if name in io:
                    totals[label] = totals.get(label, 0) + io[name] - before.get(name, 0)
        return totals

    def stop(self) -> dict[str, float]:
        self.end = self._snapshot()
        self.detail1 = self._server_detail
        self.sched1 = self._sched
        self.seconds = time.monotonic() - self.t0
        result = {}
        for name, after in self.end.items():
            before = self.start[name]
            ticks = sum(max(0, t - before.get(pid, 0)) for pid, t in after.items())
            result[name] = round(ticks / procfs.CLK_TCK, 2)
        for name, seconds in self.extra.items():
            result[name] = round(seconds, 2)
        ours = sum(result.values())
        user = system = 0
        for pid, ((u, sy), _) in self.detail1.items():
            (u0, s0), _ = self.detail0.get(pid, ((0, 0), {}))
            user, system = user + u - u0, system + sy - s0
        result["server_user"] = round(user / procfs.CLK_TCK, 2)
        result["server_system"] = round(system / procfs.CLK_TCK, 2)
        machine = (procfs.machine_busy_ticks() - self.machine0) / procfs.CLK_TCK
        result["machine"] = round(machine, 2)
        result["other"] = round(max(0.0, machine - ours), 2)
        pressure = procfs.cpu_pressure_us()
        if pressure is not None and self.pressure0 is not None and self.seconds > 0:
            result["cpu_pressure_pct"] = round((pressure - self.pressure0) / 1e4 / self.seconds, 1)
        # Time runnable but waiting for a CPU: high means the process was starved by
        # the rest of the machine rather than idle.
        for name in ("server", "client"):
            wait = sum(
                max(0, w - self.sched0[name].get(pid, (0, 0))[1])
                for pid, (_, w) in self.sched1[name].items()
            )
            result[f"{name}_runqueue_wait"] = round(wait / 1e9, 2)
        result["window_seconds"] = round(self.seconds, 3)
        return result


# Processes.


def _raise_nofile() -> None:
    """preexec_fn: a high RLIMIT_NOFILE for the server (root may raise the hard limit)."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, max(hard, NOFILE)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def wait_rusage(proc: subprocess.Popen[Any], timeout: float | None = None) -> float:
    """Wait for a child; return its user+system CPU seconds (wait4)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG if deadline else 0)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return usage.ru_utime + usage.ru_stime
        if deadline is not None and time.monotonic() > deadline:
            raise subprocess.TimeoutExpired(proc.args, timeout or 0)
        time.sleep(0.02)


def ensure_keys() -> Path:
    """A dev RSA key pair in bench/out/ (the clients are anonymous: only the public key is used)."""
    public = OUT / "rsa-key.pub"
    if not public.exists():
        OUT.mkdir(exist_ok=True)
        KeyPair(OUT)  # rsa-key (mode 0600) and rsa-key.pub
    return public


def ensure_certificate() -> tuple[Path, Path]:
    """A self-signed ECDSA P-256 certificate for 127.0.0.1 in bench/out/ (``--tls``):
    the key type of most public certificates now, and a cheap one to sign with."""
    cert, key = OUT / "tls-cert.pem", OUT / "tls-key.pem"
    if not cert.exists() or not key.exists():
        OUT.mkdir(exist_ok=True)
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "3650",
             "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
            check=True, capture_output=True,
        )  # fmt: skip
    return cert, key


class Target:
    """A server command line to benchmark; ``rango`` is this checkout."""

    def __init__(self, spec: str) -> None:
        label, sep, command = spec.partition("=")
        if not sep:
            label, command = spec.split()[0].rsplit("/", 1)[-1], spec
        if spec == "rango":
            label, command = "rango", ""
        self.label = label
        self.command = command

    def argv(self, ctx: dict[str, Any]) -> list[str]:
        if not self.command:
            return [
                *RANGO_COMMAND, "--workers", str(ctx["workers"]),
                *rango_args(ctx["pubkey"], ctx["exchange"], ctx["amqp_url"]),
            ]  # fmt: skip
        return shlex.split(self.command.format(**ctx))


class Server(Gateway):
    """One server process tree on free ports with its own exchange: ``target``'s command,
    with ``RLIMIT_NOFILE`` raised, its output in bench/out/logs/."""

    def __init__(
        self,
        args: argparse.Namespace,
        target: Target,
        bench: str,
        workers: int | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.args = args
        self.target = target
        self.workers = workers or args.workers
        LOGS.mkdir(parents=True, exist_ok=True)
        own = {"RANGO_WORKERS": str(self.workers), "LOG_LEVEL": args.log_level}
        cert, key = ensure_certificate() if getattr(args, "tls", False) else ("", "")
        if cert:
            own.update(RANGO_TLS_CERTFILE=str(cert), RANGO_TLS_KEYFILE=str(key))
        given = dict(item.split("=", 1) for item in getattr(args, "server_env", None) or [])
        super().__init__(LOGS, f"{bench}-{target.label}", {**own, **given, **(env or {})})
        self.exchange = f"rango.bench.{bench}.{secrets.token_hex(4)}"
        self.ctx = {
            "port": self.port, "metrics_port": self.metrics_port, "exchange": self.exchange,
            "pubkey": str(ensure_keys()), "amqp_url": args.amqp_url, "workers": self.workers,
            "certfile": str(cert), "keyfile": str(key),
        }  # fmt: skip
        self._tcp_since: float | None = None

    def argv(self) -> list[str]:
        return self.target.argv(self.ctx)

    def start(self, wait: bool = True, timeout: float = 60.0, **popen: Any) -> Server:
        return super().start(
            wait, timeout, stdin=subprocess.DEVNULL, preexec_fn=_raise_nofile, **popen
        )

    def worker_pids(self) -> list[int]:
        return [pid for pid in procfs.descendants(self.pid) if pid != self.pid] or [self.pid]

    def ready(self) -> bool:
        """/ready == 200 on the metrics port; for a target without it, the ws port + 2 s."""
        try:
            return self.http("/ready")[0] == 200
        except OSError:
            if not self.target.command or not accepts(self.port):
                return False
            self._tcp_since = self._tcp_since or time.monotonic()
            return time.monotonic() - self._tcp_since > 2.0

    def metrics(self) -> dict[str, float]:
        """Rango's counters summed over labels (``{}`` for a target without them)."""
        try:
            status, text = self.http("/metrics")
            samples = parse_metrics(text) if status == 200 else {}
        except (OSError, ValueError):
            return {}
        totals: dict[str, float] = {}
        for key, value in samples.items():
            if key.startswith("rango_"):
                name = key.partition("{")[0]
                totals[name] = totals.get(name, 0.0) + value
        return totals

    def rss(self) -> dict[str, int]:
        per = {pid: rss_bytes(pid) for pid in procfs.descendants(self.pid)}
        return {
            "total": sum(per.values()),
            "supervisor": per.get(self.pid, 0),
            "workers": sum(v for p, v in per.items() if p != self.pid),
        }

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        """SIGTERM, SIGKILL to the whole tree after 30 s; then the run's exchange goes."""
        code = super().stop(sig, timeout)
        if self.proc is not None:
            delete_exchange(self.args.amqp_url, self.exchange)
        return code


def delete_exchange(url: str, exchange: str) -> None:
    """Non-durable exchanges outlive their users: remove the run's own."""
    try:
        import pika
    except ImportError:
        return
    with contextlib.suppress(Exception):
        conn = pika.BlockingConnection(pika.URLParameters(url))
        try:
            conn.channel().exchange_delete(exchange)
        finally:
            conn.close()


class LoadClient:
    """bench/out/loadclient in subscribe or idle mode, driven over stdin/stdout."""

    def __init__(
        self,
        args: argparse.Namespace,
        server: Server,
        mode: str,
        connections: int,
        streams: list[str],
        inflight: int | None = None,
    ) -> None:
        binary = build("loadclient")
        argv = [str(binary), mode, "--port", str(server.port), "--path", "/public",
                "--connections", str(connections), "--inflight", str(inflight or args.inflight),
                "--ready-timeout", str(args.ready_timeout)]  # fmt: skip
        for stream in streams:
            argv += ["--stream", stream]
        if getattr(args, "send_frames", 0):
            argv += ["--send-frames", str(args.send_frames)]
        if getattr(args, "tls", False):
            argv.append("--tls")
        if getattr(args, "deflate", False):
            # Offered as browsers do; frames with RSV1 are counted, not parsed.
            offer = "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits"
            argv += ["--header", offer]
        self.errors = open(LOGS / f"loadclient-{server.port}.err", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.errors,
            preexec_fn=_raise_nofile,
        )  # fmt: skip
        self._buffer = b""
        self.cpu: float | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _line(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("load client did not answer")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise RuntimeError("load client exited")
                self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return json.loads(line)

    def _command(self, word: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(word.encode() + b"\n")
        self.proc.stdin.flush()

    def wait_ready(self, timeout: float) -> dict[str, Any]:
        return self._line(timeout)

    def report(self) -> dict[str, Any]:
        self._command("report")
        return self._line(30)

    def reset(self) -> None:
        self._command("reset")

    def close(self) -> dict[str, Any] | None:
        final = None
        with contextlib.suppress(Exception):
            self._command("quit")
            final = self._line(30)
        with contextlib.suppress(Exception):
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        try:
            self.cpu = wait_rusage(self.proc, 30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.cpu = wait_rusage(self.proc)
        self.errors.close()
        return final


def publish(
    args: argparse.Namespace,
    server: Server,
    key: str,
    events: int,
    rate: float,
    meter: CpuMeter | None = None,
) -> dict[str, Any]:
    """Run bench/out/amqppub to completion; its CPU goes to ``meter`` as 'publisher'."""
    binary = build("amqppub")
    argv = [str(binary), "--host", args.amqp_host, "--port", str(args.amqp_port),
            "--user", args.amqp_user, "--password", args.amqp_password,
            "--exchange", server.exchange, "--key", key, "--events", str(events),
            "--rate", str(rate), "--size", str(args.size)]  # fmt: skip
    if getattr(args, "book", False):
        argv.append("--book")
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    output = proc.stdout.read()
    cpu = wait_rusage(proc)
    if meter is not None:
        meter.add("publisher", cpu)
    if proc.returncode != 0:
        raise RuntimeError(f"amqppub failed with status {proc.returncode}")
    return json.loads(output)


def wait_frames(client: LoadClient, expected: int, quiet: float, cap: float) -> dict[str, Any]:
    """Poll the client until ``expected`` frames arrived or none came for ``quiet`` seconds."""
    start = time.monotonic()
    last, changed = -1, start
    while True:
        report = client.report()
        now = time.monotonic()
        if report["frames"] >= expected:
            return report
        if report["frames"] != last:
            last, changed = report["frames"], now
        elif now - changed > quiet or now - start > cap:
            return report
        time.sleep(0.05)


def _ms(ns: int) -> float:
    return round(ns / 1e6, 3)


def delivery_results(
    report: dict[str, Any], pub: dict[str, Any], clients: int, events: int
) -> dict[str, Any]:
    """Loss, lag and rates of one publish to ``clients`` subscribers."""
    expected = clients * events
    frames = report["frames"]
    lag = (report["last_frame_ns"] - pub["last_ns"]) / 1e9 if report["last_frame_ns"] else None
    span = (report["last_frame_ns"] - pub["first_ns"]) / 1e9 if report["last_frame_ns"] else None
    return {
        "expected_frames": expected,
        "frames": frames,
        "lost": max(0, expected - frames),
        "lost_pct": round(100.0 * max(0, expected - frames) / expected, 3) if expected else 0,
        "frames_min_per_client": report["frames_min"],
        "frames_max_per_client": report["frames_max"],
        "seq_gaps": report["seq"]["gaps"],
        "seq_missing": report["seq"]["missing"],
        "seq_out_of_order": report["seq"]["out_of_order"],
        "clients_open": report["open"],
        "closed_by_server": report["closed_by_server"],
        "publish_seconds": round(pub["seconds"], 3),
        "publish_acked_seconds": round((pub["close_ok_ns"] - pub["first_ns"]) / 1e9, 3),
        "publish_rate": round(pub["rate"], 1),
        "last_frame_after_last_publish_s": None if lag is None else round(lag, 3),
        "frames_per_s": round(frames / span, 1) if span else None,
        "latency_ms": report["latency_ms"],
    }


def add_server_io(results: dict[str, Any], meter: CpuMeter) -> None:
    """The server's write syscalls in the window, and event frames per write."""
    io = meter.server_io()
    results["server"].update(io)
    if io.get("write_syscalls") and "frames" in results:
        results["server"]["frames_per_write"] = round(results["frames"] / io["write_syscalls"], 2)


def server_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    keys = ("rango_events_received_total", "rango_frames_sent_total",
            "rango_slow_clients_dropped_total", "rango_events_dropped_total")  # fmt: skip
    return {
        k.removeprefix("rango_").removesuffix("_total"): after.get(k, 0) - before.get(k, 0)
        for k in keys
        if k in after
    }


@contextlib.contextmanager
def profiler(args: argparse.Namespace, server: Server, name: str) -> Iterator[None]:
    """``--profile``: py-spy record of the first worker during the measured window."""
    if not args.profile:
        yield
        return
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    pid = server.worker_pids()[0]
    path = OUT / f"profile-{name}-{server.port}.txt"
    proc = subprocess.Popen(
        [spy, "record", "--pid", str(pid), "--format", "raw", "--rate", "200",
         "--output", str(path), "--nonblocking"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    time.sleep(1.0)
    try:
        yield
    finally:
        proc.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(20)
        log(f"py-spy profile of worker {pid}: {path}")


# Benchmarks: each returns (params, results, cpu).

Result = tuple[dict[str, Any], dict[str, Any], dict[str, float]]


def _session(
    args: argparse.Namespace, target: Target, bench: str, clients: int, stream: str
) -> tuple[Server, LoadClient, dict[str, Any]]:
    server = Server(args, target, bench).start()
    client = LoadClient(args, server, "subscribe", clients, [stream])
    try:
        ready = client.wait_ready(args.ready_timeout + 30)
    except Exception:
        client.close()
        server.stop()
        raise
    if ready["open"] < clients:
        log(f"only {ready['open']} of {clients} clients connected ({ready['failed']} failed)")
    return server, client, ready


def _fanout_step(
    args: argparse.Namespace,
    server: Server,
    client: LoadClient,
    clients: int,
    key: str,
    rate: float,
    events: int,
) -> tuple[dict[str, Any], dict[str, float]]:
    client.reset()
    before = server.metrics()
    with profiler(args, server, f"fanout-{int(rate)}"):
        meter = CpuMeter(server.pid, [client.pid])
        pub = publish(args, server, key, events, rate, meter)
        cap = max(30.0, 3.0 * events / max(rate, 1.0))
        report = wait_frames(client, clients * events, args.quiet, cap)
        cpu = meter.stop()
    time.sleep(1.1)  # Rango's counters reach /metrics once a second
    results = delivery_results(report, pub, clients, events)
    lag = results["last_frame_after_last_publish_s"]
    results["rate"] = rate
    results["offered_frames_per_s"] = round(rate * clients, 1)
    results["sustained"] = bool(
        results["lost"] == 0 and results["closed_by_server"] == 0
        and lag is not None and lag <= args.max_lag
    )  # fmt: skip
    results["publisher_behind"] = pub["rate"] < 0.95 * rate
    results["server"] = server_delta(before, server.metrics())
    add_server_io(results, meter)
    if cpu["window_seconds"]:
        results["server_cores"] = round(cpu["server"] / cpu["window_seconds"], 3)
    return results, cpu


def bench_fanout(args: argparse.Namespace, target: Target) -> Result:
    stream = f"{args.market}.trades"
    key = f"public.{stream}"
    params = {"clients": args.clients, "stream": stream, "size": args.size,
              "workers": args.workers, "max_lag_s": args.max_lag}  # fmt: skip
    server, client, ready = _session(args, target, "fanout", args.clients, stream)
    try:
        if not args.search:
            events = args.events or max(100, int(args.rate * args.step_seconds))
            params.update(rate=args.rate, events=events)
            results, cpu = _fanout_step(args, server, client, args.clients, key, args.rate, events)
            results["connect_seconds"] = ready["ready_seconds"]
            return params, results, cpu
        params.update(
            search=True,
            start_rate=args.start_rate,
            step_seconds=args.step_seconds,
            factor=args.factor,
            precision=args.precision,
        )
        steps: list[dict[str, Any]] = []
        best: float | None = None
        best_result: dict[str, Any] | None = None
        fail: float | None = None
        total_cpu: dict[str, float] = {}
        rate = args.start_rate
        while True:
            events = args.events or max(100, int(rate * args.step_seconds))
            results, cpu = _fanout_step(args, server, client, args.clients, key, rate, events)
            for k, v in cpu.items():
                if k == "cpu_pressure_pct":  # a share: weigh it by the window
                    v = v * cpu["window_seconds"] / 100
                    k = "_pressure_seconds"
                total_cpu[k] = round(total_cpu.get(k, 0.0) + v, 3)
            step = {
                "rate": round(rate, 1), "events": events, "ok": results["sustained"],
                "lost": results["lost"], "lag_s": results["last_frame_after_last_publish_s"],
                "frames_per_s": results["frames_per_s"],
                "offered_frames_per_s": results["offered_frames_per_s"],
                "closed_by_server": results["closed_by_server"],
                "p50_ms": results["latency_ms"]["p50"], "p99_ms": results["latency_ms"]["p99"],
                "server_cores": results.get("server_cores"), "cpu": cpu,
                "publisher_behind": results["publisher_behind"],
            }  # fmt: skip
            steps.append(step)
            log(
                f"fanout {args.clients} clients @ {rate:.0f} ev/s: "
                f"{'ok' if step['ok'] else 'FAIL'} lost={step['lost']} lag={step['lag_s']} s "
                f"fps={step['frames_per_s']} server_cores={step['server_cores']}"
            )
            if step["ok"]:
                if best is None or rate > best:
                    best, best_result = rate, results
            elif fail is None or rate < fail:
                fail = rate
            if (
                results["closed_by_server"]
                or results["clients_open"] < args.clients
                or results["lost"]
            ):
                # Lost clients or a backlog that never drained: start afresh.
                client.close()
                server.stop()
                server, client, ready = _session(args, target, "fanout", args.clients, stream)
            else:
                time.sleep(1.0)
            if best is None:  # nothing sustained yet: go down
                if rate <= args.min_rate:
                    break
                rate = max(rate / args.factor, args.min_rate)
                continue
            if fail is None:  # nothing failed yet: go up
                if rate >= args.max_rate:
                    break
                rate = min(rate * args.factor, args.max_rate)
                continue
            if fail / best <= 1.0 + args.precision:
                break
            rate = math.sqrt(best * fail)
        results = {
            "max_sustained_events_per_s": None if best is None else round(best, 1),
            "max_sustained_frames_per_s": None if best is None else round(best * args.clients),
            "first_failing_events_per_s": None if fail is None else round(fail, 1),
            "at_max": best_result and {
                k: best_result[k] for k in (
                    "frames_per_s", "last_frame_after_last_publish_s", "latency_ms",
                    "server_cores", "publish_rate",
                ) if k in best_result
            },
            "steps": steps,
        }  # fmt: skip
        pressure = total_cpu.pop("_pressure_seconds", None)
        if pressure is not None and total_cpu.get("window_seconds"):
            total_cpu["cpu_pressure_pct"] = round(100 * pressure / total_cpu["window_seconds"], 1)
        return params, results, total_cpu
    finally:
        client.close()
        server.stop()


def bench_latency(args: argparse.Namespace, target: Target) -> Result:
    stream = f"{args.market}.trades"
    key = f"public.{stream}"
    events = int(args.rate * args.seconds)
    params = {"clients": args.clients, "rate": args.rate, "seconds": args.seconds,
              "events": events, "warmup_s": args.warmup, "size": args.size,
              "workers": args.workers}  # fmt: skip
    server, client, _ready = _session(args, target, "latency", args.clients, stream)
    try:
        if args.warmup > 0:
            warm = max(1, int(args.rate * args.warmup))
            publish(args, server, key, warm, args.rate)
            wait_frames(client, args.clients * warm, args.quiet, 30)
            time.sleep(0.5)
        results, cpu = _fanout_step(args, server, client, args.clients, key, args.rate, events)
        results["frames_per_s_offered"] = round(args.rate * args.clients, 1)
        return params, results, cpu
    finally:
        client.close()
        server.stop()


def bench_idle_memory(args: argparse.Namespace, target: Target) -> Result:
    streams = [args.stream] if args.stream else []
    params = {"connections": args.connections, "streams": streams, "settle_s": args.settle,
              "workers": args.workers, "inflight": args.inflight,
              "send_frames": args.send_frames}  # fmt: skip
    server = Server(args, target, "idle").start()
    client: LoadClient | None = None
    try:
        time.sleep(args.settle)
        before = server.rss()
        with profiler(args, server, "idle-memory"):
            meter = CpuMeter(server.pid, [])
            client = LoadClient(args, server, "idle", args.connections, streams)
            meter.client_pids = [client.pid]
            meter.start["client"] = {client.pid: 0}
            ready = client.wait_ready(args.ready_timeout + 30)
        time.sleep(args.settle)
        after = server.rss()
        gauge = server.metrics().get("rango_hub_clients_count")
        cpu = meter.stop()
        opened = ready["open"]
        delta = after["total"] - before["total"]
        results = {
            "opened": opened, "failed": ready["failed"], "connect_seconds": ready["ready_seconds"],
            "server_clients_gauge": gauge,
            "rss_before_bytes": before["total"], "rss_after_bytes": after["total"],
            "rss_workers_before_bytes": before["workers"],
            "rss_workers_after_bytes": after["workers"],
            "rss_supervisor_bytes": after["supervisor"],
            "per_connection_bytes": round(delta / opened) if opened else None,
            "per_connection_kb": round(delta / opened / 1024, 2) if opened else None,
            "connections_per_s": round(opened / ready["ready_seconds"], 1)
            if ready["ready_seconds"] > 0 else None,
        }  # fmt: skip
        final = client.close()
        client = None
        if final:
            results["closed_by_server"] = final["closed_by_server"]
        return params, results, cpu
    finally:
        if client is not None:
            client.close()
        server.stop()


def bench_connect_rate(args: argparse.Namespace, target: Target) -> Result:
    stream = f"{args.market}.trades"
    params = {"workers": args.workers, "seconds": args.seconds,
              "concurrency": args.concurrency, "close": args.close, "src_ips": args.src_ips,
              "stream": stream}  # fmt: skip
    server = Server(args, target, "connect", workers=args.workers).start()
    try:
        binary = build("loadclient")
        argv = [str(binary), "connect-rate", "--port", str(server.port), "--path", "/public",
                "--stream", stream, "--concurrency", str(args.concurrency),
                "--duration", str(args.seconds), "--close", args.close,
                "--src-ips", str(args.src_ips)]  # fmt: skip
        if args.tls:
            argv.append("--tls")
        before = server.metrics()
        with profiler(args, server, "connect-rate"):
            meter = CpuMeter(server.pid, [])
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, preexec_fn=_raise_nofile)
            assert proc.stdout is not None
            output = proc.stdout.read()
            meter.add("client", wait_rusage(proc))
            time.sleep(0.5)  # let the server finish the last closes (counted as its CPU)
            cpu = meter.stop()
        results = json.loads(output)
        results.pop("event", None)
        results.pop("mode", None)
        results["server"] = server_delta(before, server.metrics())
        results["server"].update(meter.server_io())
        results["server_cores"] = round(cpu["server"] / results["seconds"], 3)
        return params, results, cpu
    finally:
        server.stop()


def bench_burst(args: argparse.Namespace, target: Target) -> Result:
    stream = f"{args.market}.trades"
    key = f"public.{stream}"
    params = {"readers": args.readers, "events": args.events, "rate": "max",
              "size": args.size, "workers": args.workers}  # fmt: skip
    server, client, _ready = _session(args, target, "burst", args.readers, stream)
    try:
        client.reset()
        before = server.metrics()
        with profiler(args, server, "burst"):
            meter = CpuMeter(server.pid, [client.pid])
            pub = publish(args, server, key, args.events, 0, meter)
            report = wait_frames(client, args.readers * args.events, args.quiet, 300)
            cpu = meter.stop()
        time.sleep(1.1)  # Rango's counters reach /metrics once a second
        results = delivery_results(report, pub, args.readers, args.events)
        results["server"] = server_delta(before, server.metrics())
        add_server_io(results, meter)
        results["clients_dropped"] = report["closed_by_server"]
        results["drain_seconds"] = results.pop("last_frame_after_last_publish_s")
        results["server_cores"] = round(cpu["server"] / cpu["window_seconds"], 3)
        return params, results, cpu
    finally:
        client.close()
        server.stop()


def bench_calibrate(args: argparse.Namespace, target: Target) -> Result:
    """The machine's floor: CPU of one small loopback TCP write() (no server involved)."""
    binary = build("writecost")
    params = {"sockets": args.sockets, "rounds": args.rounds, "gap_us": args.gap_us,
              "size": args.frame_size}  # fmt: skip
    meter = CpuMeter(None, [])
    argv = [str(binary), str(args.sockets), str(args.rounds), str(args.gap_us),
            str(args.frame_size)]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    output = proc.stdout.read()
    meter.add("client", wait_rusage(proc))
    cpu = meter.stop()
    if proc.returncode != 0:
        raise RuntimeError(f"writecost failed with status {proc.returncode}")
    return params, json.loads(output), cpu


BENCHES: dict[str, Callable[[argparse.Namespace, Target], Result]] = {
    "calibrate": bench_calibrate,
    "fanout": bench_fanout,
    "latency": bench_latency,
    "idle-memory": bench_idle_memory,
    "connect-rate": bench_connect_rate,
    "burst": bench_burst,
}

# Headline numbers for the median line of --runs.
HEADLINES = {
    "fanout": (
        "max_sustained_frames_per_s",
        "max_sustained_events_per_s",
        "frames_per_s",
        "last_frame_after_last_publish_s",
        "lost",
    ),
    "latency": (
        "latency_ms.p50",
        "latency_ms.p90",
        "latency_ms.p99",
        "latency_ms.max",
        "server_cores",
        "lost",
    ),
    "idle-memory": ("per_connection_bytes", "per_connection_kb", "connections_per_s"),
    "connect-rate": ("upgrades_per_s", "failures", "upgrade_ms.p50", "upgrade_ms.p99"),
    "burst": ("lost", "lost_pct", "clients_dropped", "drain_seconds", "latency_ms.p99"),
    "calibrate": ("us_per_write", "us_reader_per_write", "latency_ms.p50", "latency_ms.p99"),
}


def _get(results: dict[str, Any], dotted: str) -> Any:
    value: Any = results
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line of :func:`main` (bench/tls.py builds its rows with it)."""
    parser = argparse.ArgumentParser(
        prog="bench/run.py", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--runs", type=int, default=1, help="repeat K times, report medians")
    common.add_argument(
        "--target",
        action="append",
        metavar="[LABEL=]CMD",
        help="server command to benchmark (repeatable; default: rango). "
        "Placeholders: {port} {metrics_port} {exchange} {pubkey} {amqp_url} "
        "{workers}; RANGER_PORT etc. are also in its environment",
    )
    common.add_argument("--workers", type=int, default=1, help="server worker processes")
    common.add_argument("--amqp-host", default="127.0.0.1")
    common.add_argument("--amqp-port", type=int, default=5672)
    common.add_argument("--amqp-user", default="guest")
    common.add_argument("--amqp-password", default="guest")
    common.add_argument("--log-level", default="warn", help="server LOG_LEVEL")
    common.add_argument(
        "--server-env", action="append", metavar="NAME=VALUE",
        help="extra server environment (repeatable), e.g. RANGO_COMPRESSION=1",
    )  # fmt: skip
    common.add_argument(
        "--book", action="store_true",
        help="bodies padded with order-book-like levels (deflate about as real books do)",
    )
    common.add_argument(
        "--deflate", action="store_true",
        help="clients offer permessage-deflate (compressed frames are counted, not parsed: "
        "no latency samples)",
    )  # fmt: skip
    common.add_argument(
        "--tls", action="store_true",
        help="wss://: the server gets a self-signed ECDSA certificate (bench/out/tls-*.pem; "
        "Rango by RANGO_TLS_CERTFILE/KEYFILE, a --target by {certfile} {keyfile}), the load "
        "client does a full TLS handshake per connection",
    )  # fmt: skip
    common.add_argument("--size", type=int, default=BODY_SIZE, help="event body bytes")
    common.add_argument("--market", default="benchusd", help="stream is <market>.trades")
    common.add_argument(
        "--inflight", type=int, default=500, help="handshakes in flight while opening connections"
    )
    common.add_argument("--ready-timeout", type=float, default=180.0)
    common.add_argument(
        "--quiet",
        type=float,
        default=3.0,
        help="stop waiting for frames after this long without one",
    )
    common.add_argument(
        "--profile", action="store_true", help="py-spy record the worker during the measured window"
    )
    common.add_argument("--output", type=Path, help="also append the JSON lines to this file")
    sub = parser.add_subparsers(dest="bench", required=True)

    p = sub.add_parser("fanout", parents=[common], help="frames/s to N clients on one stream")
    p.add_argument("--clients", type=int, default=1000)
    p.add_argument("--rate", type=float, default=100.0, help="events per second")
    p.add_argument("--events", type=int, help="events per step (default: rate x step-seconds)")
    p.add_argument("--step-seconds", type=float, default=5.0)
    p.add_argument("--search", action="store_true", help="find the max sustained rate")
    p.add_argument("--start-rate", type=float, default=50.0)
    p.add_argument("--min-rate", type=float, default=5.0)
    p.add_argument("--max-rate", type=float, default=20000.0)
    p.add_argument("--factor", type=float, default=1.6, help="search: rate multiplier")
    p.add_argument("--precision", type=float, default=0.1, help="search: stop at fail/ok ≤ 1+p")
    p.add_argument(
        "--max-lag",
        type=float,
        default=0.5,
        help="sustained: last frame at most this long after the last publish",
    )

    p = sub.add_parser("latency", parents=[common], help="latency at a fixed event rate")
    p.add_argument("--clients", type=int, default=1000)
    p.add_argument("--rate", type=float, default=100.0)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--max-lag", type=float, default=0.5)

    p = sub.add_parser("idle-memory", parents=[common], help="RSS per idle connection")
    p.add_argument("--connections", type=int, default=10000)
    p.add_argument("--stream", default="benchusd.trades", help="'' for no subscription")
    p.add_argument("--settle", type=float, default=3.0)
    p.add_argument(
        "--send-frames", type=int, default=0,
        help="browser-like: each client sends a subscribe frame, then N-1 text pings, "
        "then idles",
    )  # fmt: skip

    p = sub.add_parser("connect-rate", parents=[common], help="upgrades per second")
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--concurrency", type=int, default=200)
    p.add_argument("--close", choices=("ws", "rst"), default="ws")
    p.add_argument("--src-ips", type=int, default=8)

    p = sub.add_parser("burst", parents=[common], help="events at full speed to N readers")
    p.add_argument("--readers", type=int, default=100)
    p.add_argument("--events", type=int, default=10000)

    p = sub.add_parser(
        "calibrate", parents=[common], help="CPU of one loopback write() on this machine"
    )
    p.add_argument("--sockets", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=200)
    p.add_argument("--gap-us", type=int, default=10000, help="pause between rounds")
    p.add_argument("--frame-size", type=int, default=122, help="bytes per write")

    args = parser.parse_args(argv)
    if args.bench == "connect-rate" and "--workers" not in (argv or sys.argv):
        args.workers = 2  # the row is "2 workers"
    args.amqp_url = (
        f"amqp://{args.amqp_user}:{args.amqp_password}@{args.amqp_host}:{args.amqp_port}/"
    )
    return args


def run_line(args: argparse.Namespace, target: Target, run: int, sha: str | None) -> dict[str, Any]:
    """One run of ``args.bench`` against ``target``: its JSON line."""
    before = loadavg()
    started = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    source = source_digest()
    params, results, cpu = BENCHES[args.bench](args, target)
    if args.tls:
        params["tls"] = True
    return {
        "bench": args.bench, "date": started, "target": target.label,
        "run": run, "params": params, "results": results, "cpu_seconds": cpu,
        "loadavg_before": before, "loadavg_after": loadavg(), "git": sha,
        "source": source,
        "nproc": os.cpu_count(),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    targets = [Target(t) for t in (args.target or ["rango"])]
    build("loadclient")
    build("amqppub")
    sha = git_sha()
    params_cli = {
        k: v
        for k, v in vars(args).items()
        if k not in ("target", "output", "amqp_password", "amqp_url") and not callable(v)
    }
    collected: dict[str, list[dict[str, Any]]] = {t.label: [] for t in targets}
    for run in range(args.runs):
        for target in targets:  # alternate targets run by run
            line = run_line(args, target, run + 1, sha)
            emit(line, args.output)
            collected[target.label].append(line["results"])
    if args.runs > 1:
        for label, runs in collected.items():
            medians = {}
            for key in HEADLINES[args.bench]:
                values = [v for r in runs if isinstance(v := _get(r, key), int | float)]
                if values:
                    medians[key] = statistics.median(values)
            emit(
                {
                    "bench": args.bench,
                    "summary": "median",
                    "target": label,
                    "runs": len(runs),
                    "params": params_cli,
                    "median": medians,
                    "git": sha,
                },
                args.output,
            )
    return 0


def emit(line: dict[str, Any], output: Path | None) -> None:
    text = json.dumps(line, separators=(",", ":"))
    print(text, flush=True)
    if output is not None:
        with open(output, "a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    sys.exit(main())
