"""The file-descriptor limit: raised at start, and turned into a connection bound.

Linux distributions start shells and supervisord with a soft ``RLIMIT_NOFILE``
of 1024, far below ``RANGO_MAX_CONNECTIONS``. Like the Go runtime, Rango raises
its soft limit to the hard one at start; then it knows how many connections the
descriptors allow, says so when RANGO_MAX_CONNECTIONS cannot be reached, and
refuses upgrades past it with the same 503 as the connection cap. Without that
bound the worker would run out of descriptors in ``accept()``; what it does
then is in :mod:`rango.listener`.
"""

from __future__ import annotations

import os
import resource
from typing import NamedTuple

__all__ = ["RESERVE", "Descriptors", "raise_nofile"]

# Descriptors a worker keeps for itself beyond those open at start: AMQP
# reconnects, the metrics endpoint and its scrapes, /proc reads, name lookups,
# and the sockets of handshakes still in flight, which need one to be answered 503.
RESERVE = 64
_NR_OPEN = "/proc/sys/fs/nr_open"


class Descriptors(NamedTuple):
    """The soft limit before and after :func:`raise_nofile`, and the hard limit."""

    before: int
    soft: int
    hard: int

    def room(self) -> int:
        """How many client connections fit beside what the process holds now."""
        return max(0, self.soft - _open_now() - RESERVE)


def raise_nofile() -> Descriptors:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit (bounded by fs.nr_open)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else _nr_open()
    if soft == resource.RLIM_INFINITY or soft >= target:
        return Descriptors(soft, soft, hard)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        return Descriptors(soft, soft, hard)  # e.g. a container that forbids it
    return Descriptors(soft, target, hard)


def _nr_open() -> int:
    try:
        with open(_NR_OPEN) as f:
            return int(f.read())
    except (OSError, ValueError):
        return 1 << 20  # the kernel's default


def _open_now() -> int:
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # less listdir's own descriptor
    except OSError:
        return 16
