"""Several real proxy nodes sharing one real Redis: shared drain, one reaper at a time, heartbeats."""

from __future__ import annotations

import logging

import pytest

from affinity_proxy.admin.api import REAPER
from affinity_proxy.config import ReaperConfig, StoreConfig
from affinity_proxy.membership.heartbeat import refresh_interval
from affinity_proxy.serve.app import ProxyServer
from tests.functional.helpers import admin, base, metric_value
from tests.support.backends import make_config
from tests.support.redis_server import RedisServer
from tests.support.waiting import wait_until


def shared_config(backends, url: str, **overrides):  # type: ignore[no-untyped-def]
    return make_config(backends, store=StoreConfig(url=url, timeout=0.25), **overrides)


def state(server: ProxyServer, instance: str) -> str:
    return server.ctx.membership.current().state_of(instance).value


def rounds(server: ProxyServer) -> int:
    """Membership refresh rounds ``server`` completed: "within one refresh" counted in refreshes, not
    in seconds (a round in progress when the mark was stored may end without it: at most 2)."""
    assert server.ctx.refresher is not None
    return server.ctx.refresher.rounds


async def owner(http, server: ProxyServer, user: str) -> str:  # type: ignore[no-untyped-def]
    async with http.get(base(server) + "/", headers={"X-User-Id": user}) as resp:
        assert resp.status == 200
        return str((await resp.json())["instance"])


async def test_drain_on_one_node_is_honoured_by_another_within_one_refresh(engine: str, backends, start_proxy, http,
                                                                           redis_url) -> None:
    config = shared_config(backends, redis_url, engine=engine)
    n1 = await start_proxy(config, node="n1")
    n2 = await start_proxy(config, node="n2")
    refresh = refresh_interval(config.health.interval)
    pinned = {f"d{i}": await owner(http, n2, f"d{i}") for i in range(60)}
    assert "a" in pinned.values()

    async with http.post(admin(n1) + "/instances/a/drain") as resp:
        assert resp.status == 200 and (await resp.json())["state"] == "draining"
    stored = rounds(n2)  # the drain mark is in Redis now
    assert state(n1, "a") == "draining", "the node that took the request applies it at once"
    await wait_until(lambda: state(n2, "a") == "draining", timeout=5 + 10 * refresh)
    assert rounds(n2) - stored <= 2, "honoured at the first refresh that started after the mark was stored"
    for user, instance in pinned.items():
        assert await owner(http, n2, user) == instance, "pinned users stay, even on the draining instance"
    for i in range(60):
        assert await owner(http, n2, f"new{i}") != "a"
    async with http.get(admin(n2) + "/instances") as resp:
        assert {i["id"]: i["state"] for i in (await resp.json())["instances"]}["a"] == "draining"

    async with http.post(admin(n2) + "/instances/a/undrain") as resp:
        assert (await resp.json())["state"] == "up"
    stored = rounds(n1)
    await wait_until(lambda: state(n1, "a") == "up", timeout=5 + 10 * refresh)
    assert rounds(n1) - stored <= 2
    new_owners = {await owner(http, n1, f"later{i}") for i in range(60)}
    assert "a" in new_owners, "undrained: new users reach it again"


async def test_drain_while_redis_is_down_answers_503_and_keeps_the_last_known_set(
    engine: str, backends, start_proxy, http, private_redis: RedisServer, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="affinity_proxy.membership.heartbeat")
    node = await start_proxy(shared_config(backends, private_redis.url, engine=engine), node="n1")
    async with http.post(admin(node) + "/instances/a/drain") as resp:
        assert resp.status == 200
    private_redis.stop()
    async with http.post(admin(node) + "/instances/b/drain") as resp:
        assert resp.status == 503 and resp.content_type == "application/json"
        assert (await resp.json())["error"] == "store_unavailable"
    await wait_until(lambda: "shared membership state unreachable" in caplog.text, timeout=5)

    async def failed_refreshes() -> bool:  # each failed refresh counts its drained() call
        async with http.get(admin(node) + "/metrics") as resp:
            return metric_value(await resp.text(), "affinity_store_errors_total", {"op": "drained"}) >= 5

    await wait_until(failed_refreshes, timeout=10, message="several refreshes failed")
    assert state(node, "a") == "draining" and state(node, "b") == "up"
    assert sum("shared membership state unreachable" in r.getMessage() for r in caplog.records) == 1


async def test_three_nodes_reap_each_orphan_exactly_once(engine: str, backends, start_proxy, http, redis_url) -> None:
    config = shared_config(backends, redis_url, engine=engine, reaper=ReaperConfig(interval=0.2, grace=0.5))
    nodes = [await start_proxy(config, node=f"n{i}") for i in range(3)]
    for i in range(90):
        await owner(http, nodes[i % 3], f"r{i}")
    store = nodes[0].ctx.store
    on_c = (await store.counts()).get("c", 0)
    assert on_c > 0

    await backends.stop("c")
    await wait_until(lambda: all(state(n, "c") == "down" for n in nodes), timeout=5)

    async def reaped_total() -> float:
        total = 0.0
        for n in nodes:
            async with http.get(admin(n) + "/metrics") as resp:
                total += metric_value(await resp.text(), "affinity_orphaned_pins_reaped_total")
        return total

    async def all_reaped() -> bool:
        return await reaped_total() == on_c

    await wait_until(all_reaped, timeout=10, message="all orphans reaped")
    assert (await store.counts()).get("c", 0) == 0 and await store.list("c") == []
    runs = [n.admin_app[REAPER].runs for n in nodes]
    await wait_until(lambda: all(n.admin_app[REAPER].runs >= r + 3 for n, r in zip(nodes, runs, strict=True)),
                     timeout=10, message="every reaper ran a few more passes")
    assert await reaped_total() == on_c, "no pin was counted twice"
    reapers = [n.admin_app[REAPER] for n in nodes]
    assert sum(r.passes for r in reapers) >= 1


async def test_reaper_survives_a_redis_outage_and_logs_once(engine: str, backends, start_proxy, http,
                                                            private_redis: RedisServer,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="affinity_proxy.reaper")
    config = shared_config(backends, private_redis.url, engine=engine, reaper=ReaperConfig(interval=0.2, grace=0.3))
    node = await start_proxy(config, node="n1")
    reaper = node.admin_app[REAPER]
    for i in range(30):
        await owner(http, node, f"o{i}")

    private_redis.stop()
    await backends.stop("c")
    await wait_until(lambda: state(node, "c") == "down", timeout=5)
    await wait_until(lambda: reaper.failures >= 3, timeout=10, message="several failed reaper passes")
    assert sum("reaper cannot reach" in r.getMessage() for r in caplog.records) == 1, "one line per streak"

    private_redis.start()  # comes back empty (no persistence): pin some users to the dead instance again

    async def pinned_to_c(user: str) -> bool:
        async with http.put(admin(node) + f"/pins/{user}", json={"instance": "c"}) as resp:
            return resp.status == 200

    for user in ("x1", "x2", "x3"):
        await wait_until(lambda u=user: pinned_to_c(u), timeout=15, interval=0.1)  # type: ignore[misc]

    async def reaped() -> bool:
        async with http.get(admin(node) + "/metrics") as resp:
            total = metric_value(await resp.text(), "affinity_orphaned_pins_reaped_total")
        return total == 3 and (await node.ctx.store.counts()).get("c", 0) == 0

    await wait_until(reaped, timeout=15, message="reaping resumed after the outage")
    assert reaper.failures == 0
    assert sum("reaper recovered" in r.getMessage() for r in caplog.records) == 1
    assert sum("reaper cannot reach" in r.getMessage() for r in caplog.records) == 1


async def test_each_node_sees_the_others_heartbeat_reports(engine: str, backends, start_proxy, http, redis_url) -> None:
    config = shared_config(backends, redis_url, engine=engine)
    n1 = await start_proxy(config, node="n1")
    await start_proxy(config, node="n2")

    async def reports() -> dict[str, dict[str, str]]:
        async with http.get(admin(n1) + "/instances") as resp:
            doc = await resp.json()
        assert doc["reports_available"] is True
        return {i["id"]: {r["node"]: r["state"] for r in i["reports"]} for i in doc["instances"]}

    both_up = {i: {"n1": "up", "n2": "up"} for i in "abc"}
    async def reported(expected: dict[str, dict[str, str]]) -> bool:
        return await reports() == expected

    await wait_until(lambda: reported(both_up), timeout=5, message="both nodes report")
    async with http.get(admin(n1) + "/instances") as resp:
        ages = [r["age_seconds"] for i in (await resp.json())["instances"] for r in i["reports"]]
    assert all(0 <= age < 3 for age in ages)

    await backends.stop("c")
    await wait_until(lambda: reported({**both_up, "c": {"n1": "down", "n2": "down"}}), timeout=5,
                     message="both nodes report c down")
