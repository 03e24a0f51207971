"""The websocket port's listener: ``SO_REUSEPORT`` sockets and Rango's own accept loop.

Why not ``loop.create_server``: when ``accept()`` fails with EMFILE or ENFILE,
libuv (under uvloop) closes a reserve descriptor, accepts every queued
connection and closes it at once (its "EMFILE trick"), and tells nobody; if it
has no reserve, uvloop closes the listening socket for good. Either way an
operator sees clients dropped or a worker that no longer accepts, and no log
line. Here the accept is Rango's: on EMFILE/ENFILE (or ENOBUFS/ENOMEM) the
listener stops watching the socket, logs (at most once per 10 s) and counts the
failure, and watches again as soon as a connection of this worker closes (a
descriptor is free) or 0.1 s later, whichever comes first. The queued
connections wait in the kernel's accept queue meanwhile; none is dropped.

Each accepted socket becomes a transport with ``loop.connect_accepted_socket``
(uvloop's, TCP_NODELAY set; TLS included), as the server would have made it.
Under uvloop it is given not a ``socket.socket`` but an :class:`_Accepted`: uvloop
keeps that object as long as the connection lasts (to close it after libuv has
closed the descriptor), and a socket object costs 96 B per connection where this
one costs 48 B.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import ssl
from collections.abc import Callable
from typing import Any

from .logs import RateLimited

__all__ = ["Listener", "open_sockets"]

log = logging.getLogger("rango.listener")

# Errors that mean "no descriptor or buffer now": wait, then accept again.
_EXHAUSTED = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
# Errors of one connection that went away in the queue: skip it.
_GONE = {errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.ECONNRESET, errno.ETIMEDOUT}
# Accepts per readiness callback: the queue is drained in bounded bites so that
# a connection flood cannot hold the loop from writing frames.
ACCEPT_BATCH = 64
# Retry delay after EMFILE when no connection of this worker closes before.
RETRY_AFTER = 0.1


class _Accepted(int):
    """An accepted connection's descriptor, for uvloop's ``connect_accepted_socket``.

    The descriptor itself (an int: no object beside it, 48 B where a
    ``socket.socket`` costs 96 B for as long as the connection lasts). uvloop
    reads ``type`` and ``family`` (only to tell a TCP transport from a Unix one:
    an IPv6 connection gets the same transport), calls :meth:`fileno` once to
    open its transport on the descriptor, which makes this object a
    :class:`_Taken`, then keeps it and calls :meth:`close` when the transport
    closes, after libuv closed the descriptor itself. An :class:`_Accepted`
    that was never taken is still the listener's to close (see
    :meth:`Listener._connected`).
    """

    __slots__ = ()
    type = socket.SOCK_STREAM
    family = socket.AF_INET

    def fileno(self) -> int:
        self.__class__ = _Taken  # the transport owns the descriptor from here
        return int(self)

    def close(self) -> None:
        """The transport closed: libuv has closed the descriptor already."""


class _Taken(_Accepted):
    __slots__ = ()


def _is_uvloop(loop: asyncio.AbstractEventLoop) -> bool:
    return type(loop).__module__.partition(".")[0] == "uvloop"


def open_sockets(host: str, port: int, backlog: int) -> list[socket.socket]:
    """Listening sockets for ``host:port`` with ``SO_REUSEPORT``, one per address
    ``host`` resolves to (as ``create_server`` binds them); OSError names the cause."""
    infos = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                # "::" and "0.0.0.0" may both be bound: each family its own socket.
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(backlog)
            sock.setblocking(False)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


class Listener:
    """Accepts on ``sockets`` and hands each connection to ``factory``'s protocol.

    ``exhausted(reason)`` is called once per failed ``accept()`` for lack of
    descriptors (the worker's metric); :meth:`freed` is called by the server when
    one of its connections closes.
    """

    def __init__(
        self,
        sockets: list[socket.socket],
        factory: Callable[[], asyncio.Protocol],
        exhausted: Callable[[str], None],
        ssl_context: ssl.SSLContext | None = None,
        handshake_timeout: float | None = None,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self.sockets = sockets
        self._factory = factory
        self._exhausted = exhausted
        self._ssl: dict[str, Any] = (
            {"ssl": ssl_context, "ssl_handshake_timeout": handshake_timeout}
            if ssl_context is not None
            else {}
        )
        self.paused: set[socket.socket] = set()
        # Accepted connections whose transport is still being made (TLS handshakes):
        # not yet the server's connections, but a drain must wait for them too.
        self.connecting: dict[asyncio.Task[Any], _Accepted | socket.socket] = {}
        # Plain asyncio's transports need the socket object itself.
        self._lean = _is_uvloop(self._loop)
        self._retry: asyncio.TimerHandle | None = None
        self._limited = RateLimited(log, interval=10.0)
        self.closed = False
        for sock in sockets:
            self._loop.add_reader(sock.fileno(), self._accept, sock)

    def _accept(self, sock: socket.socket) -> None:
        connect = self._loop.connect_accepted_socket
        lean = self._lean
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _GONE:
                    continue
                self._pause(sock, exc)
                return
            # With uvloop the socket object is freed here (see _Accepted).
            accepted = _Accepted(conn.detach()) if lean else conn
            # uvloop reads only what _Accepted has of a socket (typeshed wants one).
            task = self._loop.create_task(
                connect(self._factory, accepted, **self._ssl)  # type: ignore[arg-type]
            )
            self.connecting[task] = accepted
            task.add_done_callback(self._connected)

    def _connected(self, task: asyncio.Task[Any]) -> None:
        """A connection that failed before its transport existed (reset, TLS refused)
        is that client's business: retrieve the error so asyncio does not log it.
        If it failed before uvloop took the descriptor (cancelled by a drain before
        it started), the descriptor is closed here."""
        accepted = self.connecting.pop(task)
        failed = task.cancelled() or task.exception() is not None
        if failed and accepted.__class__ is _Accepted:
            os.close(accepted)  # never taken: still ours

    def _pause(self, sock: socket.socket, exc: OSError) -> None:
        """Stop watching ``sock`` until a descriptor is free: no busy loop on EMFILE."""
        name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        self._exhausted(name)
        if exc.errno in _EXHAUSTED:
            self._limited.log(
                logging.ERROR, name,
                "accept() failed: %s (%s); accepting again when a connection closes",
                name, exc.strerror,
            )  # fmt: skip
        else:
            self._limited.log(logging.ERROR, name, "accept() failed: %s (%s)", name, exc)
        self._loop.remove_reader(sock.fileno())
        self.paused.add(sock)
        if self._retry is None:
            self._retry = self._loop.call_later(RETRY_AFTER, self.freed)

    def freed(self) -> None:
        """A descriptor may be free: watch the paused sockets again."""
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        if self.closed:
            return
        paused, self.paused = self.paused, set()
        for sock in paused:
            self._loop.add_reader(sock.fileno(), self._accept, sock)

    def close(self) -> None:
        """Stop accepting and close the sockets (queued connections then go to the
        other workers where ``tcp_migrate_req`` is on)."""
        if self.closed:
            return
        self.closed = True
        if self._retry is not None:
            self._retry.cancel()
        for sock in self.sockets:
            if sock not in self.paused:
                self._loop.remove_reader(sock.fileno())
            sock.close()


