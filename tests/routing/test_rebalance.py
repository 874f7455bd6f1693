"""Rebalance planner (issue #14): idle users only, within budget, targets stay within their share."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from affinity_proxy.routing.model import Instance, InstanceId, InstanceState, MembershipView
from affinity_proxy.routing.placement import capacity
from affinity_proxy.routing.rebalance import Move, plan_rebalance

NAMES = [f"i{n}" for n in range(6)]
NOW = 10_000.0
IDLE_AFTER = 600.0


def view_of(weights: dict[str, int], states: dict[str, InstanceState] | None = None) -> MembershipView:
    states = states or {}
    return MembershipView.build(
        Instance(InstanceId(n), f"http://{n}", w, states.get(n, InstanceState.UP)) for n, w in sorted(weights.items())
    )


@st.composite
def clusters(draw: st.DrawFn) -> tuple[MembershipView, dict[str, list[tuple[str, float]]]]:
    weights = draw(st.dictionaries(st.sampled_from(NAMES), st.integers(1, 3), min_size=1, max_size=6))
    states = {n: draw(st.sampled_from([InstanceState.UP] * 3 + list(InstanceState))) for n in weights}
    pins: dict[str, list[tuple[str, float]]] = {}
    user = 0
    for name in sorted(weights):
        for _ in range(draw(st.integers(0, 40))):
            pins.setdefault(name, []).append((f"u{user}", NOW - draw(st.sampled_from([0.0, 5.0, 599.0, 600.0, 9e3]))))
            user += 1
    return view_of(weights, states), pins


def loads_of(pins: dict[str, list[tuple[str, float]]]) -> dict[str, int]:
    return {n: len(p) for n, p in pins.items()}


@settings(max_examples=400, deadline=None)
@given(clusters(), st.integers(0, 60), st.sampled_from([0.0, 0.05, 0.2]))
def test_moves_only_idle_users_within_budget_to_targets_within_their_share(cluster, budget, tol) -> None:
    view, pins = cluster
    loads = loads_of(pins)
    moves = plan_rebalance(view, pins, loads, NOW, IDLE_AFTER, budget, tol)
    assert len(moves) <= budget
    where = {u: (n, t) for n, ps in pins.items() for u, t in ps}
    assert len({m.user_key for m in moves}) == len(moves)  # nobody moves twice
    ring = view.ring if len(view.ring) else view.fallback_ring
    for m in moves:
        source, last_active = where[m.user_key]
        assert m.source == source and m.target != source
        assert NOW - last_active >= IDLE_AFTER  # never an active user
        assert m.target in ring.weights  # only onto instances that take new users
        src_state = view.state_of(source)
        assert source in ring.weights or src_state is InstanceState.DRAINING  # never from down/gone
    after = Counter(loads)
    for m in moves:
        after[m.source] -= 1
        after[m.target] += 1
    total = sum(after[n] for n in ring.weights)
    total_w = sum(ring.weights.values())
    for target in {m.target for m in moves}:
        assert after[target] <= capacity(total, ring.weights[target], total_w, 1)  # within its share
    for source in {m.source for m in moves} & set(ring.weights):
        assert after[source] >= capacity(total, ring.weights[source], total_w, 1)  # never below its share


@settings(max_examples=200, deadline=None)
@given(clusters())
def test_unlimited_budget_and_all_idle_bring_every_instance_within_its_share(cluster) -> None:
    view, pins = cluster
    idle = {n: [(u, 0.0) for u, _ in ps] for n, ps in pins.items()}
    loads = loads_of(idle)
    moves = plan_rebalance(view, idle, loads, NOW, IDLE_AFTER, 10**6, 0.0)
    after = Counter(loads)
    for m in moves:
        after[m.source] -= 1
        after[m.target] += 1
    ring = view.ring if len(view.ring) else view.fallback_ring
    total = sum(after[n] for n in ring.weights)
    for n, w in ring.weights.items():
        assert after[n] <= capacity(total, w, sum(ring.weights.values()), 1)
    for inst in view.instances:
        if inst.state is InstanceState.DRAINING and inst.id not in ring.weights:
            assert after[inst.id] == 0


def test_balanced_cluster_plans_nothing() -> None:
    view = view_of({"a": 1, "b": 2})
    pins = {"a": [(f"a{n}", 0.0) for n in range(10)], "b": [(f"b{n}", 0.0) for n in range(20)]}
    assert plan_rebalance(view, pins, loads_of(pins), NOW, IDLE_AFTER, 100) == []


def test_scale_up_moves_idle_users_to_the_new_instance_and_leaves_active_ones() -> None:
    view = view_of({"a": 1, "b": 1, "c": 1, "d": 1})
    pins = {n: [(f"{n}{k}", 0.0 if k % 10 else NOW) for k in range(30)] for n in "abc"}
    moves = plan_rebalance(view, pins, loads_of(pins), NOW, IDLE_AFTER, 1000)
    # 90 sessions on 4 equal instances: share ceil(22.5) = 23, so a, b and c give up 7 each, all to d.
    assert Counter(m.target for m in moves) == {"d": 21}
    assert Counter(m.source for m in moves) == {"a": 7, "b": 7, "c": 7}
    assert all(m.user_key[1:] not in {"0", "10", "20"} for m in moves)  # the active ones stay


def test_budget_is_respected_and_draining_empties_first() -> None:
    view = view_of({"a": 1, "b": 1, "c": 1}, {"c": InstanceState.DRAINING})
    pins = {"a": [(f"a{k}", 0.0) for k in range(50)], "c": [(f"c{k}", 0.0) for k in range(5)]}
    moves = plan_rebalance(view, pins, loads_of(pins), NOW, IDLE_AFTER, 7)
    assert len(moves) == 7
    assert [m.source for m in moves[:5]] == ["c"] * 5
    assert plan_rebalance(view, pins, loads_of(pins), NOW, IDLE_AFTER, 0) == []


def test_down_and_gone_instances_are_left_to_decide() -> None:
    view = view_of({"a": 1, "b": 1, "c": 1}, {"c": InstanceState.DOWN})
    pins = {"c": [(f"c{k}", 0.0) for k in range(20)], "zz": [("lost", 0.0)]}
    assert plan_rebalance(view, pins, {"c": 20, "zz": 1}, NOW, IDLE_AFTER, 100) == []


def test_a_future_last_active_counts_as_active() -> None:
    view = view_of({"a": 1, "b": 1})
    pins = {"a": [("u", NOW + 50.0)] + [(f"x{k}", NOW) for k in range(9)]}
    moves = plan_rebalance(view, pins, {"a": 10}, NOW, 0.0, 100)
    assert len(moves) == 5 and all(isinstance(m, Move) and m.target == "b" for m in moves)
    assert "u" not in {m.user_key for m in moves}


@pytest.mark.parametrize(
    ("idle_after", "budget", "tol", "now"),
    [(-1.0, 1, 0.0, NOW), (1.0, -1, 0.0, NOW), (1.0, 1.5, 0.0, NOW), (1.0, True, 0.0, NOW), (1.0, 1, -0.1, NOW),
     (1.0, 1, float("nan"), NOW), (1.0, 1, 0.0, float("nan"))],
)  # fmt: skip
def test_bad_arguments_are_refused(idle_after: float, budget: int, tol: float, now: float) -> None:
    with pytest.raises(ValueError):
        plan_rebalance(view_of({"a": 1}), {}, {}, now, idle_after, budget, tol)


def test_negative_load_is_refused() -> None:
    with pytest.raises(ValueError, match="negative"):
        plan_rebalance(view_of({"a": 1}), {}, {"a": -3}, NOW, 1.0, 5)
