"""Fly mode on the request path: re-pin signals from Fly's headers, the replay plan, replay answers.

The pure parts (header formats, the plan) live in ``routing.replay``; this module reads them off an
aiohttp request and builds the responses. Fly's headers only ever steer a user *away* from an
instance or keep a request here; they are never a security signal (a client can send them too).
"""

from __future__ import annotations

from urllib.parse import urlsplit

from aiohttp import hdrs, web

from affinity_proxy.membership.private_net import PrivateNet, is_private_name, probe
from affinity_proxy.proxy.act import replay_body
from affinity_proxy.proxy.context import ProxyContext
from affinity_proxy.proxy.upstream_errors import UpstreamError
from affinity_proxy.routing.decide import DecisionReason, Route, RouteInput
from affinity_proxy.routing.model import InstanceId
from affinity_proxy.routing.replay import (
    CACHE_HIT,
    CACHE_INVALIDATE,
    NO_SIGNALS,
    PREFERRED_UNAVAILABLE_HEADER,
    REPLAY_CACHE_HEADER,
    REPLAY_CACHE_STATUS_HEADER,
    REPLAY_FAILED_HEADER,
    REPLAY_HEADER,
    REPLAY_SRC_HEADER,
    BodyInfo,
    Plan,
    ReplaySource,
    Triage,
    parse_replay_failed,
    parse_replay_src,
    parse_unavailable,
    plan,
    triage,
)


def signals(ctx: ProxyContext, raw_unavailable: str | None, raw_failed: str | None) -> Triage:
    """What ``fly-preferred-instance-unavailable`` and ``fly-replay-failed`` (raw values, None when
    absent) mean for this request: Machines to re-pin away from (gone) and Machines only
    unreachable just now (``triage``)."""
    if raw_unavailable is None and raw_failed is None:
        return NO_SIGNALS
    return triage(parse_unavailable(raw_unavailable), parse_replay_failed(raw_failed), ctx.membership.current(),
                  static_membership=ctx.config.fly.discovery == "static")


def source(raw: str | None) -> ReplaySource | None:
    """The parsed ``fly-replay-src`` (raw value, None when absent); a present but unparsable
    header still counts as replayed."""
    if raw is None:
        return None
    return parse_replay_src(raw) or ReplaySource(instance=None, region=None, t=None, state=None)


#: Decisions made without anything Fly's replay cache could be keyed on (no cookie, no user key):
#: their replays keep our ``state`` marker, so the target adopts the new session (``replayed_new_session``).
_ANONYMOUS = frozenset({DecisionReason.NEW, DecisionReason.LOCAL})


def is_cache_hit(raw_status: str | None) -> bool:
    """``fly-replay-cache-status: hit`` (raw value, None when absent): Fly's replay cache sent the
    request here without asking the origin (docs/fly-protocol.md §1 "Replay caching")."""
    return raw_status is not None and raw_status.strip().lower() == CACHE_HIT


def plan_for(ctx: ProxyContext, route: Route, local: InstanceId, *, src: ReplaySource | None, body: BodyInfo,
             is_websocket: bool, fallback_request: bool, signals: Triage = NO_SIGNALS,
             cache_hit: bool = False) -> Plan:
    """``routing.replay.plan`` with this node's fly settings. ``fallback_request``: Fly sent
    ``fly-replay-failed`` with it (docs/fly-protocol.md §1), parsable or not. ``cache_hit``:
    ``is_cache_hit``; with ``fly.replay_cache.enabled`` a hit for a user who belongs elsewhere is
    replayed to the owner with ``fly-replay-cache: invalidate``."""
    fly = ctx.config.fly
    cache = fly.replay_cache.enabled
    return plan(route.instance, local_instance=local, replay_src=src, body=body, is_websocket=is_websocket,
                fallback_request=fallback_request, unreachable=signals.unreachable,
                prefer_instance=fly.prefer_instance, timeout=fly.replay_timeout, fallback=fly.replay_fallback,
                cacheable=cache and route.reason not in _ANONYMOUS, cache_hit=cache and cache_hit)


def repin_signals(ctx: ProxyContext, request: web.Request) -> Triage:
    """``signals`` for an aiohttp request."""
    headers = request.headers
    return signals(ctx, headers.get(PREFERRED_UNAVAILABLE_HEADER), headers.get(REPLAY_FAILED_HEADER))


def replay_source(request: web.Request) -> ReplaySource | None:
    """``source`` for an aiohttp request."""
    return source(request.headers.get(REPLAY_SRC_HEADER))


def replayed_new_session(inp: RouteInput, src: ReplaySource | None, local: InstanceId) -> Route | None:
    """An anonymous request replayed here by one of our nodes: that node chose this instance for a
    new session (by hashing a random id), so adopt it instead of hashing again."""
    if src is not None and src.ours and inp.user_key is None and inp.cookie is None:
        return Route(local, DecisionReason.NEW, set_cookie=True)
    return None


def body_info(request: web.Request) -> BodyInfo:
    chunked = "chunked" in request.headers.get(hdrs.TRANSFER_ENCODING, "").lower()
    return BodyInfo(method=request.method, content_length=request.content_length, chunked=chunked)


def fly_plan(ctx: ProxyContext, request: web.Request, route: Route, src: ReplaySource | None,
             is_websocket: bool, signals: Triage = NO_SIGNALS) -> Plan:
    """``plan_for`` for an aiohttp request."""
    fly = ctx.config.fly
    assert fly.machine_id is not None
    return plan_for(ctx, route, InstanceId(fly.machine_id), src=src, body=body_info(request),
                    is_websocket=is_websocket, fallback_request=REPLAY_FAILED_HEADER in request.headers,
                    signals=signals, cache_hit=is_cache_hit(request.headers.get(REPLAY_CACHE_STATUS_HEADER)))


def request_cache_hit(request: web.Request) -> bool:
    """``is_cache_hit`` for an aiohttp request."""
    return is_cache_hit(request.headers.get(REPLAY_CACHE_STATUS_HEADER))


def replay_response(ctx: ProxyContext, instance: InstanceId, header: str, invalidate: bool = False) -> web.Response:
    """The answer Fly's edge turns into a replay; the client never sees it. ``invalidate``: with
    ``fly-replay-cache: invalidate`` (drop the replay-cache entry that sent the request here)."""
    headers = {REPLAY_HEADER: header}
    if invalidate:
        headers[REPLAY_CACHE_HEADER] = CACHE_INVALIDATE
    return web.Response(
        status=ctx.config.fly.replay_status,
        body=replay_body(instance),
        content_type="application/json",
        headers=headers,
    )


async def reach_private(net: PrivateNet, url: str, connect_timeout: float) -> None:
    """Before a private forward on the aiohttp engine: make sure the Machine behind ``url`` takes
    connections (``PrivateNet.open`` with a probe connection: a stopped Machine is started and
    waited for, a stale address looked up again), so the forward's own connect then succeeds
    within ``connect_timeout``. Names outside ``*.internal`` are left to the connector. Raises
    ``UpstreamError("connect")`` (nothing was sent). The fast engine does the same in its pool."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if not is_private_name(host):
        return
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        await net.open(host, port, lambda address: probe(address, port), connect_timeout)
    except (OSError, TimeoutError) as exc:
        raise UpstreamError("connect", f"{host}: {exc or type(exc).__name__}") from exc


__all__ = [
    "REPLAY_SRC_HEADER",
    "body_info",
    "fly_plan",
    "is_cache_hit",
    "plan_for",
    "reach_private",
    "repin_signals",
    "replay_response",
    "replay_source",
    "replayed_new_session",
    "request_cache_hit",
    "signals",
    "source",
]
