"""``rango listen``: the frames a websocket client of the gateway receives, one a line.

It subscribes through the query string and, with ``--key``, ``--uid`` or
``--role``, authenticates with a token from :func:`~rango.tools.tokens.mint_token`.
websockets is imported when it connects, not with this module.
"""

from __future__ import annotations

import argparse
import time
from typing import TYPE_CHECKING
from urllib.parse import urlencode, urlsplit, urlunsplit

from ._common import (
    DEFAULT_KEY,
    DEFAULT_ROLE,
    DEFAULT_UID,
    FAILED,
    OK,
    ToolError,
    add_command,
    positive,
    warn,
)
from .tokens import mint_token

if TYPE_CHECKING:
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import ClientConnection

    from ._common import Commands

DEFAULT_LISTEN_URL = "ws://127.0.0.1:8080/public"


def add_parser(commands: Commands) -> None:
    parser = add_command(
        commands,
        "listen",
        listen,
        help="print the frames a websocket client receives",
        description="Connect to the gateway, subscribe to streams through the query "
        "string and print every frame received, one a line. Exit status 0 once --count "
        "frames arrived or, without --count, when --timeout expires or the server "
        "closes the connection cleanly; 1 otherwise.",
    )
    parser.add_argument(
        "url", nargs="?", default=DEFAULT_LISTEN_URL, metavar="URL",
        help=f"websocket URL (default: {DEFAULT_LISTEN_URL})",
    )  # fmt: skip
    parser.add_argument(
        "--stream", action="append", default=[], dest="streams", metavar="S",
        help="subscribe to S (repeat, or a comma list)",
    )  # fmt: skip
    auth = parser.add_mutually_exclusive_group()
    auth.add_argument("--token", help="send Authorization: Bearer TOKEN")
    auth.add_argument(
        "--key", metavar="PATH",
        help="mint a token with this private key; --uid or --role alone use "
        f"{DEFAULT_KEY} (default: no token, anonymous)",
    )  # fmt: skip
    parser.add_argument("--uid", help=f"uid of the minted token (default: {DEFAULT_UID})")
    parser.add_argument("--role", help=f"role of the minted token (default: {DEFAULT_ROLE})")
    parser.add_argument(
        "--count", type=positive(int), metavar="N",
        help="exit after N frames, the subscription answer included",
    )  # fmt: skip
    parser.add_argument(
        "--timeout", type=positive(float), metavar="SECONDS",
        help="exit SECONDS after connecting (connecting itself may take 10 s)",
    )  # fmt: skip


def listen(args: argparse.Namespace) -> int:
    """Print the frames received on ``args.url`` until done."""
    token = args.token
    if token is None and (args.key or args.uid or args.role):
        token = mint_token(
            args.key or DEFAULT_KEY, uid=args.uid or DEFAULT_UID, role=args.role or DEFAULT_ROLE
        )
    with _connect(_with_streams(args.url, args.streams), token) as ws:
        deadline = None if args.timeout is None else time.monotonic() + args.timeout
        return _print_frames(ws, args.count, deadline)


def _with_streams(url: str, streams: list[str]) -> str:
    """``url`` with ``stream=S`` appended to its query string for each of ``streams``."""
    if not streams:
        return url
    parts = urlsplit(url)
    extra = urlencode([("stream", stream) for stream in streams], safe=",")
    query = f"{parts.query}&{extra}" if parts.query else extra
    return urlunsplit(parts._replace(query=query))


def _connect(url: str, token: str | None) -> ClientConnection:
    from websockets.exceptions import InvalidHandshake, InvalidStatus, InvalidURI
    from websockets.sync.client import connect

    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        return connect(
            url,
            additional_headers=headers,
            open_timeout=10.0,
            max_size=None,
        )
    except InvalidURI as exc:
        raise ToolError(str(exc)) from None
    except InvalidStatus as exc:
        response = exc.response
        detail = response.body.decode(errors="replace").strip().split("\n")[0][:200]
        raise ToolError(
            f"{url} refused the upgrade: HTTP {response.status_code} "
            f"{response.reason_phrase}"
            + (f" ({detail})" if detail and detail != response.reason_phrase else ""),
            FAILED,
        ) from None
    except (OSError, TimeoutError, InvalidHandshake) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ToolError(f"cannot connect to {url}: {reason or 'timed out'}", FAILED) from None


def _print_frames(ws: ClientConnection, count: int | None, deadline: float | None) -> int:
    """Print frames until ``count`` of them, ``deadline`` or the end of the connection."""
    from websockets.exceptions import ConnectionClosedError, ConnectionClosedOK

    received = 0
    while count is None or received < count:
        try:
            frame = ws.recv(timeout=None if deadline is None else _remaining(deadline))
        except TimeoutError:
            if count is None:
                return OK
            raise ToolError(f"timed out with {received} of {count} frames", FAILED) from None
        except ConnectionClosedOK as exc:
            if count is None:
                warn("listen", _closed(exc))
                return OK
            raise ToolError(f"{_closed(exc)} after {received} of {count} frames", FAILED) from None
        except ConnectionClosedError as exc:
            raise ToolError(_closed(exc), FAILED) from None
        print(frame if isinstance(frame, str) else frame.decode(errors="replace"), flush=True)
        received += 1
    return OK


def _closed(exc: ConnectionClosed) -> str:
    close = exc.rcvd
    if close is None:
        return "connection lost"
    return f"connection closed by the server ({close})"


def _remaining(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())
