"""Connection caps for the main listener: ``limits.max_connections`` and ``limits.max_connections_per_ip``.

``ConnectionLimiter`` is plain bookkeeping (no I/O, no clocks, no aiohttp): the protocol asks
``admit(ip)`` when a TCP connection is accepted and calls ``release(ip)`` exactly once when an
admitted connection ends. ``web.server`` refuses a connection that is not admitted with a canned
503 JSON answer and closes it, before any byte of the request is parsed.

Counts are per process: with ``serve --workers N`` each worker enforces the caps on the
connections the kernel handed to it. The peer address is the TCP peer: behind a load balancer or
Fly's edge that is the balancer's address, so ``max_connections_per_ip`` (0 = no per-address cap)
is meant for a proxy exposed directly. Imports nothing of ours.
"""

from __future__ import annotations

import json

__all__ = ["ConnectionLimiter", "refusal_bytes"]


class ConnectionLimiter:
    """Counts open connections in total and per peer address.

    ``admit`` and ``release`` are O(1). The per-address table only holds addresses with at least
    one open connection, so its size is bounded by ``max_total``. Not thread-safe: one per event
    loop (one per listener and process).
    """

    __slots__ = ("_per_ip", "max_per_ip", "max_total", "refused_per_ip", "refused_total", "total")

    def __init__(self, max_total: int, max_per_ip: int = 0) -> None:
        if max_total < 1:
            raise ValueError("max_total must be at least 1")
        if max_per_ip < 0:
            raise ValueError("max_per_ip must not be negative")
        self.max_total = max_total
        self.max_per_ip = max_per_ip
        self.total = 0
        self.refused_total = 0
        self.refused_per_ip = 0
        self._per_ip: dict[str, int] = {}

    def admit(self, ip: str) -> bool:
        """Count a new connection from ``ip`` and return True, or return False (nothing counted)
        when the total or that address's cap is reached."""
        if self.total >= self.max_total:
            self.refused_total += 1
            return False
        current = self._per_ip.get(ip, 0)
        if self.max_per_ip and current >= self.max_per_ip:
            self.refused_per_ip += 1
            return False
        self._per_ip[ip] = current + 1
        self.total += 1
        return True

    def release(self, ip: str) -> None:
        """Forget one admitted connection from ``ip``. Releasing an address with no open
        connection is ignored (never negative counts)."""
        current = self._per_ip.get(ip, 0)
        if current <= 0:
            return
        if current == 1:
            del self._per_ip[ip]
        else:
            self._per_ip[ip] = current - 1
        self.total -= 1

    def open_from(self, ip: str) -> int:
        """Open connections from ``ip`` (for tests and diagnostics)."""
        return self._per_ip.get(ip, 0)

    @property
    def addresses(self) -> int:
        """How many peer addresses have at least one open connection."""
        return len(self._per_ip)


def refusal_bytes(per_ip: bool, retry_after: int = 1) -> bytes:
    """The complete HTTP/1.1 503 answer sent to a refused connection (JSON body, ``Connection: close``).

    The message is fixed text chosen here: nothing from the connection is echoed.
    """
    message = "too many connections from this address" if per_ip else "too many connections"
    body = json.dumps({"error": "too_many_connections", "message": message, "status": 503}).encode()
    head = (
        "HTTP/1.1 503 Service Unavailable\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"Retry-After: {retry_after}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    return head + body
