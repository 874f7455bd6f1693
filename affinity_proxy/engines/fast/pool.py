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
from urllib.parse import urlsplit

from affinity_proxy._tasks import TaskSet
from affinity_proxy.membership.private_net import PrivateNet, is_private_name

from .response import ResponseCache
from .upstream import Relay, UpstreamConnection

KEEPALIVE_SECONDS = 15.0
MAX_IDLE_PER_ORIGIN = 256


def tls_context() -> ssl.SSLContext:
    """The client TLS context for ``https://`` instances: what aiohttp's client (the aiohttp engine)
    uses by default, so both engines accept the same certificates: the system's trust store (which
    honours ``SSL_CERT_FILE``/``SSL_CERT_DIR``), hostname checked, ALPN ``http/1.1``."""
    context = ssl.create_default_context()
    context.set_alpn_protocols(("http/1.1",))
    return context


class Origin:
    """Where one instance URL points: host, port, TLS (with SNI and the certificate checked for
    ``server_hostname``), and the path prefix to put before targets."""

    __slots__ = ("host", "host_header", "key", "port", "prefix", "private", "server_hostname", "ssl")

    def __init__(self, url: str, tls: ssl.SSLContext | None = None) -> None:
        parts = urlsplit(url)
        self.key = url
        self.ssl: ssl.SSLContext | None = (tls or tls_context()) if parts.scheme == "https" else None
        self.host = parts.hostname or "127.0.0.1"
        self.private = is_private_name(self.host)  # Fly's 6PN: resolved by ``PrivateNet``
        self.server_hostname = self.host.rstrip(".") if self.ssl else None  # as aiohttp's client sends it
        self.port = parts.port or (443 if self.ssl else 80)
        self.prefix = parts.path.rstrip("/").encode()
        default_port = 443 if self.ssl else 80
        netloc = parts.netloc.rsplit("@", 1)[-1]
        self.host_header = (netloc if parts.port != default_port else parts.hostname or netloc).encode("idna")


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
