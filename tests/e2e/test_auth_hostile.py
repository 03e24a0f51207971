"""Hostile tokens on /private: every one is refused with HTTP 401 and one WARNING line
that names the reason and never contains the token (PROTOCOL §2).

e2e/test_connect.py::test_private_with_invalid_token_is_401 checks the status of some of
these cases; here each case is also followed into the gateway's log, against a gateway
that checks ``iss`` and ``aud`` (JWT_ISSUER, JWT_AUDIENCE).
"""

from __future__ import annotations

import base64
import re
import time
from collections.abc import Callable, Iterator

import jwt
import orjson
import pytest
from support.answers import expect, refused, subscribed
from support.gateway import Rango
from support.polling import wait_for
from support.tokens import KeyPair, b64url, forge
from support.wire import upgrade_status

# The gateway checks what barong puts in its tokens (rango.tools.mint_token).
ENV = {"JWT_ISSUER": "barong", "JWT_AUDIENCE": "peatio,barong"}
REFUSED = re.compile(r" WARNING \[worker \d+\] rango\.server: refused /private: (.*)$", re.M)


@pytest.fixture(scope="module")
def strict(keys: KeyPair, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rango]:
    with Rango(keys, tmp_path_factory.mktemp("tokens"), env=ENV) as instance:
        yield instance


def _tampered(keys: KeyPair) -> str:
    """A valid token whose payload names another uid, signature kept."""
    header, _, signature = keys.token().split(".")
    payload = b64url(orjson.dumps(keys.claims(uid="IDEVIL0000001")))
    return f"{header}.{payload}.{signature}"


def _not_json_header(keys: KeyPair) -> str:
    _, payload, signature = keys.token().split(".")
    header = b64url(b'{"alg":"RS256","kid":"unterminated')
    return f"{header}.{payload}.{signature}"


# name -> (Authorization header from keys and a stranger's keys, the reason's wording)
CASES: dict[str, tuple[Callable[[KeyPair, KeyPair], str], str]] = {
    "alg none": (
        lambda k, _: "Bearer " + forge({"alg": "none", "typ": "JWT"}, k.claims(), None),
        r"algorithm is not RS256",
    ),
    "HS256 keyed with the public key PEM": (
        lambda k, _: "Bearer " + forge({"alg": "HS256", "typ": "JWT"}, k.claims(), k.public_pem),
        r"algorithm is not RS256",
    ),
    "HS256 keyed with JWT_PUBLIC_KEY's base64": (
        lambda k, _: (
            "Bearer " + forge({"alg": "HS256"}, k.claims(), base64.b64encode(k.public_pem))
        ),
        r"algorithm is not RS256",
    ),
    "RS512 with the right key": (
        lambda k, _: "Bearer " + jwt.encode(k.claims(), k.private_key, algorithm="RS512"),
        r"algorithm is not RS256",
    ),
    "PS256 with the right key": (
        lambda k, _: "Bearer " + jwt.encode(k.claims(), k.private_key, algorithm="PS256"),
        r"algorithm is not RS256",
    ),
    "signed by another key": (lambda _, s: "Bearer " + s.token(), r"bad signature"),
    "payload tampered with": (lambda k, _: "Bearer " + _tampered(k), r"bad signature"),
    "expired": (
        lambda k, _: "Bearer " + k.token(exp=int(time.time()) - 60, iat=int(time.time()) - 120),
        r"expired",
    ),
    "not yet valid": (
        lambda k, _: "Bearer " + k.token(nbf=int(time.time()) + 600),
        r"not yet valid",
    ),
    "issued in the future": (
        lambda k, _: "Bearer " + k.token(iat=int(time.time()) + 600),
        r"issued in the future",
    ),
    "exp not a number": (lambda k, _: "Bearer " + k.token(exp="tomorrow"), r"exp .*not a number"),
    "wrong issuer": (lambda k, _: "Bearer " + k.token(iss="evil"), r"issuer"),
    "no issuer": (lambda k, _: "Bearer " + k.token(iss=None), r"\biss\b"),
    "wrong audience": (lambda k, _: "Bearer " + k.token(aud=["evil"]), r"audience"),
    "no audience": (lambda k, _: "Bearer " + k.token(aud=None), r"\baud\b"),
    "no uid": (lambda k, _: "Bearer " + k.token(uid=None), r"uid"),
    "uid not a string": (lambda k, _: "Bearer " + k.token(uid=12345), r"uid"),
    "9 KB token": (
        lambda k, _: "Bearer " + k.token(pad="x" * 9000),
        r"token longer than 8192 bytes",
    ),
    "1 MB token": (
        lambda k, _: "Bearer " + k.token(pad="x" * (1 << 20)),
        r"request headers larger than 16384 bytes",
    ),
    "two spaces": (lambda k, _: "Bearer  " + k.token(), r"Bearer <token>"),
    "lower-case bearer": (lambda k, _: "bearer " + k.token(), r"Bearer <token>"),
    "no scheme": (lambda k, _: k.token(), r"Bearer <token>"),
    "Basic scheme": (lambda k, _: "Basic " + k.token(), r"Bearer <token>"),
    "garbage": (lambda _k, _s: "Bearer not.a.jwt-at-all", r"malformed token"),
    "header not JSON": (lambda k, _: "Bearer " + _not_json_header(k), r"malformed token"),
}


def refuse(rango: Rango, header: str) -> int:
    """The status of an upgrade of /private with ``header``."""
    if len(header) > 16384:  # refused before it is read whole: no library client copes
        return upgrade_status(rango.port, "/private", {"Authorization": header})
    return refused(rango, "/private", {"Authorization": header})


def refusal_line(rango: Rango, header: str) -> str:
    """Refuse ``header`` until a refusal line follows; return its reason.

    Refusals are logged at most once a second per reason, so one of an earlier case
    may hide this one's: the request is repeated, each answered 401, until it shows.
    """
    offset = len(rango.log())

    def logged() -> str | None:
        assert refuse(rango, header) == 401
        found = REFUSED.findall(rango.log()[offset:])
        return found[-1] if found else None

    return wait_for(logged, 5, "a 'refused /private' line in the log")


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_token_is_refused_and_logged_without_the_token(strict, keys, other_keys, name):
    make, reason = CASES[name]
    header = make(keys, other_keys)
    line = refusal_line(strict, header)
    assert re.search(reason, line), f"{line!r} does not name the reason ({reason})"
    log = strict.log()
    token = header.split(" ")[-1]
    # Neither the token nor any of its parts of note (header, payload, signature).
    for part in [token, *(p for p in token.split(".") if len(p) >= 16)]:
        assert part[:64] not in log, f"the log contains the token ({name})"
    assert "Traceback" not in log, log


def test_a_valid_token_still_passes(strict, keys):
    """The checks above refuse for their reason, not because every token fails."""
    with strict.connect("/private", "stream=order", additional_headers=keys.bearer()) as ws:
        expect(ws, subscribed(["order"]))


def test_refusal_lines_are_rate_limited(strict, keys):
    """A client hammering /private with bad tokens does not get a line per attempt."""
    offset = len(strict.log())
    header = "Bearer " + keys.token(iss="hammer")
    started = time.monotonic()
    attempts = 0
    # Past one interval (1 s), so at least one line must show whatever came before.
    while attempts < 200 or time.monotonic() - started < 1.5:
        assert attempts < 2000
        assert refuse(strict, header) == 401
        attempts += 1
    elapsed = time.monotonic() - started
    lines = REFUSED.findall(strict.log()[offset:])
    assert 1 <= len(lines) <= elapsed + 1, (len(lines), attempts, elapsed)
