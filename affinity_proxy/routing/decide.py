"""The routing decision (README "How a request is routed"): which instance serves a request, and why.

Pure: imports only ``routing.model`` and ``routing.cookie``; no I/O, no clocks (``now`` is an input).
``decide`` returns a value. When it needs the stored pin it says so with ``NeedPin``; the caller asks
the store, fills in ``pin_looked_up``/``stored_pin``/``store_ok`` and calls it again. Store writes
come back as a ``StoreOp`` for the caller to run (``ClaimPin`` = SET NX, ``RepinPin`` = compare-and-set).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from affinity_proxy.routing.cookie import AffinityCookie, CookieProblem
from affinity_proxy.routing.model import InstanceId, InstanceState, MembershipView, is_valid_instance_id
from affinity_proxy.routing.placement import PlacementHow, place
from affinity_proxy.routing.rebalance import over_share


class DecisionReason(StrEnum):
    """Why the instance was chosen; the ``reason`` metric label. ``LOOP_GUARD`` is set by the caller."""

    FORCE = "force"
    COOKIE = "cookie"
    PIN = "pin"
    HASH = "hash"
    NEW = "new"
    REPIN = "repin"
    LOOP_GUARD = "loop_guard"
    LOCAL = "local"  # fly placement ``local``: a new session stays on the Machine Fly's edge chose
    FALLBACK = "fallback"  # fly: served here once because Fly could not deliver to the pinned Machine now


class RepinReason(StrEnum):
    """Why a user was moved off its instance; the ``repin_reason`` metric label."""

    DEAD = "dead"
    GONE = "gone"
    DRAINING = "draining"
    INVALID_COOKIE = "invalid_cookie"
    UNAVAILABLE = "unavailable"
    REPLAY_FAILED = "replay_failed"
    OVERLOAD = "overload"
    OPERATOR = "operator"
    REBALANCE = "rebalance"  # an idle user moved off an instance over its share (issue #14)


@dataclass(frozen=True, slots=True)
class ClaimPin:
    """Create the pin only if absent (``PinStore.claim``); the first writer wins."""

    user_key: str
    instance: InstanceId


@dataclass(frozen=True, slots=True)
class RepinPin:
    """Move the pin from ``expected`` to ``instance`` only if it still names ``expected`` (``PinStore.repin``)."""

    user_key: str
    expected: InstanceId | None
    instance: InstanceId


StoreOp = ClaimPin | RepinPin


@dataclass(frozen=True, slots=True)
class RouteInput:
    """Everything ``decide`` looks at, extracted from the request by the caller."""

    user_key: str | None = None
    user_digest: str = ""  # codec.user_digest(user_key)
    cookie: AffinityCookie | None = None  # a verified cookie
    cookie_problem: CookieProblem | None = None  # a cookie was present but failed verification
    force_instance: str | None = None  # raw fly-force-instance-id header value (untrusted)
    now: float = 0.0
    pin_looked_up: bool = False  # the caller already asked the store
    stored_pin: InstanceId | None = None  # its answer (meaningful when pin_looked_up)
    store_ok: bool = True  # False: the lookup failed (store down) -> degrade to the ring
    avoid: Mapping[InstanceId, RepinReason] = field(default_factory=dict)
    anonymous_key: str = ""  # a fresh random session id, hashed for anonymous requests
    #: Live sessions per instance (``placement.live`` snapshot); None: place by the plain ring.
    loads: Mapping[str, int] | None = None
    #: The caller holds a rebalance move for this request: an anonymous session whose cookie proves
    #: it idle may move off an instance over its share (``DecidePolicy.rebalance_idle``).
    may_rebalance: bool = False


@dataclass(frozen=True, slots=True)
class DecidePolicy:
    """Per-node settings of the decision. ``local_instance`` set: fly placement ``local`` (a new
    session, or a re-pin, goes to this node's own instance while it accepts new users, reason
    ``local``); None: the consistent hash places new sessions (proxy mode, fly placement ``hash``)."""

    revalidate_after: float = 60.0  # seconds a keyed cookie is trusted without a store round trip
    local_instance: InstanceId | None = None
    load_factor: float | None = None  # bounded load on ``RouteInput.loads`` (``placement.load_factor``)
    #: Cookie age that proves an anonymous session idle for ``placement.rebalance.idle_after`` (the
    #: cookie is re-issued every ``revalidate_after`` while active, so: idle_after + revalidate_after);
    #: None: rebalance is off.
    rebalance_idle: float | None = None


@dataclass(frozen=True, slots=True)
class Route:
    """Serve on ``instance``. ``set_cookie``: send a fresh affinity cookie. ``conflict``: cookie and pin
    disagreed (count it). ``touch``: slide the stored pin's expiry. ``orphan``: the dead/gone instance
    the cookie or pin named (for logs).
    """

    instance: InstanceId
    reason: DecisionReason
    repin_reason: RepinReason | None = None
    set_cookie: bool = False
    store_op: StoreOp | None = None
    conflict: bool = False
    touch: bool = False
    orphan: InstanceId | None = None
    #: A new placement: ring, overflow or local (``affinity_placements_total``); a label, not part of equality.
    how: PlacementHow | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class NeedPin:
    """Look up the stored pin for ``user_key`` and call ``decide`` again with the answer."""

    user_key: str


@dataclass(frozen=True, slots=True)
class Refuse:
    """No routable instance: answer 503."""

    reason: str = "no_routable_instance"


Decision = Route | NeedPin | Refuse


@dataclass(frozen=True, slots=True)
class _Orphan:
    """A cookie that could not be honoured: the instance it named (None for an invalid cookie) and why."""

    instance: InstanceId | None
    reason: RepinReason


def decide(inp: RouteInput, view: MembershipView, policy: DecidePolicy) -> Decision:
    """The routing decision for one request, in the contract's order: force, cookie, pin, hash.

    Pure and cheap: dict look-ups plus at most one ring walk (O(log n) bisect, O(n) only when
    walking past excluded instances). Never raises for any input. A ``Route`` always names an
    instance that is routable in ``view`` and not in ``inp.avoid``. Returns ``NeedPin`` only while
    ``inp.pin_looked_up`` is False.
    """
    forced = _force(inp, view)
    if forced is not None:
        return forced
    user_key = inp.user_key or None
    cookie = _usable_cookie(inp.cookie, user_key, inp.user_digest)
    orphan: _Orphan | None = None
    if cookie is not None:
        if _live(inp, view, cookie.instance):
            return _from_cookie(inp, view, policy, cookie, user_key)
        orphan = _Orphan(cookie.instance, _orphan_reason(inp, view, cookie.instance))
    elif inp.cookie_problem is not None:
        orphan = _Orphan(None, RepinReason.INVALID_COOKIE)
    if user_key is None:
        return _anonymous(inp, view, policy, orphan)
    return _from_pin(inp, view, policy, user_key, orphan)


def hash_choice(inp: RouteInput, view: MembershipView, exclude: frozenset[str] = frozenset()) -> InstanceId | None:
    """What step 4 picks: the ring's instance for the user key (or the anonymous key), skipping
    ``exclude`` and ``inp.avoid``. Up instances only while any is left (``MembershipView.choose_new``).
    """
    skip = frozenset(exclude).union(inp.avoid) if inp.avoid else exclude
    return view.choose_new(inp.user_key or inp.anonymous_key, skip)


def _live(inp: RouteInput, view: MembershipView, instance: str) -> bool:
    return instance not in inp.avoid and view.is_routable(instance)


def _orphan_reason(inp: RouteInput, view: MembershipView, instance: InstanceId) -> RepinReason:
    if instance in inp.avoid:
        return inp.avoid[instance]
    return RepinReason.GONE if view.state_of(instance) is InstanceState.GONE else RepinReason.DEAD


def _force(inp: RouteInput, view: MembershipView) -> Route | None:
    raw = inp.force_instance
    if isinstance(raw, str) and is_valid_instance_id(raw) and _live(inp, view, raw):
        return Route(InstanceId(raw), DecisionReason.FORCE)
    return None


def _usable_cookie(cookie: AffinityCookie | None, user_key: str | None, user_digest: str) -> AffinityCookie | None:
    """The cookie, unless it was issued for another user key (then it is ignored entirely)."""
    if cookie is None or cookie.user_digest == "" or user_key is None or cookie.user_digest == user_digest:
        return cookie
    return None


def _from_cookie(
    inp: RouteInput, view: MembershipView, policy: DecidePolicy, cookie: AffinityCookie, user_key: str | None
) -> Decision:
    """Step 2a: the cookie names a live instance."""
    here = cookie.instance
    stale = inp.now - cookie.issued_at >= policy.revalidate_after
    if user_key is None:
        moved = _rebalanced(inp, view, policy, cookie)
        return moved if moved is not None else Route(here, DecisionReason.COOKIE, set_cookie=stale)
    if cookie.user_digest == inp.user_digest and not stale:
        return Route(here, DecisionReason.COOKIE)
    if not inp.pin_looked_up:
        return NeedPin(user_key)
    stored = inp.stored_pin
    if not inp.store_ok:
        return Route(here, DecisionReason.COOKIE)
    if stored is None:
        return Route(here, DecisionReason.COOKIE, set_cookie=True, store_op=ClaimPin(user_key, here))
    if stored == here:
        return Route(here, DecisionReason.COOKIE, set_cookie=True, touch=True)
    if _live(inp, view, stored):
        return Route(stored, DecisionReason.PIN, set_cookie=True, conflict=True, touch=True)
    return Route(here, DecisionReason.COOKIE, set_cookie=True, store_op=RepinPin(user_key, stored, here))


def may_rebalance(inp: RouteInput, view: MembershipView, policy: DecidePolicy, cookie: AffinityCookie) -> bool:
    """An anonymous session on ``cookie`` may move now (before the caller spends a move of its
    budget on it): rebalance on, the cookie old enough to prove the session idle, its instance over
    its share of ``inp.loads``."""
    return (policy.rebalance_idle is not None and inp.loads is not None and cookie.user_digest == ""
            and inp.now - cookie.issued_at >= policy.rebalance_idle and over_share(view, inp.loads, cookie.instance))


def _rebalanced(inp: RouteInput, view: MembershipView, policy: DecidePolicy, cookie: AffinityCookie) -> Route | None:
    """Step 2a for an idle anonymous session whose instance is over its share, when the caller holds
    a move: a new instance within its share (bounded load at factor 1), re-pin reason ``rebalance``."""
    if not inp.may_rebalance or not may_rebalance(inp, view, policy, cookie):
        return None
    target = rebalance_target(inp, view, cookie)
    if target is None:
        return None
    return Route(target, DecisionReason.REPIN, RepinReason.REBALANCE, set_cookie=True, orphan=cookie.instance)


def rebalance_target(inp: RouteInput, view: MembershipView, cookie: AffinityCookie) -> InstanceId | None:
    """Where an idle anonymous session on ``cookie`` moves: the ring walk of ``inp.anonymous_key``
    to the first other instance within its share of ``inp.loads`` (bounded load at factor 1)."""
    if inp.loads is None:
        return None
    skip = frozenset({cookie.instance}).union(inp.avoid)
    placed = place(view, inp.anonymous_key or f"{cookie.instance}~{cookie.issued_at}", inp.loads, 1, skip)
    return placed.instance if placed is not None else None


def _from_pin(
    inp: RouteInput, view: MembershipView, policy: DecidePolicy, user_key: str, orphan: _Orphan | None
) -> Decision:
    """Steps 3-4 for a keyed request without a usable live cookie."""
    if not inp.pin_looked_up:
        return NeedPin(user_key)
    exclude = _exclude(orphan)
    orphan_id = orphan.instance if orphan else None
    stored = inp.stored_pin
    if not inp.store_ok:
        return _hashed(inp, view, None, exclude, orphan, DecisionReason.HASH)
    if stored is not None and _live(inp, view, stored):
        # Another node already moved the user: no repin is counted, the orphan is kept for logs.
        return Route(stored, DecisionReason.PIN, set_cookie=True, touch=True, orphan=orphan_id)
    if stored is not None:
        chosen, _, how = _place(inp, view, policy, exclude | {stored}, DecisionReason.HASH)
        if chosen is None:
            return Refuse()
        why = orphan.reason if orphan and orphan.instance is not None else _orphan_reason(inp, view, stored)
        op = RepinPin(user_key, stored, chosen)
        return Route(chosen, DecisionReason.REPIN, why, set_cookie=True, store_op=op, orphan=stored, how=how)
    chosen, reason, how = _place(inp, view, policy, exclude, DecisionReason.HASH)
    if chosen is None:
        return Refuse()
    op = ClaimPin(user_key, chosen)
    if orphan is None:
        return Route(chosen, reason, set_cookie=True, store_op=op, how=how)
    return Route(chosen, DecisionReason.REPIN, orphan.reason, set_cookie=True, store_op=op, orphan=orphan_id,
                 how=how)


def _anonymous(inp: RouteInput, view: MembershipView, policy: DecidePolicy, orphan: _Orphan | None) -> Decision:
    """Step 5: no user key and no usable live cookie: a new session (local placement, or a hash of
    the fresh session id)."""
    return _hashed(inp, view, policy, _exclude(orphan), orphan, DecisionReason.NEW)


def _hashed(
    inp: RouteInput, view: MembershipView, policy: DecidePolicy | None, exclude: frozenset[str],
    orphan: _Orphan | None, reason: DecisionReason,
) -> Decision:
    """A new placement with no store write (an anonymous session; with ``policy`` None, the store
    is down and only the ring, which every node agrees on, may place a keyed user)."""
    if policy is None:
        chosen, how = hash_choice(inp, view, exclude), PlacementHow.RING
    else:
        chosen, reason, how = _place(inp, view, policy, exclude, reason)
    if chosen is None:
        return Refuse()
    if orphan is None:
        return Route(chosen, reason, set_cookie=True, how=how)
    return Route(chosen, DecisionReason.REPIN, orphan.reason, set_cookie=True, orphan=orphan.instance, how=how)


def local_placement(inp: RouteInput, view: MembershipView, policy: DecidePolicy,
                    exclude: frozenset[str] = frozenset()) -> InstanceId | None:
    """The local instance when placement is ``local`` and it may take a new user now (``up``, not
    excluded, not avoided), else None."""
    local = policy.local_instance
    if local is None or local in exclude or local in inp.avoid:
        return None
    return local if view.state_of(local).accepts_new else None


def _place(
    inp: RouteInput, view: MembershipView, policy: DecidePolicy, exclude: frozenset[str], reason: DecisionReason
) -> tuple[InstanceId | None, DecisionReason, PlacementHow]:
    """Where a new session or a re-pin goes: the local instance (reason ``local``) when local
    placement allows it, else the ring's choice (``reason``), bounded by ``policy.load_factor`` on
    ``inp.loads`` when both are set (``routing.placement.place``: how ``ring`` or ``overflow``)."""
    local = local_placement(inp, view, policy, exclude)
    if local is not None:
        return local, DecisionReason.LOCAL, PlacementHow.LOCAL
    if policy.load_factor is None or inp.loads is None:
        return hash_choice(inp, view, exclude), reason, PlacementHow.RING
    skip = frozenset(exclude).union(inp.avoid) if inp.avoid else exclude
    placed = place(view, inp.user_key or inp.anonymous_key, inp.loads, policy.load_factor, skip)
    if placed is None:
        return None, reason, PlacementHow.RING
    return placed.instance, reason, placed.how


def _exclude(orphan: _Orphan | None) -> frozenset[str]:
    return frozenset({orphan.instance}) if orphan is not None and orphan.instance is not None else frozenset()
