"""Functional fixtures: real demo backends on 127.0.0.1:0 and a real proxy server in this loop."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace

import aiohttp
import pytest
from aiohttp import web

from affinity_proxy.config import Config, CookieConfig, HealthConfig, InstanceConfig, LimitsConfig, UserKeySourceConfig
from affinity_proxy.devtools.demo.backend import start_backend
from affinity_proxy.serve.app import ProxyServer


class Backends:
    """A set of running demo backends that tests can stop and start again on the same port."""

    def __init__(self) -> None:
        self.runners: dict[str, web.AppRunner] = {}
        self.ports: dict[str, int] = {}

    async def start(self, instance_id: str, port: int = 0) -> int:
        runner, bound = await start_backend(instance_id, port=port)
        self.runners[instance_id] = runner
        self.ports[instance_id] = bound
        return bound

    async def stop(self, instance_id: str) -> None:
        runner = self.runners.pop(instance_id)
        await runner.cleanup()

    async def close(self) -> None:
        for runner in list(self.runners.values()):
            await runner.cleanup()
        self.runners.clear()

    def instance_configs(self, ids: list[str] | None = None) -> tuple[InstanceConfig, ...]:
        ids = ids or list(self.ports)
        return tuple(InstanceConfig(i, f"http://127.0.0.1:{self.ports[i]}") for i in ids)


@pytest.fixture
async def backends() -> AsyncIterator[Backends]:
    b = Backends()
    for name in ("a", "b", "c"):
        await b.start(name)
    yield b
    await b.close()


def make_config(backends: Backends, **overrides: object) -> Config:
    base = Config(
        listen="127.0.0.1:0",
        admin_listen="127.0.0.1:0",
        instances=backends.instance_configs(),
        cookie=CookieConfig(secret="test-secret-" + "x" * 20),
        user_key=(UserKeySourceConfig("header", "X-User-Id"), UserKeySourceConfig("query", "userId")),
        # timeout 1 s: a loaded CI machine must not fail a probe of a healthy demo backend (a 0.3 s
        # timeout once marked every instance down under a parallel test run)
        health=HealthConfig(interval=0.3, timeout=1.0, unhealthy_after=1, healthy_after=1),
        limits=LimitsConfig(upstream_timeout=5.0, upstream_connect_timeout=1.0),
    )
    return replace(base, **overrides)  # type: ignore[arg-type]


ProxyFactory = Callable[..., Awaitable[ProxyServer]]


@pytest.fixture
async def start_proxy() -> AsyncIterator[ProxyFactory]:
    servers: list[ProxyServer] = []

    async def factory(config: Config, **kwargs: object) -> ProxyServer:
        server = ProxyServer(config, **kwargs)  # type: ignore[arg-type]
        await server.start()
        servers.append(server)
        return server

    yield factory
    for server in servers:
        await server.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A client with no cookie jar (tests manage cookies explicitly)."""
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
        yield session


def random_secret() -> str:
    return secrets.token_urlsafe(24)


# `serve --workers N` subprocess fixtures, shared by the worker and multi-node process tests.
from tests.functional.test_workers import fresh_connections, start_serve  # noqa: E402, F401
