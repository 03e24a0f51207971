"""The supervisor's side of the worker template: fork it, ask it for workers, reap them.

The template is forked from the supervisor (see :func:`rango.template.become_template`
for what the child does first), so it shares the supervisor's pages; it is watched
and reaped as the workers are, through :class:`ForkedProcess`.

A forked worker is not the template's child for long: the template forks it
through a middle process that exits at once, and the supervisor, a child
subreaper (``PR_SET_CHILD_SUBREAPER``, Linux ≥ 3.4), inherits it. The supervisor
then watches it through a pidfd (Linux ≥ 5.3) and reaps it with ``waitpid``, so
its exit status is known whatever happened to the template. See
:mod:`rango.template` for the other side.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import os
import signal
import socket
from collections.abc import Mapping
from typing import NamedTuple

from .contract import TemplateMessage, template_env

__all__ = ["ForkedProcess", "Refusal", "Template", "become_subreaper", "trim_heap"]

log = logging.getLogger("rango.supervisor")

PR_SET_CHILD_SUBREAPER = 36
FORK_TIMEOUT = 10.0


def become_subreaper() -> bool:
    """Make orphans below this process its children; False where the kernel cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def trim_heap() -> None:
    """Give the C heap's free pages back to the kernel (glibc's ``malloc_trim``).

    Start-up frees much more than it keeps (imports, configuration, a template's
    checks); those pages would otherwise stay resident, private to the process.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)


class ForkedProcess:
    """A template forked here, or a worker forked by the template and re-parented here,
    with the parts of :class:`asyncio.subprocess.Process` the supervisor uses."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._loop = asyncio.get_running_loop()
        self._exited: asyncio.Future[int] = self._loop.create_future()
        # The process is our (possibly zombie) child: its pid cannot be reused before
        # we reap it, so the pidfd names it for sure.
        self._pidfd = os.pidfd_open(pid)
        self._loop.add_reader(self._pidfd, self._reap)

    def _reap(self) -> None:
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            # Not re-parented here (no subreaper): someone else reaped it.
            pid, status = self.pid, 255 << 8
        if pid == 0:
            return
        self._loop.remove_reader(self._pidfd)
        os.close(self._pidfd)
        self.returncode = os.waitstatus_to_exitcode(status)
        self._exited.set_result(self.returncode)

    async def wait(self) -> int:
        return await asyncio.shield(self._exited)

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            signal.pidfd_send_signal(self._pidfd, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class Refusal(NamedTuple):
    """Why a template did not start."""

    reason: str
    #: True: it refused a setting, and ``reason`` is its one line (the setting's name
    #: first); False: it exited or hung otherwise (its stderr says more)
    setting: bool


_FORK_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD}


class Template:
    """One template process and its control socket."""

    def __init__(self, process: ForkedProcess, control: socket.socket) -> None:
        self.process = process
        self.control = control
        self._loop = asyncio.get_running_loop()
        self.ready: asyncio.Future[None] = self._loop.create_future()
        self._pending: dict[int, asyncio.Future[int]] = {}
        self.refused: str | None = None
        self.closed = False
        self._loop.add_reader(control.fileno(), self._on_message)

    @classmethod
    async def start(
        cls, argv: list[str], metrics_dir: str, timeout: float, env: Mapping[str, str]
    ) -> Template | Refusal:
        """A ready template with environment ``env`` (and the template's variables), or
        why it is not."""
        from .template import become_template

        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            child_env = template_env(theirs.fileno(), metrics_dir, env)
            # Our own collections must not write to the GC headers of what we share with
            # the template from now on (a full one copies every page holding a tracked
            # object: 7 MB, measured beside a child that touches nothing): collect
            # the garbage, then freeze the rest out of the collector's sight.
            gc.collect()
            gc.freeze()
            # Signals wait until the child has let go of our handlers and wakeup fd:
            # one delivered to it in between would be written to our loop's socket
            # and acted on here (a SIGTERM meant for the template would stop us).
            blocked = signal.pthread_sigmask(signal.SIG_BLOCK, _FORK_SIGNALS)
            try:
                pid = os.fork()
                if pid == 0:
                    become_template(theirs.fileno(), argv, child_env, blocked)  # never returns
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
            process = ForkedProcess(pid)
        except OSError as exc:  # EAGAIN under a tasks limit, ENOMEM
            ours.close()
            return Refusal(f"cannot fork a template: {exc.strerror or exc}", False)
        finally:
            theirs.close()
        ours.setblocking(False)
        template = cls(process, ours)
        exited = asyncio.ensure_future(process.wait())
        try:
            await asyncio.wait((template.ready, exited), timeout=timeout,
                               return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
        finally:
            exited.cancel()
        if template.ready.done() and not template.ready.exception():
            log.debug("template started (pid %d)", process.pid)
            return template
        template._lost()  # not close(): no SIGTERM before it has said how it ended
        if template.ready.done():
            # Its socket closed first: it is exiting (after saying or printing why).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(process.wait(), 5.0)
        if process.returncode is None:
            process.kill()
            if template.refused is None:
                return Refusal(f"template not ready after {timeout:.0f} s", False)
        if template.refused is not None:
            return Refusal(template.refused, True)
        return Refusal(f"template exited with status {process.returncode}", False)

    def _on_message(self) -> None:
        try:
            data = self.control.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._lost()
            return
        word, _, rest = data.decode(errors="replace").partition(" ")
        index, _, value = rest.partition(" ")
        if word == TemplateMessage.READY and not self.ready.done():
            self.ready.set_result(None)
            return
        if word == TemplateMessage.REFUSED and not self.ready.done():
            self.refused = rest
            self._lost()  # it exits now; start() waits for that
            return
        future = self._pending.pop(int(index), None) if index.isdigit() else None
        if future is None or future.done():
            return
        if word == TemplateMessage.FORKED and value.isdigit():
            future.set_result(int(value))
        else:
            future.set_exception(OSError(f"the template could not fork: {value}"))

    def _lost(self) -> None:
        if not self.closed:
            self.closed = True
            self._loop.remove_reader(self.control.fileno())
            self.control.close()
        for future in self._pending.values():
            if not future.done():
                future.set_exception(ConnectionError("the template is gone"))
        self._pending.clear()
        if not self.ready.done():
            self.ready.set_exception(ConnectionError("the template is gone"))
            self.ready.exception()  # retrieved: start() reports the exit status

    @property
    def alive(self) -> bool:
        return not self.closed and self.process.returncode is None

    async def fork(self, index: int, status_fd: int) -> ForkedProcess:
        """Worker ``index``, with the write end of its status pipe; raises OSError
        (ConnectionError, TimeoutError) if the template cannot make it."""
        if not self.alive:
            raise ConnectionError("the template is gone")
        future: asyncio.Future[int] = self._loop.create_future()
        self._pending[index] = future
        message = f"{TemplateMessage.SPAWN} {index}".encode()
        socket.send_fds(self.control, [message], [status_fd])
        pid = await asyncio.wait_for(future, FORK_TIMEOUT)
        return ForkedProcess(pid)

    def close(self) -> None:
        """Let the template go (end of file on its socket); its workers stay."""
        self._lost()
        with contextlib.suppress(ProcessLookupError):
            if self.process.returncode is None:
                self.process.terminate()
