"""A Redis Cluster / Sentinel master killed (SIGKILL) under load, seen by a proxy on each engine.

Both engines' proxies share one private topology and one failover: the store, its circuit breaker
and the failover are engine-neutral, what each engine adds is how it answers requests while the
store fails. One failover per topology kind instead of one per kind and engine halves the slowest
part of the suite (a failover waits for the 2 s node timeout and an election). It lives outside
``tests/functional`` because that suite collects every test once per engine, and this one runs
both engines at once.
"""

from __future__ import annotations

import asyncio
import collections

import pytest
import redis

from affinity_proxy.pins.store import PinStoreUnavailable
from affinity_proxy.serve.app import ProxyServer
from tests.functional.helpers import COOKIE, affinity_cookie, base
from tests.functional.test_redis_nodes import redis_config
from tests.support.engine import ENGINES
from tests.support.redis_topologies import RedisClusterSet, RedisSentinelSet
from tests.support.waiting import wait_until


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
async def test_master_failover_under_load(backends, start_proxy, http, kind: str) -> None:
    """Kill (SIGKILL) a master under load: on both engines cookie clients see no error, user-key
    clients are served, health says degraded while the store fails, and pins written before the
    crash are read back through the promoted replica. A private topology: the session's stays intact."""
    topology = RedisClusterSet() if kind == "cluster" else RedisSentinelSet()
    await asyncio.to_thread(topology.start)
    try:
        nodes: dict[str, ProxyServer] = {}
        for engine in ENGINES:
            nodes[engine] = await start_proxy(redis_config(backends, topology.url, engine=engine))
        cookies, before = [], {}
        for i in range(20):  # pinned through the first engine, read and followed by both
            async with http.get(base(nodes[ENGINES[0]]) + "/", headers={"X-User-Id": f"early-{i}"}) as resp:
                assert resp.status == 200
                cookies.append((f"early-{i}", affinity_cookie(resp) or ""))
                before[f"early-{i}"] = (await resp.json())["instance"]
        await wait_until(lambda: _replicated(topology), timeout=30, message="replicas caught up")
        counts: collections.Counter[str] = collections.Counter()  # "<engine> <kind>_ok|_error"
        health: collections.Counter[str] = collections.Counter()  # "<engine> <status>"
        stop = asyncio.Event()

        async def client_loop(engine: str, kind_: str, i: int) -> None:
            n = 0
            while not stop.is_set():
                if kind_ == "cookie":
                    user, cookie = cookies[i % len(cookies)]
                    headers = {"X-User-Id": user, "Cookie": f"{COOKIE}={cookie}"}
                else:
                    headers = {"X-User-Id": f"failover-{engine}-{i}-{n}"}
                try:
                    async with http.get(base(nodes[engine]) + "/", headers=headers) as resp:
                        await resp.read()
                        counts[f"{engine} {kind_}_ok" if resp.status == 200 else f"{engine} {kind_}_error"] += 1
                except Exception:  # counted: the assertions below name every error
                    counts[f"{engine} {kind_}_error"] += 1
                n += 1
                await asyncio.sleep(0.01)

        async def health_loop(engine: str) -> None:
            while not stop.is_set():
                async with http.get(base(nodes[engine]) + "/_affinity/health") as resp:
                    health[f"{engine} {(await resp.json())['status']}"] += 1
                await asyncio.sleep(0.05)

        def user_ok_everywhere(more_than: dict[str, int]) -> bool:
            return all(counts[f"{e} user_ok"] > more_than.get(e, 0) for e in ENGINES)

        loops = [asyncio.ensure_future(client_loop(e, k, i)) for e in ENGINES for k in ("cookie", "user")
                 for i in range(4)]
        loops += [asyncio.ensure_future(health_loop(e)) for e in ENGINES]
        await wait_until(lambda: user_ok_everywhere({e: 20 for e in ENGINES}), timeout=30)
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
                for node in nodes.values():
                    if await node.ctx.store.get("early-0") is None or not node.ctx.store_ok:
                        return False
            except PinStoreUnavailable:
                return False
            return True

        await wait_until(pins_work_again, timeout=60, interval=0.1, message="pins through the promoted replica")
        ok_at_recovery = {e: counts[f"{e} user_ok"] + 20 for e in ENGINES}
        await wait_until(lambda: user_ok_everywhere(ok_at_recovery), timeout=30)
        stop.set()
        await asyncio.gather(*loops)
        print(f"{kind} master killed under load: {dict(counts)}, health {dict(health)}")
        for engine in ENGINES:
            assert counts[f"{engine} cookie_error"] == 0 and counts[f"{engine} user_error"] == 0, (engine, counts)
            assert counts[f"{engine} cookie_ok"] > 0, (engine, counts)
            assert health[f"{engine} degraded"] > 0, (engine, health)

        async def pins_before_the_crash() -> dict[str, dict[str, str | None]] | None:
            """Every early pin as each node reads it; None while a node's circuit is still open
            (a late MOVED or slot-map refresh can open it once more right after the failover)."""
            seen: dict[str, dict[str, str | None]] = {}
            try:
                for engine, node in nodes.items():
                    pins = {user: await node.ctx.store.get(user) for user in before}
                    seen[engine] = {user: pin.instance if pin else None for user, pin in pins.items()}
            except PinStoreUnavailable:
                return None
            return seen

        seen = await wait_until(pins_before_the_crash, timeout=30, interval=0.2, message="early pins readable")
        assert seen == {engine: before for engine in ENGINES}, seen
    finally:
        await asyncio.to_thread(topology.close)
