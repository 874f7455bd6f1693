"""PinNearCache: bounded LRU, consulted while the store is down and to claim back pins a store outage lost."""

from __future__ import annotations

from affinity_proxy.pins.near_cache import PinNearCache
from affinity_proxy.routing.model import InstanceId


def test_lru_bound_and_recency() -> None:
    cache = PinNearCache(max_entries=3)
    for i in range(3):
        cache.remember(f"u{i}", InstanceId("a"))
    cache.remember("u0", InstanceId("a"))  # touch: u1 is now the oldest
    cache.remember("u3", InstanceId("b"))
    assert len(cache) == 3
    assert cache.recall("u1") is None
    assert cache.recall("u0") == "a" and cache.recall("u3") == "b"


def test_remember_replaces_and_forget_removes() -> None:
    cache = PinNearCache()
    cache.remember("u", InstanceId("a"))
    cache.remember("u", InstanceId("b"))
    assert cache.recall("u") == "b"
    cache.forget("u")
    cache.forget("never-there")
    assert cache.recall("u") is None


def test_recall_lost_only_for_pins_seen_before_an_outage() -> None:
    """A pin remembered before a store outage may be claimed back if the store returns without it;
    one confirmed (or dropped) while the store answers may not."""
    cache = PinNearCache()
    cache.remember("u", InstanceId("a"))
    cache.remember("v", InstanceId("b"))
    assert cache.recall_lost("u") is None  # no outage yet: a missing pin was dropped or expired
    cache.outage()
    cache.outage()  # every failed call of one outage: still one boundary
    assert cache.recall_lost("u") == "a" and cache.recall_lost("v") == "b"
    cache.remember("u", InstanceId("a"))  # the store answered again with this pin
    assert cache.recall_lost("u") is None and cache.recall("u") == "a"
    cache.forget("v")
    assert cache.recall_lost("v") is None and cache.recall_lost("never-there") is None
