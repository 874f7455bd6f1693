"""Hostile or broken peers against the fast engine: memory, caches and slots stay bounded.

Each test drives the fast engine over real sockets with a client or an instance that misbehaves
on purpose (endless chunk extensions or trailers, endless response heads, responses nobody asked
for, an instance that stops reading, many distinct heads) and asserts a bound: bytes buffered,
entries kept, the answer that ends it. No timing assertions: bounds are sizes and counts.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace

import pytest

from affinity_proxy.app import ProxyServer
from affinity_proxy.config import Config, CookieConfig, InstanceConfig, LimitsConfig
from affinity_proxy.fastpath import FastServer
from tests.fastpath.raw import parse_responses

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
MB = 1024 * 1024


@pytest.fixture
async def instance() -> AsyncIterator[Callable[[Handler], Awaitable[int]]]:
    """``await instance(handler)``: a raw instance on 127.0.0.1 running ``handler`` for each
    connection; returns its port. Every connection is closed at the end of the test."""
    servers: list[asyncio.Server] = []
    writers: set[asyncio.StreamWriter] = set()

    async def start(handler: Handler) -> int:
        async def run(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writers.add(writer)
            try:
                await handler(reader, writer)
            except (OSError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

        server = await asyncio.start_server(run, "127.0.0.1", 0)
        servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    yield start
    for server in servers:
        server.close()
    for writer in writers:
        writer.close()
    await asyncio.sleep(0)


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
            limits=replace(LimitsConfig(upstream_connect_timeout=1.0), **limits),  # type: ignore[arg-type]
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


async def flood(port: int, head: bytes, piece: bytes, budget: int) -> tuple[int, bytes, bool]:
    """Send ``head``, then ``piece`` again and again until ``budget`` bytes went out or the proxy
    answered or closed. Returns (bytes sent, bytes received, closed by the proxy)."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", port))
    await loop.sock_sendall(sock, head)
    sent, received, closed = 0, b"", False
    try:
        async with asyncio.timeout(10):
            while sent < budget and not received:
                try:
                    sent += sock.send(piece)
                except BlockingIOError:
                    await asyncio.sleep(0.005)
                except OSError:
                    closed = True
                    break
                try:
                    data = sock.recv(65536)
                    received += data
                    closed = not data
                except BlockingIOError:
                    pass
                except OSError:
                    closed = True
                await asyncio.sleep(0)
            while not closed:  # what the proxy still says
                data = await loop.sock_recv(sock, 65536)
                received += data
                closed = not data
    except (TimeoutError, OSError):
        pass
    finally:
        sock.close()
    return sent, received, closed


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
    sent, received, closed = await flood(server.main_port, CHUNKED_POST + start, piece * (65536 // len(piece)), 64 * MB)
    responses, _ = parse_responses(received, closed=closed)
    assert [r.status for r in responses] == [400], received[:200]
    assert closed
    assert sent < 16 * MB, f"{sent} bytes of chunk metadata were read before the proxy refused"
