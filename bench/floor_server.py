"""The least a Python websocket server can do per connection: the machine's ceiling.

Not a server to use: it checks nothing, answers every request with a 101 and a
fixed ``subscribed`` frame, and echoes a close frame. It runs the same event loop
(uvloop) and socket options as Rango, so ``connect-rate`` against it measures what
the kernel, the loop and the load client cost on this machine, with no gateway
work at all:

    bench/run.py connect-rate --target rango \\
        --target 'floor=.venv/bin/python bench/floor_server.py {port} {workers}'

Usage: ``floor_server.py PORT [PROCESSES] [CERTFILE KEYFILE] [--fanout AMQP_URL EXCHANGE]``
(processes share the port with ``SO_REUSEPORT``; SIGTERM stops them all; with a
certificate it serves TLS, the floor of ``wss://``). With ``--fanout`` each process
consumes EXCHANGE with Rango's own consumer (:class:`rango.amqp.Consumer`: pika on
the loop, the broker's cost is the same for both) before it listens, and writes every
event, framed as ``{"<stream>":BODY}``, to every upgraded connection: the events of
one loop iteration joined, one ``write()`` per connection, as Rango's flush does, and
nothing else (no routing, no subscriptions, no slow-client check): the floor of
``fanout``.
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

# Upgraded connections' transports, for --fanout.
OPEN: set[asyncio.BaseTransport] = set()


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
        OPEN.add(self.transport)

    def connection_lost(self, exc: Exception | None) -> None:
        OPEN.discard(self.transport)


def frame(payload: bytes) -> bytes:
    """An unmasked text frame (the 7-, 16- or 64-bit length form)."""
    n = len(payload)
    if n < 126:
        return bytes((0x81, n)) + payload
    if n < 65536:
        return bytes((0x81, 126)) + n.to_bytes(2, "big") + payload
    return bytes((0x81, 127)) + n.to_bytes(8, "big") + payload


async def consume(url: str, exchange: str) -> None:
    """Consume ``exchange`` (returns once consuming) and write each event to everyone."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from rango.amqp import Consumer, State

    loop = asyncio.get_running_loop()
    run: list[bytes] = []
    consuming = loop.create_future()

    def flush() -> None:
        data = b"".join(run)
        run.clear()
        for transport in OPEN:
            transport.write(data)  # type: ignore[attr-defined]

    def on_event(routing_key: str, body: bytes) -> None:
        parts = routing_key.split(".")
        stream = ".".join(parts[1:]) if parts[0] == "public" else routing_key
        if not run:
            loop.call_soon(flush)
        run.append(frame(b'{"' + stream.encode() + b'":' + body + b"}"))

    def on_state(state: State) -> None:
        if state is State.CONSUMING and not consuming.done():
            consuming.set_result(None)

    Consumer(url, exchange, on_event, on_state).start()
    await consuming


async def serve(port: int, tls: list[str], fanout: list[str]) -> None:
    loop = asyncio.get_running_loop()
    context = None
    if tls:
        import ssl

        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(tls[0], tls[1])
    if fanout:
        await consume(fanout[0], fanout[1])
    await loop.create_server(
        Floor, "127.0.0.1", port, reuse_port=True, backlog=4096, ssl=context
    )
    await asyncio.Event().wait()


def main() -> None:
    argv = sys.argv[1:]
    fanout: list[str] = []
    if "--fanout" in argv:
        at = argv.index("--fanout")
        fanout, argv = argv[at + 1 : at + 3], argv[:at] + argv[at + 3 :]
    port = int(argv[0])
    processes = int(argv[1]) if len(argv) > 1 else 1
    children = []
    for _ in range(processes):
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            uvloop.run(serve(port, argv[2:4], fanout))
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
