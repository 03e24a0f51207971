"""The routing core: who is subscribed to what, and where each event goes.

The hub is plain Python with no I/O. Subscribers are any objects with an
``auth``, an ordered ``subscriptions`` mapping and a ``push(frame)`` method; the
websocket layer provides them, tests provide trivial ones. The hub never changes
a subscriber's mapping in place: it gives it another one, read-only and shared by
every connection with the same subscriptions (see :func:`subscriptions_of`). For each event the
hub checks the body once, builds the outgoing frame once and pushes the same
bytes object to every subscriber (PROTOCOL §5).

Subscribers whose ``deflate`` is non-zero negotiated permessage-deflate with
that LZ77 window size: they get each frame compressed, once per window size
and worker, whatever their number (see :mod:`rango.deflate`); frames whose
payload is below the hub's ``min_size`` go uncompressed to everyone.

Consecutive events for the same subscribers are batched: the hub keeps the
frames of the current run and, when the run ends (an event for other
subscribers, any change of subscriptions, or :meth:`Hub.flush` at the end of
the event loop's iteration), joins them once and pushes the one ``bytes`` to
each subscriber. A burst of N events to M clients thus costs N appends and M
pushes instead of N*M, and every client still gets its frames in the order the
events arrived. Without a ``wake`` callback each event is delivered at once.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from enum import StrEnum
from types import MappingProxyType
from typing import TYPE_CHECKING, Protocol

import orjson

from . import frames as wire
from .protocol import Kind, event_payload, stream_kind, success, text_frame

if TYPE_CHECKING:
    # Annotations only: the supervisor imports the hub (through the metrics) without
    # PyJWT, cryptography and websockets.
    from .auth import Auth
    from .deflate import Deflater

__all__ = ["NO_SUBSCRIPTIONS", "Drop", "DropReason", "Hub", "Observer", "Subscriber",
           "subscriptions_of"]

_PUBLIC_SCOPES = frozenset(("public", "global"))

# Subscription lists up to this long are shared between the connections that have
# them; a longer one is a connection's own (and never kept by the cache).
SHARED_MAX = 16
NO_SUBSCRIPTIONS: Mapping[str, None] = MappingProxyType({})


@functools.lru_cache(maxsize=256)
def _shared(streams: tuple[str, ...]) -> Mapping[str, None]:
    return MappingProxyType(dict.fromkeys(streams))


def subscriptions_of(streams: dict[str, None]) -> Mapping[str, None]:
    """``streams`` as a subscriber's read-only mapping, in order.

    Connections subscribed to the same streams get the same object: a dict costs
    ~180 B, which each of 10,000 connections would otherwise hold for the same
    one or two streams (and its own copy of their names).
    """
    if not streams:
        return NO_SUBSCRIPTIONS
    if len(streams) > SHARED_MAX:
        return MappingProxyType(streams)
    return _shared(tuple(streams))


class Subscriber(Protocol):
    """What the hub needs of a connection.

    ``push`` must only queue the frame: it may not call back into the hub
    (dropping a slow client happens later, outside the broadcast loop).
    """

    auth: Auth
    subscriptions: Mapping[str, None]  #: replaced by the hub, never changed in place
    deflate: int  #: 0, or the window bits of a negotiated permessage-deflate

    def push(self, frame: bytes) -> None: ...


class Observer:
    """Receives subscription and client counts, e.g. to export them as metrics."""

    def clients(self, count: int) -> None:
        """The number of connected clients changed to ``count``."""

    def subscriptions(self, kind: str, topic: str, count: int) -> None:
        """The number of subscriptions to ``topic`` of ``kind`` changed to ``count``."""


class DropReason(StrEnum):
    """Why an event is dropped: the metric label, with the explanation logged beside it."""

    explanation: str

    def __new__(cls, label: str, explanation: str) -> DropReason:
        member = str.__new__(cls, label)
        member._value_ = label
        member.explanation = explanation
        return member

    BAD_ROUTING_KEY = (
        "bad_routing_key", "routing key is not scope.id.event, public.event or global.event"
    )
    BAD_BODY = "bad_body", "body is not JSON"
    TOO_LARGE = "too_large", "body larger than RANGO_MAX_EVENT_SIZE"
    NO_SNAPSHOT = "no_snapshot", "order-book increment before any snapshot"
    INCREMENTS_FULL = (
        "increments_full",
        "stored increments reached RANGO_MAX_INCREMENTS; book discarded until the next snapshot",
    )
    INTERNAL_ERROR = "internal_error", "Rango failed to route it (a bug: see the traceback)"


class Drop(Exception):
    """An event was dropped for ``reason``; ``detail`` names the event (its routing key)."""

    def __init__(self, reason: DropReason, detail: str = "") -> None:
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail


# A frame's compressed variants by window bits, made when first needed; for the
# frames a book stores, so that a replay does not compress them again.
Variants = dict[int, bytes]


class _Book:
    """A stored order book: the snapshot frame and the increment frames after it.

    With compression on, ``variants[0]`` holds the snapshot's compressed variants
    and ``variants[i + 1]`` increment ``i``'s (each empty until a client needs it).
    """

    __slots__ = ("increments", "snapshot", "variants")

    def __init__(self, snapshot: bytes, variants: Variants | None) -> None:
        self.snapshot = snapshot
        self.increments: list[bytes] = []
        self.variants = None if variants is None else [variants]

    def frames(self) -> list[bytes]:
        return [self.snapshot, *self.increments]


class Hub:
    """Subscriptions, order-book stores and event routing for one worker."""

    def __init__(
        self,
        rbac: Mapping[str, frozenset[str]] | None = None,
        *,
        max_increments: int = 10_000,
        max_subscriptions: int = 1024,
        max_event_size: int = 8 * 1024 * 1024,
        encode: Callable[[bytes], bytes] = text_frame,
        observer: Observer | None = None,
        wake: Callable[[], None] | None = None,
        deflater: Deflater | None = None,
        min_size: int = 0,
    ) -> None:
        self.rbac = dict(rbac or {})
        self.max_increments = max_increments
        self.max_subscriptions = max_subscriptions
        self.max_event_size = max_event_size
        self.encode = encode
        self.observer = observer or Observer()
        # Called when a run of frames starts; the caller then calls flush() soon.
        self.wake = wake
        self._run: list[bytes] = []
        self._run_subs: set[Subscriber] | None = None
        # With compression on: the stored frames' variants, parallel to _run
        # (None for frames no book keeps).
        self._run_variants: list[Variants | None] = []
        self.deflater = deflater
        self.min_size = min_size
        self.deflating = 0  # connected clients that negotiated compression
        self.public: dict[str, set[Subscriber]] = {}
        self.prefixed: dict[str, set[Subscriber]] = {}
        # uid -> event -> subscribers: a private event reaches one user only.
        self.private: dict[str, dict[str, set[Subscriber]]] = {}
        self.books: dict[str, _Book] = {}
        self.clients = 0
        self.events_received = 0
        self.frames_sent = 0
        self._counts: dict[tuple[str, str], int] = {}

    # Connections.

    def connect(self, client: Subscriber, streams: Iterable[str] = ()) -> None:
        """Register a new connection and subscribe it to its query-string streams.

        Always pushes the ``subscribed`` answer, even for no streams (PROTOCOL §2).
        """
        self.clients += 1
        if client.deflate:
            self.deflating += 1
        self.observer.clients(self.clients)
        self.subscribe(client, streams)  # flushes the current run first

    def disconnect(self, client: Subscriber) -> None:
        """Forget a connection and all its subscriptions."""
        self.flush()
        for stream in client.subscriptions:
            self._remove(client, stream)
        client.subscriptions = NO_SUBSCRIPTIONS
        self.clients -= 1
        if client.deflate:
            self.deflating -= 1
        self.observer.clients(self.clients)

    # Requests.

    def subscribe(self, client: Subscriber, streams: Iterable[str]) -> None:
        """Subscribe ``client``, then push the list of all its subscriptions.

        Subscribing to ``<market>.<base>-inc`` pushes the stored snapshot and
        increments first, so the client's book starts complete (PROTOCOL §5).
        """
        self.flush()  # frames of earlier events go before the answer
        current = client.subscriptions
        changed: dict[str, None] | None = None  # a copy, once there is a change
        for stream in streams:
            if stream in current:
                continue
            kind = stream_kind(stream)
            if kind is None or not all(stream.split(".")):
                continue  # no routing key can ever match it
            if len(current) >= self.max_subscriptions:
                reason = f"cannot subscribe to {stream}: too many subscriptions"
                client.push(self.encode(success(reason)))
                continue
            if kind is Kind.PRIVATE:
                uid = client.auth.uid
                if not uid:
                    continue  # anonymous: silently not subscribed (PROTOCOL §4)
                self.private.setdefault(uid, {}).setdefault(stream, set()).add(client)
            elif kind is Kind.PUBLIC:
                self.public.setdefault(stream, set()).add(client)
                if stream.endswith("-inc"):
                    book = self.books.get(stream[:-4])
                    if book is not None:
                        bits = client.deflate
                        if bits and book.variants is not None:
                            for frame, made in zip(book.frames(), book.variants, strict=True):
                                client.push(self._variant(frame, made, bits))
                        else:
                            for frame in book.frames():
                                client.push(frame)
            else:
                prefix = stream.partition(".")[0]
                if client.auth.role not in self.rbac.get(prefix, ()):
                    client.push(self.encode(success(f"cannot subscribe to {stream}")))
                    continue
                self.prefixed.setdefault(stream, set()).add(client)
            if changed is None:
                current = changed = dict(current)
            changed[stream] = None
            self._count(kind, stream, 1)
        if changed is not None:
            current = client.subscriptions = subscriptions_of(changed)
        client.push(self.encode(success("subscribed", list(current))))

    def unsubscribe(self, client: Subscriber, streams: Iterable[str]) -> None:
        """Unsubscribe ``client``, then push the list of its remaining subscriptions."""
        self.flush()
        current = client.subscriptions
        changed: dict[str, None] | None = None
        for stream in streams:
            if stream in current:
                self._remove(client, stream)
                if changed is None:
                    current = changed = dict(current)
                del changed[stream]
        if changed is not None:
            current = client.subscriptions = subscriptions_of(changed)
        client.push(self.encode(success("unsubscribed", list(current))))

    def _remove(self, client: Subscriber, stream: str) -> None:
        kind = stream_kind(stream)
        assert kind is not None  # only streams of a kind are ever subscribed
        if kind is Kind.PRIVATE:
            uid = client.auth.uid
            topics = self.private[uid]
            _discard(topics, stream, client)
            if not topics:
                del self.private[uid]
        elif kind is Kind.PUBLIC:
            _discard(self.public, stream, client)
        else:
            _discard(self.prefixed, stream, client)
        self._count(kind, stream, -1)

    def subscription_counts(self) -> dict[tuple[str, str], int]:
        """Subscriptions now by ``(type, topic)``; topics with none are absent."""
        return dict(self._counts)

    def _count(self, kind: Kind, stream: str, delta: int) -> None:
        key = (kind.value, stream)
        count = self._counts.get(key, 0) + delta
        if count:
            self._counts[key] = count
        else:
            del self._counts[key]
        self.observer.subscriptions(kind.value, stream, count)

    # Events.

    def route(self, routing_key: str, body: bytes) -> int:
        """Deliver one RabbitMQ event; return the number of frames pushed.

        Raises :class:`Drop` for events PROTOCOL §5 says to drop.
        """
        self.events_received += 1
        parts = routing_key.split(".")
        if len(parts) == 3 and all(parts):
            scope, middle, event = parts
        elif len(parts) == 2 and parts[0] in _PUBLIC_SCOPES and parts[1]:
            scope, middle, event = parts[0], "", parts[1]
        else:
            raise Drop(DropReason.BAD_ROUTING_KEY, routing_key)
        if len(body) > self.max_event_size:
            raise Drop(DropReason.TOO_LARGE, routing_key)
        try:
            orjson.loads(body)
        except orjson.JSONDecodeError:
            raise Drop(DropReason.BAD_BODY, routing_key) from None

        if scope == "private":
            topics = self.private.get(middle)
            subs = topics.get(event) if topics else None
            return self._broadcast(subs, event, body)
        if middle and scope != "public":
            return self._broadcast(self.prefixed.get(routing_key), f"{middle}.{event}", body)
        stream = f"{middle}.{event}" if middle else routing_key
        if event.endswith("-inc"):
            return self._increment(stream, body)
        if event.endswith("-snap"):
            return self._snapshot(stream, body)
        return self._broadcast(self.public.get(stream), stream, body)

    def _broadcast(self, subs: set[Subscriber] | None, topic: str, body: bytes) -> int:
        if not subs:
            return 0
        return self._push_all(subs, self.encode(event_payload(topic, body)))

    def _push_all(
        self, subs: set[Subscriber] | None, frame: bytes, variants: Variants | None = None
    ) -> int:
        """Add ``frame`` to the run for ``subs``; return how many will get it."""
        if not subs:
            return 0
        if subs is not self._run_subs:
            if self._run:
                self.flush()
            self._run_subs = subs
        self._run.append(frame)
        if self.deflater is not None:
            self._run_variants.append(variants)
        if self.wake is None:
            self.flush()
        elif len(self._run) == 1:
            self.wake()
        return len(subs)

    def flush(self) -> None:
        """Push the current run of frames, joined once, to its subscribers."""
        frames = self._run
        if not frames:
            return
        subs = self._run_subs
        assert subs is not None
        variants = self._run_variants
        # The run is taken whole before anything is pushed: an exception below
        # costs this run, never the next ones.
        self._run = []
        self._run_subs = None
        if variants:
            self._run_variants = []
        data = frames[0] if len(frames) == 1 else b"".join(frames)
        if self.deflating and self.deflater is not None:
            self._flush_mixed(subs, frames, variants, data)
        else:
            for client in subs:
                client.push(data)
        self.frames_sent += len(subs) * len(frames)

    def _flush_mixed(
        self,
        subs: set[Subscriber],
        frames: list[bytes],
        variants: list[Variants | None],
        data: bytes,
    ) -> None:
        """Push a run where some clients may have negotiated compression: each
        window size's compressed run is built once, at its first client."""
        compressed: dict[int, bytes] = {}
        for client in subs:
            bits = client.deflate
            if not bits:
                client.push(data)
                continue
            run = compressed.get(bits)
            if run is None:
                run = compressed[bits] = self._compress_run(frames, variants, data, bits)
            client.push(run)

    def _compress_run(
        self, frames: list[bytes], variants: list[Variants | None], data: bytes, bits: int
    ) -> bytes:
        """The run for window ``bits``: its frames compressed (the small ones not)."""
        if len(frames) == 1:
            return self._variant(data, variants[0], bits)
        parts = []
        changed = False
        for frame, made in zip(frames, variants, strict=True):
            part = self._variant(frame, made, bits)
            changed = changed or part is not frame
            parts.append(part)
        return b"".join(parts) if changed else data

    def _variant(self, frame: bytes, variants: Variants | None, bits: int) -> bytes:
        """``frame`` for a client with window ``bits``: compressed unless it is small
        (RFC 7692 lets each message choose); a stored frame keeps what was made."""
        deflater = self.deflater
        if deflater is None or wire.payload_size(frame) < self.min_size:
            return frame
        if variants is not None:
            done = variants.get(bits)
            if done is not None:
                return done
        made = wire.encode_compressed(deflater.compress(wire.payload_of(frame), bits))
        if variants is not None:
            variants[bits] = made
        return made

    def _snapshot(self, stream: str, body: bytes) -> int:
        base = stream[:-5]
        first = base not in self.books
        frame = self.encode(event_payload(stream, body))
        variants: Variants | None = {} if self.deflater is not None else None
        self.books[base] = _Book(frame, variants)
        # PROTOCOL §5 (as Ranger): only a first snapshot goes out, to the
        # subscribers that have been waiting for a book.
        if not first:
            return 0
        return self._push_all(self.public.get(base + "-inc"), frame, variants)

    def _increment(self, stream: str, body: bytes) -> int:
        base = stream[:-4]
        book = self.books.get(base)
        if book is None:
            raise Drop(DropReason.NO_SNAPSHOT, stream)
        if len(book.increments) >= self.max_increments:
            # Keeping the snapshot while dropping increments would hand the next
            # subscriber a book with a gap; forget it and wait for a fresh one,
            # which then goes to every subscriber (no snapshot was stored).
            del self.books[base]
            raise Drop(DropReason.INCREMENTS_FULL, stream)
        frame = self.encode(event_payload(stream, body))
        variants: Variants | None = None
        book.increments.append(frame)
        if book.variants is not None:
            variants = {}
            book.variants.append(variants)
        return self._push_all(self.public.get(stream), frame, variants)

    def reset_books(self) -> None:
        """Forget every stored order book: events may have been missed (reconnect)."""
        self.books.clear()


def _discard(index: dict[str, set[Subscriber]], stream: str, client: Subscriber) -> None:
    subs = index.get(stream)
    if subs is not None:
        subs.discard(client)
        if not subs:
            del index[stream]
