"""Reaper coordination: the shared lock, grace, stopped instances, dry runs and backoff."""

from __future__ import annotations

import asyncio
import random

from affinity_proxy.membership.redis_shared import RedisSharedState
from affinity_proxy.membership.registry import Membership
from affinity_proxy.membership.shared import MemorySharedState
from affinity_proxy.pins.memory import MemoryPinStore
from affinity_proxy.pins.reaper import LOCK_NAME, Reaper
from affinity_proxy.pins.redis import RedisPinStore
from affinity_proxy.routing.model import Instance, InstanceId, InstanceState

A, B = InstanceId("a"), InstanceId("b")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def _pinned(store: MemoryPinStore | RedisPinStore, n: int, instance: InstanceId) -> None:
    for i in range(n):
        await store.claim(f"{instance}-{i}", instance)


async def test_grace_then_reap_under_the_lock_and_release_it() -> None:
    store, shared, clock = MemoryPinStore(60), MemorySharedState(), Clock()
    m = Membership([Instance(A), Instance(B)])
    reaped: list[int] = []
    reaper = Reaper(store, m.current, grace=5, interval=1, clock=clock, lock=shared, on_reaped=reaped.append)
    await _pinned(store, 3, A)
    await _pinned(store, 2, B)
    m.set_health(A, False)
    assert (await reaper.reap_pass()).reaped == {}  # dead since now
    clock.now += 4.9
    assert (await reaper.reap_pass()).reaped == {}
    clock.now += 0.2
    outcome = await reaper.reap_pass()
    assert sorted(outcome.reaped[A]) == ["a-0", "a-1", "a-2"] and not outcome.skipped
    assert reaped == [3] and await store.counts() == {B: 2}
    assert await shared.acquire_lock(LOCK_NAME, 1) is not None, "released after the pass"


async def test_lock_held_elsewhere_skips_the_pass_but_not_dry_run() -> None:
    store, shared, clock = MemoryPinStore(60), MemorySharedState(), Clock()
    m = Membership([Instance(A)])
    reaper = Reaper(store, m.current, grace=0, interval=1, clock=clock, lock=shared)
    await _pinned(store, 2, A)
    m.set_health(A, False)
    token = await shared.acquire_lock(LOCK_NAME, 30)
    assert token is not None
    assert sorted((await reaper.reap_pass(dry_run=True)).reaped[A]) == ["a-0", "a-1"]
    outcome = await reaper.reap_pass()
    assert outcome.skipped and outcome.reaped == {} and reaper.skips == 1
    assert await store.counts() == {A: 2}
    assert await shared.release_lock(LOCK_NAME, token)
    assert sorted((await reaper.reap_pass()).reaped[A]) == ["a-0", "a-1"]


async def test_no_lock_is_taken_when_nothing_is_due() -> None:
    store, shared = MemoryPinStore(60), MemorySharedState()
    await _pinned(store, 2, A)
    reaper = Reaper(store, Membership([Instance(A)]).current, grace=0, interval=1, lock=shared)
    token = await shared.acquire_lock(LOCK_NAME, 30)
    outcome = await reaper.reap_pass()
    assert outcome.reaped == {} and not outcome.skipped and reaper.skips == 0
    assert token is not None and await shared.release_lock(LOCK_NAME, token)


async def test_stopped_and_recovered_instances_are_never_reaped() -> None:
    store, clock = MemoryPinStore(60), Clock()
    m = Membership([Instance(A, state=InstanceState.STOPPED), Instance(B)])
    reaper = Reaper(store, m.current, grace=1, interval=1, clock=clock, lock=MemorySharedState())
    await _pinned(store, 2, A)
    await _pinned(store, 2, B)
    m.set_health(B, False)
    await reaper.reap_pass()
    clock.now += 0.9
    m.set_health(B, True)  # back before the grace ran out: its clock restarts
    await reaper.reap_pass()
    m.set_health(B, False)
    clock.now += 0.5
    assert (await reaper.reap_pass()).reaped == {}
    clock.now += 10
    assert set((await reaper.reap_pass()).reaped) == {B}
    assert await store.counts() == {A: 2}


async def test_gone_instances_are_reaped() -> None:
    store, clock = MemoryPinStore(60), Clock()
    await _pinned(store, 2, InstanceId("removed"))
    reaper = Reaper(store, Membership([Instance(A)]).current, grace=1, interval=1, clock=clock)
    await reaper.reap_pass()
    clock.now += 1
    assert sorted((await reaper.reap_pass()).reaped["removed"]) == ["removed-0", "removed-1"]


def test_backoff_doubles_with_jitter_up_to_ten_intervals() -> None:
    reaper = Reaper(MemoryPinStore(60), Membership().current, grace=1, interval=2, rng=random.Random(7))
    assert reaper.next_delay() == 2
    for failures, window in [(1, 4), (2, 8), (3, 16), (4, 20), (9, 20), (100, 20)]:
        reaper.failures = failures
        delays = [reaper.next_delay() for _ in range(200)]
        assert window / 2 <= min(delays) and max(delays) <= window
        assert max(delays) - min(delays) > window / 10, "jittered"


async def test_concurrent_reapers_on_three_nodes_reap_each_pin_once(redis_url: str) -> None:
    stores = [RedisPinStore(redis_url, pin_ttl=60, timeout=2.0) for _ in range(3)]
    try:
        await _pinned(stores[0], 150, A)
        memberships = [Membership([Instance(A)]) for _ in stores]
        for m in memberships:
            m.set_health(A, False)
        counted: list[int] = []
        reapers = [Reaper(s, m.current, grace=0, interval=1, lock=RedisSharedState(s), on_reaped=counted.append)
                   for s, m in zip(stores, memberships, strict=True)]
        for _ in range(3):
            outcomes = await asyncio.gather(*(r.reap_pass() for r in reapers))
            assert sum(not o.skipped for o in outcomes if o.reaped) <= 1
        # and without the lock (as if it expired mid-pass) drop_instance still deletes each pin once
        await _pinned(stores[1], 150, A)
        unlocked = [Reaper(s, m.current, grace=0, interval=1, on_reaped=counted.append)
                    for s, m in zip(stores, memberships, strict=True)]
        results = await asyncio.gather(*(r.reap_pass() for r in unlocked))
        keys = [k for o in results for k in o.reaped.get(A, [])]
        assert len(keys) == len(set(keys)) == 150
        assert sum(counted) == 300 and await stores[2].counts() == {}
    finally:
        for s in stores:
            await s.close()
