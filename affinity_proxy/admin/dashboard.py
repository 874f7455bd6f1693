"""The live dashboard on the admin listener.

``GET /dashboard`` (and its ``dashboard/dashboard.js``, ``dashboard/dashboard.css``) is a static
page holding no data, served without the admin token so a browser can load it; its script reads
the token from the URL fragment (``/dashboard#token=...``, never sent to any server, kept in the
tab's sessionStorage and removed from the address bar) and sends it as a bearer header on
``GET /dashboard/data`` and ``GET /session-check``, which stay behind the token like every admin
route. The page loads nothing from other hosts (a Content-Security-Policy says so).

``/dashboard/data`` reads the membership snapshot, the pin counts (one ``counts()`` store call)
and ``ctx.events``; it changes nothing. With ``serve --workers N`` the traffic series and re-pins are
those of the worker that answered (``pid``; a browser keeps its connection, so usually the same
one), while pins, instances and store status are shared. Must not import ``app``.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from importlib.resources import files
from typing import Any

from aiohttp import web

from affinity_proxy.admin.api import health_document
from affinity_proxy.pins.store import PinStoreUnavailable
from affinity_proxy.proxy.context import CONTEXT, ProxyContext

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: Static files under ``admin/static`` and their content types.
STATIC_FILES = {
    "dashboard.html": "text/html",
    "dashboard.js": "text/javascript",
    "dashboard.css": "text/css",
}
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
DEFAULT_SERIES_SECONDS = 600


def _public(handler: Handler) -> Handler:
    """Mark a handler as served without the admin token (``token_middleware`` checks the mark).
    Only for static files that hold no data."""
    handler.admin_public = True  # type: ignore[attr-defined]
    return handler


def _static(name: str) -> Handler:
    body = (files("affinity_proxy.admin") / "static" / name).read_bytes()
    content_type = STATIC_FILES[name]

    async def serve(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type=content_type, charset="utf-8", headers=PAGE_HEADERS)

    return _public(serve)


async def _to_dashboard(request: web.Request) -> web.Response:
    """``/dashboard/`` -> ``../dashboard`` (the page's relative URLs expect no trailing slash; the
    browser keeps the ``#token=`` fragment across the redirect)."""
    raise web.HTTPFound("../dashboard")


async def dashboard_document(ctx: ProxyContext, seconds: int = DEFAULT_SERIES_SECONDS) -> dict[str, Any]:
    """Everything the page shows. One store call (pin counts); when the store is down the last
    counts known to the background refresher are used and ``pins.live`` is false."""
    view = ctx.membership.current()
    try:
        counts: dict[str, int] = dict(await ctx.store.counts())
        live = True
    except PinStoreUnavailable:
        counts, live = dict(ctx.pin_counts), False
    _, health = health_document(ctx)
    per_instance = [counts.get(i.id, 0) for i in view.instances]
    holding = [n for n in per_instance if n > 0]
    mean = sum(holding) / len(holding) if holding else 0.0
    loads = ctx.live.loads if ctx.live is not None else {}
    sessions = [loads.get(i.id, 0) for i in view.instances]
    routable = [n for i, n in zip(view.instances, sessions, strict=True) if i.state.routable]
    sessions_mean = sum(routable) / len(routable) if routable else 0.0
    return {
        "node": ctx.node,
        "pid": os.getpid(),
        "mode": ctx.config.mode,
        "region": ctx.config.fly.region,
        "status": health["status"],
        "uptime_seconds": health["uptime_seconds"],
        "store": {"kind": ctx.store.kind, "ok": ctx.store_ok and live},
        "replay_status": ctx.config.fly.replay_status,
        "instances": [
            {"id": i.id, "state": i.state.value, "region": i.region or None, "weight": i.weight,
             "local": i.local, "pins": n, "sessions": s}
            for i, n, s in zip(view.instances, per_instance, sessions, strict=True)
        ],
        "pins": {"total": sum(counts.values()), "max": max(per_instance, default=0), "mean": round(mean, 2),
                 "live": live},
        # live sessions (pins + anonymous cookie sessions, placement.live): max/mean over routable instances
        "sessions": {"total": sum(sessions), "max": max(routable, default=0), "mean": round(sessions_mean, 2),
                     "balance": round(max(routable) / sessions_mean, 3) if sessions_mean else None,
                     "load_factor": ctx.config.placement.load_factor},
        "events": ctx.events.snapshot(seconds),
    }


async def dashboard_data(request: web.Request) -> web.Response:
    try:
        seconds = int(request.query.get("seconds", DEFAULT_SERIES_SECONDS))
    except ValueError:
        seconds = DEFAULT_SERIES_SECONDS
    doc = await dashboard_document(request.app[CONTEXT], seconds)
    return web.json_response(doc, headers={"Cache-Control": "no-store"})


def add_dashboard_routes(app: web.Application) -> None:
    """Register the dashboard on the admin application (which carries ``CONTEXT``)."""
    app.router.add_get("/dashboard", _static("dashboard.html"))
    app.router.add_get("/dashboard/", _public(_to_dashboard))
    app.router.add_get("/dashboard/dashboard.js", _static("dashboard.js"))
    app.router.add_get("/dashboard/dashboard.css", _static("dashboard.css"))
    app.router.add_get("/dashboard/data", dashboard_data)
