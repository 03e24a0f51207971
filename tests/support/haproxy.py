"""Debian's HAProxy running ``deploy/haproxy.cfg`` as it is, in the foreground, on a free
loopback port; its servers' states read from its admin socket (``show stat``).

``scripts/setup`` installs the ``haproxy`` package; where it is missing, the tests that
need it are skipped with the reason.
"""

from __future__ import annotations

import contextlib
import csv
import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
from pathlib import Path

from support import REPO
from support.gateway import accepts, free_port
from support.polling import wait_for

CONFIG = REPO / "deploy" / "haproxy.cfg"
SBIN_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"  # Debian's haproxy is in /usr/sbin
PR_SET_PDEATHSIG = 1
_SRC = re.compile(r"\bsrc=[^ ]*:(\d+)\b")
_SRV = re.compile(r"\bsrv=(\S+)")


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the test process dies, so that a crashed
    run leaves no HAProxy behind (it runs in the foreground and would not notice)."""
    if ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
        os._exit(127)


def unavailable() -> str | None:
    """Why HAProxy cannot run here, or None."""
    if shutil.which("haproxy", path=SBIN_PATH) is None:
        return "HAProxy is not installed: scripts/setup installs Debian's haproxy"
    return None


class HAProxy:
    """``haproxy -db -f deploy/haproxy.cfg`` with ``servers`` (``host1``... in order):
    each an ``address:port`` and the extra keywords of its line (``RANGO_HOSTn_OPTS``).
    Its log (health-check changes included) goes to ``<log_dir>/haproxy.log``."""

    def __init__(self, log_dir: Path, servers: list[tuple[str, str]]) -> None:
        self.port = free_port()
        self.socket_path = log_dir / "haproxy.sock"
        self.log_path = log_dir / "haproxy.log"
        self.env = {
            "PATH": SBIN_PATH,
            "RANGO_LB_BIND": f"127.0.0.1:{self.port}",
            "RANGO_LB_STATS": str(self.socket_path),
            "RANGO_LB_LOG": "stderr",
            "RANGO_LB_USER": "root",  # namespace servers: setns on every connection
        }
        for i, (address, opts) in enumerate(servers, 1):
            self.env[f"RANGO_HOST{i}"] = address
            self.env[f"RANGO_HOST{i}_OPTS"] = opts
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> HAProxy:
        """Start and wait until it accepts and has checked every server once."""
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            ["haproxy", "-db", "-f", str(CONFIG)], env=self.env, cwd=REPO,
            stdout=self._log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent,
        )  # fmt: skip
        wait_for(lambda: self.proc.poll() is not None or accepts(self.port), 10,
                 "haproxy listening")  # fmt: skip
        if self.proc.poll() is not None:
            raise AssertionError(f"haproxy exited with {self.proc.returncode}:\n{self.log()}")
        return self

    def url(self, path: str = "/public", query: str = "") -> str:
        return f"ws://127.0.0.1:{self.port}{path}" + (f"?{query}" if query else "")

    def command(self, line: str) -> str:
        """One command on the admin socket; its answer."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5)
            sock.connect(str(self.socket_path))
            sock.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def stats(self, backend: str = "rango") -> dict[str, dict[str, str]]:
        """``show stat`` of ``backend``'s servers: a row of HAProxy's CSV each, by name
        (``status`` UP/DOWN/..., ``scur`` current sessions, ``stot`` total...)."""
        text = self.command("show stat").lstrip("# ")
        rows = csv.DictReader(text.splitlines())
        return {
            row["svname"]: row
            for row in rows
            if row["pxname"] == backend and row["svname"] not in ("FRONTEND", "BACKEND")
        }

    def sessions(self) -> dict[int, str]:
        """The client port (on 127.0.0.1) of each session HAProxy holds -> the server it
        went to (sessions not yet given a server are left out)."""
        found = {}
        for line in self.command("show sess").splitlines():
            src = _SRC.search(line)
            srv = _SRV.search(line)
            if src and srv and srv.group(1) != "<none>":
                found[int(src.group(1))] = srv.group(1)
        return found

    def status(self, backend: str = "rango") -> dict[str, str]:
        """Each server's state as HAProxy sees it: ``UP``, ``DOWN``, ``UP 1/2``..."""
        return {name: row["status"] for name, row in self.stats(backend).items()}

    def wait_status(self, server: str, state: str, timeout: float,
                    backend: str = "rango") -> None:  # fmt: skip
        wait_for(lambda: self.status(backend).get(server) == state, timeout,
                 f"haproxy: {backend}/{server} {state} (now {self.status(backend)})")  # fmt: skip

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
