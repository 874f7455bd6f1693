"""Parts 2 and 3 of ``benchmarks.scaling``: the proxy's memory with many distinct users, and
``serve --workers 2`` against ``--workers 1``.

Why this way:

- Memory: RSS (VmRSS, summed over the proxy's processes) of a real ``affinity-proxy serve``
  (``engine: fast``) after ``users`` first requests from distinct users, against a fresh proxy of the
  same config after the same number of requests from ONE user, so the difference is what distinct
  users cost and not what any request costs (buffers, caches, allocator growth). Done with the
  memory store and with the Redis store; the pin count afterwards comes from the admin API.
- Workers: wrk against both worker counts and against nginx with 1 and 2 workers, every target
  twice per round in mirrored order, rounds interleaved, ratio 2÷1 per round. The Redis store is used for both worker
  counts (``--workers 2`` refuses the memory store). Nothing is pinned to a CPU: wrk, the backends,
  Redis and the workers share the machine's cores, and the machine's CPU use is reported.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import secrets
import statistics
import sys
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import redis

from benchmarks import nginx, wrk
from benchmarks.scaling_common import USER_HEADER, cpu_times, rss_kib, stop
from benchmarks.scaling_load import USERS_LUA, LoadResult, load_users
from benchmarks.targets import (
    COOKIE,
    Processes,
    Started,
    Target,
    cpu_seconds,
    free_port,
    proxy_mode_headers,
    static_headers,
    wait_ready,
)

BACKEND_IDS = ("app-1", "app-2", "app-3")
ROOT = Path(__file__).resolve().parent.parent
SETTLE = 1.5  # seconds between a load and the RSS reading (background flushes, freed buffers)


def proxy_yaml(listen: int, admin: int, secret: str, backends: Sequence[tuple[str, int]], store_url: str,
               key_prefix: str) -> str:
    """The proxy's config: proxy mode, fast engine, user key from the ``X-User-Id`` header."""
    lines = [
        "mode: proxy", "engine: fast",
        f'listen: "127.0.0.1:{listen}"', f'admin_listen: "127.0.0.1:{admin}"',
        "instances:", *(f"  - {{id: {i}, url: 'http://127.0.0.1:{p}'}}" for i, p in backends),
        "cookie:", f"  name: {COOKIE}", f"  secret: {secret}",
        "user_key:", f"  - header: {USER_HEADER}",
        "store:", f"  url: {store_url}", f'  key_prefix: "{key_prefix}"',
        "log:", "  level: WARNING",
    ]
    return "\n".join(lines) + "\n"


def start_backends(procs: Processes, nginx_bin: str | None) -> tuple[list[tuple[str, int]], str]:
    """Three fast backends: one nginx (``return 200``) when installed, else the aiohttp demo app."""
    backends = [(i, free_port()) for i in BACKEND_IDS]
    if nginx_bin is not None:
        for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (procs.workdir / "backends-temp" / sub).mkdir(parents=True, exist_ok=True)
        conf = procs.workdir / "backends.conf"
        conf.write_text(nginx.backend_conf(procs.workdir, backends))
        s = procs.start("backends", nginx.nginx_argv(nginx_bin, procs.workdir, conf, "backends"), cpu=None)
        wait_ready(s, backends[0][1])
        return backends, "one nginx (1 worker) serving 3 `return 200` backends"
    for i, port in backends:
        s = procs.start(f"backend-{i}", [sys.executable, "-m", "affinity_proxy.devtools.demo.backend", "--id", i,
                                         "--port", str(port)], cpu=None)
        wait_ready(s, port, "/healthz")
    return backends, "3 aiohttp demo backends (`affinity_proxy.devtools.demo.backend`; nginx not installed)"


@dataclass(frozen=True, slots=True)
class Proxy:
    started: Started
    port: int
    admin: int


def start_proxy(procs: Processes, name: str, backends: Sequence[tuple[str, int]], store_url: str,
                key_prefix: str, *, workers: int = 1, secret: str | None = None) -> Proxy:
    port, admin = free_port(), free_port()
    conf = procs.workdir / f"{name}.yaml"
    conf.write_text(proxy_yaml(port, admin, secret or secrets.token_hex(32), backends, store_url, key_prefix))
    env = dict(os.environ, PYTHONPATH=str(ROOT), LOG_LEVEL="WARNING")
    s = procs.start(name, [sys.executable, "-m", "affinity_proxy", "serve", "--config", str(conf),
                           "--workers", str(workers)], cpu=None, env=env)
    wait_ready(s, port, "/_affinity/health")
    return Proxy(s, port, admin)


def pins_in_store(admin: int) -> int:
    """Pins the proxy's store holds, summed over instances (admin ``GET /instances``)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/instances", timeout=30) as resp:
        return sum(int(i["pins"]) for i in json.load(resp)["instances"])


# --- part 2: memory with many users --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MemoryRun:
    store: str
    users: int  # distinct user keys sent
    load: LoadResult
    pins: int  # pins in the store afterwards
    rss_start_kib: int
    rss_after_kib: int
    redis_delta: int | None  # Redis used_memory after - before (redis store only)
    round: int = 0


def run_users(procs: Processes, backends: Sequence[tuple[str, int]], redis_port: int, *, users: int,
              connections: int, wrk_bin: str | None, rounds: int = 1) -> list[MemoryRun]:
    """``rounds`` interleaved rounds; in each, for each store: a fresh proxy loaded by 1 user (repeat
    visits) and a fresh one loaded by ``users`` users (first visits), ``users`` requests each, in
    alternating order (1 then many in even rounds, many then 1 in odd ones), so a drift in the shared
    machine's load hits both alike and the per-round ratio first ÷ repeat is the result."""
    script = None
    if wrk_bin is not None:
        script = procs.workdir / "users.lua"
        script.write_text(USERS_LUA)
    runs = []
    r = redis.Redis(host="127.0.0.1", port=redis_port)
    try:
        for rnd in range(rounds):
            for store, url in (("memory", "memory://"), ("redis", f"redis://127.0.0.1:{redis_port}/0")):
                for distinct in (1, users) if rnd % 2 == 0 else (users, 1):
                    run = _users_run(procs, backends, r, store, url, distinct, users, connections, wrk_bin, script)
                    runs.append(dataclasses.replace(run, round=rnd))
    finally:
        r.close()
    return runs


def _users_run(procs: Processes, backends: Sequence[tuple[str, int]], r: redis.Redis, store: str, url: str,
               distinct: int, total: int, connections: int, wrk_bin: str | None, script: Path | None) -> MemoryRun:
    name = f"users-{store}-{distinct}"
    r.flushall()  # each run alone in Redis, under the default prefix (as in part 1)
    proxy = start_proxy(procs, name, backends, url, "affinity:")
    try:
        time.sleep(SETTLE)
        start = rss_kib(proxy.started.pids())
        mem0 = int(r.info("memory")["used_memory"])
        load = load_users(proxy.port, users=distinct, total=total, connections=connections, wrk_bin=wrk_bin,
                          script=script)
        time.sleep(SETTLE)
        run = MemoryRun(store, distinct, load, pins_in_store(proxy.admin), start, rss_kib(proxy.started.pids()),
                        int(r.info("memory")["used_memory"]) - mem0 if store == "redis" else None)
    finally:
        stop(proxy.started)
    print(f"  {store} store, {distinct:,} user(s): {load.requests:,} requests in {load.seconds:.1f}s, "
          f"{run.pins:,} pins, RSS {start / 1024:.1f} -> {run.rss_after_kib / 1024:.1f} MiB", flush=True)
    return run


# --- part 2b: first visits against repeat visits ------------------------------------------------


@dataclass(frozen=True, slots=True)
class VisitRound:
    """One round on one fresh proxy: first visits of users A, the same users again (repeat visits:
    pins stored, no cookie, so a store look-up each), then first visits of new users B."""

    store: str
    round: int
    first_a: LoadResult
    repeat: LoadResult
    first_b: LoadResult

    @property
    def first_rps(self) -> float:
        """The two first-visit legs around the repeat leg, so a drift in the machine's load between
        the legs hits first and repeat visits alike."""
        return (_rps(self.first_a) + _rps(self.first_b)) / 2

    @property
    def repeat_rps(self) -> float:
        return _rps(self.repeat)


def _rps(load: LoadResult) -> float:
    return load.requests / load.seconds if load.seconds else 0.0


def run_visits(procs: Processes, backends: Sequence[tuple[str, int]], redis_port: int, *, users: int,
               connections: int, wrk_bin: str | None, rounds: int) -> list[VisitRound]:
    """``rounds`` rounds per store, stores alternating in order per round; each round a fresh proxy
    and an empty Redis, ``users`` requests per leg (one per user)."""
    script = None
    if wrk_bin is not None:
        script = procs.workdir / "visits.lua"
        script.write_text(USERS_LUA)
    stores = (("memory", "memory://"), ("redis", f"redis://127.0.0.1:{redis_port}/0"))
    out = []
    r = redis.Redis(host="127.0.0.1", port=redis_port)
    try:
        for rnd in range(rounds):
            for store, url in stores if rnd % 2 == 0 else stores[::-1]:
                r.flushall()
                proxy = start_proxy(procs, f"visits-{store}-{rnd}", backends, url, "affinity:")
                try:
                    def leg(offset: int, port: int = proxy.port) -> LoadResult:
                        return load_users(port, users=users, total=users, connections=connections, wrk_bin=wrk_bin,
                                          script=script, offset=offset)
                    visit = VisitRound(store, rnd, leg(0), leg(0), leg(users))
                finally:
                    stop(proxy.started)
                out.append(visit)
                print(f"  round {rnd + 1}, {store} store: first {visit.first_rps:,.0f} req/s, repeat "
                      f"{visit.repeat_rps:,.0f} req/s", flush=True)
    finally:
        r.close()
    return out


# --- part 3: workers -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LoadRow:
    target: str
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    cpu: float  # the target's CPU use in cores
    busy: float  # the whole machine's CPU use, 0..1
    rss_kib: int


def _nginx_proxy(procs: Processes, nginx_bin: str, backends: Sequence[tuple[str, int]], workers: int) -> Target:
    name = f"nginx-w{workers}"
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (procs.workdir / f"{name}-temp" / sub).mkdir(parents=True, exist_ok=True)
    port = free_port()
    text = nginx.proxy_conf(procs.workdir, port, [p for _, p in backends], cookie_name=COOKIE, name=name)
    conf = procs.workdir / f"{name}.conf"
    conf.write_text(text.replace("worker_processes 1;", f"worker_processes {workers};", 1))
    s = procs.start(name, nginx.nginx_argv(nginx_bin, procs.workdir, conf, name), cpu=None)
    wait_ready(s, port)
    return Target(name, f"nginx, {workers} worker(s), hash $cookie consistent", port, [s],
                  static_headers("bench-cookie"))


def workers_targets(procs: Processes, backends: Sequence[tuple[str, int]], redis_port: int,
                    nginx_bin: str | None) -> list[Target]:
    targets = []
    for n in (1, 2):
        proxy = start_proxy(procs, f"proxy-w{n}", backends, f"redis://127.0.0.1:{redis_port}/0", "scaling-workers:",
                            workers=n)
        targets.append(Target(f"proxy-w{n}", f"affinity-proxy serve --workers {n}, fast engine, redis store",
                              proxy.port, [proxy.started], functools.partial(proxy_mode_headers, proxy.port)))
    if nginx_bin is not None:
        targets += [_nginx_proxy(procs, nginx_bin, backends, n) for n in (1, 2)]
    return targets


def measure(t: Target, wrk_bin: str, *, duration: float, connections: int, threads: int) -> LoadRow:
    argv = wrk.wrk_argv(wrk_bin, t.url, duration=duration, connections=connections, threads=threads,
                        headers=t.headers())  # no Lua: wrk stays cheap
    pids = t.pids()
    cpu0, (busy0, total0), t0 = cpu_seconds(pids), cpu_times(), time.monotonic()
    res, _ = wrk.run_wrk(argv, duration=duration)
    busy1, total1 = cpu_times()
    cpu = (cpu_seconds(pids) - cpu0) / max(1e-9, time.monotonic() - t0)
    return LoadRow(t.name, res.rps, res.p50_ms, res.p99_ms, res.errors(), cpu,
                   (busy1 - busy0) / max(1, total1 - total0), rss_kib(t.pids()))


def combine(legs: Sequence[LoadRow]) -> LoadRow:
    """One target's legs of a round as one row: means (errors summed, RSS the largest)."""
    n = len(legs)
    return LoadRow(legs[0].target, sum(x.rps for x in legs) / n, sum(x.p50_ms for x in legs) / n,
                   sum(x.p99_ms for x in legs) / n, sum(x.errors for x in legs), sum(x.cpu for x in legs) / n,
                   sum(x.busy for x in legs) / n, max(x.rss_kib for x in legs))


def run_workers(targets: Sequence[Target], wrk_bin: str, *, duration: float, rounds: int, connections: int,
                threads: int, warmup: float) -> list[list[LoadRow]]:
    """After one warm-up load each, ``rounds`` rounds; a round loads every target twice in mirrored
    order (A B C D D C B A), so a drift in the machine's load during the round hits all alike."""
    for t in targets:
        measure(t, wrk_bin, duration=warmup, connections=connections, threads=threads)
    out = []
    for r in range(rounds):
        legs: dict[str, list[LoadRow]] = {t.name: [] for t in targets}
        for t in [*targets, *reversed(targets)]:
            legs[t.name].append(measure(t, wrk_bin, duration=duration, connections=connections, threads=threads))
        out.append([combine(legs[t.name]) for t in targets])
        print("  round " + str(r + 1) + ": " + ", ".join(f"{x.target} {x.rps:,.0f} req/s" for x in out[-1]),
              flush=True)
    return out


def ratios_2_to_1(rounds: Sequence[Sequence[LoadRow]], stem: str) -> list[float]:
    """Per round: req/s(``stem``-w2) ÷ req/s(``stem``-w1)."""
    values = []
    for rnd in rounds:
        by = {x.target: x for x in rnd}
        one, two = by.get(f"{stem}-w1"), by.get(f"{stem}-w2")
        if one and two and one.rps:
            values.append(two.rps / one.rps)
    return values


def ratio_2_to_1(rounds: Sequence[Sequence[LoadRow]], stem: str) -> float | None:
    """The median over rounds of ``ratios_2_to_1``."""
    values = ratios_2_to_1(rounds, stem)
    return statistics.median(values) if values else None
