"""Ports for local clusters (demo, tests, benchmarks) that must be known before their listener binds.

Why not the usual bind-to-0 trick: a port the kernel handed out for ``bind(0)`` and got back is
handed out again by the next ``bind(0)`` or taken as the local port of an outgoing connection (both
draw from ``net.ipv4.ip_local_port_range``), so on a busy test run the listener that binds it a moment
later sometimes got EADDRINUSE (CI, a Fly cluster fixture). Ports outside that range are never
taken by the kernel on its own: only another explicit pick can collide, which the bind check below
and the issued-ports memory make unlikely across processes and impossible within one.
"""

from __future__ import annotations

import random
import socket
from collections import deque
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
    ranges = candidate_ranges()
    pick = random.SystemRandom()
    for _ in range(_ATTEMPTS):
        port = pick.choice(pick.choice(ranges))
        if port not in _issued and _bindable(port, dual_stack):
            _issued.add(port)
            return port
    raise RuntimeError(f"no free port found outside the ephemeral range in {_ATTEMPTS} tries")
