"""Unit tests of configuration (PROTOCOL §1, §2): environment, flags, errors."""

from __future__ import annotations

import base64
import logging
from pathlib import Path

import pika
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from rango.config import Config, ConfigError, amqp_urls_from_env, parse_addr


def public_pem(private_key: object) -> bytes:
    return private_key.public_key().public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def rsa_pem(rsa_key: rsa.RSAPrivateKey) -> bytes:
    return public_pem(rsa_key)


@pytest.fixture(scope="module")
def ec_pem() -> bytes:
    return public_pem(ec.generate_private_key(ec.SECP256R1()))


@pytest.fixture
def env(rsa_pem: bytes) -> dict[str, str]:
    """The least environment Rango starts with: a JWT public key."""
    return {"JWT_PUBLIC_KEY": base64.b64encode(rsa_pem).decode()}


def config_error(env: dict[str, str], **flags: object) -> str:
    with pytest.raises(ConfigError) as info:
        Config.from_env(env, **flags)
    return str(info.value)


def test_defaults_are_go_rangos(env: dict[str, str], rsa_pem: bytes) -> None:
    config = Config.from_env(env)
    assert (config.ws_host, config.ws_port) == ("0.0.0.0", 8080)
    assert (config.metrics_host, config.metrics_port) == ("0.0.0.0", 4242)
    assert config.amqp_urls == ("amqp://guest:guest@localhost:5672/",)
    assert config.exchange == "peatio.events.ranger"
    assert config.jwt_public_key == rsa_pem
    assert config.jwt_algorithm == "RS256"
    assert config.jwt_issuer is None
    assert config.jwt_audience is None
    assert config.jwt_default_leeway == 0
    assert (config.jwt_iat_leeway, config.jwt_exp_leeway, config.jwt_nbf_leeway) == (
        None, None, None,
    )  # fmt: skip
    assert config.cors_origins is None
    assert dict(config.rbac) == {}
    assert config.log_level == "info" and config.log_level_no == logging.INFO
    assert config.log_format == "text"
    assert config.workers == 0
    assert config.ping_interval == 54.0  # Go Rango's ping period
    assert config.max_increments == 10_000


@pytest.mark.parametrize(
    ("host", "netloc"),
    [("::1", "[::1]"), ("[fd00::5]", "[fd00::5]"), ("10.0.0.5", "10.0.0.5"), ("rabbit", "rabbit")],
)
def test_rabbitmq_host_ipv6_is_bracketed(host: str, netloc: str) -> None:
    [url] = amqp_urls_from_env({"RABBITMQ_HOST": host, "RABBITMQ_PORT": "5673"})
    assert url == f"amqp://guest:guest@{netloc}:5673/"
    assert pika.URLParameters(url).host == host.strip("[]")


def test_flags_given_as_none_mean_not_given(env: dict[str, str]) -> None:
    flags = dict(ws_addr=None, amqp_addr=None, pub_key=None, exchange=None, workers=None)
    assert Config.from_env(env, **flags) == Config.from_env(env)


def test_default_key_file_is_config_rsa_key_pub(
    rsa_pem: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "rsa-key.pub").write_bytes(rsa_pem)
    monkeypatch.chdir(tmp_path)
    assert Config.from_env({}).jwt_public_key == rsa_pem


def test_every_variable(rsa_pem: bytes, ec_pem: bytes) -> None:
    env = {
        "RANGER_HOST": "127.0.0.1",
        "RANGER_PORT": "9090",
        "RANGO_METRICS_HOST": "127.0.0.2",
        "RANGO_METRICS_PORT": "9100",
        "RABBITMQ_HOST": "rabbit.local",
        "RABBITMQ_PORT": "5673",
        "RABBITMQ_USER": "user",
        "RABBITMQ_PASSWORD": "p@ss/w:rd",
        "JWT_PUBLIC_KEY": base64.b64encode(ec_pem).decode(),
        "JWT_ALGORITHM": "ES256",
        "JWT_ISSUER": "barong",
        "JWT_AUDIENCE": "peatio, barong",
        "JWT_DEFAULT_LEEWAY": "5",
        "JWT_ISSUED_AT_LEEWAY": "6",
        "JWT_EXPIRATION_LEEWAY": "7",
        "JWT_NOT_BEFORE_LEEWAY": "0",
        "API_CORS_ORIGINS": "https://Www.Example.com, app.example.com:8443,http://x.io:81/path",
        "RANGO_RBAC_ADMIN": "admin, superadmin",
        "RANGO_RBAC_FINANCE_TEAM": "accountant",
        "LOG_LEVEL": "WARN",
        "LOG_FORMAT": "json",
        "RANGO_MAX_FRAME_SIZE": "512",
        "RANGO_MAX_PENDING_BYTES": "65536",
        "RANGO_MAX_INCREMENTS": "50",
        "RANGO_PING_INTERVAL": "1.5",
        "RANGO_PING_TIMEOUT": "0.5",
        "RANGO_HANDSHAKE_TIMEOUT": "3",
        "RANGO_WORKERS": "4",
        "UNRELATED": "ignored",
    }
    config = Config.from_env(env)
    assert (config.ws_host, config.ws_port) == ("127.0.0.1", 9090)
    assert (config.metrics_host, config.metrics_port) == ("127.0.0.2", 9100)
    assert config.amqp_urls == ("amqp://user:p%40ss%2Fw%3Ard@rabbit.local:5673/",)
    assert config.jwt_public_key == ec_pem
    assert config.jwt_algorithm == "ES256"
    assert config.jwt_issuer == "barong"
    assert config.jwt_audience == ("peatio", "barong")
    assert config.jwt_default_leeway == 5
    assert (config.jwt_iat_leeway, config.jwt_exp_leeway, config.jwt_nbf_leeway) == (6, 7, 0)
    assert config.cors_origins == ("www.example.com", "app.example.com:8443", "x.io:81")
    assert dict(config.rbac) == {
        "admin": frozenset({"admin", "superadmin"}),
        "finance_team": frozenset({"accountant"}),
    }
    assert config.log_level == "warn" and config.log_level_no == logging.WARNING
    assert config.log_format == "json"
    assert config.max_frame_size == 512
    assert config.max_pending_bytes == 65536
    assert config.max_increments == 50
    assert (config.ping_interval, config.ping_timeout, config.handshake_timeout) == (1.5, 0.5, 3)
    assert config.workers == 4


@pytest.mark.parametrize(
    ("level", "number"),
    [("debug", logging.DEBUG), ("info", logging.INFO), ("warn", logging.WARNING),
     ("error", logging.ERROR), ("Debug", logging.DEBUG), (" error ", logging.ERROR)],
)  # fmt: skip
def test_log_levels(env: dict[str, str], level: str, number: int) -> None:
    assert Config.from_env({**env, "LOG_LEVEL": level}).log_level_no == number


def test_empty_variables_mean_default(env: dict[str, str]) -> None:
    blank = {name: "" for name in ("RANGER_HOST", "RANGER_PORT", "RABBITMQ_PORT", "LOG_LEVEL",
                                    "JWT_ISSUER", "JWT_AUDIENCE", "JWT_DEFAULT_LEEWAY",
                                    "JWT_EXPIRATION_LEEWAY", "API_CORS_ORIGINS")}  # fmt: skip
    assert Config.from_env({**env, **blank}) == Config.from_env(env)


def test_flags_override_env(env: dict[str, str], rsa_pem: bytes) -> None:
    env = {
        **env,
        "RANGER_HOST": "10.0.0.1",
        "RANGER_PORT": "1111",
        "RABBITMQ_HOST": "envhost",
        "RABBITMQ_PORT": "2222",
        "RANGO_WORKERS": "2",
    }
    config = Config.from_env(
        env,
        ws_addr="127.0.0.1:3333",
        amqp_addr="amqps://u:p@flaghost:5671/vhost",
        exchange="my.exchange",
        workers=8,
    )
    assert (config.ws_host, config.ws_port) == ("127.0.0.1", 3333)
    assert config.amqp_urls == ("amqps://u:p@flaghost:5671/vhost",)
    assert config.exchange == "my.exchange"
    assert config.workers == 8


def test_flags_win_even_over_bad_env(env: dict[str, str]) -> None:
    env = {**env, "RANGER_PORT": "abc", "RABBITMQ_PORT": "abc"}
    config = Config.from_env(env, ws_addr=":8081", amqp_addr="amqp://h/")
    assert (config.ws_host, config.ws_port) == ("0.0.0.0", 8081)
    assert config.amqp_urls == ("amqp://h/",)


def test_pub_key_flag(rsa_pem: bytes, ec_pem: bytes, tmp_path: Path) -> None:
    path = tmp_path / "key.pub"
    path.write_bytes(ec_pem)
    assert Config.from_env({}, pub_key=str(path)).jwt_public_key == ec_pem
    # JWT_PUBLIC_KEY wins over the file (PROTOCOL §1, as Go Rango).
    env = {"JWT_PUBLIC_KEY": base64.b64encode(rsa_pem).decode()}
    assert Config.from_env(env, pub_key=str(path)).jwt_public_key == rsa_pem


def test_jwt_public_key_forms(rsa_pem: bytes) -> None:
    # Raw PEM text (surrounding whitespace is stripped, the key is the same).
    config = Config.from_env({"JWT_PUBLIC_KEY": rsa_pem.decode()})
    assert config.jwt_public_key.strip() == rsa_pem.strip()
    # base64 wrapped at 76 columns, as `base64 key.pub` prints it: Go Rango's
    # base64.StdEncoding ignores line breaks.
    wrapped = base64.encodebytes(rsa_pem).decode()
    assert "\n" in wrapped.strip()
    assert Config.from_env({"JWT_PUBLIC_KEY": wrapped}).jwt_public_key == rsa_pem
    assert Config.from_env({"JWT_PUBLIC_KEY": wrapped.replace("\n", "\r\n")}).jwt_public_key == (
        rsa_pem
    )
    # Unpadded, as Ranger's Base64.urlsafe_decode64 accepts it. (Base64 of PEM
    # text never holds '+' or '/', so the URL-safe alphabet changes nothing.)
    for pem in (rsa_pem, rsa_pem + b"\n", rsa_pem + b"\n\n"):
        unpadded = base64.urlsafe_b64encode(pem).decode().rstrip("=")
        assert Config.from_env({"JWT_PUBLIC_KEY": unpadded}).jwt_public_key == pem


# Bad values: ConfigError naming the variable or flag.

BAD_ENV = [
    ("RANGER_PORT", "0"),
    ("RANGER_PORT", "70000"),
    ("RANGER_PORT", "abc"),
    ("RANGER_PORT", "-1"),
    ("RANGER_PORT", "80.5"),
    ("RABBITMQ_PORT", "0"),
    ("RABBITMQ_PORT", "65536"),
    ("RABBITMQ_PORT", "amqp"),
    ("RANGO_METRICS_PORT", "0"),
    ("RANGO_METRICS_PORT", "x"),
    ("LOG_LEVEL", "verbose"),
    ("LOG_LEVEL", "trace"),
    ("LOG_FORMAT", "xml"),
    ("JWT_ALGORITHM", "HS256"),
    ("JWT_ALGORITHM", "none"),
    ("JWT_ALGORITHM", "rs256"),
    ("JWT_ALGORITHM", "RSA"),
    ("JWT_DEFAULT_LEEWAY", "abc"),
    ("JWT_DEFAULT_LEEWAY", "-1"),
    ("JWT_DEFAULT_LEEWAY", "1.5"),
    ("JWT_EXPIRATION_LEEWAY", "soon"),
    ("JWT_EXPIRATION_LEEWAY", "-5"),
    ("JWT_NOT_BEFORE_LEEWAY", "x"),
    ("JWT_ISSUED_AT_LEEWAY", "1e3"),
    ("RANGO_RBAC_ADMIN", "admin,,x"),
    ("RANGO_RBAC_ADMIN", ""),
    ("RANGO_RBAC_ADMIN", "  "),
    ("RANGO_RBAC_ADMIN", "admin,"),
    ("RANGO_RBAC_ADMIN", "admin superadmin"),
    ("RANGO_RBAC_ADMIN", "admin;superadmin"),
    ("RANGO_RBAC_", "admin"),
    ("RANGO_RBAC_A.B", "admin"),
    ("API_CORS_ORIGINS", "https://"),
    ("RANGO_MAX_FRAME_SIZE", "10"),
    ("RANGO_MAX_INCREMENTS", "0"),
    ("RANGO_PING_INTERVAL", "0"),
    ("RANGO_PING_INTERVAL", "often"),
    ("RANGO_PING_TIMEOUT", "nan"),
    ("RANGO_WORKERS", "many"),
    ("RANGO_WORKERS", "1000"),
]


@pytest.mark.parametrize(("name", "value"), BAD_ENV)
def test_bad_variable(env: dict[str, str], name: str, value: str) -> None:
    message = config_error({**env, name: value})
    assert message.startswith(f"{name}: "), message


@pytest.mark.parametrize(
    "value",
    ["not base64!!!", "a", "YWJj$", base64.b64encode(b"hello, not a key").decode(),
     base64.b64encode(b"-----BEGIN PUBLIC KEY-----\ngarbage\n-----END PUBLIC KEY-----\n").decode(),
     "-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----"],
)  # fmt: skip
def test_bad_jwt_public_key(value: str) -> None:
    message = config_error({"JWT_PUBLIC_KEY": value})
    assert message.startswith("JWT_PUBLIC_KEY: "), message


def test_private_key_is_not_a_public_key(rsa_key: rsa.RSAPrivateKey) -> None:
    pem = rsa_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    message = config_error({"JWT_PUBLIC_KEY": base64.b64encode(pem).decode()})
    assert message.startswith("JWT_PUBLIC_KEY: not a PEM public key"), message
    assert "PRIVATE" not in message and pem.decode().splitlines()[1] not in message


def test_missing_key_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pub"
    message = config_error({}, pub_key=str(missing))
    assert message.startswith("--pubKey: ")
    assert str(missing) in message and "JWT_PUBLIC_KEY" in message


def test_missing_default_key_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    message = config_error({})
    assert message.startswith("--pubKey: ") and "config/rsa-key.pub" in message


def test_key_file_not_pem(tmp_path: Path) -> None:
    path = tmp_path / "key.pub"
    path.write_bytes(b"ssh-rsa AAAA")
    assert config_error({}, pub_key=str(path)).startswith(f"--pubKey {path}: not a PEM")


def test_key_file_is_a_directory(tmp_path: Path) -> None:
    assert config_error({}, pub_key=str(tmp_path)).startswith("--pubKey: cannot read")


@pytest.mark.parametrize(
    "value",
    ["abc", "8080", "host:", "host:0", "host:70000", "host:http", ":", "[::1]:-1", "::1",
     "::1:8080", "[::1:8080"],
)
def test_bad_ws_addr(env: dict[str, str], value: str) -> None:
    assert config_error(env, ws_addr=value).startswith("--ws-addr: ")


@pytest.mark.parametrize(
    ("value", "addr"),
    [("127.0.0.1:80", ("127.0.0.1", 80)), (":8080", ("0.0.0.0", 8080)),
     ("[::1]:9000", ("::1", 9000)), ("localhost:65535", ("localhost", 65535)),
     ("0.0.0.0:1", ("0.0.0.0", 1))],
)  # fmt: skip
def test_parse_addr(value: str, addr: tuple[str, int]) -> None:
    assert parse_addr(value, "--ws-addr") == addr


@pytest.mark.parametrize(
    "value", ["http://host/", "host:5672", "amqp://", "amqp://host:abc/", "amqp://host:0/"]
)
def test_bad_amqp_addr(env: dict[str, str], value: str) -> None:
    assert config_error(env, amqp_addr=value).startswith("--amqp-addr: ")


@pytest.mark.parametrize("value", [-1, 257, "3", 1.5])
def test_bad_workers_flag(env: dict[str, str], value: object) -> None:
    assert config_error(env, workers=value).startswith("--workers: ")


def test_bad_exchange_flag(env: dict[str, str]) -> None:
    assert config_error(env, exchange="x" * 256).startswith("--exchange: ")
    assert Config.from_env(env, exchange="x" * 255).exchange == "x" * 255


def test_algorithm_needs_no_matching_key_at_config_time(env: dict[str, str]) -> None:
    # The key/algorithm match is checked when the Authenticator is built
    # (tests/test_auth.py); from_env only checks the name.
    assert Config.from_env({**env, "JWT_ALGORITHM": "EdDSA"}).jwt_algorithm == "EdDSA"


def test_ed25519_key_loads() -> None:
    pem = public_pem(ed25519.Ed25519PrivateKey.generate())
    env = {"JWT_PUBLIC_KEY": base64.b64encode(pem).decode(), "JWT_ALGORITHM": "EdDSA"}
    assert Config.from_env(env).jwt_public_key == pem


@pytest.mark.parametrize("host", ["[::1", "[zz]"])
def test_rabbitmq_host_pika_cannot_parse_names_the_variable(
    host: str, env: dict[str, str]
) -> None:
    """Checked at start-up as the workers' pika will parse it (no worker restart loop)."""
    message = config_error({**env, "RABBITMQ_HOST": host, "RABBITMQ_PASSWORD": "s3cret"})
    assert message.startswith("RABBITMQ_HOST: "), message
    assert "s3cret" not in message


@pytest.mark.parametrize(
    ("hosts", "netlocs"),
    [
        ("rabbit1,rabbit2:5673, [fd00::7]:5674 ,::1",
         ["rabbit1:5672", "rabbit2:5673", "[fd00::7]:5674", "[::1]:5672"]),
        ("10.0.0.1:1", ["10.0.0.1:1"]),
        ("[::1]", ["[::1]:5672"]),
    ],
)  # fmt: skip
def test_rabbitmq_host_list(env: dict[str, str], hosts: str, netlocs: list[str]) -> None:
    """A cluster's nodes, each ``host[:port]``; RABBITMQ_PORT is the default port."""
    config = Config.from_env({**env, "RABBITMQ_HOST": hosts, "RABBITMQ_USER": "u"})
    assert config.amqp_urls == tuple(f"amqp://u:guest@{netloc}/" for netloc in netlocs)
    for url, netloc in zip(config.amqp_urls, netlocs, strict=True):
        parameters = pika.URLParameters(url)
        assert f"{parameters.host}:{parameters.port}" == netloc.replace("[", "").replace("]", "")


@pytest.mark.parametrize(
    "hosts", ["a:b", "h1,,h2", "h1,", ",", ":5672", "h:0", "h:65536", "[::1]x", "[::1]:", "[]:5",
              "[::1"],
)  # fmt: skip
def test_bad_rabbitmq_host_entry_names_the_variable(env: dict[str, str], hosts: str) -> None:
    message = config_error({**env, "RABBITMQ_HOST": hosts, "RABBITMQ_PASSWORD": "s3cret"})
    assert message.startswith("RABBITMQ_HOST: "), message
    assert "s3cret" not in message and "\n" not in message


def test_amqp_addr_list(env: dict[str, str]) -> None:
    config = Config.from_env(env, amqp_addr="amqp://a/, amqps://u:p@b:5671/v")
    assert config.amqp_urls == ("amqp://a/", "amqps://u:p@b:5671/v")
    for value in ("amqp://a/,bogus", "amqp://a/,,amqp://b/", "amqp://a/,"):
        assert config_error(env, amqp_addr=value).startswith("--amqp-addr: ")


@pytest.mark.parametrize(
    "value", ["amqp://u:s3cret@[::1/", "http://u:s3cret@h/", "amqp://u:s3cret@h:0/",
              "amqp://a/,amqp://u:s3cret@h:x/"],
)  # fmt: skip
def test_bad_amqp_addr_message_hides_the_password(env: dict[str, str], value: str) -> None:
    message = config_error(env, amqp_addr=value)
    assert message.startswith("--amqp-addr: ") and "s3cret" not in message, message
    assert "u:***@" in message, message


def test_amqp_addr_password_may_hold_a_comma_or_a_slash(env: dict[str, str]) -> None:
    """RFC 3986 lets a password hold sub-delims: a list splits only before a scheme."""
    urls = "amqp://u:pa,ss@mq1/, amqp://u:p@mq2/?tcp_options={'TCP_KEEPIDLE':60,'TCP_KEEPCNT':3}"
    config = Config.from_env(env, amqp_addr=urls)
    assert config.amqp_urls == (
        "amqp://u:pa,ss@mq1/", "amqp://u:p@mq2/?tcp_options={'TCP_KEEPIDLE':60,'TCP_KEEPCNT':3}"
    )
    assert pika.URLParameters(config.amqp_urls[0]).credentials.password == "pa,ss"
    for value in ("amqp://u:pa/ss@mq1:x/", "amqp://u:pa,ss@mq1:x/"):
        message = config_error(env, amqp_addr=value)
        assert "ss" not in message.replace("amqp", ""), message


@pytest.mark.parametrize(
    "hosts", ["mq1/vh", "u@mq1", "mq1#x", "mq1 :5672", "mq1?x", "h:+5672", "h:5_672",
              "h: 5672", "h:\u0665\u0666\u0667\u0668", "[::1%]", "[zz::1]:5", "::g", "h:123456"],
)  # fmt: skip
def test_rabbitmq_host_entry_pika_would_misread(env: dict[str, str], hosts: str) -> None:
    """Entries pika would take for a vhost, a user, a fragment, or an odd port."""
    assert config_error({**env, "RABBITMQ_HOST": hosts}).startswith("RABBITMQ_HOST: ")
