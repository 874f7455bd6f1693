"""ProxyHandler: the catch-all request handler of the main listener.

request -> ``resolve`` (pure decision, at most one store look-up) -> ``proxy.act`` (what to do
about it: refuse, replay answer, forward with these headers and this cookie, re-pin; counting;
after a failure, retry once or which error) -> this module performs it with aiohttp responses,
``forward_http`` and ``relay_websocket``. Fly mode adds ``routing.replay.plan`` (``proxy.fly``).
"""

from __future__ import annotations

import logging
import secrets
import time

from aiohttp import hdrs, web

from affinity_proxy.engines.aiohttp.client import UpstreamError
from affinity_proxy.engines.aiohttp.forward import BodyTooLarge, forward_http
from affinity_proxy.engines.aiohttp.websocket import relay_websocket
from affinity_proxy.pins.store import PinStoreUnavailable
from affinity_proxy.proxy import act, fly
from affinity_proxy.proxy.context import ProxyContext
from affinity_proxy.proxy.headers import (
    FLY_CLIENT_IP_HEADER,
    FLY_FORWARDED_PROTO_HEADER,
    FORWARDED_FOR_HEADER,
    FORWARDED_PROTO_HEADER,
    REQUEST_ID_HEADERS,
    is_sane_request_id,
    upstream_request_headers,
)
from affinity_proxy.proxy.realip import RealClient, real_client, trusted_proxies
from affinity_proxy.proxy.resolve import resolve, route_input
from affinity_proxy.routing.decide import Decision, Route, RouteInput
from affinity_proxy.routing.model import Instance, InstanceId
from affinity_proxy.routing.replay import NO_SIGNALS, ReplaySource, Triage

log = logging.getLogger("affinity_proxy.proxy")
access_log = logging.getLogger("affinity_proxy.access")

REQUEST_ID: web.RequestKey[str] = web.RequestKey("affinity_request_id", str)
ROUTED: web.RequestKey[tuple[str, str, str]] = web.RequestKey("affinity_routed", tuple)  # action, instance, reason
FLY_SIGNALS: web.RequestKey[Triage] = web.RequestKey("affinity_fly_signals", Triage)
REAL_CLIENT: web.RequestKey[RealClient] = web.RequestKey("affinity_real_client", RealClient)


def real_client_of(cidrs: tuple[str, ...], request: web.Request) -> RealClient:
    """The client's address and scheme (``forwarding.realip``: forwarding headers believed only
    from ``trusted_proxies``), computed once per request."""
    found = request.get(REAL_CLIENT)
    if found is None:
        headers = request.headers
        found = request[REAL_CLIENT] = real_client(
            trusted_proxies(cidrs), request.remote, request.scheme,
            forwarded_for=headers.getall(FORWARDED_FOR_HEADER, ()),
            forwarded_proto=headers.getall(FORWARDED_PROTO_HEADER, ()),
            fly_client_ip=headers.get(FLY_CLIENT_IP_HEADER), fly_proto=headers.get(FLY_FORWARDED_PROTO_HEADER),
        )
    return found


def request_id_of(request: web.Request) -> str:
    """Fly's request id when present (so logs correlate with Fly's), else the client's
    X-Request-Id when sane, else a fresh one. Passed upstream as X-Request-Id."""
    for name in REQUEST_ID_HEADERS:
        value = request.headers.get(name)
        if value and is_sane_request_id(value):
            return value
    return secrets.token_hex(12)


def log_access(request: web.Request, response: web.StreamResponse, duration: float) -> None:
    """One structured line per request. Never the cookie, the user key or any header value."""
    client = request.get(REAL_CLIENT)
    access_log.info("request", extra={"fields": act.access_fields(
        request.method, request.path, response.status, duration, request.get(ROUTED, ("refuse", "", "")),
        request.get(REQUEST_ID), client.ip if client else request.remote)})

def answer(a: act.Answer) -> web.Response:
    """An ``act.Answer`` as an aiohttp response."""
    return web.Response(status=a.status, body=a.body, content_type="application/json",
                        headers=dict(a.headers) if a.headers else None)


def is_websocket_upgrade(request: web.Request) -> bool:
    headers = request.headers
    return (
        headers.get(hdrs.UPGRADE, "").lower() == "websocket"
        and "upgrade" in headers.get(hdrs.CONNECTION, "").lower()
    )


class ProxyHandler:
    """Callable aiohttp handler bound to one ``ProxyContext`` (register ``handler.__call__``)."""

    def __init__(self, ctx: ProxyContext) -> None:
        self.ctx = ctx
        self._fly = ctx.config.mode == "fly"
        self._local = InstanceId(ctx.config.fly.machine_id or "") if self._fly else None
        self._cookies = act.CookieWriter()

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        ctx = self.ctx
        started = time.perf_counter()
        request_id = request_id_of(request)
        request[REQUEST_ID] = request_id
        real_client_of(ctx.config.trusted_proxy_cidrs, request)
        src: ReplaySource | None = None
        signals = NO_SIGNALS
        if self._fly:
            src = fly.replay_source(request)
            signals = request[FLY_SIGNALS] = fly.repin_signals(ctx, request)
            if fly.request_cache_hit(request):
                self._tally(act.CACHE_HIT_COUNTS)
            inp = route_input(ctx, request, avoid=dict(signals.avoid))
            assert self._local is not None
            adopted = fly.replayed_new_session(inp, src, self._local)
            decision: Decision
            if adopted is not None:
                decision = adopted
            else:
                decision, inp = await resolve(ctx, inp)
        else:
            inp = route_input(ctx, request)
            decision, inp = await resolve(ctx, inp)
        response = await self._dispatch(request, decision, inp, src, attempt=0, signals=signals)
        ctx.metrics.response(response.status)
        ctx.events.response(response.status == ctx.config.fly.replay_status)
        if access_log.isEnabledFor(logging.INFO):
            log_access(request, response, time.perf_counter() - started)
        return response

    async def _dispatch(self, request: web.Request, decision: Decision, inp: RouteInput,
                        src: ReplaySource | None, attempt: int, signals: Triage = NO_SIGNALS) -> web.StreamResponse:
        """Carry out ``act.act`` for the decision (and, in fly mode, its replay plan)."""
        ctx = self.ctx
        step = None
        if self._fly and isinstance(decision, Route):
            step = fly.fly_plan(ctx, request, decision, src, is_websocket_upgrade(request), signals)
        action = act.act(decision, step, inp, self._local)
        if isinstance(action, act.Refused):
            self._tally(act.refuse_counts(action.decision))
            return answer(action.answer)
        if isinstance(action, act.ReplayTo):
            self._count(action.route, act.REPLAY, request)
            if action.invalidate:
                self._tally(act.CACHE_INVALIDATION_COUNTS)
            return fly.replay_response(ctx, action.instance, action.header, action.invalidate)
        if action.loop_prevented:
            ctx.metrics.replay_loops_prevented.inc()
            assert action.decided is not None
            log.warning("replay loop prevented; serving locally", extra={"fields": {
                "decided": action.decided.instance, "local": action.route.instance,
                "reason": action.decided.reason.value}})
        if action.repin is not None:
            await self._repin(action.repin)
        self._count(action.route, act.FORWARD, request)
        return await self._forward(request, action.route, inp, src, attempt, upstream_extra=action.upstream_headers)

    async def _repin(self, repin: act.Repin) -> None:
        """Loop guard: re-pin the user here (compare-and-set against what this node believed)."""
        try:
            await self.ctx.store.repin(repin.user_key, repin.expected, repin.to)
        except PinStoreUnavailable:
            self.ctx.metrics.store_errors.labels(op="repin").inc()

    async def _forward(self, request: web.Request, route: Route, inp: RouteInput, src: ReplaySource | None,
                       attempt: int, upstream_extra: tuple[act.Header, ...] = ()) -> web.StreamResponse:
        ctx = self.ctx
        instance = ctx.membership.current().get(route.instance)
        if instance is None or not instance.url:
            return answer(act.NO_UPSTREAM)
        cookie = self._cookies.value(ctx.codec, ctx.config, instance.id, route, inp)
        extra = list(act.response_headers(instance.id, cookie))
        client = real_client_of(ctx.config.trusted_proxy_cidrs, request)
        headers = upstream_request_headers(
            request.headers, client_ip=request.remote, scheme=client.scheme, host=request.host,
            request_id=request.get(REQUEST_ID), trusted_peer=client.trusted, extra=upstream_extra,
        )
        limits = ctx.config.limits
        assert ctx.client is not None
        started = time.perf_counter()
        try:
            if not instance.local and ctx.private_net is not None:  # a private forward: wake it if stopped
                await fly.reach_private(ctx.private_net, instance.url, limits.upstream_connect_timeout)
            if is_websocket_upgrade(request):
                gauge = ctx.metrics.websocket_connections.labels(instance=instance.id)
                gauge.inc()
                try:
                    return await relay_websocket(
                        request, instance.url, ctx.client, upstream_headers=headers,
                        extra_response_headers=extra, max_message_bytes=limits.max_ws_message_bytes,
                        heartbeat=limits.ws_heartbeat or None, registry=ctx.websockets,
                    )
                finally:
                    gauge.dec()
            response = await forward_http(
                request, instance.url, ctx.client, extra_response_headers=extra,
                upstream_headers=headers, max_body_bytes=limits.max_body_bytes,
                request_buffer=limits.request_buffer,
            )
            ctx.metrics.upstream_duration.labels(instance=instance.id).observe(time.perf_counter() - started)
            return response
        except BodyTooLarge:
            return answer(act.body_too_large(limits.max_body_bytes))
        except UpstreamError as exc:
            return await self._upstream_failed(request, route, inp, src, attempt, instance, exc)

    async def _upstream_failed(self, request: web.Request, route: Route, inp: RouteInput,
                               src: ReplaySource | None, attempt: int, instance: Instance,
                               exc: UpstreamError) -> web.StreamResponse:
        ctx = self.ctx
        self._tally(act.failure_counts(instance.id, exc.kind))
        if exc.response_started:  # already logged by forwarding; the client connection is closed
            return web.Response(status=exc.status)
        log.warning("upstream failed", extra={"fields": {
            "instance": instance.id, "kind": exc.kind, "attempt": attempt, "path": request.path}})
        then = act.after_failure(exc.kind, exc.status, retryable=exc.retryable, attempt=attempt,
                                 method=request.method, has_body=request.body_exists, local=instance.local,
                                 health=ctx.health is not None)
        if then.report_health:
            assert ctx.health is not None
            ctx.health.report_failure(instance.id, exc.kind)
        if then.retry:
            decision, retry_inp = await resolve(ctx, act.retry_input(inp, instance.id))
            return await self._dispatch(request, decision, retry_inp, src, attempt=1,
                                        signals=request.get(FLY_SIGNALS, NO_SIGNALS))
        assert then.answer is not None
        return answer(then.answer)

    def _tally(self, counts: tuple[act.Count, ...]) -> None:
        m = self.ctx.metrics
        for name, labels in counts:
            metric = getattr(m, name)
            (metric.labels(*labels) if labels else metric).inc()

    def _count(self, route: Route, action: str, request: web.Request | None = None) -> None:
        if request is not None:
            request[ROUTED] = (action, route.instance, route.reason.value)
        self._tally(act.counts(action, route))
        self.ctx.events.route(action, route)
