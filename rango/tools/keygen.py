"""``rango keygen``: an RSA 2048 key pair for development, as Go Rango writes it.

The private key signs the tokens of ``rango token`` and ``rango listen --key``;
the public key is the gateway's default ``--pubKey``.
"""

from __future__ import annotations

import argparse
import base64
import os
from pathlib import Path
from typing import TYPE_CHECKING

from ._common import DEFAULT_KEY, OK, ToolError, add_command

if TYPE_CHECKING:
    from ._common import Commands


def add_parser(commands: Commands) -> None:
    parser = add_command(
        commands,
        "keygen",
        keygen,
        help="create an RSA 2048 key pair for development",
        description="Create an RSA 2048 key pair: the private key (PEM, mode 0600) at "
        "PATH and the public key at PATH.pub, the gateway's default --pubKey. Prints "
        "the JWT_PUBLIC_KEY=... line that configures the gateway without the file.",
    )
    parser.add_argument(
        "--out", default=DEFAULT_KEY, metavar="PATH",
        help=f"private key file; the public key goes to PATH.pub (default: {DEFAULT_KEY})",
    )  # fmt: skip
    parser.add_argument("--force", action="store_true", help="overwrite existing files")


def keygen(args: argparse.Namespace) -> int:
    """Write a new key pair to ``args.out`` and ``args.out + ".pub"``."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    private_path, public_path = Path(args.out), Path(f"{args.out}.pub")
    if not args.force:
        for path in (private_path, public_path):
            if path.exists():
                raise ToolError(f"{path} already exists (use --force to overwrite it)")
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    # PKCS#1 and SubjectPublicKeyInfo, as Go Rango writes them.
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    try:
        private_path.parent.mkdir(parents=True, exist_ok=True)
        _write_file(private_path, private_pem, 0o600)
        _write_file(public_path, public_pem, 0o644)
    except OSError as exc:
        raise ToolError(f"cannot write {exc.filename or args.out}: {exc.strerror}") from None
    print(f"private key: {private_path}")
    print(f"public key:  {public_path}")
    print(f"JWT_PUBLIC_KEY={base64.b64encode(public_pem).decode()}")
    return OK


def _write_file(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` with permissions ``mode``, set before any byte is written."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as file:
        os.fchmod(fd, mode)  # the file may have existed with other permissions
        file.write(data)
