"""Session-check: explain, as JSON, how this request (or ``userId``) would be routed and why.

GET changes nothing (the store is only read). POST ``{"userId", "testAffinity", "pin"}`` repeats
the decision to show it is stable and, with ``"pin": true``, creates the pin (and sets the cookie).

On the main (public) listener, with ``session_check.lookup: admin`` (the default), a caller may only
ask about its own request: a ``userId`` other than the user key the request itself carries (header,
query or cookie per ``user_key``) is 403 ``lookup_forbidden``, and the answer leaves out
``pin.expires_in`` and per-instance pin counts. A header key is not authenticated, so anyone can
present any key as their own: what remains is what routing that request reveals anyway, while the
expiry would tell when that user was last active. ``lookup: public`` restores the full answer for
anyone; the admin listener always gives it.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from typing import Any

from aiohttp import hdrs, web

from affinity_proxy.pins.store import PinStoreUnavailable
from affinity_proxy.proxy.context import ProxyContext
from affinity_proxy.proxy.errors import json_error
from affinity_proxy.proxy.resolve import apply_store_op, lookup_pin, route_input
from affinity_proxy.routing.cookie import AffinityCookie, set_cookie_value
from affinity_proxy.routing.decide import Decision, NeedPin, Refuse, Route, RouteInput, decide, hash_choice
from affinity_proxy.routing.userkey import MAX_USER_KEY_LENGTH, extract_user_key

STABILITY_ROUNDS = 20


def _decision_json(decision: Decision) -> dict[str, Any]:
    if isinstance(decision, Route):
        return {
            "action": "forward",
            "instance": decision.instance,
            "reason": decision.reason.value,
            "repin_reason": decision.repin_reason.value if decision.repin_reason else None,
            "sets_cookie": decision.set_cookie,
            "conflict": decision.conflict,
        }
    if isinstance(decision, Refuse):
        return {"action": "refuse", "instance": None, "reason": decision.reason}
    return {"action": "lookup", "instance": None, "reason": "need_pin"}


async def explain(ctx: ProxyContext, request: web.Request, user_id: str | None) -> tuple[dict[str, Any], Decision,
                                                                                         RouteInput]:
    """Build the explanation document; reads the store, writes nothing."""
    inp = route_input(ctx, request, user_key_override=user_id)
    view = ctx.membership.current()
    raw_cookie = request.cookies.get(ctx.config.cookie.name)
    pin_doc: dict[str, Any] | None = None
    store_ok = True
    if inp.user_key is not None:
        try:
            pin = await ctx.store.get(inp.user_key)
        except PinStoreUnavailable:
            store_ok = False
            pin = None
        inp = replace(inp, pin_looked_up=True, stored_pin=pin.instance if pin else None, store_ok=store_ok)
        if pin is not None:
            pin_doc = {"instance": pin.instance, "expires_in": pin.expires_in}
    decision = decide(inp, view, ctx.policy)
    try:
        counts = await ctx.store.counts()
    except PinStoreUnavailable:
        store_ok = False
        counts = dict(ctx.pin_counts)
    cookie = inp.cookie
    cookie_doc: dict[str, Any] = {
        "present": raw_cookie is not None,
        "valid": cookie is not None,
        "instance": cookie.instance if isinstance(cookie, AffinityCookie) else None,
        "problem": inp.cookie_problem.value if inp.cookie_problem else None,
        "age_seconds": int(inp.now - cookie.issued_at) if cookie else None,
        "for_this_user": (cookie.user_digest in ("", inp.user_digest)) if cookie else None,
    }
    local = [i.id for i in view.instances if i.local]
    doc: dict[str, Any] = {
        "node": ctx.node,
        "instance": local[0] if ctx.config.mode == "fly" and local else None,
        "region": ctx.config.fly.region,
        "mode": ctx.config.mode,
        "cookie": cookie_doc,
        "user_key": inp.user_key,
        "pin": pin_doc,
        "hash_instance": hash_choice(inp, view),
        "decision": _decision_json(decision),
        "instances": [
            {"id": i.id, "state": i.state.value, "pins": counts.get(i.id, 0), "weight": i.weight,
             "region": i.region or None}
            for i in view.instances
        ],
        "store": {"kind": ctx.store.kind, "ok": store_ok},
    }
    if inp.user_key is None:
        doc["note"] = "anonymous request: hash_instance is for a fresh random session id"
    return doc, decision, inp


def _user_id_from_query(request: web.Request) -> str | None:
    value = request.query.get("userId")
    if value is not None and (len(value) > MAX_USER_KEY_LENGTH or not value.isprintable()):
        raise web.HTTPBadRequest(text="userId: at most 256 printable characters")
    return value


def _lookup_public(ctx: ProxyContext, public: bool) -> bool:
    """True when this answer may look up any user and show pin expiry and counts."""
    return not public or ctx.config.session_check.lookup == "public"


def _own_key(ctx: ProxyContext, request: web.Request) -> str | None:
    return extract_user_key(ctx.user_key_sources, request.headers, request.query, request.cookies)


def _lookup_refused(ctx: ProxyContext, request: web.Request, user_id: str | None, public: bool) -> web.Response | None:
    """403 when a public caller asks about a user key its request does not carry."""
    if user_id is None or _lookup_public(ctx, public) or _own_key(ctx, request) == user_id:
        return None
    return json_error(403, "userId: this listener explains only your own request (leave userId out, or send "
                           "it as your user key); looking up another user needs the admin listener's "
                           "/session-check or session_check.lookup: public", code="lookup_forbidden")


def _redact(doc: dict[str, Any]) -> dict[str, Any]:
    """Drop what would make the public answer an activity oracle: pin expiry and pin counts."""
    if doc.get("pin"):
        doc["pin"] = {k: v for k, v in doc["pin"].items() if k != "expires_in"}
    doc["instances"] = [{k: v for k, v in i.items() if k != "pins"} for i in doc["instances"]]
    return doc


async def session_check_get(ctx: ProxyContext, request: web.Request, *, public: bool = False) -> web.Response:
    """``public`` (the main listener): see the module docstring."""
    try:
        user_id = _user_id_from_query(request)
    except web.HTTPBadRequest as exc:
        return json_error(400, exc.text or "bad userId", code="bad_user_id")
    refused = _lookup_refused(ctx, request, user_id, public)
    if refused is not None:
        return refused
    doc, _, _ = await explain(ctx, request, user_id)
    if not _lookup_public(ctx, public):
        doc = _redact(doc)
    return web.json_response(doc, dumps=lambda o: json.dumps(o, indent=2))


async def session_check_post(ctx: ProxyContext, request: web.Request, *, public: bool = False) -> web.Response:
    """``public`` (the main listener): ``"pin": true`` may only pin the caller's own user key (the
    one its request carries), so nobody can pin someone else from the internet, even with
    ``session_check.lookup: public``; the admin listener may pin any user. Lookups: see the module
    docstring."""
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return json_error(400, "body must be a JSON object", code="bad_json")
    if not isinstance(body, dict):
        return json_error(400, "body must be a JSON object", code="bad_json")
    user_id = body.get("userId")
    if user_id is not None and (
        not isinstance(user_id, str) or len(user_id) > MAX_USER_KEY_LENGTH or not user_id.isprintable()
    ):
        return json_error(400, "userId: a string of at most 256 printable characters", code="bad_user_id")
    refused = _lookup_refused(ctx, request, user_id, public)
    if refused is not None:
        return refused
    if public and body.get("pin") is True and user_id is not None and _own_key(ctx, request) != user_id:
        return json_error(403, "pin: on the public listener only your own user key can be pinned",
                          code="pin_forbidden")
    doc, decision, inp = await explain(ctx, request, user_id)
    if not _lookup_public(ctx, public):
        doc = _redact(doc)
    headers: dict[str, str] = {}
    if body.get("testAffinity"):
        view = ctx.membership.current()
        seen = set()
        for _ in range(STABILITY_ROUNDS):
            again = decide(replace(inp, now=time.time()), view, ctx.policy)
            seen.add(again.instance if isinstance(again, Route) else None)
        doc["stable"] = len(seen) == 1
        doc["rounds"] = STABILITY_ROUNDS
    if body.get("pin") is True and isinstance(decision, Route):
        if isinstance(decision, NeedPin):  # pragma: no cover - explain() always looks the pin up
            inp = await lookup_pin(ctx, inp)
        final = decision
        if decision.store_op is not None:
            final = await apply_store_op(ctx, decision, ctx.membership.current(), inp)
        doc["pinned"] = {"instance": final.instance, "stored": inp.user_key is not None}
        c = ctx.config.cookie
        value = ctx.codec.encode(final.instance, int(inp.now), inp.user_digest)
        headers[hdrs.SET_COOKIE] = set_cookie_value(
            c.name, value, max_age=c.max_age, path=c.path, domain=c.domain, secure=c.secure,
            http_only=c.http_only, same_site=c.same_site,
        )
    return web.json_response(doc, headers=headers, dumps=lambda o: json.dumps(o, indent=2))
