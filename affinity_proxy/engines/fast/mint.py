"""The new-session lane: a first visit placed and given its cookie without the general routing path.

A request with no affinity cookie, no user key and no ``fly-force-instance-id`` (first visits,
crawlers, API clients without a cookie jar) is, in proxy mode, always the same decision: ``decide``
step 5, ``Route(<placement of a fresh anonymous key>, reason new, set_cookie, how)`` with no store
call. ``NewSessions.mint`` answers exactly that with the ring look-up as its only real work:

- placement: ``routing.placement``'s bounded load on the live-session snapshot
  (``placement.live``, ``RouteInput.loads``), the instances with room computed once per snapshot
  (the snapshot is replaced whole, so its identity is the cache key) instead of per request, and
  the placement of each ring position kept while those stay the same (``RoomWalk``): a new session
  costs the md5 and bisect of its key; with ``placement.load_factor`` off, the ring's choice
  (``MembershipView.choose_new``);
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

import dataclasses
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

#: What ``lane_input`` builds a new session's ``RouteInput`` from: (now, anonymous key, loads).
InputArgs = tuple[float, str, Any]
#: One minted session: the decision, its input (or, from ``mint(lazy=True)``, what ``input_of``
#: builds it from), the instance, its pool origin, the response header lines and the counters.
Minted = tuple[Route, "RouteInput | InputArgs", Instance, "Origin", tuple[bytes, ...], tuple[Any, ...]]


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
    return place_at(ring.position(key), ring, room)


def place_at(position: int, ring: HashRing, room: frozenset[str]) -> tuple[str | None, PlacementHow]:
    """``place_with_room`` for the keys that hash to ring ``position``."""
    chosen = ring.owner(position)
    if chosen in room:
        return chosen, PlacementHow.RING
    return next((node for node in ring.walk_from(position) if node in room), None), PlacementHow.OVERFLOW


class RoomWalk:
    """``with_room``'s answer, each ring position's placement (``place_at``) kept once asked: a new
    session then costs the md5 and bisect of its key. The continuum has a few hundred points per
    instance, so the table fills within the first few thousand sessions of a (ring, room) state;
    the live-session snapshot is replaced every second or so, and the table is kept as long as the
    instances with room stay the same (``reuse``)."""

    __slots__ = ("_at", "ring", "room")

    def __init__(self, ring: HashRing, room: frozenset[str]) -> None:
        self.ring = ring
        self.room = room
        self._at: list[tuple[str | None, PlacementHow] | None] = [None] * ring.points

    def place(self, key: str) -> tuple[str | None, PlacementHow]:
        position = self.ring.position(key)
        placed = self._at[position]
        if placed is None:
            placed = self._at[position] = place_at(position, self.ring, self.room)
        return placed

    def reuse(self, placed: tuple[HashRing, frozenset[str]] | None) -> RoomWalk | None:
        """The walk for a new ``with_room`` answer: this one when nothing changed."""
        if placed is None:
            return None
        ring, room = placed
        if ring is self.ring and room == self.room:
            return self
        return RoomWalk(ring, room)


#: The fields ``lane_input`` leaves at their defaults: (slot setter, default), (slot setter, factory).
_INPUT_DEFAULTS = tuple((getattr(RouteInput, f.name).__set__, f.default) for f in dataclasses.fields(RouteInput)
                        if f.name not in ("now", "anonymous_key", "loads") and f.default is not dataclasses.MISSING)
_INPUT_FACTORIES = tuple((getattr(RouteInput, f.name).__set__, f.default_factory)
                         for f in dataclasses.fields(RouteInput) if f.default_factory is not dataclasses.MISSING)
_set_now = RouteInput.now.__set__  # type: ignore[attr-defined]
_set_key = RouteInput.anonymous_key.__set__  # type: ignore[attr-defined]
_set_loads = RouteInput.loads.__set__  # type: ignore[attr-defined]


def lane_input(now: float, key: str, loads: Any) -> RouteInput:
    """``RouteInput(now=now, anonymous_key=key, loads=loads)``, its slots set directly: the frozen
    dataclass's ``__init__`` (keyword binding, an ``object.__setattr__`` by name per field) cost
    as much as the rest of the placement. Every other field gets its default (a fresh one from a
    factory), whatever fields ``RouteInput`` has."""
    inp = object.__new__(RouteInput)
    for setter, value in _INPUT_DEFAULTS:
        setter(inp, value)
    for setter, factory in _INPUT_FACTORIES:
        setter(inp, factory())
    _set_now(inp, now)
    _set_key(inp, key)
    _set_loads(inp, loads)
    return inp


def input_of(inp: RouteInput | InputArgs) -> RouteInput:
    """The ``RouteInput`` of a minted session, built now when ``mint(lazy=True)`` left it for later."""
    return inp if isinstance(inp, RouteInput) else lane_input(*inp)


class _Snapshot:
    """What the lane derived from one (membership, codec, policy, config) state."""

    __slots__ = ("codec", "config", "lines", "loads", "policy", "targets", "view", "walk")

    def __init__(self, ctx: ProxyContext) -> None:
        self.view = ctx.membership.current()
        self.codec = ctx.codec
        self.policy = ctx.policy
        self.config = ctx.config
        self.loads: Any = None  # the live-session snapshot ``walk`` was computed for
        self.walk: RoomWalk | None = None
        #: (instance, how) -> (decision, counters, instance, its pool origin); None: not routable
        self.targets: dict[tuple[str, PlacementHow], tuple[Route, tuple[Any, ...], Instance, Origin] | None] = {}
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
             hot_key: tuple[Any, ...] | None = None, *, lazy: bool = False) -> Minted | None:
        """The new session for ``head`` (what the general path would decide and send), or None
        when the general path must answer (see the module docstring). ``hot_key``: see ``eligible``.
        ``lazy``: return the input's ``InputArgs`` instead of the ``RouteInput`` (``input_of``
        builds it; a lane forwarding the session needs it only if something fails)."""
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
        if policy.load_factor is None or loads is None:
            placed: tuple[str | None, PlacementHow] = (snap.view.choose_new(key), PlacementHow.RING)
        else:
            if snap.loads is not loads:
                room = with_room(snap.view, loads, policy.load_factor)
                snap.walk = (snap.walk.reuse(room) if snap.walk is not None
                             else RoomWalk(*room) if room is not None else None)
                snap.loads = loads
            walk = snap.walk
            if walk is None:
                return None
            placed = walk.place(key)
        target = snap.targets.get(placed)  # type: ignore[arg-type]
        if target is None:
            target = self._target(snap, placed, counts, pool)
            if target is None:
                return None
        route, counters, instance, origin = target
        now = time.time()
        inp: RouteInput | InputArgs = (now, key, loads) if lazy else lane_input(now, key, loads)
        second = int(now)
        chosen = route.instance
        lines = snap.lines.get(chosen)
        if lines is None or lines[0] != second:
            cookie = self.writer.value(snap.codec, snap.config, instance.id, route, input_of(inp))
            lines = snap.lines[chosen] = (second, tuple(b"%s: %s\r\n" % (name.encode(), value.encode())
                                                        for name, value in act.response_headers(instance.id, cookie)))
        self.minted += 1
        return route, inp, instance, origin, lines[1], counters

    @staticmethod
    def _target(snap: _Snapshot, placed: tuple[str | None, PlacementHow], counts: Counts,
                pool: UpstreamPool) -> tuple[Route, tuple[Any, ...], Instance, Origin] | None:
        """The decision, counters, instance and origin of a placement (kept in ``snap.targets``);
        None when nothing was placed or the instance has no URL (the general path answers)."""
        chosen, how = placed
        if chosen is None:
            return None
        instance = snap.view.get(chosen)
        if instance is None or not instance.url:
            return None
        route = Route(InstanceId(chosen), DecisionReason.NEW, set_cookie=True, how=how)
        target = snap.targets[(chosen, how)] = (route, counts.children(act.counts(act.FORWARD, route)), instance,
                                               pool.origin(instance.url))
        return target
