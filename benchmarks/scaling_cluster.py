"""Part 1b of ``benchmarks.scaling``: the pin store on a Redis Cluster of 3 masters, beside the single
redis-server of part 1 in the same run.

Why this way:

- Memory per pin on a cluster is filled exactly like part 1 (``redis-cli --pipe`` of the store's
  CLAIM script, and plain ``SET`` keys of the same sizes as the baseline), each command sent to the
  master that owns its key's slot (CLUSTER SLOTS), and ``used_memory`` is summed over the masters.
  The hash-tagged layout puts whole buckets in slots, so the ratio to plain SET should match part 1.
- Throughput: ``RedisPinStore`` ``get``/``claim`` at concurrency 50 on the cluster and on the single
  Redis, in interleaved blocks (``scaling_pins._compare``), so the shared machine's drift hits both.
  All masters run on the same 2 cores as the client here, so this measures the cost of the cluster
  client (slot routing, a pool per node), not the gain of more masters: that needs cores (see the
  note in SCALING.md).
"""

from __future__ import annotations

import asyncio
import random
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import redis
from redis.asyncio import Redis
from redis.crc import key_slot

from affinity_proxy.pins import redis_scripts as lua
from affinity_proxy.pins.redis import RedisPinStore, pin_key
from affinity_proxy.routing.model import InstanceId
from benchmarks.scaling_common import redis_pipe, user_key
from benchmarks.scaling_pins import (
    BASE_PREFIX,
    PIN_TTL,
    PREFIX,
    STORE_TIMEOUT,
    LatencyRow,
    MemoryRow,
    _compare,
    claim_commands,
    instance_of,
    set_commands,
)
from benchmarks.targets import HarnessError, Processes, free_port

MASTERS = 3


@dataclass(slots=True)
class ClusterResult:
    masters: int
    pins: int
    memory: list[MemoryRow] = field(default_factory=list)
    latency: list[LatencyRow] = field(default_factory=list)  # store = cluster, baseline = single Redis
    spread: list[int] = field(default_factory=list)  # pins per master after the fill


def _cluster_ports() -> tuple[int, int]:
    """A node's port and its cluster bus port (``--cluster-port``, Redis >= 7), both from
    ``free_port``: the default bus port (port + 10000) could fall inside the kernel's ephemeral
    range, where an outgoing connection may already hold it."""
    return free_port(), free_port()


def start_cluster(procs: Processes, masters: int = MASTERS) -> list[int]:
    """``masters`` cluster-enabled redis-servers (no replicas, no persistence) joined with
    ``redis-cli --cluster create``; returns their ports once CLUSTER INFO says ok on each."""
    pairs = [_cluster_ports() for _ in range(masters)]
    ports = [port for port, _ in pairs]
    nodes = {}
    for port, bus in pairs:
        argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--cluster-enabled", "yes", "--cluster-port", str(bus),
                "--cluster-config-file", str(procs.workdir / f"nodes-{port}.conf")]
        nodes[port] = procs.start(f"cluster-{port}", argv, cpu=None)
    deadline = time.monotonic() + 20
    for port in ports:
        while True:
            try:
                if redis.Redis(port=port, socket_timeout=1).ping():
                    break
            except redis.ConnectionError:
                pass
            if time.monotonic() > deadline or nodes[port].proc.poll() is not None:
                raise HarnessError(f"cluster node {port} did not answer:\n{nodes[port].log_tail()}")
            time.sleep(0.05)
    out = subprocess.run(["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports),
                          "--cluster-replicas", "0", "--cluster-yes"], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise HarnessError(f"redis-cli --cluster create failed:\n{out.stdout[-1000:]}{out.stderr[-1000:]}")
    deadline = time.monotonic() + 30
    while not all(redis.Redis(port=p).cluster("info")["cluster_state"] == "ok" for p in ports):
        if time.monotonic() > deadline:
            raise HarnessError("the cluster did not reach cluster_state:ok")
        time.sleep(0.1)
    return ports


def _owners(port: int) -> dict[int, int]:
    """slot -> port of the master that serves it."""
    owners: dict[int, int] = {}
    for start, end, master, *_ in redis.Redis(port=port).execute_command("CLUSTER", "SLOTS"):
        for slot in range(int(start), int(end) + 1):
            owners[slot] = int(master[1])
    return owners


async def _fill(ports: list[int], owners: dict[int, int], n: int, key_of: Callable[[int], str],
                one: Callable[[int], bytes], layout: str) -> MemoryRow:
    for port in ports:
        redis.Redis(port=port).flushall()
    before = sum(int(redis.Redis(port=p).info("memory")["used_memory"]) for p in ports)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(owners[key_slot(key_of(i).encode())], []).append(i)
    for port, items in groups.items():
        for k in range(0, len(items), 250_000):
            chunk = items[k:k + 250_000]
            await asyncio.to_thread(redis_pipe, port, b"".join(one(i) for i in chunk), expected=len(chunk))
    after = sum(int(redis.Redis(port=p).info("memory")["used_memory"]) for p in ports)
    keys = sum(int(redis.Redis(port=p).dbsize()) for p in ports)
    return MemoryRow(layout, keys, after - before, (after - before) / n)


async def run_cluster(procs: Processes, single_port: int, pins: int, lookups: int, concurrency: int,
                      seed: int = 7) -> ClusterResult:
    """Start the cluster, fill it (memory rows), then time the store on it against the single Redis."""
    ports = start_cluster(procs)
    owners = _owners(ports[0])
    result = ClusterResult(len(ports), pins)
    shas = {redis.Redis(port=p).script_load(lua.CLAIM) for p in ports}
    sha = shas.pop()
    result.memory.append(await _fill(ports, owners, pins, lambda i: pin_key(BASE_PREFIX, user_key(i)),
                                     lambda i: set_commands(i, i + 1, px=False), "plain SET"))
    result.memory.append(await _fill(ports, owners, pins, lambda i: pin_key(PREFIX, user_key(i)),
                                     lambda i: claim_commands(sha, i, i + 1), "pin, current layout (CLAIM script)"))
    result.spread = [int(redis.Redis(port=p).dbsize()) for p in ports]
    cluster = RedisPinStore(f"redis+cluster://127.0.0.1:{ports[0]}", key_prefix=PREFIX, pin_ttl=PIN_TTL,
                            timeout=STORE_TIMEOUT)
    single = RedisPinStore(f"redis://127.0.0.1:{single_port}/0", key_prefix=PREFIX, pin_ttl=PIN_TTL,
                           timeout=STORE_TIMEOUT)
    raw = Redis(port=single_port)
    rng = random.Random(seed)
    try:
        counts = await cluster.counts()
        if sum(counts.values()) != pins:
            raise HarnessError(f"cluster counts() {counts} do not total {pins}")
        await raw.flushall()
        fresh = iter(range(10 * pins + 20_000_000, 10**11))

        async def get_c(i: int) -> None:
            if await cluster.get(user_key(i)) is None:
                raise LookupError(i)

        async def claim_one(store: RedisPinStore, i: int) -> None:
            if not (await store.claim(user_key(i), InstanceId(instance_of(i)))).won:
                raise LookupError(i)

        for i in range(min(pins, lookups)):  # the single Redis needs the same pins for its gets
            await single.claim(user_key(i), InstanceId(instance_of(i)))

        async def get_s(i: int) -> None:
            if await single.get(user_key(i)) is None:
                raise LookupError(i)

        hits = [rng.randrange(min(pins, lookups)) for _ in range(lookups)]
        await _compare(get_c, get_s, hits[:500], hits[:500], concurrency)  # warm-up: pools, slot map, scripts
        s, b = await _compare(get_c, get_s, hits, hits, concurrency)
        result.latency.append(LatencyRow("get, pin exists", concurrency, s, b, "same call, single Redis"))
        new_c, new_s = [next(fresh) for _ in range(lookups)], [next(fresh) for _ in range(lookups)]
        s, b = await _compare(lambda i: claim_one(cluster, i), lambda i: claim_one(single, i), new_c, new_s,
                              concurrency)
        result.latency.append(LatencyRow("claim, new user", concurrency, s, b, "same call, single Redis"))
        await raw.flushall()
    finally:
        await cluster.close()
        await single.close()
        await raw.aclose()
        for port in ports:
            redis.Redis(port=port).flushall()
    return result
