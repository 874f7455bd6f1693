"""RedisSharedState specifics: the documented key schema, index clean-up, outages through the breaker."""

from __future__ import annotations

import time

import pytest

from affinity_proxy.membership.redis_shared import RedisSharedState
from affinity_proxy.membership.shared import HeartbeatInfo
from affinity_proxy.pins.redis import RedisPinStore
from affinity_proxy.pins.store import PinStoreUnavailable
from affinity_proxy.routing.model import InstanceId
from tests.support.redis_server import RedisServer
from tests.support.waiting import wait_until

A = InstanceId("a")


def report(node: str) -> HeartbeatInfo:
    return HeartbeatInfo("up", "http://a.test", "", node, time.time())


@pytest.fixture
async def store(redis_url: str):  # type: ignore[no-untyped-def]
    s = RedisPinStore(redis_url, key_prefix="t:", pin_ttl=30.0, timeout=2.0)
    yield s
    await s.close()


async def test_key_schema(store: RedisPinStore, redis_server: RedisServer) -> None:
    shared = RedisSharedState(store)
    await shared.drain(A)
    await shared.publish_heartbeat("n1", {A: report("n1")}, ttl=30)
    token = await shared.acquire_lock("reaper", ttl=30)
    await shared.put_value("machines:demo:web", "[]", ttl=30)
    with redis_server.client() as r:  # one hash tag: every shared key is in one cluster slot
        assert sorted(r.keys("*")) == ["t:{m}drain", "t:{m}hb-instances", "t:{m}hb:a", "t:{m}lock:reaper",
                                       "t:{m}val:machines:demo:web"]
        assert r.get("t:{m}val:machines:demo:web") == "[]" and 0 < r.pttl("t:{m}val:machines:demo:web") <= 30_000
        assert r.smembers("t:{m}drain") == {"a"}
        assert r.smembers("t:{m}hb-instances") == {"a"}
        stamp, _, payload = r.hget("t:{m}hb:a", "n1").partition("|")
        assert int(stamp) > time.time() * 1000 and HeartbeatInfo.from_json(payload).node == "n1"
        assert 0 < r.pttl("t:{m}hb:a") <= 30_000 and 0 < r.pttl("t:{m}hb-instances") <= 30_000
        assert r.get("t:{m}lock:reaper") == token and 0 < r.pttl("t:{m}lock:reaper") <= 30_000


async def test_expired_reports_are_removed_with_their_index_entry(store: RedisPinStore,
                                                                   redis_server: RedisServer) -> None:
    shared = RedisSharedState(store)
    await shared.publish_heartbeat("n1", {A: report("n1")}, ttl=30)
    with redis_server.client() as r:  # a report of a node that stopped publishing long ago
        r.hset("t:{m}hb:a", "old", "1|" + report("old").to_json())
        r.sadd("t:{m}hb-instances", "ghost")
    assert [x.node for x in (await shared.heartbeats())[A]] == ["n1"]
    with redis_server.client() as r:
        assert r.hkeys("t:{m}hb:a") == ["n1"]
        assert r.smembers("t:{m}hb-instances") == {"a"}


async def test_a_malformed_report_is_skipped_and_logged(store: RedisPinStore, redis_server: RedisServer,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    shared = RedisSharedState(store)
    good = report("n1")
    await shared.publish_heartbeat("n1", {A: good}, ttl=30)
    with redis_server.client() as r:
        r.hset("t:{m}hb:a", "bad", f"{int(time.time() * 1000) + 30_000}|{{not json")
    assert await shared.heartbeats() == {A: [good]}
    assert "malformed heartbeat" in caplog.text


async def test_outage_raises_store_unavailable_and_counts_errors(private_redis: RedisServer) -> None:
    errors: list[str] = []
    store = RedisPinStore(private_redis.url, pin_ttl=30.0, timeout=0.5, on_error=errors.append)
    shared = RedisSharedState(store)
    try:
        await shared.drain(A)
        private_redis.stop()
        calls = (shared.drained, lambda: shared.drain(A), lambda: shared.undrain(A), shared.heartbeats,
                 lambda: shared.publish_heartbeat("n1", {A: report("n1")}, ttl=3),
                 lambda: shared.acquire_lock("x", ttl=3), lambda: shared.release_lock("x", "t"))
        for call in calls:
            with pytest.raises(PinStoreUnavailable):
                await call()
        assert not store.available, "the shared state trips the pin store's breaker (one Redis)"
        assert {"drained", "drain", "undrain", "heartbeats", "publish_heartbeat", "acquire_lock",
                "release_lock"} <= set(errors)
        private_redis.start()

        async def back() -> bool:
            try:
                return await shared.drained() == set()  # a restarted Redis without persistence is empty
            except PinStoreUnavailable:
                return False

        await wait_until(back, timeout=10, interval=0.1)
    finally:
        await store.close()
