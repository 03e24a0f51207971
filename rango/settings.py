"""Every setting of Rango, defined once: :data:`SETTINGS`, one row per variable.

A row (:class:`Setting`) holds all there is to know about one environment
variable: how to parse it, its default and bounds, its help text, the
:class:`~rango.config.Config` field it fills and the command-line flag that
overrides it. Everything else is derived from the table, so that nothing drifts:

* :meth:`rango.config.Config.from_env` reads each row that fills a field, in the
  table's order, and the ``Config`` dataclass takes its defaults from the rows
  (:func:`field_default`);
* the ``environment`` part of ``rango --help`` is :func:`help_text`, and the help
  and argparse type of each run flag come from :data:`FLAGS` (:func:`flag_help`,
  :func:`flag_type`), so ``--workers`` and ``RANGO_WORKERS`` share one check;
* README's configuration table is :func:`markdown` (``python -m rango.settings
  --markdown`` prints it; ``tests/unit/test_settings.py`` fails when README differs).

A new simple setting needs only a new row (plus the code that uses its value).
Settings that are more than one scalar (the AMQP URL, the JWT key, the TLS pair,
``RANGO_RBAC_<PREFIX>``) still have a row each, with a ``build`` function that
produces the field's value from the :class:`Source`.

Parsing errors are :class:`ConfigError` whose message starts with the variable's
or the flag's name, so the CLI can print one line instead of a traceback.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import dataclasses
import logging
import os
import re
import sys
import textwrap
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote, urlsplit

__all__ = [
    "DEFAULT_EXCHANGE",
    "FLAGS",
    "JWT_ALGORITHMS",
    "LOG_LEVELS",
    "SETTINGS",
    "ConfigError",
    "Flag",
    "Setting",
    "Source",
    "environment",
    "field_default",
    "flag_help",
    "flag_type",
    "help_text",
    "load_public_key_pem",
    "markdown",
    "parse_addr",
    "read_env_file",
    "setting",
    "tcp_migrate_req",
]


class ConfigError(ValueError):
    """A setting has a value Rango cannot start with; the message names it.

    The message is one line: a value quoted in it is cut in its middle when the
    line would run past :attr:`MAX_LENGTH` (a 100 KB variable must not flood a log).
    """

    MAX_LENGTH = 240

    def __init__(self, message: str) -> None:
        message = " ".join(message.splitlines())
        if len(message) > self.MAX_LENGTH:
            keep = self.MAX_LENGTH // 2 - 2
            message = f"{message[:keep]} … {message[-keep:]}"
        super().__init__(message)


class Invalid(ValueError):
    """A value a parser refuses; the message is what is wrong, without the name.

    The name is added by whoever knows where the value came from (a variable, a
    flag, or argparse, which names the flag itself).
    """


# What a value is, once parsed: the table holds strings, numbers, tuples, bytes
# and mappings side by side, so a row's value can only be typed as Any; each
# Config field states the precise type.
Parser = Callable[["Setting", str], Any]
Builder = Callable[["Setting", "Source"], Any]
Group = Literal["ranger", "rango"]


# Parsers: (row, stripped non-empty text) -> value, raising Invalid.

# The ceilings of rows that state none: big enough to mean "no limit", finite so
# that a typo's extra digits (or inf, or nan, which fails every comparison) are
# still refused. The whole-number one shows in messages, as it always has.
_WHOLE_MAXIMUM = 1 << 62
_NUMBER_CEILING = 1e9


def whole(row: Setting, raw: str) -> int:
    """A whole number within the row's bounds (at least 0 unless told)."""
    maximum = _WHOLE_MAXIMUM if row.maximum is None else int(row.maximum)
    return _integer(raw, int(row.minimum or 0), maximum)


def port(row: Setting, raw: str) -> int:
    """A TCP port number."""
    return _integer(raw, 1, 65535)


def _integer(raw: str, minimum: int, maximum: int) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise Invalid(f"{raw!r} is not a whole number") from None
    if not minimum <= value <= maximum:
        raise Invalid(f"{value} is out of range ({minimum} to {maximum})")
    return value


def number(row: Setting, raw: str) -> float:
    """A finite number, at least the row's minimum."""
    minimum = float(row.minimum or 0)
    try:
        value = float(raw)
    except ValueError:
        unit = f" of {row.unit}" if row.unit else ""
        raise Invalid(f"{raw!r} is not a number{unit}") from None
    if not minimum <= value < _NUMBER_CEILING:
        raise Invalid(f"{value} is out of range (at least {minimum})")
    return value


def _utf8(raw: str) -> str:
    """``raw`` itself when it is text; os.environ and argv carry bytes that are not
    UTF-8 as lone surrogates (PEP 383), which no parser below expects."""
    try:
        raw.encode()
    except UnicodeEncodeError:
        raise Invalid(f"{raw!r} is not UTF-8 text") from None
    return raw


def text(row: Setting, raw: str) -> str:
    """Text as given, its UTF-8 length within the row's bounds when it has some."""
    if row.maximum is not None and not (row.minimum or 0) <= len(raw.encode()) <= row.maximum:
        raise Invalid(f"must be {row.bounds()}")
    return raw


def one_of(row: Setting, raw: str) -> str:
    """One of the row's choices, spelled exactly."""
    if raw not in row.choices:
        raise Invalid(f"{raw!r} is not one of {', '.join(row.choices)}")
    return raw


def one_of_any_case(row: Setting, raw: str) -> str:
    """One of the row's (lower-case) choices, in any case; the value is lower-case."""
    return one_of(row, raw.lower())


def comma_list(row: Setting, raw: str) -> tuple[str, ...]:
    """A comma list; blanks around and between the items are dropped."""
    return tuple(part.strip() for part in raw.split(",") if part.strip())


def origins(row: Setting, raw: str) -> tuple[str, ...]:
    """A comma list of hosts or URLs, each reduced to a lower-case ``host[:port]``."""
    hosts = []
    for item in comma_list(row, raw):
        if "://" in item:
            netloc = urlsplit(item).netloc
            if not netloc:
                raise Invalid(f"{item!r} is not a URL or host")
            hosts.append(netloc.lower())
        else:
            hosts.append(item.lower())
    return tuple(hosts)


def zero_one(row: Setting, raw: str) -> bool:
    """``0`` (off) or ``1`` (on), nothing else."""
    if raw not in ("0", "1"):
        raise Invalid(f"{raw!r} is not 0 or 1")
    return raw == "1"


def switch(row: Setting, raw: str) -> bool:
    """On unless ``0``: any other value keeps what the default does."""
    return raw != "0"


@dataclass(frozen=True, slots=True, kw_only=True)
class Flag:
    """A command-line flag of the run command (its argparse definition).

    The variables it overrides are the rows whose ``flag`` it is; :func:`flag_help`
    names them.
    """

    spellings: tuple[str, ...]  #: the first is the name errors use
    dest: str  #: argparse's destination, and the keyword of ``Config.from_env``
    metavar: str
    help: str  #: what it is, in Markdown (backticks are dropped in --help)
    default: str | None = None  #: shown in the help; the flag's value when not given

    @property
    def name(self) -> str:
        return self.spellings[0]


@dataclass(frozen=True, slots=True, kw_only=True)
class Setting:
    """One environment variable: how to read it and how to document it."""

    name: str  #: the variable (``RANGO_RBAC_<PREFIX>`` for that family)
    help: str  #: what it means, one clause; Markdown backticks are dropped in --help
    group: Group  #: "ranger": Ranger's and Go Rango's names; "rango": Rango's own
    default: Any  #: the value when the variable is unset or blank
    parse: Parser = text  #: (row, stripped non-empty text) -> value, raising Invalid
    shown: str | None = None  #: the default as documented, when not the value itself
    minimum: float | None = None  #: bounds for the parser (numbers; text: bytes)
    maximum: float | None = None
    choices: tuple[str, ...] = ()  #: the accepted values, for choice parsers
    unit: str = ""  #: of a number, for its error message ("seconds")
    field: str | None = None  #: the Config field it fills; None: read elsewhere
    flag: Flag | None = None  #: the flag that overrides it
    #: converts the flag's value when it is not simply this row's value
    from_flag: Callable[[str, str], Any] | None = None
    #: produces the field's value from the whole source, for composite settings
    build: Builder | None = None
    #: the field's default is ``build``'s value for an empty environment, not ``default``
    #: (which stays this variable's own default)
    builds_default: bool = False

    def value(self, source: Source) -> Any:
        """The variable's own value in ``source`` (flags aside), else the default."""
        raw = source.env.get(self.name, "").strip()
        if not raw:
            return self.default
        try:
            return self.parse(self, _utf8(raw))
        except Invalid as exc:
            raise ConfigError(f"{self.name}: {exc}") from None

    def read(self, source: Source) -> Any:
        """The value of the row's Config field: its build's, else :meth:`given`."""
        return self.build(self, source) if self.build is not None else self.given(source)

    def given(self, source: Source) -> Any:
        """The flag's value when given (checked as this row's), else :meth:`value`."""
        given = source.flag(self.flag)
        if self.flag is None or given is None:
            return self.value(source)
        try:
            if isinstance(given, str):
                _utf8(given)
            if self.from_flag is not None:
                return self.from_flag(str(given), self.flag.name)
            # argparse converted a number flag with this row's parser already; a
            # caller of from_env that passes text has made a mistake to report.
            if isinstance(self.default, int) and not isinstance(given, int):
                raise Invalid(f"{given!r} is not a whole number")
            return self.parse(self, str(int(given) if isinstance(given, int) else given))
        except Invalid as exc:
            raise ConfigError(f"{self.flag.name}: {exc}") from None

    def bounds(self) -> str:
        """The bounds as documented ("" when the parser's own are all there is)."""
        if self.minimum is None and self.maximum is None:
            return ""
        unit = " bytes" if self.parse is text else ""
        if self.maximum is None:
            return f"at least {_show(self.minimum)}{unit}"
        return f"{_show(self.minimum or 0)} to {_show(self.maximum)}{unit}"

    def shown_default(self) -> str:
        """The default for people: ``shown``, else the value ("—" when there is none)."""
        if self.shown is not None:
            return self.shown
        return "—" if self.default in (None, "", b"") else _show(self.default)


@dataclass(frozen=True, slots=True)
class Source:
    """Where settings are read from: the environment and the given flags.

    A flag counts as given unless it is ``None`` or empty, as argparse leaves
    flags that were not on the command line.
    """

    env: Mapping[str, str]
    flags: Mapping[str, object] = dataclasses.field(default_factory=dict)

    def flag(self, flag: Flag | None) -> object | None:
        value = None if flag is None else self.flags.get(flag.dest)
        return None if value is None or value == "" else value

    def value(self, name: str) -> Any:
        """Row ``name``'s variable, for builds that combine several."""
        return setting(name).value(self)


# Composite settings: their builds, (row, source) -> the field's value, and the
# checks they share with the tools.


def parse_addr(value: str, name: str) -> tuple[str, int]:
    """Parse ``host:port`` (host may be empty or a bracketed IPv6 address)."""
    host, sep, port_text = value.rpartition(":")
    if not sep:
        raise ConfigError(f"{name}: {value!r} is not host:port")
    if ":" in host and not (host.startswith("[") and host.endswith("]")):
        raise ConfigError(f"{name}: {value!r}: write an IPv6 address in brackets, e.g. [::1]:8080")
    host = host.strip("[]") or "0.0.0.0"
    try:
        port_number = int(port_text)
    except ValueError:
        raise ConfigError(f"{name}: port {port_text!r} is not a number") from None
    if not 1 <= port_number <= 65535:
        raise ConfigError(f"{name}: port {port_number} is out of range (1 to 65535)")
    return host, port_number


def _addr_host(value: str, name: str) -> str:
    return parse_addr(value, name)[0]


def _addr_port(value: str, name: str) -> int:
    return parse_addr(value, name)[1]


def _amqp_urls(row: Setting, source: Source) -> tuple[str, ...]:
    """The ``--amqp-addr`` URLs, checked; else one URL per ``RABBITMQ_HOST`` entry.

    Both take a comma list (a RabbitMQ cluster's nodes); each entry is checked here,
    once, so that a value pika refuses stops start-up rather than every worker.
    """
    addr = source.flag(row.flag)
    if addr is not None:
        # A comma may stand in a URL's password or query (RFC 3986 sub-delims): the
        # next entry is where a comma is followed by a scheme.
        entries = [entry.strip() for entry in re.split(r",(?=\s*amqps?://)", str(addr))]
        return tuple(_check_amqp_url(entry, AMQP_ADDR.name) for entry in entries)
    user = quote(source.value("RABBITMQ_USER"), safe="")
    password = quote(source.value("RABBITMQ_PASSWORD"), safe="")
    default_port = source.value("RABBITMQ_PORT")
    urls = []
    for entry in _entries(row.value(source), row.name):
        host, port_number = broker_host(entry, default_port, row.name)
        url = f"amqp://{user}:{password}@{host}:{port_number}/"
        _check_with_pika(url, row.name, entry)
        urls.append(url)
    return tuple(urls)


def _entries(value: str, name: str) -> list[str]:
    """The entries of a comma list that must have no empty entry."""
    entries = [entry.strip() for entry in value.split(",")]
    if not all(entries):
        raise ConfigError(f"{name}: {value!r} has an empty entry")
    return entries


def broker_host(entry: str, default_port: int, name: str) -> tuple[str, int]:
    """One ``RABBITMQ_HOST`` entry as (host as in a URL, port).

    ``host``, ``host:port``, ``[v6]``, ``[v6]:port``, or a bare IPv6 address (more
    than one colon, as Ranger and Go Rango take ``::1``), which then has no port.
    An IPv6 address comes back bracketed, as a URL needs it (RFC 3986 3.2.2).
    """
    if entry.startswith("["):
        close = entry.find("]")
        rest = entry[close + 1:] if close > 0 else None
        if close <= 1 or (rest and not rest.startswith(":")) or not _IPV6.fullmatch(
            entry[1:close]
        ):
            raise ConfigError(f"{name}: {entry!r}: write an IPv6 address as [::1] or [::1]:5672")
        host, port_text = entry[: close + 1], rest[1:] if rest else None
    elif entry.count(":") > 1:
        if not _IPV6.fullmatch(entry):
            raise ConfigError(f"{name}: {entry!r}: write an IPv6 address as [::1] or [::1]:5672")
        host, port_text = f"[{entry}]", None
    else:
        host, _, port_text = entry.partition(":")
        port_text = port_text if ":" in entry else None
        if not host:
            raise ConfigError(f"{name}: {entry!r} has no host")
        if _NOT_IN_HOST.search(host):
            # pika would read the rest as a vhost, a user or a fragment, or fail
            # only when connecting, in every worker.
            raise ConfigError(f"{name}: {entry!r} is not a host name or address")
    if port_text is None:
        return host, default_port
    if not port_text.isascii() or not port_text.isdigit() or len(port_text) > 5:
        raise ConfigError(f"{name}: {entry!r}: port {port_text!r} is not a number")
    try:
        return host, _integer(port_text, 1, 65535)
    except ValueError as exc:
        raise ConfigError(f"{name}: {entry!r}: port {exc}") from None


_IPV6 = re.compile(r"[0-9A-Fa-f:.]+(%[A-Za-z0-9_.\-]+)?")  # a zone index may follow
_NOT_IN_HOST = re.compile(r"[\s/@?#%\\\[\]]|[\x00-\x1f\x7f]")


def _check_with_pika(url: str, name: str, shown: str) -> None:
    """Parse ``url`` as the workers will, so that a value pika refuses stops start-up here
    (once, exit status 2) rather than in every worker (a restart loop). ``shown`` is what
    the message quotes: never the credentials."""
    if _defaults.building:
        return  # the table's own defaults, built when rango.config is imported: no pika
    import pika

    try:
        pika.URLParameters(url)
    except (ValueError, TypeError) as exc:
        # TypeError: pika indexes what urlsplit gave as None (a path of lone "%").
        raise ConfigError(f"{name}: {shown!r} is not usable: {exc}") from None


def _check_amqp_url(url: str, name: str) -> str:
    """One ``--amqp-addr`` URL, checked as the workers will parse it; the messages
    quote it without its password."""
    masked = without_password(url)
    shown = repr(masked)
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # e.g. an unclosed IPv6 bracket
        raise ConfigError(f"{name}: {shown} is not a URL: {exc}") from None
    if parts.scheme not in ("amqp", "amqps") or not parts.hostname:
        raise ConfigError(f"{name}: {shown} is not an amqp:// or amqps:// URL")
    try:
        port_number = parts.port
    except ValueError:
        raise ConfigError(f"{name}: {shown} has an invalid port") from None
    if port_number == 0:
        raise ConfigError(f"{name}: {shown} has an invalid port")
    if "," in parts.path or "," in parts.hostname:
        raise ConfigError(
            f"{name}: {shown}: separate the URLs of a list with commas, each starting with "
            "amqp:// or amqps://"
        )
    _check_with_pika(url, name, masked)
    return url


def without_password(url: str) -> str:
    """``url`` with the password of its user part, if any, as ``***``."""
    scheme, sep, rest = url.partition("://")
    # The last "@" before any query ends the user part, even where a password has
    # an unescaped "/" (which would start the path): mask too much rather than leak.
    userinfo, at, _ = rest.partition("?")[0].rpartition("@")
    if not sep or not at or ":" not in userinfo:
        return url
    return f"{scheme}://{userinfo.partition(':')[0]}:***@{rest[len(userinfo) + 1:]}"


def _public_key(row: Setting, source: Source) -> bytes:
    # The flag does not override the variable here: JWT_PUBLIC_KEY wins over --pubKey.
    path = source.flag(PUB_KEY) or PUB_KEY.default
    return load_public_key_pem(source.env, str(path))


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
        name = f"{PUB_KEY.name} {pub_key_path}"
        try:
            pem = Path(pub_key_path).read_bytes()
        except FileNotFoundError:
            raise ConfigError(
                f"{PUB_KEY.name}: no key file at {pub_key_path} and JWT_PUBLIC_KEY is not set "
                "(run `rango keygen` for a development key pair)"
            ) from None
        except OSError as exc:
            raise ConfigError(
                f"{PUB_KEY.name}: cannot read {pub_key_path}: {exc.strerror}"
            ) from None
    try:
        load_pem_public_key(pem)
    except (ValueError, TypeError) as exc:
        # cryptography's messages run on with URLs and advice: keep the first sentence.
        reason = str(exc).split("\n")[0].split(". ")[0][:120] or type(exc).__name__
        raise ConfigError(f"{name}: not a PEM public key ({reason})") from None
    return pem


def _tls_certfile(row: Setting, source: Source) -> str | None:
    """The certificate file, checked to load with the key file (both or neither)."""
    certfile = row.given(source)
    keyfile = setting("RANGO_TLS_KEYFILE").read(source)
    if certfile is None and keyfile is None:
        return None
    if certfile is None:
        raise ConfigError("--certfile/RANGO_TLS_CERTFILE: required with --keyfile")
    for path in (certfile, keyfile):
        if path is not None and not _is_file(path):
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
    return str(certfile)


def _is_file(path: str) -> bool:
    try:
        return Path(path).is_file()
    except OSError:  # a name too long for the file system is no file either
        return False


_RBAC_ROLE = re.compile(r"^[A-Za-z0-9_\-]+$")


def _rbac(row: Setting, source: Source) -> dict[str, frozenset[str]]:
    """``RANGO_RBAC_<PREFIX>=role1,role2`` opens prefix ``<prefix>`` to those roles."""
    family = row.name.removesuffix("<PREFIX>")
    rules: dict[str, frozenset[str]] = {}
    for name, value in source.env.items():
        if not name.startswith(family):
            continue
        prefix = name.removeprefix(family).lower()
        if not prefix or not _RBAC_ROLE.match(prefix):
            raise ConfigError(f"{name}: the prefix must be letters, digits, _ or -")
        roles = [role.strip() for role in value.split(",")]
        if not value.strip() or any(not role or not _RBAC_ROLE.match(role) for role in roles):
            raise ConfigError(
                f"{name}: {value!r} is not a comma list of roles (letters, digits, _ or -)"
            )
        rules[prefix] = frozenset(roles)
    return rules


# The table.

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

# Peatio's exchange for Ranger's events, as Ranger and Go Rango default to.
DEFAULT_EXCHANGE = "peatio.events.ranger"

# The table is kept compact, a few lines a row, so that it reads as a table.
# fmt: off
WS_ADDR = Flag(
    spellings=("--ws-addr", "-ws-addr"), dest="ws_addr", metavar="HOST:PORT",
    help="websocket listener, IPv6 as `[::1]:8080`",
)
AMQP_ADDR = Flag(
    spellings=("--amqp-addr", "-amqp-addr"), dest="amqp_addr", metavar="URL",
    help="RabbitMQ URL, `amqp[s]://user:pass@host:port/vhost`, or a comma list of them",
)
PUB_KEY = Flag(
    spellings=("--pubKey", "-pubKey", "--pub-key"), dest="pub_key", metavar="FILE",
    help="PEM public key file, used when `JWT_PUBLIC_KEY` is unset",
    default="config/rsa-key.pub",
)
EXCHANGE = Flag(
    spellings=("--exchange", "-exchange"), dest="exchange", metavar="NAME",
    help="topic exchange of the events",
)
CERTFILE = Flag(
    spellings=("--certfile",), dest="certfile", metavar="FILE",
    help="serve `wss://` with this PEM certificate chain",
)
KEYFILE = Flag(
    spellings=("--keyfile",), dest="keyfile", metavar="FILE",
    help="private key of `--certfile`, if not in it",
)
WORKERS = Flag(
    spellings=("--workers", "-workers"), dest="workers", metavar="N", help="worker processes",
)

#: The run command's flags, in the order of ``rango --help``.
FLAGS: tuple[Flag, ...] = (WS_ADDR, AMQP_ADDR, PUB_KEY, EXCHANGE, CERTFILE, KEYFILE, WORKERS)

_KIB = 1024
_MIB = 1024 * _KIB
# Chosen from bench/compression.py (README, Compression): from 256 bytes of JSON
# deflate at least halves a frame; below, it saves tens of bytes for the CPU of
# compressing (~5 us an event), and under ~50 bytes it adds bytes.
COMPRESSION_MIN_SIZE = 256
COMPRESSION_LEVEL = 6

SETTINGS: tuple[Setting, ...] = (
    # Ranger's and Go Rango's names and defaults (PROTOCOL §1).
    Setting(
        name="RANGER_HOST", group="ranger", default="0.0.0.0", field="ws_host",
        help="websocket listener address", flag=WS_ADDR, from_flag=_addr_host,
    ),
    Setting(
        name="RANGER_PORT", group="ranger", parse=port, default=8080, field="ws_port",
        help="websocket listener port", flag=WS_ADDR, from_flag=_addr_port,
    ),
    # One field, the brokers' URLs, from four variables (or the flag): the first row
    # builds it from the others.
    Setting(
        name="RABBITMQ_HOST", group="ranger", default="localhost", field="amqp_urls",
        help="broker host, or a comma list of a cluster's nodes, each `host` or `host:port` "
        "(IPv6: `[::1]:5672`, or bare `::1` without a port); worker *i* starts at entry "
        "*i* mod n and moves to the next when its node is lost",
        flag=AMQP_ADDR, build=_amqp_urls, builds_default=True,
    ),
    Setting(
        name="RABBITMQ_PORT", group="ranger", parse=port, default=5672,
        help="broker port of the `RABBITMQ_HOST` entries that give none", flag=AMQP_ADDR,
    ),
    Setting(name="RABBITMQ_USER", group="ranger", default="guest", help="broker user",
            flag=AMQP_ADDR),
    Setting(name="RABBITMQ_PASSWORD", group="ranger", default="guest", help="broker password",
            flag=AMQP_ADDR),
    Setting(
        name="JWT_PUBLIC_KEY", group="ranger", default=b"", field="jwt_public_key",
        help="base64 of the PEM public key (a raw PEM works too); unset: the file of "
        f"`{PUB_KEY.name}` (`{PUB_KEY.default}`)",
        build=_public_key,
    ),
    Setting(
        name="JWT_ALGORITHM", group="ranger", parse=one_of, choices=JWT_ALGORITHMS,
        default="RS256", field="jwt_algorithm",
        help="the algorithm tokens must be signed with; must fit the key",
    ),
    Setting(name="JWT_ISSUER", group="ranger", default=None, field="jwt_issuer",
            help="required `iss` when set"),
    Setting(
        name="JWT_AUDIENCE", group="ranger", parse=comma_list, default=None,
        field="jwt_audience", help="accepted `aud` values, comma list, when set",
    ),
    Setting(
        name="JWT_DEFAULT_LEEWAY", group="ranger", parse=whole, default=0,
        field="jwt_default_leeway", help="clock leeway (s) for `exp`, `nbf`, `iat`",
    ),
    Setting(
        name="JWT_EXPIRATION_LEEWAY", group="ranger", parse=whole, default=None,
        shown="default leeway", field="jwt_exp_leeway", help="clock leeway (s) for `exp`",
    ),
    Setting(
        name="JWT_NOT_BEFORE_LEEWAY", group="ranger", parse=whole, default=None,
        shown="default leeway", field="jwt_nbf_leeway", help="clock leeway (s) for `nbf`",
    ),
    Setting(
        name="JWT_ISSUED_AT_LEEWAY", group="ranger", parse=whole, default=None,
        shown="default leeway", field="jwt_iat_leeway", help="clock leeway (s) for `iat`",
    ),
    Setting(
        name="API_CORS_ORIGINS", group="ranger", parse=origins, default=None,
        field="cors_origins",
        help="allowed `Origin` hosts or URLs, comma list (`null` admits pages opened from "
        "disk); unset: the origin's host must equal `Host`",
    ),
    Setting(
        name="LOG_LEVEL", group="ranger", parse=one_of_any_case, choices=tuple(LOG_LEVELS),
        default="info", field="log_level", help="least severity logged",
    ),
    Setting(
        name="LOG_FORMAT", group="ranger", parse=one_of_any_case, choices=("text", "json"),
        default="text", field="log_format", help="`json`: one object per line",
    ),
    # Rango's own.
    Setting(
        name="RANGO_METRICS_HOST", group="rango", default="0.0.0.0", field="metrics_host",
        help="Prometheus endpoint and readiness address, also of `python -m workers.exporter`",
    ),
    Setting(
        name="RANGO_METRICS_PORT", group="rango", parse=port, default=4242,
        field="metrics_port", help="Prometheus endpoint and readiness port",
    ),
    Setting(
        name="RANGO_EXCHANGE", group="rango", parse=text, minimum=1, maximum=255,
        default=DEFAULT_EXCHANGE, field="exchange", flag=EXCHANGE,
        help="topic exchange of the events, also of the tools",
    ),
    Setting(
        name="RANGO_WORKERS", group="rango", parse=whole, minimum=0, maximum=256, default=0,
        shown="CPUs usable", field="workers", flag=WORKERS,
        help="worker processes; `0`: as many as the CPUs the process may use",
    ),
    Setting(
        name="RANGO_PRELOAD", group="rango", parse=zero_one, default=True, shown="1",
        field="preload",
        help="`1` forks `rango --workers N`'s workers from a template process that "
        "imported and configured everything once, so they share its memory; `0` starts "
        "each worker as a fresh interpreter; see [Memory](#memory)",
    ),
    Setting(
        name="RANGO_ENV_FILE", group="rango", default=None,
        help="a file of `NAME=value` lines (systemd's `EnvironmentFile=` syntax: `#` "
        "comments, blank lines, quotes and backslashes as systemd reads them; no value "
        "over several lines) that override the environment; "
        "`rango` reads it at start and again at every SIGHUP, so a rolling restart "
        "rolls out its new values; see [Processes](#processes-rango---workers-n)",
    ),
    Setting(
        name="RANGO_MAX_FRAME_SIZE", group="rango", parse=whole, minimum=64, maximum=1 << 24,
        default=4 * _KIB, field="max_frame_size",
        help="largest client frame (bytes); larger closes with 1009",
    ),
    Setting(
        name="RANGO_MAX_PENDING_BYTES", group="rango", parse=whole, minimum=_KIB,
        maximum=1 << 34, default=4 * _MIB, field="max_pending_bytes",
        help="outgoing bytes pending in the kernel's send buffer before a slow client is "
        "dropped",
    ),
    Setting(
        name="RANGO_MAX_INCREMENTS", group="rango", parse=whole, minimum=1, default=10_000,
        field="max_increments",
        help="stored order-book increments per book before the book is discarded",
    ),
    Setting(
        name="RANGO_PING_INTERVAL", group="rango", parse=number, unit="seconds", minimum=0.05,
        default=54.0, field="ping_interval",
        help="seconds of silence before the server pings a client",
    ),
    Setting(
        name="RANGO_PING_TIMEOUT", group="rango", parse=number, unit="seconds", minimum=0.05,
        default=6.0, field="ping_timeout",
        help="seconds a client has to answer; 54 + 6 = Go Rango's 60 s deadline",
    ),
    Setting(
        name="RANGO_HANDSHAKE_TIMEOUT", group="rango", parse=number, unit="seconds",
        minimum=0.05, default=10.0, field="handshake_timeout",
        help="seconds to send the upgrade request",
    ),
    Setting(
        name="RANGO_TCP_MIGRATE_REQ", group="rango", parse=switch, default=True,
        help="`0` leaves `net.ipv4.tcp_migrate_req` alone; see "
        "[Processes](#processes-rango---workers-n)",
    ),
    Setting(
        name="RANGO_MAX_CONNECTIONS", group="rango", parse=whole, minimum=1, default=50_000,
        field="max_connections", help="connections per worker; more get HTTP 503",
    ),
    Setting(
        name="RANGO_MAX_SUBSCRIPTIONS", group="rango", parse=whole, minimum=1, default=1024,
        field="max_subscriptions", help="streams one connection may subscribe to at once",
    ),
    Setting(
        name="RANGO_RATE_LIMIT", group="rango", parse=number, unit="frames per second",
        minimum=0.1, default=20.0, field="rate_limit",
        help="client frames per second per connection, a token bucket",
    ),
    Setting(
        name="RANGO_RATE_BURST", group="rango", parse=whole, minimum=1, default=100,
        field="rate_burst", help="client frames allowed at once above the rate",
    ),
    Setting(
        name="RANGO_MAX_EVENT_SIZE", group="rango", parse=whole, minimum=64, default=8 * _MIB,
        field="max_event_size",
        help="largest event body (bytes); larger ones are dropped, so a runaway publisher "
        "cannot fill every client",
    ),
    Setting(
        name="RANGO_COMPRESSION", group="rango", parse=zero_one, default=False,
        shown="0", field="compression",
        help="`1` accepts permessage-deflate (RFC 7692) from clients that offer it; each "
        "event is compressed once per worker; see [Compression](#compression)",
    ),
    Setting(
        name="RANGO_COMPRESSION_MIN_SIZE", group="rango", parse=whole, minimum=0,
        maximum=1 << 30, default=COMPRESSION_MIN_SIZE, field="compression_min_size",
        help="event frames with a smaller payload (bytes) go uncompressed to every client",
    ),
    Setting(
        name="RANGO_COMPRESSION_LEVEL", group="rango", parse=whole, minimum=1, maximum=9,
        default=COMPRESSION_LEVEL, field="compression_level",
        help="zlib level: 1 is fastest, 9 smallest",
    ),
    Setting(
        name="RANGO_RBAC_<PREFIX>", group="rango", default={}, shown="—", field="rbac",
        help="roles allowed on `<prefix>.*.*` streams, comma list, e.g. "
        "`RANGO_RBAC_ADMIN=admin,superadmin`",
        build=_rbac,
    ),
    Setting(
        name="RANGO_TLS_CERTFILE", group="rango", default=None, field="tls_certfile",
        help="serve `wss://` with this PEM certificate chain; see [TLS](#tls)", flag=CERTFILE,
        build=_tls_certfile,
    ),
    Setting(
        name="RANGO_TLS_KEYFILE", group="rango", default=None, field="tls_keyfile",
        help="private key of the certificate, if not in its file", flag=KEYFILE,
    ),
    Setting(
        name="PROMETHEUS_MULTIPROC_DIR", group="rango", default="",
        help="the workers' shared metrics directory (prometheus-client's name): required by "
        "`python -m workers.exporter`; `rango` makes its own",
    ),
)

# fmt: on

_BY_NAME = {row.name: row for row in SETTINGS}
# Set while field_default builds a default: every process imports rango.config, and
# the supervisor must not import pika for the table's own, known-good defaults.
_defaults = types.SimpleNamespace(building=False)
_BY_FIELD = {row.field: row for row in SETTINGS if row.field}
_EMPTY = Source({})


def setting(name: str) -> Setting:
    """The row of variable ``name`` (KeyError if there is none)."""
    return _BY_NAME[name]


def field_default(name: str) -> Any:
    """The dataclass field for Config field ``name``, its default from the table.

    That is the row's ``default``, or, for a row that ``builds_default`` (the AMQP
    URL), what its build makes of an empty environment.
    """
    row = _BY_FIELD[name]
    _defaults.building = True
    try:
        value = row.build(row, _EMPTY) if row.build and row.builds_default else row.default
    finally:
        _defaults.building = False
    if isinstance(value, dict):
        return dataclasses.field(default_factory=value.copy)
    return dataclasses.field(default=value)


_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def read_env_file(path: str) -> dict[str, str]:
    """The variables of ``path``, a subset of systemd's ``EnvironmentFile=`` syntax.

    One ``NAME=value`` a line; blank lines and lines starting with ``#`` or ``;``
    are skipped; blanks around the name and the value are dropped. The value is
    read as systemd reads it (:func:`_env_value`): quotes, and backslashes. A line
    ending in a backslash or inside quotes (systemd's continuation) is refused
    rather than read differently. Errors name the line, never its text (it may hold
    a password).
    """
    name = "RANGO_ENV_FILE"
    try:
        content = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{name}: no such file {path}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{name}: {path} is not UTF-8 text") from None
    except OSError as exc:
        raise ConfigError(f"{name}: cannot read {path}: {exc.strerror or exc}") from None
    variables: dict[str, str] = {}
    for number, line in enumerate(content.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        where = f"{name}: {path} line {number}"
        key, sep, value = line.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not _ENV_NAME.match(key):
            raise ConfigError(f"{where}: not NAME=value")
        if key == name:
            raise ConfigError(f"{where}: {name} cannot be set in the file itself")
        try:
            value = _env_value(value)
        except ValueError as exc:
            raise ConfigError(f"{where}: {key}: {exc}") from None
        if "\0" in value:
            raise ConfigError(f"{where}: {key}: a NUL character")
        variables[key] = value
    return variables


def _env_value(raw: str) -> str:
    """One value as systemd's env-file parser reads it (``parse_env_file_internal``):
    outside quotes a backslash takes the next character as it is; inside ``'…'``
    nothing is special; inside ``"…"`` a backslash escapes only ``" \\ ` $`` and
    is kept before anything else; quoted and unquoted parts join (``"a"b`` is
    ``ab``). ValueError where systemd would read on into the next line."""
    out: list[str] = []
    quote = ""
    between = False  # after a closing quote, blanks are skipped (systemd's PRE_VALUE)
    chars = iter(raw)
    for char in chars:
        if between and char in " \t":
            continue
        between = False
        if quote == "'":
            if char == "'":
                quote, between = "", True
            else:
                out.append(char)
        elif quote == '"':
            if char == '"':
                quote, between = "", True
            elif char == "\\":
                escaped = next(chars, None)
                if escaped is None:
                    raise ValueError("a line continuation (\\) is not supported")
                out.append(escaped if escaped in '"\\`$' else char + escaped)
            else:
                out.append(char)
        elif char in "'\"":
            quote = char
        elif char == "\\":
            escaped = next(chars, None)
            if escaped is None:
                raise ValueError("a line continuation (\\) is not supported")
            out.append(escaped)
        else:
            out.append(char)
    if quote:
        raise ValueError(f"an unclosed {quote} (a value over several lines is not supported)")
    return "".join(out)


def environment(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """``env`` (the process's environment by default) with the variables of the file
    named by ``RANGO_ENV_FILE`` on top; ConfigError if that file cannot be used."""
    base = dict(os.environ if env is None else env)
    path = setting("RANGO_ENV_FILE").value(Source(base))
    return base if path is None else {**base, **read_env_file(str(path))}


def tcp_migrate_req(env: Mapping[str, str] | None = None) -> bool:
    """Whether the supervisor may enable ``net.ipv4.tcp_migrate_req`` (default: yes)."""
    return bool(setting("RANGO_TCP_MIGRATE_REQ").value(Source(os.environ if env is None else env)))


# Documentation, generated.


def _show(value: object) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"  # as the variable is written
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _code(text: str) -> str:
    return f"`{text}`"


_LINK = re.compile(r"\[([^]]+)\]\(#[^)]+\)")


def _plain(markdown_text: str) -> str:
    """Markdown as a terminal shows it: code spans and links reduced to their text."""
    return _LINK.sub(r"\1", markdown_text).replace("`", "")


def _meaning(row: Setting, code: Callable[[str], str]) -> str:
    """What a row means: its help, then its choices (each passed through ``code``)."""
    if not row.choices:
        return row.help
    return f"{row.help}; one of {', '.join(code(choice) for choice in row.choices)}"


def _overrides(flag: Flag, code: Callable[[str], str]) -> str:
    """A flag's help in Markdown: what it is, its bounds and the variables it overrides."""
    rows = [row for row in SETTINGS if row.flag is flag]
    bounds = [row.bounds() for row in rows if row.bounds()]
    parts = [flag.help + "".join(f", {bound}" for bound in bounds)]
    if rows:
        defaults = [row.shown_default() for row in rows]
        parts.append("overrides " + ", ".join(
            code(row.name) + ("" if default in _NONE else f" (default: {default})")
            for row, default in zip(rows, defaults, strict=True)
        ))  # fmt: skip
    if flag.default is not None:
        parts.append(f"default: {code(flag.default)}")
    return "; ".join(parts)


_GROUPS: dict[Group, str] = {
    "ranger": "environment, with (default; bounds; flag that overrides it)\n"
    "Ranger's and Go Rango's names and defaults:",
    "rango": "Rango's own:",
}
_NAME_WIDTH = max(len(row.name) for row in SETTINGS) + 4  # indent, name, two spaces
_HELP_WIDTH = 79
_NONE = ("", "—")  # notes not worth printing


def help_text() -> str:
    """The ``environment`` part of ``rango --help``: each variable, grouped."""
    lines = []
    for group, title in _GROUPS.items():
        lines.append(title)
        for row in (row for row in SETTINGS if row.group == group):
            notes = [row.shown_default(), row.bounds(), row.flag.name if row.flag else ""]
            meaning = _plain(_meaning(row, str))
            if any(note not in _NONE for note in notes):
                meaning += f" ({'; '.join(note for note in notes if note not in _NONE)})"
            lines.append(
                textwrap.fill(
                    meaning,
                    _HELP_WIDTH,
                    initial_indent=f"  {row.name:<{_NAME_WIDTH - 2}}",
                    subsequent_indent=" " * _NAME_WIDTH,
                    break_on_hyphens=False,
                )
            )
    return "\n".join(lines) + "\n"


def flag_help(flag: Flag) -> str:
    """A flag's argparse help: what it is, its bounds, the variables it overrides."""
    return _plain(_overrides(flag, str))


def flag_type(flag: Flag) -> Callable[[str], Any]:
    """The argparse type of a flag: its row's parser when it stands for one number.

    Then its errors read as the variable's do (argparse names the flag). Other
    flags stay text: their rows check them in :meth:`Config.from_env`.
    """
    rows = [row for row in SETTINGS if row.flag is flag and row.from_flag is None]
    if len(rows) != 1 or not isinstance(rows[0].default, int):
        return str
    row = rows[0]

    def convert(raw: str) -> Any:
        try:
            return row.parse(row, raw.strip())
        except Invalid as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return convert


def markdown() -> str:
    """README's configuration tables: the variables, then the run flags."""
    lines = ["| variable | default | meaning |", "|---|---|---|"]
    for row in SETTINGS:
        default = row.shown_default()
        if row.shown is None and default not in _NONE:
            default = _code(default)
        meaning = _meaning(row, _code)
        if row.bounds():
            meaning += f"; {row.bounds()}"
        if row.flag is not None:
            meaning += f"; flag {_code(row.flag.name)}"
        lines.append(f"| {_code(row.name)} | {default} | {meaning} |")
    lines += ["", "| flag | meaning |", "|---|---|"]
    for flag in FLAGS:
        spellings = ", ".join(_code(f"{spelling} {flag.metavar}") for spelling in flag.spellings)
        lines.append(f"| {spellings} | {_overrides(flag, _code)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """``python -m rango.settings --markdown|--help-text``: print the generated docs."""
    parser = argparse.ArgumentParser(prog="python -m rango.settings", description=main.__doc__)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--markdown", action="store_true", help="README's configuration table")
    what.add_argument("--help-text", action="store_true", help="the environment of rango --help")
    args = parser.parse_args(argv)
    sys.stdout.write(markdown() if args.markdown else help_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
