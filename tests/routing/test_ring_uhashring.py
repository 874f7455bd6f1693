"""HashRing's own look-ups answer what uhashring's do over the same continuum: ``choose`` is
``get_node``, ``preference`` is ``iterate_nodes(distinct=True)``, an exclusion walk its first
node not excluded; for random weights (some too small to get a point) and keys (unicode too)."""

from __future__ import annotations

import random

import pytest
import uhashring

from affinity_proxy.routing.ring import HashRing


@pytest.mark.parametrize("seed", range(12))
def test_lookups_are_uhashrings(seed: int) -> None:
    rng = random.Random(seed)
    names = rng.sample(["a", "b", "c", "i-1", "i-2", "m.one", "m_2", "x", "y", "z"], rng.randint(1, 8))
    weights = {name: rng.choice((1, 1, 2, 3, 5, 400)) for name in names}
    ours = HashRing(weights)
    reference = uhashring.HashRing({n: {"weight": w} for n, w in weights.items()}, hash_fn="ketama")
    for k in range(400):
        key = rng.choice((f"{rng.getrandbits(64):x}", f"user-{k}", f"é-{k}-ß"))
        order = list(reference.iterate_nodes(key, distinct=True))
        assert ours.choose(key) == reference.get_node(key) == order[0]
        assert ours.preference(key) == order
        assert ours.owner(ours.position(key)) == order[0]
        excluded = set(rng.sample(names, rng.randint(0, len(names))))
        assert ours.choose(key, excluded) == next((n for n in order if n not in excluded), None)


def test_heavy_weight_leaves_a_light_instance_without_points() -> None:
    """uhashring gives an instance ``vnodes * n * weight // total`` point groups: none at all for a
    tiny share, and the walk then never reaches it (as uhashring's)."""
    ours = HashRing({"big": 1000, "tiny": 1})
    reference = uhashring.HashRing({"big": {"weight": 1000}, "tiny": {"weight": 1}}, hash_fn="ketama")
    for key in (f"k{i}" for i in range(200)):
        assert ours.preference(key) == list(reference.iterate_nodes(key, distinct=True)) == ["big"]
        assert ours.choose(key, {"big"}) is None
