"""``serve --workers N`` end to end: a real supervisor subprocess, its spawned workers, real Redis and
real demo backends. Proves the load is shared, pins are shared (one pin after a 100-request race over
2 workers), metrics are exact whichever worker answers the scrape, a crashed worker is replaced, and
SIGTERM stops everything with exit code 0.

Which worker served a request is read from the per-pid files of the multiprocess metrics directory
(the supervisor logs its path); the workers are the parent's children found through /proc.
"""

from __future__ import annotations

import asyncio
import glob
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as aioredis
from prometheus_client.multiprocess import MultiProcessCollector

from affinity_proxy.pins.redis import bucket_of, pin_key
from tests.functional.helpers import metric_value
from tests.support.backends import Backends
from tests.support.engine import engine_line
from tests.support.redis_server import free_port
from tests.support.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]
CLIENT_TIMEOUT = 5.0  # limits.client_timeout in the test config: SIGKILL comes 5 s after that


class Supervised:
    """One ``affinity-proxy serve --workers N`` process (own session, so teardown can kill the group)."""

    def __init__(self, proc: subprocess.Popen[bytes], log_path: Path) -> None:
        self.proc = proc
        self.log_path = log_path
        self.port = 0
        self.admin_port = 0

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def metrics_dir(self) -> Path:
        found = re.search(r"metrics_dir=(\S+)", self.log())
        assert found, self.log()
        return Path(found.group(1))

    def worker_pids(self) -> set[int]:
        """Live spawned workers of the supervisor, from /proc (ppid and command line)."""
        pids = set()
        for stat in glob.glob("/proc/[0-9]*/stat"):
            try:
                text = Path(stat).read_text()
                cmdline = Path(stat).with_name("cmdline").read_bytes()
            except OSError:  # the process ended while we looked
                continue
            fields = text.rsplit(")", 1)[1].split()
            if int(fields[1]) == self.proc.pid and fields[0] != "Z" and b"spawn_main" in cmdline:
                pids.add(int(Path(stat).parent.name))
        return pids

    def requests_by_pid(self) -> dict[int, float]:
        """``affinity_requests_total`` per worker pid, from that worker's own metrics file."""
        counts = {}
        for path in self.metrics_dir().glob("counter_*.db"):
            pid = int(path.stem.split("_")[1])
            total = 0.0
            for metric in MultiProcessCollector.merge([str(path)]):
                total += sum(s.value for s in metric.samples if s.name == "affinity_requests_total")
            counts[pid] = total
        return counts


def write_config(
    tmp_path: Path, instances: dict[str, int], store_url: str, port: int, admin_port: int, name: str = "proxy.yaml", *,
    engine: str, extra: tuple[str, ...] = (),
) -> Path:
    lines = [
        engine_line(engine),
        f"listen: 127.0.0.1:{port}",
        f"admin_listen: 127.0.0.1:{admin_port}",
        *(() if any(line.startswith("cookie:") for line in extra)  # ``extra`` may bring its own cookie section
          else ("cookie: {secret: workers-test-secret-xxxxxxxxxx}",)),
        f"store: {{url: '{store_url}'}}",
        "user_key: [{header: X-User-Id}]",
        f"limits: {{client_timeout: {CLIENT_TIMEOUT}s}}",
        "instances:",
        *(f"  - {{id: {i}, url: 'http://127.0.0.1:{p}'}}" for i, p in instances.items()),
        *extra,
    ]
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


def spawn_serve(config: Path, workers: int, log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("wb") as log_file:
        return subprocess.Popen(
            [sys.executable, "-m", "affinity_proxy", "serve", "--config", str(config), "--workers", str(workers)],
            stdout=log_file, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
            env={**os.environ, "LOG_LEVEL": "INFO", "LOG_FORMAT": "text"},
        )


StartFn = Callable[..., Awaitable[Supervised]]


@pytest.fixture
async def start_serve(tmp_path: Path, backends: Backends, redis_url: str, engine: str) -> AsyncIterator[StartFn]:
    """``await start_serve(workers, port=, admin_port=, instances=)``: ``serve --workers N`` on the
    test's engine over Redis; every worker is checked to have started on that engine."""
    started: list[Supervised] = []

    async def start(
        workers: int = 2, *, port: int | None = None, admin_port: int | None = None,
        instances: dict[str, int] | None = None, extra: tuple[str, ...] = (),
    ) -> Supervised:
        n = len(started)
        port = free_port() if port is None else port
        while admin_port is None or admin_port == port:  # two free_port() calls may return the same port
            admin_port = free_port()
        config = write_config(tmp_path, instances or backends.ports, redis_url, port, admin_port,
                              name=f"proxy-{n}.yaml", engine=engine, extra=extra)
        log_path = tmp_path / f"serve-{n}.log"
        sup = Supervised(spawn_serve(config, workers, log_path), log_path)
        started.append(sup)
        ready_line = "all workers ready" if workers > 1 else "listening"
        await wait_until(lambda: ready_line in sup.log() or sup.proc.poll() is not None, timeout=60,
                         interval=0.05, message="serve ready")
        assert sup.proc.poll() is None, sup.log()
        bound = re.findall(r"listening .*?listen=127\.0\.0\.1:(\d+) admin=127\.0\.0\.1:(\d+)", sup.log())
        assert len(bound) == workers and len(set(bound)) == 1, sup.log()  # every worker on the same ports
        assert len(re.findall(rf"listening .*engine={engine}\b", sup.log())) == workers, sup.log()
        sup.port, sup.admin_port = (int(p) for p in bound[0])
        return sup

    yield start
    for sup in started:
        if sup.proc.poll() is None:
            os.killpg(sup.proc.pid, signal.SIGKILL)
            sup.proc.wait()


@pytest.fixture
async def fresh_connections() -> AsyncIterator[aiohttp.ClientSession]:
    """One TCP connection per request: SO_REUSEPORT picks the worker per connection."""
    connector = aiohttp.TCPConnector(force_close=True, limit=100)
    async with aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar()) as session:
        yield session


async def get_instance(http: aiohttp.ClientSession, sup: Supervised, user: str) -> str:
    async with http.get(sup.base + "/", headers={"X-User-Id": user}) as resp:
        assert resp.status == 200, await resp.text()
        await resp.read()
        return resp.headers["X-Fly-Instance"]


async def bounded(coros: list[Awaitable[str]], limit: int) -> list[str]:
    gate = asyncio.Semaphore(limit)

    async def run(coro: Awaitable[str]) -> str:
        async with gate:
            return await coro

    return list(await asyncio.gather(*(run(c) for c in coros)))


async def scraped_requests(http: aiohttp.ClientSession, sup: Supervised) -> float:
    async with http.get(sup.admin + "/metrics") as resp:
        assert resp.status == 200
        return metric_value(await resp.text(), "affinity_requests_total")


async def counted(sup: Supervised, sent: int) -> dict[int, float]:
    """``requests_by_pid()`` once the workers have written all ``sent`` requests to their files.

    A client can hold its answer before the worker's count reaches the file: the fast engine adds
    its counts right after the callbacks that answered (``fastpath/counting.py``), and a loaded
    worker may run those a moment later. A scrape through one worker reads the other's file, so
    wait for the files before comparing a scrape with what was sent."""

    def all_counted() -> dict[int, float] | None:
        counts = sup.requests_by_pid()
        return counts if sum(counts.values()) == sent else None

    return await wait_until(all_counted, timeout=10, message=f"{sent} requests counted")  # type: ignore[no-any-return]


def stop(sup: Supervised) -> tuple[int, float]:
    started = time.monotonic()
    sup.proc.send_signal(signal.SIGTERM)
    code = sup.proc.wait(timeout=CLIENT_TIMEOUT + 15)
    return code, time.monotonic() - started


async def test_workers_share_load_pins_and_metrics(
    start_serve: StartFn, fresh_connections: aiohttp.ClientSession, redis_url: str,
) -> None:
    sup = await start_serve(workers=2)
    http = fresh_connections
    workers = sup.worker_pids()
    assert len(workers) == 2

    users = [f"user-{i}" for i in range(400)]
    placed = dict(zip(users, await bounded([get_instance(http, sup, u) for u in users], 50), strict=True))
    sent = 400
    by_pid = await counted(sup, sent)
    assert set(by_pid) == workers
    assert all(n > 0 for n in by_pid.values()), by_pid  # both workers served
    for _ in range(8):  # whichever worker answers, the scrape sums every worker
        assert await scraped_requests(http, sup) == sent

    # Same user, any worker, same instance.
    again = users[:40] * 5
    assert await bounded([get_instance(http, sup, u) for u in again], 50) == [placed[u] for u in again]
    sent += len(again)
    # A pin set through one worker's admin listener is obeyed by both (no cookie: the store decides).
    moved = next(i for i in ("a", "b", "c") if i != placed["user-0"])
    async with http.put(sup.admin + "/pins/user-0", json={"instance": moved}) as resp:
        assert resp.status == 200, await resp.text()
    assert set(await bounded([get_instance(http, sup, "user-0") for _ in range(20)], 20)) == {moved}
    sent += 20

    # The race: 100 concurrent first requests for one new user, spread over both workers.
    before = await counted(sup, sent)
    served = await bounded([get_instance(http, sup, "race-user") for _ in range(100)], 100)
    sent += 100
    assert len(set(served)) == 1, served
    after = await counted(sup, sent)
    assert all(after[pid] > before[pid] for pid in workers), (before, after)
    client = aioredis.from_url(redis_url, decode_responses=True)
    try:
        assert await client.keys("*race-user*") == [pin_key("affinity:", "race-user")]
        assert await client.get(pin_key("affinity:", "race-user")) == served[0]
        counted_pins = [int(n) for key in await client.keys("affinity:cnt:*") for n in (await client.hvals(key))]
        assert sum(counted_pins) == len(await client.keys("affinity:pin:*"))  # the race counted one pin
        tag = f"{{p{bucket_of('race-user')}}}"
        assert f"affinity:cnt:{tag}{served[0]}" in await client.keys(f"affinity:cnt:{tag}*")
    finally:
        await client.aclose()
    assert await scraped_requests(http, sup) == sent

    metrics_dir = sup.metrics_dir()
    code, took = stop(sup)
    assert code == 0, sup.log()
    assert took < CLIENT_TIMEOUT + 5
    await wait_until(lambda: not any(Path(f"/proc/{pid}").exists() for pid in workers), timeout=5)
    assert not metrics_dir.exists()
    assert "stopping workers" in sup.log() and "Traceback" not in sup.log()


async def test_crashed_worker_is_replaced_and_its_counts_kept(
    start_serve: StartFn, fresh_connections: aiohttp.ClientSession,
) -> None:
    sup = await start_serve(workers=2, port=0, admin_port=0)  # the supervisor picks one port for all
    http = fresh_connections
    await bounded([get_instance(http, sup, f"u{i}") for i in range(60)], 30)
    victim, survivor = sorted(sup.worker_pids())
    os.kill(victim, signal.SIGKILL)


    def replaced() -> bool:
        pids = sup.worker_pids()
        return len(pids) == 2 and survivor in pids and victim not in pids

    await wait_until(replaced, timeout=30, message="a replacement worker")
    await wait_until(lambda: sup.log().count("worker ready") == 3, timeout=30, message="the replacement ready")
    assert "worker crashed; restarting" in sup.log() and f"worker_pid={victim} exit_code=-9" in sup.log()
    await bounded([get_instance(http, sup, f"v{i}") for i in range(60)], 30)
    await counted(sup, 120)  # the killed worker's file stays in the directory
    assert await scraped_requests(http, sup) == 120  # the dead worker's 60-odd requests still count
    code, _ = stop(sup)
    assert code == 0, sup.log()


def test_memory_store_refuses_more_than_one_worker(engine: str, tmp_path: Path, backends: Backends) -> None:
    config = write_config(tmp_path, backends.ports, "memory://", free_port(), free_port(), engine=engine)
    done = subprocess.run(
        [sys.executable, "-m", "affinity_proxy", "serve", "--config", str(config), "--workers", "2"],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        "error: --workers > 1 needs a shared pin store (store.url: redis://...); the memory store lives in one process"
    )


def test_port_in_use_exits_1_before_starting_workers(engine: str, tmp_path: Path, backends: Backends,
                                                     redis_url: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config = write_config(tmp_path, backends.ports, redis_url, taken.getsockname()[1], free_port(), engine=engine)
        done = subprocess.run(
            [sys.executable, "-m", "affinity_proxy", "serve", "--config", str(config), "--workers", "2"],
            capture_output=True, text=True, cwd=ROOT, timeout=60,
        )
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: workers could not start: cannot bind 127.0.0.1:"), done.stderr
    assert "worker started" not in done.stderr


def spawn_backend(name: str, port: int) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "affinity_proxy.devtools.demo.backend", "--id", name, "--port", str(port)]
    return subprocess.Popen(argv,
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.fixture
async def backend_processes() -> AsyncIterator[dict[str, int]]:
    """Three standalone demo backends in their own processes, so the load generator is alone in ours."""
    ports = {name: free_port() for name in ("a", "b", "c")}
    procs = [spawn_backend(name, port) for name, port in ports.items()]

    async def accepting(port: int) -> bool:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            return False
        writer.close()
        await writer.wait_closed()
        return True

    try:
        for port in ports.values():
            await wait_until(lambda port=port: accepting(port), timeout=30, interval=0.05, message="a demo backend")
        yield ports
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=10)


@pytest.mark.slow
async def test_throughput_of_two_workers_against_one(
    start_serve: StartFn, backend_processes: dict[str, int],
) -> None:
    """Measured and printed, never asserted: 3000 requests for 300 users over 50 keep-alive
    connections, each setting measured twice (interleaved, best kept) to damp a busy machine."""
    rates: dict[int, list[float]] = {1: [], 2: []}
    for workers in (1, 2, 1, 2):
        sup = await start_serve(workers=workers, instances=backend_processes)
        connector = aiohttp.TCPConnector(limit=50)
        async with aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar()) as http:
            await bounded([get_instance(http, sup, f"w{i % 300}") for i in range(300)], 50)  # warm up, pin
            started = time.perf_counter()
            await bounded([get_instance(http, sup, f"w{i % 300}") for i in range(3000)], 50)
            rates[workers].append(3000 / (time.perf_counter() - started))
        code, _ = stop(sup)
        assert code == 0, sup.log()
    one, two = max(rates[1]), max(rates[2])
    print(f"\nthroughput: --workers 1 {one:.0f} req/s, --workers 2 {two:.0f} req/s, ratio {two / one:.2f} "
          f"(runs: {[round(r) for r in rates[1]]} / {[round(r) for r in rates[2]]}; {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f})")
