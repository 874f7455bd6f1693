"""Broken instances against both engines: one that never reads the request body, one that sends a
body after a HEAD answer.

Each test runs the same scenario over real sockets with a raw asyncio instance, once per engine
(the ``engine`` fixture of this suite). No timing assertions: ``asyncio.timeout`` only bounds the tests.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from affinity_proxy.config import Config, CookieConfig, InstanceConfig, LimitsConfig
from affinity_proxy.serve.app import ProxyServer
from tests.engines.fast.raw import exchange, parse_responses
from tests.engines.fast.test_hostile_peers import flood
from tests.support.raw_instance import Handler, raw_instances

MB = 1024 * 1024


@pytest.fixture
async def instance() -> AsyncIterator[Callable[[Handler], Awaitable[int]]]:
    """``await instance(handler)``: a raw instance on 127.0.0.1 running ``handler`` per connection."""
    async with raw_instances() as start:
        yield start


@pytest.fixture
async def proxy() -> AsyncIterator[Callable[..., Awaitable[ProxyServer]]]:
    """``await proxy(engine, instance_port)``: a proxy over one instance, ``upstream_timeout`` 1 s."""
    servers: list[ProxyServer] = []

    async def start(engine: str, port: int) -> ProxyServer:
        server = ProxyServer(Config(
            engine=engine,  # type: ignore[arg-type]
            listen="127.0.0.1:0",
            admin_listen="127.0.0.1:0",
            instances=(InstanceConfig("a", f"http://127.0.0.1:{port}"),),
            cookie=CookieConfig(secret="stalled-body-secret-" + "x" * 20),
            limits=LimitsConfig(upstream_timeout=1.0, upstream_connect_timeout=1.0),
        ))
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.stop()


async def answer_others(head: bytes, writer: asyncio.StreamWriter) -> bool:
    """Answer anything but the test's POST (a health check); True when it was answered."""
    if head.startswith(b"POST /upload "):
        return False
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    await writer.drain()
    return True


async def test_an_instance_that_never_reads_the_body_gets_504(instance, proxy, engine: str) -> None:
    """The instance reads the request head and never the body. The upload stalls; after
    ``upstream_timeout`` without progress the client gets 504 and the instance's connection is
    closed (the aiohttp engine held both connections until the client gave up)."""
    answered = asyncio.Event()
    closed = asyncio.Event()

    async def deaf(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await answer_others(await reader.readuntil(b"\r\n\r\n"), writer):
            pass
        await answered.wait()  # only now read, to see the proxy's side end
        try:
            while await reader.read(MB):
                pass
        finally:
            closed.set()

    server = await proxy(engine, await instance(deaf))
    head = b"POST /upload HTTP/1.1\r\nHost: app.example\r\nContent-Length: %d\r\n\r\n" % (64 * MB)
    async with asyncio.timeout(20):
        sent, received = await flood(server.main_port, head, b"b" * 65536, 64 * MB)
        responses, _ = parse_responses(received, closed=False)
        assert [r.status for r in responses] == [504], received[:200]
        assert responses[0].json()["error"] == "upstream_timeout"
        assert sent < 64 * MB
        answered.set()
        await closed.wait()


async def test_a_slow_upload_that_progresses_is_not_timed_out(instance, proxy, engine: str) -> None:
    """One small piece every 0.3 s for about 2 s, twice ``upstream_timeout``: the deadline is on
    progress, not on the whole upload, so the request succeeds."""
    pieces = [b"%d" % i * 1000 for i in range(7)]

    async def reads_all(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await answer_others(head := await reader.readuntil(b"\r\n\r\n"), writer):
            pass
        length = next(int(line.split(b":")[1]) for line in head.lower().split(b"\r\n")
                      if line.startswith(b"content-length:"))
        body = await reader.readexactly(length)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%d" % (len(str(len(body))), len(body)))
        await writer.drain()

    server = await proxy(engine, await instance(reads_all))
    head = b"POST /upload HTTP/1.1\r\nHost: app.example\r\nContent-Length: %d\r\n\r\n" % sum(map(len, pieces))
    async with asyncio.timeout(20):
        result = await exchange(server.main_port, [head, *pieces], expect=1, pause=0.3)
    assert [(r.status, r.body) for r in result.responses] == [(200, b"7000")]


EVIL = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nevil"


@pytest.mark.parametrize("garbage", [b"", EVIL], ids=["clean", "body"])
async def test_a_body_after_a_head_answer_is_never_taken_for_the_next_response(
        instance, proxy, engine: str, garbage: bytes) -> None:
    """A broken app answers HEAD with ``Content-Length: N`` and N body bytes anyway (here bytes
    that look like a response). The next request must not get them as its answer: the socket they
    came on is dropped, not reused from the pool. A clean HEAD answer keeps its socket (the fast
    engine dropped every socket after a HEAD)."""
    served: list[list[bytes]] = []  # request lines per connection

    async def broken_head(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        mine: list[bytes] = []
        served.append(mine)
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            method, path = head.split(b" ", 2)[:2]
            mine.append(method + b" " + path)
            if method == b"HEAD":
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(EVIL), garbage))
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nget")

    server = await proxy(engine, await instance(broken_head))
    async with asyncio.timeout(20):
        head = await exchange(server.main_port, b"HEAD /h HTTP/1.1\r\nHost: app.example\r\n\r\n",
                              expect=1, head_requests={0}, limit=5)
        gets = [await exchange(server.main_port, b"GET /g HTTP/1.1\r\nHost: app.example\r\n\r\n", expect=1, limit=5)
                for _ in range(2)]
    status = head.responses[0].status
    # aiohttp's parser reads the bytes as the next response in the same read and fails the HEAD.
    assert status == 200 or (engine == "aiohttp" and garbage and status == 502)
    if status == 200:
        assert head.responses[0].get("Content-Length") == str(len(EVIL))
    assert [[(r.status, r.body) for r in g.responses] for g in gets] == [[(200, b"get")]] * 2
    [after_head] = [paths[paths.index(b"HEAD /h") + 1:] for paths in served if b"HEAD /h" in paths]
    if garbage:
        assert after_head == [], "the connection that sent a body after HEAD was reused"
    else:
        assert b"GET /g" in after_head, "a clean HEAD answer's connection was not reused"
