"""Large bodies stream through a real ``affinity-proxy serve`` process with flat memory."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from affinity_proxy.devtools.ports import free_port as _free_port
from tests.support.backends import Backends
from tests.support.engine import engine_line
from tests.support.waiting import wait_until

CHUNK = b"0123456789abcdef" * 4096  # 64 KiB
UPLOAD_BYTES = 64 * 1024 * 1024


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.fixture
def proxy_process(tmp_path: Path, backends: Backends, engine: str) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    port, admin_port = _free_port(), _free_port()
    lines = [
        engine_line(engine),
        f"listen: 127.0.0.1:{port}",
        f"admin_listen: 127.0.0.1:{admin_port}",
        "cookie: {secret: streaming-test-secret}",
        "limits: {max_body_bytes: 256MiB}",
        "instances:",
        *(f"  - {{id: {i}, url: 'http://127.0.0.1:{p}'}}" for i, p in backends.ports.items()),
    ]
    cfg = tmp_path / "proxy.yaml"
    cfg.write_text("\n".join(lines) + "\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "affinity_proxy", "serve", "--config", str(cfg)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "LOG_LEVEL": "WARNING"},
    )
    yield proc, port
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    assert proc.stderr is not None
    proc.stderr.close()


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
        yield session


async def _wait_ready(client: aiohttp.ClientSession, port: int) -> None:
    async def ready() -> bool:
        try:
            async with client.get(f"http://127.0.0.1:{port}/_affinity/health") as resp:
                return resp.status == 200
        except aiohttp.ClientConnectionError:
            return False

    await wait_until(ready, timeout=20)


async def test_64mb_upload_streams_with_flat_memory(proxy_process, client) -> None:
    proc, port = proxy_process
    await _wait_ready(client, port)
    async with client.get(f"http://127.0.0.1:{port}/") as resp:
        assert resp.status == 200
    before = _rss_kib(proc.pid)
    digest = hashlib.sha256()

    async def body() -> AsyncIterator[bytes]:
        for _ in range(UPLOAD_BYTES // len(CHUNK)):
            digest.update(CHUNK)
            yield CHUNK

    async with client.post(f"http://127.0.0.1:{port}/upload", data=body()) as resp:
        assert resp.status == 200
        doc = await resp.json()
    after = _rss_kib(proc.pid)
    growth_mib = (after - before) / 1024
    print(f"64 MiB upload: proxy RSS {before / 1024:.1f} -> {after / 1024:.1f} MiB (+{growth_mib:.1f} MiB)")
    assert doc["bytes"] == UPLOAD_BYTES
    assert doc["sha256"] == digest.hexdigest()
    assert growth_mib < 24


async def test_64mb_download_streams_with_flat_memory(proxy_process, client) -> None:
    proc, port = proxy_process
    await _wait_ready(client, port)
    before = _rss_kib(proc.pid)
    received = 0
    async with client.get(f"http://127.0.0.1:{port}/stream", params={"bytes": str(UPLOAD_BYTES)}) as resp:
        assert resp.status == 200
        async for chunk in resp.content.iter_chunked(1 << 16):
            received += len(chunk)
    growth_mib = (_rss_kib(proc.pid) - before) / 1024
    print(f"64 MiB download: proxy RSS growth {growth_mib:.1f} MiB")
    assert received == UPLOAD_BYTES
    assert growth_mib < 24
