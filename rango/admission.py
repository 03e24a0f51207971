"""Who may upgrade (PROTOCOL §2), sans I/O: the connection cap, JWT, Origin, refusals.

The connection calls :meth:`Admission.check` with the few request values it
read, whichever handshake path parsed the request, and gets a :class:`Verdict`:
the client's identity, or the HTTP status to refuse it with. Nothing here
touches a socket; the refusals that need a log line are logged here, at most
once a second per reason.
"""

from __future__ import annotations

import logging
from typing import NamedTuple
from urllib.parse import urlsplit

import websockets.exceptions
from websockets.datastructures import Headers

from .auth import ANONYMOUS, Auth, Authenticator, AuthError
from .config import Config
from .logs import RateLimited

__all__ = [
    "MAX_REQUEST_SIZE",
    "MULTIPLE",
    "Admission",
    "Verdict",
    "oversized_status",
    "parse_failure_status",
    "request_values",
]

log = logging.getLogger("rango.server")

# Largest upgrade request accepted (request line and headers). Browsers send 1-4 KB
# with cookies; a session JWT is under 2 KB.
MAX_REQUEST_SIZE = 16384

# An Origin or Host header given more than once (never allowed).
MULTIPLE = "\x00multiple"
# Several Authorization headers: a value no token check accepts.
_SEVERAL_AUTHORIZATIONS = "multiple headers"

# websockets 14+ names it; older versions raise a plain SecurityError.
_REQUEST_LINE_TOO_LONG = getattr(websockets.exceptions, "RequestLineTooLong", ())


class Verdict(NamedTuple):
    """What :meth:`Admission.check` decided: ``status`` 0 admits the client as ``auth``."""

    status: int
    reason: str
    auth: Auth


def request_values(headers: Headers) -> tuple[str | None, str | None, str | None]:
    """``Authorization``, ``Origin`` and ``Host`` of a request that websockets parsed.

    A header given more than once becomes a value that no check accepts (the
    fast path leaves such requests to websockets, so both paths agree).
    """
    values: list[str | None] = []
    for name, several in (("Authorization", _SEVERAL_AUTHORIZATIONS), ("Origin", MULTIPLE),
                          ("Host", MULTIPLE)):
        found = headers.get_all(name)
        values.append(found[0] if len(found) == 1 else several if found else None)
    return values[0], values[1], values[2]


def parse_failure_status(exc: BaseException) -> int:
    """The status websockets answers a request it cannot parse with (400: closed unanswered)."""
    if isinstance(exc, _REQUEST_LINE_TOO_LONG):
        return 414
    if isinstance(exc, websockets.exceptions.SecurityError):
        return 431
    return 400


def oversized_status(head: bytes) -> int:
    """The status for a request over :data:`MAX_REQUEST_SIZE`: 401 on /private, else 431.

    /private says 401 so that a client sending a huge token learns it was not
    accepted, rather than that its headers were merely long.
    """
    return 401 if head.startswith(b"GET /private") else 431


class Admission:
    """The upgrade policy of one worker: connection cap, authentication, Origin."""

    def __init__(self, config: Config, authenticator: Authenticator | None = None) -> None:
        self.config = config
        self.authenticator = authenticator or Authenticator(config)
        self._limited = RateLimited(log, interval=1.0)
        # Upgraded connections admitted at once: RANGO_MAX_CONNECTIONS, or fewer
        # when the file-descriptor limit allows fewer (see bound_by_descriptors).
        self.capacity = config.max_connections
        self._bound = "RANGO_MAX_CONNECTIONS"

    def bound_by_descriptors(self, room: int) -> None:
        """Admit at most ``room`` connections when that is below RANGO_MAX_CONNECTIONS."""
        if room < self.capacity:
            self.capacity = room
            self._bound = "the file-descriptor limit (RLIMIT_NOFILE)"

    def check(
        self,
        clients: int,
        target: str,
        authorization: str | None,
        origin: str | None,
        host: str | None,
    ) -> Verdict:
        """Decide on an upgrade request while ``clients`` connections are open.

        ``origin`` or ``host`` is :data:`MULTIPLE` when the request had several.
        """
        if clients >= self.capacity:
            self._limited.log(
                logging.WARNING, "503", "refusing connections: %d open, the most %s allows",
                clients, self._bound,
            )
            return Verdict(503, "Too many connections", ANONYMOUS)
        path = urlsplit(target).path
        auth = ANONYMOUS
        if authorization is not None or path == "/private":
            try:
                auth = self.authenticator.authenticate(authorization)
            except AuthError as exc:
                if path == "/private":
                    self.refused(str(exc))
                    return Verdict(401, "Unauthorized", ANONYMOUS)
                log.debug("anonymous fallback: %s", exc)
        if not self.origin_allowed(origin, host):
            return Verdict(403, "Forbidden origin", ANONYMOUS)
        return Verdict(0, "", auth)

    def refused(self, reason: str) -> None:
        """Warn that /private was refused, at most once a second per reason (never the token)."""
        self._limited.log(logging.WARNING, reason, "refused /private: %s", reason)

    def origin_allowed(self, origin: str | None, host: str | None) -> bool:
        """The Origin rule: no Origin, the same host as ``Host``, or one API_CORS_ORIGINS lists."""
        if origin is MULTIPLE or host is MULTIPLE:
            return False
        if origin is None:
            return True
        allowed = self.config.cors_origins
        if origin == "null":
            # Pages opened from disk (file://) and sandboxed frames: only when
            # API_CORS_ORIGINS lists "null" explicitly (a development opt-in).
            return allowed is not None and "null" in allowed
        netloc = urlsplit(origin).netloc.lower()
        if not netloc:
            return False
        if allowed is None:
            return host is not None and netloc == host.lower()
        return netloc in allowed
