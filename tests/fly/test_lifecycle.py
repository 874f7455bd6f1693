"""Lifecycle-aware reaping in fly mode: a bluegreen deploy destroys every Machine (users re-pinned,
old pins reaped); an autostopped Machine keeps its pins (a replay wakes it)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace

import aiohttp
import pytest

from affinity_proxy.admin.api import REAPER
from affinity_proxy.config import ReaperConfig
from affinity_proxy.devtools.demo.backend import start_backend
from affinity_proxy.devtools.fly import FlyEdge
from affinity_proxy.membership.shared import MemorySharedState
from affinity_proxy.pins.memory import MemoryPinStore
from affinity_proxy.routing.model import InstanceId, InstanceState
from affinity_proxy.serve.app import ProxyServer
from tests.fly.test_fly_mode import _free_port, fly_config
from tests.functional.helpers import metric_value
from tests.support.waiting import wait_until


class Fleet:
    """Machines (node + app each) that share one pin store and shared state, behind one edge."""

    def __init__(self, engine: str) -> None:
        self.engine = engine
        self.store = MemoryPinStore(pin_ttl=3600)
        self.shared = MemorySharedState()
        self.edge = FlyEdge({})
        self.nodes: dict[str, ProxyServer] = {}
        self.apps: dict[str, object] = {}

    async def deploy(self, ids: list[str]) -> None:
        ports = {m: _free_port() for m in ids}
        for m in ids:
            runner, app_port = await start_backend(m)
            self.apps[m] = runner
            config = fly_config(m, app_port, ports, engine=self.engine)
            config = replace(config, reaper=ReaperConfig(interval=0.2, grace=0.5))
            node = ProxyServer(config, store=self.store, shared=self.shared)
            await node.start()
            self.nodes[m] = node
            self.edge.add_machine(m, f"http://127.0.0.1:{ports[m]}")

    async def destroy(self, machine: str) -> None:
        self.edge.set_machine_state(machine, "destroyed")
        await self.nodes.pop(machine).stop()
        await self.apps.pop(machine).cleanup()  # type: ignore[attr-defined]

    async def close(self) -> None:
        await self.edge.stop()
        for m in list(self.nodes):
            await self.destroy(m)


@pytest.fixture
async def fleet(engine: str) -> AsyncIterator[Fleet]:
    f = Fleet(engine)
    await f.edge.start()
    yield f
    await f.close()


async def _owner(http: aiohttp.ClientSession, fleet: Fleet, user: str) -> str:
    async with http.get(fleet.edge.url + "/", headers={"X-User-Id": user}) as resp:
        assert resp.status == 200, await resp.text()
        return str((await resp.json())["instance"])


async def test_bluegreen_deploy_repins_every_user_and_reaps_old_pins(fleet) -> None:
    await fleet.deploy(["blue1", "blue2", "blue3"])
    users = [f"bg-user-{i}" for i in range(60)]
    idle = [f"bg-idle-{i}" for i in range(25)]  # pinned to blue, never seen again: only the reaper cleans them
    async with aiohttp.ClientSession() as http:
        before = {u: await _owner(http, fleet, u) for u in users}
        assert set(before.values()) == {"blue1", "blue2", "blue3"}
        for u in idle:
            await _owner(http, fleet, u)
        # bluegreen: boot the green Machines, then destroy every blue one
        await fleet.deploy(["green1", "green2", "green3"])
        for m in ("blue1", "blue2", "blue3"):
            await fleet.destroy(m)
        after = {u: await _owner(http, fleet, u) for u in users}
        assert set(after.values()) <= {"green1", "green2", "green3"}
        again = {u: await _owner(http, fleet, u) for u in users}
        assert again == after, "re-pinned users stay put"

        async def blue_pins_reaped() -> bool:
            counts = await fleet.store.counts()
            return not any(counts.get(InstanceId(b), 0) for b in ("blue1", "blue2", "blue3"))

        await wait_until(blue_pins_reaped, timeout=10)
        texts = []
        for node in fleet.nodes.values():
            async with http.get(f"http://127.0.0.1:{node.admin_port}/metrics") as resp:
                texts.append(await resp.text())
        metrics = "\n".join(texts)
    assert metric_value(metrics, "affinity_repins_total", {"repin_reason": "gone"}) == len(users)
    assert metric_value(metrics, "affinity_orphaned_pins_reaped_total") == len(idle)
    # every pin was either re-pinned by a request (CAS replaced it) or reaped: none is left on blue
    assert sum((await fleet.store.counts()).values()) == len(users)


async def test_stopped_machine_pins_survive_the_reaper(fleet) -> None:
    await fleet.deploy(["s1", "s2"])
    users = [f"stop-user-{i}" for i in range(30)]
    async with aiohttp.ClientSession() as http:
        owners = {u: await _owner(http, fleet, u) for u in users}
        on_s2 = sum(1 for o in owners.values() if o == "s2")
        assert on_s2 > 0
        fleet.edge.set_machine_state("s2", "stopped")
        for node in fleet.nodes.values():  # what discovery reports for an autostopped Machine
            view = node.ctx.membership.current()
            node.ctx.membership.set_instances(
                replace(i, state=InstanceState.STOPPED if i.id == "s2" and not i.local else InstanceState.UP)
                for i in view.instances
            )
        # let several reaper passes run (interval 0.2 s, grace 0.5 s)
        await wait_until(lambda: all(n.ctx.membership.current().state_of("s2") is not InstanceState.DOWN
                                     for n in fleet.nodes.values()), timeout=5)
        for node in fleet.nodes.values():
            await node.admin_app[REAPER].reap()
        assert (await fleet.store.counts()).get(InstanceId("s2"), 0) == on_s2
        for user, owner in owners.items():
            assert await _owner(http, fleet, user) == owner
