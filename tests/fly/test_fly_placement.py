"""Bounded-load placement in fly mode behind the local Fly edge (issue #14): with ``placement: hash``
a new pin skips a Machine over its share of live sessions, on whichever node decides; with
``placement: local`` a new session stays on the Machine the edge chose, counted as ``how=local``."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from affinity_proxy.routing.model import InstanceId
from tests.fly import test_fly_mode as fly_mode
from tests.fly.test_fly_mode import MACHINES, Cluster
from tests.functional.helpers import metric_value
from tests.support.waiting import wait_until

cluster = fly_mode.cluster  # the fixtures: three fly nodes on one memory store behind the edge
placement = fly_mode.placement


async def new_users(cluster: Cluster, http: aiohttp.ClientSession, users: list[str]) -> None:
    for i in range(0, len(users), 10):
        async def one(user: str) -> None:
            async with http.get(cluster.url + "/page", headers={"X-User-Id": user}) as resp:
                assert resp.status == 200, await resp.text()

        await asyncio.gather(*(one(u) for u in users[i:i + 10]))


@pytest.mark.parametrize("placement", ["hash"])
async def test_hash_placement_is_bounded_on_every_node(cluster: Cluster, http: aiohttp.ClientSession) -> None:
    heavy = InstanceId(MACHINES[0])
    for i in range(100):
        await cluster.store.set(f"old-{i}", heavy)
    for node in cluster.nodes.values():
        live = node.ctx.live
        assert live is not None
        await wait_until(lambda live=live: live.loads.get(heavy) == 100, timeout=30)  # type: ignore[misc]
    await new_users(cluster, http, [f"new-{i}" for i in range(200)])
    counts = await cluster.store.counts()
    values = [counts.get(InstanceId(m), 0) for m in MACHINES]
    assert sum(values) == 300 and max(values) <= 1.25 * 100, counts
    text = await cluster.metrics(http)
    assert metric_value(text, "affinity_placements_total") == 200
    assert metric_value(text, "affinity_placements_total", {"how": "overflow"}) > 0
    assert metric_value(text, "affinity_placements_total", {"how": "local"}) == 0


async def test_local_placement_is_counted_as_local(cluster: Cluster, http: aiohttp.ClientSession) -> None:
    await new_users(cluster, http, [f"new-{i}" for i in range(30)])
    text = await cluster.metrics(http)
    assert metric_value(text, "affinity_placements_total", {"how": "local"}) == 30
    assert metric_value(text, "affinity_placements_total", {"how": "ring"}) == 0
