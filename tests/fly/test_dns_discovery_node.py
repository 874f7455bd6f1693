"""A fly-mode node whose membership comes from Fly's internal DNS (a real DNS server on loopback):
started Machines are up, deployed-but-stopped ones keep their pins, destroyed ones are re-pinned."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest

from affinity_proxy.config import Config, CookieConfig, FlyConfig, HealthConfig, UserKeySourceConfig
from affinity_proxy.devtools.demo.backend import start_backend
from affinity_proxy.routing.model import InstanceState
from affinity_proxy.serve.app import ProxyServer
from tests.functional.helpers import metric_value
from tests.support.dns_server import DnsServer
from tests.support.waiting import wait_until


@pytest.fixture
async def dns() -> AsyncIterator[DnsServer]:
    async with DnsServer() as server:
        server.set_txt("vms.shop.internal", "m1 ams,m2 ams")
        server.set_txt("all.vms.shop.internal", "m1 ams,m2 ams,m3 ams")
        yield server


async def test_node_follows_dns_discovery(engine: str, dns) -> None:
    runner, app_port = await start_backend("m1")
    config = Config(
        engine=engine, mode="fly", listen="127.0.0.1:0", admin_listen="127.0.0.1:0",
        cookie=CookieConfig(secret="dns-test-secret-0123456789"),
        user_key=(UserKeySourceConfig("header", "X-User-Id"),),
        fly=FlyConfig(app="shop", machine_id="m1", region="ams", upstream=f"http://127.0.0.1:{app_port}",
                      discovery="dns", dns_server=dns.address, discovery_interval=0.2),
        health=HealthConfig(interval=0.5, timeout=0.5),
    )
    node = ProxyServer(config)
    await node.start()
    try:
        def states() -> dict[str, InstanceState]:
            return {i.id: i.state for i in node.ctx.membership.current().instances}

        await wait_until(lambda: states() == {"m1": InstanceState.UP, "m2": InstanceState.UP,
                                              "m3": InstanceState.STOPPED}, timeout=5)
        view = node.ctx.membership.current()
        assert view.get("m2").url == "http://m2.vm.shop.internal:8080"  # type: ignore[union-attr]
        assert view.get("m1").local and not view.get("m2").local  # type: ignore[union-attr]
        base = f"http://127.0.0.1:{node.main_port}"
        await node.ctx.store.set("on-m3", "m3")  # type: ignore[arg-type]
        await node.ctx.store.set("on-m2", "m2")  # type: ignore[arg-type]
        async with aiohttp.ClientSession() as http:
            async with http.get(base + "/", headers={"X-User-Id": "on-m3"}) as resp:
                assert resp.status == 409, "a stopped Machine keeps its users: the replay wakes it"
                assert resp.headers["fly-replay"].startswith("instance=m3")
            # m2 is destroyed: gone from both records
            dns.set_txt("vms.shop.internal", "m1 ams")
            dns.set_txt("all.vms.shop.internal", "m1 ams,m3 ams")
            await wait_until(lambda: "m2" not in states(), timeout=5)
            async with http.get(base + "/", headers={"X-User-Id": "on-m2"}) as resp:
                assert resp.status in (200, 409)
                if resp.status == 409:
                    assert "m2" not in resp.headers["fly-replay"]
            pin = await node.ctx.store.get("on-m2")
            assert pin is not None and pin.instance != "m2"
            # a DNS outage keeps the last membership: nobody is re-pinned
            dns.set_servfail("vms.shop.internal")
            before = states()
            async with http.get(base + "/", headers={"X-User-Id": "on-m3"}) as resp:
                assert resp.status == 409
            assert states() == before
            async with http.get(f"http://127.0.0.1:{node.admin_port}/metrics") as resp:
                text = await resp.text()
            assert metric_value(text, "affinity_repins_total", {"repin_reason": "gone"}) == 1
    finally:
        await node.stop()
        await runner.cleanup()
