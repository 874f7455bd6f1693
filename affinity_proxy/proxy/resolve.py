"""From a request to a routing decision: build ``RouteInput`` (``make_route_input``, from facts
either engine reads off a request; ``route_input`` for an aiohttp request), consult the store when the
pure core asks for it (``NeedPin``), and carry out the atomic store operation it returns.

This is the only place the request path touches the pin store. A valid, fresh cookie never gets
here with a store call: ``decide`` answers it directly. Store failures degrade to the ring and are
counted; they never fail the request.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import replace

from aiohttp import web

from affinity_proxy.pins.store import PinStoreUnavailable
from affinity_proxy.proxy.context import ProxyContext
from affinity_proxy.routing.decide import (
    ClaimPin,
    Decision,
    DecisionReason,
    NeedPin,
    RepinReason,
    Route,
    RouteInput,
    decide,
    may_rebalance,
    rebalance_target,
)
from affinity_proxy.routing.model import InstanceId, MembershipView
from affinity_proxy.routing.replay import FORCE_INSTANCE_HEADER
from affinity_proxy.routing.userkey import extract_user_key

log = logging.getLogger("affinity_proxy.resolve")

FORCE_HEADER = FORCE_INSTANCE_HEADER

_random_bits = random.getrandbits


def new_anonymous_key() -> str:
    """A fresh ring key for an anonymous session. It only has to spread sessions evenly over the
    ring, nobody can exploit guessing it (the session is bound by the signed cookie, not by this
    key), so it comes from the process's Mersenne Twister (reseeded in every forked worker), not
    from ``secrets``: no ``getrandom`` system call per new session."""
    return f"{_random_bits(64):x}"


def route_input(
    ctx: ProxyContext,
    request: web.Request,
    *,
    user_key_override: str | None = None,
    avoid: dict[InstanceId, RepinReason] | None = None,
) -> RouteInput:
    """``make_route_input`` for an aiohttp request. No I/O; the cookie HMAC is cached by the codec."""
    if user_key_override is not None:
        user_key: str | None = user_key_override or None
    else:
        user_key = extract_user_key(ctx.user_key_sources, request.headers, request.query, request.cookies)
    return make_route_input(ctx, cookie_value=request.cookies.get(ctx.config.cookie.name), user_key=user_key,
                            user_digest=ctx.codec.user_digest(user_key),
                            force=request.headers.get(FORCE_HEADER), avoid=avoid or {})


def make_route_input(ctx: ProxyContext, *, cookie_value: str | None, user_key: str | None, user_digest: str,
                     force: str | None, avoid: dict[InstanceId, RepinReason], now: float | None = None) -> RouteInput:
    """Everything ``decide`` needs, from the facts an engine read off the request: the affinity
    cookie's raw value, the user key (``routing.userkey``) and its digest, the raw
    ``fly-force-instance-id``. No I/O. A random anonymous key is drawn only when ``decide`` may
    hash on it: no user key and no cookie naming a routable instance outside ``avoid``."""
    now = time.time() if now is None else now
    cookie, problem = ctx.codec.read(cookie_value, now)
    anonymous = ""
    if user_key is None and (cookie is None or cookie.instance in avoid
                             or not ctx.membership.current().is_routable(cookie.instance)):
        anonymous = new_anonymous_key()
    live, policy = ctx.live, ctx.policy
    if live is not None and user_key is None and cookie is not None and cookie.user_digest == "":
        live.seen(cookie.instance, f"{cookie.instance}~{cookie.issued_at}")
    wants_loads = live is not None and (policy.load_factor is not None or policy.rebalance_idle is not None)
    inp = RouteInput(
        user_key=user_key, user_digest=user_digest, cookie=cookie, cookie_problem=problem,
        force_instance=force, now=now, avoid=avoid, anonymous_key=anonymous,
        loads=live.loads if live is not None and wants_loads else None,
    )
    view = ctx.membership.current()
    if (ctx.moves is not None and live is not None and user_key is None and cookie is not None
            and cookie.instance not in avoid and view.is_routable(cookie.instance)
            and may_rebalance(inp, view, policy, cookie)):
        # An idle anonymous session on an instance over its share: decide moves it (a fresh key to
        # hash), if a move is left in this process's budget; the snapshot learns of it at once.
        inp = replace(inp, may_rebalance=True, anonymous_key=anonymous or new_anonymous_key())
        target = rebalance_target(inp, view, cookie)
        if target is not None and ctx.moves.take():
            live.moved(cookie.instance, target)
        else:
            inp = replace(inp, may_rebalance=False)
    return inp


def _store_down(ctx: ProxyContext, inp: RouteInput, op: str) -> RouteInput:
    """The look-up failed: count it and keep the user where it was last pinned (near cache) while
    that instance is routable, else mark the store as failed so ``decide`` degrades to the ring.
    Both answers are ones every node agrees on; a per-node bounded-load choice on a local snapshot
    (what a remembered but dead pin would lead to) is not."""
    assert inp.user_key is not None
    ctx.metrics.store_errors.labels(op=op).inc()
    ctx.pin_cache.outage()
    remembered = ctx.pin_cache.recall(inp.user_key)
    if remembered is not None and remembered not in inp.avoid and ctx.membership.current().is_routable(remembered):
        return replace(inp, pin_looked_up=True, stored_pin=remembered, store_ok=True)
    return replace(inp, pin_looked_up=True, stored_pin=None, store_ok=False)


async def lookup_pin(ctx: ProxyContext, inp: RouteInput) -> RouteInput:
    """Fill in the stored pin (or mark the store as failed). One store round trip."""
    assert inp.user_key is not None
    try:
        pin = await ctx.store.get(inp.user_key)
    except PinStoreUnavailable:
        return _store_down(ctx, inp, "get")
    if pin is None:
        ctx.pin_cache.forget(inp.user_key)
    else:
        ctx.pin_cache.remember(inp.user_key, pin.instance)
    return replace(inp, pin_looked_up=True, stored_pin=pin.instance if pin else None, store_ok=True)


async def resolve(ctx: ProxyContext, inp: RouteInput, *, apply: bool = True) -> tuple[Decision, RouteInput]:
    """Decide, asking the store at most once, then (``apply``) perform the decision's store op."""
    view = ctx.membership.current()
    decision = decide(inp, view, ctx.policy)
    if isinstance(decision, NeedPin):
        claimed = await claim_or_get(ctx, inp, view) if apply else None
        if claimed is not None:
            decision, inp, applied = claimed
            if applied:
                return decision, inp  # a new pin, claimed in the round trip that looked for an old one
        else:
            inp = await lookup_pin(ctx, inp)
            decision = decide(inp, view, ctx.policy)
    if apply and isinstance(decision, Route):
        if decision.store_op is not None:
            decision = await apply_store_op(ctx, decision, view, inp)
        elif decision.touch and inp.user_key is not None and inp.store_ok:
            await touch(ctx, inp.user_key, decision.instance)
    return decision, inp


async def claim_or_get(
    ctx: ProxyContext, inp: RouteInput, view: MembershipView
) -> tuple[Decision, RouteInput, bool] | None:
    """One store round trip for the common case of ``NeedPin``: decide as if no pin were stored and,
    when that claims a pin, run the claim at once. ``claim`` is SET-if-absent and answers with the
    pin already there, so a lost claim is exactly a look-up: decide again with that pin (first writer
    wins, as before). Returns None when the no-pin decision would not claim (the caller then looks the
    pin up); otherwise the decision, the input it was made on, and whether its store op is already
    applied (True: the claim was won and nothing is left to do)."""
    assert inp.user_key is not None
    guess_inp = replace(inp, pin_looked_up=True, stored_pin=None, store_ok=True)
    guess = decide(guess_inp, view, ctx.policy)
    if not isinstance(guess, Route) or not isinstance(guess.store_op, ClaimPin):
        return None
    lost = ctx.pin_cache.recall_lost(inp.user_key)
    if lost is not None and lost != guess.instance and lost not in inp.avoid and view.is_routable(lost):
        # This process saw the pin before a store outage: if the store lost it (came back empty),
        # every node that knew the user claims it back where it was, instead of a fresh placement.
        guess = Route(lost, DecisionReason.PIN, set_cookie=True, store_op=ClaimPin(inp.user_key, lost))
    op = guess.store_op
    assert isinstance(op, ClaimPin)
    try:
        result = await ctx.store.claim(op.user_key, op.instance)
    except PinStoreUnavailable:
        inp = _store_down(ctx, inp, "claim")
        return decide(inp, view, ctx.policy), inp, False
    winner = result.pin.instance
    ctx.pin_cache.remember(op.user_key, winner)
    if result.won:
        _placed(ctx, winner)
        return guess, guess_inp, True
    inp = replace(inp, pin_looked_up=True, stored_pin=winner, store_ok=True)
    return decide(inp, view, ctx.policy), inp, False


def _placed(ctx: ProxyContext, instance: InstanceId) -> None:
    """A pin written here counts in this process's live-session snapshot until the next refresh."""
    if ctx.live is not None:
        ctx.live.placed(instance)


async def touch(ctx: ProxyContext, user_key: str, instance: InstanceId) -> None:
    try:
        await ctx.store.touch(user_key, instance)
    except PinStoreUnavailable:
        ctx.metrics.store_errors.labels(op="touch").inc()


async def apply_store_op(ctx: ProxyContext, route: Route, view: MembershipView, inp: RouteInput) -> Route:
    """Claim (SET NX) or compare-and-set the pin. When another worker or node won the race, route
    to the winner so every racer ends on the same instance."""
    op = route.store_op
    assert op is not None
    op_name = "claim" if isinstance(op, ClaimPin) else "repin"
    try:
        if isinstance(op, ClaimPin):
            result = await ctx.store.claim(op.user_key, op.instance)
        else:
            result = await ctx.store.repin(op.user_key, op.expected, op.instance)
    except PinStoreUnavailable:
        ctx.metrics.store_errors.labels(op=op_name).inc()
        ctx.pin_cache.outage()
        return route
    winner = result.pin.instance
    ctx.pin_cache.remember(op.user_key, winner)
    if result.won:
        _placed(ctx, winner)
    if result.won or winner == route.instance:
        return route
    if view.is_routable(winner) and winner not in inp.avoid:
        return Route(winner, DecisionReason.PIN, set_cookie=True)
    log.warning(
        "lost a pin race to an unroutable instance; serving unpinned",
        extra={"fields": {"instance": route.instance, "winner": winner, "op": op_name}},
    )
    return route
