"""The functional, fly and robustness suites on the aiohttp engine (``engine: aiohttp``).

The default engine is ``fast``, so ``tests/functional``, ``tests/fly`` and ``tests/robustness`` cover
it; the modules here re-export their test functions so pytest runs them again with every proxy on
the aiohttp engine (see ``tests/support/engine.py``). ``test_suite_coverage.py`` checks that every
functional and robustness module has its twin here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from affinity_proxy.app import ProxyServer
from tests.functional.conftest import *  # noqa: F403  (its fixtures; start_proxy is replaced below)
from tests.functional.conftest import ProxyFactory
from tests.support.engine import force_engine, proxy_factory

ENGINE = "aiohttp"


@pytest.fixture(autouse=True)
def forced_engine(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[ProxyServer]]:
    started = force_engine(ENGINE, monkeypatch)
    yield started
    assert all(server.config.engine == ENGINE for server in started)


@pytest.fixture
async def start_proxy() -> AsyncIterator[ProxyFactory]:
    async with proxy_factory(ENGINE) as factory:
        yield factory
