"""The reaper on the counter layout: a sweep (an incremental SCAN) deletes every pin of a dead
instance; counts left behind by pins deleted outside the store (here a raw DEL) do not make every
later pass walk the keyspace again, and a new pin of the dead instance does."""

from __future__ import annotations

from affinity_proxy.pins.reaper import Reaper
from affinity_proxy.pins.redis import RedisPinStore, pin_key
from affinity_proxy.routing.model import Instance, InstanceId, InstanceState, MembershipView
from tests.support.redis_server import RedisServer

A, B = InstanceId("a"), InstanceId("b")


def _scans(server: RedisServer) -> int:
    with server.client() as raw:
        return int(raw.info("commandstats").get("cmdstat_scan", {}).get("calls", 0))


async def test_stale_counts_cost_no_second_sweep(redis_server: RedisServer, redis_url: str) -> None:
    store = RedisPinStore(redis_url, pin_ttl=60, timeout=2.0)
    view = MembershipView.build([Instance(B), Instance(A, state=InstanceState.DOWN)])
    reaper = Reaper(store, lambda: view, grace=0, interval=1)
    try:
        for n in range(3):
            await store.claim(f"u{n}", A)
        await store.claim("keep", B)
        with redis_server.client() as raw:
            raw.delete(pin_key("affinity:", "u0"))  # behind the store's back: its count stays until it expires
        assert await store.counts() == {A: 3, B: 1}

        assert await reaper.reap() == {A: ["u1", "u2"]}
        assert await store.counts() == {A: 1, B: 1}  # the stale count of u0
        scans = _scans(redis_server)
        assert await reaper.reap() == {}
        assert _scans(redis_server) == scans  # nothing new to find: no sweep

        await store.set("late", A)  # a new pin of the dead instance: the count grows past the residue
        assert await reaper.reap() == {A: ["late"]}
        assert _scans(redis_server) > scans
        assert (await store.get("keep")).instance == B  # type: ignore[union-attr]
    finally:
        await store.close()
