"""Every setting of the table, every kind of bad value: a default or one clear error.

The test walks ``rango.settings.SETTINGS`` and ``FLAGS``, so a new row is covered
without a new test. For each value, ``Config.from_env`` either starts (the value is
valid, or empty and the default applies) or raises ``ConfigError`` whose message
starts with the setting's name and fits on one line; nothing else ever escapes.
The same rule for processes (exit status 2, no traceback, no restart) is checked
end to end in ``tests/e2e/test_config_failures.py``.
"""

from __future__ import annotations

import base64

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from rango.config import Config, ConfigError
from rango.settings import FLAGS, SETTINGS

BAD_VALUES = [
    "",
    "   ",
    "\t\n",
    "x" * 100_000,
    "9" * 400,
    "-1",
    "-99999999999999999999",
    "1e400",
    "nan",
    "inf",
    "0x10",
    "twelve",
    "1,,2",
    ",",
    " , a ,",
    "::1",
    "::1:8080",
    "[::1",
    "[::1]:99999",
    "%zz%00",
    "amqp://%zz@host:5672/%",
    "\udcff\udcfe",  # bytes that are not UTF-8, as os.environ carries them (surrogateescape)
    "caf\u00e9",
    "\x00",
]


@pytest.fixture(scope="module")
def base_env() -> dict[str, str]:
    pem = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return {"JWT_PUBLIC_KEY": base64.b64encode(pem).decode(), "JWT_ALGORITHM": "ES256"}


def _names() -> list[str]:
    return [row.name.replace("<PREFIX>", "ADMIN") for row in SETTINGS]


def _check(names: tuple[str, ...], call: object) -> None:
    """``call`` starts, or raises a one-line ConfigError that begins with one of ``names``."""
    try:
        call()  # type: ignore[operator]
    except ConfigError as exc:
        message = str(exc)
        assert message.startswith(names), f"{names}: {message[:300]!r}"
        assert "\n" not in message and len(message) < 1000, f"{names}: {message[:300]!r}"


@pytest.mark.parametrize("name", _names())
@pytest.mark.parametrize("value", BAD_VALUES, ids=lambda v: repr(v)[:24])
def test_every_variable_gives_a_default_or_one_clear_error(
    name: str, value: str, base_env: dict[str, str]
) -> None:
    env = {**base_env, name: value}
    if name == "JWT_PUBLIC_KEY":
        env.pop("JWT_ALGORITHM")  # a bad key must be named, not the algorithm it misfits
    # A variable read together with another may name the pair (RANGO_TLS_*, --certfile/...).
    names = (name, "--certfile/") if name.startswith("RANGO_TLS_") else (name,)
    _check(names, lambda: Config.from_env(env))


@pytest.mark.parametrize("flag", FLAGS, ids=lambda f: f.name)
@pytest.mark.parametrize("value", BAD_VALUES, ids=lambda v: repr(v)[:24])
def test_every_flag_gives_a_default_or_one_clear_error(
    flag: object, value: str, base_env: dict[str, str]
) -> None:
    dest, spelling = flag.dest, flag.name  # type: ignore[attr-defined]
    overridden = tuple(row.name for row in SETTINGS if row.flag is flag)
    # --keyfile alone is named by the flag it needs: "--certfile/...: required with --keyfile".
    pair = ("--certfile/",) if spelling == "--keyfile" else ()
    _check((spelling, *overridden, *pair), lambda: Config.from_env(dict(base_env), **{dest: value}))
