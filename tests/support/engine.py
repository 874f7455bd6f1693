"""Run a whole test package on one engine: every proxy its tests start gets ``engine: <name>``.

The default engine (``fast``) is what ``tests/functional``, ``tests/fly`` and ``tests/robustness``
run on. ``tests/aiohttp_engine`` re-runs them on the aiohttp engine and ``tests/fastpath`` pins its
own tests to the fast engine explicitly; both conftests build their fixtures from this module:

- ``force_engine`` makes every ``ProxyServer`` a test builds (also the fly cluster's), every config
  re-read by a hot reload (the file on disk does not say ``engine``) and every
  ``affinity-proxy serve`` subprocess (its config file gets ``engine: <name>`` appended before it
  starts) use the engine; the caller asserts afterwards that none ended up on the other one.
- ``proxy_factory`` is the functional suite's ``start_proxy`` with the engine forced.
- ``engine_fixtures`` builds a conftest's two fixtures from both.
"""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from affinity_proxy.config import Config
from affinity_proxy.serve import reload as reload_module
from affinity_proxy.serve.app import ProxyServer

ProxyFactory = Callable[..., Any]


def append_engine(argv: Any, engine: str) -> None:
    """``affinity-proxy serve --config FILE``: make FILE say ``engine: <engine>`` (once)."""
    args = [str(a) for a in argv] if isinstance(argv, list | tuple) else []
    if "affinity_proxy" not in args or "serve" not in args or "--config" not in args:
        return
    path = Path(args[args.index("--config") + 1])
    text = path.read_text()
    if "\nengine:" not in "\n" + text:
        path.write_text(text.rstrip("\n") + f"\nengine: {engine}\n")


def force_engine(engine: str, monkeypatch: pytest.MonkeyPatch) -> list[ProxyServer]:
    """Patch the three places a proxy's config comes from; returns the servers built meanwhile."""
    started: list[ProxyServer] = []
    real_init = ProxyServer.__init__

    def init(self: ProxyServer, config: Config, **kwargs: Any) -> None:
        real_init(self, replace(config, engine=engine), **kwargs)
        started.append(self)

    real_load = reload_module.load_config

    def load_config(path: Any, *args: Any, **kwargs: Any) -> Config:
        return replace(real_load(path, *args, **kwargs), engine=engine)

    real_popen = subprocess.Popen

    class Popen(real_popen):  # type: ignore[misc,valid-type]
        def __init__(self, args: Any, *rest: Any, **kwargs: Any) -> None:
            append_engine(args, engine)
            super().__init__(args, *rest, **kwargs)

    monkeypatch.setattr(ProxyServer, "__init__", init)
    monkeypatch.setattr(reload_module, "load_config", load_config)
    monkeypatch.setattr(subprocess, "Popen", Popen)
    return started


@asynccontextmanager
async def proxy_factory(engine: str) -> AsyncIterator[ProxyFactory]:
    """Start proxies on ``engine`` (like the functional ``start_proxy``); stops them at exit."""
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


def engine_fixtures(engine: str) -> tuple[Any, Any]:
    """``(forced_engine, start_proxy)`` for a conftest: an autouse fixture forcing ``engine`` (a
    module setting ``BOTH_ENGINES = True`` chooses each server's engine itself) that fails the test
    if a proxy ended up on another engine, and ``start_proxy`` on ``engine``."""

    @pytest.fixture(autouse=True)
    def forced_engine(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[ProxyServer]]:
        if getattr(request.module, "BOTH_ENGINES", False):
            yield []
            return
        started = force_engine(engine, monkeypatch)
        yield started
        assert all(server.config.engine == engine for server in started)

    @pytest.fixture
    async def start_proxy() -> AsyncIterator[ProxyFactory]:
        async with proxy_factory(engine) as factory:
            yield factory

    return forced_engine, start_proxy
