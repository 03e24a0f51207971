"""The listener's accept path on uvloop: what owns each accepted descriptor, and when.

uvloop is given an :class:`rango.listener._Accepted` (the descriptor as an int), not a
socket object: these tests check that connections are served and every descriptor is
closed exactly once, by libuv once its transport has it, by the listener when the
connection failed before (a drain cancelling it before it started).
"""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Any

import uvloop

from rango.listener import Listener, _Accepted, _Taken, open_sockets


class Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


def descriptors() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_accepted_is_the_descriptor_and_taken_once_uvloop_asks_for_it() -> None:
    accepted = _Accepted(7)
    assert accepted == 7 and accepted.type == socket.SOCK_STREAM
    assert accepted.fileno() == 7
    assert accepted.__class__ is _Taken
    accepted.close()  # nothing to do: libuv closes the descriptor


def test_connections_are_served_and_each_descriptor_closed_once() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        errors: list[dict[str, Any]] = []
        loop.set_exception_handler(lambda _loop, context: errors.append(context))
        [sock] = open_sockets("127.0.0.1", 0, 16)
        port = sock.getsockname()[1]
        listener = Listener([sock], Echo, lambda reason: None)
        before: set[str] = set()
        for round_ in range(21):
            if round_ == 1:  # after the first: libuv's reserve descriptor is open
                await asyncio.sleep(0.1)
                before = descriptors()
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"hello")
            assert await reader.readexactly(5) == b"hello"
            writer.close()
            await writer.wait_closed()
        for _ in range(50):  # the server side closes on EOF
            if descriptors() <= before:
                break
            await asyncio.sleep(0.02)
        assert descriptors() <= before
        assert not listener.connecting
        listener.close()
        await asyncio.sleep(0.05)
        assert errors == []  # no EBADF from closing a descriptor twice

    uvloop.run(scenario())


def test_connection_cancelled_before_uvloop_took_it_is_closed_by_the_listener() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        [sock] = open_sockets("127.0.0.1", 0, 16)
        port = sock.getsockname()[1]
        listener = Listener([sock], Echo, lambda reason: None)
        loop.remove_reader(sock.fileno())  # accept by hand, below
        client = socket.create_connection(("127.0.0.1", port))
        client.settimeout(5)
        await asyncio.sleep(0.05)  # in the accept queue
        listener._accept(sock)
        [task] = list(listener.connecting)
        task.cancel()  # as a drain does, before the task ever ran
        await asyncio.sleep(0.05)
        assert not listener.connecting
        assert client.recv(1) == b""  # the server's end was closed
        client.close()
        listener.close()

    uvloop.run(scenario())
