"""Key pairs and tokens: barong's tokens come from ``rango.tools.mint_token`` (the claims
are stated once, there); hostile ones are forged here by hand.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from pathlib import Path
from typing import Any

import jwt
import orjson
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from rango.tools import mint_token

UID = "IDABC0000001"  # the uid of the tests' tokens unless told otherwise


class KeyPair:
    """An RSA key pair on disk (``rsa-key``, ``rsa-key.pub``), and tokens signed with it."""

    def __init__(self, directory: Path) -> None:
        self.private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.private_pem = self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        self.public_pem = self.private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.private_path = directory / "rsa-key"
        self.public_path = directory / "rsa-key.pub"
        self.private_path.write_bytes(self.private_pem)
        self.private_path.chmod(0o600)
        self.public_path.write_bytes(self.public_pem)

    def token(self, uid: Any = UID, role: str | None = "member", **claims: Any) -> str:
        """A token as barong issues it (PROTOCOL §8); ``claims`` override or add, and
        a None value (``uid`` and ``role`` too) leaves the claim out."""
        pairs = [("uid", uid), ("role", role), *claims.items()]
        return mint_token(str(self.private_path), claims=pairs)

    def bearer(self, **kwargs: Any) -> dict[str, str]:
        """An ``Authorization`` header with :meth:`token`."""
        return {"Authorization": f"Bearer {self.token(**kwargs)}"}

    def claims(self, **kwargs: Any) -> dict[str, Any]:
        """The payload of :meth:`token`, to forge other tokens from."""
        return jwt.decode(self.token(**kwargs), options={"verify_signature": False})


def b64url(data: bytes) -> str:
    """Base64url without padding, as in a JWT."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: dict[str, Any], payload: dict[str, Any], secret: bytes | None) -> str:
    """A JWT built by hand: HMAC-SHA256 with ``secret``, or unsigned when None."""
    signing_input = f"{b64url(orjson.dumps(header))}.{b64url(orjson.dumps(payload))}"
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest() if secret else b""
    return f"{signing_input}.{b64url(signature)}"
