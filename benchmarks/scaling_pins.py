"""Part 1 of ``benchmarks.scaling``: the Redis pin store holding N pins — memory per pin, latency.

Why this way:

- Memory per pin only means something next to what Redis needs for a bare key of the same size,
  so the same run first fills N plain ``SET`` keys and N ``SET ... PX`` keys (same key and value
  lengths, ``baseline:`` is as long as ``affinity:``) and reports the pins as ratios against them.
- The pins are written the way the proxy writes them: the store's own CLAIM script
  (``pins.redis_scripts``), called by its SHA with the keys and arguments ``RedisPinStore.claim``
  sends, but pipelined through ``redis-cli --pipe`` (one awaited round trip per pin would take
  minutes at 1M). Then a sample is read back with ``RedisPinStore.get``, ``counts()`` must total N
  and DBSIZE must be N + the per-bucket counters and counted-instances sets, so the layout
  measured is the proxy's. Instances are assigned round-robin (the proxy's ring spreads them too).
  The previous layout (``pins.redis_legacy``: a sorted-set index entry per pin) is filled the same
  way in the same run, so the saving is a same-run ratio too; ``MEMORY USAGE`` of a sample of keys
  and of every index structure says where the bytes go.
- Latencies are ``RedisPinStore.get``/``claim`` against a raw redis-py asyncio ``GET``/``SET NX PX``
  on the same server with the same pool size, in interleaved blocks, so a busy machine slows both.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from redis.asyncio import BlockingConnectionPool, Redis

from affinity_proxy.pins import redis_legacy as legacy
from affinity_proxy.pins import redis_scripts as lua
from affinity_proxy.pins.redis import WINDOWS, RedisPinStore, bucket_of, pin_key
from affinity_proxy.routing.model import InstanceId
from benchmarks.scaling_common import USER_DIGITS, Summary, redis_pipe, resp, summarize, user_key
from benchmarks.targets import HarnessError

PREFIX = "affinity:"  # the store's default key_prefix
BASE_PREFIX = "baseline:"  # same length as PREFIX
INSTANCES = ("app-1", "app-2", "app-3")
PIN_TTL = 86400.0  # the config default (pin_ttl: 1d)
TTL_MS = round(PIN_TTL * 1000)
WINDOW_MS = max(1, TTL_MS // WINDOWS)  # as RedisPinStore computes it
STORE_TIMEOUT = 2.0  # not the proxy's 0.25 s: a busy machine must not open the breaker mid-measurement
FILL_CHUNK = 250_000  # commands per redis-cli --pipe run
BLOCKS = 4  # interleaved blocks per measurement (store, baseline, baseline, store, ...)

Op = Callable[[int], Awaitable[object]]


@dataclass(frozen=True, slots=True)
class MemoryRow:
    layout: str
    keys: int  # DBSIZE after the fill
    delta_bytes: int  # used_memory after - before
    per_item: float  # delta per pin (or per baseline key)


@dataclass(frozen=True, slots=True)
class LatencyRow:
    op: str
    concurrency: int
    store: Summary
    baseline: Summary
    baseline_name: str


@dataclass(slots=True)
class PinStoreResult:
    pins: int
    memory: list[MemoryRow] = field(default_factory=list)
    latency: list[LatencyRow] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)
    fill_seconds: float = 0.0
    breakdown: list[str] = field(default_factory=list)  # where the bytes go (MEMORY USAGE)


def instance_of(i: int) -> str:
    return INSTANCES[i % len(INSTANCES)]


def claim_commands(sha: str, start: int, stop: int) -> bytes:
    """EVALSHA of the CLAIM script for users ``start..stop-1``: exactly ``RedisPinStore.claim``'s
    keys (pin, the bucket's counted-instances set) and arguments (counter base, legacy index base,
    user, instance, ttl ms, window ms)."""
    return b"".join(resp("EVALSHA", sha, 2, pin_key(PREFIX, u), f"{PREFIX}live{{p{b}}}", f"{PREFIX}cnt:{{p{b}}}",
                         f"{PREFIX}idx:{{p{b}}}", u, instance_of(i), TTL_MS, WINDOW_MS)
                    for i in range(start, stop) for u in (user_key(i),) for b in (bucket_of(u),))


def legacy_claim_commands(sha: str, start: int, stop: int) -> bytes:
    """EVALSHA of the previous layout's CLAIM script, with the keys and arguments its store sent
    (pin, the bucket's instances set; index base, user, instance, ttl ms)."""
    return b"".join(resp("EVALSHA", sha, 2, pin_key(PREFIX, u), f"{PREFIX}instances{{p{b}}}", f"{PREFIX}idx:{{p{b}}}",
                         u, instance_of(i), TTL_MS)
                    for i in range(start, stop) for u in (user_key(i),) for b in (bucket_of(u),))


def set_commands(start: int, stop: int, *, px: bool) -> bytes:
    extra: tuple[str | int, ...] = ("PX", TTL_MS) if px else ()
    return b"".join(resp("SET", pin_key(BASE_PREFIX, user_key(i)), instance_of(i), *extra) for i in range(start, stop))


async def _used_memory(r: Redis) -> int:
    return int((await r.info("memory"))["used_memory"])


async def _fill(r: Redis, port: int, n: int, make: Callable[[int, int], bytes], layout: str) -> MemoryRow:
    await r.flushall(asynchronous=False)
    before = await _used_memory(r)
    for start in range(0, n, FILL_CHUNK):
        stop = min(n, start + FILL_CHUNK)
        await asyncio.to_thread(redis_pipe, port, make(start, stop), expected=stop - start)
    after = await _used_memory(r)
    return MemoryRow(layout, int(await r.dbsize()), after - before, (after - before) / n)


async def _verify(store: RedisPinStore, r: Redis, n: int, rng: random.Random) -> list[str]:
    sample = rng.sample(range(n), min(200, n))
    bad = []
    for i in sample:
        pin = await store.get(user_key(i))
        if pin is None or pin.instance != instance_of(i) or not pin.expires_in or pin.expires_in <= 0:
            bad.append((user_key(i), pin))
    counts = await store.counts()
    size = int(await r.dbsize())
    pairs = {(bucket_of(user_key(i)), instance_of(i)) for i in range(n)}  # one counter per bucket and instance
    expected = n + len(pairs) + len({bucket for bucket, _ in pairs})  # + one counted-instances set per bucket
    if bad or sum(counts.values()) != n or size != expected:
        raise HarnessError(f"pins not as the proxy writes them: bad sample {bad[:3]}, counts {counts}, DBSIZE {size}")
    return [f"{len(sample)} random pins read back with `RedisPinStore.get` (right instance, TTL set)",
            f"`RedisPinStore.counts()` = {dict(sorted(counts.items()))} (total {sum(counts.values()):,} = N)",
            f"DBSIZE = {size:,} = N pins + {len(pairs)} per-bucket instance counters + the buckets' "
            "counted-instances sets"]


async def _breakdown(r: Redis, n: int, layout: str, structures: str, rng: random.Random) -> str:
    """Where a layout's bytes go: MEMORY USAGE of 1,000 sampled pin keys (mean) and of every
    structure beside them (``structures``: a SCAN pattern), per pin."""
    sample = [pin_key(PREFIX, user_key(i)) for i in rng.sample(range(n), min(1000, n))]
    per_key = sum([int(await r.memory_usage(k, samples=0) or 0) for k in sample]) / len(sample)
    total, count = 0, 0
    async for key in r.scan_iter(match=structures, count=1000):
        total += int(await r.memory_usage(key, samples=0) or 0)
        count += 1
    return (f"{layout}: `MEMORY USAGE` of a pin key {per_key:.0f} B (mean of {len(sample):,}); its {count:,} "
            f"index structures (`{structures}`) {total / 2**20:,.1f} MiB = {total / n:.1f} B per pin")


async def _timed(op: Op, items: Sequence[int], concurrency: int) -> tuple[list[int], int, float]:
    """Run ``op`` over ``items`` with ``concurrency`` coroutines; (latencies ns, errors, wall s)."""
    latencies: list[int] = []
    errors = 0
    it = iter(items)

    async def worker() -> None:
        nonlocal errors
        for i in it:
            t0 = time.perf_counter_ns()
            try:
                await op(i)
            except Exception:
                errors += 1
                continue
            latencies.append(time.perf_counter_ns() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, errors, time.perf_counter() - t0


async def _compare(store_op: Op, base_op: Op, store_items: Sequence[int], base_items: Sequence[int],
                   concurrency: int) -> tuple[Summary, Summary]:
    """Both ops in interleaved blocks (store first in even blocks, baseline first in odd ones)."""
    latencies: tuple[list[int], list[int]] = ([], [])
    errors, walls = [0, 0], [0.0, 0.0]
    blocks = max(1, min(BLOCKS, len(store_items) // 100))
    for b in range(blocks):
        sides = ((0, store_op, store_items), (1, base_op, base_items))
        for side, op, items in sides if b % 2 == 0 else reversed(sides):
            lat, err, wall = await _timed(op, items[b * len(items) // blocks:(b + 1) * len(items) // blocks],
                                          concurrency)
            latencies[side].extend(lat)
            errors[side] += err
            walls[side] += wall
    store, base = (summarize(latencies[i], wall_s=walls[i], errors=errors[i]) for i in (0, 1))
    return store, base


async def run_pin_store(port: int, pins: int, lookups: int, concurrency: int, seed: int = 6) -> PinStoreResult:
    """Fill, verify and time the pin store on the redis-server at 127.0.0.1:``port``."""
    rng = random.Random(seed)
    url = f"redis://127.0.0.1:{port}/0"
    result = PinStoreResult(pins)
    r = Redis(host="127.0.0.1", port=port, decode_responses=True)
    base = Redis.from_pool(BlockingConnectionPool(host="127.0.0.1", port=port, max_connections=50,
                                                  timeout=STORE_TIMEOUT, socket_timeout=STORE_TIMEOUT,
                                                  decode_responses=True))  # owns the pool: aclose() closes it
    store = RedisPinStore(url, key_prefix=PREFIX, pin_ttl=PIN_TTL, timeout=STORE_TIMEOUT)
    try:
        sha = await r.script_load(lua.CLAIM)
        if sha != hashlib.sha1(lua.CLAIM.encode()).hexdigest():  # what redis-py's register_script calls
            raise HarnessError(f"unexpected SHA of the CLAIM script: {sha}")
        old_sha = await r.script_load(legacy.CLAIM)
        t0 = time.monotonic()
        result.memory.append(await _fill(r, port, pins, lambda a, b: set_commands(a, b, px=False), "plain SET"))
        result.memory.append(await _fill(r, port, pins, lambda a, b: set_commands(a, b, px=True), "SET PX"))
        result.memory.append(await _fill(r, port, pins, lambda a, b: legacy_claim_commands(old_sha, a, b),
                                         "pin, previous layout (sorted-set index entry per pin)"))
        result.breakdown.append(await _breakdown(r, pins, "previous layout", f"{PREFIX}idx:*", rng))
        result.memory.append(await _fill(r, port, pins, lambda a, b: claim_commands(sha, a, b),
                                         "pin, current layout (CLAIM script)"))
        result.breakdown.append(await _breakdown(r, pins, "current layout", f"{PREFIX}cnt:*", rng))
        result.fill_seconds = time.monotonic() - t0
        result.checks = await _verify(store, r, pins, rng)
        print(f"  filled and verified {pins:,} pins in {result.fill_seconds:.1f}s", flush=True)

        async def get_hit(i: int) -> None:
            if await store.get(user_key(i)) is None:
                raise LookupError(i)

        async def get_miss(i: int) -> None:
            if await store.get(user_key(i)) is not None:
                raise LookupError(i)

        async def claim(i: int) -> None:
            if not (await store.claim(user_key(i), InstanceId(instance_of(i)))).won:
                raise LookupError(i)

        async def raw_get(i: int) -> None:
            await base.get(pin_key(PREFIX, user_key(i)))

        async def set_nx(i: int) -> None:
            if not await base.set(pin_key(BASE_PREFIX, user_key(i)), instance_of(i), nx=True, px=TTL_MS):
                raise LookupError(i)

        await _timed(get_hit, [rng.randrange(pins) for _ in range(500)], 50)  # warm-up: pools, script cache
        await _timed(raw_get, [rng.randrange(pins) for _ in range(500)], 50)
        fresh = iter(range(10 * pins + 10_000_000, 10**USER_DIGITS))  # never filled: misses and new users
        for c in sorted({1, concurrency}):
            hits = [rng.randrange(pins) for _ in range(lookups)]
            s, b = await _compare(get_hit, raw_get, hits, hits, c)
            result.latency.append(LatencyRow("get, pin exists", c, s, b, "GET"))
            misses = [next(fresh) for _ in range(lookups)]
            s, b = await _compare(get_miss, raw_get, misses, misses, c)
            result.latency.append(LatencyRow("get, no pin", c, s, b, "GET (missing key)"))
            new_s, new_b = [next(fresh) for _ in range(lookups)], [next(fresh) for _ in range(lookups)]
            s, b = await _compare(claim, set_nx, new_s, new_b, c)
            result.latency.append(LatencyRow("claim, new user (CAS)", c, s, b, "SET NX PX"))
            print(f"  latency at concurrency {c} done", flush=True)
        await r.flushall(asynchronous=False)  # give the memory back before the next parts
    finally:
        await store.close()
        await base.aclose()
        await r.aclose()
    return result

