"""Scaling measurements (issue #6 item 3): the Redis pin store with many pins, the proxy's memory
with many users, and ``serve --workers 2`` against ``--workers 1``.

    python -m benchmarks.scaling [--pins 1000000] [--users 100000] [--quick] [--output PATH]

1. Pin store (``benchmarks.scaling_pins``): a private redis-server filled with N pins written by the
   store's own CLAIM script; Redis ``used_memory`` per pin against plain ``SET`` keys of the same
   sizes, and ``RedisPinStore.get``/``claim`` latencies against raw ``GET``/``SET NX PX``.
2. Proxy memory (``benchmarks.scaling_proxy``): RSS of ``affinity-proxy serve`` (fast engine, memory
   and Redis store) after first requests from N distinct users, against the same number of
   requests from one user.
3. Workers: wrk throughput of ``--workers 2`` ÷ ``--workers 1``, with nginx 2 ÷ 1 workers beside it.

Why ratios: the machine is shared (other benchmarks, builds), so every figure comes with a
baseline measured in the same run, and the ratio is the result. Loads are bounded in time and go to
127.0.0.1 only; every process started here (redis-server, backends, proxies, nginx) is stopped by
PID at the end, also on error, SIGTERM or Ctrl-C. Writes benchmarks/SCALING.md (with ``--quick``
only when ``--output`` is given). nginx and wrk are installed with apt-get when missing (unless
``--no-install``); without them the workers part is skipped and the other parts use aiohttp.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import aiohttp
import redis

from benchmarks.run import ensure_tools, find_tool, loadavg
from benchmarks.scaling_cluster import run_cluster
from benchmarks.scaling_common import start_redis
from benchmarks.scaling_pins import run_pin_store
from benchmarks.scaling_proxy import run_users, run_visits, run_workers, start_backends, workers_targets
from benchmarks.scaling_report import Results, report_markdown
from benchmarks.targets import HarnessError, Processes, run_main

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "benchmarks" / "SCALING.md"
PARTS = ("pins", "cluster", "users", "workers")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.scaling", description=__doc__.split("\n\n")[0])
    p.add_argument("--pins", type=int, default=1_000_000, help="pins in Redis (1000000)")
    p.add_argument("--users", type=int, default=100_000, help="distinct users sent to the proxy (100000)")
    p.add_argument("--lookups", type=int, default=20_000, help="timed store calls per operation and mode (20000)")
    p.add_argument("--concurrency", type=int, default=50, help="concurrent store calls in the concurrent mode (50)")
    p.add_argument("--connections", type=int, default=50, help="client connections of the loads (50)")
    p.add_argument("--duration", type=float, default=3.0, help="seconds per wrk leg (3; 2 legs per target per round)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the workers part (3)")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds of unmeasured wrk per target first (1)")
    p.add_argument("--wrk-threads", type=int, default=1, help="wrk threads in the workers part (1)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: 20k pins, 5k users, 2k lookups, 1 s legs, 1 round; no SCALING.md")
    p.add_argument("--output", type=Path, default=None, help="report file (default benchmarks/SCALING.md)")
    p.add_argument("--no-install", action="store_true", help="do not apt-get install nginx/wrk when missing")
    args = p.parse_args(argv)
    if args.quick:
        args.pins, args.users, args.lookups = min(args.pins, 20_000), min(args.users, 5_000), min(args.lookups, 2_000)
        args.duration, args.rounds, args.warmup = 1.0, 1, 1.0
    elif args.output is None:
        args.output = OUTPUT
    wanted = set(args.parts.split(","))
    if not wanted or wanted - set(PARTS):
        p.error(f"--parts: a comma-separated subset of {','.join(PARTS)}")
    args.parts = [x for x in PARTS if x in wanted]
    if not (1 <= args.pins <= 50_000_000 and 1 <= args.users <= 10_000_000 and 100 <= args.lookups <= 1_000_000
            and 1 <= args.concurrency <= 500 and 1 <= args.connections <= 1000 and 1 <= args.duration <= 300
            and 1 <= args.rounds <= 20 and 1 <= args.warmup <= 60 and 1 <= args.wrk_threads <= 16):
        p.error("out of range: --pins 1..50M, --users 1..10M, --lookups 100..1M, --concurrency 1..500, "
                "--connections 1..1000, --duration 1..300, --rounds 1..20, --warmup 1..60, --wrk-threads 1..16")
    return args


def tools(install: bool) -> tuple[str | None, str | None]:
    """nginx and wrk (installed with apt-get when missing and allowed); None for a missing one."""
    if install and (find_tool("nginx") is None or find_tool("wrk") is None):
        ensure_tools(install=True, haproxy=False)
    return find_tool("nginx"), find_tool("wrk")


def _version(argv: Sequence[str]) -> str:
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return (proc.stdout + proc.stderr).strip().splitlines()[0] if (proc.stdout + proc.stderr).strip() else "?"


def _module_version(name: str) -> str:
    try:
        return str(__import__(name).__version__)
    except ImportError:
        return "not installed"


def machine_info(nginx_bin: str | None, wrk_bin: str | None) -> dict[str, str]:
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.lower().startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_kib = next((int(x.split()[1]) for x in Path("/proc/meminfo").read_text().splitlines()
                    if x.startswith("MemTotal:")), 0)
    versions = [f"python {platform.python_version()}", f"aiohttp {aiohttp.__version__}",
                f"redis-py {redis.__version__}", f"uvloop {_module_version('uvloop')}",
                _version(["redis-server", "--version"]).split(" sha=")[0].replace("Redis server v=", "redis-server ")]
    if nginx_bin:
        versions.append(_version([nginx_bin, "-v"]).replace("nginx version: nginx/", "nginx "))
    if wrk_bin:
        versions.append(_version([wrk_bin, "-v"]).split(" [")[0])
    commit = _version(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    dirty = _version(["git", "-C", str(ROOT), "status", "--porcelain", "--", "affinity_proxy"])
    return {"machine": f"{os.cpu_count()} CPUs, {cpu}, {mem_kib / 1024 / 1024:.0f} GiB RAM, Linux {platform.release()}",
            "versions": ", ".join(versions),
            "commit": commit + (" + uncommitted changes in affinity_proxy/" if dirty not in ("", "?") else "")}


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run(args: argparse.Namespace, procs: Processes, nginx_bin: str | None, wrk_bin: str | None,
        results: Results) -> None:
    """The parts, in order; results are filled in as they come."""
    _, redis_port = start_redis(procs)
    if "pins" in args.parts:
        print(f"1. pin store: {args.pins:,} pins, {args.lookups:,} timed calls per operation", flush=True)
        results.pins = asyncio.run(run_pin_store(redis_port, args.pins, args.lookups, args.concurrency))
    if "cluster" in args.parts:
        n = min(args.pins, 300_000)
        print(f"1b. Redis Cluster, 3 masters: {n:,} pins, {args.lookups:,} timed calls per operation", flush=True)
        results.cluster = asyncio.run(run_cluster(procs, redis_port, n, args.lookups, args.concurrency))
    if "users" in args.parts or ("workers" in args.parts and wrk_bin):
        backends, results.backends = start_backends(procs, nginx_bin)
        if "users" in args.parts:
            print(f"2. proxy memory: {args.users:,} distinct users", flush=True)
            results.users = run_users(procs, backends, redis_port, users=args.users, connections=args.connections,
                                      wrk_bin=wrk_bin)
            n = max(1, args.users // 2)
            print(f"2b. first vs repeat visits: {args.rounds} round(s) of 3 legs x {n:,} users", flush=True)
            results.visits = run_visits(procs, backends, redis_port, users=n, connections=args.connections,
                                        wrk_bin=wrk_bin, rounds=args.rounds)
        if "workers" in args.parts and wrk_bin:
            print(f"3. workers: {args.rounds} round(s), 2 legs of {args.duration:g}s per target each", flush=True)
            targets = workers_targets(procs, backends, redis_port, nginx_bin)
            results.targets = [(t.name, t.what) for t in targets]
            results.workers = run_workers(targets, wrk_bin, duration=args.duration, rounds=args.rounds,
                                          connections=args.connections, threads=args.wrk_threads,
                                          warmup=args.warmup)
    if "workers" in args.parts and not wrk_bin:
        results.skipped.append("serve --workers: skipped, wrk is not installed (apt-get install wrk)")


def measure_all(args: argparse.Namespace, command: str) -> tuple[Results, list[str]]:
    """Every part in a temporary directory; every process stopped by PID at the end (also on error).
    Returns the results and the processes that could not be stopped (normally none)."""
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        raise HarnessError("redis-server and redis-cli are needed (apt-get install redis-server)")
    nginx_bin, wrk_bin = tools(install=not args.no_install)
    results = Results(args=vars(args).copy(), command=command, info=machine_info(nginx_bin, wrk_bin),
                      started=dt.datetime.now(dt.UTC), load_before=loadavg())
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="affinity-scaling-") as tmp:
        workdir = Path(tmp)
        workdir.chmod(0o755)  # nginx workers run as an unprivileged user when started by root
        procs = Processes(workdir)
        try:
            run(args, procs, nginx_bin, wrk_bin, results)
        finally:
            left = procs.finish()
    results.seconds, results.load_after = time.monotonic() - t0, loadavg()
    return results, left


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    command = ("python -m benchmarks.scaling " + shlex.join(sys.argv[1:] if argv is None else list(argv))).strip()
    signal.signal(signal.SIGTERM, _interrupt)  # stop cleanly (the finally above) on SIGTERM as on Ctrl-C
    results, left = measure_all(args, command)
    text = report_markdown(results)
    print("\n" + text.split("\n## Summary\n", 1)[1].split("\n## ", 1)[0].strip())
    if args.output is not None:
        args.output.write_text(text)
        print(f"wrote {args.output} ({results.seconds / 60:.1f} min)")
    return 1 if left else 0


if __name__ == "__main__":
    run_main(main)
