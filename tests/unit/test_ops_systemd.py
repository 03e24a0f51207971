"""The systemd unit (rango.service) runs the supervisor as the README documents, without
hardening that would break Rango. Read from the file; e2e/test_ops.py has
`systemd-analyze verify` accept it.
"""

from __future__ import annotations

import re

from support import REPO

UNIT = REPO / "rango.service"


def unit_directives() -> dict[str, list[str]]:
    """``Section.Key`` -> values, in order (systemd allows a key more than once)."""
    directives: dict[str, list[str]] = {}
    section = ""
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        directives.setdefault(f"{section}.{key}", []).append(value)
    return directives


def test_systemd_unit_runs_the_supervisor_as_documented():
    unit = unit_directives()
    one = {key: values[-1] for key, values in unit.items()}
    assert re.fullmatch(r"\S+/rango --workers \d+", one["Service.ExecStart"])
    # Rango reads the environment file itself, again at every reload (SIGHUP); systemd's
    # EnvironmentFile= would keep the values of the start (and removed lines) instead.
    assert any(v.startswith("RANGO_ENV_FILE=/") for v in unit["Service.Environment"])
    assert "Service.EnvironmentFile" not in unit
    assert one["Service.ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert one["Service.KillSignal"] == "SIGTERM"
    # Only the supervisor gets SIGTERM; it drains its workers (15 s) before the SIGKILL.
    assert one["Service.KillMode"] == "mixed"
    assert int(one["Service.TimeoutStopSec"]) > 15
    assert one["Service.Restart"] == "on-failure"
    assert one["Service.RestartPreventExitStatus"] == "2"
    assert one["Install.WantedBy"] == "multi-user.target"
    # Hardening that would break Rango is absent.
    assert one.get("Service.PrivateNetwork", "no") == "no"
    assert one.get("Service.ProtectKernelTunables", "no") == "no"  # /proc/sys writable
    assert one.get("Service.MemoryDenyWriteExecute", "no") == "no"
    families = one["Service.RestrictAddressFamilies"].split()
    assert {"AF_INET", "AF_INET6", "AF_UNIX"} <= set(families)
    # tcp_migrate_req is set with full privileges, its failure ignored.
    sysctl = [v for v in unit["Service.ExecStartPre"] if "tcp_migrate_req=1" in v]
    assert sysctl and sysctl[0].startswith(("-+", "+-"))
