"""PROTOCOL §2, end to end: endpoints, authentication, origin, query-string streams."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import jwt
import orjson
import pytest
from support.answers import expect, recv_json, refused, subscribed
from support.broker import Publisher, unique
from support.gateway import Rango
from support.tokens import UID, KeyPair, forge

# Helpers


def bad_token(keys: KeyPair, other_keys: KeyPair, uid: str, name: str) -> str:
    """An Authorization header, by name, that must not authenticate ``uid``."""
    now = int(time.time())
    payload = keys.claims(uid=uid)
    make = {
        "garbage": lambda: "Bearer not-a-token",
        "other key": lambda: f"Bearer {other_keys.token(uid=uid)}",
        "expired": lambda: f"Bearer {keys.token(uid=uid, exp=now - 60, iat=now - 120)}",
        "not yet valid": lambda: f"Bearer {keys.token(uid=uid, nbf=now + 600)}",
        "alg none": lambda: "Bearer " + forge({"alg": "none", "typ": "JWT"}, payload, None),
        "HS256 with the public key": lambda: (
            "Bearer " + forge({"alg": "HS256", "typ": "JWT"}, payload, keys.public_pem)
        ),
        "RS512 (valid key, other algorithm)": lambda: (
            "Bearer " + jwt.encode(payload, keys.private_key, algorithm="RS512")
        ),
        "lower-case scheme": lambda: f"bearer {keys.token(uid=uid)}",
        "two spaces": lambda: f"Bearer  {keys.token(uid=uid)}",
        "no scheme": lambda: keys.token(uid=uid),
        "empty": lambda: "",
    }
    return make[name]()


BAD_TOKEN_NAMES = [
    "garbage", "other key", "expired", "not yet valid", "alg none",
    "HS256 with the public key", "RS512 (valid key, other algorithm)",
    "lower-case scheme", "two spaces", "no scheme", "empty",
]  # fmt: skip


# Endpoints


@pytest.mark.parametrize("path", ["/public", "/", "/anything", "/some/other/path", "/public/x"])
def test_anonymous_upgrade_on_public_and_other_paths(rango, path):
    market = unique()
    with rango.connect(path, f"stream={market}.trades") as ws:
        expect(ws, subscribed([f"{market}.trades"]))


def test_private_without_token_is_401(rango):
    assert refused(rango, "/private") == 401


def test_private_with_query_and_without_token_is_401(rango):
    assert refused(rango, "/private?stream=order") == 401


@pytest.mark.parametrize("name", BAD_TOKEN_NAMES)
def test_private_with_invalid_token_is_401(rango, keys, other_keys, name):
    header = bad_token(keys, other_keys, UID, name)
    assert refused(rango, "/private", {"Authorization": header}) == 401


def test_valid_token_still_401_after_refusals_and_gateway_keeps_serving(rango, keys, publisher):
    """A refused upgrade leaves the gateway serving normal clients."""
    for _ in range(3):
        assert refused(rango, "/private") == 401
    uid = unique("ID")
    with rango.connect("/private", "stream=order", additional_headers=keys.bearer(uid=uid)) as ws:
        expect(ws, subscribed(["order"]))
        publisher.publish(f"private.{uid}.order", {"id": 1})
        expect(ws, {"order": {"id": 1}})


@pytest.mark.parametrize("path", ["/private", "/", "/public", "/elsewhere"])
def test_valid_token_delivers_private_events(rango, keys, publisher, path):
    uid, market = unique("ID"), unique()
    with rango.connect(
        path, f"stream=order,trade&stream={market}.trades", additional_headers=keys.bearer(uid=uid)
    ) as ws:
        expect(ws, subscribed(["order", "trade", f"{market}.trades"]))
        publisher.publish(f"private.{uid}.trade", {"id": 7})
        publisher.publish(f"public.{market}.trades", {"tid": 1})
        publisher.publish(f"private.{uid}.order", {"id": 22})
        expect(ws, {"trade": {"id": 7}})
        expect(ws, {f"{market}.trades": {"tid": 1}})
        expect(ws, {"order": {"id": 22}})


@pytest.mark.parametrize("path", ["/", "/public", "/elsewhere"])
@pytest.mark.parametrize(
    "name",
    ["garbage", "other key", "expired", "alg none", "HS256 with the public key", "two spaces"],
)
def test_invalid_token_on_public_paths_is_anonymous(rango, keys, other_keys, publisher, path, name):
    uid, market = unique("ID"), unique()
    header = bad_token(keys, other_keys, uid, name)
    with rango.connect(
        path, f"stream=order&stream={market}.trades", additional_headers={"Authorization": header}
    ) as ws:
        # The private stream is silently not subscribed.
        expect(ws, subscribed([f"{market}.trades"]))
        ws.send(orjson.dumps({"event": "subscribe", "streams": ["trade"]}).decode())
        expect(ws, subscribed([f"{market}.trades"]))
        publisher.publish(f"private.{uid}.order", {"id": 1})
        publisher.publish(f"private.{uid}.trade", {"id": 2})
        publisher.publish(f"public.{market}.trades", {"marker": True})
        expect(ws, {f"{market}.trades": {"marker": True}})


def test_no_token_on_root_is_anonymous(rango, publisher):
    market = unique()
    with rango.connect("/", f"stream=order,{market}.trades") as ws:
        expect(ws, subscribed([f"{market}.trades"]))
        publisher.publish(f"private.{UID}.order", {"id": 1})
        publisher.publish(f"public.{market}.trades", {"marker": True})
        expect(ws, {f"{market}.trades": {"marker": True}})


def test_token_of_another_user_gets_only_its_own_events(rango, keys, publisher):
    me, other = unique("ID"), unique("ID")
    with rango.connect("/private", "stream=order", additional_headers=keys.bearer(uid=me)) as ws:
        expect(ws, subscribed(["order"]))
        publisher.publish(f"private.{other}.order", {"who": "other"})
        publisher.publish(f"private.{me}.order", {"who": "me"})
        expect(ws, {"order": {"who": "me"}})


# Origin


def test_origin_default_same_host_allowed(rango):
    for origin in (f"http://127.0.0.1:{rango.port}", f"https://127.0.0.1:{rango.port}"):
        with rango.connect("/public", origin=origin) as ws:
            expect(ws, subscribed([]))


def test_origin_default_without_origin_allowed(rango):
    with rango.connect("/public") as ws:
        expect(ws, subscribed([]))


@pytest.mark.parametrize(
    "origin",
    ["http://evil.example", "https://evil.example:443", "http://127.0.0.1:1", "null"],
)
@pytest.mark.parametrize("path", ["/public", "/"])
def test_origin_default_other_host_is_403(rango, origin, path):
    assert refused(rango, path, origin=origin) == 403


def test_origin_default_other_host_is_403_on_private_with_valid_token(rango, keys):
    assert refused(rango, "/private", keys.bearer(), origin="http://evil.example") == 403


@pytest.fixture(scope="module")
def cors_rango(keys: KeyPair, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rango]:
    with Rango(
        keys,
        tmp_path_factory.mktemp("cors"),
        env={"API_CORS_ORIGINS": "https://app.example.com, trader.example.org:8443"},
    ) as instance:
        yield instance


@pytest.mark.parametrize(
    "origin",
    [
        "https://app.example.com",  # listed as a URL
        "http://app.example.com",  # the host is what counts
        "https://APP.example.com",  # hosts compare case-insensitively
        "http://trader.example.org:8443",  # listed as a host
    ],
)
def test_origin_listed_is_allowed(cors_rango, keys, origin):
    with cors_rango.connect(
        "/private", "stream=order", additional_headers=keys.bearer(), origin=origin
    ) as ws:
        expect(ws, subscribed(["order"]))


@pytest.mark.parametrize(
    "origin",
    [
        "https://evil.example",
        "https://app.example.com.evil.example",
        "http://trader.example.org",  # listed with a port
        "null",
    ],
)
def test_origin_not_listed_is_403(cors_rango, origin):
    assert refused(cors_rango, "/public", origin=origin) == 403


def test_origin_null_is_allowed_only_when_listed(rango_factory):
    dev = rango_factory(env={"API_CORS_ORIGINS": "null,https://app.example.com"})
    with dev.connect("/public", "stream=x.trades", origin="null") as ws:
        expect(ws, subscribed(["x.trades"]))
    assert refused(dev, "/public", origin="https://other.example") == 403


def test_origin_same_host_not_listed_is_403(cors_rango):
    assert refused(cors_rango, "/public", origin=f"http://127.0.0.1:{cors_rango.port}") == 403


# Query-string subscriptions and the first frame


@pytest.mark.parametrize("form", ["repeated", "comma", "mixed", "encoded comma"])
def test_query_string_subscriptions(rango, form):
    m = unique()
    a, b, c = f"{m}.trades", f"{m}.ob-inc", f"global.{m}"
    query = {
        "repeated": f"stream={a}&stream={b}&stream={c}",
        "comma": f"stream={a},{b},{c}",
        "mixed": f"stream={a},{b}&stream={c}",
        "encoded comma": f"stream={a}%2C{b}&stream={c}",
    }[form]
    with rango.connect("/public", query) as ws:
        expect(ws, subscribed([a, b, c]))


def test_query_string_ignores_other_parameters_and_duplicates(rango):
    m = unique()
    with rango.connect("/", f"foo=bar&stream={m}.trades&stream={m}.trades,&x=1") as ws:
        expect(ws, subscribed([f"{m}.trades"]))


def test_query_streams_receive_events(rango, publisher):
    m = unique()
    with rango.connect("/", f"stream={m}.trades,{m}.tickers&stream=global.{m}") as ws:
        expect(ws, subscribed([f"{m}.trades", f"{m}.tickers", f"global.{m}"]))
        publisher.publish(f"public.{m}.tickers", {"n": 1})
        publisher.publish(f"global.{m}", {"n": 2})
        publisher.publish(f"public.{m}.trades", {"n": 3})
        expect(ws, {f"{m}.tickers": {"n": 1}})
        expect(ws, {f"global.{m}": {"n": 2}})
        expect(ws, {f"{m}.trades": {"n": 3}})


def test_subscribed_answer_is_the_first_frame_while_events_flow(rango):
    """Events already flowing on a query stream never come before the answer."""
    m = unique()
    stop, started = threading.Event(), threading.Event()

    def flood() -> None:
        pub = Publisher(rango.exchange)
        try:
            n = 0
            while not stop.is_set() and n < 50000:
                n += 1
                pub.publish(f"public.{m}.trades", {"n": n})
                started.set()
        finally:
            pub.close()

    thread = threading.Thread(target=flood)
    thread.start()
    try:
        assert started.wait(10)
        # max_queue=None: the client keeps reading while events flood in, so that
        # close() sees the close frame instead of waiting for its close_timeout.
        for _ in range(6):
            with rango.connect("/public", f"stream={m}.trades", max_queue=None) as ws:
                assert recv_json(ws) == subscribed([f"{m}.trades"])
                assert list(recv_json(ws)) == [f"{m}.trades"]
    finally:
        stop.set()
        thread.join()


def test_subscribed_answer_without_streams(rango):
    with rango.connect("/") as ws:
        expect(ws, subscribed([]))
