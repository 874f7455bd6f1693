"""Tiny aiohttp apps acting as Fly Machines, and Fly edges (the stand-in) in front of them: the
``start_machine`` and ``start_edge`` fixtures of ``tests/fly`` (the proxy behind an edge) and
``tests/devtools/fly`` (the edge stand-in itself), imported into both conftests.

Every server is real and listens on 127.0.0.1 port 0. A ``FakeMachine`` records what it received
and either answers with ``fly-replay`` (``replay``), or echoes who it is and what it saw; it also
accepts WebSockets and echoes ``<id>:<message>``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict

from affinity_proxy.devtools.fly import FlyEdge


@dataclass
class Seen:
    method: str
    raw_path: str
    headers: CIMultiDict[str]
    body: bytes
    websocket: bool = False


@dataclass
class FakeMachine:
    id: str
    replay: str | None = None  # answer every request with this fly-replay value
    replay_status: int = 409
    read_body: bool = True
    replay_unless_failed: bool = False  # stop replaying once fly-replay-failed arrives
    refuse_ws: int | None = None  # answer upgrades with this plain status (no fly-replay)
    seen: list[Seen] = field(default_factory=list)
    ws_closes: list[int | None] = field(default_factory=list)
    runner: web.AppRunner | None = None
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _should_replay(self, request: web.Request) -> bool:
        if self.replay is None:
            return False
        return not (self.replay_unless_failed and "fly-replay-failed" in request.headers)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        upgrade = request.headers.get("Upgrade", "").lower() == "websocket"
        body = await request.read() if self.read_body and not upgrade else b""
        self.seen.append(Seen(request.method, request.raw_path, CIMultiDict(request.headers), body, upgrade))
        if self._should_replay(request):
            assert self.replay is not None
            return web.json_response(
                {"message": "replaying", "from": self.id},
                status=self.replay_status,
                headers={"fly-replay": self.replay},
            )
        if upgrade and self.refuse_ws is not None:
            return web.Response(status=self.refuse_ws, text="no websockets here", headers={"X-Machine": self.id})
        if upgrade:
            return await self._websocket(request)
        return web.json_response(
            {"machine": self.id, "method": request.method, "path": request.raw_path, "body_len": len(body)},
            headers={"X-Machine": self.id},
        )

    async def _websocket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(protocols=("chat",))
        await ws.prepare(request)
        async for msg in ws:
            if msg.type is aiohttp.WSMsgType.TEXT:
                if msg.data.startswith("close:"):
                    await ws.close(code=int(msg.data[6:]), message=b"bye")
                    break
                await ws.send_str(f"{self.id}:{msg.data}")
        self.ws_closes.append(ws.close_code)
        return ws


StartMachine = Callable[..., Awaitable[FakeMachine]]
StartEdge = Callable[..., Awaitable[FlyEdge]]


@pytest.fixture
async def start_machine() -> AsyncIterator[StartMachine]:
    started: list[FakeMachine] = []

    async def factory(machine_id: str, **kwargs: Any) -> FakeMachine:
        machine = FakeMachine(machine_id, **kwargs)
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", machine.handle)
        machine.runner = web.AppRunner(app, shutdown_timeout=1.0, access_log=None)
        await machine.runner.setup()
        site = web.TCPSite(machine.runner, "127.0.0.1", 0)
        await site.start()
        machine.port = int(machine.runner.addresses[0][1])
        started.append(machine)
        return machine

    yield factory
    for machine in started:
        assert machine.runner is not None
        await machine.runner.cleanup()


@pytest.fixture
async def start_edge() -> AsyncIterator[StartEdge]:
    edges: list[FlyEdge] = []

    async def factory(*machines: FakeMachine, urls: dict[str, str] | None = None, **kwargs: Any) -> FlyEdge:
        mapping = {m.id: m.url for m in machines} | (urls or {})
        edge = FlyEdge(mapping, **kwargs)
        await edge.start()
        edges.append(edge)
        return edge

    yield factory
    for edge in edges:
        await edge.stop()
