"""Two ``serve --workers 2`` processes (2 nodes x 2 workers) on one real Redis (issue #14 "Done
when"): every worker's live-session counts agree, and exactly one rebalancer runs at a time."""

from __future__ import annotations

import re
from datetime import datetime

import aiohttp

from affinity_proxy.pins.redis import RedisPinStore
from affinity_proxy.routing.model import InstanceId
from tests.functional.helpers import metric_value
from tests.functional.test_workers import get_instance
from tests.support.waiting import wait_until

INTERVAL = 2.0  # the rebalance interval: min(5 s, idle_after)
EXTRA = (
    "cookie: {secret: workers-test-secret-xxxxxxxxxx, revalidate_after: 0s}",
    "pin_ttl: 64s",  # the Redis expiry grid (pin_ttl / 32 = 2 s) is part of the idle threshold
    f"placement: {{rebalance: {{enabled: true, idle_after: {INTERVAL:g}s, max_moves_per_minute: 120}}}}",
)
PASS = re.compile(r"^(\S+ \S+) INFO affinity_proxy\.rebalance: rebalanced idle pins .*?pid=(\d+) moved=(\d+)", re.M)


async def sessions(http: aiohttp.ClientSession, admin: str) -> dict[str, float]:
    async with http.get(admin + "/metrics") as resp:
        text = await resp.text()
    return {i: metric_value(text, "affinity_sessions", {"instance": i}) for i in ("a", "b", "c")}


async def test_two_nodes_agree_and_one_rebalancer_runs(start_serve, fresh_connections: aiohttp.ClientSession,
                                                       redis_url: str) -> None:
    store = RedisPinStore(redis_url, pin_ttl=64)
    try:
        for i in range(90):  # an imbalance: every pin on a
            await store.claim(f"old-{i}", InstanceId("a"))
        node1 = await start_serve(2, extra=EXTRA)
        node2 = await start_serve(2, extra=EXTRA)
        for i in range(10):  # new users through both nodes: bounded load keeps them off a
            assert await get_instance(fresh_connections, (node1, node2)[i % 2], f"new-{i}") != "a"

        async def agreed() -> dict[str, float] | None:
            counts = {k: float(v) for k, v in (await store.counts()).items()}
            seen = [await sessions(fresh_connections, node.admin) for node in (node1, node2) for _ in range(4)]
            return counts if all(s == {i: counts.get(i, 0.0) for i in "abc"} for s in seen) else None

        await wait_until(agreed, timeout=30, interval=0.5, message="every worker's affinity_sessions = the store's")

        async def balanced() -> dict[str, int] | None:
            counts = await store.counts()
            values = [counts.get(i, 0) for i in "abc"]
            return dict(counts) if max(values) <= 1.10 * sum(values) / 3 else None

        final = await wait_until(balanced, timeout=150, interval=1.0, message="rebalanced to max/mean <= 1.10")
        await wait_until(agreed, timeout=30, interval=0.5, message="counts agree after the moves")
    finally:
        await store.close()
    passes = [(datetime.strptime(at, "%Y-%m-%d %H:%M:%S,%f").timestamp(), int(moved), int(pid))
              for node in (node1, node2) for at, pid, moved in PASS.findall(node.log())]
    passes.sort()
    moved = sum(n for _, n, _ in passes)
    span = passes[-1][0] - passes[0][0]
    print(f"2 nodes x 2 workers: {final}, {len(passes)} passes by {len({p for *_, p in passes})} workers "
          f"over {span:.1f}s moved {moved}")
    assert moved == 90 - final["a"]
    # One lock holder at a time: passes are never more frequent than one per interval across all
    # four workers (four independent loops would make about four times as many).
    assert len(passes) <= span / INTERVAL + 2, passes
