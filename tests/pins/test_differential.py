"""Memory and Redis stores give the same answers to the same random operation sequences.

The contract suite checks chosen cases; this drives both stores with hypothesis-generated sequences
(TTL long enough that nothing expires) and compares every result, so a semantic drift between the
two implementations shows up as a minimal failing sequence.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from affinity_proxy.pins.memory import MemoryPinStore
from affinity_proxy.pins.redis import RedisPinStore
from affinity_proxy.pins.store import ClaimResult, Pin, PinStore
from affinity_proxy.routing.model import InstanceId

keys = st.sampled_from(["u1", "u2", "u3", "user:4"])
instances = st.sampled_from([InstanceId("a"), InstanceId("b"), InstanceId("c")])
maybe_instance = st.none() | instances
operations = st.lists(
    st.one_of(
        st.tuples(st.just("get"), keys),
        st.tuples(st.just("claim"), keys, instances),
        st.tuples(st.just("repin"), keys, maybe_instance, instances),
        st.tuples(st.just("set"), keys, instances),
        st.tuples(st.just("drop"), keys, maybe_instance),
        st.tuples(st.just("touch"), keys, instances),
        st.tuples(st.just("list"), maybe_instance),
        st.tuples(st.just("counts")),
        st.tuples(st.just("drop_instance"), instances),
    ),
    max_size=30,
)


def _normalise(value: Any) -> Any:
    """Drop expires_in (clocks differ) and order (list order is unspecified)."""
    if isinstance(value, Pin):
        return (value.user_key, value.instance)
    if isinstance(value, ClaimResult):
        return (_normalise(value.pin), value.won)
    if isinstance(value, list):
        return sorted(_normalise(v) for v in value)
    return value


async def _apply(store: PinStore, op: tuple[Any, ...]) -> Any:
    name, *args = op
    if name == "drop":
        return await store.drop(args[0], expected=args[1])
    if name == "list":
        return await store.list(args[0])
    result = await getattr(store, name)(*args)
    if name == "touch":
        await store.flush()
    return result


async def _compare(url: str, ops: list[tuple[Any, ...]]) -> None:
    memory = MemoryPinStore(pin_ttl=300)
    redis = RedisPinStore(url, key_prefix=f"diff-{uuid.uuid4().hex}:", pin_ttl=300, timeout=2.0)
    try:
        for step, op in enumerate(ops):
            expected = _normalise(await _apply(memory, op))
            actual = _normalise(await _apply(redis, op))
            assert actual == expected, f"step {step} {op}: redis {actual!r} != memory {expected!r}"
    finally:
        await redis.close()
        await memory.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=operations)
def test_memory_and_redis_agree(redis_url: str, ops: list[tuple[Any, ...]]) -> None:
    asyncio.run(_compare(redis_url, ops))
