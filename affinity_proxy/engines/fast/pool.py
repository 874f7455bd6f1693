"""The upstream connection pool: idle keep-alive connections per instance URL, and new ones.

``UpstreamPool`` keeps idle connections per instance URL (LIFO, so the warmest socket is reused
and the others can expire after ``KEEPALIVE_SECONDS``, aiohttp's connector default) and opens new
ones with ``loop.create_connection`` under ``limits.upstream_connect_timeout`` (TLS included, for
``https://`` instances: ``tls_context``) in a background task of its ``TaskSet``; fly mode's
``*.internal`` names go through ``membership.private_net.PrivateNet.open`` (AAAA only, a stopped
Machine woken first, within ``fly.wake_timeout``). ``Origin`` is
where a URL points. It also holds the response-head cache shared by every connection. Read
timeouts are found by ``sweep`` (called by the server's periodic sweep), not by a timer per
request. One per process (event loop).
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque

from affinity_proxy._tasks import TaskSet
from affinity_proxy.membership.private_net import PrivateNet

from .response import ResponseCache
from .upstream import Origin, Relay, UpstreamConnection, tls_context

KEEPALIVE_SECONDS = 15.0
MAX_IDLE_PER_ORIGIN = 256


class UpstreamPool:
    """Idle keep-alive connections per instance URL, and connection set-up."""

    def __init__(self, tasks: TaskSet, private: PrivateNet | None = None) -> None:
        self._tasks = tasks
        self._private = private
        self._origins: dict[str, Origin] = {}
        self._idle: dict[str, deque[UpstreamConnection]] = {}
        self.active: set[UpstreamConnection] = set()
        self.responses = ResponseCache()
        self.closed = False
        self._tls: ssl.SSLContext | None = None

    def origin(self, url: str) -> Origin:
        found = self._origins.get(url)
        if found is None:
            if len(self._origins) > 1024:
                self._origins.clear()
            if url.startswith("https:") and self._tls is None:
                self._tls = tls_context()  # loads the trust store: once per pool, on first use
            found = self._origins[url] = Origin(url, self._tls)
        return found

    def acquire(self, origin: Origin) -> UpstreamConnection | None:
        """An idle connection to ``origin`` (marked active), or None. O(1)."""
        idle = self._idle.get(origin.key)
        while idle:
            conn = idle.pop()
            if conn.transport is not None and not conn.transport.is_closing():
                conn.reused = True
                self.active.add(conn)
                return conn
        return None

    def connect(self, origin: Origin, relay: Relay, connect_timeout: float, on_ready: object) -> None:
        """Open a new connection in the background; ``on_ready(conn)`` or ``relay.upstream_failed``."""
        self._tasks.spawn(self._connect(origin, relay, connect_timeout, on_ready), name="fastpath-connect")

    async def _connect(self, origin: Origin, relay: Relay, connect_timeout: float, on_ready: object) -> None:
        loop = asyncio.get_running_loop()

        async def open_to(host: str) -> UpstreamConnection:
            _, conn = await loop.create_connection(
                lambda: UpstreamConnection(self, origin), host, origin.port, ssl=origin.ssl,
                server_hostname=origin.server_hostname,
            )
            return conn

        try:
            if origin.private and self._private is not None:  # 6PN: AAAA only, a stopped Machine woken
                conn = await self._private.open(origin.host, origin.port, open_to, connect_timeout)
            else:
                async with asyncio.timeout(connect_timeout):
                    conn = await open_to(origin.host)
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            relay.upstream_failed("connect", f"{type(exc).__name__}: {exc}", sent=False)
            return
        if self.closed:
            conn.close()
            relay.upstream_failed("connect", "shutting down", sent=False)
            return
        self.active.add(conn)
        on_ready(conn)  # type: ignore[operator]

    def release(self, conn: UpstreamConnection) -> None:
        self.active.discard(conn)
        idle = self._idle.setdefault(conn.origin.key, deque())
        if self.closed or len(idle) >= MAX_IDLE_PER_ORIGIN:
            conn.close()
            return
        if conn.paused:
            conn.resume()
        conn.idle_since = conn.last_rx  # when its request was sent or its last bytes came: close enough
        idle.append(conn)

    def discard(self, conn: UpstreamConnection) -> None:
        self.active.discard(conn)
        idle = self._idle.get(conn.origin.key)
        if idle:
            try:
                idle.remove(conn)
            except ValueError:
                pass

    def sweep(self, now: float, read_timeout: float) -> list[UpstreamConnection]:
        """Close idle connections past the keep-alive time; return active ones silent for longer
        than ``read_timeout`` since their request was fully sent, or that have not read any of the
        request for that long (the caller fails them)."""
        for idle in self._idle.values():
            while idle and now - idle[0].idle_since > KEEPALIVE_SECONDS:
                idle.popleft().close()
        return [c for c in self.active if c.relay is not None and (
            (c.sent_all and not c.paused and now - c.last_rx > read_timeout)
            # an instance that stops reading the request body would hold both connections for ever
            or (c.stalled_since and now - c.stalled_since > read_timeout))]

    def close(self) -> None:
        self.closed = True
        for idle in self._idle.values():
            while idle:
                idle.pop().close()
        for conn in list(self.active):
            conn.close()
        self.active.clear()
