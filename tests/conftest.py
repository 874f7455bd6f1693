"""Shared fixtures: a real redis-server per session (flushed per test) and a private one per test.

Keep this file small and generic; feature-specific fixtures belong in their own test packages.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.redis_server import RedisServer, RedisServerMissing


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
