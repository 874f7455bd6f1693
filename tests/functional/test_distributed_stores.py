"""Redis Cluster and Sentinel stores under the real proxy: 2 ``serve --workers 2`` processes
(2 nodes x 2 workers) race for one new user's first pin and end with exactly one pin, and users are
routed identically by both nodes. ``redis_url`` is overridden here, so ``start_serve`` and
``start_proxy`` configure ``redis+cluster://`` / ``redis+sentinel://`` stores."""

from __future__ import annotations

import asyncio
import collections

import pytest
import redis

from affinity_proxy.pins.redis import RedisPinStore
from affinity_proxy.pins.store import PinStoreUnavailable
from tests.functional.helpers import COOKIE, affinity_cookie, base
from tests.functional.test_redis_nodes import redis_config
from tests.functional.test_workers import get_instance
from tests.support.redis_topologies import RedisClusterSet, RedisSentinelSet
from tests.support.waiting import wait_until


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


def _replicated(topology: RedisClusterSet | RedisSentinelSet) -> bool:
    """Every replica has applied everything its master wrote (so a failover loses no pin)."""
    nodes = topology.nodes if isinstance(topology, RedisClusterSet) else [topology.master, topology.replica]
    infos = {}
    for node in nodes:
        with redis.Redis(port=node.port, decode_responses=True, socket_timeout=2) as raw:
            infos[node.port] = raw.info("replication")
    for info in infos.values():
        if info["role"] == "slave":
            master = infos.get(int(info["master_port"]), {})
            if int(info.get("slave_repl_offset", -1)) < int(master.get("master_repl_offset", 1 << 62)):
                return False
    return True


@pytest.mark.parametrize("kind", ["cluster", "sentinel"])
async def test_master_failover_under_load(engine: str, backends, start_proxy, http, kind: str) -> None:
    """Kill (SIGKILL) a master under load: cookie clients see no error, user-key clients are
    served, health says degraded while the store fails, and pins written before the crash are read
    back through the promoted replica. A private topology: the session's stays intact."""
    topology = RedisClusterSet() if kind == "cluster" else RedisSentinelSet()
    await asyncio.to_thread(topology.start)
    try:
        node = await start_proxy(redis_config(backends, topology.url, engine=engine))
        cookies, before = [], {}
        for i in range(20):
            async with http.get(base(node) + "/", headers={"X-User-Id": f"early-{i}"}) as resp:
                assert resp.status == 200
                cookies.append((f"early-{i}", affinity_cookie(resp) or ""))
                before[f"early-{i}"] = (await resp.json())["instance"]
        await wait_until(lambda: _replicated(topology), timeout=30, message="replicas caught up")
        counts: collections.Counter[str] = collections.Counter()
        health: collections.Counter[str] = collections.Counter()
        stop = asyncio.Event()

        async def client_loop(kind_: str, i: int) -> None:
            n = 0
            while not stop.is_set():
                if kind_ == "cookie":
                    user, cookie = cookies[i % len(cookies)]
                    headers = {"X-User-Id": user, "Cookie": f"{COOKIE}={cookie}"}
                else:
                    headers = {"X-User-Id": f"failover-{i}-{n}"}
                try:
                    async with http.get(base(node) + "/", headers=headers) as resp:
                        await resp.read()
                        counts[f"{kind_}_ok" if resp.status == 200 else f"{kind_}_error"] += 1
                except Exception:
                    counts[f"{kind_}_error"] += 1
                n += 1
                await asyncio.sleep(0.01)

        async def health_loop() -> None:
            while not stop.is_set():
                async with http.get(base(node) + "/_affinity/health") as resp:
                    health[(await resp.json())["status"]] += 1
                await asyncio.sleep(0.05)

        loops = [asyncio.ensure_future(client_loop(k, i)) for k in ("cookie", "user") for i in range(4)]
        loops.append(asyncio.ensure_future(health_loop()))
        await wait_until(lambda: counts["user_ok"] > 20, timeout=30)
        if isinstance(topology, RedisClusterSet):
            victim = topology.masters()[0]
            await asyncio.to_thread(victim.stop, kill=True)
            await wait_until(lambda: topology.healthy(), timeout=60, message="a replica promoted")
        else:
            old = topology.master.port
            await asyncio.to_thread(topology.master.stop, kill=True)
            await wait_until(lambda: topology.current_master_port() not in (None, old), timeout=60,
                             message="sentinels promoted the replica")

        async def pins_work_again() -> bool:
            try:
                return await node.ctx.store.get("early-0") is not None and node.ctx.store_ok
            except PinStoreUnavailable:
                return False

        await wait_until(pins_work_again, timeout=60, interval=0.1, message="pins through the promoted replica")
        ok_at_recovery = counts["user_ok"]
        await wait_until(lambda: counts["user_ok"] > ok_at_recovery + 20, timeout=30)
        stop.set()
        await asyncio.gather(*loops)
        print(f"{kind} master killed under load: {dict(counts)}, health {dict(health)}")
        assert counts["cookie_error"] == 0 and counts["user_error"] == 0, counts
        assert health["degraded"] > 0, health
        for user, instance in before.items():
            pin = await node.ctx.store.get(user)
            assert pin is not None and pin.instance == instance, (user, pin)
    finally:
        await asyncio.to_thread(topology.close)
