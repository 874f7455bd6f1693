"""Pin store fixtures: the same contract suite runs on every store kind (memory, one Redis, Redis
Cluster, Sentinel)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from affinity_proxy.pins.memory import MemoryPinStore
from affinity_proxy.pins.redis import RedisPinStore
from affinity_proxy.pins.store import PinStore

DEFAULT_TTL = 30.0


class StoreHarness:
    """Creates stores of one kind and closes them after the test.

    ``peers(n)`` gives n handles on the *same* pins: n RedisPinStores (own pools) on one Redis (or
    cluster, or Sentinel set), or the one MemoryPinStore n times (a memory store is not shared
    between processes).
    """

    def __init__(self, kind: str, redis_url: str | None) -> None:
        self.kind = kind
        self.redis_url = redis_url
        self.created: list[PinStore] = []

    def new(self, pin_ttl: float = DEFAULT_TTL, **kwargs: Any) -> PinStore:
        store: PinStore
        if self.kind == "memory":
            store = MemoryPinStore(pin_ttl)
        else:
            assert self.redis_url is not None
            kwargs.setdefault("timeout", 2.0)
            store = RedisPinStore(self.redis_url, pin_ttl=pin_ttl, **kwargs)
        self.created.append(store)
        return store

    def peers(self, n: int, pin_ttl: float = DEFAULT_TTL) -> list[PinStore]:
        if self.kind == "memory":
            return [self.new(pin_ttl)] * n
        return [self.new(pin_ttl) for _ in range(n)]

    async def close(self) -> None:
        for store in self.created:
            await store.close()


URL_FIXTURES = {"redis": "redis_url", "cluster": "cluster_url", "sentinel": "sentinel_url"}


@pytest.fixture(params=["memory", "redis", "cluster", "sentinel"])
async def harness(request: pytest.FixtureRequest) -> AsyncIterator[StoreHarness]:
    fixture = URL_FIXTURES.get(request.param)
    url = request.getfixturevalue(fixture) if fixture else None
    h = StoreHarness(request.param, url)
    try:
        yield h
    finally:
        await h.close()


@pytest.fixture
def store(harness: StoreHarness) -> PinStore:
    """A store of the parametrized kind with a 30 s pin TTL."""
    return harness.new()
