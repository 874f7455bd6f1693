"""Fixtures for the robustness tests: a raw recording backend, a real ``affinity-proxy serve``
subprocess whose memory is read from /proc, and a check that a normal client is still served while
an abuse runs (demo backends, in-process proxies and an HTTP client are in ``tests/conftest.py``).
Every test here runs once per engine (the autouse ``engine`` fixture, ``tests/support/engine.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest

from affinity_proxy.devtools.ports import free_port
from tests.support.backends import Backends, make_config
from tests.support.engine import engine_line, every_engine  # noqa: F401  (the autouse `engine` fixture)
from tests.support.waiting import wait_until

HEALTH_PATH = "/healthz"


# --------------------------------------------------------------------------- recording backend


@dataclass
class Recorded:
    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]
    body: bytes


@dataclass
class RecordingBackend:
    """A raw HTTP/1.1 server that records every request it parses (its own strict, minimal
    parser: Content-Length or chunked) and answers each with 200 JSON. Health checks are answered
    but not recorded. ``connections`` counts accepted TCP connections, so a RecordingBackend that
    is in no config doubles as a trap: it must never be connected to. ``heads`` lists the targets
    whose head arrived (before their body), ``partial`` counts connections now waiting for the
    rest of a request body (half-written by the proxy)."""

    requests: list[Recorded] = field(default_factory=list)
    heads: list[str] = field(default_factory=list)
    partial: int = 0
    connections: int = 0
    errors: list[str] = field(default_factory=list)
    port: int = 0
    server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = int(self.server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 5)

    def paths(self) -> list[str]:
        return [r.target for r in self.requests]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                    return
                lines = head[:-4].decode("latin-1").split("\r\n")
                parts = lines[0].split(" ")
                if len(parts) != 3:
                    self.errors.append(f"bad request line {lines[0]!r}")
                    return
                method, target, version = parts
                headers = []
                for line in lines[1:]:
                    name, sep, value = line.partition(":")
                    if not sep or name != name.strip():
                        self.errors.append(f"bad header line {line!r}")
                        return
                    headers.append((name, value.strip()))
                names = [n.lower() for n, _ in headers]
                if "transfer-encoding" in names and "content-length" in names:
                    self.errors.append("both Content-Length and Transfer-Encoding")
                    return
                if target != HEALTH_PATH:
                    self.heads.append(target)
                self.partial += 1
                try:
                    body = await self._read_body(reader, headers)
                finally:
                    self.partial -= 1
                if target != HEALTH_PATH:
                    self.requests.append(Recorded(method, target, version, headers, body))
                payload = json.dumps({"path": target, "n": len(self.requests), "body_len": len(body)}).encode()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                             % (len(payload), payload))
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            return
        finally:
            writer.close()

    @staticmethod
    async def _read_body(reader: asyncio.StreamReader, headers: list[tuple[str, str]]) -> bytes:
        values = {n.lower(): v for n, v in headers}
        if "chunked" in values.get("transfer-encoding", "").lower():
            parts = []
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
                if size == 0:
                    while (await reader.readuntil(b"\r\n")) != b"\r\n":
                        pass
                    return b"".join(parts)
                parts.append(await reader.readexactly(size))
                if await reader.readexactly(2) != b"\r\n":
                    raise ValueError("chunk not followed by CRLF")
        length = int(values.get("content-length", "0"))
        return await reader.readexactly(length)


@pytest.fixture
async def recording_backend() -> AsyncIterator[Callable[[], Awaitable[RecordingBackend]]]:
    started: list[RecordingBackend] = []

    async def factory() -> RecordingBackend:
        backend = RecordingBackend()
        await backend.start()
        started.append(backend)
        return backend

    yield factory
    for backend in started:
        await backend.close()


# --------------------------------------------------------------------------- normal client


async def assert_served(client: aiohttp.ClientSession, port: int, label: str, *, user: str = "normal-user") -> float:
    """A normal request on a fresh connection gets a 200 from an instance; prints (never asserts) the latency."""
    started = time.perf_counter()
    async with client.get(f"http://127.0.0.1:{port}/normal", headers={"X-User-Id": user, "Connection": "close"},
                        timeout=aiohttp.ClientTimeout(total=30)) as resp:
        body = await resp.read()
        assert resp.status == 200, (label, resp.status, body[:200])
        assert resp.headers.get("X-Fly-Instance"), label
    elapsed = time.perf_counter() - started
    print(f"[{label}] normal client served in {elapsed * 1000:.1f} ms")
    return elapsed


# --------------------------------------------------------------------------- serve subprocess


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def sockets_on_port(pid: int, port: int) -> int:
    """TCP sockets held by ``pid`` whose local port is ``port`` (accepted client connections of a
    listener; the listening socket itself included). Read from /proc, IPv4 only."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local_port = int(fields[1].split(":")[1], 16)
        if local_port == port and fields[9] in inodes:
            count += 1
    return count


@dataclass
class ServeProcess:
    proc: subprocess.Popen[bytes]
    port: int
    admin_port: int
    log_path: Path
    engine: str

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def rss_kib(self) -> int:
        return rss_kib(self.proc.pid)

    def open_fds(self) -> int:
        return open_fds(self.proc.pid)

    def client_sockets(self) -> int:
        """Sockets on the main listener's port (accepted connections, plus the listener)."""
        return sockets_on_port(self.proc.pid, self.port)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


ServeFactory = Callable[..., Awaitable[ServeProcess]]


def _spawn_serve(cfg: Path, log_path: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with log_path.open("wb") as log_file:
        return subprocess.Popen(
            [sys.executable, "-m", "affinity_proxy", "serve", "--config", str(cfg)],
            stdout=subprocess.DEVNULL, stderr=log_file,
            env={**os.environ, "LOG_LEVEL": "WARNING", **env},
        )


@pytest.fixture
async def serve_process(tmp_path: Path, engine: str) -> AsyncIterator[ServeFactory]:
    """Start ``affinity-proxy serve`` on the test's engine in a subprocess with the given instances
    and extra YAML lines (a ``health:`` line among them replaces the hair-trigger default)."""
    procs: list[ServeProcess] = []

    async def factory(instances: dict[str, str], extra: list[str] = (), **env: str) -> ServeProcess:  # type: ignore[assignment]
        port, admin_port = free_port(), free_port()
        lines = [
            f"listen: 127.0.0.1:{port}",
            f"admin_listen: 127.0.0.1:{admin_port}",
            "cookie: {secret: robustness-test-secret}",
            "user_key: [{header: X-User-Id}]",
            *([] if any(line.startswith("health:") for line in extra)
              else ["health: {interval: 0.5s, timeout: 2s, unhealthy_after: 1, healthy_after: 1}"]),
            engine_line(engine),
            *extra,
            "instances:",
            *(f"  - {{id: {i}, url: '{u}'}}" for i, u in instances.items()),
        ]
        cfg = tmp_path / f"proxy-{len(procs)}.yaml"
        cfg.write_text("\n".join(lines) + "\n")
        log_path = tmp_path / f"proxy-{len(procs)}.log"
        proc = _spawn_serve(cfg, log_path, env)
        served = ServeProcess(proc, port, admin_port, log_path, engine)
        procs.append(served)

        async def ready() -> bool:
            assert proc.poll() is None, served.log_text()
            try:
                async with aiohttp.ClientSession() as session, session.get(f"{served.base}/_affinity/health") as resp:
                    return resp.status == 200
            except aiohttp.ClientConnectionError:
                return False

        await wait_until(ready, timeout=30, interval=0.1, message="proxy process ready")
        return served

    yield factory
    for served in procs:
        served.proc.send_signal(signal.SIGTERM)
        try:
            served.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            served.proc.kill()
            served.proc.wait()


@pytest.fixture
def many_fds() -> Iterator[int]:
    """Raise this process's soft open-file limit to the hard limit (children inherit it); yields it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 65536
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, target), hard))
    try:
        yield max(soft, target)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def instance_urls(b: Backends) -> dict[str, str]:
    return {i: f"http://127.0.0.1:{p}" for i, p in b.ports.items()}


__all__ = [
    "HEALTH_PATH",
    "Backends",
    "RecordingBackend",
    "ServeProcess",
    "assert_served",
    "free_port",
    "instance_urls",
    "make_config",
    "rss_kib",
]
