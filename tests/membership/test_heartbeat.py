"""Heartbeats: verdict tables for instances_from_heartbeats, local reports, and the refresh loop."""

from __future__ import annotations

import logging

import pytest

from affinity_proxy.membership.heartbeat import (
    HEARTBEAT_TTL_FACTOR,
    MembershipRefresher,
    instances_from_heartbeats,
    local_reports,
    refresh_interval,
)
from affinity_proxy.membership.redis_shared import RedisSharedState
from affinity_proxy.membership.registry import Membership
from affinity_proxy.membership.shared import HeartbeatInfo, MemorySharedState
from affinity_proxy.pins.redis import RedisPinStore
from affinity_proxy.routing.model import Instance, InstanceId, InstanceState
from tests.support.redis_server import RedisServer
from tests.support.waiting import wait_until

NOW = 1_000_000.0
A, B, C = (InstanceId(x) for x in "abc")


def hb(node: str, state: str, age: float, url: str = "http://x") -> HeartbeatInfo:
    return HeartbeatInfo(state, url, "ams", node, NOW - age)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("reports", "expected"),
    [
        ([hb("n1", "up", 0)], InstanceState.UP),
        ([hb("n1", "down", 0), hb("n2", "up", 1)], InstanceState.UP),  # one node reaching it is enough
        ([hb("n1", "down", 0), hb("n2", "up", 5)], InstanceState.DOWN),  # the up report is stale
        ([hb("n1", "up", 5), hb("n2", "up", 9)], InstanceState.DOWN),  # only stale reports
        ([hb("n1", "draining", 0), hb("n2", "down", 0)], InstanceState.DRAINING),
        ([hb("n1", "stopped", 0)], InstanceState.STOPPED),
        ([hb("n1", "stopped", 0), hb("n2", "down", 0)], InstanceState.STOPPED),
        ([hb("n1", "down", 0)], InstanceState.DOWN),
        ([hb("n1", "up", 2.0)], InstanceState.UP),  # exactly at stale_after is still fresh
    ],
)
def test_verdict_from_reports(reports: list[HeartbeatInfo], expected: InstanceState) -> None:
    (instance,) = instances_from_heartbeats({A: reports}, NOW, stale_after=2.0)
    assert instance.id == A and instance.state is expected


def test_unreported_instances_are_not_listed_and_details_come_from_the_deciding_report() -> None:
    reports = {B: [hb("n1", "down", 0, "http://old"), hb("n2", "up", 1, "http://b")], A: [], C: [hb("n3", "up", 0)]}
    got = instances_from_heartbeats(reports, NOW, stale_after=2.0, local_node="n3")
    assert [(i.id, i.url, i.local, i.region) for i in got] == [
        (B, "http://b", False, "ams"), (C, "http://x", True, "ams")]


def test_local_reports_cover_probed_instances_only() -> None:
    m = Membership([Instance(A, "http://a"), Instance(B, "http://b"), Instance(C, "", local=False)])
    m.drain(B)
    m.set_health(A, False)
    got = local_reports(m.current(), "n1", NOW)
    assert got == {A: HeartbeatInfo("down", "http://a", "", "n1", NOW),
                   B: HeartbeatInfo("draining", "http://b", "", "n1", NOW)}


def test_process_group_keeps_only_machines_reported_in_that_group() -> None:
    """``fly.discovery: redis`` with ``fly.process_group``: a Machine whose node publishes another
    group (a worker running the proxy too), or no group at all, is not listed."""
    def tagged(node: str, group: str) -> HeartbeatInfo:
        return HeartbeatInfo("up", f"http://{node}", "ams", node, NOW, group)

    reports = {A: [tagged("n1", "web")], B: [tagged("n2", "worker")], C: [tagged("n3", "")]}
    assert [i.id for i in instances_from_heartbeats(reports, NOW, group="web")] == [A]
    assert [i.id for i in instances_from_heartbeats(reports, NOW, group="worker")] == [B]
    assert [i.id for i in instances_from_heartbeats(reports, NOW)] == [A, B, C], "no group: every Machine"
    # one instance reported in two groups (a misconfigured node): only the matching report counts
    mixed = {A: [HeartbeatInfo("down", "http://old", "", "n1", NOW, "web"), tagged("n2", "worker")]}
    (only,) = instances_from_heartbeats(mixed, NOW, group="web")
    assert (only.state, only.url) == (InstanceState.DOWN, "http://old")


@pytest.mark.parametrize(
    ("raw", "group"),
    [
        ('{"state":"up","url":"u","region":"r","node":"n","seen_at":1}', ""),  # a node without groups
        ('{"state":"up","url":"u","region":"r","node":"n","seen_at":1,"group":"web"}', "web"),
        ('{"state":"up","url":"u","region":"r","node":"n","seen_at":1,"group":7}', ""),
        ('{"state":"up","url":"u","region":"r","node":"n","seen_at":1,"group":null}', ""),
    ],
)
def test_heartbeat_group_on_the_wire(raw: str, group: str) -> None:
    info = HeartbeatInfo.from_json(raw)
    assert info.group == group
    assert HeartbeatInfo.from_json(info.to_json()) == info
    assert ('"group"' in info.to_json()) is bool(group), "no group: the report as nodes without groups write it"


def test_local_reports_carry_the_group() -> None:
    m = Membership([Instance(A, "http://a")])
    assert local_reports(m.current(), "n1", NOW, "web") == {A: HeartbeatInfo("up", "http://a", "", "n1", NOW, "web")}


def test_refresh_interval_is_capped_at_one_second() -> None:
    assert refresh_interval(5.0) == 1.0
    assert refresh_interval(0.3) == 0.3


async def test_refresh_applies_shared_drains_and_publishes() -> None:
    shared = MemorySharedState()
    m = Membership([Instance(A, "http://a"), Instance(B, "http://b")])
    seen: list[dict[InstanceId, list[HeartbeatInfo]]] = []
    r = MembershipRefresher(m, shared, node="n1", interval=0.5, on_reports=seen.append, clock=lambda: NOW)
    assert r.ttl == HEARTBEAT_TTL_FACTOR * 0.5
    await shared.drain(B)
    await shared.drain(InstanceId("unknown"))
    await r.refresh_once()
    assert m.current().state_of(B) is InstanceState.DRAINING and m.draining == {B}
    assert {i: [x.state for x in v] for i, v in (await shared.heartbeats()).items()} == {A: ["up"], B: ["draining"]}
    assert seen and set(seen[-1]) == {A, B}
    await shared.undrain(B)
    await r.refresh_once()
    assert m.current().state_of(B) is InstanceState.UP


async def test_a_read_racing_a_local_drain_does_not_undo_it() -> None:
    m = Membership([Instance(A, "http://a")])
    epoch = m.drain_epoch
    m.drain(A)  # admin drained while a refresh was reading the (older) shared set
    assert m.set_drained(set(), epoch=epoch) is False
    assert m.draining == {A}
    assert m.set_drained(set(), epoch=m.drain_epoch) is True and m.draining == frozenset()


async def test_outage_keeps_drains_and_logs_once_per_streak(private_redis: RedisServer,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="affinity_proxy.membership.heartbeat")
    store = RedisPinStore(private_redis.url, pin_ttl=30.0, timeout=0.3, backoff_base=0.01, backoff_cap=0.05)
    shared = RedisSharedState(store)
    m = Membership([Instance(A, "http://a"), Instance(B, "http://b")])
    r = MembershipRefresher(m, shared, node="n1", interval=0.1)
    try:
        await shared.drain(A)
        await r.refresh_once()
        assert m.draining == {A}
        private_redis.stop()
        for _ in range(5):
            await r.refresh_once()
        assert r.failing and m.draining == {A}, "the last known drain set stays in force"
        down = [rec for rec in caplog.records if "unreachable" in rec.getMessage()]
        assert len(down) == 1 and "'a'" in down[0].getMessage()
        private_redis.start()

        async def recovered() -> bool:
            await r.refresh_once()
            return not r.failing

        await wait_until(recovered, timeout=10, interval=0.05)
        assert m.draining == frozenset(), "a restarted Redis without persistence has no drain marks"
        assert sum("reachable again" in rec.getMessage() for rec in caplog.records) == 1
    finally:
        await store.close()


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_heartbeat_source_keeps_its_process_group(backend: str, redis_url: str) -> None:
    """Two web nodes and a worker node (the proxy runs in every group) publish through the shared
    state; a web node's discovery lists the web Machines only."""
    from affinity_proxy.membership.heartbeat import HeartbeatSource

    store = RedisPinStore(redis_url, key_prefix="hbgroup:", pin_ttl=30.0, timeout=2.0) if backend == "redis" else None
    shared = RedisSharedState(store) if store is not None else MemorySharedState()
    try:
        for node, machine, group in (("n1", "w1", "web"), ("n2", "w2", "web"), ("n3", "k1", "worker")):
            refresher = MembershipRefresher(Membership([Instance(InstanceId(machine), f"http://{machine}")]), shared,
                                            node=node, interval=0.5, group=group)
            await refresher.refresh_once()
        reports = await shared.heartbeats()
        assert {i: [r.group for r in v] for i, v in reports.items()} == {"w1": ["web"], "w2": ["web"], "k1": ["worker"]}
        web = HeartbeatSource(shared, lambda i: f"http://{i}.vm.demo.internal:8080", group="web")
        assert sorted(i.id for i in await web.fetch()) == ["w1", "w2"]
        every = HeartbeatSource(shared, lambda i: f"http://{i}.vm.demo.internal:8080")
        assert sorted(i.id for i in await every.fetch()) == ["k1", "w1", "w2"]
    finally:
        if store is not None:
            await store.close()
