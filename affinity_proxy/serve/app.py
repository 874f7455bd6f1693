"""Wiring: the only module that builds the parts and connects them (AppKeys, cleanup_ctx, routes).

``build_context(config)`` makes the shared parts, ``build_apps(ctx)`` the main and admin aiohttp
applications, and ``ProxyServer`` runs both listeners (tests use port 0 and read the bound ports).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from aiohttp import web

from affinity_proxy._tasks import TaskSet
from affinity_proxy.admin.api import (
    FLY_PRIVATE_SUFFIXES,
    PUBLIC,
    REAPER,
    REBALANCER,
    add_admin_routes,
    browser_guard,
    health,
    session_check,
    token_middleware,
)
from affinity_proxy.admin.dashboard import add_dashboard_routes
from affinity_proxy.config import Config
from affinity_proxy.engines.aiohttp.client import UpstreamClient
from affinity_proxy.engines.aiohttp.middlewares import header_size_guard
from affinity_proxy.engines.aiohttp.proxy_handler import ProxyHandler
from affinity_proxy.engines.aiohttp.server import ProxyAppRunner, handler_args
from affinity_proxy.membership.discovery import instances_from_config, local_instance, private_url, run_discovery
from affinity_proxy.membership.health import HealthChecker, HealthSettings
from affinity_proxy.membership.heartbeat import HeartbeatSource, MembershipRefresher, refresh_interval
from affinity_proxy.membership.private_net import PrivateNet, PrivateNetResolver
from affinity_proxy.membership.redis_shared import RedisSharedState
from affinity_proxy.membership.registry import Membership
from affinity_proxy.membership.shared import MemorySharedState, SharedState
from affinity_proxy.membership.sources import MembershipSource
from affinity_proxy.observability.metrics import ProxyMetrics
from affinity_proxy.pins.factory import open_pin_store
from affinity_proxy.pins.reaper import Reaper
from affinity_proxy.pins.redis import RedisPinStore
from affinity_proxy.pins.store import PinStore, PinStoreUnavailable
from affinity_proxy.placement.budget import MoveBudget
from affinity_proxy.placement.live import LiveSessions
from affinity_proxy.placement.rebalancer import Rebalancer, rebalancer_for
from affinity_proxy.proxy.context import CONTEXT, ProxyContext, decide_policy
from affinity_proxy.proxy.errors import json_error
from affinity_proxy.routing.cookie import CookieCodec
from affinity_proxy.routing.decide import RepinReason
from affinity_proxy.routing.rebalance import Move
from affinity_proxy.routing.userkey import UserKeySource
from affinity_proxy.serve.listeners import dual_stack_socket, host_port, is_dual_stack

if TYPE_CHECKING:
    from affinity_proxy.engines.fast import FastServer

log = logging.getLogger("affinity_proxy.app")
#: Seconds the admin listener waits for its requests (all short: metrics, health, admin calls) on
#: shutdown, after the main listener has drained; ``runtime.shutdown_budget`` counts it.
ADMIN_SHUTDOWN_TIMEOUT = 5.0

PIN_COUNT_REFRESH_SECONDS = 5.0


def open_shared_state(store: PinStore) -> SharedState:
    """Drain marks, heartbeats and locks live where the pins live: on the Redis store's pool and
    breaker, or in this process for the memory store (one process, nothing to share)."""
    if isinstance(store, RedisPinStore):
        return RedisSharedState(store)
    return MemorySharedState()


def build_context(
    config: Config, *, store: PinStore | None = None, node: str | None = None, shared: SharedState | None = None,
) -> ProxyContext:
    """Create the per-process parts. Secrets must be present (``serve`` checks; ``demo`` generates).

    ``node`` names this node in heartbeats and session-check: default ``fly.machine_id`` (filled
    from FLY_MACHINE_ID), else the host name.
    """
    tasks = TaskSet()
    metrics = ProxyMetrics()
    membership = Membership(instances_from_config(config))
    c = config.cookie
    codec = CookieCodec(c.secret, c.previous_secrets, signed=c.signed, max_age=c.max_age)
    ctx_holder: list[ProxyContext] = []

    def on_store_state(up: bool) -> None:
        metrics.store_up.set(1 if up else 0)
        if ctx_holder:
            ctx_holder[0].store_ok = up

    if store is None:
        store = open_pin_store(
            config.store.url, key_prefix=config.store.key_prefix, pin_ttl=config.pin_ttl,
            timeout=config.store.timeout, tasks=tasks,
            on_error=lambda op: metrics.store_errors.labels(op=op).inc(),
            on_state_change=on_store_state,
        )
    ctx = ProxyContext(
        config=config, membership=membership, store=store, codec=codec, metrics=metrics, tasks=tasks,
        policy=decide_policy(config),
        user_key_sources=tuple(UserKeySource(s.kind, s.name) for s in config.user_key),
        shared=shared if shared is not None else open_shared_state(store),
    )
    if node or config.fly.machine_id:
        ctx.node = node or config.fly.machine_id or ctx.node
    ctx_holder.append(ctx)
    ctx.live = LiveSessions(store, window=config.placement.rebalance.idle_after,
                            instances=lambda: [i.id for i in membership.current().instances])
    if config.placement.rebalance.enabled:
        ctx.moves = MoveBudget(config.placement.rebalance.max_moves_per_minute)
    metrics.watch_snapshots(membership.current, lambda: ctx.pin_counts,
                            lambda: ctx.live.loads if ctx.live is not None else {})
    return ctx


async def _refresh_pin_counts_once(ctx: ProxyContext, failing: bool) -> bool:
    """One refresh of the ``affinity_pins`` and ``affinity_sessions`` gauges, the live-session
    snapshot that bounded-load placement reads (``placement.live``) and store health. ``failing``:
    the previous one failed (one log line per failure streak). Returns whether this one failed."""
    try:
        if ctx.live is not None:
            await ctx.live.refresh()
            ctx.pin_counts = dict(ctx.live.pins)
        else:
            ctx.pin_counts = dict(await ctx.store.counts())
        ctx.store_ok = True
        if failing:
            log.info("pin store reachable again")
        failing = False
    except PinStoreUnavailable as exc:
        ctx.store_ok = False
        if not failing:
            log.warning("pin store unreachable: %s", exc)
        failing = True
    ctx.metrics.store_up.set(1 if ctx.store_ok else 0)
    return failing


async def _refresh_pin_counts(ctx: ProxyContext, failing: bool) -> None:
    """Keep them fresh without touching the request path: every ``LiveSessions.interval`` (1 s),
    after the refresh made at start (``failing``: its outcome)."""
    while True:
        await asyncio.sleep(ctx.live.interval if ctx.live is not None else PIN_COUNT_REFRESH_SECONDS)
        failing = await _refresh_pin_counts_once(ctx, failing)


def _lifecycle(ctx: ProxyContext, reaper: Reaper, rebalancer: Rebalancer):  # type: ignore[no-untyped-def]
    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        limits = ctx.config.limits
        ctx.started_at = time.monotonic()
        resolver = None
        if ctx.config.mode == "fly":  # 6PN: .internal names AAAA only, stopped Machines woken (private_net)
            ctx.private_net = PrivateNet(lambda: ctx.config.fly, session=lambda: ctx.client.session)  # type: ignore[union-attr]
            resolver = PrivateNetResolver(ctx.private_net)
        ctx.client = UpstreamClient(
            connect_timeout=limits.upstream_connect_timeout, read_timeout=limits.upstream_timeout,
            resolver=resolver,
        )
        await ctx.client.start()
        h = ctx.config.health
        ctx.health = HealthChecker(
            ctx.membership, ctx.client.session,
            HealthSettings(h.path, h.interval, h.timeout, h.unhealthy_after, h.healthy_after),
        )
        ctx.tasks.spawn(ctx.health.run(), name="health-checker")
        fly_group = ctx.config.fly.process_group if ctx.config.mode == "fly" else None
        refresher = ctx.refresher = MembershipRefresher(ctx.membership, ctx.shared, node=ctx.node,
                                                        interval=refresh_interval(h.interval), group=fly_group or "")
        await refresher.refresh_once()  # start with the shared drain set; never raises on an outage
        ctx.tasks.spawn(refresher.run(), name="membership-refresh")
        ctx.tasks.spawn(reaper.run(), name="reaper")
        if ctx.config.placement.rebalance.enabled:
            ctx.tasks.spawn(rebalancer.run(), name="rebalancer")
        source = discovery_source(ctx)
        if source is not None:
            ctx.tasks.spawn(run_discovery(
                source, ctx.membership, local=local_instance(ctx.config), interval=ctx.config.fly.discovery_interval,
            ), name="discovery")
        # Before the listener serves: bounded load places the first users on the store's counts, not
        # on an empty snapshot (a burst of logins right after a restart would otherwise all follow the
        # plain ring, onto an instance already over its share). One store round trip; an outage is
        # logged and start goes on.
        failing = await _refresh_pin_counts_once(ctx, False)
        ctx.tasks.spawn(_refresh_pin_counts(ctx, failing), name="pin-counts")
        yield
        ctx.shutting_down = True
        await ctx.tasks.close()
        try:
            await ctx.store.flush()
        except PinStoreUnavailable as exc:
            log.warning("could not flush pin refreshes on shutdown: %s", exc)
        await ctx.store.close()
        await ctx.client.close()
        if ctx.private_net is not None:
            await ctx.private_net.close()

    return lifecycle


def discovery_source(ctx: ProxyContext) -> MembershipSource | None:
    """Where a fly-mode node learns the other Machines: Fly's internal DNS, or peers' heartbeats in
    the shared store; None for static membership (proxy mode, ``fly.discovery: static``)."""
    config = ctx.config
    if config.mode != "fly" or config.fly.discovery == "static":
        return None
    if config.fly.discovery == "redis":
        return HeartbeatSource(ctx.shared, lambda inst_id: private_url(config, inst_id),
                               group=config.fly.process_group)
    fly = config.fly
    assert fly.app is not None and fly.machine_id is not None
    if fly.discovery == "api":
        from affinity_proxy.membership.fly_api import DEFAULT_API_URL, FlyMachinesApiSource

        assert ctx.client is not None and fly.api_token is not None
        return FlyMachinesApiSource(
            fly.app, api_url=fly.api_url or DEFAULT_API_URL, token=fly.api_token, local_machine_id=fly.machine_id,
            private_url=fly.private_url, private_port=fly.private_port, local_upstream=fly.upstream,
            session=ctx.client.session, process_group=fly.process_group, shared=ctx.shared,
            interval=fly.discovery_interval,
        )
    from affinity_proxy.membership.fly_dns import FlyDnsSource

    return FlyDnsSource(
        fly.app, local_machine_id=fly.machine_id, dns_server=fly.dns_server, private_url=fly.private_url,
        private_port=fly.private_port, local_upstream=fly.upstream, process_group=fly.process_group,
    )


async def _close_websockets(app: web.Application) -> None:
    """Graceful shutdown: listeners are closed already; tell every open WebSocket we are going away
    (1001) so clients reconnect (to another node) instead of seeing an abrupt 1006."""
    ctx = app[CONTEXT]
    ctx.shutting_down = True
    sockets = list(ctx.websockets)
    if sockets:
        log.info("closing websockets for shutdown", extra={"fields": {"count": len(sockets)}})
        results = await asyncio.gather(
            *(ws.close(code=1001, message=b"server shutting down") for ws in sockets), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                log.debug("websocket close failed during shutdown: %r", result)


async def _reserved_not_found(request: web.Request) -> web.Response:
    return json_error(404, "unknown affinity-proxy endpoint", code="not_found")


def build_rebalancer(ctx: ProxyContext) -> Rebalancer:
    """The leader-only rebalance loop (``placement.rebalance``; run only when enabled, planned on
    demand by ``POST /rebalance``). Settings are read at start."""

    def moved(move: Move) -> None:
        ctx.metrics.repins.labels(repin_reason=RepinReason.REBALANCE.value).inc()
        ctx.pin_cache.remember(move.user_key, move.target)

    return rebalancer_for(ctx.config, ctx.store, ctx.membership.current, lock=ctx.shared, on_moved=moved,
                          anonymous=lambda: ctx.live.anonymous if ctx.live is not None else {})


def build_apps(ctx: ProxyContext) -> tuple[web.Application, web.Application]:
    """The main (proxy) application and the admin application, sharing ``ctx``."""
    limits = ctx.config.limits
    reaper = Reaper(
        ctx.store, ctx.membership.current, grace=ctx.config.reaper.grace, interval=ctx.config.reaper.interval,
        on_reaped=lambda n: ctx.metrics.orphaned_pins_reaped.inc(n), lock=ctx.shared,
    )
    main = web.Application(middlewares=[header_size_guard(limits.max_header_bytes)],
                           client_max_size=min(limits.max_body_bytes, 1024 * 1024),
                           handler_args=handler_args(limits.max_header_bytes))
    main[CONTEXT] = ctx
    main[PUBLIC] = True
    main.router.add_get("/_affinity/health", health)
    main.router.add_route("*", "/_affinity/session-check", session_check)
    main.router.add_route("*", "/_affinity/{tail:.*}", _reserved_not_found)
    main.router.add_route("*", "/{tail:.*}", ProxyHandler(ctx).__call__)
    rebalancer = build_rebalancer(ctx)
    main.cleanup_ctx.append(_lifecycle(ctx, reaper, rebalancer))
    main.on_shutdown.append(_close_websockets)

    admin_config = ctx.config.admin
    admin = web.Application(middlewares=[
        browser_guard(admin_config.allowed_hosts, token_set=bool(admin_config.token),
                      loopback=ctx.config.admin_on_loopback,
                      allowed_suffixes=FLY_PRIVATE_SUFFIXES if ctx.config.mode == "fly" else ()),
        token_middleware(admin_config.token, public_metrics=admin_config.public_metrics),
    ])
    admin[CONTEXT] = ctx
    admin[REAPER] = reaper
    admin[REBALANCER] = rebalancer
    add_admin_routes(admin)
    add_dashboard_routes(admin)
    return main, admin


class ProxyServer:
    """Runs the main and admin listeners of one process. ``start()`` binds; ports are then known."""

    def __init__(
        self, config: Config, *, store: PinStore | None = None, reuse_port: bool = False, node: str | None = None,
        shared: SharedState | None = None, config_path: str | None = None,
    ) -> None:
        self.config = config
        self.ctx = build_context(config, store=store, node=node, shared=shared)
        self.ctx.config_path = config_path
        self.main_app, self.admin_app = build_apps(self.ctx)
        self._reuse_port = reuse_port
        self._runners: list[web.AppRunner] = []
        self._fast: FastServer | None = None
        self.main_port = 0
        self.admin_port = 0

    async def start(self) -> None:
        """Bind both listeners; on any failure (a port in use) stop what was already started, so a
        failed start leaves no client session, connector or runner behind."""
        try:
            await self._start()
        except BaseException:
            await asyncio.shield(self.stop())
            raise

    async def _start(self) -> None:
        limits = self.config.limits
        main_runner = ProxyAppRunner(self.main_app, limits=limits, on_response=self.ctx.metrics.response,
                                     access_log=None, shutdown_timeout=limits.client_timeout)
        admin_runner = ProxyAppRunner(self.admin_app, limits=limits, access_log=None,  # same deadlines and caps
                                      shutdown_timeout=ADMIN_SHUTDOWN_TIMEOUT)
        for runner in (main_runner, admin_runner):
            await runner.setup()
            self._runners.append(runner)  # only set-up runners are cleaned up by stop()
        if self.config.engine == "fast":  # the aiohttp app still serves what the fast engine hands off
            from affinity_proxy.engines.fast import FastServer

            self._fast = FastServer(self.ctx, main_runner)
            host, port = self.config.listen_host, self.config.listen_port
            sock = dual_stack_socket(port, reuse_port=self._reuse_port) if is_dual_stack(host) else None
            await self._fast.start(host, port, reuse_port=self._reuse_port, sock=sock)
            self.main_port = self._fast.port
        else:
            await _start_site(main_runner, self.config.listen_host, self.config.listen_port,
                              self._reuse_port, backlog=1024)
            self.main_port = _bound_port(main_runner)
        await _start_site(admin_runner, self.config.admin_host, self.config.admin_port, self._reuse_port)
        self.admin_port = _bound_port(admin_runner)
        log.info("listening", extra={"fields": {
            "listen": host_port(self.config.listen_host, self.main_port),
            "admin": host_port(self.config.admin_host, self.admin_port), "store": self.ctx.store.kind,
            "instances": len(self.config.instances), "engine": self.config.engine}})

    async def stop(self) -> None:
        """Graceful: the main listener stops accepting and drains first, while the admin listener
        still answers (``/health`` says 503, ``/metrics`` keeps being scrapable); then the admin."""
        self.ctx.shutting_down = True
        if self._fast is not None:
            await self._fast.close(self.config.limits.client_timeout)
            self._fast = None
        for runner in self._runners:
            await runner.cleanup()
        self._runners = []


async def _start_site(runner: web.BaseRunner, host: str, port: int, reuse_port: bool,
                      backlog: int = 128) -> web.BaseSite:
    """A TCP site on ``host:port``; the dual-stack wildcard (``:port``, ``[::]:port``) as one socket
    taking IPv4 and IPv6 (``listeners``), which ``TCPSite`` cannot do."""
    if not is_dual_stack(host):
        site: web.BaseSite = web.TCPSite(runner, host, port, reuse_port=reuse_port or None, backlog=backlog)
        await site.start()
        return site
    sock = dual_stack_socket(port, reuse_port=reuse_port)
    try:
        site = web.SockSite(runner, sock, backlog=backlog)
        await site.start()
    except BaseException:
        sock.close()
        raise
    return site


def _bound_port(runner: web.BaseRunner) -> int:
    """The port of the runner's one site (the real one when asked for port 0): ``BaseRunner.addresses``."""
    return int(runner.addresses[0][1])
