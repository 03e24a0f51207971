"""The least a Python websocket server can do per connection: the machine's ceiling.

Not a server to use: it checks nothing, answers every request with a 101 and a
fixed ``subscribed`` frame, and echoes a close frame. It runs the same event loop
(uvloop) and socket options as Rango, so ``connect-rate`` against it measures what
the kernel, the loop and the load client cost on this machine, with no gateway
work at all:

    bench/run.py connect-rate --target rango \\
        --target 'floor=.venv/bin/python bench/floor_server.py {port} {workers}'

Usage: ``floor_server.py PORT [PROCESSES] [CERTFILE KEYFILE]`` (processes share the
port with ``SO_REUSEPORT``; SIGTERM stops them all; with a certificate it serves TLS,
the floor of ``wss://``).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import signal
import sys

import uvloop

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
SUBSCRIBED = b'{"success":{"message":"subscribed","streams":[]}}'
FRAME = bytes((0x81, len(SUBSCRIBED))) + SUBSCRIBED


class Floor(asyncio.Protocol):
    __slots__ = ("transport", "upgraded")

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.upgraded = False

    def data_received(self, data: bytes) -> None:
        if self.upgraded:  # the client's close frame: echo it and close
            self.transport.write(b"\x88\x02\x03\xe8")
            self.transport.close()
            return
        start = data.lower().find(b"sec-websocket-key:") + 18
        key = data[start : data.find(b"\r\n", start)].strip()
        accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
        self.transport.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n" + FRAME
        )
        self.upgraded = True


async def serve(port: int, tls: list[str]) -> None:
    loop = asyncio.get_running_loop()
    context = None
    if tls:
        import ssl

        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(tls[0], tls[1])
    await loop.create_server(
        Floor, "127.0.0.1", port, reuse_port=True, backlog=4096, ssl=context
    )
    await asyncio.Event().wait()


def main() -> None:
    port = int(sys.argv[1])
    processes = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    children = []
    for _ in range(processes):
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            uvloop.run(serve(port, sys.argv[3:5]))
            os._exit(0)
        children.append(pid)

    def stop(*_: object) -> None:
        for pid in children:
            os.kill(pid, signal.SIGKILL)
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for pid in children:
        os.waitpid(pid, 0)


if __name__ == "__main__":
    main()
