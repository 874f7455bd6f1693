"""Shared fixtures: a real redis-server per session (flushed per test) and a private one per test;
a Redis Cluster and a Sentinel set, each started once per session when a test asks for it; demo
backends, proxies in the test's loop (``start_proxy``) and a cookie-less HTTP client, used by most
test packages.

Keep this file small and generic; feature-specific fixtures belong in their own test packages.
The ``engine`` fixture is in ``tests/support/engine.py`` (the suites that run on both engines
import it into their conftest).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest
from hypothesis import HealthCheck, settings

from affinity_proxy.config import Config
from affinity_proxy.serve.app import ProxyServer
from tests.support.backends import Backends
from tests.support.engine import ProxyFactory
from tests.support.redis_server import RedisServer, RedisServerMissing
from tests.support.redis_topologies import RedisClusterSet, RedisSentinelSet

# Property tests: ``make test`` (and CI) runs the same examples every time (derandomized per test), so
# its result depends on the code, not on the run; ``make fuzz`` (``HYPOTHESIS_PROFILE=explore``) draws new
# examples each run, with more of them, to find what the fixed set does not. A failure it finds is
# a bug: fix it and add the example with ``@example``.
# No deadline and no too-slow health check in either: they are timing assertions, which a loaded
# machine fails for no fault of the code.
_UNTIMED = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow]}
settings.register_profile("deterministic", derandomize=True, database=None, **_UNTIMED)
settings.register_profile("explore", derandomize=False, max_examples=1000, database=None, **_UNTIMED)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "deterministic"))


def _new_redis() -> RedisServer:
    try:
        return RedisServer()
    except RedisServerMissing as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One redis-server for the whole session. Use ``redis_url`` in tests (it flushes first)."""
    with _new_redis() as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """URL of the shared redis-server, emptied (FLUSHALL) before the test."""
    redis_server.flushall()
    return redis_server.url


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    """A redis-server of this test alone, for tests that stop, pause or restart it."""
    with _new_redis() as server:
        yield server


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisClusterSet]:
    """A Redis Cluster (3 masters, 3 replicas) for the whole session; use ``cluster_url``."""
    try:
        cluster = RedisClusterSet()
    except RedisServerMissing as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def cluster_url(redis_cluster: RedisClusterSet) -> str:
    """``redis+cluster://`` URL of the shared cluster, emptied before the test."""
    redis_cluster.flushall()
    return redis_cluster.url


@pytest.fixture(scope="session")
def redis_sentinel() -> Iterator[RedisSentinelSet]:
    """A Sentinel set (master, replica, 3 sentinels) for the whole session; use ``sentinel_url``."""
    try:
        sentinels = RedisSentinelSet()
    except RedisServerMissing as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        sentinels.start()
        yield sentinels
    finally:
        sentinels.close()


@pytest.fixture
def sentinel_url(redis_sentinel: RedisSentinelSet) -> str:
    """``redis+sentinel://`` URL of the shared Sentinel set, its master emptied before the test."""
    redis_sentinel.flushall()
    return redis_sentinel.url


@pytest.fixture
async def backends() -> AsyncIterator[Backends]:
    """Three running demo backends, ``a``, ``b`` and ``c``."""
    b = Backends()
    for name in ("a", "b", "c"):
        await b.start(name)
    yield b
    await b.close()


@pytest.fixture
async def start_proxy(request: pytest.FixtureRequest) -> AsyncIterator[ProxyFactory]:
    """``await start_proxy(config, **kwargs)``: a started ``ProxyServer``, stopped after the test.
    In a test that runs under the ``engine`` fixture the config must name that engine (so a test
    that forgot ``engine=engine`` fails instead of running the default engine twice)."""
    engine = request.getfixturevalue("engine") if "engine" in request.fixturenames else None
    servers: list[ProxyServer] = []

    async def factory(config: Config, **kwargs: object) -> ProxyServer:
        assert engine is None or config.engine == engine, (
            f"this test runs on the {engine} engine but its config says engine={config.engine!r}: "
            "build it with engine=engine")
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
