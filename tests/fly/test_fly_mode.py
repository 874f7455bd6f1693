"""Fly mode end to end: 3 Machines (an affinity-proxy node + a demo app each) behind the local Fly edge.

All nodes share one pin store (in this process, one memory store object stands in for Redis).
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import io
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace

import aiohttp
import pytest
from aiohttp import web

from affinity_proxy.config import (
    Config,
    CookieConfig,
    FlyConfig,
    HealthConfig,
    InstanceConfig,
    LimitsConfig,
    UserKeySourceConfig,
)
from affinity_proxy.devtools.demo.backend import start_backend
from affinity_proxy.devtools.fly import FlyEdge
from affinity_proxy.devtools.ports import free_port as _free_port
from affinity_proxy.membership.shared import MemorySharedState
from affinity_proxy.pins.memory import MemoryPinStore
from affinity_proxy.routing.model import InstanceId, InstanceState
from affinity_proxy.serve.app import ProxyServer
from tests.functional.helpers import COOKIE, affinity_cookie, metric_value

MACHINES = ("m1", "m2", "m3")


@dataclass
class Cluster:
    edge: FlyEdge
    nodes: dict[str, ProxyServer]
    apps: dict[str, web.AppRunner]
    store: MemoryPinStore
    node_ports: dict[str, int] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.edge.url

    async def metrics(self, http: aiohttp.ClientSession) -> str:
        texts = []
        for node in self.nodes.values():
            async with http.get(f"http://127.0.0.1:{node.admin_port}/metrics") as resp:
                texts.append(await resp.text())
        return "\n".join(texts)

    def set_state_everywhere(self, machine: str, state: InstanceState | None) -> None:
        """What discovery would tell every node (None: the Machine is gone from DNS)."""
        for node in self.nodes.values():
            members = []
            for inst in node.ctx.membership.current().instances:
                if inst.id != machine:
                    members.append(replace(inst, state=InstanceState.UP))  # discovery: started
                elif state is not None:
                    members.append(replace(inst, state=state))
            node.ctx.membership.set_instances(members)


def fly_config(machine: str, app_port: int, node_ports: dict[str, int], placement: str = "local", *,
               engine: str) -> Config:
    return Config(
        engine=engine,
        mode="fly",
        listen=f"127.0.0.1:{node_ports[machine]}",
        admin_listen="127.0.0.1:0",
        instances=tuple(InstanceConfig(m, f"http://127.0.0.1:{p}") for m, p in node_ports.items()),
        cookie=CookieConfig(secret="fly-test-secret-" + "y" * 16),
        user_key=(UserKeySourceConfig("header", "X-User-Id"),),
        fly=FlyConfig(app="demo", machine_id=machine, region="lcl", upstream=f"http://127.0.0.1:{app_port}",
                      placement=placement),
        # a refused probe marks a stopped Machine down at once; the 2 s timeout only keeps a stall of
        # this test's one event loop (edge, nodes, apps and clients share it) on a loaded machine from
        # marking a healthy one down (a CI run saw 0.3 s do that)
        health=HealthConfig(interval=0.3, timeout=2.0, unhealthy_after=1, healthy_after=1),
        limits=LimitsConfig(upstream_connect_timeout=1.0, max_body_bytes=64 * 1024 * 1024),
    )


@pytest.fixture
def placement() -> str:
    """``fly.placement`` of every node (a test parametrizes ``placement`` to change it)."""
    return "local"


@pytest.fixture
async def cluster(placement: str, engine: str) -> AsyncIterator[Cluster]:
    store = MemoryPinStore(pin_ttl=3600)
    shared = MemorySharedState()  # drain marks shared like Redis would
    apps: dict[str, web.AppRunner] = {}
    app_ports: dict[str, int] = {}
    for m in MACHINES:
        apps[m], app_ports[m] = await start_backend(m)
    node_ports = {m: _free_port() for m in MACHINES}
    nodes: dict[str, ProxyServer] = {}
    for m in MACHINES:
        config = fly_config(m, app_ports[m], node_ports, placement, engine=engine)
        nodes[m] = ProxyServer(config, store=store, shared=shared)
        await nodes[m].start()
    edge = FlyEdge({m: f"http://127.0.0.1:{node_ports[m]}" for m in MACHINES})
    await edge.start()
    yield Cluster(edge, nodes, apps, store, node_ports)
    await edge.stop()
    for node in nodes.values():
        await node.stop()
    for runner in apps.values():
        await runner.cleanup()


@pytest.mark.parametrize("placement", ["hash"])
async def test_cookie_clients_always_end_on_their_machine_with_at_most_one_replay(cluster, http) -> None:
    clients = 30
    finals: dict[int, set[str]] = collections.defaultdict(set)

    async def client(i: int) -> None:
        cookie = None
        for _ in range(20):
            headers = {"Cookie": f"{COOKIE}={cookie}"} if cookie else {}
            async with http.get(cluster.url + "/page", headers=headers) as resp:
                assert resp.status == 200, await resp.text()
                body = await resp.json()
                finals[i].add(body["instance"])
                cookie = cookie or affinity_cookie(resp)
                assert cookie

    await asyncio.gather(*(client(i) for i in range(clients)))
    assert all(len(s) == 1 for s in finals.values()), finals
    assert set().union(*finals.values()) == set(MACHINES), "sessions spread over all machines"
    stats = cluster.edge.stats()
    assert set(stats["replay_counts"]) <= {"0", "1", 0, 1}, stats["replay_counts"]
    metrics = await cluster.metrics(http)
    assert metric_value(metrics, "affinity_replays_total") == cluster.edge.replays
    assert cluster.edge.replays > 0
    assert metric_value(metrics, "affinity_responses_total", {"code": "409"}) == cluster.edge.replays
    assert metric_value(metrics, "affinity_replay_loops_prevented_total") == 0


async def test_user_keys_are_pinned_across_machines(cluster, http) -> None:
    for i in range(40):
        seen = set()
        for _ in range(4):
            async with http.get(cluster.url + "/", headers={"X-User-Id": f"fly-user-{i}"}) as resp:
                assert resp.status == 200
                seen.add((await resp.json())["instance"])
        assert len(seen) == 1
    assert max(int(k) for k in cluster.edge.stats()["replay_counts"]) <= 1


async def test_stale_membership_never_causes_a_second_replay(cluster, http) -> None:
    # m2's node wrongly believes m3 is down: its users get re-pinned there or served there, never bounced
    cluster.nodes["m2"].ctx.membership.set_health(InstanceId("m3"), False)
    for i in range(60):
        async with http.get(cluster.url + "/", headers={"X-User-Id": f"stale-{i}"}) as resp:
            assert resp.status == 200, await resp.text()
    stats = cluster.edge.stats()
    assert max(int(k) for k in stats["replay_counts"]) <= 1, stats
    assert "PA02" not in str(stats["error_codes"])


async def test_destroyed_machine_users_are_repinned_without_errors(cluster, http) -> None:
    owners: dict[str, str] = {}
    for i in range(60):
        async with http.get(cluster.url + "/", headers={"X-User-Id": f"bg-{i}"}) as resp:
            owners[f"bg-{i}"] = (await resp.json())["instance"]
    assert "m3" in owners.values()
    cluster.edge.set_machine_state("m3", "destroyed")
    cluster.set_state_everywhere("m3", None)
    for user, owner in owners.items():
        async with http.get(cluster.url + "/", headers={"X-User-Id": user}) as resp:
            assert resp.status == 200, await resp.text()
            got = (await resp.json())["instance"]
            assert got != "m3"
            if owner != "m3":
                assert got == owner, "users of live machines never move"
    metrics = await cluster.metrics(http)
    assert metric_value(metrics, "affinity_repins_total", {"repin_reason": "gone"}) == sum(
        1 for o in owners.values() if o == "m3")


async def test_stopped_machine_keeps_its_pins(cluster, http) -> None:
    owners: dict[str, str] = {}
    for i in range(40):
        async with http.get(cluster.url + "/", headers={"X-User-Id": f"stop-{i}"}) as resp:
            owners[f"stop-{i}"] = (await resp.json())["instance"]
    cluster.edge.set_machine_state("m2", "stopped")
    cluster.set_state_everywhere("m2", InstanceState.STOPPED)
    for user, owner in owners.items():
        async with http.get(cluster.url + "/", headers={"X-User-Id": user}) as resp:
            assert (await resp.json())["instance"] == owner
    assert (await cluster.store.counts()).get(InstanceId("m2"), 0) == sum(1 for o in owners.values() if o == "m2")


async def test_large_upload_for_another_machine_goes_over_the_private_network(cluster, http) -> None:
    # find a user pinned to a machine other than the one the edge will pick first
    async with http.get(cluster.url + "/", headers={"X-User-Id": "uploader"}) as resp:
        owner = (await resp.json())["instance"]
    payload = b"u" * (5 * 1024 * 1024)
    digest = hashlib.sha256(payload).hexdigest()
    replays_before = cluster.edge.replays
    for _ in range(3):  # the edge round-robins, so at least two land on another machine
        async with http.post(cluster.url + "/upload", data=io.BytesIO(payload),
                             headers={"X-User-Id": "uploader"}) as resp:
            assert resp.status == 200, await resp.text()
            doc = await resp.json()
            assert doc["instance"] == owner
            assert doc["sha256"] == digest
    assert cluster.edge.replays == replays_before, "bodies over 1 MB are never replayed"


async def test_websocket_to_another_machine_ends_on_the_pinned_one(cluster, http) -> None:
    async with http.get(cluster.url + "/", headers={"X-User-Id": "ws-user"}) as resp:
        owner = (await resp.json())["instance"]
    for _ in range(3):
        async with http.ws_connect(cluster.url + "/ws", headers={"X-User-Id": "ws-user"}) as ws:
            await ws.send_str("whoami")
            assert (await ws.receive(timeout=5)).data == owner
            await ws.send_str("hello")
            assert (await ws.receive(timeout=5)).data == "hello"


@pytest.mark.parametrize("placement", ["hash"])
async def test_replay_answer_shape(cluster, http) -> None:
    node = cluster.nodes["m1"]
    for i in range(50):
        user = f"shape-{i}"
        async with http.get(f"http://127.0.0.1:{node.main_port}/", headers={"X-User-Id": user}) as resp:
            if resp.status == 409:
                assert resp.headers["fly-replay"].startswith("instance=m")
                assert resp.headers["fly-replay"].endswith(";state=affinity;timeout=10s;fallback=prefer_self")
                doc = await resp.json()
                assert doc["instance"] in ("m2", "m3") and doc["message"]
                return
    raise AssertionError("no user hashed to another machine")
