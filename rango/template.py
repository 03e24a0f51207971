"""The worker template: import and configure everything once, then fork workers.

``rango --workers N`` (with ``RANGO_PRELOAD=1``, the default) starts one
template, named ``rango-template``, with ``rango``'s flags. It reads the
configuration and the key, imports every module a worker runs (uvloop, pika,
PyJWT and cryptography, prometheus-client, websockets), checks what a worker
would refuse at start-up, then waits for requests on its control socket. For
each request it forks a worker: the worker shares the template's pages
copy-on-write instead of importing the same ≈40 MB again, which is gunicorn's
``--preload``, with the fork done by a process that never ran an event loop or
a thread (forking a running loop copies its selector, its timers and pika's
sockets).

The template itself is forked from the supervisor (:func:`become_template`), not
started as a new interpreter, so the supervisor, the template and every worker
share one copy of the interpreter and of what the supervisor had imported
(asyncio, uvloop, the settings): ≈10 MB fewer. The child leaves the supervisor's
loop where it is (it never returns to it), points the descriptors it inherited at
/dev/null, takes the environment it is given and imports Rango (and
prometheus-client, whose storage depends on the environment) afresh, so a SIGHUP's
template runs the code on disk; the libraries the supervisor had imported stay
the supervisor's versions until ``rango`` is restarted.

Python's advice for this case (the :func:`gc.freeze` docs) is followed: the
collector is disabled from the start and everything alive is frozen before
each fork, so a worker's collections never write to the shared objects' GC
headers; the worker enables the collector again.

The fork is double: the template forks a short-lived middle process that forks
the worker and exits, so the worker is re-parented to the supervisor (a child
subreaper, ``PR_SET_CHILD_SUBREAPER``), which reaps it, knows its exit status,
and outlives any template. Renewing the template (SIGHUP) therefore never
touches running workers.

What a worker must not share is made per worker after the fork: ``random``
reseeds itself (``os.register_at_fork``), prometheus-client's multiprocess
values notice the new pid and open their own files in the supervisor's
directory (the template's own files stay in a private directory it removes),
the template's control socket is closed, signal dispositions are reset. No
socket, AMQP connection or event loop exists before the fork.

The control protocol (SOCK_SEQPACKET, one message per datagram) is
:mod:`rango.contract`'s: the template says ``ready`` once (or ``refused
<message>`` and exits with status 2: the supervisor prints or logs that one
line, so a bad setting reads the same whoever found it); ``spawn <index>``
comes with the worker's status pipe (SCM_RIGHTS) and is answered ``forked
<index> <pid>`` or ``failed <index> <reason>``. End of file on the socket (the
supervisor is gone or has a new template) ends the template; its workers go on.
"""

from __future__ import annotations

import contextlib
import gc
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Mapping
from typing import NoReturn

from .config import Config, ConfigError
from .contract import (
    ENV_CONTROL_FD,
    ENV_INDEX,
    ENV_METRICS_DIR,
    ENV_STATUS_FD,
    ENV_SUPERVISOR_PID,
    Exit,
    TemplateMessage,
    config_error,
    name_process,
)
from .forking import trim_heap

__all__ = ["main"]


def _preflight(config: Config) -> None:
    """Import what a worker runs and check what it would refuse at start-up.

    A key the worker could not use then ends the template (exit status 2)
    before any worker is forked from it, which is what keeps the old workers of
    a rolling restart running. (The configuration itself, certificates
    included, was checked when it was read.)
    """
    import encodings.idna  # noqa: F401 - imported for its pages, as the rest (getaddrinfo)
    import ssl  # noqa: F401

    import jwt  # noqa: F401
    import pika  # noqa: F401
    import prometheus_client  # noqa: F401
    import uvloop  # noqa: F401
    import websockets  # noqa: F401

    from . import amqp, deflate, hub, metrics, server, worker  # noqa: F401
    from .auth import Authenticator

    Authenticator(config)


def main(argv: list[str] | None = None) -> int:
    """The template, with ``rango``'s flags ``argv``; returns when the supervisor goes."""
    gc.disable()  # from the start: no collection leaves holes in pages to be shared
    name_process("rango-template")
    from .cli import config_from_args, parse_args
    from .logs import setup_logging

    control = socket.socket(fileno=int(os.environ[ENV_CONTROL_FD]))
    del os.environ[ENV_CONTROL_FD]
    metrics_dir = os.environ[ENV_METRICS_DIR]
    # prometheus-client picks its multiprocess mode at import, from this variable:
    # the template's own (zero) values go to a directory no exporter reads.
    own_dir = tempfile.mkdtemp(prefix="rango-template-")
    os.environ[ENV_METRICS_DIR] = own_dir
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the supervisor decides
    # The supervisor ends a template with SIGTERM, just after closing the socket: the
    # handler removes the private metrics directory itself (SIG_DFL left one in /tmp per
    # SIGHUP; unwinding into `finally` lost the race with the end of file).
    signal.signal(signal.SIGTERM, _remove_on_sigterm(own_dir, os.getpid()))
    try:
        try:
            config = config_from_args(parse_args(argv))
            setup_logging(config.log_level_no, config.log_format, "template")
            _preflight(config)
        except ConfigError as exc:
            return _refuse(control, exc)
        control.send(TemplateMessage.READY.value.encode())
        return _serve(control, config, metrics_dir)
    finally:
        # The supervisor closes the socket, then sends SIGTERM: the end of file may
        # have brought us here already, and the signal must not cut the removal short.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        shutil.rmtree(own_dir, ignore_errors=True)


def _remove_on_sigterm(own_dir: str, pid: int) -> Callable[[int, object], None]:
    def handler(signum: int, frame: object) -> None:
        if os.getpid() == pid:  # not a middle process or a worker, which inherit it
            shutil.rmtree(own_dir, ignore_errors=True)
        os._exit(Exit.OK)

    return handler


def _refuse(control: socket.socket, exc: ConfigError) -> int:
    """Tell the supervisor which setting cannot be used; print it only if it cannot hear."""
    try:
        control.send(f"{TemplateMessage.REFUSED} {exc}".encode(errors="replace"))
    except OSError:
        return config_error(exc)
    return Exit.CONFIG


def _serve(control: socket.socket, config: Config, metrics_dir: str) -> int:
    while True:
        try:
            data, fds, _, _ = socket.recv_fds(control, 256, 4)
        except OSError:
            return Exit.OK
        if not data:
            return Exit.OK  # the supervisor is gone, or has a new template
        word, _, rest = data.decode(errors="replace").partition(" ")
        if word != TemplateMessage.SPAWN or len(fds) != 1 or not rest.isdigit():
            for fd in fds:
                os.close(fd)
            continue
        index, status_fd = int(rest), fds[0]
        try:
            pid = _fork(control, config, index, status_fd, metrics_dir)
            answer = f"{TemplateMessage.FORKED} {index} {pid}"
        except OSError as exc:
            answer = f"{TemplateMessage.FAILED} {index} {exc.strerror or exc}"
        finally:
            os.close(status_fd)
        control.send(answer.encode())


def _fork(
    control: socket.socket, config: Config, index: int, status_fd: int, metrics_dir: str
) -> int:
    """Fork worker ``index`` through a middle process; return the worker's pid."""
    # What the checks and the last requests freed goes back to the kernel rather
    # than into every worker's address space (≈0.3 MB less in the template).
    trim_heap()
    gc.freeze()
    read_fd, write_fd = os.pipe()
    middle = os.fork()
    if middle == 0:
        try:
            os.close(read_fd)
            worker = os.fork()
            if worker == 0:
                os.close(write_fd)
                _become_worker(control, config, index, status_fd, metrics_dir)
            os.write(write_fd, str(worker).encode())
        finally:
            os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        pid = pipe.read()
    os.waitpid(middle, 0)
    if not pid:
        raise OSError(0, "the middle process could not fork")
    return int(pid)


def _wait_until_reparented() -> None:
    """Wait (at most 1 s) for the middle process to exit, so that the worker's parent is
    the supervisor before the worker starts comparing them (:meth:`Placement.orphaned`)."""
    supervisor = int(os.environ.get(ENV_SUPERVISOR_PID, "0") or 0)
    middle = os.getppid()
    deadline = time.monotonic() + 1.0
    while middle != supervisor and os.getppid() == middle and time.monotonic() < deadline:
        time.sleep(0.001)


def _become_worker(
    control: socket.socket, config: Config, index: int, status_fd: int, metrics_dir: str
) -> NoReturn:
    """In the forked worker: drop the template's state, run the worker, exit."""

    def run() -> int:
        name_process(f"rango-worker-{index}")  # not "rango-template": ps tells them apart
        control.close()
        _wait_until_reparented()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the worker's loop sets its own
        os.environ[ENV_INDEX] = str(index)
        os.environ[ENV_STATUS_FD] = str(status_fd)
        os.environ[ENV_METRICS_DIR] = metrics_dir
        gc.enable()
        from .worker import run_forked

        return run_forked(config)

    _exit_with(run)


def become_template(
    control_fd: int, argv: list[str], env: Mapping[str, str], mask: set[int | signal.Signals]
) -> NoReturn:
    """Turn a process just forked from the supervisor into a template; never returns.

    Called in the child of ``os.fork()`` in the supervisor, inside a callback of
    its running loop: nothing here may touch that loop, and the process ends with
    ``os._exit`` rather than returning into it.
    """

    def run() -> int:
        gc.disable()  # before anything is freed: no collection leaves holes in pages
        name_process("rango-template")
        signal.set_wakeup_fd(-1)  # the supervisor loop's: a signal here must not reach it
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # blocked by the supervisor to fork
        _shadow_descriptors(control_fd)
        os.environ.clear()
        os.environ.update(env)
        for name in [name for name in sys.modules if name.split(".")[0] in _FRESH]:
            del sys.modules[name]
        from importlib import import_module

        code: int = import_module("rango.template").main(argv)
        return code

    _exit_with(run)


def _exit_with(run: Callable[[], int]) -> NoReturn:
    """In a forked child: ``run()``, then end the process with its status, whatever
    happens (a traceback for an error), never returning to what the parent was doing."""
    code = 1
    try:
        code = run()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


# Imported again by a new template: Rango's code as it is on disk now, and
# prometheus-client, which chose its value storage from the environment at import.
_FRESH = frozenset({"rango", "workers", "prometheus_client"})


def _shadow_descriptors(keep: int) -> None:
    """Point every inherited descriptor but stdout, stderr and ``keep`` at /dev/null.

    Not closed: the supervisor's objects that own them (sockets, pipes, its loop's)
    are copied here too, and one that is freed would close its number again, by
    then perhaps a file of ours. A /dev/null in its place is harmless either way.
    """
    null = os.open(os.devnull, os.O_RDWR)
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd not in (1, 2, keep, null):
            with contextlib.suppress(OSError):
                os.dup2(null, fd)
    os.close(null)
