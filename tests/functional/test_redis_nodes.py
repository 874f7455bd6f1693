"""Several proxy nodes sharing one real Redis: identical routing, atomic first pins, Redis outages."""

from __future__ import annotations

import asyncio
import collections
import time

import redis.asyncio as aioredis

from affinity_proxy.config import CookieConfig, StoreConfig
from affinity_proxy.pins.redis import pin_key
from affinity_proxy.pins.store import PinStoreUnavailable
from tests.functional.helpers import COOKIE, admin, affinity_cookie, base, metric_value
from tests.support.backends import make_config
from tests.support.waiting import wait_until

#: Requests of each client class (cookie, user-key, anonymous) served while Redis is down.
OUTAGE_REQUESTS = 500


def redis_config(backends, url: str, **overrides):  # type: ignore[no-untyped-def]
    """A store timeout of 2 s: the outage tests kill redis-server (connections refused at once), while
    under a loaded full run a 0.25 s timeout opened the circuit of a live Redis Cluster, and a node that
    had not seen a user then placed it by the plain ring instead of its bounded-load pin."""
    return make_config(backends, store=StoreConfig(url=url, timeout=2.0), **overrides)


async def test_two_nodes_route_users_identically(engine: str, backends, start_proxy, http, redis_url) -> None:
    n1 = await start_proxy(redis_config(backends, redis_url, engine=engine))
    n2 = await start_proxy(redis_config(backends, redis_url, engine=engine))
    for i in range(100):
        user = f"shared{i}"
        node_a, node_b = (n1, n2) if i % 2 else (n2, n1)
        async with http.get(base(node_a) + "/", headers={"X-User-Id": user}) as resp:
            first = (await resp.json())["instance"]
        async with http.get(base(node_b) + "/", headers={"X-User-Id": user}) as resp:
            assert (await resp.json())["instance"] == first


async def test_operator_pin_is_obeyed_by_both_nodes_within_revalidation(engine: str, backends, start_proxy, http,
                                                                         redis_url) -> None:
    cookie_cfg = CookieConfig(secret="test-secret-" + "x" * 20, revalidate_after=1.0)
    n1 = await start_proxy(redis_config(backends, redis_url, engine=engine, cookie=cookie_cfg))
    n2 = await start_proxy(redis_config(backends, redis_url, engine=engine, cookie=cookie_cfg))
    async with http.get(base(n1) + "/", headers={"X-User-Id": "mallory"}) as resp:
        cookie = affinity_cookie(resp)
        old = (await resp.json())["instance"]
    target = next(i for i in ("a", "b", "c") if i != old)
    async with http.put(admin(n2) + "/pins/mallory", json={"instance": target}) as resp:
        assert resp.status == 200
    headers = {"X-User-Id": "mallory", "Cookie": f"{COOKIE}={cookie}"}

    async def both_follow() -> bool:
        seen = []
        for node in (n1, n2):
            async with http.get(base(node) + "/", headers=headers) as resp:
                seen.append((await resp.json())["instance"])
        return seen == [target, target]

    started = time.monotonic()
    await wait_until(both_follow, timeout=5, interval=0.1)
    assert time.monotonic() - started < 5
    metrics = await (await http.get(admin(n1) + "/metrics")).text()
    assert metric_value(metrics, "affinity_pin_conflicts_total") >= 1


async def test_race_for_first_pin_across_two_nodes(engine: str, backends, start_proxy, redis_url) -> None:
    import aiohttp

    n1 = await start_proxy(redis_config(backends, redis_url, engine=engine))
    n2 = await start_proxy(redis_config(backends, redis_url, engine=engine))
    results: list[str] = []
    connector = aiohttp.TCPConnector(limit=200)
    async with aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar()) as http:
        async def one(i: int) -> None:
            node = n1 if i % 2 else n2
            async with http.get(base(node) + "/", headers={"X-User-Id": "racer"}) as resp:
                assert resp.status == 200
                results.append((await resp.json())["instance"])

        await asyncio.gather(*(one(i) for i in range(100)))
    client = aioredis.from_url(redis_url)
    try:
        keys = [k async for k in client.scan_iter("affinity:pin:*")]
        assert keys == [pin_key("affinity:", "racer").encode()]
        stored = (await client.get(pin_key("affinity:", "racer"))).decode()
    finally:
        await client.aclose()
    assert set(results) == {stored}, collections.Counter(results)


async def test_redis_outage_under_load(engine: str, backends, start_proxy, http, private_redis) -> None:
    """Kill redis-server for a while under steady load: cookie clients see no error, everyone is
    served (users needing a pin fall back to the ring), and pins work again after the restart.

    Every phase lasts until enough requests of every class were served in it (a condition, not a
    fixed duration): a loaded machine only makes it longer, a quiet one does not wait for nothing."""
    n1 = await start_proxy(redis_config(backends, private_redis.url, engine=engine))
    n2 = await start_proxy(redis_config(backends, private_redis.url, engine=engine))
    nodes = [n1, n2]
    cookies: list[str] = []
    for _ in range(20):
        async with http.get(base(n1) + "/") as resp:
            cookies.append(affinity_cookie(resp) or "")
    counts: collections.Counter[str] = collections.Counter()
    stop = asyncio.Event()

    async def client_loop(kind: str, i: int) -> None:
        n = 0
        while not stop.is_set():
            node = nodes[(i + n) % 2]
            if kind == "cookie":
                headers = {"Cookie": f"{COOKIE}={cookies[i % len(cookies)]}"}
            elif kind == "user":
                headers = {"X-User-Id": f"outage-{i}-{n}"}
            else:
                headers = {}
            try:
                async with http.get(base(node) + "/", headers=headers) as resp:
                    await resp.read()
                    counts[f"{kind}_ok" if resp.status == 200 else f"{kind}_error"] += 1
            except Exception:
                counts[f"{kind}_error"] += 1
            n += 1
            await asyncio.sleep(0.01)

    kinds = ("cookie", "user", "anon")

    def served_since(mark: dict[str, int], n: int) -> bool:
        """Every class has had ``n`` more requests answered than in the snapshot ``mark``."""
        def done(c: dict[str, int], k: str) -> int:
            return c.get(f"{k}_ok", 0) + c.get(f"{k}_error", 0)
        return all(done(counts, k) >= done(mark, k) + n for k in kinds)

    loops = [asyncio.ensure_future(client_loop(kind, i)) for kind in kinds for i in range(4)]
    await wait_until(lambda: served_since({}, 50), timeout=30, message="load running before the outage")
    await asyncio.to_thread(private_redis.stop)
    outage_started = time.monotonic()
    await wait_until(lambda: not n1.ctx.store_ok or n1.ctx.store.available is False, timeout=10)
    await wait_until(lambda: not n1.ctx.store_ok, timeout=10)
    async with http.get(base(n1) + "/_affinity/health") as resp:
        doc = await resp.json()
        assert resp.status == 200 and doc["status"] == "degraded", doc
    metrics = await (await http.get(admin(n1) + "/metrics")).text()
    assert metric_value(metrics, "affinity_store_up") == 0
    detected = dict(counts)
    # the outage lasts while both nodes keep re-probing Redis (circuit breaker) and serving
    await wait_until(lambda: served_since(detected, OUTAGE_REQUESTS), timeout=60, message="load during the outage")
    during = dict(counts)
    outage = time.monotonic() - outage_started
    await asyncio.to_thread(private_redis.start)
    await wait_until(lambda: served_since(during, 50), timeout=30, message="load across the restart")
    stop.set()
    await asyncio.gather(*loops)
    print(f"redis outage {outage:.1f}s, 2 nodes, 12 clients: {dict(counts)} "
          f"(at detection: {detected}; at restart: {during})")
    assert counts["cookie_error"] == 0
    assert counts["user_error"] == 0 and counts["anon_error"] == 0
    assert counts["cookie_ok"] > 100 and counts["user_ok"] > 100

    async def pins_work_again() -> bool:
        async with http.get(base(n2) + "/", headers={"X-User-Id": "after-outage"}) as resp:
            assert resp.status == 200
        try:
            return await n1.ctx.store.get("after-outage") is not None
        except PinStoreUnavailable:
            return False  # n1's circuit breaker has not probed Redis again yet

    await wait_until(pins_work_again, timeout=15, interval=0.2)
    await wait_until(lambda: n1.ctx.store_ok, timeout=10)
    async with http.get(base(n1) + "/_affinity/health") as resp:
        assert (await resp.json())["status"] == "ok"
    metrics = await (await http.get(admin(n1) + "/metrics")).text()
    assert metric_value(metrics, "affinity_store_errors_total") > 0
    assert metric_value(metrics, "affinity_store_up") == 1


async def _store_commands_for(redis_url: str, marker: str, action) -> list[str]:  # type: ignore[no-untyped-def]
    """Commands clients (not scripts) sent to Redis naming ``marker`` while ``action()`` ran (MONITOR)."""
    watcher = aioredis.from_url(redis_url, decode_responses=True)
    poker = aioredis.from_url(redis_url, decode_responses=True)
    seen: list[str] = []
    try:
        async with watcher.monitor() as monitor:
            await poker.echo("monitor-started")
            while "monitor-started" not in (await monitor.next_command())["command"]:
                pass
            await action()
            await poker.echo("monitor-done")
            while True:
                entry = await monitor.next_command()
                if "monitor-done" in entry["command"]:
                    return seen
                if entry.get("client_type") != "lua" and marker in entry["command"]:
                    seen.append(entry["command"])
    finally:
        await watcher.aclose()
        await poker.aclose()


async def test_first_visit_with_a_user_key_costs_one_store_round_trip(engine: str, backends, start_proxy, http,
                                                                      redis_url) -> None:
    """Claim-or-get: a new user is pinned by the one script call that would also have found an old
    pin; a returning user without a cookie gets the old pin from that same call (plus the batched,
    background TTL refresh, which is not on the request path)."""
    node = await start_proxy(redis_config(backends, redis_url, engine=engine))
    served: list[str] = []

    async def visit() -> None:
        async with http.get(base(node) + "/", headers={"X-User-Id": "first-visit-user"}) as resp:
            assert resp.status == 200
            served.append((await resp.json())["instance"])

    first = await _store_commands_for(redis_url, "first-visit-user", visit)
    assert len(first) == 1, first
    again = await _store_commands_for(redis_url, "first-visit-user", visit)
    assert again[0].split()[1] == first[0].split()[1], again  # the same (claim) script
    assert served[0] == served[1]
