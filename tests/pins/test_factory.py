"""open_pin_store: URL scheme -> store kind, and a clear error for anything else."""

from __future__ import annotations

import pytest

from affinity_proxy.pins.factory import open_pin_store
from affinity_proxy.pins.memory import MemoryPinStore
from affinity_proxy.pins.redis import RedisPinStore
from affinity_proxy.pins.store import PinStore

OPTS = {"key_prefix": "p:", "pin_ttl": 60.0, "timeout": 0.5}


async def test_memory() -> None:
    store = open_pin_store("memory://", **OPTS)
    assert isinstance(store, MemoryPinStore) and isinstance(store, PinStore) and store.kind == "memory"


@pytest.mark.parametrize("url", ["redis://127.0.0.1:1/0", "rediss://h:6380", "unix:///tmp/none.sock",
                                 "redis+cluster://127.0.0.1:1,127.0.0.1:2", "redis+sentinel://127.0.0.1:1/mymaster/2"])
async def test_redis_schemes(url: str) -> None:
    store = open_pin_store(url, **OPTS)
    try:
        assert isinstance(store, RedisPinStore) and store.kind == "redis"
        assert store.prefix == "p:" and store.pin_ttl == 60.0
    finally:
        await store.close()


@pytest.mark.parametrize("url", ["http://x", "mongodb://pw:secret@h", "", "localhost:6379"])
def test_unknown_scheme(url: str) -> None:
    with pytest.raises(ValueError, match="unsupported pin store URL") as info:
        open_pin_store(url, **OPTS)
    assert "secret" not in str(info.value)
    assert "memory://" in str(info.value) and "redis://" in str(info.value)
