"""Redis Cluster and Sentinel stores under the real proxy: 2 ``serve --workers 2`` processes
(2 nodes x 2 workers) race for one new user's first pin and end with exactly one pin, and users are
routed identically by both nodes. ``redis_url`` is overridden here, so ``start_serve`` and
``start_proxy`` configure ``redis+cluster://`` / ``redis+sentinel://`` stores."""

from __future__ import annotations

import asyncio

import pytest

from affinity_proxy.pins.redis import RedisPinStore
from tests.functional.helpers import base
from tests.functional.test_redis_nodes import redis_config
from tests.functional.test_workers import get_instance


@pytest.fixture(params=["cluster", "sentinel"])
def redis_url(request: pytest.FixtureRequest) -> str:
    """The URL of the session's cluster or Sentinel set, emptied before the test."""
    return str(request.getfixturevalue(f"{request.param}_url"))


async def _stored(url: str) -> tuple[dict[str, int], list[tuple[str, str]]]:
    store = RedisPinStore(url, pin_ttl=60, timeout=2.0)
    try:
        return await store.counts(), [(p.user_key, p.instance) for p in await store.list()]
    finally:
        await store.close()


async def test_race_for_first_pin_over_two_nodes_and_four_workers(start_serve, fresh_connections,
                                                                   redis_url) -> None:
    node1 = await start_serve(2)
    node2 = await start_serve(2)
    answers = await asyncio.gather(*(
        get_instance(fresh_connections, node1 if i % 2 else node2, "race-distributed") for i in range(100)
    ))
    assert len(set(answers)) == 1, answers
    counts, pins = await _stored(redis_url)
    assert pins == [("race-distributed", answers[0])]
    assert counts == {answers[0]: 1}


async def test_two_nodes_route_users_identically(engine: str, backends, start_proxy, http, redis_url) -> None:
    n1 = await start_proxy(redis_config(backends, redis_url, engine=engine))
    n2 = await start_proxy(redis_config(backends, redis_url, engine=engine))
    seen = {}
    for i in range(40):
        user = f"shared{i}"
        node_a, node_b = (n1, n2) if i % 2 else (n2, n1)
        async with http.get(base(node_a) + "/", headers={"X-User-Id": user}) as resp:
            seen[user] = (await resp.json())["instance"]
        async with http.get(base(node_b) + "/", headers={"X-User-Id": user}) as resp:
            assert (await resp.json())["instance"] == seen[user]
    counts, pins = await _stored(redis_url)
    assert sorted(pins) == sorted(seen.items())
    assert sum(counts.values()) == 40
