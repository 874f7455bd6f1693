"""`affinity-proxy serve` as a real process: SIGTERM under load loses no in-flight request and
closes WebSockets with 1001; SIGHUP reloads the config; --exec supervises the app."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.functional.test_streaming import _free_port
from tests.support.backends import Backends
from tests.support.engine import engine_line
from tests.support.waiting import wait_until


def _write(path: Path, backends: Backends, ids: list[str], port: int, admin_port: int, engine: str) -> None:
    lines = [
        engine_line(engine),
        f"listen: 127.0.0.1:{port}",
        f"admin_listen: 127.0.0.1:{admin_port}",
        "cookie: {secret: lifecycle-secret-0123456789}",
        "user_key: [{header: X-User-Id}]",
        "limits: {client_timeout: 10s}",
        "instances:",
        *(f"  - {{id: {i}, url: 'http://127.0.0.1:{backends.ports[i]}'}}" for i in ids),
    ]
    path.write_text("\n".join(lines) + "\n")


class Served:
    def __init__(self, proc: subprocess.Popen[bytes], port: int, admin_port: int, config: Path, engine: str) -> None:
        self.proc, self.port, self.admin_port, self.config, self.engine = proc, port, admin_port, config, engine

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def _start(tmp_path: Path, backends: Backends, engine: str, *extra: str) -> Served:
    port, admin_port = _free_port(), _free_port()
    cfg = tmp_path / "proxy.yaml"
    _write(cfg, backends, ["a", "b", "c"], port, admin_port, engine)
    command = [sys.executable, "-m", "affinity_proxy", "serve", "--config", str(cfg), *extra]
    env = {**os.environ, "LOG_LEVEL": "WARNING"}
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    return Served(proc, port, admin_port, cfg, engine)


@pytest.fixture
def served(tmp_path: Path, backends: Backends, engine: str) -> Iterator[Served]:
    s = _start(tmp_path, backends, engine)
    yield s
    if s.proc.poll() is None:
        s.proc.kill()
    s.proc.wait()
    assert s.proc.stderr is not None
    s.proc.stderr.close()


async def _ready(http: aiohttp.ClientSession, served: Served) -> None:
    async def ok() -> bool:
        try:
            async with http.get(served.base + "/_affinity/health") as resp:
                return resp.status == 200
        except aiohttp.ClientConnectionError:
            return False

    await wait_until(ok, timeout=20, interval=0.1)


async def test_sigterm_under_load_loses_no_inflight_request(served, http) -> None:
    await _ready(http, served)
    outcomes: list[tuple[float, bool]] = []
    last_start: dict[int, float] = {}  # client -> when its latest request started
    in_flight: set[int] = set()  # clients waiting for an answer
    stop_load = asyncio.Event()

    async def client(i: int) -> None:
        async with aiohttp.ClientSession() as own:
            while not stop_load.is_set():
                started = last_start[i] = time.monotonic()
                in_flight.add(i)
                try:
                    async with own.get(served.base + "/slow", params={"delay": "0.5"},
                                       headers={"X-User-Id": f"u{i}"}) as resp:
                        await resp.read()
                        outcomes.append((started, resp.status == 200))
                except aiohttp.ClientError:
                    outcomes.append((started, False))
                    await asyncio.sleep(0.05)
                finally:
                    in_flight.discard(i)

    ws = await http.ws_connect(served.base + "/ws")
    loops = [asyncio.ensure_future(client(i)) for i in range(20)]
    def draining_work() -> bool:
        """Load is steady (a round of answers) and at least 10 requests are well under way (older
        than the 0.1 s margin below): those must complete after the signal."""
        now = time.monotonic()
        return len(outcomes) >= 20 and sum(now - last_start[i] > 0.15 for i in in_flight) >= 10

    await wait_until(draining_work, timeout=20, message="steady load with requests in flight")
    signalled = time.monotonic()
    served.proc.send_signal(signal.SIGTERM)
    draining_health = 0

    async def health_says_draining() -> bool:
        """Asked while the requests in flight drain on the main listener: the admin listener is
        still up then (after the WebSockets close it may be gone, as soon as their relay ends)."""
        nonlocal draining_health
        async with http.get(f"http://127.0.0.1:{served.admin_port}/health") as resp:
            draining_health = resp.status
        return draining_health == 503

    await wait_until(health_says_draining, timeout=5, message="admin /health says 503 while the node drains")
    msg = await ws.receive(timeout=10)
    # every request in flight at the signal has ended once each client has started a later one
    await wait_until(lambda: all(t > signalled for t in last_start.values()), timeout=20,
                     message="requests in flight at SIGTERM finished")
    stop_load.set()
    await asyncio.gather(*loops)
    code = await asyncio.to_thread(served.proc.wait, 20)
    before = [ok for started, ok in outcomes if started < signalled - 0.1]
    print(f"SIGTERM under load: {len(before)} requests started before the signal, "
          f"{before.count(False)} failed; {len(outcomes) - len(before)} around/after it")
    assert code == 0
    assert before and all(before), "every request that started before SIGTERM completes"
    assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING)
    assert ws.close_code == 1001
    assert draining_health == 503, "health reports 503 while the node drains"
    await ws.close()


async def test_sighup_reloads_the_config(served, http, backends) -> None:
    """SIGHUP with a new instance list keeps every open WebSocket and every cookie-pinned user."""
    from tests.functional.helpers import COOKIE, affinity_cookie

    await _ready(http, served)
    pinned = []
    for _ in range(40):
        async with http.get(served.base + "/") as resp:
            pinned.append((affinity_cookie(resp), (await resp.json())["instance"]))
    ws = await http.ws_connect(served.base + "/ws")
    await ws.send_str("whoami")
    ws_instance = (await ws.receive(timeout=5)).data
    await backends.start("d")
    _write(served.config, backends, ["a", "b", "c", "d"], served.port, served.admin_port, served.engine)
    served.proc.send_signal(signal.SIGHUP)

    async def has_d() -> bool:
        async with http.get(f"http://127.0.0.1:{served.admin_port}/instances") as resp:
            return "d" in {i["id"] for i in (await resp.json())["instances"]}

    await wait_until(has_d, timeout=10, interval=0.1)
    assert served.proc.poll() is None, "SIGHUP must not stop the proxy"
    await ws.send_str("whoami")
    assert (await ws.receive(timeout=5)).data == ws_instance, "the open WebSocket survived"
    await ws.close()
    for cookie, instance in pinned:
        async with http.get(served.base + "/", headers={"Cookie": f"{COOKIE}={cookie}"}) as resp:
            assert (await resp.json())["instance"] == instance, "cookie-pinned users stay in place"


async def test_exec_supervises_the_app(engine: str, tmp_path, backends, http) -> None:
    app_port = _free_port()
    cmd = f"{sys.executable} -m affinity_proxy.devtools.demo.backend --id execd --port {app_port}"
    s = _start(tmp_path, backends, engine, "--exec", cmd)
    try:
        await _ready(http, s)

        async def app_up() -> bool:
            try:
                async with http.get(f"http://127.0.0.1:{app_port}/healthz") as resp:
                    return resp.status == 200
            except aiohttp.ClientConnectionError:
                return False

        await wait_until(app_up, timeout=20, interval=0.1)
        s.proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(s.proc.wait, 30) == 0
        assert not await app_up(), "the app is stopped with the proxy"
    finally:
        if s.proc.poll() is None:
            s.proc.kill()
            s.proc.wait()
        assert s.proc.stderr is not None
        s.proc.stderr.close()


async def test_exec_app_exit_stops_the_proxy(engine: str, tmp_path, backends, http) -> None:
    s = _start(tmp_path, backends, engine, "--exec", "sleep 1; exit 3")
    try:
        assert await asyncio.to_thread(s.proc.wait, 30) == 1
    finally:
        assert s.proc.stderr is not None
        s.proc.stderr.close()
