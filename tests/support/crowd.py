"""Many websocket clients at once, on asyncio: each :class:`Client` is subscribed to one
stream of numbered events (``{"n": <number>}``) and a task collects what it receives,
so hundreds of connections can be opened, counted and checked together.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from support.answers import subscribed


class Client:
    """An asyncio websocket client subscribed to one stream of ``{"n": number}`` events.

    A reader task collects the numbers until the connection closes.
    """

    def __init__(self, ws: ClientConnection, stream: str) -> None:
        self.ws = ws
        self.stream = stream
        self.port: int = ws.local_address[1]
        self.numbers: list[int] = []
        self.other: list[Any] = []  # frames that are not numbered events
        self.closed: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        self._changed = asyncio.Condition()
        self.task = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        try:
            async for message in self.ws:
                frame = orjson.loads(message)
                async with self._changed:
                    if isinstance(frame, dict) and self.stream in frame:
                        self.numbers.append(frame[self.stream]["n"])
                    else:
                        self.other.append(frame)
                    self._changed.notify_all()
        except ConnectionClosed:
            pass
        finally:
            self.closed.set_result(self.ws.close_code)
            async with self._changed:
                self._changed.notify_all()

    async def wait_count(self, count: int) -> None:
        """Until ``count`` numbers arrived or the connection closed."""
        async with self._changed:
            await self._changed.wait_for(lambda: len(self.numbers) >= count or self.closed.done())

    async def close(self) -> None:
        await self.ws.close()
        await self.task


async def open_client(url: str, stream: str, streams: list[str] | None = None) -> Client:
    """A client of ``url`` past its ``subscribed`` answer, which lists ``streams``
    (``[stream]`` by default), counting the numbers of ``stream``."""
    ws = await connect(url, open_timeout=10)
    answer = orjson.loads(await asyncio.wait_for(ws.recv(), 10))
    assert answer == subscribed(streams or [stream]), answer
    return Client(ws, stream)


async def open_clients(url: str, count: int, stream: str) -> list[Client]:
    """``count`` clients connected at once, each past its ``subscribed`` answer."""
    return list(await asyncio.gather(*(open_client(url, stream) for _ in range(count))))


async def wait_counts(clients: Iterable[Client], count: int, timeout: float = 10.0) -> None:
    await asyncio.wait_for(asyncio.gather(*(c.wait_count(count) for c in clients)), timeout)
