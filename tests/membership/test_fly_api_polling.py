"""Machines API polling within Fly's rate limits: one poller per app through the shared state, and
back-off on 429 (``Retry-After``, else exponential with jitter).

The API is the stand-in edge's slice of the list call (``affinity_proxy.devtools.fly.FlyEdge``, which
counts every call and can rate limit it); the shared state is a real ``MemorySharedState`` or a
``RedisSharedState`` on a real redis-server. Rounds are driven by hand with an injected clock (the
same one the memory lock expires on), so call counts are exact, never timing-dependent.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from affinity_proxy.devtools.fly import FlyEdge
from affinity_proxy.membership.fly_api import MAX_BACKOFF, FlyMachinesApiSource, backoff_delay, retry_after
from affinity_proxy.membership.redis_shared import RedisSharedState
from affinity_proxy.membership.shared import MemorySharedState, SharedState
from affinity_proxy.membership.sources import DiscoveryError
from affinity_proxy.pins.redis import RedisPinStore
from tests.support.redis_server import RedisServer
from tests.support.waiting import wait_until

WEB = ("m1", "m2", "m3")
INTERVAL = 5.0


class Clock:
    """A clock the test moves by hand (``MemorySharedState`` and the sources read it)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


StartEdge = Callable[..., Awaitable[FlyEdge]]


@pytest.fixture
async def start_edge() -> AsyncIterator[StartEdge]:
    edges: list[FlyEdge] = []

    async def factory(**kwargs: Any) -> FlyEdge:
        edge = FlyEdge({m: "http://127.0.0.1:9" for m in WEB}, **kwargs)  # the API slice only: nothing is proxied
        await edge.start()
        edges.append(edge)
        return edge

    yield factory
    for edge in edges:
        await edge.stop()


def node(edge: FlyEdge, session: aiohttp.ClientSession, machine: str, shared: SharedState | None,
         clock: Clock, jitter: float = 0.0, interval: float = INTERVAL) -> FlyMachinesApiSource:
    return FlyMachinesApiSource(
        "demo", api_url=edge.url, token="test-token", local_machine_id=machine,
        private_url="http://{id}.vm.{app}.internal:{port}", private_port=8080, local_upstream="http://127.0.0.1:3000",
        session=session, timeout=5.0, shared=shared, interval=interval, clock=clock, jitter=lambda: jitter,
    )


async def ids(source: FlyMachinesApiSource) -> set[str]:
    return {i.id for i in await source.fetch()}


# ---------------------------------------------------------------------------- pure parts


@pytest.mark.parametrize(
    ("value", "expected"),
    [("5", 5.0), ("0", 0.0), (" 7 ", 7.0), ("999999", MAX_BACKOFF), (None, None), ("", None), ("-1", None),
     ("1.5", None), ("Wed, 21 Oct 2015 07:28:00 GMT", None), ("9999999999", None), ("٣", None)],
)  # fmt: skip
def test_retry_after(value: str | None, expected: float | None) -> None:
    assert retry_after(value) == expected


@pytest.mark.parametrize(
    ("streak", "interval", "hint", "jitter", "expected"),
    [
        (1, 5.0, None, 0.0, 5.0), (2, 5.0, None, 0.0, 10.0), (3, 5.0, None, 0.0, 20.0),
        (9, 5.0, None, 0.0, MAX_BACKOFF), (10_000, 5.0, None, 0.0, MAX_BACKOFF),
        (1, 0.2, None, 0.0, 1.0),  # never faster than once a second
        (0, 5.0, None, 0.0, 5.0), (-3, 5.0, None, 0.0, 5.0),
        (1, 5.0, None, 1.0, 6.0), (1, 5.0, None, 7.0, 6.0), (1, 5.0, None, -1.0, 5.0),  # jitter: up to 20 %
        (4, 5.0, 2.0, 0.0, 2.0), (4, 5.0, 2.0, 0.5, 2.2), (1, 5.0, 0.0, 0.0, 0.0),  # Retry-After wins
    ],
)  # fmt: skip
def test_backoff_delay(streak: int, interval: float, hint: float | None, jitter: float, expected: float) -> None:
    assert backoff_delay(streak, interval, hint, jitter) == pytest.approx(expected)


# ---------------------------------------------------------------------------- one poller per app


async def test_two_nodes_make_one_call_per_interval(start_edge: StartEdge, session: aiohttp.ClientSession) -> None:
    """Two nodes, each fetching every round: one list call per round (per lock ttl), not two; the
    other node reads the shared answer. When the poller dies, the other takes over within one
    interval."""
    edge = await start_edge()
    clock = Clock()
    shared = MemorySharedState(clock=clock)
    a, b = node(edge, session, "m1", shared, clock), node(edge, session, "m2", shared, clock)
    for _ in range(10):
        assert await ids(a) == set(WEB)
        assert await ids(b) == set(WEB)
        assert await ids(b) == set(WEB), "an extra fetch in the same interval makes no call either"
        clock.now += INTERVAL
    print(f"\n2 nodes, 10 intervals: {edge.api_calls} Machines API calls (a {a.calls}, b {b.calls})")
    assert edge.api_calls == 10 and a.calls + b.calls == 10
    assert (a.calls, b.calls) == (10, 0), "the first to try after the lock expired polls"
    edge.set_machine_state("m3", "destroyed")
    for _ in range(3):  # node a is gone: b polls from the next round on, and sees the change
        clock.now += INTERVAL
        assert await ids(b) == {"m1", "m2"}
    assert (edge.api_calls, b.calls) == (13, 3)


async def test_one_poller_through_redis(start_edge: StartEdge, session: aiohttp.ClientSession, redis_url: str) -> None:
    """The same over Redis (the lock expires on Redis's clock: one interval of 60 s is one round)."""
    edge = await start_edge()
    stores = [RedisPinStore(redis_url, key_prefix="poll:", pin_ttl=30.0, timeout=2.0) for _ in range(2)]
    try:
        clock = Clock()
        nodes = [node(edge, session, m, RedisSharedState(s), clock, interval=60.0)
                 for m, s in zip(("m1", "m2"), stores, strict=True)]
        for _ in range(10):
            for n in nodes:
                assert await ids(n) == set(WEB)
        assert edge.api_calls == 1
    finally:
        for s in stores:
            await s.close()


async def test_a_follower_without_a_shared_answer_keeps_its_membership(
    start_edge: StartEdge, session: aiohttp.ClientSession
) -> None:
    """The poller's call failed, so nothing is shared yet: the follower raises ``DiscoveryError``
    (the discovery loop keeps the last membership) and makes no call of its own."""
    edge = await start_edge(app="other")  # "demo" is not an app of this edge: 404
    clock = Clock()
    shared = MemorySharedState(clock=clock)
    a, b = node(edge, session, "m1", shared, clock), node(edge, session, "m2", shared, clock)
    with pytest.raises(DiscoveryError, match="404"):
        await a.fetch()
    with pytest.raises(DiscoveryError, match="no Machines API answer shared yet"):
        await b.fetch()
    assert edge.api_calls == 1
    await shared.put_value(a.name, "not json", 30)
    with pytest.raises(DiscoveryError, match="not JSON"):
        await b.fetch()
    await shared.put_value(a.name, '{"id": "m1"}', 30)
    with pytest.raises(DiscoveryError, match="not a list"):
        await b.fetch()
    await shared.put_value(a.name, '[{"id": "m1", "state": "started"}, {"id": "bad id"}, 7]', 30)
    assert await ids(b) == {"m1"}, "a shared answer is parsed like the API's"


async def test_process_groups_poll_and_share_separately(start_edge: StartEdge, session: aiohttp.ClientSession) -> None:
    edge = await start_edge()
    edge.add_machine("w1", "http://127.0.0.1:9", group="worker")
    for m in WEB:
        edge.set_machine_group(m, "web")
    clock = Clock()
    shared = MemorySharedState(clock=clock)
    web = node(edge, session, "m1", shared, clock)
    web.process_group, web.name = "web", "machines-api:demo:web"
    worker = FlyMachinesApiSource(
        "demo", api_url=edge.url, token="t", local_machine_id="w1", private_url="http://{id}:{port}", private_port=1,
        local_upstream="http://127.0.0.1:3000", session=session, shared=shared, interval=INTERVAL, clock=clock,
        process_group="worker",
    )
    assert await ids(web) == set(WEB)
    assert await ids(worker) == {"w1"}
    assert edge.api_calls == 2, "one poller per app and group"


# ---------------------------------------------------------------------------- 429


@pytest.mark.parametrize("shared_kind", ["memory", "none"])
async def test_429_with_retry_after_backs_off_every_node(
    start_edge: StartEdge, session: aiohttp.ClientSession, shared_kind: str
) -> None:
    edge = await start_edge(api_rate=1e-6, api_burst=1, api_retry_after=7)  # one call, then 429s
    clock = Clock()
    shared = MemorySharedState(clock=clock) if shared_kind == "memory" else None
    a, b = node(edge, session, "m1", shared, clock), node(edge, session, "m2", shared, clock)
    assert await ids(a) == set(WEB)
    clock.now += INTERVAL
    with pytest.raises(DiscoveryError, match="429"):
        await a.fetch()
    assert (edge.api_calls, edge.api_limited) == (2, 1)
    for _ in range(6):  # for 7 s nobody calls: with a shared state both read the last shared answer
        clock.now += 1.0
        if shared is None:
            with pytest.raises(DiscoveryError, match="backing off"):
                await a.fetch()
        else:
            assert await ids(b) == set(WEB)
            assert await ids(a) == set(WEB)
    assert edge.api_calls == 2, "nobody called during Retry-After"
    clock.now += 1.5
    with pytest.raises(DiscoveryError, match="429"):
        await a.fetch()
    assert (edge.api_calls, edge.api_limited) == (3, 2)


async def test_429_without_retry_after_backs_off_exponentially(
    start_edge: StartEdge, session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="affinity_proxy.discovery.api")
    edge = await start_edge(api_rate=1e-6, api_burst=0, api_retry_after=None)  # every call is a 429
    clock = Clock()
    a = node(edge, session, "m1", None, clock, jitter=1.0)  # the most jitter: +20 %
    with pytest.raises(DiscoveryError, match="429"):
        await a.fetch()
    waits = []
    for _ in range(4):
        start, calls = clock.now, edge.api_calls
        while edge.api_calls == calls:  # a second at a time until the next call is made
            clock.now += 1.0
            with pytest.raises(DiscoveryError, match="429"):
                await a.fetch()
        waits.append(clock.now - start)
    print(f"\nback-off without Retry-After (interval {INTERVAL}s, +20 % jitter): waits {waits}")
    assert waits == [6.0, 12.0, 24.0, 48.0]
    assert sum("HTTP 429" in r.getMessage() for r in caplog.records) == 5


async def test_a_success_resets_the_backoff(start_edge: StartEdge, session: aiohttp.ClientSession) -> None:
    edge = await start_edge(api_rate=1e-6, api_burst=0, api_retry_after=None)
    clock = Clock()
    a = node(edge, session, "m1", None, clock)
    for _ in range(3):
        with pytest.raises(DiscoveryError, match="429"):
            await a.fetch()
        clock.now += MAX_BACKOFF
    edge.api_rate = None  # the limit is lifted
    assert await ids(a) == set(WEB)
    edge.api_rate = 1e-6
    with pytest.raises(DiscoveryError, match="429"):
        await a.fetch()
    clock.now += INTERVAL
    calls = edge.api_calls
    with pytest.raises(DiscoveryError, match="429"):
        await a.fetch()
    assert edge.api_calls == calls + 1, "the first 429 after a success waits one interval again"


async def test_shared_state_down_polls_from_this_node(
    start_edge: StartEdge, session: aiohttp.ClientSession, private_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis is down: each node polls by itself (membership keeps following the API), logged once."""
    caplog.set_level(logging.INFO, logger="affinity_proxy.discovery.api")
    edge = await start_edge()
    store = RedisPinStore(private_redis.url, key_prefix="poll:", pin_ttl=30.0, timeout=0.3,
                          backoff_base=0.01, backoff_cap=0.05)
    try:
        clock = Clock()
        a = node(edge, session, "m1", RedisSharedState(store), clock)
        assert await ids(a) == set(WEB) and edge.api_calls == 1
        private_redis.stop()
        for _ in range(3):
            assert await ids(a) == set(WEB)
        assert edge.api_calls == 4
        private_redis.start()
        clock.now += INTERVAL

        async def shared_again() -> bool:
            return await ids(a) == set(WEB) and not a.store_failing

        await wait_until(shared_again, timeout=10)
        messages = [r.getMessage() for r in caplog.records]
        assert sum("polling the Machines API from this node" in m for m in messages) == 1
        assert any("reachable again" in m for m in messages)
    finally:
        await store.close()
