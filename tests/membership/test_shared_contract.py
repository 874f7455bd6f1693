"""The SharedState contract, run on MemorySharedState and RedisSharedState (see conftest.py)."""

from __future__ import annotations

import asyncio
import time

from affinity_proxy.membership.shared import HeartbeatInfo, SharedState
from affinity_proxy.routing.model import InstanceId
from tests.membership.conftest import SharedHarness
from tests.support.waiting import wait_until

A, B, C = (InstanceId(x) for x in "abc")


def report(node: str, state: str = "up", instance: str = "a") -> HeartbeatInfo:
    return HeartbeatInfo(state, f"http://{instance}.test:80", "ams", node, time.time())  # type: ignore[arg-type]


async def test_kind_and_protocol(shared: SharedState, shared_harness: SharedHarness) -> None:
    assert isinstance(shared, SharedState)
    assert shared.kind == shared_harness.kind


async def test_drain_undrain_drained_are_shared_and_idempotent(shared_harness: SharedHarness) -> None:
    one, two = shared_harness.peers(2)
    assert await one.drained() == set()
    await one.drain(A)
    await one.drain(A)
    await two.drain(B)
    assert await two.drained() == {A, B}
    await two.undrain(A)
    await two.undrain(A)
    await one.undrain(C)  # never drained: no error
    assert await one.drained() == {B}


async def test_heartbeats_publish_and_read_per_node(shared_harness: SharedHarness) -> None:
    n1, n2 = shared_harness.peers(2)
    assert await n1.heartbeats() == {}
    r1a, r1b, r2a = report("n1"), report("n1", "down", "b"), report("n2", "draining")
    await n1.publish_heartbeat("n1", {A: r1a, B: r1b}, ttl=30)
    await n2.publish_heartbeat("n2", {A: r2a}, ttl=30)
    assert await n2.heartbeats() == {A: [r1a, r2a], B: [r1b]}
    newer = report("n1", "down")
    await n1.publish_heartbeat("n1", {A: newer}, ttl=30)  # replaces n1's report on a only
    assert await n1.heartbeats() == {A: [newer, r2a], B: [r1b]}
    await n1.publish_heartbeat("n1", {}, ttl=30)  # nothing to report: changes nothing
    assert await n2.heartbeats() == {A: [newer, r2a], B: [r1b]}


async def test_heartbeats_expire_per_node_report(shared_harness: SharedHarness) -> None:
    n1, n2 = shared_harness.peers(2)
    await n1.publish_heartbeat("n1", {A: report("n1"), B: report("n1", instance="b")}, ttl=0.2)
    kept = report("n2")
    await n2.publish_heartbeat("n2", {A: kept}, ttl=30)
    assert len((await n2.heartbeats())[A]) == 2

    async def only_n2_left() -> bool:
        return await n1.heartbeats() == {A: [kept]}

    await wait_until(only_n2_left, timeout=5, message="short-lived reports expire, the others stay")


async def test_a_republished_report_lives_again(shared_harness: SharedHarness) -> None:
    (n1,) = shared_harness.peers(1)
    await n1.publish_heartbeat("n1", {A: report("n1")}, ttl=0.2)

    async def gone() -> bool:
        return await n1.heartbeats() == {}

    await wait_until(gone, timeout=5)
    again = report("n1")
    await n1.publish_heartbeat("n1", {A: again}, ttl=30)
    assert await n1.heartbeats() == {A: [again]}


async def test_lock_has_exactly_one_holder_among_20_concurrent_acquirers(shared_harness: SharedHarness) -> None:
    peers = shared_harness.peers(4)
    tokens = await asyncio.gather(*(peers[i % 4].acquire_lock("job", ttl=30) for i in range(20)))
    winners = [t for t in tokens if t is not None]
    assert len(winners) == 1
    assert await peers[1].acquire_lock("job", ttl=30) is None
    assert await peers[2].acquire_lock("other", ttl=30) is not None, "locks are independent by name"


async def test_only_the_holder_releases(shared_harness: SharedHarness) -> None:
    one, two = shared_harness.peers(2)
    token = await one.acquire_lock("job", ttl=30)
    assert token is not None
    assert await two.release_lock("job", "not-the-token") is False
    assert await two.acquire_lock("job", ttl=30) is None, "a wrong token released nothing"
    assert await two.release_lock("job", token) is True
    assert await two.release_lock("job", token) is False, "released once"
    assert await one.acquire_lock("job", ttl=30) is not None


async def test_lock_expiry_lets_another_acquire_and_the_old_holder_cannot_release(
    shared_harness: SharedHarness,
) -> None:
    one, two = shared_harness.peers(2)
    old = await one.acquire_lock("job", ttl=0.2)
    assert old is not None
    new = await wait_until(lambda: two.acquire_lock("job", ttl=30), timeout=5, message="lock expires")
    assert new != old
    assert await one.release_lock("job", old) is False, "an expired holder must not free its successor's lock"
    assert await one.acquire_lock("job", ttl=30) is None
    assert await two.release_lock("job", new) is True


async def test_values_are_shared_replaced_and_expire(shared_harness: SharedHarness) -> None:
    one, two = shared_harness.peers(2)
    assert await one.get_value("poll") is None
    await one.put_value("poll", '{"machines": []}', ttl=30)
    assert await two.get_value("poll") == '{"machines": []}'
    await two.put_value("poll", "newer", ttl=0.2)
    assert await one.get_value("poll") == "newer", "replaced"
    await one.put_value("other", "kept", ttl=30)

    async def expired() -> bool:
        return await two.get_value("poll") is None

    await wait_until(expired, timeout=5, message="a value lives for its ttl only")
    assert await two.get_value("other") == "kept", "values are independent by name"
