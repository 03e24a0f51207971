"""``rango token``: a JWT with the claims barong issues (PROTOCOL §8), for tests and demos.

:func:`mint_token` is also what ``rango listen --key`` signs its token with. The
module is ``tokens``, not ``token``, so that it cannot shadow the standard library's.
"""

from __future__ import annotations

import argparse
import secrets
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from ..config import JWT_ALGORITHMS
from ._common import DEFAULT_KEY, DEFAULT_ROLE, DEFAULT_UID, OK, ToolError, add_command

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

    from ._common import Commands


def add_parser(commands: Commands) -> None:
    parser = add_command(
        commands,
        "token",
        token,
        help="print a JWT as barong issues it",
        description="Print a JWT with the claims barong issues (iat, exp, sub, iss, aud, "
        "jti, uid, email, role, level, state), signed with a PEM private key.",
    )
    parser.add_argument(
        "--key", default=DEFAULT_KEY, metavar="PATH",
        help=f"PEM private key (default: {DEFAULT_KEY})",
    )  # fmt: skip
    parser.add_argument("--uid", default=DEFAULT_UID, help=f"uid claim (default: {DEFAULT_UID})")
    parser.add_argument(
        "--role", default=DEFAULT_ROLE, help=f"role claim (default: {DEFAULT_ROLE})"
    )
    parser.add_argument(
        "--ttl", type=int, default=3600, metavar="SECONDS",
        help="lifetime; negative for an expired token (default: 3600)",
    )  # fmt: skip
    parser.add_argument(
        "--claim", action="append", type=_claim, default=[], dest="claims",
        metavar="NAME=VALUE",
        help="add or replace a claim; VALUE is read as JSON when it is valid JSON "
        "(level=3, aud='[\"peatio\"]'), else as a string; NAME=null removes the claim",
    )  # fmt: skip
    parser.add_argument(
        "--algorithm", default="RS256", choices=JWT_ALGORITHMS, metavar="ALG",
        help="signing algorithm; it must suit the key (default: RS256)",
    )  # fmt: skip


def _claim(value: str) -> tuple[str, Any]:
    name, sep, raw = value.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"{value!r} is not NAME=VALUE")
    try:
        return name, orjson.loads(raw)
    except orjson.JSONDecodeError:
        return name, raw


def token(args: argparse.Namespace) -> int:
    """Print a token minted from ``args``."""
    print(
        mint_token(
            args.key,
            uid=args.uid,
            role=args.role,
            ttl=args.ttl,
            claims=args.claims,
            algorithm=args.algorithm,
        )
    )
    return OK


def mint_token(
    key_path: str,
    *,
    uid: str = DEFAULT_UID,
    role: str = DEFAULT_ROLE,
    ttl: int = 3600,
    claims: Iterable[tuple[str, Any]] = (),
    algorithm: str = "RS256",
) -> str:
    """Return a JWT as barong issues it (PROTOCOL §8), signed with the key at ``key_path``.

    ``claims`` are ``(name, value)`` pairs applied last; a ``None`` value removes
    the claim. Raises :class:`ToolError` if the key cannot be read or cannot sign
    with ``algorithm``.
    """
    import jwt

    key = _load_private_key(key_path)
    now = int(time.time())
    payload: dict[str, Any] = {
        "iat": now, "exp": now + ttl, "sub": "session", "iss": "barong",
        "aud": ["peatio", "barong"], "jti": secrets.token_hex(12).upper(),
        "uid": uid, "email": "user@example.com", "role": role, "level": 4,
        "state": "active",
    }  # fmt: skip
    for name, value in claims:
        if value is None:
            payload.pop(name, None)
        else:
            payload[name] = value
    try:
        # Any PEM key is tried, DH or X25519 ones too: PyJWT refuses those, handled below.
        return jwt.encode(payload, key, algorithm=algorithm)  # type: ignore[arg-type]
    except (jwt.PyJWTError, TypeError, ValueError):
        kind = type(key).__name__.removeprefix("_").removesuffix("PrivateKey")
        raise ToolError(f"cannot sign {algorithm} with the {kind} key {key_path}") from None


def _load_private_key(path: str) -> PrivateKeyTypes:
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    try:
        pem = Path(path).read_bytes()
    except FileNotFoundError:
        raise ToolError(f"no private key at {path} (run `rango keygen` to create one)") from None
    except OSError as exc:
        raise ToolError(f"cannot read {path}: {exc.strerror}") from None
    try:
        return serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ToolError(f"{path} is not an unencrypted PEM private key") from None
