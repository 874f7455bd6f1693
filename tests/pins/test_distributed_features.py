"""Every store feature beyond the pin contract on Redis Cluster and Sentinel (one Redis is covered by
tests/membership and tests/cli/test_cli_redis.py): drain marks, heartbeats and locks (one slot, tag
``{m}``), the reaper, and the CLI reaching the store named in its config."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis

from affinity_proxy.membership.redis_shared import RedisSharedState
from affinity_proxy.membership.shared import HeartbeatInfo
from affinity_proxy.pins.reaper import Reaper
from affinity_proxy.pins.redis import RedisPinStore
from affinity_proxy.routing.model import Instance, InstanceId, InstanceState, MembershipView
from tests.cli.test_cli_redis import CLEAN_ENV, config_yaml, ok, ok_json

A, B = InstanceId("a"), InstanceId("b")


@pytest.fixture(params=["cluster", "sentinel"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[RedisPinStore]:
    s = RedisPinStore(str(request.getfixturevalue(f"{request.param}_url")), pin_ttl=60, timeout=2.0)
    yield s
    await s.close()


async def test_shared_state(store: RedisPinStore) -> None:
    shared = RedisSharedState(store)
    await shared.drain(A)
    await shared.drain(B)
    await shared.undrain(B)
    assert await shared.drained() == {A}
    info = HeartbeatInfo("up", "http://127.0.0.1:1", "", "n1", time.time())
    await shared.publish_heartbeat("n1", {A: info, B: info}, ttl=30)
    reports = await shared.heartbeats()
    assert sorted(reports) == [A, B] and reports[A][0].node == "n1"
    token = await shared.acquire_lock("reaper", ttl=30)
    assert token is not None and await shared.acquire_lock("reaper", ttl=30) is None
    assert await shared.release_lock("reaper", token)


async def test_reaper_drops_pins_of_a_gone_instance_in_every_bucket(store: RedisPinStore) -> None:
    users = [f"u{i}" for i in range(300)]  # spread over every master's slots
    for user in users:
        await store.claim(user, A if int(user[1:]) % 3 else B)
    view = MembershipView.build([Instance(B), Instance(A, state=InstanceState.DOWN)])
    reaper = Reaper(store, lambda: view, grace=0, interval=1, lock=RedisSharedState(store))
    reaped = await reaper.reap()
    assert sorted(reaped) == [A] and len(reaped[A]) == 200
    assert await store.counts() == {B: 100}
    assert await store.get("u1") is None and (await store.get("u0")).instance == B  # type: ignore[union-attr]


async def test_cli_reaches_the_store(store: RedisPinStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for name in CLEAN_ENV:
        monkeypatch.delenv(name, raising=False)
    conf = tmp_path / "proxy.yaml"
    conf.write_text(config_yaml(store.url))
    await ok("pins", "set", "alice", "a", "--config", str(conf))
    assert (await ok_json("pins", "show", "alice", "--config", str(conf)))["instance"] == "a"
    assert (await store.get("alice")).instance == A  # type: ignore[union-attr]
    await ok("instances", "drain", "b", "--config", str(conf))
    assert await RedisSharedState(store).drained() == {B}
    stats = await ok_json("pins", "stats", "--config", str(conf))
    assert json.dumps(stats).count('"a"') >= 1
    await ok("pins", "drop", "alice", "--config", str(conf))
    assert await store.get("alice") is None


def test_keys_of_one_script_share_a_slot(redis_cluster) -> None:  # type: ignore[no-untyped-def]
    """What the cluster itself says: the pin keys and the shared keys hash to their tags' slots."""
    with redis.Redis(port=redis_cluster.nodes[0].port, decode_responses=True) as raw:
        slot = lambda key: raw.execute_command("CLUSTER", "KEYSLOT", key)  # noqa: E731
        assert slot("affinity:pin:{p7}alice") == slot("affinity:idx:{p7}a") == slot("affinity:instances{p7}")
        assert slot("affinity:{m}drain") == slot("affinity:{m}hb:a") == slot("affinity:{m}lock:reaper")
