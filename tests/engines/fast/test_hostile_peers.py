"""Hostile or broken peers against the fast engine: memory, caches and slots stay bounded.

Each test drives the fast engine over real sockets with a client or an instance that misbehaves
on purpose (endless chunk extensions or trailers, endless response heads, responses nobody asked
for, an instance that stops reading, many distinct heads) and asserts a bound: bytes buffered,
entries kept, the answer that ends it. No timing assertions: bounds are sizes and counts.
"""

from __future__ import annotations

import asyncio
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace

import pytest

from affinity_proxy.config import Config, CookieConfig, InstanceConfig, LimitsConfig
from affinity_proxy.engines.fast import FastServer
from affinity_proxy.engines.fast.head import RequestHead
from affinity_proxy.serve.app import ProxyServer
from tests.engines.fast.raw import RawResponse, exchange, parse_responses
from tests.support.raw_instance import Handler, raw_instances

MB = 1024 * 1024


def kernel_buffering() -> int:
    """Most bytes the kernel may hold between a writer and a reader on one loopback TCP connection:
    the reader's receive buffer (autotuned up to ``tcp_rmem``'s maximum, 6 MiB by default, 32 MiB
    on some kernels) plus the writer's send buffer (``tcp_wmem``'s maximum). What a writer got rid
    of beyond that was read by the process on the other end."""
    total = 0
    for name in ("tcp_rmem", "tcp_wmem"):
        try:
            with open(f"/proc/sys/net/ipv4/{name}") as f:
                total += int(f.read().split()[2])
        except (OSError, IndexError, ValueError):
            total += 6 * MB
    return total


@pytest.fixture
async def instance() -> AsyncIterator[Callable[[Handler], Awaitable[int]]]:
    """``await instance(handler)``: a raw instance on 127.0.0.1 running ``handler`` per connection."""
    async with raw_instances() as start:
        yield start


async def read_and_drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while await reader.read(65536):
        pass


@pytest.fixture
async def proxy() -> Callable[..., Awaitable[ProxyServer]]:
    """``await proxy(instance_port, **limits)``: a fast-engine proxy over one instance."""
    servers: list[ProxyServer] = []

    async def start(port: int, **limits: float) -> ProxyServer:
        config = Config(
            engine="fast",
            listen="127.0.0.1:0",
            admin_listen="127.0.0.1:0",
            instances=(InstanceConfig("a", f"http://127.0.0.1:{port}"),),
            cookie=CookieConfig(secret="hostile-peers-secret-" + "x" * 20),
            # connect timeout 5 s: the instance runs in this test's loop, which a loaded machine can stall
            # past 1 s; a connect failure then marked the only instance down (503, not the 502 tested)
            limits=replace(LimitsConfig(upstream_connect_timeout=5.0), **limits),  # type: ignore[arg-type]
        )
        server = ProxyServer(config)
        await server.start()
        servers.append(server)
        return server

    yield start  # type: ignore[misc]
    for server in servers:
        await server.stop()


def fast(server: ProxyServer) -> FastServer:
    assert server._fast is not None
    return server._fast


async def flood(port: int, head: bytes, piece: bytes, budget: int) -> tuple[int, bytes]:
    """Send ``head``, then ``piece`` again and again until ``budget`` bytes went out or the proxy
    answered, and read until one whole response came or the proxy closed. Returns (bytes sent,
    bytes received)."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", port))
    await loop.sock_sendall(sock, head)
    sent, received = 0, b""
    try:
        async with asyncio.timeout(10):
            while sent < budget and not received:
                try:
                    sent += sock.send(piece)
                except BlockingIOError:
                    await asyncio.sleep(0.005)
                try:
                    received += sock.recv(65536)
                except BlockingIOError:
                    pass
                await asyncio.sleep(0)
            while not parse_responses(received, closed=False)[0]:
                data = await loop.sock_recv(sock, 65536)
                if not data:
                    break
                received += data
    except (TimeoutError, OSError):
        pass
    finally:
        sock.close()
    return sent, received


async def get(port: int, data: bytes = b"GET / HTTP/1.1\r\nHost: app.example\r\n\r\n") -> RawResponse:
    result = await exchange(port, data, expect=1, limit=5)
    assert result.responses, "no answer"
    return result.responses[0]


# --------------------------------------------------------------------------- request bodies


CHUNKED_POST = b"POST /upload HTTP/1.1\r\nHost: app.example\r\nTransfer-Encoding: chunked\r\n\r\n"


@pytest.mark.parametrize(("start", "piece"), [
    (b"1;", b"e" * 65536),  # one chunk extension that never ends
    (b"1\r\nx\r\n0\r\n", b"X-Trailer: " + b"t" * 20 + b"\r\n"),  # trailers that never end
], ids=["endless-extension", "endless-trailers"])
async def test_a_chunked_body_cannot_buffer_endless_metadata(instance, proxy, start: bytes, piece: bytes) -> None:
    """llhttp keeps chunk extensions and trailers without limit; the proxy once buffered 32 MB of
    one extension and 2.3 million trailer fields (565 MB) in 3 s. Now: 400 after a few KiB."""
    server = await proxy(await instance(read_and_drop))
    sent, received = await flood(server.main_port, CHUNKED_POST + start, piece * (65536 // len(piece)), 64 * MB)
    responses, _ = parse_responses(received, closed=False)
    assert [r.status for r in responses] == [400], received[:200]
    assert sent < 16 * MB, f"{sent} bytes of chunk metadata were read before the proxy refused"


async def test_an_instance_that_stops_reading_the_body_is_timed_out(instance, proxy) -> None:
    """An instance that accepts a request and never reads its body: the request could not finish
    and no read timeout applied (it starts once the request is sent), so the client and instance
    connections were held for ever. Now ``upstream_timeout`` also bounds a write that makes no
    progress: 504, and the instance's connection is dropped."""

    async def deaf(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(3600)

    server = await proxy(await instance(deaf), upstream_timeout=0.5)
    head = b"POST /upload HTTP/1.1\r\nHost: app.example\r\nContent-Length: %d\r\n\r\n" % (64 * MB)
    sent, received = await flood(server.main_port, head, b"b" * 65536, 64 * MB)
    responses, _ = parse_responses(received, closed=False)
    assert [r.status for r in responses] == [504], received[:200]
    assert sent < 64 * MB
    assert not fast(server).pool.active


# --------------------------------------------------------------------------- responses


@pytest.mark.parametrize("endless", [
    b"X-Field: " + b"f" * 40 + b"\r\n",  # header fields that never end
    b"X-Value: ",  # then one value that never ends
    b"\r\nHTTP/1.1 100 Continue",  # interim responses that never end
], ids=["fields", "value", "interim"])
async def test_an_endless_response_head_is_cut(instance, proxy, endless: bytes) -> None:
    """llhttp keeps a response head without limit; the proxy once held 2.9 million fields (890 MB)
    of one endless head after 3 s. Now: the aiohttp engine's limits (128 fields, about 4 MiB),
    then 502."""
    written = 0
    allowed = 24 * MB + kernel_buffering()  # the proxy reads at most ~4 MiB of it; the kernel holds the rest

    async def endless_head(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal written
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 100 Continue" if endless.startswith(b"\r\n") else b"HTTP/1.1 200 OK\r\n")
        if endless == b"X-Value: ":
            writer.write(endless)
            piece = b"v" * 65536
        elif endless.startswith(b"\r\n"):
            piece = (b"\r\n" + endless) * 1000
        else:
            piece = endless * 1000
        while written < 2 * allowed:
            writer.write(piece)
            written += len(piece)
            await writer.drain()

    server = await proxy(await instance(endless_head))
    response = await get(server.main_port)
    assert response.status == 502 and response.json()["error"] == "upstream_protocol"
    assert written < allowed, f"the proxy read {written} bytes of one response head (allowed {allowed})"
    assert not fast(server).pool.active


async def test_a_response_nobody_asked_for_is_never_reused(instance, proxy) -> None:
    """An instance that sends a second response right after the one asked for, in the same read:
    the connection went back to the pool once per response, so two requests shared one socket and
    one of them waited for ever. Now the socket is dropped and every request gets its own."""
    served: dict[int, list[bytes]] = {}  # requests per connection

    async def talkative(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        mine = served.setdefault(len(served), [])
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            mine.append(head.split(b" ", 2)[1])
            answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
            if mine[0] == b"/talkative":
                answer += b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nevil"
            writer.write(answer)

    server = await proxy(await instance(talkative))
    assert (await get(server.main_port, b"GET /talkative HTTP/1.1\r\nHost: app.example\r\n\r\n")).body == b"ok"
    answers = await asyncio.gather(*(get(server.main_port) for _ in range(3)))
    assert [a.body for a in answers] == [b"ok"] * 3
    talkative_connections = [paths for paths in served.values() if paths[0] == b"/talkative"]
    assert talkative_connections == [[b"/talkative"]], "the connection that sent an unasked response was reused"


async def test_tiny_request_chunks_are_forwarded_in_one_write_per_read(instance, proxy) -> None:
    """A body of 1-byte chunks cost one write (one send()) to the instance per chunk, 3x the aiohttp
    engine's CPU per byte. Now the body bytes of one client read go out as one chunk."""
    seen: list[tuple[int, bytes]] = []

    async def count_chunks(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        chunks, body = 0, b""
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            body += (await reader.readexactly(size + 2))[:-2]
            chunks += 1
        await reader.readuntil(b"\r\n")
        seen.append((chunks, body))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    server = await proxy(await instance(count_chunks))
    body = bytes(range(97, 123)) * 1000
    chunked = b"".join(b"1\r\n%c\r\n" % c for c in body) + b"0\r\n\r\n"
    response = await get(server.main_port, CHUNKED_POST + chunked)
    assert response.status == 200
    [(chunks, forwarded)] = seen
    assert forwarded == body
    assert chunks < len(body) // 100, f"{len(body)} one-byte chunks were forwarded as {chunks} chunks"


# --------------------------------------------------------------------------- caches


async def answer_every_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while True:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")


async def send_all(port: int, requests: list[bytes], after_each: Callable[[], None]) -> None:
    """Send ``requests`` one at a time on one keep-alive connection, reading each answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for data in requests:
            writer.write(data)
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200"), head
            after_each()
    finally:
        writer.close()


def parsed_size(key: bytes, head: RequestHead) -> int:
    """What a cached head holds in memory (its key, fields, lines and index; ``sys.getsizeof``)."""
    size = sys.getsizeof(key) + sys.getsizeof(head.headers) + sys.getsizeof(head.lines) + sys.getsizeof(head.first)
    for name, value in head.headers:
        size += sys.getsizeof((name, value)) + sys.getsizeof(name) + sys.getsizeof(value)
    return size + sum(sys.getsizeof(line) for line in head.lines)


async def test_distinct_heads_of_many_fields_cannot_fill_memory(instance, proxy) -> None:
    """The head cache held up to 1024 heads of up to 4 KiB, but a parsed field costs far more than
    its bytes: heads of 120 small fields cost about 47 KB each, 48 MB in all. Now the cache is
    emptied at about 8 MiB of parsed heads, whatever the heads."""
    server = await proxy(await instance(answer_every_request))
    heads = fast(server).heads
    requests = []
    for i in range(400):
        fields = b"".join(b"X-%d-%d: %s\r\n" % (i, j, b"v" * 16) for j in range(120))
        requests += [b"GET /%d HTTP/1.1\r\nHost: app.example\r\n%s\r\n" % (i, fields)] * 2  # kept from the 2nd
    assert all(len(r) <= heads.MAX_BYTES for r in requests)
    peak = sent = 0

    def measure() -> None:
        nonlocal peak, sent
        sent += 1
        if sent % 10 == 0:
            peak = max(peak, sum(parsed_size(key, head) for key, head in heads._heads.items()))

    await send_all(server.main_port, requests, measure)
    assert peak < 12 * MB, f"the head cache held {peak} bytes"


async def test_distinct_cookie_headers_cannot_fill_the_hot_route_cache(instance, proxy) -> None:
    """A hot route's key holds the whole Cookie header: a client with one valid affinity cookie and
    4096 distinct 16 KiB Cookie headers made the cache hold 64 MB. Now keys are capped at 8 MiB."""
    server = await proxy(await instance(answer_every_request))
    first = await get(server.main_port)
    cookie = (first.get("Set-Cookie") or "").split(";")[0].encode()
    assert cookie
    hot = fast(server).hot
    requests = [b"GET / HTTP/1.1\r\nHost: app.example\r\nCookie: %s; junk%d=%s\r\n\r\n" % (cookie, i, b"j" * 15000)
                for i in range(700)]
    peak = 0

    def measure() -> None:
        nonlocal peak
        peak = max(peak, sum(len(p) for key in hot._entries for p in key if isinstance(p, bytes)))

    await send_all(server.main_port, requests, measure)
    assert hot.hits == 0 and peak > 0  # every request was a miss that made an entry
    assert peak <= 8 * MB + 16 * 1024, f"hot-route keys held {peak} bytes"
