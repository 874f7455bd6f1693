"""Ports for local clusters (demo, tests, benchmarks) that must be known before their listener binds.

Why not the usual bind-to-0 trick: a port the kernel handed out for ``bind(0)`` and got back is
handed out again by the next ``bind(0)`` or taken as the local port of an outgoing connection (both
draw from ``net.ipv4.ip_local_port_range``), so on a busy test run the listener that binds it a moment
later sometimes got EADDRINUSE (CI, a Fly cluster fixture). Ports outside that range are never
taken by the kernel on its own: only another explicit pick can collide, which the bind check below
and the issued-ports memory make unlikely across processes and impossible within one.

Under pytest-xdist (``PYTEST_XDIST_WORKER`` = ``gw0``, ``gw1``, ... and ``PYTEST_XDIST_WORKER_COUNT``)
each worker, and every process it starts (they inherit the environment), picks only from its own
slice of those ranges, so two workers never pick the same port between one's check and its bind.
"""

from __future__ import annotations

import os
import random
import socket
from collections import deque
from collections.abc import Mapping
from pathlib import Path

from affinity_proxy.serve.listeners import dual_stack_socket

_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_DEFAULT_EPHEMERAL = (32768, 60999)  # Linux's default; also what we assume where /proc is absent
_LOWEST = 10000  # below: well-known and registered services more likely to bind on their own
_ATTEMPTS = 200


class _Issued:
    """Ports this process handed out recently: two picks in a row must differ before either binds."""

    def __init__(self, size: int = 2048) -> None:
        self._order: deque[int] = deque(maxlen=size)
        self._set: set[int] = set()

    def __contains__(self, port: object) -> bool:
        return port in self._set

    def add(self, port: int) -> None:
        if len(self._order) == self._order.maxlen:
            self._set.discard(self._order[0])
        self._order.append(port)
        self._set.add(port)


_issued = _Issued()


def ephemeral_range() -> tuple[int, int]:
    """The kernel's range for ``bind(0)`` and outgoing connections (inclusive)."""
    try:
        low, high = (int(v) for v in _RANGE_FILE.read_text().split())
    except (OSError, ValueError):
        return _DEFAULT_EPHEMERAL
    return low, high


def candidate_ranges() -> list[range]:
    """Port ranges outside the ephemeral range, the larger first."""
    low, high = ephemeral_range()
    below = range(_LOWEST, low) if low > _LOWEST else range(0)
    above = range(high + 1, 65536) if high < 65535 else range(0)
    found = sorted((r for r in (below, above) if len(r) > 0), key=len, reverse=True)
    if not found:  # the whole space is ephemeral: the old trick is all there is
        raise RuntimeError(f"no port range outside the ephemeral range {low}-{high}")
    return found


def partition(ranges: list[range], index: int, count: int) -> list[range]:
    """Worker ``index`` of ``count``'s share of ``ranges``: each range cut into ``count`` contiguous
    slices, the ``index``-th of each (slices of different workers are disjoint; together they cover
    ``ranges``). Empty slices are left out."""
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"worker {index} of {count}")
    share = []
    for r in ranges:
        start = r.start + len(r) * index // count
        stop = r.start + len(r) * (index + 1) // count
        if stop > start:
            share.append(range(start, stop))
    return share


def xdist_worker(environ: Mapping[str, str] | None = None) -> tuple[int, int] | None:
    """(index, count) of the pytest-xdist worker this process runs in or was started by, else None."""
    env = os.environ if environ is None else environ
    name, count = env.get("PYTEST_XDIST_WORKER", ""), env.get("PYTEST_XDIST_WORKER_COUNT", "")
    if not (name.startswith("gw") and name[2:].isdigit() and count.isdigit()):
        return None
    index, total = int(name[2:]), int(count)
    return (index, total) if 0 <= index < total else None


def _pick_ranges() -> list[range]:
    ranges = candidate_ranges()
    worker = xdist_worker()
    if worker is None:
        return ranges
    share = partition(ranges, *worker)
    if not share:
        raise RuntimeError(f"no ports left for xdist worker {worker[0]} of {worker[1]} in {ranges}")
    return sorted(share, key=len, reverse=True)


def _bindable(port: int, dual_stack: bool) -> bool:
    try:
        if dual_stack:
            dual_stack_socket(port).close()
        else:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(("127.0.0.1", port))
    except OSError:
        return False
    return True


def free_port(*, dual_stack: bool = True) -> int:
    """A port outside the ephemeral range that binds now (on ``[::]`` for both families, or on
    127.0.0.1 with ``dual_stack=False``) and that this process has not handed out recently."""
    ranges = _pick_ranges()
    pick = random.SystemRandom()
    for _ in range(_ATTEMPTS):
        port = pick.choice(pick.choice(ranges))
        if port not in _issued and _bindable(port, dual_stack):
            _issued.add(port)
            return port
    raise RuntimeError(f"no free port found outside the ephemeral range in {_ATTEMPTS} tries")
