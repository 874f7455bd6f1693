"""FastServer: the fast engine's listener, its shared parts and its lifecycle.

Owns the listening socket (``loop.create_server`` with ``ClientConnection``), the routing adapter,
the upstream pool, the request-id source and one periodic sweep that enforces every deadline
(client idle/body/write stalls, upstream read timeouts, idle pool expiry) without a timer per
request. Shares ``limits.max_connections``/``max_connections_per_ip`` with the aiohttp runner
(its ``limiter``) so connections handed off are counted once. Started by ``app.ProxyServer``
when ``engine: fast``; the aiohttp runner of the main application must be set up first.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Coroutine
from typing import Any

from aiohttp import web

from affinity_proxy._tasks import TaskSet
from affinity_proxy.proxy import act
from affinity_proxy.proxy.context import ProxyContext
from affinity_proxy.routing.replay import CACHE_INVALIDATE, REPLAY_CACHE_HEADER, REPLAY_HEADER

from . import wire
from .counting import Counts
from .head import HeadCache
from .protocol import ClientConnection
from .route import HotRoutes, Router
from .upstream import UpstreamPool

log = logging.getLogger("affinity_proxy.fastpath")

_MIN_SWEEP, _MAX_SWEEP = 0.05, 1.0
_REFUSAL_LINGER = 2.0


class FastServer:
    """The main listener on the fast engine. ``start()`` binds; ``close()`` drains and stops."""

    def __init__(self, ctx: ProxyContext, runner: web.BaseRunner) -> None:
        self.ctx = ctx
        self.router = Router(ctx)
        self.counts = Counts(ctx)
        self.hot = HotRoutes(ctx, self.router.fly)
        self.heads = HeadCache(ctx)
        self.tasks = TaskSet()
        self.pool = UpstreamPool(self.tasks, ctx.private_net)
        self.ids = wire.RequestIds()
        self.connections: set[ClientConnection] = set()
        self.closing = False
        self._runner = runner
        self._limiter: Any = getattr(runner, "limiter", None)
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._fqdn: str | None = None
        self._replays: dict[tuple[Any, ...], bytes] = {}
        self._drained: asyncio.Event | None = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self, host: str, port: int, *, reuse_port: bool = False, backlog: int = 1024,
                    sock: socket.socket | None = None) -> None:
        """Listen on ``host:port``, or on ``sock`` (bound, not listening: the dual-stack wildcard of
        ``listeners``, which ``create_server(host=...)`` cannot make); closed here if that fails."""
        loop = asyncio.get_running_loop()
        if sock is not None:
            try:
                self._server = await loop.create_server(lambda: ClientConnection(self), sock=sock, backlog=backlog)
            except BaseException:
                sock.close()
                raise
        else:
            self._server = await loop.create_server(
                lambda: ClientConnection(self), host or None, port, reuse_port=reuse_port or None, backlog=backlog,
            )
        self._sweeper = self.tasks.spawn(self._sweep(), name="fastpath-sweep")

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self, grace: float) -> None:
        """Stop accepting, close idle keep-alive connections, let requests in flight finish for up
        to ``grace`` seconds (each connection closes after its current response), then abort the
        rest and close the upstream pool."""
        self.closing = True
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            if conn.ex is None and not conn.in_body:
                conn.close_soon()
        self._drained = asyncio.Event()
        self.exchange_finished()
        try:
            async with asyncio.timeout(grace):
                await self._drained.wait()
        except TimeoutError:
            log.warning("shutdown: %d requests still in flight after %.1fs; closing them",
                        sum(c.ex is not None for c in self.connections), grace)
        for conn in list(self.connections):
            conn.close_now()
        if self._server is not None:
            await self._server.wait_closed()
        self.pool.close()
        await self.tasks.close()
        self.counts.flush()

    # ------------------------------------------------------------------ used by connections

    def admit(self, conn: ClientConnection) -> bool:
        """Count a new connection against the shared caps; refuse it (503, then close) when full."""
        limiter = self._limiter
        if limiter is None or limiter.admit(conn.peer or "unknown"):
            return True
        from affinity_proxy.proxy.limits import refusal_bytes

        self.counts.count_response(503)
        per_ip = limiter.total < limiter.max_total
        conn.write(refusal_bytes(per_ip))
        conn.linger()
        conn.linger_until = time.monotonic() + _REFUSAL_LINGER
        self.connections.add(conn)  # swept until the linger ends
        return False

    def forget(self, conn: ClientConnection) -> None:
        """The connection closed or went to aiohttp: uncount it (exactly once)."""
        if conn in self.connections:
            self.connections.discard(conn)
            if conn.admitted and self._limiter is not None:
                conn.admitted = False
                self._limiter.release(conn.peer or "unknown")
        self.exchange_finished()

    def exchange_finished(self) -> None:
        """While closing: wake ``close()`` once no request is in flight."""
        if self._drained is not None and not any(c.ex is not None for c in self.connections):
            self._drained.set()

    def aiohttp_protocol(self) -> asyncio.Protocol:
        """A fresh aiohttp ``RequestHandler`` of the main application (for a hand-off)."""
        server = self._runner.server
        assert server is not None, "the aiohttp runner must be set up"
        return server()  # type: ignore[no-any-return]

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        self.tasks.spawn(coro, name=name)

    def fqdn(self) -> str:
        """What aiohttp's ``request.host`` is for a request without Host (looked up once)."""
        if self._fqdn is None:
            self._fqdn = socket.getfqdn()
        return self._fqdn

    def replay_bytes(self, instance: str, header: str, status: int, version: bytes, keep_alive: bool,
                     head_only: bool = False, invalidate: bool = False) -> bytes:
        """A fly-replay answer (``act.ReplayTo``, body ``act.replay_body``) on the wire, encoded
        once per target (Date refreshed per second); ``head_only``: the answer to a HEAD request
        (its Content-Length, no body); ``invalidate``: with ``fly-replay-cache: invalidate``."""
        key = (instance, header, status, version, keep_alive, head_only, invalidate, wire.http_date())
        found = self._replays.get(key)
        if found is None:
            if len(self._replays) > 1024:
                self._replays.clear()
            found = self._replays[key] = wire.canned_response(
                status, act.replay_body(instance), version=version, keep_alive=keep_alive,
                headers=((REPLAY_HEADER.encode(), header.encode()),
                         *(((REPLAY_CACHE_HEADER.encode(), CACHE_INVALIDATE.encode()),) if invalidate else ())),
                head_only=head_only,
            )
        return found

    # ------------------------------------------------------------------ deadlines

    async def _sweep(self) -> None:
        while True:
            limits = self.ctx.config.limits
            interval = min(_MAX_SWEEP, max(_MIN_SWEEP, min(limits.client_timeout, limits.upstream_timeout) / 4))
            await asyncio.sleep(interval)
            now = time.monotonic()
            try:
                for conn in self.pool.sweep(now, limits.upstream_timeout):
                    conn.timed_out()
                for client in list(self.connections):
                    client.check(now, limits.client_timeout)
            except Exception:  # one bad connection must not stop every deadline
                log.exception("fast engine sweep failed")
