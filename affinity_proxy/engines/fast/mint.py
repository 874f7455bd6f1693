"""The new-session lane: a first visit placed and given its cookie without the general routing path.

A request with no affinity cookie, no user key and no ``fly-force-instance-id`` (first visits,
crawlers, API clients without a cookie jar) is, in proxy mode, always the same decision: ``decide``
step 5, ``Route(<placement of a fresh anonymous key>, reason new, set_cookie, how)`` with no store
call. ``NewSessions.mint`` answers exactly that with the ring look-up as its only real work:

- placement: ``routing.placement``'s bounded load on the live-session snapshot
  (``placement.live``, ``RouteInput.loads``), the instances with room computed once per snapshot
  (the snapshot is replaced whole, so its identity is the cache key) instead of per request; with
  ``placement.load_factor`` off, the ring's choice (``MembershipView.choose_new``);
- the cookie: an anonymous cookie names only the instance and the second it was issued
  (``routing.cookie``), so ``proxy.act.CookieWriter`` is asked once per instance per second and
  its ``X-Fly-Instance`` and ``Set-Cookie`` lines are kept as bytes until the second changes;
- counting: ``proxy.act.counts`` (``affinity_requests_total{action=forward,reason=new}``,
  ``affinity_placements_total{instance,how}``), its counter children kept per decision.

Everything cached is dropped when the membership snapshot, codec, policy or config object is
replaced (membership or health change, reload). The lane declines (returns None; the general path
answers) in fly mode, with fly placement ``local``, for any request carrying the affinity cookie
(valid or not), a user key or the force header, and when no instance can take the session (the
general path refuses). ``tests/engines/fast/test_mint.py`` checks its placements against ``decide``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from affinity_proxy.proxy import act
from affinity_proxy.proxy.resolve import new_anonymous_key
from affinity_proxy.routing.decide import DecisionReason, Route, RouteInput
from affinity_proxy.routing.model import Instance, InstanceId, MembershipView
from affinity_proxy.routing.placement import PlacementHow, capacity, load_factor_fraction, placement_ring
from affinity_proxy.routing.ring import HashRing
from affinity_proxy.routing.userkey import extract_user_key

from .head import Query, RequestHead
from .wire import FORCE_INSTANCE_B

if TYPE_CHECKING:
    from affinity_proxy.proxy.context import ProxyContext

    from .counting import Counts
    from .upstream import Origin, UpstreamPool

#: One minted session: the decision, its input, the instance, its pool origin, the response header
#: lines and the counters to add to.
Minted = tuple[Route, RouteInput, Instance, "Origin", tuple[bytes, ...], tuple[Any, ...]]


def with_room(view: MembershipView, loads: Any, load_factor: float) -> tuple[HashRing, frozenset[str]] | None:
    """The ring ``routing.placement.place`` walks for a new session (nothing excluded) and the
    instances on it that may take one more session under ``load_factor``: ``place`` takes the first
    of those on the key's walk (``ring`` when it is the walk's first, else ``overflow``). None when
    the ring is empty or a load is negative (the general path then decides, or raises, as it would)."""
    factor = load_factor_fraction(load_factor)
    ring = placement_ring(view)
    weights = ring.weights
    if not weights or factor is None:
        return None
    counts = {node: loads.get(node, 0) for node in weights}
    if any(n < 0 for n in counts.values()):
        return None
    total_after = sum(counts.values()) + 1
    total_weight = sum(weights.values())
    room = frozenset(node for node, w in weights.items()
                     if counts[node] + 1 <= capacity(total_after, w, total_weight, factor))
    return ring, room


def place_with_room(key: str, ring: HashRing, room: frozenset[str]) -> tuple[str | None, PlacementHow]:
    """``place`` for ``key`` given ``with_room``'s answer: the key's ring choice when it has room,
    else the first instance with room further along the walk."""
    chosen = ring.choose(key)
    if chosen in room:
        return chosen, PlacementHow.RING
    return next((node for node in ring.walk(key) if node in room), None), PlacementHow.OVERFLOW


class _Snapshot:
    """What the lane derived from one (membership, codec, policy, config) state."""

    __slots__ = ("codec", "config", "ids", "instances", "lines", "policy", "room", "routes", "view")

    def __init__(self, ctx: ProxyContext) -> None:
        self.view = ctx.membership.current()
        self.codec = ctx.codec
        self.policy = ctx.policy
        self.config = ctx.config
        self.room: tuple[Any, tuple[HashRing, frozenset[str]] | None] = (None, None)  # (loads, with_room)
        self.instances: dict[str, tuple[Instance, Origin] | None] = {}
        self.routes: dict[tuple[str, PlacementHow], tuple[Route, tuple[Any, ...]]] = {}
        self.lines: dict[str, tuple[int, tuple[bytes, ...]]] = {}  # instance -> (second, header lines)


class NewSessions:
    """The lane of one process (event loop); see the module docstring."""

    def __init__(self, ctx: ProxyContext, *, fly: bool, cookies: Callable[[RequestHead], dict[str, str]],
                 writer: act.CookieWriter) -> None:
        self.ctx = ctx
        self.fly = fly
        self.cookies = cookies  # the request's cookie jar (``route.Router.cookies``)
        self.writer = writer  # the engine's ``Set-Cookie`` rule (``route.Router.cookies_out``)
        self._snap: _Snapshot | None = None
        self.minted = 0

    def eligible(self, head: RequestHead, hot_key: tuple[Any, ...] | None = None) -> bool:
        """No affinity cookie (valid or not), no user key, no force header: a new anonymous session.

        ``hot_key``: the head's ``route.HotRoutes`` key, which holds the raw bytes of every routing
        input (the Cookie header, the force header, each user-key source's header or query
        string); when all are absent or empty, none can name a cookie, a user or an instance."""
        if self.fly or self.ctx.policy.local_instance is not None:
            return False
        if hot_key is not None and not any(hot_key):
            return True
        if FORCE_INSTANCE_B in head.first:
            return False
        ctx = self.ctx
        jar = self.cookies(head)
        if ctx.config.cookie.name in jar:
            return False
        return extract_user_key(ctx.user_key_sources, head, Query(head.target), jar) is None  # type: ignore[arg-type]

    def mint(self, head: RequestHead, counts: Counts, pool: UpstreamPool,
             hot_key: tuple[Any, ...] | None = None) -> Minted | None:
        """The new session for ``head`` (what the general path would decide and send), or None
        when the general path must answer (see the module docstring). ``hot_key``: see ``eligible``."""
        if not self.eligible(head, hot_key):
            return None
        ctx = self.ctx
        snap = self._snap
        if (snap is None or snap.view is not ctx.membership.current() or snap.codec is not ctx.codec
                or snap.policy is not ctx.policy or snap.config is not ctx.config):
            snap = self._snap = _Snapshot(ctx)
        policy = snap.policy
        live = ctx.live
        loads = live.loads if live is not None and (policy.load_factor is not None
                                                    or policy.rebalance_idle is not None) else None
        key = new_anonymous_key()
        view = snap.view
        if policy.load_factor is None or loads is None:
            chosen: str | None = view.choose_new(key)
            how = PlacementHow.RING
        else:
            if snap.room[0] is not loads:
                snap.room = (loads, with_room(view, loads, policy.load_factor))
            placed = snap.room[1]
            if placed is None:
                return None
            chosen, how = place_with_room(key, *placed)
        if chosen is None:
            return None
        target = snap.instances.get(chosen)
        if target is None:
            instance = view.get(chosen)
            if instance is None or not instance.url:
                return None
            target = snap.instances[chosen] = (instance, pool.origin(instance.url))
        instance, origin = target
        decided = snap.routes.get((chosen, how))
        if decided is None:
            route = Route(InstanceId(chosen), DecisionReason.NEW, set_cookie=True, how=how)
            decided = snap.routes[(chosen, how)] = (route, counts.children(act.counts(act.FORWARD, route)))
        route, counters = decided
        now = time.time()
        inp = RouteInput(now=now, anonymous_key=key, loads=loads)
        second = int(now)
        lines = snap.lines.get(chosen)
        if lines is None or lines[0] != second:
            cookie = self.writer.value(snap.codec, snap.config, instance.id, route, inp)
            lines = snap.lines[chosen] = (second, tuple(b"%s: %s\r\n" % (name.encode(), value.encode())
                                                        for name, value in act.response_headers(instance.id, cookie)))
        self.minted += 1
        return route, inp, instance, origin, lines[1], counters
