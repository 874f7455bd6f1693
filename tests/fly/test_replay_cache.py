"""``fly.replay_cache`` through the Fly edge stand-in, on both engines: after each user's first
request nearly every request is a cache hit that skips the origin; hits are counted; a hit for a
user who belongs elsewhere is replayed to the owner with ``fly-replay-cache: invalidate``; after a
bluegreen deploy (new Machines boot, traffic switches, old ones destroyed) every user ends on a
live Machine with 0 errors and no request takes more than 2 hops, under both readings of what Fly
does with a cached target that is gone; no request is replayed twice by us; the reaper still reaps;
the shipped fly.toml example keys its replay_cache rule on the affinity cookie."""

from __future__ import annotations

import tomllib
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest

from affinity_proxy.config import ReaperConfig, load_config
from affinity_proxy.config.schema import ReplayCacheConfig
from affinity_proxy.devtools.demo.backend import start_backend
from affinity_proxy.devtools.fly import FlyEdge
from affinity_proxy.devtools.fly.edge_cache import CacheRule
from affinity_proxy.membership.shared import MemorySharedState
from affinity_proxy.pins.memory import MemoryPinStore
from affinity_proxy.routing.model import InstanceId, InstanceState
from affinity_proxy.routing.replay import (
    BodyInfo,
    LocalForward,
    PlanReason,
    PrivateForward,
    Replay,
    ReplaySource,
    parse_replay_instruction,
    plan,
)
from affinity_proxy.serve.app import ProxyServer
from tests.fly.test_fly_mode import _free_port, fly_config
from tests.functional.helpers import COOKIE, affinity_cookie, metric_value
from tests.support.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]
REQUESTS_PER_USER = 50


class Fleet:
    """Machines (proxy node + demo app each) sharing a pin store, behind an edge whose fly.toml has
    ``[[http_service.http_options.replay_cache]]`` keyed on the affinity cookie."""

    def __init__(self, engine: str, reading: str = "replay") -> None:
        self.engine = engine
        self.store = MemoryPinStore(pin_ttl=3600)
        self.shared = MemorySharedState()
        self.edge = FlyEdge({}, replay_cache=[CacheRule(COOKIE, "cookie", "/", 60)],
                            cache_gone_target=reading)  # type: ignore[arg-type]
        self.nodes: dict[str, ProxyServer] = {}
        self.apps: dict[str, object] = {}

    async def deploy(self, ids: list[str]) -> None:
        ports = {m: _free_port() for m in ids}
        for m in ids:
            runner, app_port = await start_backend(m)
            self.apps[m] = runner
            config = fly_config(m, app_port, ports, engine=self.engine)
            config = replace(
                config, reaper=ReaperConfig(interval=0.2, grace=0.5),
                # the cookie is re-issued (a new cache key) every revalidate_after; a test run is shorter
                cookie=replace(config.cookie, revalidate_after=3600.0),
                fly=replace(config.fly, replay_cache=ReplayCacheConfig(enabled=True, ttl=60)),
            )
            node = ProxyServer(config, store=self.store, shared=self.shared)
            await node.start()
            self.nodes[m] = node
            self.edge.add_machine(m, f"http://127.0.0.1:{ports[m]}")

    async def destroy(self, machine: str) -> None:
        self.edge.set_machine_state(machine, "destroyed")
        await self.nodes.pop(machine).stop()
        app = self.apps.pop(machine, None)
        if app is not None:  # a test may have stopped the app already
            await app.cleanup()  # type: ignore[attr-defined]

    async def close(self) -> None:
        await self.edge.stop()
        for m in list(self.nodes):
            await self.destroy(m)

    async def metrics(self, http: aiohttp.ClientSession) -> str:
        texts = []
        for node in self.nodes.values():
            async with http.get(f"http://127.0.0.1:{node.admin_port}/metrics") as resp:
                texts.append(await resp.text())
        return "\n".join(texts)


@pytest.fixture
def reading() -> str:
    return "replay"


@pytest.fixture
async def fleet(engine: str, reading: str) -> AsyncIterator[Fleet]:
    f = Fleet(engine, reading)
    await f.edge.start()
    yield f
    await f.close()


class User:
    """A browser: keeps the affinity cookie it was given (and optionally sends a user key)."""

    def __init__(self, name: str, key: bool = False) -> None:
        self.name = name
        self.key = key
        self.cookie: str | None = None

    async def get(self, http: aiohttp.ClientSession, edge: FlyEdge) -> tuple[int, str]:
        headers = {"X-User-Id": self.name} if self.key else {}
        if self.cookie is not None:
            headers["Cookie"] = f"{COOKIE}={self.cookie}"
        async with http.get(edge.url + "/", headers=headers) as resp:
            fresh = affinity_cookie(resp)
            if fresh is not None:
                self.cookie = fresh
            if resp.status != 200:
                return resp.status, await resp.text()
            return resp.status, str((await resp.json())["instance"])


async def test_cache_hits_skip_the_origin_and_are_counted(fleet: Fleet) -> None:
    await fleet.deploy(["m1", "m2", "m3"])
    # 31, not 30: the edge balances round robin over 3 Machines, so with 30 users taking turns each
    # user would land on the same Machine every time (its owner) and never be replayed
    users = [User(f"rc-{i}", key=i % 2 == 0) for i in range(31)]
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
        owners = {}
        for u in users:
            status, owners[u.name] = await u.get(http, fleet.edge)
            assert status == 200
        first = sum(fleet.edge.cache_outcomes.values())
        assert fleet.edge.cache_outcomes["direct"] == first, "placement local: a new session is never replayed"
        before = dict(fleet.edge.cache_outcomes)
        for _ in range(REQUESTS_PER_USER):
            for u in users:
                assert await u.get(http, fleet.edge) == (200, owners[u.name])
        outcomes = {k: v - before.get(k, 0) for k, v in fleet.edge.cache_outcomes.items()}
        total = len(users) * REQUESTS_PER_USER
        assert sum(outcomes.values()) == total
        ratio = outcomes.get("hit", 0) / total
        print(f"[{fleet.engine}] hit ratio {ratio:.4f} {outcomes} hops {dict(fleet.edge.hop_counts)}")
        assert ratio >= 0.95, outcomes
        assert fleet.edge.errors == 0
        assert max(fleet.edge.replay_counts) <= 1, "no request replayed more than once"
        assert max(fleet.edge.hop_counts) <= 2
        text = await fleet.metrics(http)
    hits = fleet.edge.cache_outcomes["hit"] + fleet.edge.cache_outcomes["hit_replayed"]
    assert metric_value(text, "affinity_replay_cache_hits_total") == hits
    assert metric_value(text, "affinity_replay_cache_invalidations_total") == 0
    assert metric_value(text, "affinity_replay_loops_prevented_total") == 0
    # every replay the nodes answered was in the cacheable form, and the edge stored each one
    assert fleet.edge.cache.counts["refused"] == 0
    assert fleet.edge.cache.counts["stores"] == metric_value(text, "affinity_replays_total")


async def test_a_hit_for_a_user_who_moved_is_invalidated(fleet: Fleet) -> None:
    await fleet.deploy(["m1", "m2", "m3"])
    # keyed users: an anonymous cookie says only (Machine, second issued), so anonymous users of one
    # Machine often share a cookie value, hence a cache entry; here each user has its own
    users = [User(f"mv-{i}", key=True) for i in range(13)]  # not a multiple of 3 (see above)
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
        owners = {u.name: (await u.get(http, fleet.edge))[1] for u in users}
        for _ in range(4):  # every user gets a cache entry
            for u in users:
                assert await u.get(http, fleet.edge) == (200, owners[u.name])
        moved = [u for u in users if owners[u.name] == "m2"]
        assert moved and len(fleet.edge.cache) >= len(moved), (fleet.edge.cache_outcomes, fleet.edge.cache.counts)
        # m2's app dies: m2's proxy no longer owns its users (its health check marks its instance
        # down; the other nodes learn it as discovery would tell them)
        await fleet.apps.pop("m2").cleanup()  # type: ignore[attr-defined]
        await wait_until(lambda: fleet.nodes["m2"].ctx.membership.current().state_of("m2") is InstanceState.DOWN,
                         timeout=10)
        for m in ("m1", "m3"):
            membership = fleet.nodes[m].ctx.membership
            membership.set_instances(replace(i, state=InstanceState.DOWN) if i.id == "m2" else i
                                     for i in membership.current().instances)
        hops_before = sum(fleet.edge.hop_counts.values())
        for u in moved:
            status, served = await u.get(http, fleet.edge)
            assert status == 200 and served in ("m1", "m3"), served
        assert fleet.edge.cache_outcomes["hit_replayed"] == len(moved)
        assert sum(fleet.edge.hop_counts.values()) - hops_before == len(moved)
        assert max(fleet.edge.hop_counts) <= 2 and fleet.edge.errors == 0
        assert fleet.edge.cache.counts["invalidations"] == len(moved)
        for _ in range(3):  # the new owner keeps them (a miss, then hits again)
            for u in moved:
                status, served = await u.get(http, fleet.edge)
                assert status == 200 and served in ("m1", "m3")
        text = await fleet.metrics(http)
    assert metric_value(text, "affinity_replay_cache_invalidations_total") == len(moved)


async def test_websocket_upgrades_take_the_cache_too(fleet: Fleet) -> None:
    """An upgrade with a cached cookie goes straight to its Machine; after the Machine lost the user
    the hit is invalidated and the upgrade replayed (a plain HTTP answer, never accepted first)."""
    await fleet.deploy(["m1", "m2", "m3"])
    users = [User(f"ws-{i}", key=True) for i in range(7)]
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
        owners = {u.name: (await u.get(http, fleet.edge))[1] for u in users}
        for _ in range(3):
            for u in users:
                assert await u.get(http, fleet.edge) == (200, owners[u.name])

        async def whoami(u: User) -> str:
            headers = {"X-User-Id": u.name, "Cookie": f"{COOKIE}={u.cookie}"}
            async with http.ws_connect(fleet.edge.url + "/ws", headers=headers) as ws:
                await ws.send_str("whoami")
                return str((await ws.receive(timeout=10)).data)

        hits = fleet.edge.cache_outcomes["hit"]
        for u in users:
            assert await whoami(u) == owners[u.name]
        assert fleet.edge.cache_outcomes["hit"] == hits + len(users)
        moved = [u for u in users if owners[u.name] == "m2"]
        assert moved
        await fleet.apps.pop("m2").cleanup()  # type: ignore[attr-defined]
        await wait_until(lambda: fleet.nodes["m2"].ctx.membership.current().state_of("m2") is InstanceState.DOWN,
                         timeout=10)
        for m in ("m1", "m3"):
            membership = fleet.nodes[m].ctx.membership
            membership.set_instances(replace(i, state=InstanceState.DOWN) if i.id == "m2" else i
                                     for i in membership.current().instances)
        for u in moved:
            assert await whoami(u) in ("m1", "m3")
        assert fleet.edge.cache_outcomes["hit_replayed"] == len(moved)
        assert fleet.edge.errors == 0 and max(fleet.edge.hop_counts) <= 2
        text = await fleet.metrics(http)
    assert metric_value(text, "affinity_replay_cache_invalidations_total") == len(moved)


@pytest.mark.parametrize("reading", ["replay", "evict"])
async def test_bluegreen_deploy_with_the_cache(fleet: Fleet) -> None:
    await fleet.deploy(["blue1", "blue2", "blue3"])
    users = [User(f"bg-{i}", key=i % 3 == 0) for i in range(31)]  # not a multiple of 3 (see above)
    idle = [User(f"bg-idle-{i}", key=True) for i in range(10)]  # pinned on blue, never seen again
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
        for u in users + idle:
            assert (await u.get(http, fleet.edge))[0] == 200
        for _ in range(5):
            for u in users:
                assert (await u.get(http, fleet.edge))[0] == 200
        assert fleet.edge.cache_outcomes["hit"] > 0
        # bluegreen: green boots beside blue, traffic switches (blue cordoned), blue is destroyed
        await fleet.deploy(["green1", "green2", "green3"])
        for m in ("blue1", "blue2", "blue3"):
            fleet.edge.cordon(m)
        for u in users:  # cached replays still reach blue until it is destroyed
            assert (await u.get(http, fleet.edge))[0] == 200
        for m in ("blue1", "blue2", "blue3"):
            await fleet.destroy(m)
        fleet.edge.hop_counts.clear()
        errors = fleet.edge.errors
        final = {}
        for _ in range(5):
            for u in users:
                status, final[u.name] = await u.get(http, fleet.edge)
                assert status == 200, final[u.name]
        print(f"[{fleet.engine}] bluegreen errors {fleet.edge.errors} hops {dict(fleet.edge.hop_counts)} "
              f"replays {dict(fleet.edge.replay_counts)} cache {dict(fleet.edge.cache.counts)}")
        assert fleet.edge.errors == errors == 0
        assert set(final.values()) <= {"green1", "green2", "green3"}
        assert max(fleet.edge.hop_counts) <= 2, fleet.edge.hop_counts
        assert max(fleet.edge.replay_counts) <= 1

        async def blue_pins_reaped() -> bool:
            counts = await fleet.store.counts()
            return not any(counts.get(InstanceId(b), 0) for b in ("blue1", "blue2", "blue3"))

        await wait_until(blue_pins_reaped, timeout=10)


def test_the_fly_toml_example_keys_its_replay_cache_on_the_affinity_cookie() -> None:
    doc = tomllib.loads((ROOT / "examples/fly/fly.toml").read_text())
    rules = doc["http_service"]["http_options"]["replay_cache"]
    config = load_config(ROOT / "examples/fly/affinity.yaml", {
        "FLY_MACHINE_ID": "148e9e3c0e4d78", "FLY_APP_NAME": "my-sticky-app", "COOKIE_SECRET": "s" * 32,
        "ADMIN_TOKEN": "t" * 32, "REDIS_URL": "redis://redis.internal:6379/0"})
    assert config.fly.replay_cache.enabled
    assert [CacheRule.from_toml(r) for r in rules] == [
        CacheRule(config.cookie.name, "cookie", "/", int(config.fly.replay_cache.ttl))]


# ----------------------------------------------------------------------------- the pure plan

GET = BodyInfo("GET", None, False)
M1, M2 = InstanceId("m1"), InstanceId("m2")


def test_cacheable_replays_carry_nothing_fly_may_not_cache() -> None:
    step = plan(M2, local_instance=M1, replay_src=None, body=GET, is_websocket=False, cacheable=True)
    assert isinstance(step, Replay) and step.header == "prefer_instance=m2" and not step.invalidate
    instr = parse_replay_instruction(step.header)
    assert instr.state is None and instr.timeout is None and instr.fallback is None
    full = plan(M2, local_instance=M1, replay_src=None, body=GET, is_websocket=False)
    assert isinstance(full, Replay) and "state=affinity" in full.header and "fallback=prefer_self" in full.header


def test_a_hit_for_someone_else_is_replayed_once_with_invalidate() -> None:
    step = plan(M2, local_instance=M1, replay_src=None, body=GET, is_websocket=False, cacheable=True, cache_hit=True)
    assert isinstance(step, Replay) and step.invalidate and step.reason is PlanReason.CACHE_INVALIDATE
    assert step.header == "prefer_instance=m2"
    # a hit for a user who belongs here is served
    assert plan(M1, local_instance=M1, replay_src=None, body=GET, is_websocket=False, cacheable=True,
                cache_hit=True) == LocalForward(M1)
    # a body Fly cannot replay goes over the private network (no invalidation without a replay)
    big = BodyInfo("POST", 5_000_000, False)
    assert isinstance(plan(M2, local_instance=M1, replay_src=None, body=big, is_websocket=False, cacheable=True,
                           cache_hit=True), PrivateForward)


def test_the_loop_guard_holds_for_cacheable_replays() -> None:
    """Our cacheable replays carry no marker: the request they deliver has a fly-replay-src without
    one and is never answered with another replay, whatever the decision there."""
    src = ReplaySource(instance=M1, region="lcl", t=1, state="")
    for hit in (False, True):
        step = plan(M2, local_instance=InstanceId("m3"), replay_src=src, body=GET, is_websocket=False,
                    cacheable=True, cache_hit=hit)
        assert not isinstance(step, Replay)
    assert plan(M2, local_instance=M2, replay_src=src, body=GET, is_websocket=False, cacheable=True) == LocalForward(M2)
