"""The aiohttp engine's own tests (``affinity_proxy/engines/aiohttp``: ``forward_http``,
``relay_websocket``, ``UpstreamClient``), which only that engine has; what both engines do is tested
in ``tests/functional``, ``tests/fly`` and ``tests/robustness`` on each.

Fixtures: demo instances and a tiny proxy app, all real servers on port 0.

The proxy app's catch-all handler does what the real request handler does with our API: build the
upstream headers, call ``forward_http``/``relay_websocket``, map ``BodyTooLarge``/``UpstreamError``
to JSON and retry a retryable failure on a fallback instance. It records every outcome so tests can
assert on the exceptions themselves, not only on status codes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web

from affinity_proxy.devtools.demo.backend import BACKEND_STATE, BackendState, start_backend
from affinity_proxy.devtools.ports import free_port
from affinity_proxy.engines.aiohttp.client import BodyTooLarge, UpstreamClient, UpstreamError
from affinity_proxy.engines.aiohttp.forward import forward_http
from affinity_proxy.engines.aiohttp.websocket import relay_websocket
from affinity_proxy.proxy.headers import upstream_request_headers

FORCE_HEADER = "fly-force-instance-id"


@dataclass
class Backend:
    runner: web.AppRunner
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def state(self) -> BackendState:
        return self.runner.app[BACKEND_STATE]


@dataclass
class ProxySettings:
    """What the test proxy does; tests may change fields between requests."""

    target: str
    fallback: str | None = None
    max_body_bytes: int = 128 * 1024 * 1024
    max_message_bytes: int = 1024 * 1024
    heartbeat: float | None = None
    extra: list[tuple[str, str]] = field(default_factory=lambda: [("X-Fly-Instance", "b1")])
    errors: list[BaseException] = field(default_factory=list)
    completed: int = 0


PROXY = web.AppKey("proxy_settings", ProxySettings)
CLIENT = web.AppKey("upstream_client", UpstreamClient)


def _is_upgrade(request: web.Request) -> bool:
    return (
        request.headers.get("Upgrade", "").lower() == "websocket"
        and "upgrade" in request.headers.get("Connection", "").lower()
    )


async def proxy_handler(request: web.Request) -> web.StreamResponse:
    settings = request.app[PROXY]
    client = request.app[CLIENT]
    headers = upstream_request_headers(
        request.headers,
        client_ip=request.remote,
        scheme=request.scheme,
        host=request.headers.get("Host"),
        request_id="req-test-1",
        drop=(FORCE_HEADER,),
    )
    targets = [settings.target] + ([settings.fallback] if settings.fallback else [])
    for attempt, target in enumerate(targets):
        try:
            if _is_upgrade(request):
                response: web.StreamResponse = await relay_websocket(
                    request,
                    target,
                    client,
                    upstream_headers=headers,
                    extra_response_headers=settings.extra,
                    max_message_bytes=settings.max_message_bytes,
                    heartbeat=settings.heartbeat,
                )
            else:
                response = await forward_http(
                    request,
                    target,
                    client,
                    extra_response_headers=settings.extra,
                    upstream_headers=headers,
                    max_body_bytes=settings.max_body_bytes,
                )
            settings.completed += 1
            return response
        except BodyTooLarge as exc:
            settings.errors.append(exc)
            return web.json_response({"error": "body_too_large"}, status=exc.status)
        except UpstreamError as exc:
            settings.errors.append(exc)
            if exc.retryable and attempt + 1 < len(targets):
                continue
            return web.json_response({"error": f"upstream_{exc.kind}"}, status=exc.status)
    raise AssertionError("unreachable")


@dataclass
class Proxy:
    runner: web.AppRunner
    port: int
    settings: ProxySettings
    client: UpstreamClient

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


ProxyFactory = Callable[..., Awaitable[Proxy]]


@pytest.fixture
async def start_instance() -> AsyncIterator[Callable[[str], Awaitable[Backend]]]:
    runners: list[web.AppRunner] = []

    async def factory(instance_id: str) -> Backend:
        runner, port = await start_backend(instance_id)
        runners.append(runner)
        return Backend(runner, port)

    yield factory
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def backend(start_instance: Callable[[str], Awaitable[Backend]]) -> Backend:
    return await start_instance("b1")


@pytest.fixture
async def start_proxy() -> AsyncIterator[ProxyFactory]:
    """Factory: ``await start_proxy(target_url, connect_timeout=..., read_timeout=..., limit=..., **settings)``."""
    started: list[Proxy] = []

    async def factory(
        target: str,
        *,
        connect_timeout: float = 2.0,
        read_timeout: float = 10.0,
        limit: int = 100,
        **settings: object,
    ) -> Proxy:
        client = UpstreamClient(connect_timeout=connect_timeout, read_timeout=read_timeout, limit=limit)
        app = web.Application()
        app[PROXY] = ProxySettings(target=target, **settings)  # type: ignore[arg-type]
        app[CLIENT] = client
        app.cleanup_ctx.append(client.cleanup_ctx)
        app.router.add_route("*", "/{tail:.*}", proxy_handler)
        runner = web.AppRunner(app, shutdown_timeout=2.0)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        proxy = Proxy(runner, int(runner.addresses[0][1]), app[PROXY], client)
        started.append(proxy)
        return proxy

    yield factory
    for proxy in started:
        await proxy.runner.cleanup()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
        yield session


@pytest.fixture
def dead_url() -> str:
    """An http URL on 127.0.0.1 where nothing listens (connections are refused)."""
    return f"http://127.0.0.1:{free_port()}"  # outside the ephemeral range: no client takes it meanwhile
