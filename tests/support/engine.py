"""The engines a proxy can run on, and the one ``engine`` fixture the functional, fly and
robustness suites run under (as uvicorn's tests run under ``http_protocol_cls``).

``engine`` is a config key (``engine: fast|aiohttp``), so a test runs on an engine by putting it in
the config it builds: ``make_config(backends, engine=engine)`` or ``Config(engine=engine, ...)``
for a proxy in the test's event loop, an ``engine: <name>`` line in the YAML file of an
``affinity-proxy serve`` subprocess (its hot reloads re-read that file). Nothing is patched.

``tests/functional``, ``tests/fly`` and ``tests/robustness`` import the fixture (``every_engine``,
named ``engine``) into their conftest: it is autouse there, so every test in them is collected once per engine
(``test_x[fast]``, ``test_x[aiohttp]``); ``tests/engines/test_engines_cover.py`` checks that. The shared
``start_proxy`` fixture refuses a config whose engine is not the test's.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import replace

import pytest

from affinity_proxy.config import Config
from affinity_proxy.serve.app import ProxyServer

ENGINES: tuple[str, ...] = ("fast", "aiohttp")
"""Every engine (``Config.ENGINES``), the default first: the order tests run on them."""

ProxyFactory = Callable[..., Awaitable[ProxyServer]]


@pytest.fixture(params=ENGINES, autouse=True, name="engine", scope="session")
def every_engine(request: pytest.FixtureRequest) -> str:
    """The engine this test's proxies run on; the test runs once per engine. Session-scoped so
    module-scoped fixtures (one proxy for many fuzz cases) can build their config with it; pytest
    then runs the tests grouped by engine."""
    return str(request.param)


def engine_line(engine: str) -> str:
    """The YAML line that puts an ``affinity-proxy serve`` process on ``engine``."""
    assert engine in ENGINES, engine
    return f"engine: {engine}"


@asynccontextmanager
async def proxy_factory(engine: str) -> AsyncIterator[ProxyFactory]:
    """Start proxies on ``engine`` whatever engine their config names (for a test that compares
    the engines side by side); stops them at exit."""
    servers: list[ProxyServer] = []

    async def factory(config: Config, **kwargs: object) -> ProxyServer:
        server = ProxyServer(replace(config, engine=engine), **kwargs)  # type: ignore[arg-type]
        await server.start()
        servers.append(server)
        return server

    try:
        yield factory
    finally:
        for server in servers:
            await server.stop()
