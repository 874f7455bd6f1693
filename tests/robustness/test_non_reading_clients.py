"""Clients that stop reading a large response: the proxy's memory per such client is bounded.

Each client asks for a 256 MiB download through a real ``affinity-proxy serve`` process and then
reads nothing. The proxy stops reading the instance while the client's write buffer is over its
high-water mark, so what it holds per client is about one upstream read plus that buffer (the
rest waits in the kernel's socket buffers and at the instance). RSS is read from /proc.

Measured with 40 clients (KiB of RSS per client): fast engine 340 with the event loop's 256 KiB
upstream reads, about 195 with 64 KiB reads (``engines.fast.upstream.READ_SIZE``); aiohttp engine 830
with aiohttp's default client read buffer and 64 KiB relay chunks, about 305 with a 16 KiB read
buffer and 32 KiB chunks (``forwarding``). The bounds below sit between before and after.
"""

from __future__ import annotations

import asyncio
import time

from affinity_proxy.devtools.demo.backend import BACKEND_STATE
from tests.robustness.conftest import ServeFactory, assert_served, instance_urls
from tests.robustness.rawhttp import close, read_head, request
from tests.robustness.test_slow_clients import _warm_up, open_small_buffer
from tests.support.backends import Backends

MiB = 1024 * 1024
CLIENTS = 40
#: KiB of proxy RSS allowed per non-reading client, per engine (see the module docstring).
BOUND_KIB = {"fast": 270, "aiohttp": 600}  # before the fix: fast 340-427, aiohttp 784-830; quiet now ~195 / ~305


async def _settled_rss(proxy_rss, stable_for: int = 10) -> int:  # type: ignore[no-untyped-def]
    """RSS once it has stopped growing: the same peak for ``stable_for`` samples 0.1 s apart
    (every client's buffers filled, every instance paused)."""
    peak, same = proxy_rss(), 0
    deadline = time.monotonic() + 60
    while same < stable_for:
        assert time.monotonic() < deadline, "RSS never settled"
        await asyncio.sleep(0.1)
        now = proxy_rss()
        if now > peak:
            peak, same = now, 0
        else:
            same += 1
    return peak  # type: ignore[no-any-return]


async def test_memory_per_non_reading_client_is_bounded(backends: Backends, serve_process: ServeFactory,  # type: ignore[no-untyped-def]
                                                        http) -> None:
    proxy = await serve_process(instance_urls(backends), ["limits: {client_timeout: 60s}"])
    await _warm_up(http, proxy.port)
    baseline = await _settled_rss(proxy.rss_kib, stable_for=5)
    state = backends.runners["a"].app[BACKEND_STATE]
    state.stream_results.clear()
    conns = []
    for i in range(CLIENTS):
        reader, writer = await open_small_buffer(proxy.port)
        writer.write(request("GET", f"/stream?bytes={256 * MiB}&i={i}", [("fly-force-instance-id", "a")]))
        _, status, _, _ = await read_head(reader)
        assert status == 200
        conns.append((reader, writer))
    peak = await _settled_rss(proxy.rss_kib)
    per_client = (peak - baseline) / CLIENTS
    engine = proxy.engine
    print(f"{engine} engine, {CLIENTS} non-reading clients of a 256 MiB download: proxy RSS {baseline} -> "
          f"{peak} KiB, {per_client:.0f} KiB per client")
    await assert_served(http, proxy.port, f"with {CLIENTS} non-reading clients")
    for _, writer in conns:
        writer.transport.abort()
    for _, writer in conns:
        await close(writer)
    assert not [r for r in state.stream_results if r == "complete"]
    assert per_client < BOUND_KIB[engine], f"{per_client:.0f} KiB of proxy memory per non-reading client"
