"""Unit tests of JWT authentication (PROTOCOL §2)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from types import SimpleNamespace
from typing import Any

import jwt
import orjson
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from support.tokens import UID, b64url

import rango.auth
from rango.auth import MAX_TOKEN_LENGTH, Auth, Authenticator, AuthError, bearer_token
from rango.config import Config, ConfigError

NOW = 1_700_000_000


def public_pem(private_key: Any) -> bytes:
    return private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def unsigned(header: dict[str, Any], payload: Any) -> str:
    return f"{b64url(orjson.dumps(header))}.{b64url(orjson.dumps(payload))}"


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(autouse=True)
def frozen_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """The authenticator's clock reads NOW (PyJWT's own time checks are off)."""
    monkeypatch.setattr(rango.auth, "time", SimpleNamespace(time=lambda: float(NOW)))


def make_config(key: Any, **env: str) -> Config:
    return Config.from_env({"JWT_PUBLIC_KEY": base64.b64encode(public_pem(key)).decode(), **env})


def claims(**overrides: Any) -> dict[str, Any]:
    """A token payload as barong issues it (PROTOCOL §8)."""
    payload: dict[str, Any] = {
        "iat": NOW - 10, "exp": NOW + 3600, "sub": "session", "iss": "barong",
        "aud": ["peatio", "barong"], "jti": "BEF5617B7B2762DDE61702F5", "uid": UID,
        "email": "user@example.com", "role": "admin", "level": 4, "state": "active",
    }  # fmt: skip
    payload.update(overrides)
    return {k: v for k, v in payload.items() if v is not None}


@pytest.fixture
def auth(rsa_key: rsa.RSAPrivateKey) -> Authenticator:
    return Authenticator(make_config(rsa_key))


def sign(key: Any, algorithm: str = "RS256", **overrides: Any) -> str:
    return jwt.encode(claims(**overrides), key, algorithm=algorithm)


def refused(authenticator: Authenticator, header: str | None, *words: str) -> str:
    with pytest.raises(AuthError) as info:
        authenticator.authenticate(header)
    reason = str(info.value)
    assert reason and len(reason) < 200
    token = (header or "").split(" ", 1)[-1]
    if len(token) >= 8:
        assert token not in reason
        # Not even a piece of it: no segment of the token is echoed back.
        for segment in token.split("."):
            assert len(segment) < 8 or segment not in reason
    for word in words:
        assert word in reason, reason
    return reason


def test_valid_token(auth: Authenticator, rsa_key: rsa.RSAPrivateKey) -> None:
    assert auth.authenticate("Bearer " + sign(rsa_key)) == Auth(UID, "admin")


@pytest.mark.parametrize(("role", "expected"), [(None, ""), (7, ""), (["admin"], ""), ("", "")])
def test_role_missing_or_not_a_string(
    auth: Authenticator, rsa_key: rsa.RSAPrivateKey, role: Any, expected: str
) -> None:
    assert auth.authenticate("Bearer " + sign(rsa_key, role=role)) == Auth(UID, expected)


def test_minimal_token(auth: Authenticator, rsa_key: rsa.RSAPrivateKey) -> None:
    token = jwt.encode({"uid": UID}, rsa_key, algorithm="RS256")
    assert auth.authenticate("Bearer " + token) == Auth(UID, "")


def test_alg_none_is_refused(auth: Authenticator) -> None:
    token = unsigned({"alg": "none", "typ": "JWT"}, claims()) + "."
    refused(auth, "Bearer " + token, "algorithm")
    token = unsigned({"alg": "None", "typ": "JWT"}, claims()) + "."
    refused(auth, "Bearer " + token)


def test_hmac_with_the_public_key_is_refused(
    auth: Authenticator, rsa_key: rsa.RSAPrivateKey
) -> None:
    # The classic key-confusion attack, built by hand since PyJWT refuses to.
    secret = public_pem(rsa_key)
    for alg, digest in (("HS256", hashlib.sha256), ("HS512", hashlib.sha512)):
        signing_input = unsigned({"alg": alg, "typ": "JWT"}, claims())
        mac = hmac.new(secret, signing_input.encode(), digest).digest()
        refused(auth, f"Bearer {signing_input}.{b64url(mac)}", "algorithm is not RS256")


@pytest.mark.parametrize("algorithm", ["RS384", "RS512", "PS256", "PS512"])
def test_other_rsa_algorithms_are_refused(
    auth: Authenticator, rsa_key: rsa.RSAPrivateKey, algorithm: str
) -> None:
    refused(auth, "Bearer " + sign(rsa_key, algorithm), "algorithm is not RS256")


def test_header_alg_swapped_after_signing(auth: Authenticator, rsa_key: rsa.RSAPrivateKey) -> None:
    # A PS256 signature presented under an RS256 header: a bad signature.
    signing_input = unsigned({"alg": "RS256", "typ": "JWT"}, claims())
    sig = rsa_key.sign(
        signing_input.encode(),
        padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32),
        hashes.SHA256(),
    )
    refused(auth, f"Bearer {signing_input}.{b64url(sig)}", "signature")


def test_hand_signed_rs256_is_accepted(auth: Authenticator, rsa_key: rsa.RSAPrivateKey) -> None:
    # The hand-built tokens above are refused for their algorithm, not their shape.
    signing_input = unsigned({"alg": "RS256", "typ": "JWT"}, claims())
    sig = rsa_key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    assert auth.authenticate(f"Bearer {signing_input}.{b64url(sig)}") == Auth(UID, "admin")


def test_payload_not_an_object(auth: Authenticator, rsa_key: rsa.RSAPrivateKey) -> None:
    signing_input = unsigned({"alg": "RS256", "typ": "JWT"}, [UID])
    sig = rsa_key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    refused(auth, f"Bearer {signing_input}.{b64url(sig)}")


def test_other_key_is_refused(auth: Authenticator) -> None:
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    refused(auth, "Bearer " + sign(other), "bad signature")


def test_tampered_payload_is_refused(auth: Authenticator, rsa_key: rsa.RSAPrivateKey) -> None:
    header, _, signature = sign(rsa_key).split(".")
    payload = b64url(orjson.dumps(claims(uid="IDOTHER00001")))
    refused(auth, f"Bearer {header}.{payload}.{signature}", "bad signature")


# Times.


def test_expired(auth: Authenticator, rsa_key: rsa.RSAPrivateKey) -> None:
    refused(auth, "Bearer " + sign(rsa_key, exp=NOW - 1), "expired")
    refused(auth, "Bearer " + sign(rsa_key, exp=NOW), "expired")  # exp is exclusive
    assert auth.authenticate("Bearer " + sign(rsa_key, exp=NOW + 1)).uid == UID


def test_no_exp_is_accepted(auth: Authenticator, rsa_key: rsa.RSAPrivateKey) -> None:
    assert auth.authenticate("Bearer " + sign(rsa_key, exp=None)).uid == UID


def test_nbf_in_the_future(auth: Authenticator, rsa_key: rsa.RSAPrivateKey) -> None:
    refused(auth, "Bearer " + sign(rsa_key, nbf=NOW + 1), "not yet valid")
    assert auth.authenticate("Bearer " + sign(rsa_key, nbf=NOW)).uid == UID


def test_iat_in_the_future(auth: Authenticator, rsa_key: rsa.RSAPrivateKey) -> None:
    refused(auth, "Bearer " + sign(rsa_key, iat=NOW + 1), "future")
    assert auth.authenticate("Bearer " + sign(rsa_key, iat=NOW)).uid == UID


@pytest.mark.parametrize(
    "claim", [{"exp": "tomorrow"}, {"nbf": "now"}, {"iat": [1]}, {"exp": True}, {"iat": {}}]
)
def test_time_claim_not_a_number(
    auth: Authenticator, rsa_key: rsa.RSAPrivateKey, claim: dict[str, Any]
) -> None:
    refused(auth, "Bearer " + sign(rsa_key, **claim), "not a number")


@pytest.mark.parametrize(
    ("env", "overrides", "accepted"),
    [
        ({"JWT_EXPIRATION_LEEWAY": "30"}, {"exp": NOW - 29}, True),
        ({"JWT_EXPIRATION_LEEWAY": "30"}, {"exp": NOW - 30}, False),
        ({"JWT_DEFAULT_LEEWAY": "30"}, {"exp": NOW - 29}, True),
        ({"JWT_DEFAULT_LEEWAY": "30", "JWT_EXPIRATION_LEEWAY": "0"}, {"exp": NOW - 1}, False),
        ({"JWT_NOT_BEFORE_LEEWAY": "60"}, {"nbf": NOW + 60}, True),
        ({"JWT_NOT_BEFORE_LEEWAY": "60"}, {"nbf": NOW + 61}, False),
        ({"JWT_DEFAULT_LEEWAY": "60"}, {"nbf": NOW + 60}, True),
        ({"JWT_DEFAULT_LEEWAY": "60", "JWT_NOT_BEFORE_LEEWAY": "0"}, {"nbf": NOW + 1}, False),
        ({"JWT_ISSUED_AT_LEEWAY": "60"}, {"iat": NOW + 60}, True),
        ({"JWT_ISSUED_AT_LEEWAY": "60"}, {"iat": NOW + 61}, False),
        ({"JWT_DEFAULT_LEEWAY": "60"}, {"iat": NOW + 60}, True),
        ({"JWT_DEFAULT_LEEWAY": "60", "JWT_ISSUED_AT_LEEWAY": "0"}, {"iat": NOW + 1}, False),
        # One claim's leeway does not stretch another's.
        ({"JWT_EXPIRATION_LEEWAY": "300"}, {"nbf": NOW + 10}, False),
        ({"JWT_NOT_BEFORE_LEEWAY": "300"}, {"exp": NOW - 10}, False),
    ],
)
def test_leeways(
    rsa_key: rsa.RSAPrivateKey, env: dict[str, str], overrides: dict[str, Any], accepted: bool
) -> None:
    authenticator = Authenticator(make_config(rsa_key, **env))
    header = "Bearer " + sign(rsa_key, **overrides)
    if accepted:
        assert authenticator.authenticate(header) == Auth(UID, "admin")
    else:
        refused(authenticator, header)


def test_real_clock(rsa_key: rsa.RSAPrivateKey, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rango.auth, "time", time)
    authenticator = Authenticator(make_config(rsa_key))
    now = int(time.time())
    assert authenticator.authenticate("Bearer " + sign(rsa_key, iat=now, exp=now + 60)).uid == UID
    refused(authenticator, "Bearer " + sign(rsa_key, iat=now - 120, exp=now - 60), "expired")


# Issuer and audience.


def test_issuer_checked_when_configured(rsa_key: rsa.RSAPrivateKey) -> None:
    authenticator = Authenticator(make_config(rsa_key, JWT_ISSUER="barong"))
    assert authenticator.authenticate("Bearer " + sign(rsa_key)).uid == UID
    refused(authenticator, "Bearer " + sign(rsa_key, iss="evil"), "issuer")
    refused(authenticator, "Bearer " + sign(rsa_key, iss=None), "iss")


def test_issuer_not_checked_when_not_configured(
    auth: Authenticator, rsa_key: rsa.RSAPrivateKey
) -> None:
    assert auth.authenticate("Bearer " + sign(rsa_key, iss="anyone")).uid == UID
    assert auth.authenticate("Bearer " + sign(rsa_key, iss=None)).uid == UID


def test_audience_checked_when_configured(rsa_key: rsa.RSAPrivateKey) -> None:
    authenticator = Authenticator(make_config(rsa_key, JWT_AUDIENCE="peatio,barong"))
    for aud in (["peatio", "barong"], ["peatio"], "barong", ["x", "barong"]):
        assert authenticator.authenticate("Bearer " + sign(rsa_key, aud=aud)).uid == UID
    refused(authenticator, "Bearer " + sign(rsa_key, aud=["applogic"]), "audience")
    refused(authenticator, "Bearer " + sign(rsa_key, aud="applogic"), "audience")
    refused(authenticator, "Bearer " + sign(rsa_key, aud=None), "aud")


def test_audience_not_checked_when_not_configured(
    auth: Authenticator, rsa_key: rsa.RSAPrivateKey
) -> None:
    assert auth.authenticate("Bearer " + sign(rsa_key, aud=["anything"])).uid == UID
    assert auth.authenticate("Bearer " + sign(rsa_key, aud=None)).uid == UID


# uid.


@pytest.mark.parametrize("uid", [None, "", 12345, ["IDABC0000001"], {"id": 1}, True])
def test_uid_required(auth: Authenticator, rsa_key: rsa.RSAPrivateKey, uid: Any) -> None:
    overrides = {"uid": uid} if uid is not None else {"uid": None}
    refused(auth, "Bearer " + sign(rsa_key, **overrides), "uid")


# The header.


def test_token_length_cap(auth: Authenticator, rsa_key: rsa.RSAPrivateKey) -> None:
    padded = sign(rsa_key, pad="x" * MAX_TOKEN_LENGTH)
    assert len(padded) > MAX_TOKEN_LENGTH
    refused(auth, "Bearer " + padded, "longer than")
    refused(auth, "Bearer " + "a" * (MAX_TOKEN_LENGTH + 1), "longer than")
    # Just under the cap is still verified normally.
    fill = sign(rsa_key, pad="")
    target = sign(rsa_key, pad="x" * ((MAX_TOKEN_LENGTH - len(fill) - 8) * 3 // 4))
    assert len(target) > MAX_TOKEN_LENGTH - 16
    assert len(target) <= MAX_TOKEN_LENGTH
    assert auth.authenticate("Bearer " + target).uid == UID


@pytest.mark.parametrize(
    "template",
    ["Bearer  {}", "bearer {}", "BEARER {}", "Bearer{}", " Bearer {}", "Bearer {} ",
     "Bearer {} x", "Bearer\t{}", "Basic {}", "Token {}", "{}", "Bearer {}\n"],
)  # fmt: skip
def test_malformed_header(auth: Authenticator, rsa_key: rsa.RSAPrivateKey, template: str) -> None:
    refused(auth, template.format(sign(rsa_key)))


@pytest.mark.parametrize("header", [None, "", "Bearer", "Bearer ", "Bearer  "])
def test_missing_header_or_token(auth: Authenticator, header: str | None) -> None:
    refused(auth, header)


def test_missing_header_reason(auth: Authenticator) -> None:
    assert refused(auth, None) == "no Authorization header"


@pytest.mark.parametrize(
    "token",
    ["abc", "a.b", "a.b.c", "...", "a.b.c.d", "eyJhbGciOiJSUzI1NiJ9.e30.", "e30.e30.e30",
     "eyJhbGciOiJSUzI1NiJ9.%%%.abc", b64url(b"\xff\xfe") + ".e30.e30", "é.é.é",
     b64url(b'{"alg":"RS256","kid":1}') + ".e30.e30", b64url(b"[]") + ".e30.e30"],
)  # fmt: skip
def test_garbage_tokens(auth: Authenticator, token: str) -> None:
    refused(auth, "Bearer " + token)


def test_bearer_token() -> None:
    assert bearer_token("Bearer abc.def.ghi") == "abc.def.ghi"
    for header in (None, "Bearer", "Bearer ", "Bearer  abc", "bearer abc", "Bearer a b"):
        with pytest.raises(AuthError):
            bearer_token(header)


# Other algorithms and keys.


def test_es256(ec_key: ec.EllipticCurvePrivateKey, rsa_key: rsa.RSAPrivateKey) -> None:
    authenticator = Authenticator(make_config(ec_key, JWT_ALGORITHM="ES256"))
    assert authenticator.authenticate("Bearer " + sign(ec_key, "ES256")) == Auth(UID, "admin")
    refused(authenticator, "Bearer " + sign(rsa_key, "RS256"), "algorithm is not ES256")
    refused(authenticator, "Bearer " + sign(ec_key, "ES256", exp=NOW - 1), "expired")
    other = ec.generate_private_key(ec.SECP256R1())
    refused(authenticator, "Bearer " + sign(other, "ES256"), "signature")
    # HMAC with the EC public key as secret: refused too.
    signing_input = unsigned({"alg": "HS256"}, claims())
    mac = hmac.new(public_pem(ec_key), signing_input.encode(), hashlib.sha256).digest()
    refused(authenticator, f"Bearer {signing_input}.{b64url(mac)}", "algorithm")


def test_eddsa() -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    authenticator = Authenticator(make_config(key, JWT_ALGORITHM="EdDSA"))
    assert authenticator.authenticate("Bearer " + sign(key, "EdDSA")) == Auth(UID, "admin")


def test_rs512_when_configured(rsa_key: rsa.RSAPrivateKey) -> None:
    authenticator = Authenticator(make_config(rsa_key, JWT_ALGORITHM="RS512"))
    assert authenticator.authenticate("Bearer " + sign(rsa_key, "RS512")).uid == UID
    refused(authenticator, "Bearer " + sign(rsa_key, "RS256"), "algorithm is not RS512")


@pytest.mark.parametrize(
    ("key_kind", "algorithm"),
    [("ec", "RS256"), ("ec", "PS256"), ("ec", "EdDSA"), ("rsa", "ES256"), ("rsa", "EdDSA"),
     ("ed25519", "RS256"), ("ed25519", "ES256"), ("p384", "ES256"), ("p256", "ES384"),
     ("p256", "ES512"), ("p256", "ES256K")],
)  # fmt: skip
def test_algorithm_not_matching_the_key(
    rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey, key_kind: str, algorithm: str
) -> None:
    key = {
        "rsa": rsa_key,
        "ec": ec_key,
        "p256": ec_key,
        "p384": ec.generate_private_key(ec.SECP384R1()),
        "ed25519": ed25519.Ed25519PrivateKey.generate(),
    }[key_kind]
    config = make_config(key, JWT_ALGORITHM=algorithm)
    with pytest.raises(ConfigError) as info:
        Authenticator(config)
    assert str(info.value).startswith("JWT_ALGORITHM: "), str(info.value)


@pytest.mark.parametrize(
    ("curve", "algorithm"),
    [(ec.SECP384R1(), "ES384"), (ec.SECP521R1(), "ES512"), (ec.SECP256K1(), "ES256K")],
)
def test_ec_curves(curve: ec.EllipticCurve, algorithm: str) -> None:
    key = ec.generate_private_key(curve)
    authenticator = Authenticator(make_config(key, JWT_ALGORITHM=algorithm))
    assert authenticator.authenticate("Bearer " + sign(key, algorithm)).uid == UID
