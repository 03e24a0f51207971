"""The contract between ``rango``'s supervisor and its worker processes, defined once.

A worker is ``python -m workers.worker`` with the same flags as ``rango``. A
supervisor (``rango --workers N``, or supervisord with the exporter) tells it,
through its environment:

``RANGO_WORKER_INDEX``
    The worker's index, the ``worker`` label of its metrics.
``RANGO_WORKER_MANAGED=1``
    Metrics are served by the supervisor (or the exporter) from
    ``PROMETHEUS_MULTIPROC_DIR``: the worker does not listen on the metrics
    port itself and writes ``worker-<index>.<pid>.pid`` there.
``RANGO_STATUS_FD``
    A pipe on which the worker reports its :class:`Status`, one word a line, so
    that a rolling restart knows when a new worker can take over.
``RANGO_SUPERVISOR_PID``
    The supervisor's pid. A worker whose parent is no longer that process
    (the supervisor was killed: ``kill -9``, the OOM killer, a container
    runtime) drains and exits as on SIGTERM, so that no worker outlives it
    holding clients and the port. Workers started otherwise (supervisord, a
    shell) get no such variable and never watch their parent.

With ``RANGO_PRELOAD=1`` the supervisor forks a worker template instead
(:mod:`rango.template`) with the same environment less the index and status
pipe, plus ``RANGO_TEMPLATE_FD``, its end
of a SOCK_SEQPACKET control socket speaking :class:`TemplateMessage`; each forked
worker gets its index and status pipe from the ``spawn`` request and is named
``rango-worker-<index>`` (:func:`name_process`), since it keeps the supervisor's
command line. A template that cannot use its configuration says why on the
socket (``refused <message>``) instead of printing it, so that the supervisor
prints it as the one line at start-up, or logs it as the one error line of a
refused rolling restart.

The environment given to workers and templates is the supervisor's with the
file of ``RANGO_ENV_FILE`` on top (:func:`rango.settings.environment`), as the
supervisor read it at start or at its last SIGHUP.

A worker exits with :attr:`Exit.OK` after a drain and :attr:`Exit.CONFIG` when
a setting cannot be used (the supervisor then stops instead of restarting a
worker that would fail the same way). Every process prints such an error as one
line, :func:`config_error`, never a traceback.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Coroutine, Mapping
from enum import IntEnum, StrEnum
from typing import Any, NamedTuple, TypeVar

from .config import ConfigError

__all__ = [
    "ENV_CONTROL_FD",
    "ENV_INDEX",
    "ENV_MANAGED",
    "ENV_METRICS_DIR",
    "ENV_STATUS_FD",
    "ENV_SUPERVISOR_PID",
    "METRICS_LISTENER",
    "WS_LISTENER",
    "Exit",
    "Placement",
    "Status",
    "StatusWriter",
    "TemplateMessage",
    "cannot_listen",
    "config_error",
    "name_process",
    "parse_statuses",
    "run_loop",
    "template_env",
    "worker_command",
    "worker_env",
]

ENV_INDEX = "RANGO_WORKER_INDEX"
ENV_MANAGED = "RANGO_WORKER_MANAGED"
ENV_STATUS_FD = "RANGO_STATUS_FD"
ENV_SUPERVISOR_PID = "RANGO_SUPERVISOR_PID"
ENV_METRICS_DIR = "PROMETHEUS_MULTIPROC_DIR"  # prometheus-client's own name
ENV_CONTROL_FD = "RANGO_TEMPLATE_FD"

WORKER_MODULE = "workers.worker"

# The settings named when a listener cannot be opened.
WS_LISTENER = "RANGER_HOST/RANGER_PORT (or --ws-addr)"
METRICS_LISTENER = "RANGO_METRICS_PORT"

T = TypeVar("T")


class Status(StrEnum):
    """What a worker reports on its status pipe."""

    LISTENING = "listening"  #: its websocket listener is open
    CONSUMING = "consuming"  #: its RabbitMQ consumer receives events
    DISCONNECTED = "disconnected"  #: it lost RabbitMQ and is reconnecting


class TemplateMessage(StrEnum):
    """The first word of a message on the template's control socket (SOCK_SEQPACKET)."""

    READY = "ready"  #: template → supervisor, once: configured, imported, checked
    SPAWN = "spawn"  #: supervisor → template: ``spawn <index>`` + the status pipe's fd
    FORKED = "forked"  #: ``forked <index> <pid>``: the worker runs, the supervisor's child
    FAILED = "failed"  #: ``failed <index> <reason>``: fork() failed
    #: ``refused <message>``, instead of ``ready``: a setting cannot be used (the
    #: message names it, as :func:`config_error` prints it); the template exits 2
    REFUSED = "refused"


class Exit(IntEnum):
    """Exit statuses of every Rango process."""

    OK = 0
    CONFIG = 2  #: a setting cannot be used: one line on stderr names it


class Placement(NamedTuple):
    """How a worker was started, read from its environment."""

    label: str  #: the worker's index, as its metrics label
    managed: bool
    status_fd: int
    metrics_dir: str | None
    supervisor: int  #: the pid whose death ends this worker, 0 for none

    @classmethod
    def from_env(cls) -> Placement:
        env = os.environ
        return cls(
            env.get(ENV_INDEX, "0") or "0",
            env.get(ENV_MANAGED) == "1",
            _number(env.get(ENV_STATUS_FD), -1),
            env.get(ENV_METRICS_DIR) or None,
            _number(env.get(ENV_SUPERVISOR_PID), 0),
        )

    def orphaned(self) -> bool:
        """True once the supervisor that started this worker is gone (it was reparented)."""
        return self.supervisor > 0 and os.getppid() != self.supervisor


def _number(value: str | None, default: int) -> int:
    """A supervisor's numeric variable; anything else means there is no supervisor."""
    try:
        return int(value or default)
    except ValueError:
        return default


def worker_command(argv: list[str]) -> list[str]:
    """The command line of a worker with ``rango``'s own flags."""
    return [sys.executable, "-m", WORKER_MODULE, *argv]


def template_env(
    control_fd: int, metrics_dir: str, base: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The environment of a template: a worker's, but for the index and status pipe,
    which come with each ``spawn``, and the control socket."""
    env = worker_env(0, -1, metrics_dir, base)
    del env[ENV_INDEX], env[ENV_STATUS_FD]
    env[ENV_CONTROL_FD] = str(control_fd)
    return env


def name_process(name: str) -> None:
    """Set the process's name as ``ps -o comm``, ``top`` and ``pgrep`` show it (15 bytes).

    Templates and forked workers keep the supervisor's command line; the name tells
    them apart.
    """
    with contextlib.suppress(OSError), open("/proc/self/comm", "w") as f:
        f.write(name[:15])


def worker_env(
    index: int, status_fd: int, metrics_dir: str, base: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The environment of worker ``index`` started by a supervisor: ``base`` (the
    supervisor's own environment unless given) and what the supervisor tells it."""
    return {
        **(os.environ if base is None else base),
        ENV_INDEX: str(index),
        ENV_MANAGED: "1",
        ENV_STATUS_FD: str(status_fd),
        ENV_METRICS_DIR: metrics_dir,
        ENV_SUPERVISOR_PID: str(os.getpid()),
    }


class StatusWriter:
    """The worker's end of the status pipe (does nothing when there is none)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __call__(self, status: Status) -> None:
        if self.fd < 0:
            return
        with contextlib.suppress(OSError):  # the supervisor is gone: nothing to tell
            os.write(self.fd, status.value.encode() + b"\n")


def parse_statuses(data: bytes) -> list[str]:
    """The words a worker wrote on its status pipe (unknown ones kept as they are)."""
    return data.decode(errors="replace").split()


def cannot_listen(setting: str, host: str, port: int, reason: OSError | str) -> ConfigError:
    """The error for a listener that cannot be opened, naming the setting."""
    if isinstance(reason, OSError):
        # uvloop's strerror repeats the address: use errno's own text.
        reason = os.strerror(reason.errno) if reason.errno else str(reason)
    return ConfigError(f"{setting}: cannot listen on {host}:{port}: {reason}")


def config_error(exc: ConfigError, prog: str = "rango") -> int:
    """Print a configuration error as one line and return :attr:`Exit.CONFIG`."""
    print(f"{prog}: {exc}", file=sys.stderr)
    return Exit.CONFIG


def run_loop(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` on uvloop (plain asyncio where uvloop is missing)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        import asyncio

        return asyncio.run(main)
    return uvloop.run(main)
