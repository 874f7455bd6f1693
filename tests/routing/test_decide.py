"""decide(): an exhaustive table over every branch of the contract's routing decision, plus
hypothesis properties (never raises, only live instances, no draining hash choice while an up
instance exists, one store lookup is always enough)."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from affinity_proxy.routing.cookie import AffinityCookie, CookieProblem
from affinity_proxy.routing.decide import (
    ClaimPin,
    DecidePolicy,
    DecisionReason,
    NeedPin,
    Refuse,
    RepinPin,
    RepinReason,
    Route,
    RouteInput,
    decide,
    hash_choice,
)
from affinity_proxy.routing.model import Instance, InstanceId, InstanceState, MembershipView

I = InstanceId  # noqa: E741
NOW = 10_000.0
POLICY = DecidePolicy(revalidate_after=60.0)
KEY = "alice"
UD = "aliceDigest0"  # the request's user digest
OTHER = "bobDigest000"  # a cookie issued to another user key
R, F, C, P, H, N = (DecisionReason.REPIN, DecisionReason.FORCE, DecisionReason.COOKIE, DecisionReason.PIN,
                    DecisionReason.HASH, DecisionReason.NEW)  # fmt: skip

# One up instance, so every hash choice is exactly "up1" (or nothing when up1 is excluded).
VIEW = MembershipView.build(
    [
        Instance(I("up1")),
        Instance(I("drain"), state=InstanceState.DRAINING),
        Instance(I("down"), state=InstanceState.DOWN),
        Instance(I("gone"), state=InstanceState.GONE),
        Instance(I("stop"), state=InstanceState.STOPPED),
    ]
)
# Two up instances, for exclusion: avoiding or orphaning up1 leaves up2.
DRAINING, DOWN = InstanceState.DRAINING, InstanceState.DOWN
VIEW2 = MembershipView.build([Instance(I("up1")), Instance(I("up2")), Instance(I("drain"), state=DRAINING)])
DRAIN_ONLY = MembershipView.build([Instance(I("drain"), state=DRAINING), Instance(I("down"), state=DOWN)])
EMPTY = MembershipView.build([])
VIEWS = {"view": VIEW, "view2": VIEW2, "drain_only": DRAIN_ONLY, "empty": EMPTY}


def ck(instance: str, age: float = 0, digest: str = "") -> AffinityCookie:
    return AffinityCookie(I(instance), int(NOW - age), digest)


def keyed(**kw) -> dict:
    return {"user_key": KEY, "user_digest": UD, **kw}


def looked(stored: str | None = None, ok: bool = True, **kw) -> dict:
    return keyed(pin_looked_up=True, stored_pin=I(stored) if stored else None, store_ok=ok, **kw)


STALE = 60  # age at which a keyed cookie must be revalidated
CASES: list = [
    # --- 1. force header ---------------------------------------------------------------------------
    ("force-up", "view", dict(force_instance="up1"), Route(I("up1"), F)),
    ("force-draining", "view", dict(force_instance="drain"), Route(I("drain"), F)),
    ("force-stopped", "view", dict(force_instance="stop"), Route(I("stop"), F)),
    ("force-keyed-skips-store", "view", keyed(force_instance="drain"), Route(I("drain"), F)),
    ("force-beats-cookie", "view", dict(force_instance="drain", cookie=ck("stop")), Route(I("drain"), F)),
    ("force-down-ignored", "view", dict(force_instance="down"), Route(I("up1"), N, set_cookie=True)),
    ("force-gone-ignored", "view", dict(force_instance="gone"), Route(I("up1"), N, set_cookie=True)),
    ("force-unknown-ignored", "view", dict(force_instance="nope"), Route(I("up1"), N, set_cookie=True)),
    ("force-invalid-ignored", "view", dict(force_instance="up1; x"), Route(I("up1"), N, set_cookie=True)),
    ("force-empty-ignored", "view", dict(force_instance=""), Route(I("up1"), N, set_cookie=True)),
    ("force-ignored-uses-cookie", "view", dict(force_instance="down", cookie=ck("stop")), Route(I("stop"), C)),
    ("force-avoided-ignored", "view2", dict(force_instance="up1", avoid={I("up1"): RepinReason.UNAVAILABLE}),
     Route(I("up2"), N, set_cookie=True)),
    ("force-avoided-nothing-left", "view", dict(force_instance="up1", avoid={I("up1"): RepinReason.UNAVAILABLE}),
     Refuse()),
    # --- 2. anonymous request with a cookie ----------------------------------------------------------
    ("anon-cookie-up", "view", dict(cookie=ck("up1")), Route(I("up1"), C)),
    ("anon-cookie-draining", "view", dict(cookie=ck("drain")), Route(I("drain"), C)),
    ("anon-cookie-stopped", "view", dict(cookie=ck("stop")), Route(I("stop"), C)),
    ("anon-cookie-just-fresh", "view", dict(cookie=ck("up1", age=STALE - 1)), Route(I("up1"), C)),
    ("anon-cookie-stale-refreshed", "view", dict(cookie=ck("up1", age=STALE)), Route(I("up1"), C, set_cookie=True)),
    ("anon-cookie-of-logged-out-user", "view", dict(cookie=ck("drain", digest=OTHER)), Route(I("drain"), C)),
    ("anon-cookie-down", "view", dict(cookie=ck("down")),
     Route(I("up1"), R, RepinReason.DEAD, set_cookie=True, orphan=I("down"))),
    ("anon-cookie-gone", "view", dict(cookie=ck("gone")),
     Route(I("up1"), R, RepinReason.GONE, set_cookie=True, orphan=I("gone"))),
    ("anon-cookie-unknown", "view", dict(cookie=ck("nope")),
     Route(I("up1"), R, RepinReason.GONE, set_cookie=True, orphan=I("nope"))),
    ("anon-cookie-avoided", "view2", dict(cookie=ck("up1"), avoid={I("up1"): RepinReason.UNAVAILABLE}),
     Route(I("up2"), R, RepinReason.UNAVAILABLE, set_cookie=True, orphan=I("up1"))),
    ("anon-cookie-draining-avoided", "view2", dict(cookie=ck("drain"), avoid={I("drain"): RepinReason.DRAINING}),
     Route(hash_choice(RouteInput(), VIEW2), R, RepinReason.DRAINING, set_cookie=True, orphan=I("drain"))),
    ("anon-cookie-down-nothing-left", "view", dict(cookie=ck("down"), avoid={I("up1"): RepinReason.OVERLOAD}),
     Refuse()),
    # --- 3. anonymous request with an invalid cookie --------------------------------------------------
    ("anon-problem", "view", dict(cookie_problem=CookieProblem.BAD_SIGNATURE),
     Route(I("up1"), R, RepinReason.INVALID_COOKIE, set_cookie=True)),
    ("anon-expired", "view", dict(cookie_problem=CookieProblem.EXPIRED),
     Route(I("up1"), R, RepinReason.INVALID_COOKIE, set_cookie=True)),
    ("anon-problem-empty", "empty", dict(cookie_problem=CookieProblem.MALFORMED), Refuse()),
    # --- 5. anonymous request without a cookie --------------------------------------------------------
    ("anon-new", "view", dict(), Route(I("up1"), N, set_cookie=True)),
    ("anon-empty-user-key-is-anonymous", "view", dict(user_key=""), Route(I("up1"), N, set_cookie=True)),
    ("anon-new-only-draining-left", "drain_only", dict(), Route(I("drain"), N, set_cookie=True)),
    ("anon-new-empty", "empty", dict(), Refuse()),
    ("anon-new-up-avoided", "view", dict(avoid={I("up1"): RepinReason.REPLAY_FAILED}), Refuse()),
    # --- 2a. keyed request, cookie for this user (or anonymous), instance live -----------------------
    ("key-cookie-fresh-hot-path", "view", keyed(cookie=ck("drain", digest=UD)), Route(I("drain"), C)),
    ("key-cookie-fresh-even-if-looked-up", "view", looked("up1", cookie=ck("drain", digest=UD)), Route(I("drain"), C)),
    ("key-cookie-stale-needs-pin", "view", keyed(cookie=ck("up1", age=STALE, digest=UD)), NeedPin(KEY)),
    ("key-anon-cookie-needs-pin", "view", keyed(cookie=ck("up1")), NeedPin(KEY)),
    ("key-cookie-store-down-kept", "view", looked(None, ok=False, cookie=ck("stop", age=STALE, digest=UD)),
     Route(I("stop"), C)),
    ("key-anon-cookie-store-down-kept", "view", looked(None, ok=False, cookie=ck("up1")), Route(I("up1"), C)),
    ("key-cookie-no-pin-claims", "view", looked(None, cookie=ck("stop", age=STALE, digest=UD)),
     Route(I("stop"), C, set_cookie=True, store_op=ClaimPin(KEY, I("stop")))),
    ("key-anon-cookie-no-pin-claims", "view", looked(None, cookie=ck("drain")),
     Route(I("drain"), C, set_cookie=True, store_op=ClaimPin(KEY, I("drain")))),
    ("key-cookie-pin-agrees", "view", looked("up1", cookie=ck("up1", age=STALE, digest=UD)),
     Route(I("up1"), C, set_cookie=True, touch=True)),
    ("key-cookie-pin-conflict-pin-wins", "view", looked("drain", cookie=ck("up1", age=STALE, digest=UD)),
     Route(I("drain"), P, set_cookie=True, conflict=True, touch=True)),
    ("key-anon-cookie-pin-conflict", "view", looked("stop", cookie=ck("up1")),
     Route(I("stop"), P, set_cookie=True, conflict=True, touch=True)),
    ("key-cookie-pin-dead-repinned-to-cookie", "view", looked("down", cookie=ck("up1", age=STALE, digest=UD)),
     Route(I("up1"), C, set_cookie=True, store_op=RepinPin(KEY, I("down"), I("up1")))),
    ("key-cookie-pin-gone-repinned-to-cookie", "view", looked("nope", cookie=ck("drain", age=STALE, digest=UD)),
     Route(I("drain"), C, set_cookie=True, store_op=RepinPin(KEY, I("nope"), I("drain")))),
    ("key-cookie-pin-avoided-repinned-to-cookie", "view2",
     looked("up1", cookie=ck("up2", age=STALE, digest=UD), avoid={I("up1"): RepinReason.UNAVAILABLE}),
     Route(I("up2"), C, set_cookie=True, store_op=RepinPin(KEY, I("up1"), I("up2")))),
    # --- cookie issued for another user key: ignored entirely ------------------------------------------
    ("key-other-cookie-needs-pin", "view", keyed(cookie=ck("up1", digest=OTHER)), NeedPin(KEY)),
    ("key-other-cookie-no-pin-hash", "view", looked(None, cookie=ck("drain", digest=OTHER)),
     Route(I("up1"), H, set_cookie=True, store_op=ClaimPin(KEY, I("up1")))),
    ("key-other-cookie-dead-is-no-orphan", "view", looked(None, cookie=ck("down", digest=OTHER)),
     Route(I("up1"), H, set_cookie=True, store_op=ClaimPin(KEY, I("up1")))),
    ("key-other-cookie-pin", "view", looked("stop", cookie=ck("up1", digest=OTHER)),
     Route(I("stop"), P, set_cookie=True, touch=True)),
    ("key-other-cookie-same-instance-rewritten", "view", looked("up1", cookie=ck("up1", digest=OTHER)),
     Route(I("up1"), P, set_cookie=True, touch=True)),
    ("key-other-cookie-store-down", "view", looked(None, ok=False, cookie=ck("drain", digest=OTHER)),
     Route(I("up1"), H, set_cookie=True)),
    # --- 2b + 4. keyed request, cookie names a dead instance -------------------------------------------
    ("key-cookie-dead-needs-pin", "view", keyed(cookie=ck("down", digest=UD)), NeedPin(KEY)),
    ("key-cookie-dead-store-down", "view", looked(None, ok=False, cookie=ck("down", digest=UD)),
     Route(I("up1"), R, RepinReason.DEAD, set_cookie=True, orphan=I("down"))),
    ("key-cookie-dead-pin-live", "view", looked("drain", cookie=ck("down", digest=UD)),
     Route(I("drain"), P, set_cookie=True, touch=True, orphan=I("down"))),
    ("key-cookie-dead-pin-dead", "view", looked("down", cookie=ck("down", digest=UD)),
     Route(I("up1"), R, RepinReason.DEAD, set_cookie=True, store_op=RepinPin(KEY, I("down"), I("up1")),
           orphan=I("down"))),
    ("key-cookie-gone-pin-dead-cookie-reason", "view", looked("down", cookie=ck("gone", digest=UD)),
     Route(I("up1"), R, RepinReason.GONE, set_cookie=True, store_op=RepinPin(KEY, I("down"), I("up1")),
           orphan=I("down"))),
    ("key-cookie-dead-no-pin", "view", looked(None, cookie=ck("down", digest=UD)),
     Route(I("up1"), R, RepinReason.DEAD, set_cookie=True, store_op=ClaimPin(KEY, I("up1")), orphan=I("down"))),
    ("key-anon-cookie-dead-no-pin", "view", looked(None, cookie=ck("gone")),
     Route(I("up1"), R, RepinReason.GONE, set_cookie=True, store_op=ClaimPin(KEY, I("up1")), orphan=I("gone"))),
    ("key-cookie-avoided-pin-same", "view2",
     looked("up1", cookie=ck("up1", digest=UD), avoid={I("up1"): RepinReason.REPLAY_FAILED}),
     Route(I("up2"), R, RepinReason.REPLAY_FAILED, set_cookie=True, store_op=RepinPin(KEY, I("up1"), I("up2")),
           orphan=I("up1"))),
    ("key-cookie-avoided-no-pin", "view2",
     looked(None, cookie=ck("up1", digest=UD), avoid={I("up1"): RepinReason.OVERLOAD}),
     Route(I("up2"), R, RepinReason.OVERLOAD, set_cookie=True, store_op=ClaimPin(KEY, I("up2")), orphan=I("up1"))),
    ("key-cookie-dead-nothing-left", "view",
     looked("down", cookie=ck("down", digest=UD), avoid={I("up1"): RepinReason.UNAVAILABLE}), Refuse()),
    # --- 3 + 4. keyed request with an invalid cookie ----------------------------------------------------
    ("key-problem-needs-pin", "view", keyed(cookie_problem=CookieProblem.MALFORMED), NeedPin(KEY)),
    ("key-problem-store-down", "view", looked(None, ok=False, cookie_problem=CookieProblem.BAD_SIGNATURE),
     Route(I("up1"), R, RepinReason.INVALID_COOKIE, set_cookie=True)),
    ("key-problem-pin-live", "view", looked("stop", cookie_problem=CookieProblem.EXPIRED),
     Route(I("stop"), P, set_cookie=True, touch=True)),
    ("key-problem-pin-dead", "view", looked("down", cookie_problem=CookieProblem.BAD_SIGNATURE),
     Route(I("up1"), R, RepinReason.DEAD, set_cookie=True, store_op=RepinPin(KEY, I("down"), I("up1")),
           orphan=I("down"))),
    ("key-problem-no-pin", "view", looked(None, cookie_problem=CookieProblem.UNKNOWN_VERSION),
     Route(I("up1"), R, RepinReason.INVALID_COOKIE, set_cookie=True, store_op=ClaimPin(KEY, I("up1")))),
    # --- 4. keyed request without a cookie ----------------------------------------------------------
    ("key-needs-pin", "view", keyed(), NeedPin(KEY)),
    ("key-store-down-hash", "view", looked(None, ok=False), Route(I("up1"), H, set_cookie=True)),
    ("key-store-down-ignores-pin-answer", "view", looked("drain", ok=False), Route(I("up1"), H, set_cookie=True)),
    ("key-store-down-empty", "empty", looked(None, ok=False), Refuse()),
    ("key-pin-up", "view", looked("up1"), Route(I("up1"), P, set_cookie=True, touch=True)),
    ("key-pin-draining", "view", looked("drain"), Route(I("drain"), P, set_cookie=True, touch=True)),
    ("key-pin-stopped", "view", looked("stop"), Route(I("stop"), P, set_cookie=True, touch=True)),
    ("key-pin-down", "view", looked("down"),
     Route(I("up1"), R, RepinReason.DEAD, set_cookie=True, store_op=RepinPin(KEY, I("down"), I("up1")),
           orphan=I("down"))),
    ("key-pin-gone", "view", looked("gone"),
     Route(I("up1"), R, RepinReason.GONE, set_cookie=True, store_op=RepinPin(KEY, I("gone"), I("up1")),
           orphan=I("gone"))),
    ("key-pin-unknown", "view", looked("nope"),
     Route(I("up1"), R, RepinReason.GONE, set_cookie=True, store_op=RepinPin(KEY, I("nope"), I("up1")),
           orphan=I("nope"))),
    ("key-pin-avoided", "view2", looked("up1", avoid={I("up1"): RepinReason.OPERATOR}),
     Route(I("up2"), R, RepinReason.OPERATOR, set_cookie=True, store_op=RepinPin(KEY, I("up1"), I("up2")),
           orphan=I("up1"))),
    ("key-pin-down-only-draining-left", "drain_only", looked("down"),
     Route(I("drain"), R, RepinReason.DEAD, set_cookie=True, store_op=RepinPin(KEY, I("down"), I("drain")),
           orphan=I("down"))),
    ("key-pin-down-nothing-left", "view", looked("down", avoid={I("up1"): RepinReason.UNAVAILABLE}), Refuse()),
    ("key-no-pin-hash-claims", "view", looked(None),
     Route(I("up1"), H, set_cookie=True, store_op=ClaimPin(KEY, I("up1")))),
    ("key-no-pin-empty", "empty", looked(None), Refuse()),
]  # fmt: skip


@pytest.mark.parametrize(("view_name", "fields", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_decision_table(view_name: str, fields: dict, expected: object) -> None:
    inp = RouteInput(now=NOW, anonymous_key="session-123", **fields)
    assert decide(inp, VIEWS[view_name], POLICY) == expected


def test_case_ids_are_unique() -> None:
    names = [c[0] for c in CASES]
    assert len(names) == len(set(names))


def test_hash_choice_follows_the_ring_and_skips_exclusions_and_avoided() -> None:
    view = MembershipView.build([Instance(I(f"i{n}")) for n in range(5)])
    for n in range(200):
        key = f"user-{n}"
        order = view.ring.preference(key)
        keyed_inp = RouteInput(user_key=key, anonymous_key="ignored")
        assert hash_choice(keyed_inp, view) == order[0]
        assert hash_choice(keyed_inp, view, frozenset({order[0]})) == order[1]
        avoiding = replace(keyed_inp, avoid={I(order[0]): RepinReason.UNAVAILABLE})
        assert hash_choice(avoiding, view, frozenset({order[1]})) == order[2]
        assert hash_choice(RouteInput(anonymous_key=key), view) == order[0]


def test_anonymous_sessions_spread_over_up_instances() -> None:
    view = MembershipView.build([Instance(I(f"i{n}")) for n in range(3)])
    chosen = {decide(RouteInput(anonymous_key=f"s{n}"), view, POLICY).instance for n in range(300)}
    assert chosen == {"i0", "i1", "i2"}


def test_a_revalidated_cookie_is_trusted_again_after_the_pin_check() -> None:
    """The loop the caller runs: stale cookie -> NeedPin -> pin agrees -> fresh cookie -> hot path."""
    stale = RouteInput(user_key=KEY, user_digest=UD, cookie=ck("up1", age=120, digest=UD), now=NOW)
    assert decide(stale, VIEW, POLICY) == NeedPin(KEY)
    checked = decide(replace(stale, pin_looked_up=True, stored_pin=I("up1")), VIEW, POLICY)
    assert checked == Route(I("up1"), C, set_cookie=True, touch=True)
    fresh = replace(stale, cookie=ck("up1", digest=UD))
    assert decide(fresh, VIEW, POLICY) == Route(I("up1"), C)


# --- properties -------------------------------------------------------------------------------------

IDS = ["a", "b", "c", "d", "e"]
STATES = list(InstanceState)


@st.composite
def memberships(draw) -> MembershipView:
    ids = draw(st.lists(st.sampled_from(IDS), unique=True, max_size=len(IDS)))
    return MembershipView.build(
        Instance(I(i), weight=draw(st.integers(1, 3)), state=draw(st.sampled_from(STATES))) for i in ids
    )


maybe_id = st.one_of(st.none(), st.sampled_from([*IDS, "zz"]).map(I))
digest_values = st.sampled_from(["", UD, OTHER])


@st.composite
def route_inputs(draw) -> RouteInput:
    now = draw(st.floats(min_value=0, max_value=1e6, allow_nan=False))
    cookie = draw(
        st.one_of(
            st.none(),
            st.builds(
                AffinityCookie,
                instance=st.sampled_from([*IDS, "zz"]).map(I),
                issued_at=st.integers(min_value=0, max_value=int(now) + 300),
                user_digest=digest_values,
            ),
        )
    )
    return RouteInput(
        user_key=draw(st.sampled_from([None, "", KEY, "bob"])),
        user_digest=draw(digest_values),
        cookie=cookie,
        cookie_problem=draw(st.one_of(st.none(), st.sampled_from(list(CookieProblem)))),
        force_instance=draw(st.one_of(st.none(), st.sampled_from([*IDS, "zz", "", "a b", "-a"]), st.text(max_size=8))),
        now=now,
        pin_looked_up=draw(st.booleans()),
        stored_pin=draw(maybe_id),
        store_ok=draw(st.booleans()),
        avoid=draw(st.dictionaries(st.sampled_from(IDS).map(I), st.sampled_from(list(RepinReason)), max_size=3)),
        anonymous_key=draw(st.text(max_size=12)),
    )


def check_route(decision: object, inp: RouteInput, view: MembershipView) -> None:
    assert isinstance(decision, (Route, NeedPin, Refuse))
    if not isinstance(decision, Route):
        return
    assert view.is_routable(decision.instance) and decision.instance not in inp.avoid
    if decision.reason in (DecisionReason.HASH, DecisionReason.NEW, DecisionReason.REPIN):
        if any(i.state is InstanceState.UP for i in view.instances):
            assert view.state_of(decision.instance) is InstanceState.UP
    assert (decision.repin_reason is not None) == (decision.reason is DecisionReason.REPIN)
    if decision.store_op is not None:
        assert decision.store_op.user_key == inp.user_key
        assert decision.store_op.instance == decision.instance
        if isinstance(decision.store_op, RepinPin):
            assert decision.store_op.expected == inp.stored_pin
    if decision.store_op is not None or decision.touch or decision.conflict:
        assert inp.user_key and inp.pin_looked_up and inp.store_ok
    if decision.reason is DecisionReason.FORCE:
        assert decision.instance == inp.force_instance


@settings(max_examples=600)
@given(view=memberships(), inp=route_inputs(), stored=maybe_id, store_ok=st.booleans())
def test_decide_properties(view: MembershipView, inp: RouteInput, stored, store_ok: bool) -> None:
    decision = decide(inp, view, POLICY)
    check_route(decision, inp, view)
    if isinstance(decision, NeedPin):
        assert not inp.pin_looked_up and inp.user_key and decision.user_key == inp.user_key
        answered = replace(inp, pin_looked_up=True, stored_pin=stored, store_ok=store_ok)
        again = decide(answered, view, POLICY)
        assert not isinstance(again, NeedPin)
        check_route(again, answered, view)
    assert decide(inp, view, POLICY) == decision  # deterministic for the same input


@given(view=memberships(), inp=route_inputs())
def test_refuse_only_when_no_instance_is_left(view: MembershipView, inp: RouteInput) -> None:
    if isinstance(decide(inp, view, POLICY), Refuse):
        usable = [i for i in view.instances if i.state.accepts_new and i.id not in inp.avoid]
        if not any(i.state.accepts_new for i in view.instances):
            usable = [i for i in view.instances if i.state.routable and i.id not in inp.avoid]
        assert usable == []  # exclusions only ever name instances that are not live anyway


# --- fly placement "local" ----------------------------------------------------------------------------

L = DecisionReason.LOCAL
LOCAL_VIEW = MembershipView.build([
    Instance(I("here")), Instance(I("up2")), Instance(I("drain"), state=DRAINING), Instance(I("down"), state=DOWN),
    Instance(I("stop"), state=InstanceState.STOPPED),
])  # fmt: skip
LOCAL = DecidePolicy(revalidate_after=60.0, local_instance=I("here"))
LOCAL_CASES: list = [
    # a new session stays where Fly's edge delivered it: no replay
    ("anon-new", {}, Route(I("here"), L, set_cookie=True)),
    ("key-no-pin", looked(None), Route(I("here"), L, set_cookie=True, store_op=ClaimPin(KEY, I("here")))),
    # an existing session is never moved by placement
    ("anon-cookie-elsewhere", dict(cookie=ck("up2")), Route(I("up2"), C)),
    ("key-pin-elsewhere", looked("up2"), Route(I("up2"), P, set_cookie=True, touch=True)),
    ("key-pin-stopped", looked("stop"), Route(I("stop"), P, set_cookie=True, touch=True)),
    ("force-elsewhere", dict(force_instance="up2"), Route(I("up2"), F)),
    # an orphan is re-pinned here too
    ("anon-cookie-dead", dict(cookie=ck("down")),
     Route(I("here"), R, RepinReason.DEAD, set_cookie=True, orphan=I("down"))),
    ("key-pin-dead", looked("down"),
     Route(I("here"), R, RepinReason.DEAD, set_cookie=True, store_op=RepinPin(KEY, I("down"), I("here")),
           orphan=I("down"))),
    ("anon-invalid-cookie", dict(cookie_problem=CookieProblem.BAD_SIGNATURE),
     Route(I("here"), R, RepinReason.INVALID_COOKIE, set_cookie=True)),
    # the store is down: only the ring, which every node agrees on, places a keyed user
    ("key-store-down", looked(None, ok=False), Route(I("up1x"), H, set_cookie=True)),
    # Fly said "not here" about this very Machine: the ring decides instead
    ("avoid-here", dict(avoid={I("here"): RepinReason.REPLAY_FAILED}), Route(I("up2"), N, set_cookie=True)),
]  # fmt: skip


@pytest.mark.parametrize(("fields", "expected"), [c[1:] for c in LOCAL_CASES], ids=[c[0] for c in LOCAL_CASES])
def test_local_placement_table(fields: dict, expected: Route) -> None:
    inp = RouteInput(now=NOW, anonymous_key="session-123", **fields)
    got = decide(inp, LOCAL_VIEW, LOCAL)
    if expected.instance == "up1x":  # the ring's choice, whichever it is
        assert isinstance(got, Route) and got.reason is H and got.instance in ("here", "up2")
        assert got.instance == hash_choice(inp, LOCAL_VIEW)
        return
    assert got == expected


@pytest.mark.parametrize("state", [InstanceState.DRAINING, InstanceState.DOWN, InstanceState.STOPPED])
def test_local_placement_only_while_the_local_instance_takes_new_users(state: InstanceState) -> None:
    view = LOCAL_VIEW.with_states({I("here"): state}, epoch=1)
    for n in range(50):
        got = decide(RouteInput(anonymous_key=f"s{n}"), view, LOCAL)
        assert isinstance(got, Route) and got.instance == "up2" and got.reason is N


def test_local_placement_with_an_unknown_local_instance_hashes() -> None:
    policy = DecidePolicy(local_instance=I("elsewhere"))
    got = {decide(RouteInput(anonymous_key=f"s{n}"), LOCAL_VIEW, policy).instance for n in range(200)}
    assert got == {"here", "up2"}


def test_three_hundred_new_sessions_stay_local() -> None:
    for local in ("here", "up2"):
        policy = DecidePolicy(local_instance=I(local))
        for n in range(300):
            got = decide(RouteInput(anonymous_key=f"s{n}"), LOCAL_VIEW, policy)
            assert got == Route(I(local), L, set_cookie=True)


@settings(max_examples=400)
@given(view=memberships(), inp=route_inputs(), stored=maybe_id, store_ok=st.booleans(),
       local=st.sampled_from([*IDS, "zz"]))
def test_local_placement_properties(view: MembershipView, inp: RouteInput, stored, store_ok: bool, local: str) -> None:
    policy = DecidePolicy(local_instance=I(local))
    decision = decide(inp, view, policy)
    if isinstance(decision, NeedPin):
        inp = replace(inp, pin_looked_up=True, stored_pin=stored, store_ok=store_ok)
        decision = decide(inp, view, policy)
    check_route(decision, inp, view)
    if isinstance(decision, Route) and decision.reason is L:
        assert decision.instance == local and view.state_of(local) is InstanceState.UP and local not in inp.avoid
    # placement never changes where an existing, live session goes
    hashed = decide(inp, view, POLICY)
    if isinstance(hashed, Route) and hashed.reason in (C, P, F):
        assert decision == hashed
