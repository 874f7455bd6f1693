"""Bounded-load placement (issue #14): the bound holds, plain ring choice when balanced, exclusions, states."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from affinity_proxy.routing.model import Instance, InstanceId, InstanceState, MembershipView
from affinity_proxy.routing.placement import (
    Placement,
    PlacementHow,
    capacity,
    load_factor_fraction,
    place,
)

NAMES = [f"i{n}" for n in range(8)]


def view_of(weights: dict[str, int], states: dict[str, InstanceState] | None = None) -> MembershipView:
    states = states or {}
    return MembershipView.build(
        Instance(InstanceId(n), f"http://{n}", w, states.get(n, InstanceState.UP)) for n, w in sorted(weights.items())
    )


clusters = st.dictionaries(st.sampled_from(NAMES), st.integers(1, 4), min_size=1, max_size=8)
factors = st.sampled_from([1.0, 1.1, 1.25, 1.5, 2.0, 3.0])
keys = st.text(min_size=0, max_size=12)


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[MembershipView, dict[str, int], frozenset[str]]:
    weights = draw(clusters)
    names = sorted(weights)
    states = {n: draw(st.sampled_from(list(InstanceState))) for n in names}
    loads = {n: draw(st.integers(0, 200)) for n in names}
    exclude = frozenset(draw(st.lists(st.sampled_from(names), max_size=len(names))))
    return view_of(weights, states), loads, exclude


def bound_holds(view: MembershipView, loads: dict[str, int], exclude: frozenset[str], chosen: str, lf: float) -> bool:
    ring = view.ring if any(n not in exclude for n in view.ring.weights) else view.fallback_ring
    cands = {n: w for n, w in ring.weights.items() if n not in exclude}
    total_after = sum(loads.get(n, 0) for n in cands) + 1
    bound = Fraction(lf) * total_after * cands[chosen] / sum(cands.values())
    return loads.get(chosen, 0) + 1 <= math.ceil(bound)


@settings(max_examples=400, deadline=None)
@given(scenarios(), keys, factors)
def test_never_exceeds_the_bound_and_respects_exclusions_and_states(scenario, key, lf) -> None:
    view, loads, exclude = scenario
    got = place(view, key, loads, lf, exclude)
    plain = view.choose_new(key, set(exclude))
    if plain is None:
        assert got is None  # nothing routable outside the exclusions
        return
    assert got is not None
    assert got.instance not in exclude
    state = view.state_of(got.instance)
    assert state.routable
    if any(i.state is InstanceState.UP and i.id not in exclude for i in view.instances):
        assert state is InstanceState.UP  # draining/stopped only when no up instance is left
    assert bound_holds(view, loads, exclude, got.instance, lf)
    assert got.how is (PlacementHow.RING if got.instance == plain else PlacementHow.OVERFLOW)


@settings(max_examples=300, deadline=None)
@given(clusters, keys, st.integers(0, 50), factors)
def test_equals_the_plain_ring_choice_when_loads_follow_the_weights(weights, key, per_weight, lf) -> None:
    view = view_of(weights)
    loads = {n: per_weight * w for n, w in weights.items()}
    assert place(view, key, loads, lf) == Placement(view.choose_new(key), PlacementHow.RING)
    assert place(view, key, {}, lf) == Placement(view.choose_new(key), PlacementHow.RING)


@settings(max_examples=200, deadline=None)
@given(scenarios(), keys, st.sampled_from([0, 0.0, None]))
def test_disabled_bound_is_the_plain_ring_choice(scenario, key, off) -> None:
    view, loads, exclude = scenario
    got = place(view, key, loads, off, exclude)
    plain = view.choose_new(key, set(exclude))
    assert (got.instance if got else None) == plain
    assert got is None or got.how is PlacementHow.RING


def test_overloaded_ring_choice_overflows_to_the_next_instance_in_ring_order() -> None:
    view = view_of({"a": 1, "b": 1, "c": 1})
    key = "user-42"
    order = view.ring.preference(key)
    loads = {order[0]: 100, order[1]: 0, order[2]: 0}
    assert place(view, key, loads) == Placement(InstanceId(order[1]), PlacementHow.OVERFLOW)
    loads = {order[0]: 100, order[1]: 100, order[2]: 0}
    assert place(view, key, loads) == Placement(InstanceId(order[2]), PlacementHow.OVERFLOW)


def test_weights_raise_the_capacity() -> None:
    # b has weight 3: 60 of 100 sessions is under 1.25 x 3/4 of 101 (= 94.7 -> 95) so b keeps taking them.
    view = view_of({"a": 1, "b": 3})
    key = next(k for k in (f"u{n}" for n in range(1000)) if view.ring.choose(k) == "b")
    assert place(view, key, {"a": 40, "b": 60}).instance == "b"
    assert place(view, key, {"a": 5, "b": 95}).instance == "a"


def test_deterministic() -> None:
    view = view_of({n: 1 + i % 3 for i, n in enumerate(NAMES)})
    loads = {n: 10 * i for i, n in enumerate(NAMES)}
    first = [place(view, f"k{n}", loads) for n in range(500)]
    assert first == [place(view_of({n: 1 + i % 3 for i, n in enumerate(NAMES)}), f"k{n}", loads) for n in range(500)]


def test_empty_view_and_everything_excluded_place_nowhere() -> None:
    assert place(MembershipView.build([]), "k", {}) is None
    view = view_of({"a": 1, "b": 1})
    assert place(view, "k", {}, exclude={"a", "b"}) is None
    down = view_of({"a": 1}, {"a": InstanceState.DOWN})
    assert place(down, "k", {}) is None


def test_draining_instances_are_used_only_when_no_instance_is_up() -> None:
    view = view_of({"a": 1, "b": 1}, {"a": InstanceState.DRAINING})
    assert all(place(view, f"k{n}", {"b": 10_000}).instance == "b" for n in range(100))
    all_draining = view_of({"a": 1, "b": 1}, {"a": InstanceState.DRAINING, "b": InstanceState.DRAINING})
    assert place(all_draining, "k", {}).instance in {"a", "b"}


@pytest.mark.parametrize("bad", [0.5, 0.99, -1, float("nan"), float("inf"), "1.25", True])
def test_bad_load_factor_is_refused(bad: object) -> None:
    with pytest.raises(ValueError):
        place(view_of({"a": 1}), "k", {}, bad)  # type: ignore[arg-type]


def test_negative_load_is_refused() -> None:
    with pytest.raises(ValueError, match="negative"):
        place(view_of({"a": 1, "b": 1}), "k", {"a": -1})


def test_load_factor_fraction_is_exact() -> None:
    assert load_factor_fraction(1.25) == Fraction(5, 4)
    assert load_factor_fraction(None) is None and load_factor_fraction(0) is None
    assert capacity(10, 1, 4, Fraction(5, 4)) == 4  # ceil(3.125)
    assert capacity(8, 1, 4, Fraction(1)) == 2
