"""WebSockets through the proxy: pinned like any request, frames and close codes relayed."""

from __future__ import annotations

import asyncio

import aiohttp

from tests.functional.helpers import COOKIE, admin, affinity_cookie, base, metric_value
from tests.support.backends import make_config


async def test_fifty_concurrent_websockets_stay_on_their_pinned_instances(engine: str, backends, start_proxy,
                                                                          http) -> None:
    server = await start_proxy(make_config(backends, engine=engine))

    async def session(i: int) -> tuple[str, list[str]]:
        async with http.get(base(server) + "/") as resp:
            cookie = affinity_cookie(resp)
            pinned = (await resp.json())["instance"]
        answers = []
        async with http.ws_connect(base(server) + "/ws", headers={"Cookie": f"{COOKIE}={cookie}"}) as ws:
            for n in range(5):
                await ws.send_str("whoami")
                answers.append((await ws.receive(timeout=5)).data)
                await ws.send_str(f"echo {i} {n}")
                assert (await ws.receive(timeout=5)).data == f"echo {i} {n}"
            await ws.send_bytes(b"\x00\x01binary")
            assert (await ws.receive(timeout=5)).data == b"\x00\x01binary"
        return pinned, answers

    results = await asyncio.gather(*(session(i) for i in range(50)))
    for pinned, answers in results:
        assert answers == [pinned] * 5
    metrics = await (await http.get(admin(server) + "/metrics")).text()
    assert metric_value(metrics, "affinity_websocket_connections") == 0


async def test_websocket_close_code_is_relayed(engine: str, backends, start_proxy, http) -> None:
    server = await start_proxy(make_config(backends, engine=engine))
    async with http.ws_connect(base(server) + "/ws") as ws:
        await ws.send_str("close:4001")
        msg = await ws.receive(timeout=5)
        assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING)
        assert ws.close_code == 4001


async def test_websocket_gauge_counts_open_sessions(engine: str, backends, start_proxy, http) -> None:
    server = await start_proxy(make_config(backends, engine=engine))
    async with http.ws_connect(base(server) + "/ws") as ws:
        await ws.send_str("whoami")
        instance = (await ws.receive(timeout=5)).data
        metrics = await (await http.get(admin(server) + "/metrics")).text()
        assert metric_value(metrics, "affinity_websocket_connections", {"instance": instance}) == 1


async def test_websocket_to_dead_instance_is_repinned(engine: str, backends, start_proxy, http) -> None:
    server = await start_proxy(make_config(backends, engine=engine))
    async with http.get(base(server) + "/", headers={"X-User-Id": "wsuser"}) as resp:
        owner = (await resp.json())["instance"]
    await backends.stop(owner)
    async with http.ws_connect(base(server) + "/ws", headers={"X-User-Id": "wsuser"}) as ws:
        await ws.send_str("whoami")
        assert (await ws.receive(timeout=5)).data != owner
