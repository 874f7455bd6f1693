"""Redis-only behaviour: outages and the circuit breaker, key schema, touch batching, URL schemes."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
import redis.exceptions

from affinity_proxy.pins import redis as redis_store_module
from affinity_proxy.pins.redis import WINDOWS, RedisPinStore, bucket_of, pin_key
from affinity_proxy.pins.store import PinStoreUnavailable
from affinity_proxy.routing.model import InstanceId
from tests.support.redis_server import RedisServer
from tests.support.waiting import wait_until

A, B = InstanceId("a"), InstanceId("b")
BOUND = 5.0  # "does not hang": generous, never a performance assertion


async def _succeeds(store: RedisPinStore, user: str, instance: InstanceId) -> bool:
    try:
        await store.set(user, instance)
    except PinStoreUnavailable:
        return False
    return True


async def test_outage_fails_fast_and_recovers(private_redis: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="affinity_proxy.pins.redis")
    ops: list[str] = []
    states: list[bool] = []
    store = RedisPinStore(private_redis.url, pin_ttl=30, on_error=ops.append, on_state_change=states.append)
    try:
        await store.claim("before", A)
        private_redis.stop()

        with pytest.raises(PinStoreUnavailable) as info:
            await asyncio.wait_for(store.get("before"), BOUND)
        assert isinstance(info.value.__cause__, redis.exceptions.ConnectionError)
        assert store.available is False
        assert states == [False]
        assert ops == ["get"]

        for call in (store.claim("x", A), store.repin("x", A, B), store.drop("x"), store.counts(), store.list()):
            with pytest.raises(PinStoreUnavailable):
                await asyncio.wait_for(call, BOUND)
        assert store.errors == len(ops) >= 6
        assert await asyncio.wait_for(store.ping(), BOUND) is False

        private_redis.start()
        await wait_until(lambda: _succeeds(store, "after", B), timeout=15, interval=0.05)
        assert store.available is True
        assert states == [False, True]
        pin = await store.get("after")
        assert pin is not None and pin.instance == B
        assert await store.get("before") is None  # no persistence: the restart lost it
    finally:
        await store.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "affinity_proxy.pins.redis"]
    assert sum(" is down " in line for line in lines) == 1, lines
    assert sum(" is back " in line for line in lines) == 1, lines


async def test_open_circuit_does_not_touch_the_network(private_redis: RedisServer) -> None:
    """A paused Redis costs one timeout; until the window ends every call fails without I/O."""
    store = RedisPinStore(private_redis.url, pin_ttl=30, timeout=1.0, backoff_base=60, backoff_cap=60)
    try:
        await store.claim("u", A)
        private_redis.pause()
        with pytest.raises(PinStoreUnavailable) as info:
            await asyncio.wait_for(store.get("u"), BOUND)
        assert isinstance(info.value.__cause__, redis.exceptions.TimeoutError)

        async def many_calls() -> None:
            for n in range(50):  # at 1 s per network timeout, this would take 50 s
                with pytest.raises(PinStoreUnavailable):
                    await store.get(f"u{n}")

        await asyncio.wait_for(many_calls(), BOUND)
        assert store.errors == 51

        private_redis.resume()
        assert await asyncio.wait_for(store.ping(), BOUND) is True  # a health check closes the circuit
        assert store.available is True
        assert (await store.get("u")).instance == A  # type: ignore[union-attr]
    finally:
        private_redis.resume()
        await store.close()


async def test_unexpected_redis_errors_are_not_outages(redis_server: RedisServer, redis_url: str) -> None:
    store = RedisPinStore(redis_url, pin_ttl=30)
    try:
        with redis_server.client() as raw:
            raw.hset(pin_key("affinity:", "weird"), "f", "v")  # wrong type where a pin should be
        with pytest.raises(redis.exceptions.ResponseError):
            await store.get("weird")
        assert store.available is True and store.errors == 0
    finally:
        await store.close()


async def test_key_schema(redis_server: RedisServer, redis_url: str) -> None:
    """Every key of a pin carries its bucket's hash tag, so each script touches one cluster slot; a
    pin is one string key, counted in its bucket's per-instance counter under its expiry (on the
    pin_ttl / WINDOWS grid), with no per-pin index entry."""
    store = RedisPinStore(redis_url, key_prefix="t1:", pin_ttl=30)
    b1, b2 = bucket_of("user:1"), bucket_of("u2")
    assert b1 != b2  # the test wants two buckets
    pin1, pin2 = f"t1:pin:{{p{b1}}}user:1", f"t1:pin:{{p{b2}}}u2"
    assert pin_key("t1:", "user:1") == pin1
    window = 30_000 // WINDOWS
    try:
        await store.claim("user:1", A)
        await store.claim("u2", B)
        with redis_server.client() as raw:
            assert set(raw.keys("*")) == {pin1, pin2, f"t1:cnt:{{p{b1}}}a", f"t1:cnt:{{p{b2}}}b",
                                          f"t1:live{{p{b1}}}", f"t1:live{{p{b2}}}"}
            for key in raw.keys("*"):
                assert key.count("{") == 1 and key.count("}") == 1
            assert raw.get(pin1) == "a"
            assert 30_000 - window - 5_000 < raw.pttl(pin1) <= 30_000
            expiry = raw.execute_command("PEXPIRETIME", pin1)
            assert expiry % window == 0
            assert raw.hgetall(f"t1:cnt:{{p{b1}}}a") == {str(expiry): "1"}
            assert raw.smembers(f"t1:live{{p{b1}}}") == {"a"}

            await store.set("user:1", B)
            assert raw.exists(f"t1:cnt:{{p{b1}}}a") == 0  # its only pin moved to b
            expiry = raw.execute_command("PEXPIRETIME", pin1)
            assert raw.hgetall(f"t1:cnt:{{p{b1}}}b") == {str(expiry): "1"}
            assert await store.counts() == {B: 2}
            assert raw.smembers(f"t1:live{{p{b1}}}") == {"b"}  # counts() forgets empty counters

            await store.drop("user:1")
            assert raw.exists(pin1) == 0 and raw.exists(f"t1:cnt:{{p{b1}}}b") == 0
            assert len(raw.hgetall(f"t1:cnt:{{p{b2}}}b")) == 1
            assert await store.counts() == {B: 1}
            assert raw.smembers(f"t1:live{{p{b1}}}") == set()
    finally:
        await store.close()


def _calls(raw_stats: dict, command: str) -> int:  # type: ignore[type-arg]
    return int(raw_stats.get(f"cmdstat_{command}", {}).get("calls", 0))


async def test_touches_are_batched(redis_server: RedisServer, redis_url: str) -> None:
    store = RedisPinStore(redis_url, pin_ttl=30, touch_interval=60)
    try:
        keys = [f"k{n}" for n in range(20)]
        for key in keys:
            await store.claim(key, A)
        await store.touch("k0", A)
        await store.flush()  # loads the script, and the last flush is now: the next waits 60 s
        with redis_server.client() as raw:
            raw.config_resetstat()
            for _ in range(200):
                await store.touch("hot", A)
                await store.touch("k1", A)
                await asyncio.sleep(0)  # let the background flusher run if it wants to
            await store.flush()
            stats = raw.info("commandstats")
            assert _calls(stats, "pexpire") <= 2, stats
            assert _calls(stats, "evalsha") + _calls(stats, "eval") <= 2, stats

            raw.config_resetstat()
            for _ in range(25):
                for key in keys:
                    await store.touch(key, A)
                await asyncio.sleep(0)
            await store.flush()
            stats = raw.info("commandstats")
            buckets = len({bucket_of(key) for key in keys})  # a flush is one script call per bucket
            assert _calls(stats, "evalsha") + _calls(stats, "eval") <= 2 * buckets, stats
            assert _calls(stats, "pexpire") <= 2 * len(keys), stats
    finally:
        await store.close()


async def test_background_flush_slides_ttl_without_explicit_flush(redis_server: RedisServer, redis_url: str) -> None:
    store = RedisPinStore(redis_url, pin_ttl=30, touch_interval=0.05)
    try:
        await store.claim("u", A)
        with redis_server.client() as raw:
            raw.pexpire(pin_key("affinity:", "u"), 5_000)
            await store.touch("u", A)
            await wait_until(lambda: raw.pttl(pin_key("affinity:", "u")) > 20_000, timeout=BOUND)
            assert store.pending_touches == 0
    finally:
        await store.close()


async def test_touches_survive_a_short_outage(private_redis: RedisServer) -> None:
    store = RedisPinStore(private_redis.url, pin_ttl=30, touch_interval=0.05)
    try:
        await store.claim("u", A)
        private_redis.stop()
        await store.touch("u", A)
        with pytest.raises(PinStoreUnavailable):
            await asyncio.wait_for(store.flush(), BOUND)
        assert store.pending_touches == 1  # kept for the next attempt
        private_redis.start()
        with private_redis.client() as raw:
            raw.set(pin_key("affinity:", "u"), "a", px=5_000)  # the restart lost the data; recreate it
            # The background flusher keeps retrying (one probe per backoff window) and gets through.
            await wait_until(lambda: raw.pttl(pin_key("affinity:", "u")) > 20_000, timeout=15, interval=0.05)
        assert store.available
    finally:
        await store.close()


async def test_unix_socket(redis_server: RedisServer, redis_url: str) -> None:
    store = RedisPinStore(redis_server.unix_url, pin_ttl=30)
    try:
        assert await store.ping() is True
        await store.claim("u", A)
        with redis_server.client() as raw:
            assert raw.get(pin_key("affinity:", "u")) == "a"
    finally:
        await store.close()


async def test_url_schemes_are_parsed_by_redis_py() -> None:
    from redis.asyncio.connection import SSLConnection, UnixDomainSocketConnection

    tls = RedisPinStore("rediss://user:secret@cache.example:6380/2", pin_ttl=30)
    unix = RedisPinStore("unix:///run/redis.sock?db=3", pin_ttl=30)
    try:
        assert tls._client.connection_pool.connection_class is SSLConnection
        assert tls._client.connection_pool.connection_kwargs["db"] == 2
        assert tls.where == "rediss://cache.example:6380"  # no credentials in log lines
        assert unix._client.connection_pool.connection_class is UnixDomainSocketConnection
        assert unix.where == "unix:/run/redis.sock"
    finally:
        await tls.close()
        await unix.close()


async def test_closed_store_raises_unavailable(redis_url: str) -> None:
    store = RedisPinStore(redis_url, pin_ttl=30)
    await store.close()
    started = time.monotonic()
    with pytest.raises(PinStoreUnavailable):
        await store.get("u")
    assert time.monotonic() - started < BOUND


async def test_large_touch_batches_are_pipelined(
    redis_server: RedisServer, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(redis_store_module, "TOUCH_BATCH", 3)
    store = RedisPinStore(redis_url, pin_ttl=30, touch_interval=60)
    try:
        keys = [f"k{n}" for n in range(10)]
        for key in keys:
            await store.claim(key, A)
        with redis_server.client() as raw:
            for key in keys:
                raw.pexpire(pin_key("affinity:", key), 5_000)
            await store.touch("k0", B)  # re-pinned elsewhere: left alone
            for key in keys[1:]:
                await store.touch(key, A)
            await store.flush()
            ttls = {key: raw.pttl(pin_key("affinity:", key)) for key in keys}
        assert ttls["k0"] <= 5_000
        assert all(ttl > 20_000 for key, ttl in ttls.items() if key != "k0"), ttls
    finally:
        await store.close()


@pytest.mark.parametrize(
    ("exc", "outage"),
    [
        (redis.exceptions.BusyLoadingError("Redis is loading the dataset in memory"), True),
        (redis.exceptions.ReadOnlyError("You can't write against a read only replica."), True),
        (redis.exceptions.TimeoutError("Timeout reading from socket"), True),
        (redis.exceptions.ResponseError("MISCONF Redis is configured to save RDB snapshots"), True),
        (redis.exceptions.ResponseError("BUSY Redis is busy running a script"), True),
        (ConnectionResetError(), True),
        (redis.exceptions.ResponseError("WRONGTYPE Operation against a key holding the wrong kind"), False),
        (redis.exceptions.DataError("Invalid input"), False),
    ],
)
def test_outage_classification(exc: BaseException, outage: bool) -> None:
    assert redis_store_module._is_unavailable(exc) is outage
