"""Configuration: environment variables and flags, validated once at start-up.

Every variable and flag of Ranger (Ruby) and Go Rango keeps its name and default
(PROTOCOL §1, §2). Rango's own settings use the ``RANGO_`` prefix. What each
setting is — parser, default, bounds, help, the field it fills — is written once,
in :data:`rango.settings.SETTINGS`; this module turns the table into a
:class:`Config`. A bad value raises :class:`ConfigError` whose message names the
variable or flag, so the CLI can print one clear line instead of a traceback.
"""

from __future__ import annotations

import builtins
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# The table and its parsers; DEFAULT_EXCHANGE, JWT_ALGORITHMS, LOG_LEVELS,
# ConfigError, load_public_key_pem and parse_addr are re-exported (the tools, the
# exporter and the tests import them from here).
from .settings import (
    DEFAULT_EXCHANGE,
    FLAGS,
    JWT_ALGORITHMS,
    LOG_LEVELS,
    SETTINGS,
    ConfigError,
    Parser,
    Setting,
    Source,
    comma_list,
    field_default,
    load_public_key_pem,
    number,
    parse_addr,
    port,
    setting,
    text,
    whole,
)

__all__ = [
    "DEFAULT_EXCHANGE",
    "JWT_ALGORITHMS",
    "LOG_LEVELS",
    "Config",
    "ConfigError",
    "EnvReader",
    "amqp_urls_from_env",
    "exchange_from_env",
    "load_public_key_pem",
    "parse_addr",
]


@dataclass(frozen=True, slots=True)
class Config:
    """Everything a worker needs, already parsed and checked.

    Each field is filled by the row of :data:`~rango.settings.SETTINGS` that names
    it, whose help says what it means; the defaults are the rows' too.
    """

    ws_host: str = field_default("ws_host")
    ws_port: int = field_default("ws_port")
    metrics_host: str = field_default("metrics_host")
    metrics_port: int = field_default("metrics_port")
    amqp_urls: tuple[str, ...] = field_default("amqp_urls")
    exchange: str = field_default("exchange")
    jwt_public_key: bytes = field_default("jwt_public_key")
    jwt_algorithm: str = field_default("jwt_algorithm")
    jwt_issuer: str | None = field_default("jwt_issuer")
    jwt_audience: tuple[str, ...] | None = field_default("jwt_audience")
    jwt_default_leeway: int = field_default("jwt_default_leeway")
    jwt_iat_leeway: int | None = field_default("jwt_iat_leeway")
    jwt_exp_leeway: int | None = field_default("jwt_exp_leeway")
    jwt_nbf_leeway: int | None = field_default("jwt_nbf_leeway")
    cors_origins: tuple[str, ...] | None = field_default("cors_origins")
    rbac: Mapping[str, frozenset[str]] = field_default("rbac")
    log_level: str = field_default("log_level")
    log_format: str = field_default("log_format")
    max_frame_size: int = field_default("max_frame_size")
    max_pending_bytes: int = field_default("max_pending_bytes")
    max_increments: int = field_default("max_increments")
    ping_interval: float = field_default("ping_interval")
    ping_timeout: float = field_default("ping_timeout")
    handshake_timeout: float = field_default("handshake_timeout")
    max_connections: int = field_default("max_connections")
    max_subscriptions: int = field_default("max_subscriptions")
    rate_limit: float = field_default("rate_limit")
    rate_burst: int = field_default("rate_burst")
    max_event_size: int = field_default("max_event_size")
    compression: bool = field_default("compression")
    compression_min_size: int = field_default("compression_min_size")
    compression_level: int = field_default("compression_level")
    tls_certfile: str | None = field_default("tls_certfile")
    tls_keyfile: str | None = field_default("tls_keyfile")
    workers: int = field_default("workers")
    preload: bool = field_default("preload")

    @property
    def log_level_no(self) -> int:
        return LOG_LEVELS[self.log_level]

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **flags: object) -> Config:
        """Build a config from environment variables, then flags on top.

        ``flags`` holds the command-line values by their argparse ``dest``
        (``None`` when not given): ``ws_addr``, ``amqp_addr``, ``pub_key``,
        ``exchange``, ``workers``, ``certfile``, ``keyfile``. Rows are read in the
        table's order, so the first bad setting there is the one reported.
        """
        unknown = set(flags) - {flag.dest for flag in FLAGS}
        if unknown:
            raise TypeError(f"Config.from_env: unknown flags {', '.join(sorted(unknown))}")
        source = Source(os.environ if env is None else env, flags)
        return cls(**{row.field: row.read(source) for row in SETTINGS if row.field})


class EnvReader:
    """Typed access to environment variables; errors name the variable.

    For code outside :class:`Config` (the exporter): :meth:`setting` reads a row
    of :data:`~rango.settings.SETTINGS` with its parser and default. The typed
    methods take the default and bounds as arguments, and check the way the
    table's parsers do (they are the same parsers).
    """

    # The methods are named after the types they return, so inside this class
    # ``str``, ``int`` and ``float`` are the methods: the types are spelled builtins.*.

    def __init__(self, env: Mapping[builtins.str, builtins.str]) -> None:
        self.env = env

    def setting(self, name: builtins.str) -> object:
        """Variable ``name`` as its row reads it (its default when unset)."""
        return setting(name).value(Source(self.env))

    def _value(
        self,
        name: builtins.str,
        default: object,
        parse: Parser,
        minimum: builtins.float | None = None,
        maximum: builtins.float | None = None,
        unit: builtins.str = "",
    ) -> Any:
        """Read ``name`` as a row of the table would, its parser and bounds given here."""
        row = Setting(
            name=name, help="", group="rango", default=default, parse=parse,
            minimum=minimum, maximum=maximum, unit=unit,
        )  # fmt: skip
        return row.value(Source(self.env))

    def str(self, name: builtins.str, default: builtins.str) -> builtins.str:
        return builtins.str(self._value(name, default, text))

    def int(
        self,
        name: builtins.str,
        default: builtins.int,
        minimum: builtins.int = 0,
        maximum: builtins.int = 1 << 62,
    ) -> builtins.int:
        return builtins.int(self._value(name, default, whole, minimum=minimum, maximum=maximum))

    def opt_int(self, name: builtins.str) -> builtins.int | None:
        return self.int(name, 0) if self.env.get(name, "").strip() else None

    def float(
        self, name: builtins.str, default: builtins.float, minimum: builtins.float = 0.0
    ) -> builtins.float:
        return builtins.float(
            self._value(name, default, number, unit="seconds", minimum=minimum)
        )

    def port(self, name: builtins.str, default: builtins.int) -> builtins.int:
        return builtins.int(self._value(name, default, port))

    def csv(self, name: builtins.str) -> tuple[builtins.str, ...] | None:
        value = self._value(name, None, comma_list)
        return None if value is None else tuple(value)


def exchange_from_env(env: Mapping[str, str] | None = None, flag: str | None = None) -> str:
    """Return the ``--exchange`` flag's value, else ``RANGO_EXCHANGE``, else the default.

    Raises :class:`ConfigError` if the name is empty or longer than AMQP allows.
    """
    source = Source(os.environ if env is None else env, {"exchange": flag})
    return str(setting("RANGO_EXCHANGE").read(source))


def amqp_urls_from_env(
    env: Mapping[str, str] | None = None, addr: str | None = None
) -> tuple[str, ...]:
    """Return the RabbitMQ URLs of the ``--amqp-addr`` flag, else of ``RABBITMQ_*``.

    ``addr``, the flag's value (one URL or a comma list), is checked and returned when
    given. Otherwise one URL per ``RABBITMQ_HOST`` entry is built with
    ``RABBITMQ_USER``, ``RABBITMQ_PASSWORD`` and ``RABBITMQ_PORT`` in ``env``
    (default: ``os.environ``), as their rows say.

    Raises :class:`ConfigError` if an entry is not an ``amqp://`` or ``amqps://``
    URL, not a host or ``host:port``, or ``RABBITMQ_PORT`` is not a port number.
    """
    source = Source(os.environ if env is None else env, {"amqp_addr": addr})
    return tuple(setting("RABBITMQ_HOST").read(source))
