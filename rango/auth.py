"""JWT authentication of websocket upgrade requests (PROTOCOL §2).

The algorithm is pinned to ``JWT_ALGORITHM``: a token whose header names any
other algorithm (``none`` and HMAC-with-the-public-key included) is refused.
``exp``, ``nbf`` and ``iat`` are checked with Ranger's per-claim leeways,
``iss`` and ``aud`` only when configured, and ``uid`` must be present.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, NamedTuple

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from .config import Config, ConfigError

if TYPE_CHECKING:
    from jwt.types import Options

__all__ = ["ANONYMOUS", "Auth", "AuthError", "Authenticator", "bearer_token"]

# Tokens longer than this are refused before any parsing: a real session JWT is
# under 2 KB, and decoding a hostile megabyte costs CPU for nothing.
MAX_TOKEN_LENGTH = 8192

_VERIFYING_KEYS = (
    rsa.RSAPublicKey, ec.EllipticCurvePublicKey, ed25519.Ed25519PublicKey, ed448.Ed448PublicKey,
)
_KEY_TYPES: dict[str, tuple[type, ...]] = {
    "RS": (rsa.RSAPublicKey,),
    "PS": (rsa.RSAPublicKey,),
    "ES": (ec.EllipticCurvePublicKey,),
    "Ed": (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey),
}


class Auth(NamedTuple):
    """Who a connection is: ``uid`` is empty for anonymous connections."""

    uid: str = ""
    role: str = ""


ANONYMOUS = Auth()


class AuthError(Exception):
    """A token was refused; the message is the reason, never the token."""


def bearer_token(header: str | None) -> str:
    """Extract the token of ``Authorization: Bearer <token>`` (exactly one space)."""
    if header is None:
        raise AuthError("no Authorization header")
    if not header.startswith("Bearer "):
        raise AuthError("Authorization header is not 'Bearer <token>'")
    token = header[7:]
    if not token or " " in token:
        raise AuthError("Authorization header is not 'Bearer <token>'")
    return token


class Authenticator:
    """Verifies tokens against one public key and one algorithm."""

    def __init__(self, config: Config) -> None:
        self.algorithm = config.jwt_algorithm
        key = load_pem_public_key(config.jwt_public_key)
        if not isinstance(key, _KEY_TYPES[self.algorithm[:2]]):
            raise ConfigError(
                f"JWT_ALGORITHM: {self.algorithm} cannot be verified with the "
                f"configured public key ({type(key).__name__})"
            )
        # Checked just above against the algorithm's own key types.
        assert isinstance(key, _VERIFYING_KEYS)
        self.key = key
        try:  # e.g. ES256 with a P-384 key: PyJWT would fail every token at runtime
            jwt.get_algorithm_by_name(self.algorithm).prepare_key(self.key)
        except jwt.InvalidKeyError as exc:
            raise ConfigError(
                f"JWT_ALGORITHM: {self.algorithm} cannot be verified with the "
                f"configured public key ({exc})"
            ) from None
        self.issuer = config.jwt_issuer
        self.audience = list(config.jwt_audience) if config.jwt_audience else None
        leeway = config.jwt_default_leeway
        self.exp_leeway = leeway if config.jwt_exp_leeway is None else config.jwt_exp_leeway
        self.nbf_leeway = leeway if config.jwt_nbf_leeway is None else config.jwt_nbf_leeway
        self.iat_leeway = leeway if config.jwt_iat_leeway is None else config.jwt_iat_leeway
        self._options: Options = {
            "verify_signature": True,
            "verify_exp": False,  # checked below with the per-claim leeways
            "verify_nbf": False,
            "verify_iat": False,
            "verify_iss": self.issuer is not None,
            "verify_aud": self.audience is not None,
        }

    def authenticate(self, header: str | None) -> Auth:
        """Return the identity in the ``Authorization`` header or raise :class:`AuthError`."""
        token = bearer_token(header)
        if len(token) > MAX_TOKEN_LENGTH:
            raise AuthError(f"token longer than {MAX_TOKEN_LENGTH} bytes")
        try:
            claims = jwt.decode(
                token,
                self.key,
                algorithms=[self.algorithm],
                options=self._options,
                issuer=self.issuer,
                audience=self.audience,
            )
        except jwt.InvalidAlgorithmError:
            raise AuthError("token algorithm is not " + self.algorithm) from None
        except jwt.InvalidSignatureError:
            raise AuthError("bad signature") from None
        except jwt.InvalidIssuerError:
            raise AuthError("wrong issuer") from None
        except jwt.InvalidAudienceError:
            raise AuthError("wrong audience") from None
        except jwt.MissingRequiredClaimError as exc:
            raise AuthError(f"missing claim {exc.claim}") from None
        except jwt.DecodeError as exc:
            raise AuthError(f"malformed token ({_short(exc)})") from None
        except jwt.InvalidTokenError as exc:
            raise AuthError(f"invalid token ({_short(exc)})") from None
        if not isinstance(claims, dict):
            raise AuthError("token payload is not an object")
        self._check_times(claims)
        uid = claims.get("uid")
        if not isinstance(uid, str) or not uid:
            raise AuthError("no uid claim")
        role = claims.get("role")
        return Auth(uid, role if isinstance(role, str) else "")

    def _check_times(self, claims: dict[str, Any]) -> None:
        now = time.time()
        exp, nbf, iat = _number(claims, "exp"), _number(claims, "nbf"), _number(claims, "iat")
        if exp is not None and now >= exp + self.exp_leeway:
            raise AuthError("token expired")
        if nbf is not None and now < nbf - self.nbf_leeway:
            raise AuthError("token not yet valid")
        if iat is not None and now < iat - self.iat_leeway:
            raise AuthError("token issued in the future")


def _number(claims: dict[str, Any], claim: str) -> float | None:
    value = claims.get(claim)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise AuthError(f"{claim} claim is not a number")
    return value


def _short(exc: Exception) -> str:
    return str(exc).split("\n")[0][:80]
