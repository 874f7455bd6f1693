"""``Server`` headers, ``Expect: 100-continue`` and 1xx interim responses, on both engines.

The instance is a bare HTTP/1.1 server (``Scripted``) so the test controls every byte it sends:
a ``Server`` header or none, 1xx interim responses before the final one. The client is a raw
socket. Both engines must agree:

- ``Server``: an instance's own is relayed unchanged; a response without one, and every answer of
  the proxy itself (replays, errors), carries aiohttp's banner, the aiohttp engine's default.
- ``Expect: 100-continue``: the proxy answers ``100 Continue`` itself before reading the body (as
  nginx does), only to HTTP/1.1 requests that have a body, and never forwards ``Expect``.
- 1xx from an instance (``100 Continue``, ``103 Early Hints``) are not relayed (nginx's default;
  aiohttp's client drops them too): the client gets the final response only, intact.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest
from aiohttp.http import SERVER_SOFTWARE

from affinity_proxy.config import Config, CookieConfig, FlyConfig, InstanceConfig, LimitsConfig
from affinity_proxy.routing.cookie import CookieCodec
from affinity_proxy.routing.model import InstanceId
from affinity_proxy.serve.app import ProxyServer
from tests.engines.fast.raw import RawResponse, exchange, parse_responses

ENGINES = ("aiohttp", "fast")
SECRET = "interim-test-secret-" + "q" * 20


@dataclass
class Seen:
    head: bytes
    body: bytes

    def header(self, name: bytes) -> bytes | None:
        for line in self.head.split(b"\r\n")[1:]:
            key, _, value = line.partition(b":")
            if key.strip().lower() == name:
                return value.strip()
        return None


@dataclass
class Scripted:
    """A keep-alive HTTP/1.1 server on 127.0.0.1: reads each request (Content-Length or chunked
    body) and writes ``answer(path)``: a list of byte strings, written with a short pause between
    them so that they reach the proxy in separate reads."""

    answer: Callable[[str], list[bytes]]
    seen: list[Seen] = field(default_factory=list)
    port: int = 0
    server: asyncio.Server | None = None
    writers: set[asyncio.StreamWriter] = field(default_factory=set)

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in list(self.writers):
            writer.close()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                seen = Seen(head, b"")
                length = seen.header(b"content-length")
                if length is not None:
                    seen.body = await reader.readexactly(int(length))
                elif (seen.header(b"transfer-encoding") or b"").lower() == b"chunked":
                    while True:
                        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                        data = await reader.readexactly(size + 2)
                        if not size:
                            break
                        seen.body += data[:-2]
                path = head.split(b" ", 2)[1].decode()
                if not path.startswith("/healthz"):
                    self.seen.append(seen)
                pieces = self.answer(path)
                for i, piece in enumerate(pieces):
                    if i:
                        await asyncio.sleep(0.05)
                    writer.write(piece)
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.writers.discard(writer)
            writer.close()


def final(body: bytes, *extra: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n%s\r\n%s" % (
        len(body), b"".join(line + b"\r\n" for line in extra), body)


def script(path: str) -> list[bytes]:
    if path.startswith("/own-server"):
        return [final(b"mine", b"Server: upstream/1.0")]
    if path.startswith("/interim-one-read"):
        return [b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
                b"HTTP/1.1 100 Continue\r\n\r\n" + final(b"after hints", b"X-Final: 1")]
    if path.startswith("/interim"):
        return [b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n",
                b"HTTP/1.1 100 Continue\r\n\r\n", final(b"after hints", b"X-Final: 1")]
    if path.startswith("/upload"):
        return [final(b"ok")]  # the test reads what was received from ``seen``
    return [final(b"plain")]


@pytest.fixture
async def upstream() -> AsyncIterator[Scripted]:
    server = Scripted(script)
    await server.start()
    yield server
    await server.stop()


def config(engine: str, port: int, *, fly: bool = False) -> Config:
    instances = (InstanceConfig("u", f"http://127.0.0.1:{port}"),)
    extra: dict[str, object] = {}
    if fly:
        instances += (InstanceConfig("v", "http://127.0.0.1:9"),)
        extra = {"mode": "fly", "fly": FlyConfig(app="demo", machine_id="u", region="lcl",
                                                 upstream=f"http://127.0.0.1:{port}", discovery="static")}
    return Config(engine=engine, listen="127.0.0.1:0", admin_listen="127.0.0.1:0", instances=instances,
                  cookie=CookieConfig(secret=SECRET), limits=LimitsConfig(upstream_connect_timeout=1.0),
                  **extra)  # type: ignore[arg-type]


@pytest.fixture
async def proxies(upstream: Scripted) -> AsyncIterator[dict[str, ProxyServer]]:
    servers = {engine: ProxyServer(config(engine, upstream.port)) for engine in ENGINES}
    for server in servers.values():
        await server.start()
    yield servers
    for server in servers.values():
        await server.stop()


def get(path: str, *extra: bytes) -> bytes:
    return b"GET %s HTTP/1.1\r\nHost: app.test\r\n%s\r\n" % (path.encode(), b"".join(e + b"\r\n" for e in extra))


async def one(port: int, data: bytes) -> RawResponse:
    result = await exchange(port, data, expect=1)
    assert len(result.responses) == 1, result
    return result.responses[0]


# --------------------------------------------------------------------------- Server


async def test_an_instances_server_header_is_relayed_unchanged(proxies: dict[str, ProxyServer]) -> None:
    for engine, server in proxies.items():
        for _ in range(3):  # the fast engine's response-head cache serves the repeats
            resp = await one(server.main_port, get("/own-server"))
            assert resp.status == 200 and resp.body == b"mine", engine
            assert resp.getall("Server") == ["upstream/1.0"], engine


async def test_a_response_without_server_gets_the_same_banner_on_both_engines(
    proxies: dict[str, ProxyServer],
) -> None:
    for engine, server in proxies.items():
        for _ in range(3):
            resp = await one(server.main_port, get("/plain"))
            assert resp.status == 200 and resp.body == b"plain", engine
            assert resp.getall("Server") == [SERVER_SOFTWARE], engine


async def test_the_proxys_own_answers_carry_the_same_server_header(upstream: Scripted) -> None:
    codec = CookieCodec(SECRET)
    cookie = codec.encode(InstanceId("v"), int(time.time()), "")
    answers: dict[str, list[tuple[int, list[str]]]] = {}
    for engine in ENGINES:
        server = ProxyServer(config(engine, upstream.port, fly=True))
        await server.start()
        try:
            replay = await one(server.main_port, get("/", b"Cookie: fly-instance-id=" + cookie.encode()))
            assert replay.status == 409 and replay.get("fly-replay") is not None, engine
            malformed = await one(server.main_port, b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")
            assert malformed.status == 400, engine
        finally:
            await server.stop()
        server = ProxyServer(config(engine, 9))  # nothing listens on port 9: 502 or 503
        await server.start()
        try:
            unreachable = await one(server.main_port, get("/"))
            assert unreachable.status in (502, 503), engine
        finally:
            await server.stop()
        answers[engine] = [(r.status, r.getall("Server")) for r in (replay, malformed, unreachable)]
    assert answers["fast"] == answers["aiohttp"]
    assert all(servers == [SERVER_SOFTWARE] for _, servers in answers["fast"])


# --------------------------------------------------------------------------- Expect: 100-continue


async def upload_after_continue(port: int, head: bytes, body: bytes) -> tuple[bytes, RawResponse]:
    """Send ``head``, wait for the proxy's 100 Continue, then send ``body``; return the interim
    bytes and the final response."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head)
        async with asyncio.timeout(10):
            interim = await reader.readuntil(b"\r\n\r\n")
            writer.write(body)
            received = b""
            while True:
                done, _ = parse_responses(received, closed=False)
                if done:
                    return interim, done[0]
                chunk = await reader.read(65536)
                assert chunk, "closed before the final response"
                received += chunk
    finally:
        writer.close()


async def test_expect_100_continue_upload_end_to_end(proxies: dict[str, ProxyServer], upstream: Scripted) -> None:
    body = b"x" * 100_000
    for engine, server in proxies.items():
        upstream.seen.clear()
        head = (b"POST /upload HTTP/1.1\r\nHost: app.test\r\nExpect: 100-continue\r\n"
                b"Content-Length: %d\r\n\r\n" % len(body))
        interim, resp = await upload_after_continue(server.main_port, head, body)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n", engine
        assert resp.status == 200 and resp.body == b"ok" and resp.interim == [], engine
        (seen,) = upstream.seen
        assert seen.body == body and seen.header(b"expect") is None, engine


async def test_expect_100_continue_with_a_chunked_body(proxies: dict[str, ProxyServer], upstream: Scripted) -> None:
    for engine, server in proxies.items():
        upstream.seen.clear()
        head = (b"POST /upload HTTP/1.1\r\nHost: app.test\r\nExpect: 100-continue\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n")
        interim, resp = await upload_after_continue(server.main_port, head, b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
        assert interim.startswith(b"HTTP/1.1 100 Continue\r\n"), engine
        assert resp.status == 200, engine
        assert upstream.seen[0].body == b"hello world" and upstream.seen[0].header(b"expect") is None, engine


async def test_no_100_continue_for_http_1_0_or_without_a_body(proxies: dict[str, ProxyServer],
                                                              upstream: Scripted) -> None:
    for engine, server in proxies.items():
        upstream.seen.clear()
        old = b"POST /upload HTTP/1.0\r\nHost: app.test\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\nabc"
        resp = await one(server.main_port, old)
        assert resp.status == 200 and resp.interim == [], engine
        assert upstream.seen[0].body == b"abc", engine


# --------------------------------------------------------------------------- 1xx from the instance


@pytest.mark.parametrize("path", ["/interim", "/interim-one-read"])
async def test_interim_responses_of_an_instance_are_not_relayed(proxies: dict[str, ProxyServer], path: str) -> None:
    for engine, server in proxies.items():
        result = await exchange(server.main_port, get(path) + get("/plain"), expect=2)
        first, second = result.responses
        assert first.interim == [] and first.status == 200 and first.body == b"after hints", engine
        assert first.get("X-Final") == "1" and first.get("Link") is None, engine
        assert second.status == 200 and second.body == b"plain" and not result.rest, engine


async def test_an_interim_response_keeps_the_connection_usable(proxies: dict[str, ProxyServer]) -> None:
    for engine, server in proxies.items():
        for _ in range(3):  # repeats: the fast engine must not cache a head across the 1xx
            resp = await one(server.main_port, get("/interim-one-read"))
            assert resp.status == 200 and resp.body == b"after hints", engine
            assert json.dumps(resp.headers).count("Link") == 0, engine
