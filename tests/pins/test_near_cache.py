"""PinNearCache: bounded LRU, used by the request path only while the store is down."""

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
