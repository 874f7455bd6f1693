"""Admin listener routes (loopback by default; bearer token when ``admin.token`` is set) and the
main listener's ``/_affinity/health`` and ``/_affinity/session-check``.

Handlers here are thin: they read the context and call library code. ``browser_guard`` keeps web
pages out of the admin listener (cross-site requests, DNS rebinding); ``token_middleware`` checks
the bearer token.
"""

from __future__ import annotations

import hmac
import ipaddress
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from affinity_proxy.pins.reaper import Reaper
from affinity_proxy.pins.store import PinStoreUnavailable
from affinity_proxy.placement.rebalancer import Rebalancer, outcome_doc
from affinity_proxy.proxy.context import CONTEXT, ProxyContext
from affinity_proxy.proxy.errors import json_error
from affinity_proxy.proxy.session_check import session_check_get, session_check_post
from affinity_proxy.routing.model import InstanceId, is_valid_instance_id
from affinity_proxy.routing.userkey import MAX_USER_KEY_LENGTH

REAPER: web.AppKey[Reaper] = web.AppKey("affinity_reaper", Reaper)
REBALANCER: web.AppKey[Rebalancer] = web.AppKey("affinity_rebalancer", Rebalancer)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def health_document(ctx: ProxyContext) -> tuple[int, dict[str, Any]]:
    """200 ok / 200 degraded (store down) / 503 (nothing routable or shutting down)."""
    view = ctx.membership.current()
    routable = len(view.routable_ids)
    checks = {
        "instances": {"ok": routable > 0, "routable": routable, "total": len(view.instances)},
        "store": {"ok": ctx.store_ok, "kind": ctx.store.kind},
        "shutting_down": {"ok": not ctx.shutting_down},
    }
    if routable == 0 or ctx.shutting_down:
        status, code = "unavailable", 503
    elif not ctx.store_ok:
        status, code = "degraded", 200
    else:
        status, code = "ok", 200
    return code, {"status": status, "checks": checks, "uptime_seconds": int(time.monotonic() - ctx.started_at)}


async def health(request: web.Request) -> web.Response:
    code, doc = health_document(request.app[CONTEXT])
    return web.json_response(doc, status=code)


PUBLIC: web.AppKey[bool] = web.AppKey("affinity_public_listener", bool)


async def session_check(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    public = request.app.get(PUBLIC, False)
    if request.method == "POST":
        return await session_check_post(ctx, request, public=public)
    return await session_check_get(ctx, request, public=public)


Middleware = Callable[..., Awaitable[web.StreamResponse]]


def token_middleware(token: str | None, *, public_metrics: bool = False) -> Middleware:
    """Require ``Authorization: Bearer <token>`` (constant-time compare) when a token is set, except
    on handlers marked ``admin_public`` (the dashboard's static files, which hold no data) and, with
    ``public_metrics``, on ``GET /metrics`` and ``GET /health`` (read-only, for scrapers)."""
    expected = f"Bearer {token}".encode() if token else None
    open_paths = frozenset({"/metrics", "/health"}) if public_metrics else frozenset()

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        exempt = getattr(request.match_info.handler, "admin_public", False) or (
            request.method in ("GET", "HEAD") and request.path in open_paths
        )
        if expected is not None and not exempt:
            given = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                return json_error(401, "admin token required", code="unauthorized",
                                  headers={"WWW-Authenticate": 'Bearer realm="affinity-proxy"'})
        return await handler(request)

    return check


MUTATING_METHODS = frozenset({"POST", "PUT", "DELETE", "PATCH"})
_DEFAULT_PORTS = {"http": 80, "https": 443}


def split_host(value: str) -> tuple[str, int | None] | None:
    """A ``Host`` header as (lower-case name without brackets or trailing dot, port or None); None
    when it is not ``name[:port]`` or ``[ipv6][:port]``."""
    value = value.strip().lower()
    if value.startswith("["):
        name, sep, rest = value[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            return None
        port_text = rest[1:] if rest else None
    else:
        name, sep, port_text = value.rpartition(":")
        if not sep:
            name, port_text = value, None
    if port_text is not None and not (port_text.isdigit() and len(port_text) <= 5 and int(port_text) <= 65535):
        return None
    name = name.rstrip(".") if not value.startswith("[") else name
    return (name, int(port_text) if port_text is not None else None) if name else None


#: In fly mode, Fly's private-network names (``<app>.internal``, ``<id>.vm.<app>.internal``) are
#: accepted too: ``.internal`` is reserved for private use, so no public DNS an attacker controls
#: can serve it, and Fly's metrics scraper may use such a name.
FLY_PRIVATE_SUFFIXES = (".internal",)


def host_allowed(name: str, allowed_hosts: frozenset[str], suffixes: tuple[str, ...] = ()) -> bool:
    """An IP literal, ``localhost``, a configured name or one ending in ``suffixes``: names an
    attacker's DNS can point at this listener (DNS rebinding) are none of these."""
    if name == "localhost" or name in allowed_hosts or (suffixes and name.endswith(suffixes)):
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _own_origin(origin: str, host: tuple[str, int | None] | None, allowed_hosts: frozenset[str],
                suffixes: tuple[str, ...]) -> bool:
    """True when ``origin`` is this listener as the request reached it (same name and port as the
    ``Host`` header, a name the listener answers to). ``null`` and everything else is foreign."""
    try:
        parts = urlsplit(origin.strip())
        port = parts.port
    except ValueError:
        return False
    if parts.scheme not in _DEFAULT_PORTS or not parts.hostname or host is None:
        return False
    name = parts.hostname.lower().rstrip(".")
    if name != host[0] or not host_allowed(name, allowed_hosts, suffixes):
        return False
    origin_port = port if port is not None else _DEFAULT_PORTS[parts.scheme]
    return origin_port == host[1] if host[1] is not None else origin_port == _DEFAULT_PORTS[parts.scheme]


def browser_guard(allowed_hosts: tuple[str, ...], *, token_set: bool, loopback: bool,
                  allowed_suffixes: tuple[str, ...] = ()) -> Middleware:
    """Refuse what a web page in an operator's browser could send to the admin listener.

    403 ``cross_origin`` when ``Origin`` is present and is not this listener's own origin, or
    ``Sec-Fetch-Site`` is ``cross-site``/``same-site`` (CSRF: a page cannot drain, reap or pin);
    421 ``misdirected_host`` when ``Host`` is not an IP literal (any port), ``localhost`` or one of
    ``admin.allowed_hosts`` or ending in ``allowed_suffixes`` (DNS rebinding needs a name of the
    attacker's; scrapers by IP keep working). 401 ``token_required`` on PUT/POST/DELETE when no
    token is set and the listener is not on loopback (``serve`` refuses that config; this covers
    servers built in code). Checks run before the token, on every route; the messages echo nothing
    from the request."""
    allowed = frozenset(allowed_hosts)

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        headers = request.headers
        raw_host = headers.get("Host")
        host = split_host(raw_host) if raw_host is not None else None
        origin = headers.get("Origin")
        fetch_site = headers.get("Sec-Fetch-Site", "").strip().lower()
        foreign = origin is not None and not _own_origin(origin, host, allowed, allowed_suffixes)
        if fetch_site in ("cross-site", "same-site") or foreign:
            return json_error(403, "cross-origin requests to the admin listener are refused", code="cross_origin")
        if raw_host is not None and (host is None or not host_allowed(host[0], allowed, allowed_suffixes)):
            return json_error(421, "this admin listener does not answer to that Host name (IP addresses, "
                                   "localhost and admin.allowed_hosts only)", code="misdirected_host")
        if not token_set and not loopback and request.method in MUTATING_METHODS:
            return json_error(401, "admin.token is required for changes when admin_listen is not a loopback "
                                   "address", code="token_required")
        return await handler(request)

    return guard


def _user(request: web.Request) -> str:
    user = request.match_info["user"]
    if not user or len(user) > MAX_USER_KEY_LENGTH or not user.isprintable():
        raise web.HTTPBadRequest(text="user key: 1 to 256 printable characters")
    return user


def _store_down(exc: PinStoreUnavailable) -> web.Response:
    return json_error(503, f"pin store unavailable: {exc}", code="store_unavailable")


async def metrics(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    return web.Response(body=ctx.metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def pins_list(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    instance = request.query.get("instance")
    if instance is not None and not is_valid_instance_id(instance):
        return json_error(400, "instance: not a valid instance id", code="bad_instance")
    try:
        limit = min(int(request.query.get("limit", "1000")), 100_000)
        pins = await ctx.store.list(InstanceId(instance) if instance else None, limit=limit)
    except ValueError:
        return json_error(400, "limit: expected an integer", code="bad_limit")
    except PinStoreUnavailable as exc:
        return _store_down(exc)
    return web.json_response({"pins": [
        {"user": p.user_key, "instance": p.instance, "expires_in": p.expires_in} for p in pins]})


async def pin_show(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    try:
        user = _user(request)
        pin = await ctx.store.get(user)
    except web.HTTPBadRequest as exc:
        return json_error(400, exc.text or "bad user", code="bad_user")
    except PinStoreUnavailable as exc:
        return _store_down(exc)
    if pin is None:
        return json_error(404, "no pin for this user", code="no_pin")
    return web.json_response({"user": pin.user_key, "instance": pin.instance, "expires_in": pin.expires_in,
                              "state": ctx.membership.current().state_of(pin.instance).value})


async def pin_set(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    try:
        user = _user(request)
        body = await request.json()
    except web.HTTPBadRequest as exc:
        return json_error(400, exc.text or "bad user", code="bad_user")
    except ValueError:
        return json_error(400, 'body must be {"instance": ID}', code="bad_json")
    instance = body.get("instance") if isinstance(body, dict) else None
    if not isinstance(instance, str) or ctx.membership.current().get(instance) is None:
        return json_error(400, "instance: must name a known instance", code="unknown_instance")
    try:
        pin = await ctx.store.set(user, InstanceId(instance))
    except PinStoreUnavailable as exc:
        return _store_down(exc)
    ctx.pin_cache.remember(user, pin.instance)
    ctx.metrics.repins.labels(repin_reason="operator").inc()
    return web.json_response({"user": pin.user_key, "instance": pin.instance, "expires_in": pin.expires_in})


async def pin_drop(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    try:
        user = _user(request)
        ctx.pin_cache.forget(user)
        dropped = await ctx.store.drop(user)
    except web.HTTPBadRequest as exc:
        return json_error(400, exc.text or "bad user", code="bad_user")
    except PinStoreUnavailable as exc:
        return _store_down(exc)
    if not dropped:
        return json_error(404, "no pin for this user", code="no_pin")
    return web.json_response({"dropped": True})


async def instances_list(request: web.Request) -> web.Response:
    """Membership as this node sees it, plus every node's heartbeat report per instance
    (``reports``: [{node, state, age_seconds}]) so operators can spot disagreement. When the
    store is down: last known pin counts, no reports and ``reports_available`` false."""
    ctx = request.app[CONTEXT]
    view = ctx.membership.current()
    try:
        counts: dict[str, int] = dict(await ctx.store.counts())
    except PinStoreUnavailable:
        counts = dict(ctx.pin_counts)
    try:
        reports = await ctx.shared.heartbeats()
        reports_available = True
    except PinStoreUnavailable:
        reports, reports_available = {}, False
    now = time.time()
    return web.json_response({"reports_available": reports_available, "instances": [
        {"id": i.id, "url": i.url, "state": i.state.value, "weight": i.weight, "pins": counts.get(i.id, 0),
         "sessions": ctx.live.loads.get(i.id, 0) if ctx.live is not None else None,
         "local": i.local, "region": i.region or None,
         "reports": [{"node": r.node, "state": r.state, "age_seconds": round(max(0.0, now - r.seen_at), 3)}
                     for r in reports.get(i.id, [])]}
        for i in view.instances]})


def _drain_handler(drain: bool) -> Handler:
    """Write the mark to the shared state first (every node applies it on its next membership
    refresh), then to this node's membership at once. Shared state down: 503, nothing changes."""

    async def handler(request: web.Request) -> web.Response:
        ctx = request.app[CONTEXT]
        instance = InstanceId(request.match_info["id"])
        if ctx.membership.current().get(instance) is None:
            return json_error(404, "unknown instance", code="unknown_instance")
        try:
            await (ctx.shared.drain(instance) if drain else ctx.shared.undrain(instance))
        except PinStoreUnavailable as exc:
            return json_error(503, f"shared state unavailable, drain marks unchanged: {exc}",
                              code="store_unavailable")
        ok = ctx.membership.drain(instance) if drain else ctx.membership.undrain(instance)
        if not ok:
            return json_error(404, "unknown instance", code="unknown_instance")
        return web.json_response({"id": instance, "state": ctx.membership.current().state_of(instance).value})

    return handler


async def reap(request: web.Request) -> web.Response:
    """One reaper pass now. ``"skipped": true`` (only then present): pins were due but another node
    holds the reaper lock and is reaping them."""
    reaper = request.app[REAPER]
    dry_run = request.query.get("dry_run", "0").lower() in ("1", "true", "yes")
    try:
        outcome = await reaper.reap_pass(dry_run=dry_run)
    except PinStoreUnavailable as exc:
        return _store_down(exc)
    doc: dict[str, Any] = {"dry_run": dry_run, "reaped": outcome.reaped,
                           "total": sum(len(v) for v in outcome.reaped.values())}
    if outcome.skipped:
        doc["skipped"] = True
    return web.json_response(doc)


async def rebalance(request: web.Request) -> web.Response:
    """``POST /rebalance[?dry_run=1]``: one rebalance pass now (at most one pass's budget), or its
    plan. ``"skipped": true`` (only then present): another process holds the rebalance lock."""
    rebalancer = request.app[REBALANCER]
    dry_run = request.query.get("dry_run", "0").lower() in ("1", "true", "yes")
    try:
        outcome = await rebalancer.run_once(dry_run=dry_run)
    except PinStoreUnavailable as exc:
        return _store_down(exc)
    return web.json_response(outcome_doc(rebalancer, outcome, dry_run=dry_run))


async def reload_config(request: web.Request) -> web.Response:
    """``POST /reload``: re-read the config file (like SIGHUP). 400 keeps the old config."""
    from affinity_proxy.serve.reload import reload_from_file

    result = reload_from_file(request.app[CONTEXT])
    return web.json_response(result.as_json(), status=200 if result.ok else 400)


def add_admin_routes(app: web.Application) -> None:
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/health", health)
    app.router.add_route("*", "/session-check", session_check)
    app.router.add_get("/pins", pins_list)
    app.router.add_get("/pins/{user}", pin_show)
    app.router.add_put("/pins/{user}", pin_set)
    app.router.add_delete("/pins/{user}", pin_drop)
    app.router.add_get("/instances", instances_list)
    app.router.add_post("/instances/{id}/drain", _drain_handler(True))
    app.router.add_post("/instances/{id}/undrain", _drain_handler(False))
    app.router.add_post("/reap", reap)
    app.router.add_post("/rebalance", rebalance)
    app.router.add_post("/reload", reload_config)
