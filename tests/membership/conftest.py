"""Shared-state fixtures: the same contract suite runs on every implementation (memory, redis)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from affinity_proxy.membership.redis_shared import RedisSharedState
from affinity_proxy.membership.shared import MemorySharedState, SharedState
from affinity_proxy.pins.redis import RedisPinStore


class SharedHarness:
    """Creates shared states of one kind. ``peers(n)``: n handles on the *same* state, as n nodes
    would have (n RedisSharedStates over n pin stores with their own pools, or one memory state)."""

    def __init__(self, kind: str, redis_url: str | None) -> None:
        self.kind = kind
        self.redis_url = redis_url
        self.stores: list[RedisPinStore] = []
        self._memory = MemorySharedState()

    def new(self) -> SharedState:
        if self.kind == "memory":
            return self._memory
        assert self.redis_url is not None
        store = RedisPinStore(self.redis_url, pin_ttl=30.0, timeout=2.0)
        self.stores.append(store)
        return RedisSharedState(store)

    def peers(self, n: int) -> list[SharedState]:
        return [self.new() for _ in range(n)]

    async def close(self) -> None:
        for store in self.stores:
            await store.close()


@pytest.fixture(params=["memory", "redis"])
async def shared_harness(request: pytest.FixtureRequest) -> AsyncIterator[SharedHarness]:
    url = request.getfixturevalue("redis_url") if request.param == "redis" else None
    harness = SharedHarness(request.param, url)
    try:
        yield harness
    finally:
        await harness.close()


@pytest.fixture
def shared(shared_harness: SharedHarness) -> SharedState:
    return shared_harness.new()
