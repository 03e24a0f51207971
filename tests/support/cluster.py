"""A three-node RabbitMQ cluster of the tests' own, on this machine, apart from the
shared broker on 5672 (whose node, ``rabbit@localhost``, is never touched here).

Each node has its own name (``rango-t1@localhost`` ...), AMQP port (5681-5683
unless taken) and distribution port (25681-25683), and its data, logs, configuration
and enabled-plugins file (no plugins: a node boots in a few seconds) under
``/tmp/rango-cluster-<prefix>``, owned by the ``rabbitmq`` user the nodes run as. All
nodes and every ``rabbitmqctl`` call share one Erlang cookie kept in that directory
(``HOME`` points there), and every call names its node (``rabbitmqctl -n NODE``), so
the default node's cookie and CLI are never involved. Nodes 2 and 3 join node 1 with
``stop_app``/``join_cluster``/``start_app``.

:class:`Cluster` drives it; the ``rabbitmq_cluster`` fixture (registered in
tests/conftest.py) starts one per session, hands it out only with all three nodes
running, and removes it at the end, leaving no node process behind. It is skipped,
with the reason, where ``rabbitmq-server`` is missing or the tests run as neither
root nor ``rabbitmq``. With ``netns`` every node and CLI call runs through
``ip netns exec NS`` (root only), for tests that put the cluster in a network
namespace of their own.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pika
import pytest

from support.broker import Publisher
from support.polling import wait_for
from support.procfs import alive, cmdline, comm

USER = "rabbitmq"
AMQP_PORTS = (5681, 5682, 5683)
DIST_PORTS = (25681, 25682, 25683)
# rabbitmqctl is itself an Erlang node with a listening port; a range of its own keeps
# our calls from competing with the ones other tests make to the shared broker
# (RabbitMQ's default CLI range is 35672-35682).
CTL_DIST_PORTS = (35700, 35740)
BOOT_TIMEOUT = 90.0  # a node boots in ~4 s alone; far more on a loaded 2-core machine
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CONNECTION_NAME = re.compile(r'\{"connection_name","([^"]*)"\}')
INSTANCE = re.compile(r"rango\.instance\.\S+\.(\d+)\.[0-9a-f]+")


def scripts_dir() -> Path | None:
    """Where RabbitMQ's own scripts are (Debian's /usr/sbin ones are wrappers that log
    to /var/log/rabbitmq and switch user themselves); None if it is not installed."""
    debian = Path("/usr/lib/rabbitmq/bin")
    if (debian / "rabbitmq-server").exists():
        return debian
    found = shutil.which("rabbitmq-server")
    return Path(found).resolve().parent if found else None


def unavailable(netns: str | None = None) -> str | None:
    """Why a cluster cannot run here (the skip reason), or None."""
    if scripts_dir() is None:
        return "rabbitmq-server is not installed (scripts/setup installs Debian's package)"
    try:
        pwd.getpwnam(USER)
    except KeyError:
        return f"there is no {USER!r} user to run RabbitMQ nodes as"
    me = os.geteuid()
    if me != 0 and pwd.getpwuid(me).pw_name != USER:
        return f"a RabbitMQ cluster of the tests' own needs root or the {USER!r} user (CI is root)"
    if netns is not None and me != 0:
        return "a cluster in a network namespace needs root (ip netns exec)"
    if me == 0 and shutil.which("runuser") is None:
        return "runuser (util-linux) is missing: nodes must run as the rabbitmq user"
    return None


def _port_free(port: int, host: str) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Node:
    """One node: its Erlang name, AMQP listener and directory."""

    index: int  # 1, 2, 3
    name: str  # rango-t1@<host>
    host: str  # the AMQP listen address
    amqp_port: int
    dist_port: int
    dir: Path
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def address(self) -> str:
        """``host:port`` as a ``RABBITMQ_HOST`` entry (an IPv6 host in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.amqp_port}"

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@{self.address}/"

    @property
    def pid_file(self) -> Path:
        return self.dir / "pid"

    @property
    def log_path(self) -> Path:
        """The node's own log (startup output goes to ``stdout.log`` next to it)."""
        return self.dir / "log" / f"{self.name}.log"

    def pid(self) -> int | None:
        """The pid of the node's Erlang VM (``beam.smp``) while it runs, else None."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if alive(pid) and comm(pid) == "beam.smp" else None

    def log(self) -> str:
        parts = []
        for path in (self.dir / "stdout.log", self.log_path):
            with contextlib.suppress(OSError):
                parts.append(f"--- {path} ---\n{path.read_text(errors='replace')[-6000:]}")
        return "\n".join(parts)


class Cluster:
    """Three RabbitMQ nodes clustered together; see the module's docstring.

    ``netns``: run every node and CLI call in that network namespace (it must exist;
    its loopback is brought up). ``listen``: the AMQP listen address of every node.
    ``prefix``: the node names' prefix and the directory's suffix, so that two
    clusters (say one in a namespace) never share either.
    """

    def __init__(
        self,
        *,
        netns: str | None = None,
        listen: str = "127.0.0.1",
        prefix: str = "rango-t",
        amqp_ports: tuple[int, ...] = AMQP_PORTS,
        dist_ports: tuple[int, ...] = DIST_PORTS,
    ) -> None:
        scripts = scripts_dir()
        assert scripts is not None, unavailable(netns)
        self.scripts = scripts
        self.netns = netns
        self.listen = listen
        # Not the machine's name: in a container it often resolves to an outside
        # address, where the nodes' distribution ports (loopback only) do not listen.
        self.hostname = "localhost"
        suffix = f"{prefix}-{netns}" if netns else prefix
        self.base = Path("/tmp") / f"rango-cluster-{suffix}"
        self.home = self.base / "home"  # the Erlang cookie of nodes and CLI alike
        self.env_file = self.base / "rabbitmq-env.conf"
        self.nodes = [
            Node(i + 1, f"{prefix}{i + 1}@{self.hostname}", listen, amqp, dist,
                 self.base / f"{prefix}{i + 1}")
            for i, (amqp, dist) in enumerate(zip(amqp_ports, dist_ports, strict=True))
        ]  # fmt: skip
        rabbit = pwd.getpwnam(USER)
        self._uid, self._gid = rabbit.pw_uid, rabbit.pw_gid
        self._as_rabbit = [] if os.geteuid() == rabbit.pw_uid else ["runuser", "-u", USER, "--"]
        self._in_ns = ["ip", "netns", "exec", netns] if netns else []

    # Addresses.

    def rabbitmq_host(self) -> str:
        """The nodes as a ``RABBITMQ_HOST`` value: ``host:port,host:port,host:port``."""
        return ",".join(node.address for node in self.nodes)

    def amqp_addr(self) -> str:
        """The nodes as an ``--amqp-addr`` value: a comma list of amqp:// URLs."""
        return ",".join(node.url for node in self.nodes)

    def node(self, key: Node | str | int) -> Node:
        """A node by itself, its name, ``host:port`` address, or number (1-3)."""
        for node in self.nodes:
            if key is node or key in (node.name, node.address, node.index):
                return node
        raise KeyError(key)

    # Commands.

    def _env(self, **extra: str) -> list[str]:
        """``env -i`` with what RabbitMQ's scripts need and nothing of ours (no
        RABBITMQ_* of the caller, and not /etc/rabbitmq/rabbitmq-env.conf, which names
        the shared node)."""
        values = {
            "PATH": PATH, "HOME": str(self.home), "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
            "RABBITMQ_CONF_ENV_FILE": str(self.env_file), **extra,
        }  # fmt: skip
        return ["env", "-i", *(f"{k}={v}" for k, v in values.items())]

    def ctl(self, node: Node | str | int, *args: str, timeout: float = 120.0,
            check: bool = True) -> str:  # fmt: skip
        """``rabbitmqctl -n NODE -q ARGS``, with the cluster's cookie; its stdout (an
        AssertionError with its output if it fails and ``check``)."""
        target = self.node(node)
        argv = [
            *self._in_ns, *self._as_rabbit,
            *self._env(RABBITMQ_CTL_DIST_PORT_MIN=str(CTL_DIST_PORTS[0]),
                       RABBITMQ_CTL_DIST_PORT_MAX=str(CTL_DIST_PORTS[1])),
            str(self.scripts / "rabbitmqctl"), "-n", target.name, "-q", *args,
        ]  # fmt: skip
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd="/")
        if check and result.returncode != 0:
            raise AssertionError(
                f"rabbitmqctl -n {target.name} {' '.join(args)} exited {result.returncode}:\n"
                f"{result.stdout}{result.stderr}"
            )
        return result.stdout

    # Life cycle.

    def create(self) -> None:
        """Start the three nodes (after removing what an earlier run left) and cluster
        them. Raises, having removed everything, if they do not come up."""
        self.remove()
        if self.netns is None:  # a namespace of our own has its ports to itself
            for node in self.nodes:
                if not _port_free(node.amqp_port, node.host):
                    node.amqp_port = _free_port(node.host)
                if not _port_free(node.dist_port, "127.0.0.1"):
                    node.dist_port = _free_port("127.0.0.1")
        else:
            subprocess.run(["ip", "netns", "exec", self.netns, "ip", "link", "set", "lo", "up"],
                           check=True)  # fmt: skip
        self._write_files()
        try:
            self._run_parallel(self.start, self.nodes)
            first, *others = self.nodes
            for node in others:  # one at a time: joins change the cluster's membership
                self.ctl(node, "stop_app")
                self.ctl(node, "join_cluster", first.name)
                self.ctl(node, "start_app")
            self.check_running()
        except BaseException:
            self.remove()
            raise

    def _write_files(self) -> None:
        self.base.mkdir(mode=0o750)
        self.home.mkdir()
        # Random per run: only our nodes and our CLI calls can talk to these nodes.
        (self.home / ".erlang.cookie").write_text(secrets.token_hex(16).upper())
        (self.home / ".erlang.cookie").chmod(0o400)
        self.env_file.write_text("# empty: settings come from the environment\n")
        for node in self.nodes:
            node.dir.mkdir()
            (node.dir / "rabbitmq.conf").write_text(
                f"listeners.tcp.1 = {node.address}\n"
                # guest may log in from another namespace's address too (tests only).
                "loopback_users = none\n"
                "log.console = false\n"
                "log.file.level = info\n"
            )
            (node.dir / "enabled_plugins").write_text("[].\n")
        for path in [self.base, *self.base.rglob("*")]:
            os.chown(path, self._uid, self._gid)

    def _server_argv(self, node: Node) -> list[str]:
        dist_ip = "{127,0,0,1}"  # the nodes talk to each other over loopback only
        return [
            *self._in_ns, *self._as_rabbit,
            *self._env(
                RABBITMQ_NODENAME=node.name,
                RABBITMQ_MNESIA_BASE=str(node.dir / "mnesia"),
                RABBITMQ_LOG_BASE=str(node.dir / "log"),
                RABBITMQ_CONFIG_FILE=str(node.dir / "rabbitmq.conf"),
                RABBITMQ_ENABLED_PLUGINS_FILE=str(node.dir / "enabled_plugins"),
                RABBITMQ_PID_FILE=str(node.pid_file),
                RABBITMQ_DIST_PORT=str(node.dist_port),
                RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS=f"-kernel inet_dist_use_interface {dist_ip}",
            ),
            str(self.scripts / "rabbitmq-server"),
        ]

    def start(self, key: Node | str | int) -> None:
        """Bring the node back: ``start_app`` if its VM runs, else a new VM on its data
        (a killed or stopped node rejoins the cluster it belongs to). Returns once it
        has booted (``rabbitmqctl wait`` on its pid file, then ``await_startup``)."""
        node = self.node(key)
        if node.pid() is not None:
            self.start_app(node)
            return
        self._reap(node)
        node.pid_file.unlink(missing_ok=True)  # a stale one would answer `wait` at once
        with open(node.dir / "stdout.log", "ab") as out:
            node.proc = subprocess.Popen(
                self._server_argv(node), stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, cwd="/", start_new_session=True,
            )  # fmt: skip
        try:
            self.ctl(node, "wait", str(node.pid_file), "--timeout", str(int(BOOT_TIMEOUT)),
                     timeout=BOOT_TIMEOUT + 30)  # fmt: skip
            self.ctl(node, "await_startup", "--timeout", str(int(BOOT_TIMEOUT)),
                     timeout=BOOT_TIMEOUT + 30)  # fmt: skip
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{node.log()}") from None

    def stop_app(self, key: Node | str | int) -> None:
        """Stop RabbitMQ on the node, its Erlang VM left running (connections closed)."""
        self.ctl(key, "stop_app")

    def start_app(self, key: Node | str | int) -> None:
        """Start RabbitMQ again on a ``stop_app``-ed node; returns once it runs."""
        self.ctl(key, "start_app")
        self.ctl(key, "await_startup", "--timeout", str(int(BOOT_TIMEOUT)),
                 timeout=BOOT_TIMEOUT + 30)  # fmt: skip

    def kill(self, key: Node | str | int) -> int:
        """SIGKILL the node's Erlang VM (found by its pid file); returns once it is gone.
        Its pid."""
        node = self.node(key)
        pid = node.pid()
        assert pid is not None, f"{node.name} is not running"
        assert str(node.dir) in cmdline(pid) or self._has_home(pid), (pid, cmdline(pid))
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not alive(pid), 10, f"{node.name} (pid {pid}) gone after SIGKILL")
        self._reap(node)
        return pid

    def stop_all(self) -> None:
        """``stop_app`` on every node, the last one first (node 1 stops last)."""
        for node in reversed(self.nodes):
            self.stop_app(node)

    def start_all(self) -> None:
        """Every node back at once (a stopped cluster's nodes wait for each other's
        tables), as :meth:`start` does for one."""
        self._run_parallel(self.start, self.nodes)

    def is_running(self, key: Node | str | int) -> bool:
        """The node's VM runs and RabbitMQ runs in it."""
        node = self.node(key)
        if node.pid() is None:
            return False
        out = self.ctl(node, "eval", "rabbit:is_running().", check=False, timeout=30)
        return out.strip() == "true"

    def running_nodes(self, via: Node | None = None) -> list[str]:
        """The running members as ``cluster_status`` on ``via`` (node 1) reports them."""
        status = json.loads(self.ctl(via or self.nodes[0], "cluster_status", "--formatter",
                                     "json"))  # fmt: skip
        return sorted(status["running_nodes"])

    def check_running(self, every_view: bool = True) -> None:
        """All three nodes run RabbitMQ, as ``cluster_status`` on each (else on the
        first that runs) reports it."""
        names = sorted(node.name for node in self.nodes)
        views = self.nodes if every_view else [self._any_running()]
        for node in views:
            # Right after a join or restart the membership may take a moment to settle.
            wait_for(lambda node=node: self.running_nodes(node) == names, 30,
                     f"{node.name} to see {names} running")  # fmt: skip

    def ensure_running(self) -> None:
        """Restart whatever a test left stopped or killed, then :meth:`check_running`.
        One ``rabbitmqctl`` call when all is well."""
        names = sorted(node.name for node in self.nodes)
        first = self.nodes[0]
        # cluster_status lists only the members whose RabbitMQ runs, not stop_app-ed ones.
        if all(node.pid() for node in self.nodes) and self.running_nodes(first) == names:
            return
        # All at once: a node that did not stop last waits for the tables of the others.
        self._run_parallel(self.start, [node for node in self.nodes if not self.is_running(node)])
        self.check_running()

    def remove(self) -> None:
        """Kill every node VM of this cluster (of this run or of an earlier, crashed one:
        found by the directory on its command line) and remove the directory."""
        for pid in self._own_vms():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for pid in self._own_vms():
            wait_for(lambda pid=pid: not alive(pid), 10, f"node VM {pid} gone")
        for node in self.nodes:
            self._reap(node)
        shutil.rmtree(self.base, ignore_errors=True)

    def stop(self) -> None:
        """Stop every node (SIGTERM: RabbitMQ shuts down cleanly), then :meth:`remove`."""
        for pid in self._own_vms():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        with contextlib.suppress(AssertionError):
            wait_for(lambda: not self._own_vms(), 30, "the cluster's nodes to stop")
        self.remove()

    def _own_vms(self) -> list[int]:
        """Live ``beam.smp`` processes started with this cluster's HOME (``-home``), and
        in a namespace of the cluster's own the ``epmd`` its first node started there
        (the root namespace's epmd serves the shared broker: never that one)."""
        pids = [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]
        own = [pid for pid in pids if comm(pid) == "beam.smp" and self._has_home(pid)]
        if self.netns is not None:
            own += [pid for pid in pids if comm(pid) == "epmd" and self._in_our_netns(pid)]
        return [pid for pid in own if alive(pid)]

    def _in_our_netns(self, pid: int) -> bool:
        try:
            ours = os.stat(f"/run/netns/{self.netns}")
            theirs = os.stat(f"/proc/{pid}/ns/net")
        except OSError:
            return False
        mine = os.stat("/proc/self/ns/net")
        return (theirs.st_dev, theirs.st_ino) == (ours.st_dev, ours.st_ino) != (
            mine.st_dev, mine.st_ino)

    def _has_home(self, pid: int) -> bool:
        return f" -home {self.home} " in f" {cmdline(pid)} "

    def _reap(self, node: Node) -> None:
        """Collect the exit of the node's launcher (runuser, the start script) once the
        VM is gone, so that no zombie is left."""
        if node.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.proc.wait(10)
            node.proc = None

    @staticmethod
    def _run_parallel(fn: Callable[[Node], None], nodes: list[Node]) -> None:
        errors: list[BaseException] = []

        def run(node: Node) -> None:
            try:
                fn(node)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(node,)) for node in nodes]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]

    # Look-ups.

    def workers_on(self) -> dict[int, str]:
        """Rango worker pid -> the name of the node its AMQP connection is on (from the
        ``connection_name`` each worker gives, ``rango.instance.<host>.<pid>.<hex>``)."""
        found: dict[int, str] = {}
        lines = self.ctl(self._any_running(), "list_connections", "--no-table-headers",
                         "pid", "client_properties").splitlines()  # fmt: skip
        for line in lines:
            conn_pid, _, props = line.partition("\t")
            match = CONNECTION_NAME.search(props)
            if match and (instance := INSTANCE.fullmatch(match.group(1))):
                found[int(instance.group(1))] = _node_of(conn_pid)
        return found

    def consumers_on(self) -> dict[str, str]:
        """Queue name -> the name of the node its consumer's channel is on."""
        found: dict[str, str] = {}
        lines = self.ctl(self._any_running(), "list_consumers", "--no-table-headers",
                         "queue_name", "channel_pid").splitlines()  # fmt: skip
        for line in lines:
            queue, _, channel = line.partition("\t")
            found[queue.strip()] = _node_of(channel)
        return found

    def _any_running(self) -> Node:
        for node in self.nodes:
            if node.pid() is not None and self.is_running(node):
                return node
        raise AssertionError("no node of the cluster is running")

    def accepting(self) -> list[Node]:
        """The nodes whose AMQP port accepts TCP connections (from this namespace)."""
        up = []
        for node in self.nodes:
            try:
                with socket.create_connection((node.host, node.amqp_port), timeout=1):
                    up.append(node)
            except OSError:
                pass
        return up


def _node_of(erlang_pid: str) -> str:
    """The node of an Erlang pid as rabbitmqctl prints it: ``<rango-t2@vm.1624.0>``."""
    match = re.fullmatch(r"<([^<>@]+@[^<>.]+)(\.\d+)+>", erlang_pid.strip())
    assert match, erlang_pid
    return match.group(1)


class NodePublisher(Publisher):
    """:class:`support.broker.Publisher` connected to one node of the cluster."""

    def __init__(self, exchange: str, node: Node) -> None:
        self.exchange = exchange
        self.node = node
        self.conn = pika.BlockingConnection(pika.URLParameters(node.url))
        self.channel = self.conn.channel()
        self.channel.exchange_declare(exchange, exchange_type="topic", durable=False)


@pytest.fixture(scope="session")
def rabbitmq_cluster_session() -> Iterator[Cluster]:
    """The session's cluster: started at first use, removed at the end."""
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    cluster = Cluster()
    started = time.monotonic()
    cluster.create()
    print(f"\nRabbitMQ cluster {[n.name for n in cluster.nodes]} on {cluster.rabbitmq_host()} "
          f"up in {time.monotonic() - started:.1f} s")  # fmt: skip
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def rabbitmq_cluster(rabbitmq_cluster_session: Cluster) -> Iterator[Cluster]:
    """The session's three-node cluster, all nodes running (whatever an earlier test
    stopped or killed is started again first)."""
    rabbitmq_cluster_session.ensure_running()
    yield rabbitmq_cluster_session


__all__ = ["Cluster", "Node", "NodePublisher", "rabbitmq_cluster", "rabbitmq_cluster_session"]
