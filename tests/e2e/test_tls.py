"""TLS: `--certfile/--keyfile` (RANGO_TLS_CERTFILE/KEYFILE) serve wss:// directly.

A self-signed certificate for localhost and 127.0.0.1 is made here; clients that trust
it connect and receive events, clients that do not fail verification, and bad
certificate or key files stop start-up with one line and exit status 2.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import signal
import ssl
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from support import AMQP_URL, REPO
from support.answers import recv_json
from support.broker import unique
from support.clients import Lines, wscat_path
from support.gateway import RANGO_COMMAND, free_port, gateway_env
from support.polling import wait_for
from support.tokens import UID
from websockets.exceptions import InvalidHandshake, InvalidMessage
from websockets.sync.client import connect


class Certificate:
    """A self-signed certificate (its own trust anchor) and its key, as PEM files."""

    def __init__(self, directory: Path, name: str = "localhost") -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        public = self.key.public_key()
        names = [x509.DNSName(name), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        usage = x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False,
        )  # fmt: skip
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(usage, critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False
            )
            .sign(self.key, hashes.SHA256())
        )
        self.cert_pem = self.cert.public_bytes(serialization.Encoding.PEM)
        self.key_pem = self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        self.certfile = directory / "cert.pem"
        self.keyfile = directory / "key.pem"
        self.combined = directory / "combined.pem"  # certificate and key in one file
        self.certfile.write_bytes(self.cert_pem)
        self.keyfile.write_bytes(self.key_pem)
        self.combined.write_bytes(self.cert_pem + self.key_pem)
        os.chmod(self.keyfile, 0o600)
        os.chmod(self.combined, 0o600)

    def client_context(self) -> ssl.SSLContext:
        """A client context that trusts this certificate and checks host names."""
        return ssl.create_default_context(cafile=str(self.certfile))


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> Certificate:
    return Certificate(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def wss(rango_factory, cert):
    """A gateway serving wss:// with the test certificate (flags)."""
    return rango_factory(args=["--certfile", str(cert.certfile), "--keyfile", str(cert.keyfile)])


def wss_url(gateway, host: str, path: str = "/public", query: str = "") -> str:
    return f"wss://{host}:{gateway.port}{path}" + (f"?{query}" if query else "")


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])
def test_wss_client_that_trusts_the_certificate(wss, cert, publisher_factory, keys, host):
    """Host name (DNS or IP SAN) and chain verified; public and private events flow."""
    market = unique()
    publisher = publisher_factory(wss.exchange)
    context = cert.client_context()
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    with connect(wss_url(wss, host, query=f"stream={market}.trades"), ssl=context,
                 open_timeout=5) as public, \
         connect(wss_url(wss, host, "/private", "stream=order"), ssl=context,
                 additional_headers=keys.bearer(), open_timeout=5) as private:  # fmt: skip
        tls = public.socket.version()  # type: ignore[attr-defined]
        assert tls in ("TLSv1.2", "TLSv1.3")
        assert recv_json(public)["success"]["streams"] == [f"{market}.trades"]
        assert recv_json(private)["success"]["streams"] == ["order"]
        publisher.publish(f"public.{market}.trades", {"trades": [{"tid": 1}]})
        publisher.publish(f"private.{UID}.order", {"id": 5})
        assert recv_json(public) == {f"{market}.trades": {"trades": [{"tid": 1}]}}
        assert recv_json(private) == {"order": {"id": 5}}


def test_client_that_does_not_trust_the_certificate_fails(wss, tmp_path):
    # The system's CAs do not know a self-signed certificate.
    with pytest.raises(ssl.SSLCertVerificationError, match=r"self.signed certificate"):
        connect(wss_url(wss, "localhost"), ssl=ssl.create_default_context(), open_timeout=5)
    # Nor does a client that trusts another certificate with the same name.
    other = Certificate(tmp_path / "other")
    with pytest.raises(ssl.SSLCertVerificationError):
        connect(wss_url(wss, "localhost"), ssl=other.client_context(), open_timeout=5)
    # The gateway is still serving after the failed handshakes; plain ws:// is not served.
    with pytest.raises((InvalidMessage, InvalidHandshake, OSError)):
        connect(f"ws://127.0.0.1:{wss.port}/public", open_timeout=5)
    assert wss.ready() and not wss.exited()


def test_tls_from_the_environment_with_one_combined_file(rango_factory, cert):
    """RANGO_TLS_CERTFILE alone: the key may be in the certificate file."""
    gateway = rango_factory(env={"RANGO_TLS_CERTFILE": str(cert.combined)})
    with connect(wss_url(gateway, "localhost"), ssl=cert.client_context(), open_timeout=5) as ws:
        assert recv_json(ws) == {"success": {"message": "subscribed", "streams": []}}


def test_wscat_over_wss(wss, cert, publisher_factory):
    """wscat --ca trusts the certificate; without it, wscat refuses the server."""
    wscat = wscat_path()
    market = unique()
    publisher = publisher_factory(wss.exchange)
    url = wss_url(wss, "localhost", query=f"stream={market}.trades")
    proc = subprocess.Popen([wscat, "--ca", str(cert.certfile), "-c", url],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out = Lines(proc.stdout, "wscat")  # type: ignore[arg-type]
        assert out.expect_json() == {"success": {"message": "subscribed",
                                                 "streams": [f"{market}.trades"]}}
        publisher.publish(f"public.{market}.trades", {"trades": [{"tid": 2}]})
        assert out.expect_json() == {f"{market}.trades": {"trades": [{"tid": 2}]}}
    finally:
        proc.kill()
        proc.wait()
    # stdin stays open: at its end wscat would quit before the handshake fails.
    refused = subprocess.Popen([wscat, "-c", url], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        Lines(refused.stderr, "wscat stderr").expect("self-signed certificate")  # type: ignore[arg-type]
        assert refused.wait(timeout=10) != 0
    finally:
        if refused.poll() is None:
            refused.kill()
        refused.wait()


def test_renewed_certificate_is_served_after_sighup(rango_factory, tmp_path):
    """Certificate renewal: replace the files, `kill -HUP` (rolling restart), no downtime."""
    first, second = Certificate(tmp_path / "first"), Certificate(tmp_path / "second")
    live = tmp_path / "live"
    live.mkdir()
    (live / "cert.pem").write_bytes(first.cert_pem)
    (live / "key.pem").write_bytes(first.key_pem)
    gateway = rango_factory(
        args=["--certfile", str(live / "cert.pem"), "--keyfile", str(live / "key.pem")]
    )
    with connect(wss_url(gateway, "localhost"), ssl=first.client_context(), open_timeout=5) as ws:
        assert recv_json(ws)["success"]["message"] == "subscribed"
    for name, data in (("key.pem", second.key_pem), ("cert.pem", second.cert_pem)):
        (live / f"{name}.new").write_bytes(data)
        os.replace(live / f"{name}.new", live / name)
    gateway.send_signal(signal.SIGHUP)

    def renewed() -> bool:
        try:
            with connect(wss_url(gateway, "localhost"), ssl=second.client_context(),
                         open_timeout=5) as ws:
                return recv_json(ws)["success"]["message"] == "subscribed"
        except ssl.SSLCertVerificationError:
            return False  # the old worker still serves the old certificate

    wait_for(renewed, 30, "the renewed certificate after SIGHUP")
    assert not gateway.exited()


def start_up_error(
    pub_key: Path, env: dict[str, str] | None, *args: str
) -> subprocess.CompletedProcess[str]:
    environ = gateway_env(free_port(), free_port(), RANGO_WORKERS="1", **(env or {}))
    return subprocess.run(
        [*RANGO_COMMAND, "--amqp-addr", AMQP_URL, "--pubKey", str(pub_key), *args],
        capture_output=True, text=True, env=environ, cwd=REPO, timeout=30,
    )  # fmt: skip


@pytest.mark.parametrize(
    "case", ["missing cert", "missing key", "key of another cert", "not PEM", "key alone", "env"]
)
def test_bad_certificate_or_key_is_a_one_line_start_up_error(case, cert, tmp_path, keys):
    other = Certificate(tmp_path / "other")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    env = None
    args: list[str] = []
    if case == "missing cert":
        args = ["--certfile", str(tmp_path / "nope.pem"), "--keyfile", str(cert.keyfile)]
    elif case == "missing key":
        args = ["--certfile", str(cert.certfile), "--keyfile", str(tmp_path / "nope.key")]
    elif case == "key of another cert":
        args = ["--certfile", str(cert.certfile), "--keyfile", str(other.keyfile)]
    elif case == "not PEM":
        args = ["--certfile", str(garbage), "--keyfile", str(cert.keyfile)]
    elif case == "key alone":
        args = ["--keyfile", str(cert.keyfile)]
    else:
        env = {"RANGO_TLS_CERTFILE": str(tmp_path / "nope.pem")}
    result = start_up_error(keys.public_path, env, *args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("rango: ") and "Traceback" not in result.stderr
    assert "certfile" in lines[0] or "keyfile" in lines[0], lines[0]
    assert cert.key_pem.decode().splitlines()[1] not in result.stderr


@pytest.mark.parametrize("which", ["--certfile", "--keyfile"])
def test_missing_certificate_or_key_file_is_named(which, cert, tmp_path, keys):
    missing = tmp_path / "nope.pem"
    files = {"--certfile": str(cert.certfile), "--keyfile": str(cert.keyfile), which: str(missing)}
    result = start_up_error(keys.public_path, None, *[a for kv in files.items() for a in kv])
    assert result.returncode == 2
    assert str(missing) in result.stderr, result.stderr
