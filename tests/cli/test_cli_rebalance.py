"""``rebalance [--dry-run]`` (issue #14): straight on a real Redis (``RedisBackend``), where the
pins are written as nodes write them, and the text the command prints."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from affinity_proxy.cli.main import main
from affinity_proxy.cli.output import rebalance_text
from affinity_proxy.cli.redis_backend import RedisBackend
from affinity_proxy.config import load_config
from affinity_proxy.membership.redis_shared import RedisSharedState
from affinity_proxy.pins.redis import RedisPinStore
from affinity_proxy.placement.live import RedisSketch
from affinity_proxy.placement.rebalancer import LOCK_NAME
from affinity_proxy.routing.model import InstanceId

CLEAN_ENV = {"AFFINITY_CONFIG": None, "AFFINITY_ADMIN_TOKEN": None}


def write_config(tmp_path: Path, url: str, pin_ttl: str = "2h") -> Path:
    """pin_ttl 2h while the pins were written with 1 h: each looks unused for an hour."""
    path = tmp_path / "proxy.yaml"
    path.write_text("\n".join([
        "listen: 127.0.0.1:0", "admin_listen: 127.0.0.1:0", "instances:",
        "  - {id: a, url: 'http://127.0.0.1:1'}", "  - {id: b, url: 'http://127.0.0.1:2'}",
        "  - {id: c, url: 'http://127.0.0.1:3'}",
        "cookie:", "  secret: cookie-SECRET-value-0123456789", "  revalidate_after: 0s",
        "store:", f"  url: {json.dumps(url)}", f"pin_ttl: {pin_ttl}",
        "placement:", "  rebalance:", "    idle_after: 10s", "    max_moves_per_minute: 120",
    ]) + "\n")
    return path


@pytest.fixture
async def pinned(redis_url: str) -> AsyncIterator[RedisPinStore]:
    """60 pins, all on instance a, written as a node writes them."""
    store = RedisPinStore(redis_url, pin_ttl=3600)
    for i in range(60):
        await store.claim(f"u{i}", InstanceId("a"))
    yield store
    await store.close()


async def test_redis_direct_plan_and_pass(tmp_path: Path, redis_url: str, pinned: RedisPinStore) -> None:
    config = load_config(write_config(tmp_path, redis_url), {})
    async with RedisBackend(config) as backend:
        plan = await backend.rebalance(dry_run=True)
    assert plan["dry_run"] is True and plan["moved"] == 0
    assert plan["budget"] == 10  # 120 a minute, one pass every 5 s
    assert len(plan["moves"]) == 10 and {m["from"] for m in plan["moves"]} == {"a"}
    assert {m["to"] for m in plan["moves"]} <= {"b", "c"}
    assert (await pinned.counts()) == {"a": 60}
    async with RedisBackend(config) as backend:
        done = await backend.rebalance()
    assert done["moved"] == 10
    counts = await pinned.counts()
    assert counts["a"] == 50 and counts.get("b", 0) + counts.get("c", 0) == 10
    for move in done["moves"]:
        assert (await pinned.get(move["user"])).instance == move["to"]  # type: ignore[union-attr]
    async with RedisBackend(config) as backend:
        assert (await backend.rebalance()).get("skipped") is True  # the pass holds the lock for 5 s
    assert "another process holds the rebalance lock" in rebalance_text({"skipped": True})


async def test_active_pins_are_not_planned(tmp_path: Path, redis_url: str, pinned: RedisPinStore) -> None:
    config = load_config(write_config(tmp_path, redis_url, pin_ttl="1h"), {})
    async with RedisBackend(config) as backend:
        plan = await backend.rebalance(dry_run=True)
    assert plan["moves"] == []  # written just now: not idle for idle_after + the slack


async def test_cli_dry_run_text_and_json(tmp_path: Path, redis_url: str, pinned: RedisPinStore) -> None:
    path = str(write_config(tmp_path, redis_url, pin_ttl="1h"))

    def invoke(*args: str) -> Result:
        return CliRunner().invoke(main, list(args), env=dict(CLEAN_ENV), catch_exceptions=False)

    result = await asyncio.to_thread(invoke, "rebalance", "--dry-run", "--config", path)
    assert result.exit_code == 0, result.output
    assert "live sessions: a 60" in result.stdout and "nothing to move" in result.stdout
    result = await asyncio.to_thread(invoke, "rebalance", "--dry-run", "--json", "--config", path)
    doc = json.loads(result.stdout)
    assert doc["loads"] == {"a": 60} and doc["moves"] == [] and doc["dry_run"] is True
    assert await RedisSharedState(pinned).acquire_lock(LOCK_NAME, 5) is not None  # a dry run takes no lock


def test_rebalance_text_groups_moves() -> None:
    doc = {"dry_run": True, "budget": 10, "idle_threshold": 61.0, "loads": {"a": 3, "b": 0},
           "moves": [{"user": "u1", "from": "a", "to": "b"}, {"user": "u2", "from": "a", "to": "b"}]}
    text = rebalance_text(doc)
    assert "dry run: would move 2 idle pins" in text and "a -> b: 2 (u1, u2)" in text


async def test_pins_stats_on_redis_show_live_sessions(tmp_path: Path, redis_url: str, pinned: RedisPinStore) -> None:
    """Pins plus the anonymous sessions the nodes' sketches hold (written here as a node writes them)."""
    sketch = RedisSketch(pinned, window=10)
    now = time.time()
    for i in range(5):
        sketch.add("b", f"b~{i}", now)
    await sketch.counts(["a", "b", "c"], now)
    path = str(write_config(tmp_path, redis_url, pin_ttl="1h"))

    def invoke() -> Result:
        return CliRunner().invoke(main, ["pins", "stats", "--config", path], env=dict(CLEAN_ENV),
                                  catch_exceptions=False)

    result = await asyncio.to_thread(invoke)
    assert result.exit_code == 0, result.output
    assert "live sessions 65  max 60  balance (max/mean) 2.77" in result.stdout, result.stdout
