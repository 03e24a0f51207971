"""Network namespaces as "hosts" on a private network of the test's own, nothing in the
root namespace: :class:`Network` makes a switch namespace (a bridge) and one namespace
per member, joined to the bridge by a veth pair created inside the namespaces (so no
interface or address ever appears in the root namespace, and nothing leaves the
machine); :class:`HostRango` runs ``rango`` inside one member with ``ip netns exec``.

The root namespace reaches a member's sockets without any route: :func:`entered`
switches the calling thread into the namespace while a socket is made there (the
socket stays in it), and HAProxy does the same for its servers (``namespace``).

Namespaces are named ``rt<pid>-<role>`` after the test process, so runs never meet;
:meth:`Network.remove_leftovers` deletes those of processes that no longer exist.
Needs root (CAP_SYS_ADMIN, CAP_NET_ADMIN) and iproute2.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import signal
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from support.gateway import RANGO_COMMAND, Rango
from support.metrics import parse_metrics
from support.procfs import alive
from support.tokens import KeyPair

NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000
_NAME = re.compile(r"rt(\d+)-\w+")
_libc = ctypes.CDLL(None, use_errno=True)
# iproute2's ip, also where PATH lacks the sbin directories.
IP = shutil.which("ip", path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin")


def unavailable() -> str | None:
    """Why namespaces cannot be made here (not root, no ``ip``), or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces: ip netns add); CI runs as root"
    if IP is None:
        return "iproute2's ip is not installed (scripts/setup installs it)"
    return None


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """``ip <args>``; a failure raises with ip's own message."""
    result = subprocess.run([IP or "ip", *args], capture_output=True, text=True, timeout=20)
    if check and result.returncode != 0:
        raise AssertionError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextlib.contextmanager
def entered(netns: str) -> Iterator[None]:
    """The calling thread inside network namespace ``netns`` for the block: sockets made
    there belong to it for their whole life, after the thread has come back."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(NETNS_DIR / netns, os.O_RDONLY)
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(own)
    finally:
        os.close(own)


def http_get_in(netns: str, url: str, timeout: float = 5) -> tuple[int, str]:
    """``GET url`` from inside ``netns``: status and body, whatever the status;
    OSError if nothing answers."""
    with entered(netns):
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()


def _remove(netns: str) -> None:
    """Kill what still runs in ``netns`` and delete it."""
    pids = ip("netns", "pids", netns, check=False).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    ip("netns", "del", netns, check=False)


class Network:
    """A private /24 (``prefix``.0/24) of the test's own: a switch namespace holding a
    bridge, and members added with :meth:`add`, each a namespace with ``eth0`` on the
    bridge (the switch side of its veth is named after the member's role).

    :meth:`cut` takes a member's switch port down: its packets are dropped both ways and
    it notices nothing but silence, as when a cable or a switch fails; the member keeps
    its address, so what reaches it from the root namespace (HAProxy, the test's own
    sockets) is unaffected. :meth:`restore` puts it back.
    """

    def __init__(self, prefix: str = "10.213.0") -> None:
        self.prefix = prefix
        self.tag = f"rt{os.getpid()}"
        self.members: dict[str, str] = {}  # role -> namespace
        self.remove_leftovers()
        self.switch = self._namespace("lan")
        try:
            ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            ip("-n", self.switch, "link", "set", "br0", "up")
        except BaseException:
            self.close()
            raise

    @staticmethod
    def remove_leftovers() -> None:
        """Delete the namespaces of earlier runs whose process is gone (a crash, a kill)."""
        if not NETNS_DIR.is_dir():
            return
        for entry in NETNS_DIR.iterdir():
            match = _NAME.fullmatch(entry.name)
            if match and not alive(int(match.group(1))):
                _remove(entry.name)

    def _namespace(self, role: str) -> str:
        name = f"{self.tag}-{role}"
        if (NETNS_DIR / name).exists():
            _remove(name)
        ip("netns", "add", name)
        ip("-n", name, "link", "set", "lo", "up")
        return name

    def add(self, role: str, *hosts: int) -> str:
        """A member namespace with addresses ``prefix.<host>`` on its ``eth0``; its name."""
        netns = self._namespace(role)
        self.members[role] = netns
        ip("-n", self.switch, "link", "add", role, "type", "veth", "peer", "name", "eth0",
           "netns", netns)  # fmt: skip
        ip("-n", self.switch, "link", "set", role, "master", "br0", "up")
        for host in hosts:
            ip("-n", netns, "addr", "add", f"{self.prefix}.{host}/24", "dev", "eth0")
        ip("-n", netns, "link", "set", "eth0", "up")
        return netns

    def address(self, host: int) -> str:
        return f"{self.prefix}.{host}"

    def cut(self, role: str) -> None:
        ip("-n", self.switch, "link", "set", role, "down")

    def restore(self, role: str) -> None:
        ip("-n", self.switch, "link", "set", role, "up")

    def close(self) -> None:
        """Delete every namespace of this network (what still runs there is killed)."""
        for netns in [*self.members.values(), self.switch]:
            _remove(netns)
        self.members.clear()


class HostRango(Rango):
    """``rango`` inside namespace ``netns``, on ``address`` (websocket 8080, metrics 4242,
    the defaults: each namespace has ports of its own), against ``rabbitmq_host`` (the
    comma list of ``RABBITMQ_HOST``), in a process group of its own so that
    :meth:`kill` takes the supervisor and every worker at once."""

    def __init__(
        self,
        keys: KeyPair,
        log_dir: Path,
        netns: str,
        address: str,
        rabbitmq_host: str,
        exchange: str,
        env: dict[str, str] | None = None,
    ) -> None:
        host_env = {
            "RANGER_HOST": address,
            "RANGER_PORT": "8080",
            "RANGO_METRICS_HOST": address,
            "RANGO_METRICS_PORT": "4242",
            "RABBITMQ_HOST": rabbitmq_host,
            "LOG_LEVEL": "info",
            "RANGO_WORKERS": "2",
            **(env or {}),
        }
        super().__init__(keys, log_dir, host_env, exchange=exchange)
        self.netns = netns
        self.address = address
        self.port = 8080
        self.metrics_port = 4242
        self.name = netns
        self.log_dir = log_dir
        self.starts = 0
        self.command = [IP or "ip", "netns", "exec", netns, *RANGO_COMMAND]
        # No --amqp-addr: the flag would override RABBITMQ_HOST, which is what we test.
        self.args = ["--pubKey", str(keys.public_path), "--exchange", exchange]

    def start(self, wait: bool = True, timeout: float = 30.0, **popen: Any) -> HostRango:
        # One log per start, so a restart keeps what the killed one wrote.
        self.starts += 1
        self.log_path = self.log_dir / f"{self.netns}-{self.starts}.log"
        super().start(wait=False, start_new_session=True, **popen)
        if wait:
            self.wait_ready(timeout)
        return self

    def url(self, path: str = "/public", query: str = "") -> str:
        return f"ws://{self.address}:{self.port}{path}" + (f"?{query}" if query else "")

    def http(self, path: str) -> tuple[int, str]:
        return http_get_in(self.netns, f"http://{self.address}:{self.metrics_port}{path}")

    def metrics(self) -> dict[str, float]:
        status, body = self.http("/metrics")
        if status != 200:
            raise OSError(f"{self.name} /metrics answered {status}")
        return parse_metrics(body)

    def kill(self) -> None:
        """SIGKILL to the whole process group (supervisor, template, workers), reaped."""
        assert self.proc is not None
        os.killpg(self.pid, signal.SIGKILL)
        self.proc.wait()
        self._log.close()
