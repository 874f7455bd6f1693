"""Redis restarted empty under several nodes: users stay where they were (CONTRACT: the proxy keeps
serving while Redis is down and catches up when it returns; every node agrees where a user is).

Regression (chaos ``redis`` fault after bounded load landed): a restarted, empty Redis made the
first node whose circuit closed place a returning user afresh (bounded load on its own snapshot),
while the other node still routed by its near cache: the user flipped between instances on every
request until both circuits closed, and ended moved off the instance holding its session.
"""

from __future__ import annotations

import asyncio

from affinity_proxy.config import StoreConfig
from tests.functional.helpers import admin, base
from tests.support.backends import make_config
from tests.support.waiting import wait_until

USER = "returning-user"


def redis_config(backends, url: str, engine: str):  # type: ignore[no-untyped-def]
    return make_config(backends, store=StoreConfig(url=url, timeout=0.25), engine=engine)


async def _instance(http, node, user: str = USER) -> str:  # type: ignore[no-untyped-def]
    async with http.get(base(node) + "/", headers={"X-User-Id": user}) as resp:
        assert resp.status == 200, resp.status
        return resp.headers["X-Fly-Instance"]


async def test_users_keep_their_instance_when_redis_restarts_empty(engine: str, backends, start_proxy, http,
                                                                   private_redis) -> None:
    nodes = [await start_proxy(redis_config(backends, private_redis.url, engine)) for _ in range(2)]
    fresh = await _instance(http, nodes[0])  # where a fresh placement puts the user
    target = next(i for i in ("a", "b", "c") if i != fresh)
    async with http.put(admin(nodes[0]) + f"/pins/{USER}", json={"instance": target}) as resp:
        assert resp.status == 200, await resp.text()
    assert [await _instance(http, n) for n in nodes] == [target, target]  # both nodes saw the pin

    await asyncio.to_thread(private_redis.stop)  # no persistence: it comes back empty
    await wait_until(lambda: all(not n.ctx.store_ok for n in nodes), timeout=10)
    assert [await _instance(http, n) for n in nodes] == [target, target], "the near cache keeps the user"
    await asyncio.to_thread(private_redis.start)

    seen: list[str] = []

    async def both_back() -> bool:
        for n in nodes:
            seen.append(await _instance(http, n))
        return all(n.ctx.store_ok and n.ctx.store.available for n in nodes)

    await wait_until(both_back, timeout=20, interval=0.02)
    for n in nodes:  # a few more rounds once every node's circuit is closed
        seen.append(await _instance(http, n))
    assert set(seen) == {target}, f"the user moved after Redis came back empty: {seen}"
    async with http.get(admin(nodes[1]) + f"/pins/{USER}") as resp:
        assert resp.status == 200 and (await resp.json())["instance"] == target, "the pin was claimed back"

    # a pin dropped while the store is up is not restored from a near cache: both nodes agree on
    # a new placement and the store holds it (which instance depends on the load snapshot)
    async with http.delete(admin(nodes[0]) + f"/pins/{USER}") as resp:
        assert resp.status in (200, 204), await resp.text()
    after = [await _instance(http, n) for n in (nodes[1], nodes[0], nodes[1])]
    assert len(set(after)) == 1, after
    async with http.get(admin(nodes[0]) + f"/pins/{USER}") as resp:
        assert resp.status == 200 and (await resp.json())["instance"] == after[0]
