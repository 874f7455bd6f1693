"""Fly mode against the stand-in as Fly documents it (issue 11): fallbacks without fly-replay-src,
PA03 for a replay from a fallback, a router app replaying into ours with ``app=``, local
placement of new sessions, process groups and ``hard_limit``.

Every part is real: 3 Machines (an affinity-proxy node in front of a demo app each) behind the
local Fly edge on 127.0.0.1, one shared memory pin store, real HTTP clients. Where Fly's docs are
silent, the edge is run under each reading (``fallback_replay_src``, ``hard_limit_instance``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from affinity_proxy.devtools.demo.backend import start_backend
from affinity_proxy.devtools.fly import FlyEdge
from affinity_proxy.devtools.fly.edge_route import EdgeError, Hop
from affinity_proxy.membership.shared import MemorySharedState
from affinity_proxy.pins.memory import MemoryPinStore
from affinity_proxy.routing.model import InstanceId
from affinity_proxy.serve.app import ProxyServer
from tests.fly.test_fly_mode import MACHINES, _free_port, fly_config
from tests.functional.helpers import COOKIE, affinity_cookie, metric_value
from tests.support.dns_server import DnsServer
from tests.support.waiting import wait_until


@dataclass
class Fly:
    edge: FlyEdge
    nodes: dict[str, ProxyServer]
    store: MemoryPinStore
    runners: list[web.AppRunner]

    async def metrics(self, http: aiohttp.ClientSession) -> str:
        texts = []
        for node in self.nodes.values():
            async with http.get(f"http://127.0.0.1:{node.admin_port}/metrics") as resp:
                texts.append(await resp.text())
        return "\n".join(texts)


StartFly = Callable[..., Awaitable[Fly]]


@pytest.fixture
async def start_fly(engine: str) -> AsyncIterator[StartFly]:
    """``start_fly(placement=..., fly_keys={...}, workers=(...), **edge_kwargs)``: the 3 web
    Machines of app ``demo`` behind one edge; ``workers`` are extra Machines of group ``worker``
    (a demo app each, no proxy: a worker does not serve HTTP; with ``worker_nodes`` a proxy node
    runs on each too, with ``process_group: worker``, as when one image runs it in every group)."""
    made: list[Fly] = []

    async def factory(placement: str = "local", fly_keys: dict[str, Any] | None = None,
                      workers: tuple[str, ...] = (), worker_nodes: bool = False, **edge_kwargs: Any) -> Fly:
        store = MemoryPinStore(pin_ttl=3600)
        shared = MemorySharedState()
        runners: list[web.AppRunner] = []
        app_ports: dict[str, int] = {}
        for m in (*MACHINES, *workers):
            runner, app_ports[m] = await start_backend(m)
            runners.append(runner)
        node_ports = {m: _free_port() for m in (*MACHINES, *(workers if worker_nodes else ()))}
        edge = FlyEdge({m: f"http://127.0.0.1:{node_ports[m]}" for m in MACHINES}, **edge_kwargs)
        for m in MACHINES:
            edge.set_machine_group(m, "web")
        for w in workers:
            edge.add_machine(w, f"http://127.0.0.1:{node_ports.get(w, app_ports[w])}", group="worker")
        await edge.start()
        nodes: dict[str, ProxyServer] = {}
        keys = {k: (v.format(edge=edge.url) if isinstance(v, str) else v) for k, v in (fly_keys or {}).items()}
        for m in node_ports:
            config = fly_config(m, app_ports[m], node_ports, placement, engine=engine)
            group = {"process_group": "worker"} if m in workers else {}
            # The demo apps never fail here, but edge, nodes, apps and clients share this test's one
            # event loop: under load a stall past fly_config's 0.3 s probe timeout marked every
            # local app down at once (unhealthy_after 1), and local placement then rightly chose
            # another Machine for a fallback (loop guard, not a re-pin here).
            config = replace(config, fly=replace(config.fly, **{**keys, **group}),
                             health=replace(config.health, timeout=5.0))
            nodes[m] = ProxyServer(config, store=store, shared=shared)
            await nodes[m].start()
        fly = Fly(edge, nodes, store, runners)
        made.append(fly)
        return fly

    yield factory
    for fly in made:
        await fly.edge.stop()
        for node in fly.nodes.values():
            await node.stop()
        for runner in fly.runners:
            await runner.cleanup()


#: Membership from the Machines API slice the edge serves (so it follows the edge's Machines).
API = {"discovery": "api", "api_url": "{edge}", "api_token": "test-token", "discovery_interval": 0.2}


async def _members(fly: Fly) -> None:
    """Wait until every web node's discovery lists exactly the web Machines."""
    for m in MACHINES:
        await wait_until(lambda n=fly.nodes[m]: {i.id for i in n.ctx.membership.current().instances} == set(MACHINES),
                         timeout=10)


# ---------------------------------------------------------------------------- fallbacks


@pytest.mark.parametrize("placement", ["local", "hash"])
@pytest.mark.parametrize("fallback_replay_src", [False, True], ids=["fallback-without-src", "fallback-with-src"])
async def test_fallbacks_are_never_replayed_again(
    start_fly: StartFly, http, fallback_replay_src: bool, placement: str
) -> None:
    """500 requests, each of a user pinned to a Machine the edge no longer has (destroyed; the
    nodes' static membership still lists it): every replay comes back as a fallback, which is
    served where it lands and re-pins the user there. 0 PA03, 0 errors, under both readings of
    Fly's docs (with and without fly-replay-src on the fallback)."""
    fly = await start_fly(placement=placement, fallback_replay_src=fallback_replay_src)
    users = [f"fb-{i}" for i in range(500)]
    for user in users:
        await fly.store.set(user, InstanceId("m3"))
    fly.edge.set_machine_state("m3", "destroyed")
    statuses: Counter[int] = Counter()
    limit = asyncio.Semaphore(50)

    async def one(user: str) -> None:
        async with limit, http.get(fly.edge.url + "/", headers={"X-User-Id": user}) as resp:
            statuses[resp.status] += 1
            if resp.status == 200:
                assert (await resp.json())["instance"] != "m3"

    await asyncio.gather(*(one(u) for u in users))
    stats = fly.edge.stats()
    reading = "with" if fallback_replay_src else "without"
    print(f"\nfallbacks ({reading} fly-replay-src, {placement}): statuses={dict(statuses)} "
          f"edge errors={stats['error_codes']} replays={stats['replays']} replay_counts={stats['replay_counts']}")
    assert statuses == Counter({200: 500}), statuses
    assert stats["error_codes"] == {}, "no PA03 (and no other edge error)"
    assert stats["replays"] == 500, "each was replayed once, and its fallback never again"
    for user in users:
        pin = await fly.store.get(user)
        assert pin is not None and pin.instance != "m3"
    metrics = await fly.metrics(http)
    repinned = metric_value(metrics, "affinity_repins_total", {"repin_reason": "replay_failed"})
    guarded = metric_value(metrics, "affinity_replay_loops_prevented_total")
    if placement == "local":  # re-pinned where the fallback landed
        assert (repinned, guarded) == (500, 0)
    else:  # the ring chose another Machine for some: served here anyway, re-pinned here (loop guard)
        assert repinned + guarded == 500 and guarded > 0
    assert metric_value(metrics, "affinity_replays_total") == 500


async def test_a_replay_from_a_fallback_is_pa03_at_the_edge(start_fly: StartFly, http) -> None:
    """The stand-in models Fly's rule itself: a Machine that answers a fallback with fly-replay
    gets PA03 (docs/fly-protocol.md section 1)."""
    fly = await start_fly()
    hop = fly.edge.router.replay(fly.edge.router.machines["m1"], "instance=gone1;fallback=force_self", 0.0)
    assert isinstance(hop, Hop) and hop.is_fallback and hop.machine.id == "m1"
    error = fly.edge.next_after_replay(hop, "instance=m2", 2, True)
    assert isinstance(error, EdgeError) and error.code == "PA03"


# ---------------------------------------------------------------------------- a router app


async def _behind_router_app(fly: Fly, start_machine: Callable[..., Awaitable[Any]]) -> None:
    """Client traffic enters a separate router app (Machine r1) that answers every request with
    ``fly-replay: app=demo;state=router``; Fly then load balances it over our Machines."""
    router = await start_machine("r1", replay="app=demo;state=router")
    fly.edge.router.app = "router"  # the edge's client traffic goes to the router app
    fly.edge.add_machine("r1", router.url, app="router")
    for m in MACHINES:
        fly.edge.router.machines[m].app = "demo"


async def test_a_router_app_replaying_in_with_app_gets_affinity(start_fly: StartFly, start_machine, http) -> None:
    """A request replayed to us by a router app is never answered with another replay: the node
    that got it forwards it over the private network to the user's Machine (affinity, no extra
    replay, no loop guard)."""
    fly = await start_fly()
    await _behind_router_app(fly, start_machine)
    owners: dict[str, str] = {}
    for i in range(30):
        user = f"routed-{i}"
        await fly.store.set(user, InstanceId(MACHINES[i % 3]))
        owners[user] = MACHINES[i % 3]
    served: Counter[str] = Counter()
    for user, owner in owners.items():
        for _ in range(4):
            async with http.get(fly.edge.url + "/", headers={"X-User-Id": user}) as resp:
                assert resp.status == 200, await resp.text()
                got = (await resp.json())["instance"]
                assert got == owner, "affinity through the router app"
                served[got] += 1
    stats = fly.edge.stats()
    metrics = await fly.metrics(http)
    forwarded = metric_value(metrics, "affinity_requests_total", {"action": "forward", "reason": "pin"})
    print(f"\nrouter app: served={dict(served)} replay_counts={stats['replay_counts']} errors={stats['error_codes']}"
          f" our replays={metric_value(metrics, 'affinity_replays_total')}")
    assert stats["error_codes"] == {}
    assert set(stats["replay_counts"]) == {"1"}, "the router's replay only: none of ours"
    assert stats["replay_counts"]["1"] == 120
    assert metric_value(metrics, "affinity_replays_total") == 0
    assert metric_value(metrics, "affinity_replay_loops_prevented_total") == 0
    assert forwarded > 120, "each served on its pin; those that landed elsewhere are counted twice (then on the owner)"


async def test_a_router_app_websocket_reaches_the_users_machine(start_fly: StartFly, start_machine, http) -> None:
    """A WebSocket upgrade replayed in by a router app is relayed over the private network too."""
    fly = await start_fly()
    await _behind_router_app(fly, start_machine)
    for i in range(6):
        user, owner = f"ws-{i}", MACHINES[i % 3]
        await fly.store.set(user, InstanceId(owner))
        async with http.ws_connect(fly.edge.url + "/ws", headers={"X-User-Id": user}) as ws:
            await ws.send_str("whoami")
            assert (await ws.receive_str()) == owner
            await ws.send_str("hello")
            assert (await ws.receive_str()) == "hello"
    stats = fly.edge.stats()
    assert stats["error_codes"] == {}
    assert metric_value(await fly.metrics(http), "affinity_replays_total") == 0


@pytest.mark.parametrize("how", ["destroyed", "unreachable"])
async def test_a_router_app_user_whose_machine_is_gone_is_served_where_it_lands(
    start_fly: StartFly, start_machine, http, how: str
) -> None:
    """The user's Machine is gone: destroyed (discovery drops it) or listed but unreachable (its
    node refuses connections; static discovery). The request is served on the Machine it landed
    on and the user is re-pinned there: 0 errors, 0 replays of ours."""
    fly = await start_fly(fly_keys=API if how == "destroyed" else None)
    await _behind_router_app(fly, start_machine)
    users = [f"lost-{i}" for i in range(12)]
    for user in users:
        await fly.store.set(user, InstanceId("m3"))
    fly.edge.set_machine_state("m3", "destroyed")
    if how == "destroyed":
        for m in ("m1", "m2"):
            await wait_until(lambda n=fly.nodes[m]: "m3" not in {i.id for i in n.ctx.membership.current().instances},
                             timeout=10)
    else:
        await fly.nodes["m3"].stop()
    landed: dict[str, str] = {}
    for user in users:
        async with http.get(fly.edge.url + "/", headers={"X-User-Id": user}) as resp:
            assert resp.status == 200, await resp.text()
            landed[user] = (await resp.json())["instance"]
            assert landed[user] in ("m1", "m2")
    for user in users:
        pin = await fly.store.get(user)
        assert pin is not None and pin.instance == landed[user], "re-pinned where it was served"
        async with http.get(fly.edge.url + "/", headers={"X-User-Id": user}) as resp:
            assert (await resp.json())["instance"] == landed[user], "and kept there"
    stats = fly.edge.stats()
    print(f"\nrouter app, m3 {how}: landed={Counter(landed.values())} errors={stats['error_codes']}")
    assert stats["error_codes"] == {}
    assert set(stats["replay_counts"]) == {"1"}
    metrics = "\n".join([await _node_metrics(fly.nodes[m], http) for m in ("m1", "m2")])
    assert metric_value(metrics, "affinity_replays_total") == 0


async def _node_metrics(node: ProxyServer, http: aiohttp.ClientSession) -> str:
    async with http.get(f"http://127.0.0.1:{node.admin_port}/metrics") as resp:
        return await resp.text()


# ---------------------------------------------------------------------------- local placement


@pytest.mark.parametrize("placement", ["local", "hash"])
async def test_new_anonymous_sessions_stay_where_the_edge_sent_them(start_fly: StartFly, http, placement: str) -> None:
    fly = await start_fly(placement=placement)
    served: Counter[str] = Counter()
    cookies: list[tuple[str, str]] = []
    for _ in range(300):
        async with http.get(fly.edge.url + "/") as resp:
            assert resp.status == 200
            instance = (await resp.json())["instance"]
            served[instance] += 1
            cookie = affinity_cookie(resp)
            assert cookie
            cookies.append((cookie, instance))
    replays = fly.edge.replays
    print(f"\nplacement {placement}: 300 new anonymous sessions, replays={replays}, served={dict(served)}")
    assert set(served) == set(MACHINES), "the edge spreads them; the proxy keeps them"
    metrics = await fly.metrics(http)
    if placement == "local":
        assert replays == 0
        assert metric_value(metrics, "affinity_requests_total", {"action": "forward", "reason": "local"}) == 300
    else:
        assert replays > 0  # (n-1)/n of them are replayed away from the Machine the edge chose
    for cookie, instance in cookies[:30]:  # each session keeps its Machine afterwards
        async with http.get(fly.edge.url + "/", headers={"Cookie": f"{COOKIE}={cookie}"}) as resp:
            assert (await resp.json())["instance"] == instance


# ---------------------------------------------------------------------------- process groups


@pytest.mark.parametrize("discovery", ["api", "dns", "redis"])
async def test_a_web_and_worker_app_never_pins_a_worker(start_fly: StartFly, http, discovery: str) -> None:
    """``process_group: web`` with two worker Machines in the same app, for each discovery source:
    the Machines API slice the edge serves (``metadata.fly_process_group`` filter); Fly's DNS
    (``vms`` TXT lists the workers too, ``web.process.demo.internal`` AAAA only the web Machines'
    addresses); Redis heartbeats (a proxy node runs on the workers too and publishes group
    ``worker``). Hash placement spreads users over every member, so a worker member would get
    pins: none may."""
    workers = ("w1", "w2")
    keys: dict[str, Any] = {"process_group": "web"}
    async with contextlib.AsyncExitStack() as stack:
        if discovery == "api":
            keys.update(API)
        elif discovery == "dns":
            dns = await stack.enter_async_context(DnsServer())
            address = {m: f"fdaa:0:1:a7b:1::{n + 2:x}" for n, m in enumerate((*MACHINES, *workers))}
            dns.set_txt("vms.demo.internal", ",".join(f"{m} lcl" for m in address))
            dns.set_txt("all.vms.demo.internal", ",".join(f"{m} lcl" for m in address))
            for m, a in address.items():
                dns.set_aaaa(f"{m}.vm.demo.internal", a)
            dns.set_aaaa("web.process.demo.internal", *(address[m] for m in MACHINES))
            dns.set_aaaa("worker.process.demo.internal", *(address[w] for w in workers))
            keys.update(discovery="dns", dns_server=dns.address, discovery_interval=0.2)
        else:
            keys.update(discovery="redis", discovery_interval=0.2)
        fly = await start_fly(placement="hash", workers=workers, worker_nodes=discovery == "redis",
                              fly_keys=keys, http_group="web")
        await _members(fly)
        await _web_users_stay_on_web(fly, http, discovery)
        if discovery == "redis":  # the workers' nodes see only the workers: the filter, not a lack of reports
            for w in workers:
                await wait_until(lambda n=fly.nodes[w]: {i.id for i in n.ctx.membership.current().instances}
                                 == set(workers), timeout=10)


async def _web_users_stay_on_web(fly: Fly, http: aiohttp.ClientSession, label: str) -> None:
    for i in range(200):
        async with http.get(fly.edge.url + "/", headers={"X-User-Id": f"grp-{i}"}) as resp:
            assert resp.status == 200, await resp.text()
            assert (await resp.json())["instance"] in MACHINES
    counts = await fly.store.counts()
    print(f"\nweb+worker ({label}): pins per Machine {dict(counts)}, edge errors {fly.edge.stats()['error_codes']}")
    assert set(counts) <= set(MACHINES) and sum(counts.values()) == 200
    assert fly.edge.stats()["error_codes"] == {}


# ---------------------------------------------------------------------------- hard_limit


@pytest.mark.parametrize("reading", ["wait", "no_candidate"])
@pytest.mark.parametrize("prefer_instance", [False, True], ids=["instance", "prefer_instance"])
async def test_a_machine_at_its_hard_limit_keeps_its_pins(
    start_fly: StartFly, http, reading: str, prefer_instance: bool
) -> None:
    """m3 is at its hard_limit: its users are served elsewhere for now (after the replay's
    timeout, or at once), with no error, and keep their pin; once m3 has room they are back."""
    fly = await start_fly(hard_limit_instance=reading,
                          fly_keys={"prefer_instance": prefer_instance, "replay_timeout": 0.3, **API})
    await _members(fly)
    users = [f"full-{i}" for i in range(6)]
    for user in users:
        await fly.store.set(user, InstanceId("m3"))
    fly.edge.set_machine_load("m3", hard_limit=1, busy=1)
    for user in users:
        for _ in range(2):
            async with http.get(fly.edge.url + "/", headers={"X-User-Id": user}) as resp:
                assert resp.status == 200, await resp.text()
                assert (await resp.json())["instance"] in ("m1", "m2")
    assert fly.edge.stats()["error_codes"] == {}
    for user in users:
        pin = await fly.store.get(user)
        assert pin is not None and pin.instance == "m3", "a Machine at its hard_limit keeps its pins"
    fly.edge.set_machine_load("m3", hard_limit=1, busy=0)
    for user in users:
        async with http.get(fly.edge.url + "/", headers={"X-User-Id": user}) as resp:
            assert (await resp.json())["instance"] == "m3"
    metrics = await fly.metrics(http)
    assert metric_value(metrics, "affinity_requests_total", {"action": "forward", "reason": "fallback"}) == 12


# ---------------------------------------------------------------------------- Machines API rate limits


async def test_machines_api_polling_stays_within_the_rate_limit(start_fly: StartFly, http) -> None:
    """3 nodes discover over the Machines API every 0.2 s, the stand-in allows 1 list call a second
    (bursts of 3) and answers 429 with Retry-After beyond: one node polls per interval for the app
    (the shared lock), 429s back every node off, and membership still follows the API (a
    destroyed Machine leaves every node's view; requests see no error)."""
    fly = await start_fly(fly_keys=API, api_rate=1.0, api_burst=3.0)
    await _members(fly)
    loop = asyncio.get_running_loop()
    started, calls = loop.time(), fly.edge.api_calls
    fly.edge.set_machine_state("m3", "destroyed")
    for m in ("m1", "m2"):
        await wait_until(lambda n=fly.nodes[m]: "m3" not in {i.id for i in n.ctx.membership.current().instances},
                         timeout=15)
    for i in range(20):
        async with http.get(fly.edge.url + "/", headers={"X-User-Id": f"rl-{i}"}) as resp:
            assert resp.status == 200
    await wait_until(lambda: fly.edge.api_calls >= calls + 6, timeout=30)  # a few seconds of polling to report
    elapsed = loop.time() - started
    stats = fly.edge.stats()
    print(f"\nMachines API: {stats['api_calls']} calls ({stats['api_limited']} answered 429) from 3 nodes polling "
          f"every 0.2 s; {stats['api_calls'] - calls} in the last {elapsed:.1f} s (uncoordinated: about "
          f"{3 * elapsed / 0.2:.0f})")
    assert stats["error_codes"] == {}
