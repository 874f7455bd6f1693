"""HashRing: weights, determinism, minimal movement on scale-up, exclusion walks, ketama compatibility."""

from __future__ import annotations

from collections import Counter

import pytest
import uhashring

from affinity_proxy.routing.ring import HashRing

KEYS = [f"user-{i}" for i in range(20_000)]


def shares(ring: HashRing, keys: list[str] = KEYS) -> dict[str, float]:
    counts = Counter(ring.choose(k) for k in keys)
    return {node: counts[node] / len(keys) for node in sorted(counts)}


@pytest.mark.parametrize(
    "weights",
    [{"a": 1, "b": 1, "c": 1}, {"a": 1, "b": 2, "c": 1}, {"a": 1, "b": 3}, {"a": 5, "b": 1, "c": 2, "d": 2}],
)
def test_weights_are_honoured(weights: dict[str, int]) -> None:
    got = shares(HashRing(weights))
    total = sum(weights.values())
    expected = {node: w / total for node, w in sorted(weights.items())}
    report = ", ".join(f"{n}: {got.get(n, 0):.3f} (want {expected[n]:.3f})" for n in expected)
    print(f"distribution over {len(KEYS)} keys: {report}")
    for node, share in expected.items():
        assert abs(got.get(node, 0.0) - share) < 0.06, report


def test_deterministic_across_rebuilds_and_insertion_order() -> None:
    one = HashRing({"a": 1, "b": 2, "c": 3})
    two = HashRing({"c": 3, "a": 1, "b": 2})
    assert [one.choose(k) for k in KEYS[:2000]] == [two.choose(k) for k in KEYS[:2000]]
    assert one.preference("x") == two.preference("x")


def test_adding_a_fourth_instance_moves_about_a_quarter_and_only_to_it() -> None:
    three = HashRing({"a": 1, "b": 1, "c": 1})
    four = HashRing({"a": 1, "b": 1, "c": 1, "d": 1})
    moved = [(k, three.choose(k), four.choose(k)) for k in KEYS if three.choose(k) != four.choose(k)]
    fraction = len(moved) / len(KEYS)
    print(f"adding a 4th instance moved {fraction:.3f} of keys")
    assert 0.15 <= fraction <= 0.35
    assert {new for _, _, new in moved} == {"d"}


def test_removing_an_instance_moves_only_its_keys() -> None:
    four = HashRing({"a": 1, "b": 1, "c": 1, "d": 1})
    three = HashRing({"a": 1, "b": 1, "c": 1})
    for key in KEYS[:3000]:
        if four.choose(key) != "d":
            assert three.choose(key) == four.choose(key)


def test_exclusion_walks_the_ring_in_preference_order() -> None:
    ring = HashRing({"a": 1, "b": 1, "c": 1, "d": 1})
    for key in KEYS[:500]:
        order = ring.preference(key)
        assert sorted(order) == ["a", "b", "c", "d"]
        assert ring.choose(key) == order[0]
        assert ring.choose(key, {order[0]}) == order[1]
        assert ring.choose(key, {order[0], order[1]}) == order[2]
        assert ring.choose(key, set(order[:3])) == order[3]
        assert ring.choose(key, set(order)) is None
        assert ring.choose(key, {"not-a-member"}) == order[0]


def test_exclusion_matches_the_ring_without_the_instance() -> None:
    full = HashRing({"a": 1, "b": 1, "c": 1})
    without_b = HashRing({"a": 1, "c": 1})
    for key in KEYS[:2000]:
        assert full.choose(key, {"b"}) == without_b.choose(key)


def test_empty_ring_chooses_none() -> None:
    ring = HashRing({})
    assert len(ring) == 0
    assert ring.choose("anyone") is None
    assert ring.choose("anyone", {"a"}) is None
    assert ring.preference("anyone") == []


def test_zero_weight_instances_are_left_out() -> None:
    ring = HashRing({"a": 0, "b": 1})
    assert len(ring) == 1
    assert {ring.choose(k) for k in KEYS[:200]} == {"b"}
    assert HashRing({"a": 0}).choose("x") is None


@pytest.mark.parametrize(
    "weights", [{"a": 1, "b": 1, "c": 1}, {"i-1": 3, "i-2": 1}, {"machine.one": 2, "m_2": 1, "m-3": 4, "x": 1}]
)
def test_ketama_compatible_with_uhashring(weights: dict[str, int]) -> None:
    ours = HashRing(weights)
    reference = uhashring.HashRing({n: {"weight": w} for n, w in weights.items()}, hash_fn="ketama")
    for key in KEYS[:3000]:
        assert ours.choose(key) == reference.get_node(key)


@pytest.mark.parametrize(
    "weights", [{"a": 1, "b": 1, "c": 1}, {"i-1": 3, "i-2": 1}, {"machine.one": 2, "m_2": 1, "m-3": 4, "x": 1}]
)
def test_walks_follow_uhashring_iterate_nodes(weights: dict[str, int]) -> None:
    """The look-ups run over a copy of uhashring's continuum: a walk from a key visits the instances
    in the order uhashring's ``iterate_nodes(key, distinct=True)`` does, and ``choose`` past an
    excluded set takes the first of that walk not excluded."""
    ours = HashRing(weights)
    reference = uhashring.HashRing({n: {"weight": w} for n, w in weights.items()}, hash_fn="ketama")
    for key in KEYS[:1000]:
        expected = list(reference.iterate_nodes(key, distinct=True))
        assert list(ours.walk(key)) == expected == ours.preference(key)
        assert ours.choose(key, exclude=expected[:1]) == (expected[1] if len(expected) > 1 else None)
        assert ours.choose(key, exclude=set(expected)) is None
