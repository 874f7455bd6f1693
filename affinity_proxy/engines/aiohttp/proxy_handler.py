"""ProxyHandler: the catch-all request handler of the main listener.

request -> ``resolve`` (pure decision, at most one store look-up) -> carry it out -> metrics.
Proxy mode forwards every decision. Fly mode first asks ``routing.replay.plan``: serve here,
answer with ``fly-replay`` (no upstream call), or forward over the private network when Fly cannot
replay the body. Upstream connect failures are reported to health; idempotent requests are retried
once on the instance the re-decision picks. Everything the proxy refuses gets a JSON error.
"""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import replace

from aiohttp import hdrs, web

from affinity_proxy.engines.aiohttp.client import UpstreamError
from affinity_proxy.engines.aiohttp.forward import BodyTooLarge, forward_http
from affinity_proxy.engines.aiohttp.websocket import relay_websocket
from affinity_proxy.pins.store import PinStoreUnavailable
from affinity_proxy.proxy import fly
from affinity_proxy.proxy.context import ProxyContext, cookie_attributes
from affinity_proxy.proxy.errors import json_error
from affinity_proxy.proxy.headers import IDEMPOTENT_METHODS, INSTANCE_HEADER, upstream_request_headers
from affinity_proxy.proxy.realip import RealClient, real_client, trusted_proxies
from affinity_proxy.proxy.resolve import FORCE_HEADER, resolve, route_input
from affinity_proxy.routing.cookie import set_cookie_value
from affinity_proxy.routing.decide import Decision, DecisionReason, Refuse, RepinReason, Route, RouteInput
from affinity_proxy.routing.model import Instance, InstanceId
from affinity_proxy.routing.replay import NO_SIGNALS, LocalForward, PrivateForward, Replay, ReplaySource, Triage

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
            forwarded_for=headers.getall("X-Forwarded-For", ()),
            forwarded_proto=headers.getall("X-Forwarded-Proto", ()),
            fly_client_ip=headers.get("Fly-Client-IP"), fly_proto=headers.get("Fly-Forwarded-Proto"),
        )
    return found


def request_id_of(request: web.Request) -> str:
    """Fly's request id when present (so logs correlate with Fly's), else the client's
    X-Request-Id when sane, else a fresh one. Passed upstream as X-Request-Id."""
    for name in ("Fly-Request-Id", "X-Request-Id"):
        value = request.headers.get(name)
        if value and len(value) <= 128 and value.isascii() and value.isprintable() and " " not in value:
            return value
    return secrets.token_hex(12)


def log_access(request: web.Request, response: web.StreamResponse, duration: float) -> None:
    """One structured line per request. Never the cookie, the user key or any header value."""
    action, instance, reason = request.get(ROUTED, ("refuse", "", ""))
    client = request.get(REAL_CLIENT)
    access_log.info("request", extra={"fields": {
        "method": request.method, "path": request.path, "status": response.status,
        "duration_ms": round(duration * 1000, 2), "action": action, "instance": instance or None,
        "reason": reason or None, "replay_target": instance if action == "replay" else None,
        "request_id": request.get(REQUEST_ID), "remote": client.ip if client else request.remote,
    }})

Headers = list[tuple[str, str]]


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
        ctx = self.ctx
        if isinstance(decision, Refuse):
            ctx.metrics.requests.labels(action="refuse", reason=decision.reason).inc()
            return json_error(503, "no instance can serve this request", code=decision.reason,
                              headers={"Retry-After": "5"})
        assert isinstance(decision, Route)
        if not self._fly:
            self._count(decision, "forward", request)
            return await self._forward(request, decision, inp, src, attempt)
        step = fly.fly_plan(ctx, request, decision, src, is_websocket_upgrade(request), signals)
        if isinstance(step, Replay):
            self._count(decision, "replay", request)
            ctx.metrics.replays.labels(reason=decision.reason.value).inc()
            return fly.replay_response(ctx, step.instance, step.header)
        if isinstance(step, LocalForward) and step.keep_pin:
            decision = Route(step.instance, DecisionReason.FALLBACK)  # the pin and the cookie stay
        elif isinstance(step, LocalForward) and step.loop_guard:
            ctx.metrics.replay_loops_prevented.inc()
            decision = await self._repin_here(decision, inp, step.instance)
        extra: Headers = []
        if isinstance(step, PrivateForward):
            assert self._local is not None
            extra = fly.private_forward_headers(self._local)
        self._count(decision, "forward", request)
        return await self._forward(request, decision, inp, src, attempt, upstream_extra=extra)

    async def _repin_here(self, route: Route, inp: RouteInput, local: InstanceId) -> Route:
        """Loop guard: the request was already replayed, so it is served here and the user is
        re-pinned here (compare-and-set against what this node believed)."""
        log.warning("replay loop prevented; serving locally", extra={"fields": {
            "decided": route.instance, "local": local, "reason": route.reason.value}})
        if inp.user_key is not None:
            try:
                await self.ctx.store.repin(inp.user_key, route.instance, local)
            except PinStoreUnavailable:
                self.ctx.metrics.store_errors.labels(op="repin").inc()
        return Route(local, DecisionReason.LOOP_GUARD, set_cookie=True)

    def _response_headers(self, instance: Instance, route: Route, inp: RouteInput) -> Headers:
        extra: Headers = [(INSTANCE_HEADER, instance.id)]
        if route.set_cookie or (inp.cookie is not None and self.ctx.codec.needs_reissue(inp.cookie)):
            value = self.ctx.codec.encode(instance.id, int(inp.now), inp.user_digest)
            config = self.ctx.config  # read per request: a reload may replace it
            extra.append((hdrs.SET_COOKIE, set_cookie_value(config.cookie.name, value, **cookie_attributes(config))))
        return extra

    async def _forward(self, request: web.Request, route: Route, inp: RouteInput, src: ReplaySource | None,
                       attempt: int, upstream_extra: Headers = ()) -> web.StreamResponse:  # type: ignore[assignment]
        ctx = self.ctx
        instance = ctx.membership.current().get(route.instance)
        if instance is None or not instance.url:
            return json_error(502, "chosen instance has no address", code="no_upstream")
        extra = self._response_headers(instance, route, inp)
        client = real_client_of(ctx.config.trusted_proxy_cidrs, request)
        headers = upstream_request_headers(
            request.headers, client_ip=request.remote, scheme=client.scheme, host=request.host,
            request_id=request.get(REQUEST_ID), drop=(FORCE_HEADER,), trusted_peer=client.trusted,
        )
        for name, value in upstream_extra:
            headers[name] = value
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
            return json_error(413, f"request body exceeds {limits.max_body_bytes} bytes", code="body_too_large")
        except UpstreamError as exc:
            return await self._upstream_failed(request, route, inp, src, attempt, instance, exc)

    async def _upstream_failed(self, request: web.Request, route: Route, inp: RouteInput,
                               src: ReplaySource | None, attempt: int, instance: Instance,
                               exc: UpstreamError) -> web.StreamResponse:
        ctx = self.ctx
        ctx.metrics.upstream_errors.labels(instance=instance.id, kind=exc.kind).inc()
        if exc.response_started:  # already logged by forwarding; the client connection is closed
            return web.Response(status=exc.status)
        log.warning("upstream failed", extra={"fields": {
            "instance": instance.id, "kind": exc.kind, "attempt": attempt, "path": request.path}})
        if exc.retryable and ctx.health is not None and instance.local:
            ctx.health.report_failure(instance.id, exc.kind)
        if exc.retryable and attempt == 0 and self._may_retry(request):
            retry_inp = replace(inp, avoid={**inp.avoid, instance.id: RepinReason.DEAD})
            decision, retry_inp = await resolve(ctx, retry_inp)
            return await self._dispatch(request, decision, retry_inp, src, attempt=1,
                                        signals=request.get(FLY_SIGNALS, NO_SIGNALS))
        message = "upstream timed out" if exc.kind == "timeout" else "upstream unreachable"
        return json_error(exc.status, message, code=f"upstream_{exc.kind}")

    @staticmethod
    def _may_retry(request: web.Request) -> bool:
        """Retry only requests that are idempotent and whose body (if any) was not consumed."""
        return request.method in IDEMPOTENT_METHODS and not request.body_exists

    def _count(self, route: Route, action: str, request: web.Request | None = None) -> None:
        if request is not None:
            request[ROUTED] = (action, route.instance, route.reason.value)
        m = self.ctx.metrics
        m.requests.labels(action=action, reason=route.reason.value).inc()
        if route.reason is DecisionReason.REPIN and route.repin_reason is not None:
            m.repins.labels(repin_reason=route.repin_reason.value).inc()
        if route.conflict:
            m.pin_conflicts.inc()
        self.ctx.events.route(action, route)
