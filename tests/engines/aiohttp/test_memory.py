"""64 MiB through forward_http in both directions with flat memory.

Client, proxy and instance all run in this process, so the bound covers all three: if any of them
buffered the body, resident memory would grow by at least 64 MiB. RSS is sampled every few
milliseconds during the transfer (not only before/after, which would miss a freed peak).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from affinity_proxy.devtools.demo.backend import PATTERN_CHUNK
from tests.engines.aiohttp.conftest import Backend, ProxyFactory

TOTAL = 64 * 1024 * 1024
MAX_GROWTH_MIB = 40
STATUS = Path("/proc/self/status")

pytestmark = pytest.mark.skipif(not STATUS.exists(), reason="needs /proc/self/status (Linux)")


def _rss_kib() -> int:
    for line in STATUS.read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS line in /proc/self/status")


class PeakRss:
    """Samples VmRSS in the background while the block runs; ``growth_mib`` is peak - baseline."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.baseline = 0
        self.peak = 0
        self._task: asyncio.Task[None] | None = None

    async def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, _rss_kib())
            await asyncio.sleep(self.interval)

    async def __aenter__(self) -> PeakRss:
        self.baseline = self.peak = _rss_kib()
        self._task = asyncio.create_task(self._sample())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self.peak = max(self.peak, _rss_kib())

    @property
    def growth_mib(self) -> float:
        return (self.peak - self.baseline) / 1024


async def _warm_up(proxy_url: str, http) -> None:
    """Exercise every code path once so allocator and import costs are in the baseline."""
    async with http.post(proxy_url + "/upload", data=PATTERN_CHUNK * 8) as resp:
        assert resp.status == 200
    async with http.get(proxy_url + "/stream", params={"bytes": str(len(PATTERN_CHUNK) * 8)}) as resp:
        await resp.read()


async def test_64mib_upload_with_flat_memory(backend: Backend, start_proxy: ProxyFactory, http) -> None:
    proxy = await start_proxy(backend.url)
    await _warm_up(proxy.url, http)
    digest = hashlib.sha256()

    async def body() -> AsyncIterator[bytes]:
        for _ in range(TOTAL // len(PATTERN_CHUNK)):
            digest.update(PATTERN_CHUNK)
            yield PATTERN_CHUNK

    async with PeakRss() as rss:
        async with http.post(proxy.url + "/upload", data=body(), headers={"Content-Length": str(TOTAL)}) as resp:
            assert resp.status == 200
            doc = await resp.json()
    assert doc["bytes"] == TOTAL and doc["sha256"] == digest.hexdigest()
    assert doc["content_length"] == str(TOTAL)
    print(f"RSS growth {rss.growth_mib:.1f} MiB (baseline {rss.baseline // 1024} MiB)")
    assert rss.growth_mib < MAX_GROWTH_MIB, f"RSS grew {rss.growth_mib:.1f} MiB"


async def test_64mib_chunked_upload_with_flat_memory(backend: Backend, start_proxy: ProxyFactory, http) -> None:
    proxy = await start_proxy(backend.url)
    await _warm_up(proxy.url, http)

    async def body() -> AsyncIterator[bytes]:
        for _ in range(TOTAL // len(PATTERN_CHUNK)):
            yield PATTERN_CHUNK

    async with PeakRss() as rss:
        async with http.post(proxy.url + "/upload", data=body()) as resp:
            doc = await resp.json()
    assert doc["bytes"] == TOTAL and doc["chunked"] is True
    print(f"RSS growth {rss.growth_mib:.1f} MiB (baseline {rss.baseline // 1024} MiB)")
    assert rss.growth_mib < MAX_GROWTH_MIB, f"RSS grew {rss.growth_mib:.1f} MiB"


@pytest.mark.parametrize("with_length", [True, False])
async def test_64mib_download_with_flat_memory(
    backend: Backend, start_proxy: ProxyFactory, http, with_length: bool
) -> None:
    proxy = await start_proxy(backend.url)
    await _warm_up(proxy.url, http)
    digest = hashlib.sha256()
    expected = hashlib.sha256()
    for _ in range(TOTAL // len(PATTERN_CHUNK)):
        expected.update(PATTERN_CHUNK)
    received = 0
    async with PeakRss() as rss:
        params = {"bytes": str(TOTAL), "length": "1" if with_length else "0"}
        async with http.get(proxy.url + "/stream", params=params) as resp:
            assert resp.status == 200
            assert resp.headers.get("Content-Length") == (str(TOTAL) if with_length else None)
            async for chunk in resp.content.iter_chunked(64 * 1024):
                digest.update(chunk)
                received += len(chunk)
    assert received == TOTAL and digest.hexdigest() == expected.hexdigest()
    print(f"RSS growth {rss.growth_mib:.1f} MiB (baseline {rss.baseline // 1024} MiB)")
    assert rss.growth_mib < MAX_GROWTH_MIB, f"RSS grew {rss.growth_mib:.1f} MiB"
