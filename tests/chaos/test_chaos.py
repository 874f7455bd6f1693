"""Chaos under load (issue #7 item 3): each fault injected while HTTP and WebSocket traffic runs.

The short versions run in the normal suite (a few seconds of traffic each); the long versions are
``@pytest.mark.slow`` and also ``python -m tests.chaos --long`` (which writes tests/chaos/RESULTS.md).
Run with ``-s`` to see the per-fault table.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.chaos.harness import FAULTS, LONG, SHORT, FaultReport, run_fault


def check(report: FaultReport) -> None:
    assert report.sent > 100, report.details()
    assert report.failed_live == 0, report.details()
    assert report.repinned_live == 0, report.details()
    assert not report.violations, report.details()
    for kind, counts in report.by_class.items():
        assert counts["sent"] > counts["failed"], f"{kind} never succeeded: {report.details()}"
    if report.fault in ("kill", "hang", "flap"):
        assert report.affected > 0, "some clients were pinned to the faulted instance"
        assert report.recover is not None and report.recover != float("inf"), report.details()
    if report.fault in ("redis", "flap"):
        assert report.failed == 0, report.details()


@pytest.mark.parametrize("fault", FAULTS)
async def test_chaos_short(fault: str) -> None:
    check(await run_fault(fault, SHORT))


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("fault", FAULTS)
async def test_chaos_long(fault: str) -> None:
    check(await run_fault(fault, LONG))


async def _instance_of(session, url: str, user: str) -> str:  # type: ignore[no-untyped-def]
    async with session.get(url + "/", headers={"X-User-Id": user}) as resp:
        assert resp.status == 200, resp.status
        return resp.headers["X-Fly-Instance"]


async def test_repinned_user_key_client_stays_during_redis_outage() -> None:
    """Chaos sequence kill -> restore -> Redis outage, for user-key clients that send no cookie."""
    import aiohttp

    from tests.chaos.harness import ChaosCluster
    from tests.support.waiting import wait_until

    async with ChaosCluster(2) as cluster, aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
        urls = cluster.urls()
        users = [f"u{i}" for i in range(30)]
        first = {u: await _instance_of(http, urls[0], u) for u in users}
        target = max(set(first.values()), key=list(first.values()).count)
        port = cluster.backends.ports[target]
        await cluster.backends.stop(target)
        moved = {u: await _instance_of(http, urls[i % 2], u) for i, u in enumerate(users)}
        assert all(moved[u] != target for u in users)
        await cluster.backends.start(target, port=port)
        await wait_until(lambda: all(cluster.state(n, target) == "up" for n in range(2)), timeout=10)
        before = {u: await _instance_of(http, urls[i % 2], u) for i, u in enumerate(users)}
        assert before == moved, "re-pinned users stay on their new instance while Redis is up"
        await asyncio.to_thread(cluster.redis.stop)
        await wait_until(lambda: all(not n.ctx.store_ok for n in cluster.nodes), timeout=10)
        during = {u: await _instance_of(http, urls[i % 2], u) for i, u in enumerate(users)}
        movers = {u: f"{before[u]}->{during[u]}" for u in users if during[u] != before[u]}
        print(f"re-pinned user-key clients that moved during the Redis outage: {len(movers)}/{len(users)} {movers}")
        assert not movers
