"""benchmarks.scaling: its pure parts, and one tiny real run (a few hundred pins and users against a
real redis-server and real proxies). Checks the report's sections and that the figures are sane and
real (pins in the store = pins requested, memory per pin > 0, every user pinned); never timings.
The workers part needs wrk (and nginx for its baseline): without them it is skipped, and the users
part uses aiohttp and the demo backends instead."""

from __future__ import annotations

import datetime as dt
import hashlib
import math
import shutil
from pathlib import Path

import pytest

from affinity_proxy.config import config_from_mapping
from affinity_proxy.config.load import read_yaml_file
from affinity_proxy.pins import redis_scripts as lua
from affinity_proxy.pins.redis import RedisPinStore, bucket_of, pin_key
from affinity_proxy.routing.model import InstanceId
from benchmarks import scaling, scaling_proxy
from benchmarks.run import find_tool
from benchmarks.scaling_common import Summary, md_table, percentile, resp, summarize, user_key
from benchmarks.scaling_load import USERS_LUA, LoadResult, parse_users_output
from benchmarks.scaling_pins import (
    PIN_TTL,
    LatencyRow,
    MemoryRow,
    PinStoreResult,
    claim_commands,
    instance_of,
    legacy_claim_commands,
    set_commands,
)
from benchmarks.scaling_proxy import LoadRow, MemoryRun, VisitRound, combine, proxy_yaml, ratio_2_to_1
from benchmarks.scaling_report import Results, median_rows, report_markdown, user_costs, visit_rates

SECTIONS = ("## Summary", "## 1. Pin store: Redis memory", "## 2. Pin store: latency", "## 3. Proxy memory",
            "## Notes")


def _parse_resp(data: bytes) -> list[list[str]]:
    """RESP arrays of bulk strings back into commands (enough for what the benchmark writes)."""
    out, lines, i = [], data.split(b"\r\n"), 0
    while i < len(lines) and lines[i]:
        n = int(lines[i][1:])
        out.append([lines[i + 2 + 2 * k].decode() for k in range(n)])
        i += 1 + 2 * n
    return out


def test_percentiles_and_summary() -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 99) == 4.0
    assert percentile([7.0], 1) == 7.0
    s = summarize([1_000_000, 3_000_000, 2_000_000], wall_s=0.5, errors=2)
    assert (s.n, s.p50_ms, s.p99_ms, s.mean_ms, s.errors, s.ops_per_s) == (3, 2.0, 3.0, 2.0, 2, 6.0)
    assert math.isnan(summarize([]).p50_ms)


def test_fill_commands_are_the_stores_claim_and_plain_sets() -> None:
    assert user_key(7) == "user-00000000007" and len(user_key(99_999_999)) == 16
    assert _parse_resp(resp("SET", "k", 5)) == [["SET", "k", "5"]]
    claims = _parse_resp(claim_commands("abc", 0, 4))
    assert len(claims) == 4
    # RedisPinStore.claim: keys (pin, the bucket's counted-instances set), args (counter base, legacy index
    # base, user, instance, ttl ms, window ms)
    tag = f"{{p{bucket_of('user-00000000001')}}}"
    ttl = round(PIN_TTL * 1000)
    assert claims[1] == ["EVALSHA", "abc", "2", f"affinity:pin:{tag}user-00000000001", f"affinity:live{tag}",
                         f"affinity:cnt:{tag}", f"affinity:idx:{tag}", "user-00000000001", "app-2", str(ttl),
                         str(ttl // 32)]
    assert [c[8] for c in claims] == [instance_of(i) for i in range(4)]
    old = _parse_resp(legacy_claim_commands("def", 1, 2))  # the previous layout, for the same-run row
    assert old == [["EVALSHA", "def", "2", f"affinity:pin:{tag}user-00000000001", f"affinity:instances{tag}",
                    f"affinity:idx:{tag}", "user-00000000001", "app-2", str(ttl)]]
    plain, px = _parse_resp(set_commands(3, 4, px=False)), _parse_resp(set_commands(3, 4, px=True))
    assert plain == [["SET", pin_key("baseline:", "user-00000000003"), "app-1"]]
    assert px[0][:3] == plain[0] and px[0][3:] == ["PX", str(round(PIN_TTL * 1000))]
    assert len("baseline:") == len("affinity:")  # the baseline keys are as long as the pins'


async def test_the_fill_sends_what_redis_pin_store_claim_sends() -> None:
    """The store itself, with its script call captured (no I/O): same script SHA, keys and args."""
    store = RedisPinStore("redis://127.0.0.1:1/0", pin_ttl=PIN_TTL)
    seen: list[tuple[str, list[str], list[object]]] = []

    async def capture(name: str, keys: list[str], args: list[object]) -> list[object]:
        seen.append((name, keys, args))
        return [1, args[3], args[4]]

    store._script = capture  # type: ignore[method-assign]
    try:
        assert (await store.claim(user_key(1), InstanceId(instance_of(1)))).won
        sha = store._scripts["CLAIM"].sha
    finally:
        await store.close()
    [(name, keys, args)] = seen
    assert name == "CLAIM" and sha == hashlib.sha1(lua.CLAIM.encode()).hexdigest()
    assert _parse_resp(claim_commands(sha, 1, 2)) == [["EVALSHA", sha, str(len(keys)), *keys, *map(str, args)]]


def test_proxy_config_is_valid_with_fast_engine(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(proxy_yaml(18080, 19091, "s" * 64, [("app-1", 18001), ("app-2", 18002)],
                               "redis://127.0.0.1:6390/0", "scaling-x:"))
    config = config_from_mapping(read_yaml_file(path), environ={})
    assert config.engine == "fast"
    assert config.store.url == "redis://127.0.0.1:6390/0" and config.store.key_prefix == "scaling-x:"
    assert [(s.kind, s.name) for s in config.user_key] == [("header", "X-User-Id")]


def test_users_lua_and_its_output() -> None:
    assert "wrk.thread:stop()" in USERS_LUA and 'string.format("user-%011d", id)' in USERS_LUA
    assert parse_users_output("  Socket errors: connect 0, read 2, write 0, timeout 1\nstatus 200 90\nstatus 502 8\n") \
        == (98, 11)


def _fake_results() -> Results:
    s = Summary(100, 0.2, 0.5, 0.25, 0, 5000.0)
    b = Summary(100, 0.1, 0.4, 0.12, 0, 8000.0)
    memory = [MemoryRow("plain SET", 1000, 100_000, 100.0), MemoryRow("SET PX", 1000, 150_000, 150.0),
              MemoryRow("pin, previous layout", 1004, 300_000, 300.0),
              MemoryRow("pin, current layout (CLAIM script)", 1004, 155_000, 155.0)]
    latency = [LatencyRow("get, pin exists", 1, s, b, "GET"),
               LatencyRow("claim, new user (CAS)", 50, s, b, "SET NX PX")]
    pins = PinStoreResult(1000, memory, latency, ["checked"], 1.0)
    load = LoadResult("aiohttp", 1000, 0, 1.0)
    slow = LoadResult("aiohttp", 1000, 0, 1.25)
    users = [MemoryRun("memory", 1, load, 1, 50_000, 51_000, None), MemoryRun("memory", 1000, slow, 1000, 50_000,
                                                                                52_000, None)]
    visits = [VisitRound("redis", 0, slow, load, slow), VisitRound("redis", 1, load, load, load)]
    rounds = [[LoadRow("proxy-w1", 100.0, 1, 2, 0, 0.9, 0.99, 1000), LoadRow("proxy-w2", 150.0, 1, 2, 0, 1.4, 1, 3000),
               LoadRow("nginx-w1", 200.0, 1, 2, 0, 0.5, 0.99, 10), LoadRow("nginx-w2", 220.0, 1, 2, 0, 0.6, 1, 20)]]
    return Results({"pins": 1000, "users": 1000, "lookups": 100, "wrk_threads": 1, "connections": 50,
                    "duration": 5.0, "rounds": 1, "warmup": 1.0}, "python -m benchmarks.scaling", {},
                   dt.datetime(2025, 1, 1, tzinfo=dt.UTC), "0 0 0", pins=pins, users=users, visits=visits,
                   targets=[("proxy-w1", "x")], workers=rounds)


def test_report_from_made_up_figures() -> None:
    r = _fake_results()
    [cost] = user_costs(r.users)
    assert cost.per_user_bytes == pytest.approx(1024.0) and cost.ratio == pytest.approx(52 / 51)
    assert ratio_2_to_1(r.workers, "proxy") == pytest.approx(1.5)
    assert ratio_2_to_1(r.workers, "nginx") == pytest.approx(1.1)
    assert [x.rps for x in median_rows(r.workers)] == [100.0, 150.0, 200.0, 220.0]
    legs = combine([LoadRow("a", 100.0, 1.0, 4.0, 1, 0.5, 0.9, 10), LoadRow("a", 200.0, 3.0, 6.0, 2, 1.5, 1.0, 30)])
    assert legs == LoadRow("a", 150.0, 2.0, 5.0, 3, 1.0, 0.95, 30)
    text = report_markdown(r)
    for section in (*SECTIONS, "## 4. `serve --workers 2`"):
        assert section in text
    assert "**155 B** = **1.55 x** a plain `SET`" in text and "previous layout, same run: 300 B = 3.00 x" in text
    [visits] = visit_rates(r.visits)
    assert visits.ratios == pytest.approx([1.25, 1.0])
    assert "redis store: **1.12 (1.00-1.25) x**" in text and "## 3b. First visits against repeat visits" in text
    assert "memory store 1,000 ÷ 800 = 1.25 x" in text  # the one-user rows, kept for comparison
    assert "**1.50 x** req/s" in text
    assert "**1,024 B** (" in text
    assert md_table(("a", "b"), [("1", "2")]) == "| a | b |\n|---|---:|\n| 1 | 2 |"


def test_cli_arguments() -> None:
    quick = scaling.parse_args(["--quick"])
    assert (quick.pins, quick.users, quick.rounds, quick.output) == (20_000, 5_000, 1, None)
    default = scaling.parse_args([])
    assert (default.pins, default.users, default.output) == (1_000_000, 100_000, scaling.OUTPUT)
    with pytest.raises(SystemExit):
        scaling.parse_args(["--parts", "pins,nope"])


def test_a_tiny_real_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        pytest.fail("redis-server and redis-cli are needed (apt-get install redis-server)", pytrace=False)
    monkeypatch.setattr(scaling_proxy, "SETTLE", 0.2)
    args = scaling.parse_args(["--pins", "300", "--users", "150", "--lookups", "200", "--duration", "1",
                               "--rounds", "1", "--warmup", "1", "--no-install", "--output", str(tmp_path / "S.md")])
    results, left = scaling.measure_all(args, "test")
    assert left == []
    text = report_markdown(results)
    for section in SECTIONS:
        assert section in text

    pins = results.pins
    assert pins is not None and pins.pins == 300
    by = {m.layout: m for m in pins.memory}
    pairs = {(bucket_of(user_key(i)), f"app-{i % 3 + 1}") for i in range(300)}
    current = by["pin, current layout (CLAIM script)"]
    assert current.keys == 300 + len(pairs) + len({b for b, _ in pairs})  # pins, counters, sets
    assert all(m.per_item > 0 for m in pins.memory)
    assert current.per_item > by["plain SET"].per_item
    assert results.cluster is not None and sum(results.cluster.spread) > 300  # pins and the buckets' counters
    assert all(r.store.errors == 0 and r.baseline.errors == 0 for r in results.cluster.latency)
    assert "(total 300 = N)" in "\n".join(pins.checks)
    assert {(r.op, r.concurrency) for r in pins.latency} >= {("get, pin exists", 1), ("claim, new user (CAS)", 50)}
    assert all(r.store.errors == 0 and r.baseline.errors == 0 and r.store.n == 200 for r in pins.latency)

    assert {(u.store, u.users): u.pins for u in results.users} == {("memory", 1): 1, ("memory", 150): 150,
                                                                   ("redis", 1): 1, ("redis", 150): 150}
    assert all(u.load.requests >= 150 and u.load.errors == 0 and u.rss_after_kib > 0 for u in results.users)
    assert sorted(v.store for v in results.visits) == ["memory", "redis"]
    legs = [leg for v in results.visits for leg in (v.first_a, v.repeat, v.first_b)]
    assert len(legs) == 6 and all(leg.requests >= 75 and leg.errors == 0 for leg in legs)

    if find_tool("wrk") is None:
        assert not results.workers and any("wrk is not installed" in s for s in results.skipped)
    else:
        names = {x.target for x in results.workers[0]}
        assert {"proxy-w1", "proxy-w2"} <= names
        assert ("nginx-w1" in names) == (find_tool("nginx") is not None)
        assert all(x.rps > 0 and x.errors == 0 for x in results.workers[0])
        assert "## 4. `serve --workers 2`" in text
