"""/proc readers: who a process's children are, what CPU and memory it uses, which
process holds a socket, what environment a worker was started with, and the
machine-wide figures bench/run.py reports. Linux only; nothing here imports Rango.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

CLK_TCK = os.sysconf("SC_CLK_TCK")

# Fields of /proc/<pid>/stat after the command name, counted from 0 (proc(5) numbers
# them from 1 including pid and comm: state is its 3rd field).
STATE, PPID, UTIME, STIME, CUTIME, CSTIME, STARTTIME = 0, 1, 11, 12, 13, 14, 19


def stat_fields(pid: int) -> list[bytes] | None:
    """The fields of /proc/<pid>/stat after ``(comm)``; None if ``pid`` is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2].split()
    except OSError:
        return None


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    fields = stat_fields(pid)
    return fields is not None and fields[STATE] != b"Z"


def _all_stats() -> Iterable[tuple[int, list[bytes]]]:
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := stat_fields(int(entry))) is not None:
            yield int(entry), fields


def child_pids(parent: int) -> list[int]:
    """Pids whose parent is ``parent``, oldest first (a supervisor's workers)."""
    children = [
        (int(fields[STARTTIME]), pid) for pid, fields in _all_stats() if int(fields[PPID]) == parent
    ]
    return [pid for _, pid in sorted(children)]


def descendants(root: int) -> list[int]:
    """``root`` and every process below it, parents before their children."""
    children: dict[int, list[int]] = {}
    for pid, fields in _all_stats():
        children.setdefault(int(fields[PPID]), []).append(pid)
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo.extend(children.get(pid, []))
    return pids


def pids_named(name: str) -> list[int]:
    """Pids whose command name (/proc/<pid>/comm) is ``name``, e.g. ``beam.smp``."""
    pids = (int(entry) for entry in os.listdir("/proc") if entry.isdigit())
    return [pid for pid in pids if comm(pid) == name]


def comm(pid: int) -> str:
    """The command name of ``pid`` (/proc/<pid>/comm, set by a process for itself); ""
    if it is gone."""
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def cmdline(pid: int) -> str:
    """The command line of ``pid``, arguments joined by spaces; "" if it is gone."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def worker_index(pid: int) -> str:
    """The ``RANGO_WORKER_INDEX`` a worker process was started with: its name,
    ``rango-worker-<index>`` (a forked worker's environ is the template's), or the
    environment it was started with."""
    name = comm(pid)
    if name.startswith("rango-worker-"):
        return name.removeprefix("rango-worker-")
    with open(f"/proc/{pid}/environ", "rb") as f:
        for item in f.read().split(b"\0"):
            if item.startswith(b"RANGO_WORKER_INDEX="):
                return item.partition(b"=")[2].decode()
    raise AssertionError(f"pid {pid} has no RANGO_WORKER_INDEX")


# CPU and memory.


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` itself."""
    fields = stat_fields(pid)
    if fields is None:
        raise FileNotFoundError(f"/proc/{pid}/stat")
    return (int(fields[UTIME]) + int(fields[STIME])) / CLK_TCK


def cpu_ticks(pid: int) -> int:
    """utime + stime of ``pid`` and of the children it has waited for; 0 if gone."""
    fields = stat_fields(pid)
    if fields is None:
        return 0
    return sum(int(fields[i]) for i in (UTIME, STIME, CUTIME, CSTIME))


def user_system_ticks(pid: int) -> tuple[int, int]:
    """``(user, system)`` ticks of ``pid`` and its waited-for children; zeros if gone."""
    fields = stat_fields(pid)
    if fields is None:
        return 0, 0
    return int(fields[UTIME]) + int(fields[CUTIME]), int(fields[STIME]) + int(fields[CSTIME])


def rss_bytes(pid: int, default: int | None = None) -> int:
    """Resident memory of ``pid`` (``VmRSS``); ``default`` if it is gone or has none
    (a zombie), or an error when no default is given."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        if default is None:
            raise
        return default
    if default is None:
        raise AssertionError(f"pid {pid} has no VmRSS")
    return default


def io_counters(pid: int) -> dict[str, int]:
    """syscr, syscw (read/write-like syscalls), rchar, wchar of ``pid`` (/proc/<pid>/io)."""
    counters = {}
    try:
        with open(f"/proc/{pid}/io") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name in ("syscr", "syscw", "rchar", "wchar"):
                    counters[name] = int(value)
    except OSError:
        pass
    return counters


def schedstat(pid: int) -> tuple[int, int]:
    """Nanoseconds ``pid`` ran on a CPU and waited runnable for one (/proc/<pid>/schedstat)."""
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            run, wait, _ = f.read().split()
        return int(run), int(wait)
    except (OSError, ValueError):
        return 0, 0


# Sockets.


def socket_owners(server_port: int, pids: Iterable[int]) -> dict[int, int]:
    """Client port -> pid of the process that holds the server side of that connection.

    Matches the inodes of the TCP sockets on ``server_port`` (/proc/net/tcp*)
    with the socket fds of ``pids`` (/proc/<pid>/fd).
    """
    inode_pid: dict[int, int] = {}
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                inode_pid[int(link[8:-1])] = pid
    owners: dict[int, int] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                lines = f.readlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, remote, inode = fields[1], fields[2], int(fields[9])
            remote_port = int(remote.rpartition(":")[2], 16)
            if int(local.rpartition(":")[2], 16) != server_port or not remote_port:
                continue
            if inode in inode_pid:
                owners[remote_port] = inode_pid[inode]
    return owners


# The whole machine.


def loadavg() -> list[float]:
    """The 1, 5 and 15 minute load averages."""
    with open("/proc/loadavg") as f:
        return [float(x) for x in f.read().split()[:3]]


def machine_busy_ticks() -> int:
    """Busy CPU ticks of the whole machine (all cores) from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    # guest time is already counted in user time
    return sum(fields[:8]) - idle


def cpu_pressure_us() -> int | None:
    """PSI: total microseconds some task waited for a CPU (None without PSI)."""
    try:
        with open("/proc/pressure/cpu") as f:
            for line in f:
                if line.startswith("some"):
                    return int(line.rsplit("total=", 1)[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def open_fds(pid: int) -> int:
    """How many descriptors ``pid`` has open (0 once it is gone)."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0
