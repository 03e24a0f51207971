"""Hostile clients: fuzzed frames, floods, caps on streams, subscriptions, connections and
request size, protocol violations, and the worker's memory across abuse and churn.

Each test checks that only the abusive connection is affected: a well-behaved client on
the same worker (:class:`Bystander`) receives every event published during and after the
abuse, in order, and the worker neither dies nor keeps the memory the abuse cost.

Covered elsewhere, not repeated here:

* binary frames: e2e/test_frames.py::test_binary_frame_answers_error;
* fragmented messages: e2e/test_frames.py::test_fragmented_ping, test_fragmented_subscribe,
  test_fragmented_bad_request_is_an_error, test_fragments_interleaved_with_control_frames,
  test_fragmented_message_over_limit_closes_1009;
* ``streams`` of wrong types or nested: e2e/test_frames.py::test_bad_request_answers_error_and_
  connection_stays_open (null, string, object, number, nested list);
* oversized frames: e2e/test_frames.py::test_frame_over_default_limit_closes_1009,
  e2e/test_clients_faults.py::test_oversized_frame_closes_with_1009;
* handshake timeout (also trickled), slow client, keepalive: e2e/test_clients_faults.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.answers import (
    answered_with_an_error,
    assert_alive,
    expect,
    expect_error,
    recv_json,
    refused,
    request,
    subscribe,
    subscribed,
    unsubscribed,
)
from support.broker import Publisher, unique
from support.crowd import Client, open_client, wait_counts
from support.gateway import Rango
from support.metrics import counter, sample, samples, wait_counter
from support.polling import wait_for
from support.procfs import rss_bytes
from support.tokens import KeyPair
from support.wire import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    RawClient,
    half_handshake,
    upgrade_status,
)
from websockets.exceptions import InvalidStatus

MAX_FRAME = 4096  # RANGO_MAX_FRAME_SIZE's default
MB = 1024 * 1024
# How much a worker's resident memory may keep after the abuse is over (GC and
# allocator noise; a leak of the abuse itself is tens of MB).
RSS_SLACK = 15 * MB
# No practical rate limit: these gateways are abused by content, not by pace.
FAST = {"RANGO_RATE_LIMIT": "1000000", "RANGO_RATE_BURST": "1000000"}


# Gateways and helpers


@pytest.fixture(scope="module")
def gw(keys: KeyPair, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rango]:
    """One worker, default limits except the rate limit."""
    with Rango(keys, tmp_path_factory.mktemp("hostile"), env=FAST) as instance:
        yield instance


@pytest.fixture(scope="module")
def limited(keys: KeyPair, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rango]:
    """One worker with every default: 20 frames/s, burst 100, 1024 subscriptions."""
    with Rango(keys, tmp_path_factory.mktemp("limited")) as instance:
        yield instance


@pytest.fixture(scope="module")
def roomy(keys: KeyPair, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rango]:
    """One worker taking client frames up to 1 MB, so the other limits are reached first."""
    env = {**FAST, "RANGO_MAX_FRAME_SIZE": str(MB)}
    with Rango(keys, tmp_path_factory.mktemp("roomy"), env=env) as instance:
        yield instance


def the_worker(rango: Rango) -> int:
    [pid] = rango.worker_pids()
    return pid


def healthy(rango: Rango, worker: int) -> None:
    """The same worker still serves, and nothing raised."""
    assert not rango.exited()
    assert rango.worker_pids() == [worker], f"the worker was replaced\n{rango.log()}"
    assert "Traceback" not in rango.log(), rango.log()


def wait_settled(rango: Rango, clients: float, prefix: str) -> None:
    """``rango_hub_clients_count`` is back to ``clients`` and no subscription to a stream
    starting with ``prefix`` is left (series of streams nobody watches read 0 or are gone)."""

    def settled() -> bool:
        metrics = rango.metrics()
        left = [
            (labels, value)
            for labels, value in samples(metrics, "rango_hub_subscriptions_count")
            if labels.get("topic", "").startswith(prefix) and value
        ]
        return sample(metrics, "rango_hub_clients_count") == clients and not left

    wait_for(settled, 20, f"{clients} clients and no subscription to {prefix}*")


class Bystander:
    """A well-behaved client on the worker under attack.

    A thread publishes ``{"n": 0}``, ``{"n": 1}`` ... to its stream every 50 ms while
    another reads them; :meth:`checkpoint` proves that every event published so far
    arrived, in order, and that the connection still answers.
    """

    def __init__(self, rango: Rango, interval: float = 0.05) -> None:
        self.stream = f"{unique('by')}.trades"
        self._stack = ExitStack()
        self.ws = self._stack.enter_context(rango.connect(query=f"stream={self.stream}"))
        assert recv_json(self.ws) == subscribed([self.stream])
        self.exchange = rango.exchange
        self.sent = 0
        self.received: list[int] = []
        self.failures: list[BaseException] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._writer = threading.Thread(target=self._publish, args=(interval,), daemon=True)
        self._reader.start()
        self._writer.start()

    def _publish(self, interval: float) -> None:
        publisher = Publisher(self.exchange)  # pika connections stay in one thread
        try:
            while not self._stop.wait(interval):
                publisher.publish(f"public.{self.stream}", {"n": self.sent})
                self.sent += 1
            publisher.publish(f"public.{self.stream}", {"end": True})
        except BaseException as exc:
            self.failures.append(exc)
        finally:
            publisher.close()

    def _read(self) -> None:
        try:
            while True:
                frame = recv_json(self.ws, timeout=10)
                body = frame[self.stream]
                if body == {"end": True}:
                    return
                with self._lock:
                    self.received.append(body["n"])
        except BaseException as exc:
            if not self._stop.is_set():
                self.failures.append(exc)

    def checkpoint(self) -> None:
        """Every event published until now and one more arrive, in order, and nothing else."""
        target = self.sent + 1  # at least one published after this call

        def arrived() -> bool:
            assert not self.failures, self.failures
            return self.sent >= target and len(self.received) >= target

        wait_for(arrived, 10, f"the bystander's {target} events (got {len(self.received)})")
        with self._lock:
            assert self.received == list(range(len(self.received))), "lost or reordered"

    def stop(self) -> None:
        """Stop publishing; every event arrived and the connection still answers ``ping``."""
        self._stop.set()
        self._writer.join(10)
        self._reader.join(15)
        assert not self.failures, self.failures
        assert not self._reader.is_alive(), "the bystander's end marker never arrived"
        assert self.received == list(range(self.sent))
        assert_alive(self.ws)

    def close(self) -> None:
        self._stop.set()
        self._stack.close()
        self._writer.join(10)
        self._reader.join(10)

    def __enter__(self) -> Bystander:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@pytest.fixture
def bystander(gw: Rango) -> Iterator[Bystander]:
    with Bystander(gw) as b:
        yield b
        b.stop()


def close_of(raw: RawClient) -> tuple[list[bytes], int, int | None, str]:
    """Read until the server's close frame: ``(texts, control pongs, code, reason)``."""
    texts: list[bytes] = []
    pongs = 0
    while True:
        _, opcode, payload = raw.recv_frame()
        if opcode == OP_CLOSE:
            code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
            return texts, pongs, code, payload[2:].decode()
        if opcode == OP_TEXT:
            texts.append(payload)
        elif opcode == OP_PONG:
            pongs += 1


def raw_client(rango: Rango, query: str = "") -> RawClient:
    raw = RawClient(rango.port, "/public" + (f"?{query}" if query else ""))
    assert raw.status == 101
    assert orjson.loads(raw.recv_text())["success"]["message"] == "subscribed"
    return raw


def frames(opcode: int, payload: bytes, count: int) -> bytes:
    return RawClient.frame(opcode, payload) * count  # one masking key for all: fine


# Property-based: arbitrary client frames over one real connection (PROTOCOL §3)

_TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=24)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | _TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_TEXT, inner, max_size=4),
    max_leaves=12,
)
STREAM_NAMES = (
    _TEXT
    | st.sampled_from(["a.b", "order", "admin.x.y", "", ".", "a..b", "x.y.z.w", "é.ü"])
    | st.builds("{}.{}".format, _TEXT, _TEXT)
)
REQUESTS = st.fixed_dictionaries(
    {"event": st.sampled_from(["subscribe", "unsubscribe"]) | JSON_VALUES},
    optional={"streams": st.lists(STREAM_NAMES, max_size=5) | JSON_VALUES, "x": JSON_VALUES},
) | st.fixed_dictionaries(  # well-formed, as often as all the rest
    {"event": st.sampled_from(["subscribe", "unsubscribe"]), "streams": st.lists(STREAM_NAMES)}
)
CLIENT_FRAMES = st.one_of(
    JSON_VALUES.map(lambda v: (OP_TEXT, json.dumps(v).encode())),
    REQUESTS.map(lambda r: (OP_TEXT, json.dumps(r, ensure_ascii=False).encode())),
    REQUESTS.map(lambda r: (OP_TEXT, json.dumps(r).encode())),
    _TEXT.map(lambda s: (OP_TEXT, s.encode())),
    st.binary(max_size=48).map(lambda b: (OP_TEXT, b)),
    st.binary(max_size=48).map(lambda b: (OP_BINARY, b)),
    st.sampled_from(["ping", " ping\n", "\tping ", "", " ", "\r\n\t", "\x0b", "\u3000ping"]).map(
        lambda s: (OP_TEXT, s.encode())
    ),
    st.tuples(
        st.integers(MAX_FRAME - 2, MAX_FRAME + 2), st.sampled_from([b" ", b"x", b"\xff", b"{"])
    ).map(lambda t: (OP_TEXT, t[1] * t[0])),
)


def allowed(opcode: int, payload: bytes) -> frozenset[str]:
    """What PROTOCOL §3 lets the server do with one client frame."""
    if len(payload) > MAX_FRAME:
        return frozenset({"close 1009"})
    if opcode == OP_BINARY:
        return frozenset({"error"})
    try:
        text = payload.decode()
    except UnicodeDecodeError:
        return frozenset({"close 1007"})
    core = text.strip(" \t\n\r")  # JSON's whitespace
    if not core:
        return frozenset({"nothing"})
    if core == "ping":
        return frozenset({"pong"})
    if not core.strip():  # other Unicode white space: either reading will do
        return frozenset({"nothing", "error"})
    if core.strip() == "ping":
        return frozenset({"pong", "error"})
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return frozenset({"error"})
    if not isinstance(value, dict) or value.get("event") not in ("subscribe", "unsubscribe"):
        return frozenset({"error"})
    streams = value.get("streams")
    if not isinstance(streams, list) or not all(isinstance(s, str) for s in streams):
        return frozenset({"error"})
    # A well-formed request; limits (count, length) or a number orjson will not
    # take may still make it an error.
    return frozenset({value["event"] + "d", "error"})


def _cannot(frame: Any) -> bool:
    return (
        isinstance(frame, dict)
        and list(frame) == ["success"]
        and list(frame["success"]) == ["message"]
        and frame["success"]["message"].startswith("cannot subscribe to ")
    )


def classify(answers: list[str]) -> str:
    """Name the server's answers to one frame (see :func:`allowed`)."""
    if not answers:
        return "nothing"
    if answers == ["pong"]:
        return "pong"
    try:
        *first, last = [orjson.loads(a) for a in answers]
    except orjson.JSONDecodeError:
        return f"unexpected {answers!r}"
    if not first and isinstance(last, dict) and list(last) == ["error"]:
        error = last["error"]
        return "error" if isinstance(error, str) and error.strip() else f"unexpected {answers!r}"
    if all(_cannot(f) for f in first) and isinstance(last, dict) and list(last) == ["success"]:
        body = last["success"]
        streams = body.get("streams")
        if (
            body.get("message") in ("subscribed", "unsubscribed")
            and isinstance(streams, list)
            and all(isinstance(s, str) for s in streams)
        ):
            return body["message"]
    return f"unexpected {answers!r}"


class Session:
    """A raw connection reused across examples; reopened after the server closes it."""

    def __init__(self, rango: Rango) -> None:
        self.rango = rango
        self.raw: RawClient | None = None
        self.opened = 0
        self.outcomes: dict[str, int] = {}

    def outcome(self, opcode: int, payload: bytes, maybe_ping: bool) -> str:
        """Send one frame and a ``ping``; what the server did with the frame."""
        if self.raw is None:
            self.raw = raw_client(self.rango)
            self.opened += 1
        raw = self.raw
        with contextlib.suppress(OSError):  # closed while sending: the close frame says why
            raw.send(RawClient.frame(opcode, payload) + RawClient.frame(OP_TEXT, b"ping"))
        answers: list[str] = []
        while True:
            _, op, data = raw.recv_frame()
            if op == OP_CLOSE:
                self.close()
                code = struct.unpack("!H", data[:2])[0] if len(data) >= 2 else None
                result = f"close {code}"
                break
            if op != OP_TEXT:
                continue
            text = data.decode()
            # The pong of our ping ends the answers; a first pong may be the frame's own.
            if text == "pong" and not (maybe_ping and not answers):
                result = classify(answers)
                break
            answers.append(text)
        self.outcomes[result] = self.outcomes.get(result, 0) + 1
        return result

    def close(self) -> None:
        if self.raw is not None:
            self.raw.close()
            self.raw = None


def test_fuzzed_frames_get_an_answer_allowed_by_the_protocol(gw, bystander):
    worker = the_worker(gw)
    session = Session(gw)
    before = rss_bytes(worker)

    @settings(
        max_examples=200,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(st.lists(CLIENT_FRAMES, min_size=1, max_size=6))
    def check(batch: list[tuple[int, bytes]]) -> None:
        for opcode, payload in batch:
            expected = allowed(opcode, payload)
            got = session.outcome(opcode, payload, maybe_ping="pong" in expected)
            assert got in expected, (opcode, payload[:300], got, sorted(expected))

    try:
        check()
    finally:
        session.close()
    # The examples reached every kind of answer (else the strategy is broken).
    assert {"error", "pong", "nothing", "close 1009", "close 1007"} <= set(session.outcomes), (
        session.outcomes
    )
    assert sum(session.outcomes.values()) >= 200, session.outcomes
    assert session.outcomes.get("subscribed", 0) + session.outcomes.get("unsubscribed", 0) >= 10
    bystander.checkpoint()
    healthy(gw, worker)
    assert rss_bytes(worker) - before < RSS_SLACK, (before, rss_bytes(worker))


# Protocol violations: a close with the right code, nothing else affected


def _frame_bits(first: int, payload: bytes) -> bytes:
    """A masked frame with the first header byte as given (reserved bits, opcode)."""
    return bytes([first]) + RawClient.frame(OP_TEXT, payload)[1:]


VIOLATIONS: dict[str, tuple[bytes, int]] = {
    "continuation without a start": (RawClient.frame(OP_CONT, b"x"), 1002),
    "new message inside a fragmented one": (
        RawClient.frame(OP_TEXT, b"pi", fin=False) + RawClient.frame(OP_TEXT, b"ng"),
        1002,
    ),
    "reserved opcode 3": (RawClient.frame(0x3, b"x"), 1002),
    "reserved control opcode 0xB": (RawClient.frame(0xB, b"x"), 1002),
    "unmasked frame": (bytes([0x81, 4]) + b"ping", 1002),
    "control frame over 125 bytes": (RawClient.frame(OP_PING, b"x" * 126), 1002),
    "fragmented control frame": (RawClient.frame(OP_PING, b"x", fin=False), 1002),
    "reserved bit set": (_frame_bits(0xC1, b"ping"), 1002),
    "close code 999": (RawClient.frame(OP_CLOSE, struct.pack("!H", 999)), 1002),
    "close payload of one byte": (RawClient.frame(OP_CLOSE, b"x"), 1002),
    "close reason not UTF-8": (RawClient.frame(OP_CLOSE, struct.pack("!H", 1000) + b"\xff"), 1007),
    "text not UTF-8": (RawClient.frame(OP_TEXT, b'{"event":"\xff"}'), 1007),
    "text not UTF-8 across fragments": (
        RawClient.frame(OP_TEXT, b"\xe2\x82", fin=False) + RawClient.frame(OP_CONT, b"x"),
        1007,
    ),
    "length field of 2**62": (bytes([0x81, 0xFF]) + struct.pack("!Q", 1 << 62) + b"mask", 1009),
}


@pytest.mark.parametrize("name", list(VIOLATIONS))
def test_protocol_violation_closes_only_that_connection(gw, bystander, name):
    data, code = VIOLATIONS[name]
    with raw_client(gw) as raw:
        raw.send(data)
        texts, _, got, _ = close_of(raw)
        assert (texts, got) == ([], code)
    bystander.checkpoint()


# streams: enormous, deep, long, non-ASCII


def test_ten_thousand_streams_is_an_error(roomy):
    m = unique()
    with roomy.connect(query=f"stream={m}.a") as ws:
        expect(ws, subscribed([f"{m}.a"]))
        for streams in ([f"{m}.s{i}" for i in range(10_000)], ["a.b"] * 10_000):
            request(ws, "subscribe", streams)
            assert "too many streams" in expect_error(ws)
        request(ws, "unsubscribe", [f"{m}.a"] * 10_000)
        assert "too many streams" in expect_error(ws)
        assert subscribe(ws, []) == subscribed([f"{m}.a"])  # nothing changed
    with roomy.connect() as small:  # 10k names do not fit the default 4096 bytes
        expect(small, subscribed([]))


def test_stream_count_and_name_length_limits(roomy):
    m = unique()
    with roomy.connect() as ws:
        expect(ws, subscribed([]))
        many = [f"{m}.s{i}" for i in range(257)]
        request(ws, "subscribe", many)
        assert "too many streams" in expect_error(ws)
        assert subscribe(ws, many[:256]) == subscribed(many[:256])  # the limit itself is fine
        request(ws, "unsubscribe", many[:256])
        expect(ws, unsubscribed([]))
        for name in (f"{m}." + "x" * 300, "y" * 10_000, "é" * 257):
            request(ws, "subscribe", [f"{m}.ok", name])
            assert "longer than" in expect_error(ws)
        longest = f"{m}." + "z" * (256 - len(m) - 1)
        assert subscribe(ws, [longest]) == subscribed([longest])
        assert_alive(ws)


@pytest.mark.parametrize(
    "text",
    [
        "[" * 100_000 + "]" * 100_000,
        '{"event":"subscribe","streams":' + "[" * 100_000 + "]" * 100_000 + "}",
        '{"a":' * 50_000 + "1" + "}" * 50_000,
        '{"event":"subscribe","streams":["a.b"]' + "," * 100_000 + "}",
        '"' + "\\u0000" * 100_000 + '"',
    ],
    ids=["deep array", "deep streams", "deep object", "commas", "escapes"],
)
def test_pathological_json_is_an_error(roomy, text):
    answered_with_an_error(roomy, text)


def test_non_ascii_and_odd_stream_names(roomy, publisher_factory):
    publisher = publisher_factory(roomy.exchange)
    m = unique()
    names = [f"币{m}.交易", f"é{m}.trädes", f"😀{m}.x", f"{m}.\u200b", f"{m}.a b"]
    never = ["", ".", f"{m}.", f".{m}", f"{m}..x", f"{m}.a.b.c", f"a.{m}.b.c"]
    with roomy.connect() as ws:
        expect(ws, subscribed([]))
        # Names no routing key can match are not subscribed (PROTOCOL §4); the rest are.
        assert subscribe(ws, names + never) == subscribed(names)
        for n, name in enumerate(names):
            publisher.publish(f"public.{name}", {"n": n})
        for n, name in enumerate(names):
            expect(ws, {name: {"n": n}})


# Floods: RANGO_RATE_LIMIT (20 frames/s) and RANGO_RATE_BURST (100) by default


def rate_limit_closes(rango: Rango) -> float:
    return counter(rango, "rango_clients_closed_total", reason="rate_limit")


def test_ping_flood_gets_the_burst_then_1008(limited):
    closes = rate_limit_closes(limited)
    with Bystander(limited) as bystander, raw_client(limited) as raw:
        raw.send(frames(OP_TEXT, b"ping", 500))
        texts, _, code, reason = close_of(raw)
        assert (code, reason) == (1008, "rate limit exceeded")
        assert set(texts) == {b"pong"}
        assert 100 <= len(texts) <= 102, len(texts)  # the burst, and a token's refill at most
        wait_counter(limited, "rango_clients_closed_total", closes + 1, reason="rate_limit")
        bystander.checkpoint()
        bystander.stop()


def test_subscribe_flood_gets_the_burst_then_1008(limited):
    m = unique()
    with Bystander(limited) as bystander, raw_client(limited) as raw:
        requests = ({"event": "subscribe", "streams": [f"{m}.{i}"]} for i in range(500))
        raw.send(b"".join(RawClient.frame(OP_TEXT, orjson.dumps(r)) for r in requests))
        texts, _, code, _ = close_of(raw)
        assert code == 1008
        assert 100 <= len(texts) <= 102, len(texts)
        last = orjson.loads(texts[-1])
        assert last == subscribed([f"{m}.{i}" for i in range(len(texts))])
        wait_settled(limited, 1, m)  # the bystander only; the flooder's 100 streams are gone
        bystander.stop()


def test_websocket_ping_frames_count_too(limited):
    closes = rate_limit_closes(limited)
    with Bystander(limited) as bystander:
        with raw_client(limited) as raw:
            raw.send(frames(OP_PING, b"x", 500))
            _, pongs, code, reason = close_of(raw)
            assert (code, reason) == (1008, "rate limit exceeded")
            assert pongs <= 500
        # Control and text frames spend the same tokens: 60 + 40 make the burst.
        with raw_client(limited) as raw:
            raw.send(frames(OP_PING, b"x", 60) + frames(OP_TEXT, b"ping", 100))
            texts, pongs, code, _ = close_of(raw)
            assert code == 1008
            assert pongs == 60
            assert 40 <= len(texts) <= 42, len(texts)
        wait_counter(limited, "rango_clients_closed_total", closes + 2, reason="rate_limit")
        bystander.stop()


def test_nothing_is_answered_after_the_rate_limit_close(limited):
    with raw_client(limited) as raw:
        raw.send(frames(OP_PING, b"x", 150))
        assert close_of(raw)[2] == 1008
        # The flooder ignores the close frame and goes on.
        raw.send(frames(OP_PING, b"y", 200) + frames(OP_TEXT, b"ping", 10))
        answers = []
        deadline = time.monotonic() + 1.0
        try:
            while time.monotonic() < deadline:
                answers.append(raw.recv_frame(max(0.01, deadline - time.monotonic()))[1])
        except (TimeoutError, EOFError, ConnectionResetError):
            pass
        assert answers == [], f"{len(answers)} answers after the close"


def _paced(raw: RawClient, count: int, rate: float) -> None:
    """Send ``count`` text pings at ``rate`` a second (on a schedule, not drifting);
    stop early if the server has closed the connection."""
    start = time.monotonic()
    for n in range(count):
        delay = start + n / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        try:
            raw.send(RawClient.frame(OP_TEXT, b"ping"))
        except OSError:  # reset by the server: what was read before says why
            return


def test_client_within_the_default_rate_is_never_closed(limited):
    """A burst of 90, then 15 a second: 135 frames in all, never more than the bucket holds."""
    with raw_client(limited) as raw:
        raw.send(frames(OP_TEXT, b"ping", 90))
        _paced(raw, 45, 15.0)
        for _ in range(135):
            assert raw.recv_text() == "pong"
        raw.send(RawClient.frame(OP_TEXT, b"ping"))
        assert raw.recv_text() == "pong"


def test_configured_rate_and_burst(rango_factory):
    rango = rango_factory(env={"RANGO_RATE_LIMIT": "200", "RANGO_RATE_BURST": "50"})
    with raw_client(rango) as raw:  # half the rate, three times the burst: never closed
        _paced(raw, 150, 100.0)
        for _ in range(150):
            assert raw.recv_text() == "pong"
    with raw_client(rango) as raw:  # twice the rate: closed once the burst is spent
        _paced(raw, 300, 400.0)
        texts, _, code, _ = close_of(raw)
        assert code == 1008
        # Tokens run out after about 50 / (400 - 200) = 0.25 s, i.e. 100 frames.
        assert 50 <= len(texts) <= 200, len(texts)


# Subscriptions: RANGO_MAX_SUBSCRIPTIONS per connection


def too_many(stream: str) -> dict[str, Any]:
    return {"success": {"message": f"cannot subscribe to {stream}: too many subscriptions"}}


def test_subscription_cap(rango_factory, publisher_factory):
    rango = rango_factory(env={**FAST, "RANGO_MAX_SUBSCRIPTIONS": "10"})
    publisher = publisher_factory(rango.exchange)
    m = unique()
    s = [f"{m}.s{i}" for i in range(16)]
    with rango.connect(query="stream=" + ",".join(s[:12])) as ws:
        for stream in s[10:12]:
            expect(ws, too_many(stream))
        expect(ws, subscribed(s[:10]))
        request(ws, "subscribe", s[10:14] + s[:2])  # refused ones, then already subscribed ones
        for stream in s[10:14]:
            expect(ws, too_many(stream))
        expect(ws, subscribed(s[:10]))
        request(ws, "unsubscribe", s[:2])
        expect(ws, unsubscribed(s[2:10]))
        request(ws, "subscribe", s[13:16])
        expect(ws, too_many(s[15]))
        expect(ws, subscribed(s[2:10] + s[13:15]))
        # Refused streams get no events; the cap is per connection.
        with rango.connect(query=f"stream={s[15]}") as other:
            expect(other, subscribed([s[15]]))
            publisher.publish(f"public.{s[15]}", {"n": 1})
            publisher.publish(f"public.{s[14]}", {"n": 2})
            expect(other, {s[15]: {"n": 1}})
            expect(ws, {s[14]: {"n": 2}})


def test_default_cap_of_1024_with_2000_subscriptions(limited):
    m = unique()
    names = [f"{m}.{i:04d}" for i in range(2000)]
    with limited.connect() as ws:
        expect(ws, subscribed([]))
        for start in range(0, 2000, 200):
            request(ws, "subscribe", names[start : start + 200])
        refused_ = []
        answers = 0
        while answers < 10:
            frame = recv_json(ws)
            message = frame["success"]["message"]
            if message == "subscribed":
                answers += 1
                last = frame["success"]["streams"]
            else:
                refused_.append(frame)
        assert refused_ == [too_many(name) for name in names[1024:]]
        assert last == names[:1024]
    wait_settled(limited, 0, m)


# Connections: RANGO_MAX_CONNECTIONS per worker


def _connect_or_none(rango: Rango, stack: ExitStack) -> Any:
    try:
        ws = stack.enter_context(rango.connect())
    except InvalidStatus as exc:
        assert exc.response.status_code == 503
        return None
    expect(ws, subscribed([]))
    return ws


def test_connection_cap_refuses_with_503_and_recovers(rango_factory, keys):
    rango = rango_factory(env={"RANGO_MAX_CONNECTIONS": "5"})
    worker = the_worker(rango)
    with Bystander(rango) as bystander, ExitStack() as stack:
        others = []
        for _ in range(4):
            ws = stack.enter_context(rango.connect())
            expect(ws, subscribed([]))
            others.append(ws)
        for _ in range(3):
            assert refused(rango, "/public") == 503
        assert refused(rango, "/private", keys.bearer()) == 503
        bystander.checkpoint()
        for ws in others:
            assert_alive(ws)
        others[0].close()
        others[1].close()
        wait_for(lambda: _connect_or_none(rango, stack), 10, "a free connection slot")
        wait_for(lambda: _connect_or_none(rango, stack), 10, "a second free slot")
        assert refused(rango, "/public") == 503
        bystander.stop()
    wait_counter(rango, "rango_connections_rejected_total", 5, status="503")
    healthy(rango, worker)


# Upgrade requests: 16384 bytes at most


@pytest.mark.parametrize(
    ("path", "headers", "status"),
    [
        ("/public", {"X-Pad": "a" * 20_000}, 431),
        ("/", {"X-Pad": "a" * MB}, 431),
        ("/elsewhere?" + "stream=a.b&" * 2000, {}, 431),
        ("/public", {f"X-H{i}": "b" * 20 for i in range(1000)}, 431),
        ("/private", {"X-Pad": "a" * 20_000}, 401),
        ("/private", {"X-Pad": "a" * MB}, 401),
    ],
    ids=["20 KB header", "1 MB header", "long query", "1000 headers",
         "private 20 KB", "private 1 MB"],
)  # fmt: skip
def test_upgrade_request_too_large(gw, bystander, path, headers, status):
    before = counter(gw, "rango_connections_rejected_total", status=str(status))
    assert upgrade_status(gw.port, path, headers) == status
    wait_counter(gw, "rango_connections_rejected_total", before + 1, status=str(status))
    bystander.checkpoint()


def test_too_many_header_lines(gw, bystander):
    """Under the size limit, but more lines than websockets parses (it answers by itself)."""
    before = counter(gw, "rango_connections_rejected_total", status="431")
    assert upgrade_status(gw.port, "/public", {f"X-H{i}": "b" for i in range(200)}) == 431
    wait_counter(gw, "rango_connections_rejected_total", before + 1, status="431")
    bystander.checkpoint()


def test_malformed_request_is_closed_and_counted_as_400(gw, bystander):
    """websockets closes on a request it cannot parse, without an answer; it is counted."""
    before = counter(gw, "rango_connections_rejected_total", status="400")
    assert upgrade_status(gw.port, "/public", {"Bad Header": "x"}) == 0
    wait_counter(gw, "rango_connections_rejected_total", before + 1, status="400")
    bystander.checkpoint()


def test_upgrade_request_just_under_the_limit_is_accepted(gw):
    with gw.connect(additional_headers={"X-Pad": "a" * 15_000}) as ws:
        expect(ws, subscribed([]))


def test_too_large_private_request_in_small_segments_is_401(gw):
    assert upgrade_status(gw.port, "/private", {"X-Pad": "a" * 20_000}, first=7) == 401


# Memory: abuse and churn leave the worker's RSS and counts where they were


def _expect_close(raw: RawClient, code: int) -> None:
    assert close_of(raw)[2] == code


def _subscribe_many(raw: RawClient, streams: list[str]) -> None:
    raw.send(RawClient.frame(OP_TEXT, orjson.dumps({"event": "subscribe", "streams": streams})))
    assert orjson.loads(raw.recv_text()) == subscribed(streams)


def _errors(raw: RawClient, opcode: int, payload: bytes, count: int) -> None:
    raw.send(frames(opcode, payload, count))
    for _ in range(count):
        assert "error" in orjson.loads(raw.recv_text())


def _abuses(market: str) -> list[Callable[[RawClient], None]]:
    streams = [f"{market}.s{k}" for k in range(100)]
    return [
        lambda raw: (raw.send(RawClient.frame(OP_TEXT, b"x" * 5000)), _expect_close(raw, 1009)),
        lambda raw: (raw.send(RawClient.frame(OP_TEXT, b"\xff" * 64)), _expect_close(raw, 1007)),
        lambda raw: (raw.send(RawClient.frame(0x3, b"x")), _expect_close(raw, 1002)),
        lambda raw: _errors(raw, OP_TEXT, b"{not json", 10),
        lambda raw: _errors(raw, OP_BINARY, b"\x00" * 100, 5),
        lambda raw: _subscribe_many(raw, streams),
        lambda raw: _subscribe_many(raw, streams[::-1]),
    ]


def _abuse_round(rango: Rango, market: str, count: int = 200) -> int:
    """``count`` abusive connections at once; the worker's RSS while they are open."""
    abuses = _abuses(market)
    clients: list[RawClient] = []
    try:
        for n in range(count):
            if n % 10 == 8:
                half_handshake(rango.port)
            elif n % 10 == 9:
                assert upgrade_status(rango.port, "/public", {"X-Pad": "a" * 20_000}) == 431
            else:
                raw = raw_client(rango)
                clients.append(raw)
                abuses[n % len(abuses)](raw)
        return rss_bytes(the_worker(rango))
    finally:
        for n, raw in enumerate(clients):
            raw.close(reset=n % 2 == 1)  # half vanish with a reset, half with a plain FIN


def test_abusive_connections_leave_memory_and_counts_at_baseline(gw, bystander):
    worker = the_worker(gw)
    market = unique("ab")
    _abuse_round(gw, market)  # warm-up: allocator pools, code paths
    wait_settled(gw, 1, market)  # the bystander only
    baseline = rss_bytes(worker)
    peaks = [_abuse_round(gw, market) for _ in range(10)]  # 2000 abusive connections
    bystander.checkpoint()
    wait_settled(gw, 1, market)
    after = rss_bytes(worker)
    assert after - baseline < RSS_SLACK, f"RSS {baseline} -> {after} (peaks {peaks})"
    assert max(peaks) - baseline < 4 * RSS_SLACK, f"RSS {baseline}, peaks {peaks}"
    healthy(gw, worker)


# The streams connection ``n`` of batch ``batch`` subscribes to, besides ``<market>.all``.
Streams = Callable[[str, int, int], list[str]]


async def _churn(rango: Rango, publisher: Publisher, market: str, streams: Streams) -> None:
    """10 batches of 200 connections: open, subscribe, receive one event, close."""
    everyone = f"{market}.all"

    async def one(batch: int, n: int) -> Client:
        names = [everyone, *streams(market, batch, n)]
        return await open_client(rango.url("/public", "stream=" + ",".join(names)), everyone, names)

    for batch in range(10):
        clients = await asyncio.gather(*(one(batch, n) for n in range(200)))
        publisher.publish(f"public.{everyone}", {"n": batch})
        await wait_counts(clients, 1)
        assert all(c.numbers == [batch] for c in clients)
        await asyncio.gather(*(c.close() for c in clients))


def _shared(market: str, batch: int, n: int) -> list[str]:
    """Five of twenty streams each: every topic is shared by many connections."""
    return [f"{market}{(n + k) % 20}.trades" for k in range(5)]


def _churn_test(rango: Rango, publisher: Publisher, streams: Streams) -> None:
    """Churn once to warm up, then measure a second churn; no other client is open."""
    worker = the_worker(rango)
    market = unique("ch")
    asyncio.run(_churn(rango, publisher, f"{market}w", _shared))  # allocator pools, code paths
    wait_settled(rango, 0, market)
    baseline = rss_bytes(worker)
    asyncio.run(_churn(rango, publisher, market, streams))
    wait_settled(rango, 0, market)
    after = rss_bytes(worker)
    assert after - baseline < RSS_SLACK, f"RSS {baseline} -> {after}"
    healthy(rango, worker)


def test_churn_of_2000_connections(gw, publisher_factory):
    _churn_test(gw, publisher_factory(gw.exchange), _shared)


def test_churn_with_client_chosen_stream_names(rango_factory, publisher_factory):
    rango = rango_factory(env=FAST)
    publisher = publisher_factory(rango.exchange)
    # Twelve streams of its own each: 24000 topics nobody else ever watches.
    _churn_test(rango, publisher, lambda m, batch, n: [f"{m}{batch}x{n}.s{k}" for k in range(12)])
