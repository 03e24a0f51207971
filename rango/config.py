"""Configuration: environment variables and flags, validated once at start-up.

Every variable and flag of Ranger (Ruby) and Go Rango keeps its name and default
(PROTOCOL §1, §2). Rango's own settings use the ``RANGO_`` prefix. A bad value
raises :class:`ConfigError` whose message names the variable or flag, so the CLI
can print one clear line instead of a traceback.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, urlsplit

__all__ = [
    "DEFAULT_EXCHANGE",
    "LOG_LEVELS",
    "Config",
    "ConfigError",
    "EnvReader",
    "amqp_url_from_env",
    "exchange_from_env",
    "load_public_key_pem",
    "parse_addr",
]

LOG_LEVELS: dict[str, int] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "fatal": logging.CRITICAL,
}

# Algorithms PyJWT verifies with a public key; HMAC is excluded on purpose: a
# gateway that holds only a public key must never accept a token "signed" with it.
JWT_ALGORITHMS = (
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
    "ES256", "ES256K", "ES384", "ES512", "EdDSA",
)  # fmt: skip

_RBAC_ROLE = re.compile(r"^[A-Za-z0-9_\-]+$")

# Peatio's exchange for Ranger's events, as Ranger and Go Rango default to.
DEFAULT_EXCHANGE = "peatio.events.ranger"


class ConfigError(ValueError):
    """A setting has a value Rango cannot start with; the message names it."""


@dataclass(frozen=True, slots=True)
class Config:
    """Everything a worker needs, already parsed and checked."""

    ws_host: str = "0.0.0.0"
    ws_port: int = 8080
    metrics_host: str = "0.0.0.0"
    metrics_port: int = 4242
    amqp_url: str = "amqp://guest:guest@localhost:5672/"
    exchange: str = DEFAULT_EXCHANGE
    jwt_public_key: bytes = b""
    jwt_algorithm: str = "RS256"
    jwt_issuer: str | None = None
    jwt_audience: tuple[str, ...] | None = None
    jwt_default_leeway: int = 0
    jwt_iat_leeway: int | None = None
    jwt_exp_leeway: int | None = None
    jwt_nbf_leeway: int | None = None
    cors_origins: tuple[str, ...] | None = None
    rbac: Mapping[str, frozenset[str]] = field(default_factory=dict)
    log_level: str = "info"
    log_format: str = "text"
    # Client frames above this many bytes close the connection with 1009.
    max_frame_size: int = 4096
    # Outgoing bytes a client may have pending in the kernel-side send buffer of
    # the server before it is dropped as a slow client.
    max_pending_bytes: int = 4 * 1024 * 1024
    # Stored order-book increments per book before the book is discarded.
    max_increments: int = 10_000
    ping_interval: float = 54.0
    ping_timeout: float = 6.0
    handshake_timeout: float = 10.0
    # Upgraded connections per worker; more are refused with HTTP 503.
    max_connections: int = 50_000
    # Streams one connection may be subscribed to at once.
    max_subscriptions: int = 1024
    # Client frames per second per connection (token bucket) and the burst allowed.
    rate_limit: float = 20.0
    rate_burst: int = 100
    # Event bodies above this many bytes are dropped (a deep order-book snapshot
    # is a few hundred KB; a runaway publisher must not fill every client).
    max_event_size: int = 8 * 1024 * 1024
    tls_certfile: str | None = None
    tls_keyfile: str | None = None
    workers: int = 0

    @property
    def log_level_no(self) -> int:
        return LOG_LEVELS[self.log_level]

    @classmethod
    def from_env(
        cls, env: Mapping[str, str] | None = None, **flags: object
    ) -> Config:
        """Build a config from environment variables, then flags on top.

        ``flags`` holds the command-line values (``None`` when not given):
        ``ws_addr``, ``amqp_addr``, ``pub_key``, ``exchange``, ``workers``.
        """
        env = os.environ if env is None else env
        r = EnvReader(env)

        ws_addr = flags.get("ws_addr")
        if ws_addr:
            ws_host, ws_port = parse_addr(str(ws_addr), "--ws-addr")
        else:
            ws_host = r.str("RANGER_HOST", "0.0.0.0")
            ws_port = r.port("RANGER_PORT", 8080)

        amqp_addr = flags.get("amqp_addr")
        amqp_url = amqp_url_from_env(env, str(amqp_addr) if amqp_addr else None)

        algorithm = r.str("JWT_ALGORITHM", "RS256")
        if algorithm not in JWT_ALGORITHMS:
            raise ConfigError(
                f"JWT_ALGORITHM: {algorithm!r} is not one of {', '.join(JWT_ALGORITHMS)}"
            )

        key = load_public_key_pem(env, str(flags.get("pub_key") or "config/rsa-key.pub"))

        log_level = r.str("LOG_LEVEL", "info").lower()
        if log_level not in LOG_LEVELS:
            raise ConfigError(
                f"LOG_LEVEL: {log_level!r} is not one of debug, info, warn, error"
            )
        log_format = r.str("LOG_FORMAT", "text").lower()
        if log_format not in ("text", "json"):
            raise ConfigError(f"LOG_FORMAT: {log_format!r} is not one of text, json")

        exchange = exchange_from_env(env, flags.get("exchange"))  # type: ignore[arg-type]

        workers = flags.get("workers")
        if workers is None:
            workers = r.int("RANGO_WORKERS", 0, minimum=0, maximum=256)
        elif not isinstance(workers, int) or not 0 <= workers <= 256:
            raise ConfigError("--workers: must be a whole number from 1 to 256")

        tls = _tls_files(
            str(flags.get("certfile") or r.str("RANGO_TLS_CERTFILE", "")) or None,
            str(flags.get("keyfile") or r.str("RANGO_TLS_KEYFILE", "")) or None,
        )
        ping_interval = r.float("RANGO_PING_INTERVAL", 54.0, minimum=0.05)
        ping_timeout = r.float("RANGO_PING_TIMEOUT", 6.0, minimum=0.05)

        return cls(
            ws_host=ws_host,
            ws_port=ws_port,
            metrics_host=r.str("RANGO_METRICS_HOST", "0.0.0.0"),
            metrics_port=r.port("RANGO_METRICS_PORT", 4242),
            amqp_url=amqp_url,
            exchange=exchange,
            jwt_public_key=key,
            jwt_algorithm=algorithm,
            jwt_issuer=r.str("JWT_ISSUER", "") or None,
            jwt_audience=r.csv("JWT_AUDIENCE"),
            jwt_default_leeway=r.int("JWT_DEFAULT_LEEWAY", 0, minimum=0),
            jwt_iat_leeway=r.opt_int("JWT_ISSUED_AT_LEEWAY"),
            jwt_exp_leeway=r.opt_int("JWT_EXPIRATION_LEEWAY"),
            jwt_nbf_leeway=r.opt_int("JWT_NOT_BEFORE_LEEWAY"),
            cors_origins=_cors_origins(r.csv("API_CORS_ORIGINS")),
            rbac=_rbac(env),
            log_level=log_level,
            log_format=log_format,
            max_frame_size=r.int("RANGO_MAX_FRAME_SIZE", 4096, minimum=64, maximum=1 << 24),
            max_pending_bytes=r.int(
                "RANGO_MAX_PENDING_BYTES", 4 * 1024 * 1024, minimum=1024, maximum=1 << 34
            ),
            max_increments=r.int("RANGO_MAX_INCREMENTS", 10_000, minimum=1),
            ping_interval=ping_interval,
            ping_timeout=ping_timeout,
            handshake_timeout=r.float("RANGO_HANDSHAKE_TIMEOUT", 10.0, minimum=0.05),
            max_connections=r.int("RANGO_MAX_CONNECTIONS", 50_000, minimum=1),
            max_subscriptions=r.int("RANGO_MAX_SUBSCRIPTIONS", 1024, minimum=1),
            rate_limit=r.float("RANGO_RATE_LIMIT", 20.0, minimum=0.1),
            rate_burst=r.int("RANGO_RATE_BURST", 100, minimum=1),
            max_event_size=r.int("RANGO_MAX_EVENT_SIZE", 8 * 1024 * 1024, minimum=64),
            tls_certfile=tls[0],
            tls_keyfile=tls[1],
            workers=workers,
        )


class EnvReader:
    """Typed access to environment variables; errors name the variable."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env

    def str(self, name: str, default: str) -> str:
        value = self.env.get(name, "")
        return value.strip() or default

    def int(self, name: str, default: int, minimum: int = 0, maximum: int = 1 << 62) -> int:
        raw = self.env.get(name, "").strip()
        if not raw:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise ConfigError(f"{name}: {raw!r} is not a whole number") from None
        if not minimum <= value <= maximum:
            raise ConfigError(f"{name}: {value} is out of range ({minimum} to {maximum})")
        return value

    def opt_int(self, name: str) -> int | None:
        return self.int(name, 0) if self.env.get(name, "").strip() else None

    def float(self, name: str, default: float, minimum: float = 0.0) -> float:
        raw = self.env.get(name, "").strip()
        if not raw:
            return default
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"{name}: {raw!r} is not a number of seconds") from None
        if not minimum <= value < 1e9:
            raise ConfigError(f"{name}: {value} is out of range (at least {minimum})")
        return value

    def port(self, name: str, default: int) -> int:
        return self.int(name, default, minimum=1, maximum=65535)

    def csv(self, name: str) -> tuple[str, ...] | None:
        raw = self.env.get(name, "").strip()
        if not raw:
            return None
        return tuple(part.strip() for part in raw.split(",") if part.strip())


def parse_addr(value: str, name: str) -> tuple[str, int]:
    """Parse ``host:port`` (host may be empty or a bracketed IPv6 address)."""
    host, sep, port = value.rpartition(":")
    if not sep:
        raise ConfigError(f"{name}: {value!r} is not host:port")
    if ":" in host and not (host.startswith("[") and host.endswith("]")):
        raise ConfigError(f"{name}: {value!r}: write an IPv6 address in brackets, e.g. [::1]:8080")
    host = host.strip("[]") or "0.0.0.0"
    try:
        number = int(port)
    except ValueError:
        raise ConfigError(f"{name}: port {port!r} is not a number") from None
    if not 1 <= number <= 65535:
        raise ConfigError(f"{name}: port {number} is out of range (1 to 65535)")
    return host, number


def exchange_from_env(env: Mapping[str, str] | None = None, flag: str | None = None) -> str:
    """Return the ``--exchange`` flag's value, else ``RANGO_EXCHANGE``, else the default.

    Raises :class:`ConfigError` if the name is empty or longer than AMQP allows.
    """
    exchange = flag or EnvReader(os.environ if env is None else env).str(
        "RANGO_EXCHANGE", DEFAULT_EXCHANGE
    )
    if not 0 < len(exchange.encode()) <= 255:
        raise ConfigError("--exchange: the name must be 1 to 255 bytes")
    return exchange


def amqp_url_from_env(env: Mapping[str, str] | None = None, addr: str | None = None) -> str:
    """Return the RabbitMQ URL of the ``--amqp-addr`` flag, else of ``RABBITMQ_*``.

    ``addr``, the flag's value, is checked and returned when given. Otherwise the
    URL is built from ``RABBITMQ_USER``, ``RABBITMQ_PASSWORD``, ``RABBITMQ_HOST``
    and ``RABBITMQ_PORT`` in ``env`` (default: ``os.environ``), which default to
    ``amqp://guest:guest@localhost:5672/``.

    Raises :class:`ConfigError` if ``addr`` is not an ``amqp://`` or ``amqps://``
    URL or ``RABBITMQ_PORT`` is not a port number.
    """
    if addr:
        return _check_amqp_url(addr, "--amqp-addr")
    r = EnvReader(os.environ if env is None else env)
    host = r.str("RABBITMQ_HOST", "localhost")
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # an IPv6 address in a URL (RFC 3986 3.2.2)
    return "amqp://{}:{}@{}:{}/".format(
        quote(r.str("RABBITMQ_USER", "guest"), safe=""),
        quote(r.str("RABBITMQ_PASSWORD", "guest"), safe=""),
        host,
        r.port("RABBITMQ_PORT", 5672),
    )


def _check_amqp_url(url: str, name: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("amqp", "amqps") or not parts.hostname:
        raise ConfigError(f"{name}: {url!r} is not an amqp:// or amqps:// URL")
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(f"{name}: {url!r} has an invalid port") from None
    if port == 0:
        raise ConfigError(f"{name}: {url!r} has an invalid port")
    return url


def load_public_key_pem(env: Mapping[str, str], pub_key_path: str) -> bytes:
    """Return the JWT public key as PEM bytes, checked to parse.

    ``JWT_PUBLIC_KEY`` (base64 of a PEM, as Ranger and Go Rango take it; a raw
    PEM is accepted too) wins over the file named by ``--pubKey``.
    """
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    raw = env.get("JWT_PUBLIC_KEY", "").strip()
    if raw:
        name = "JWT_PUBLIC_KEY"
        if raw.startswith("-----BEGIN"):
            pem = raw.encode()
        else:
            # Line breaks are ignored (as Go Rango's decoder) and padding may be
            # left out (as Ranger's urlsafe_decode64).
            raw = "".join(raw.split())
            try:
                pem = base64.b64decode(raw + "=" * (-len(raw) % 4), validate=True)
            except (binascii.Error, ValueError):
                raise ConfigError(
                    "JWT_PUBLIC_KEY: not valid base64 (expected base64 of a PEM)"
                ) from None
    else:
        name = f"--pubKey {pub_key_path}"
        path = Path(pub_key_path)
        try:
            pem = path.read_bytes()
        except FileNotFoundError:
            raise ConfigError(
                f"--pubKey: no key file at {pub_key_path} and JWT_PUBLIC_KEY is not set "
                "(run `rango keygen` for a development key pair)"
            ) from None
        except OSError as exc:
            raise ConfigError(f"--pubKey: cannot read {pub_key_path}: {exc.strerror}") from None
    try:
        load_pem_public_key(pem)
    except (ValueError, TypeError) as exc:
        # cryptography's messages run on with URLs and advice: keep the first sentence.
        reason = str(exc).split("\n")[0].split(". ")[0][:120] or type(exc).__name__
        raise ConfigError(f"{name}: not a PEM public key ({reason})") from None
    return pem


def _tls_files(certfile: str | None, keyfile: str | None) -> tuple[str | None, str | None]:
    """Check that the certificate and key load together (both or neither given)."""
    if certfile is None and keyfile is None:
        return None, None
    if certfile is None:
        raise ConfigError("--certfile/RANGO_TLS_CERTFILE: required with --keyfile")
    for path in (certfile, keyfile):
        if path is not None and not Path(path).is_file():
            raise ConfigError(f"--certfile/--keyfile: no such file {path}")
    import ssl

    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(certfile, keyfile)
    except FileNotFoundError as exc:
        raise ConfigError(f"--certfile/--keyfile: no such file {exc.filename}") from None
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            f"--certfile/--keyfile: cannot load {certfile}"
            + (f" with {keyfile}" if keyfile else "")
            + f": {getattr(exc, 'reason', None) or exc.strerror or exc}"
        ) from None
    return certfile, keyfile


def _cors_origins(items: tuple[str, ...] | None) -> tuple[str, ...] | None:
    """Reduce each origin (a host or a URL) to a lower-case ``host[:port]``."""
    if items is None:
        return None
    hosts = []
    for item in items:
        if "://" in item:
            netloc = urlsplit(item).netloc
            if not netloc:
                raise ConfigError(f"API_CORS_ORIGINS: {item!r} is not a URL or host")
            hosts.append(netloc.lower())
        else:
            hosts.append(item.lower())
    return tuple(hosts)


def _rbac(env: Mapping[str, str]) -> dict[str, frozenset[str]]:
    """``RANGO_RBAC_<PREFIX>=role1,role2`` opens prefix ``<prefix>`` to those roles."""
    rules: dict[str, frozenset[str]] = {}
    for name, value in env.items():
        if not name.startswith("RANGO_RBAC_"):
            continue
        prefix = name[len("RANGO_RBAC_"):].lower()
        if not prefix or not _RBAC_ROLE.match(prefix):
            raise ConfigError(f"{name}: the prefix must be letters, digits, _ or -")
        roles = [role.strip() for role in value.split(",")]
        if not value.strip() or any(not role or not _RBAC_ROLE.match(role) for role in roles):
            raise ConfigError(
                f"{name}: {value!r} is not a comma list of roles (letters, digits, _ or -)"
            )
        rules[prefix] = frozenset(roles)
    return rules
