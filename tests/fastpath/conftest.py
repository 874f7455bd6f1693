"""The fast engine's own tests (framing, forwarding, caches, parity with the aiohttp engine).

``fast`` is the default engine, but these tests pin it explicitly so they keep testing it whatever
the default: every proxy started here gets ``engine: fast`` (see ``tests/support/engine.py``), and a
test fails if one ended up on another engine. Modules that set ``BOTH_ENGINES = True`` choose the
engine of each server themselves. The functional fixtures (``backends``, ``http``, ...) are imported.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from affinity_proxy.app import ProxyServer
from tests.functional.conftest import *  # noqa: F403  (its fixtures; start_proxy is replaced below)
from tests.functional.conftest import ProxyFactory
from tests.support.engine import force_engine, proxy_factory

ENGINE = "fast"


@pytest.fixture(autouse=True)
def fast_engine(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[ProxyServer]]:
    if getattr(request.module, "BOTH_ENGINES", False):  # the module compares the engines itself
        yield []
        return
    started = force_engine(ENGINE, monkeypatch)
    yield started
    assert all(server.config.engine == ENGINE for server in started)


@pytest.fixture
async def start_proxy() -> AsyncIterator[ProxyFactory]:
    async with proxy_factory(ENGINE) as factory:
        yield factory
