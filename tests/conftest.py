"""The shared fixtures: a dev key pair and an untrusted one, real Rango processes, real
RabbitMQ publishers, a proxy in front of the broker, a three-node RabbitMQ cluster of
the tests' own (``rabbitmq_cluster``, from support.cluster). The code behind them is in
``tests/support``.

Every Rango started here listens on free ports and consumes its own exchange
(``rango.test.<random>``), so tests never see each other's events.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support.broker import BROKER, Publisher, TcpProxy
from support.clients import Browser, chromium_path
from support.cluster import rabbitmq_cluster, rabbitmq_cluster_session  # noqa: F401 - fixtures
from support.gateway import Rango
from support.tokens import KeyPair


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> KeyPair:
    """The key pair the gateways trust."""
    return KeyPair(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="session")
def other_keys(tmp_path_factory: pytest.TempPathFactory) -> KeyPair:
    """A key pair the gateways do not trust."""
    return KeyPair(tmp_path_factory.mktemp("other-keys"))


@pytest.fixture
def rango_factory(keys: KeyPair, tmp_path: Path) -> Iterator[Callable[..., Rango]]:
    """Start Rango processes with extra env/args; all are stopped at teardown."""
    started: list[Rango] = []

    def start(env: dict[str, str] | None = None, args: list[str] | None = None,
              wait: bool = True, exchange: str | None = None) -> Rango:
        rango = Rango(keys, tmp_path, env, args, exchange)
        started.append(rango)
        return rango.start(wait=wait)

    yield start
    for rango in started:
        rango.stop(signal.SIGKILL if rango.exited() else signal.SIGTERM)


@pytest.fixture(scope="module")
def rango(keys: KeyPair, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rango]:
    """One Rango shared by a test module (tests use their own stream names)."""
    env = {"RANGO_RBAC_ADMIN": "admin,superadmin"}
    with Rango(keys, tmp_path_factory.mktemp("rango"), env=env) as instance:
        yield instance


@pytest.fixture
def publisher_factory() -> Iterator[Callable[[str], Publisher]]:
    """Publishers to any exchange; all are closed at teardown."""
    publishers: list[Publisher] = []

    def make(exchange: str) -> Publisher:
        pub = Publisher(exchange)
        publishers.append(pub)
        return pub

    yield make
    for pub in publishers:
        pub.close()


@pytest.fixture
def publisher(rango: Rango, publisher_factory: Callable[[str], Publisher]) -> Publisher:
    """A publisher to the module's Rango."""
    return publisher_factory(rango.exchange)


@pytest.fixture
def proxy() -> Iterator[TcpProxy]:
    """A proxy to the real broker, forwarding until switched off."""
    p = TcpProxy(BROKER)
    yield p
    p.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browser]:
    """Headless Chromium (skipped where it is not installed), one per test module."""
    chromium = chromium_path()
    directory = tmp_path_factory.mktemp("chromium")
    instance = Browser(chromium, directory / "profile", directory / "browser.log")
    yield instance
    instance.close()
