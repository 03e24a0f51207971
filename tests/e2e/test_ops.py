"""Operations: `rango --version`, `systemd-analyze verify` of the systemd unit, and
structured logs (LOG_FORMAT=json). The unit's directives are read in unit/test_ops_systemd.py.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from support import REPO
from support.answers import recv_json
from support.broker import unique
from support.polling import wait_for
from support.tokens import UID
from websockets.exceptions import InvalidStatus

import rango

UNIT = REPO / "rango.service"


def test_version():
    """`rango --version` prints the package's version and exits 0."""
    version = importlib.metadata.version("rango")
    assert rango.__version__ == version
    commands = [[sys.executable, "-m", "rango.cli", "--version"]]
    script = Path(sys.executable).with_name("rango")  # the console script of the venv
    if script.exists():
        commands.append([str(script), "--version"])
    for command in commands:
        result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=20)
        assert result.returncode == 0, result.stderr
        assert result.stdout == f"rango {version}\n"


def test_systemd_unit_verifies(tmp_path):
    """`systemd-analyze verify` accepts the unit, with no warning at all."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd); "
                    "the unit's directives are still checked by the test above")
    # The unit's paths point to an installation in /opt/rango; use this checkout's.
    text = UNIT.read_text().replace("/opt/rango", str(REPO))
    unit = tmp_path / "rango.service"
    unit.write_text(text)
    executable = Path(re.search(r"^ExecStart=(\S+)", text, re.M)[1])  # type: ignore[index]
    if not executable.exists():
        pytest.skip(f"{executable} is missing: run scripts/setup")
    result = subprocess.run(
        [analyze, "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60
    )
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 0, output
    assert output == "", output  # unknown keys and bad values are only warnings


def test_json_logs_one_object_a_line_and_no_secrets(rango_factory, publisher_factory, keys):
    """LOG_FORMAT=json: every line a JSON object with time, level, logger, message."""
    gateway = rango_factory(env={"LOG_FORMAT": "json", "LOG_LEVEL": "debug"})
    publisher = publisher_factory(gateway.exchange)
    valid = keys.token()
    expired = keys.token(exp=1)
    forged = valid.rsplit(".", 1)[0] + ".c2VjcmV0LXNpZ25hdHVyZS1TRUNSRVRNQVJLRVI"
    secrets = [valid, expired, forged, valid.rsplit(".", 1)[1], expired.rsplit(".", 1)[1],
               "SECRETMARKER", "c2VjcmV0LXNpZ25hdHVyZS1TRUNSRVRNQVJLRVI"]

    market = unique()
    with gateway.connect(query=f"stream={market}.trades") as anonymous:  # connect, leave
        recv_json(anonymous)
    for token in (forged, expired):  # refused /private
        with pytest.raises(InvalidStatus) as refused:
            gateway.connect("/private", additional_headers={"Authorization": f"Bearer {token}"})
        assert refused.value.response.status_code == 401
    with gateway.connect("/private", "stream=order",
                         additional_headers={"Authorization": f"Bearer {valid}"}) as private:
        recv_json(private)
        publisher.publish(f"private.{UID}.order", {"id": 1})
        assert recv_json(private) == {"order": {"id": 1}}
    publisher.publish("nodots", {"id": 2})  # dropped: bad routing key
    publisher.publish(f"public.{market}.trades", b"{not json")  # dropped: bad body
    wait_for(lambda: gateway.log().count("dropped event") >= 2, 10, "two dropped events logged")
    assert gateway.stop(signal.SIGTERM) == 0

    text = gateway.log()
    entries = []
    for number, line in enumerate(text.splitlines(), 1):
        try:
            entry = json.loads(line)
        except ValueError:
            raise AssertionError(f"line {number} is not JSON: {line!r}") from None
        assert isinstance(entry, dict), line
        assert {"time", "level", "logger", "message"} <= entry.keys(), line
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry["time"]), line
        assert entry["level"] in {"debug", "info", "warning", "error", "critical"}, line
        assert isinstance(entry["logger"], str) and isinstance(entry["message"], str), line
        entries.append(entry)
    messages = "\n".join(entry["message"] for entry in entries)
    assert messages.count("refused /private") == 2, messages
    assert messages.count("dropped event") == 2, messages
    assert "client gone" in messages, messages
    assert len({entry["pid"] for entry in entries}) >= 2  # the supervisor and a worker
    for secret in secrets:
        assert secret not in text, f"a token (or part of one) is in the logs: {secret[:20]}…"
    assert "guest:guest" not in text and "Bearer" not in text
