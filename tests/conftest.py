"""Shared fixtures: a real redis-server per session (flushed per test) and a private one per test;
a Redis Cluster and a Sentinel set, each started once per session when a test asks for it.

Keep this file small and generic; feature-specific fixtures belong in their own test packages.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.redis_server import RedisServer, RedisServerMissing
from tests.support.redis_topologies import RedisClusterSet, RedisSentinelSet


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
