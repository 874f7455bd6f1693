"""relay_websocket against real demo instances, through a real proxy app, with real clients."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable

import aiohttp
import pytest
from aiohttp import WSMsgType

from affinity_proxy.engines.aiohttp.client import UpstreamError
from tests.engines.aiohttp.conftest import Backend, ProxyFactory
from tests.support.waiting import wait_until

StartInstance = Callable[[str], Awaitable[Backend]]


def _errors_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.ERROR]


async def test_text_and_binary_echo_with_handshake_headers(backend: Backend, start_proxy: ProxyFactory, http) -> None:
    proxy = await start_proxy(backend.url)
    proxy.settings.extra = [("X-Fly-Instance", "b1"), ("Set-Cookie", "fly-instance-id=b1; Path=/")]
    async with http.ws_connect(proxy.url + "/ws?room=1", headers={"Cookie": "a=1"}) as ws:
        handshake = ws._response.headers  # the 101 response the client got from the proxy
        assert handshake["X-Fly-Instance"] == "b1"
        assert handshake.getall("Set-Cookie") == ["fly-instance-id=b1; Path=/"]
        await ws.send_str("whoami")
        assert await ws.receive_str(timeout=5) == "b1"
        await ws.send_str("héllo")
        assert await ws.receive_str(timeout=5) == "héllo"
        payload = bytes(range(256)) * 100
        await ws.send_bytes(payload)
        assert await ws.receive_bytes(timeout=5) == payload
        await ws.ping()  # relayed to the instance, whose PONG comes back; the session carries on
        await ws.send_str("after-ping")
        assert await ws.receive_str(timeout=5) == "after-ping"
    assert ws.close_code == 1000
    await wait_until(lambda: backend.state.ws_closes == [(1000, "")], message="instance saw the close")
    await wait_until(lambda: proxy.settings.completed == 1)


async def test_instance_close_code_reaches_the_client(backend: Backend, start_proxy: ProxyFactory, http) -> None:
    proxy = await start_proxy(backend.url)
    async with http.ws_connect(proxy.url + "/ws") as ws:
        await ws.send_str("close:4001")
        msg = await ws.receive(timeout=5)
        assert msg.type is WSMsgType.CLOSE
        assert (msg.data, msg.extra) == (4001, "bye")
    assert ws.close_code == 4001
    await wait_until(lambda: proxy.settings.completed == 1)


async def test_client_close_code_reaches_the_instance(backend: Backend, start_proxy: ProxyFactory, http) -> None:
    proxy = await start_proxy(backend.url)
    async with http.ws_connect(proxy.url + "/ws") as ws:
        await ws.send_str("whoami")
        assert await ws.receive_str(timeout=5) == "b1"
        await ws.close(code=4002, message=b"client-bye")
    await wait_until(lambda: backend.state.ws_closes == [(4002, "client-bye")], message="instance saw 4002")
    await wait_until(lambda: proxy.settings.completed == 1)


@pytest.mark.parametrize(
    ("offered", "chosen"),
    [(("nope", "echo.v2", "echo.v1"), "echo.v2"), (("echo.v1",), "echo.v1"), (("nope",), None), ((), None)],
)
async def test_subprotocol_is_the_one_the_instance_picked(
    backend: Backend, start_proxy: ProxyFactory, http, offered: tuple[str, ...], chosen: str | None
) -> None:
    proxy = await start_proxy(backend.url)
    async with http.ws_connect(proxy.url + "/ws", protocols=offered) as ws:
        assert ws.protocol == chosen
        await ws.send_str("whoami")
        assert await ws.receive_str(timeout=5) == "b1"


async def test_instance_down_fails_before_the_client_handshake(dead_url: str, start_proxy: ProxyFactory, http) -> None:
    proxy = await start_proxy(dead_url)
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await http.ws_connect(proxy.url + "/ws")
    assert info.value.status == 502  # a plain HTTP error: the client was never upgraded
    [error] = proxy.settings.errors
    assert isinstance(error, UpstreamError)
    assert (error.kind, error.retryable, error.status) == ("connect", True, 502)


async def test_connect_failure_can_be_retried_on_another_instance(
    dead_url: str, backend: Backend, start_proxy: ProxyFactory, http
) -> None:
    proxy = await start_proxy(dead_url, fallback=backend.url)
    async with http.ws_connect(proxy.url + "/ws") as ws:
        await ws.send_str("whoami")
        assert await ws.receive_str(timeout=5) == "b1"
    assert [e.kind for e in proxy.settings.errors if isinstance(e, UpstreamError)] == ["connect"]


async def test_instance_refusing_the_handshake_is_a_protocol_error(
    backend: Backend, start_proxy: ProxyFactory, http
) -> None:
    proxy = await start_proxy(backend.url)
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await http.ws_connect(proxy.url + "/not-a-websocket")  # the echo route answers 200
    assert info.value.status == 502
    [error] = proxy.settings.errors
    assert isinstance(error, UpstreamError)
    assert (error.kind, error.retryable, error.status, error.upstream_status) == ("protocol", False, 502, 200)


async def test_oversize_message_closes_both_legs_with_1009(backend: Backend, start_proxy: ProxyFactory, http) -> None:
    proxy = await start_proxy(backend.url, max_message_bytes=1024)
    async with http.ws_connect(proxy.url + "/ws") as ws:
        await ws.send_str("x" * 10)
        assert await ws.receive_str(timeout=5) == "x" * 10
        await ws.send_bytes(b"y" * 4096)
        msg = await ws.receive(timeout=5)
        assert msg.type is WSMsgType.CLOSE and msg.data == 1009
    await wait_until(lambda: backend.state.ws_closes == [(1009, "")], message="instance told with 1009")


async def test_fifty_concurrent_sessions_and_no_leaked_tasks(
    start_instance: StartInstance, start_proxy: ProxyFactory, http, caplog: pytest.LogCaptureFixture
) -> None:
    b1 = await start_instance("b1")
    proxy = await start_proxy(b1.url)
    baseline = len(asyncio.all_tasks())

    async def session(i: int) -> None:
        async with http.ws_connect(proxy.url + f"/ws?n={i}") as ws:
            await ws.send_str("whoami")
            assert await ws.receive_str(timeout=10) == "b1"
            for j in range(5):
                await ws.send_str(f"{i}:{j}")
                assert await ws.receive_str(timeout=10) == f"{i}:{j}"
            await ws.send_bytes(i.to_bytes(4, "big"))
            assert await ws.receive_bytes(timeout=10) == i.to_bytes(4, "big")
            if i % 2:
                await ws.send_str(f"close:{4000 + i}")
                msg = await ws.receive(timeout=10)
                assert msg.type is WSMsgType.CLOSE and msg.data == 4000 + i

    await asyncio.gather(*(session(i) for i in range(50)))
    await wait_until(lambda: proxy.settings.completed == 50, timeout=10, message="all relays returned")
    await wait_until(lambda: len(asyncio.all_tasks()) <= baseline, timeout=10, message="relay tasks finished")
    assert sorted(code for code, _ in b1.state.ws_closes) == [1000] * 25
    assert _errors_logged(caplog) == []


async def test_client_vanishing_closes_the_instance_leg_with_1001(backend: Backend, start_proxy: ProxyFactory) -> None:
    proxy = await start_proxy(backend.url)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(
        b"GET /ws HTTP/1.1\r\nHost: proxy\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 101")
    writer.transport.abort()  # no CLOSE frame, just gone
    await wait_until(lambda: backend.state.ws_closes == [(1001, "")], message="instance told 1001")
    await wait_until(lambda: proxy.settings.completed == 1)


async def test_instance_vanishing_closes_the_client_leg_with_1014(
    backend: Backend, start_proxy: ProxyFactory, http
) -> None:
    proxy = await start_proxy(backend.url)
    async with http.ws_connect(proxy.url + "/ws") as ws:
        await ws.send_str("drop")
        msg = await ws.receive(timeout=5)
        assert msg.type is WSMsgType.CLOSE and msg.data == 1014  # RFC 6455 "bad gateway"
    await wait_until(lambda: proxy.settings.completed == 1)


async def test_heartbeat_keeps_an_idle_session(backend: Backend, start_proxy: ProxyFactory, http) -> None:
    proxy = await start_proxy(backend.url, heartbeat=0.1)
    async with http.ws_connect(proxy.url + "/ws") as ws:
        pending = asyncio.create_task(ws.receive(timeout=5))  # a reading client answers pings
        await asyncio.sleep(0.5)  # several heartbeat periods with no messages
        assert not pending.done()
        await ws.send_str("still-here")
        msg = await pending
        assert (msg.type, msg.data) == (WSMsgType.TEXT, "still-here")


# --- the byte relay (issue #16): frames pass as sent; only their headers are read -------------


def _masked_frame(payload: bytes, *, opcode: int = 0x2, fin: bool = True) -> bytes:
    key = os.urandom(4)
    n = len(payload)
    head = bytes(((0x80 if fin else 0) | opcode,)) + (
        bytes((0x80 | n,)) if n < 126 else bytes((0x80 | 126,)) + n.to_bytes(2, "big"))
    return head + key + bytes(b ^ key[i & 3] for i, b in enumerate(payload))


async def _raw_upgrade(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"GET /ws HTTP/1.1\r\nHost: proxy\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 101")
    assert b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in head  # RFC 6455's example key and accept
    return reader, writer


async def test_frames_split_into_single_bytes_arrive_whole(backend: Backend, start_proxy: ProxyFactory) -> None:
    proxy = await start_proxy(backend.url)
    reader, writer = await _raw_upgrade(proxy.port)
    payload = bytes(range(200))
    for byte in _masked_frame(payload) + _masked_frame(b"whoami", opcode=0x1):
        writer.write(bytes((byte,)))
        await writer.drain()
    echo = await asyncio.wait_for(reader.readexactly(4 + 200), 5)
    assert echo == bytes((0x82, 126)) + (200).to_bytes(2, "big") + payload  # the instance's frame, unmasked
    assert await asyncio.wait_for(reader.readexactly(4), 5) == bytes((0x81, 2)) + b"b1"
    writer.write(_masked_frame((1000).to_bytes(2, "big"), opcode=0x8))
    assert (await asyncio.wait_for(reader.readexactly(4), 5))[:2] == bytes((0x88, 2))
    await wait_until(lambda: backend.state.ws_closes == [(1000, "")], message="instance saw the close")
    await wait_until(lambda: proxy.settings.completed == 1)
    writer.close()


async def test_a_fragmented_message_over_the_limit_closes_both_legs_with_1009(
    backend: Backend, start_proxy: ProxyFactory, http
) -> None:
    proxy = await start_proxy(backend.url, max_message_bytes=1024)
    reader, writer = await _raw_upgrade(proxy.port)
    writer.write(_masked_frame(b"a" * 600, fin=False) + _masked_frame(b"b" * 600, opcode=0x0))
    head = await asyncio.wait_for(reader.readexactly(4), 5)
    assert head == bytes((0x88, 2)) + (1009).to_bytes(2, "big")  # a CLOSE from the proxy, nothing of the message
    await wait_until(lambda: backend.state.ws_closes == [(1009, "")], message="instance told with 1009")
    writer.write(_masked_frame((1009).to_bytes(2, "big"), opcode=0x8))  # the client's answer ends the session
    await wait_until(lambda: proxy.settings.completed == 1)
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()


async def test_a_client_that_stops_answering_heartbeats_is_dropped_and_the_instance_told_1001(
    backend: Backend, start_proxy: ProxyFactory
) -> None:
    proxy = await start_proxy(backend.url, heartbeat=0.2)
    reader, writer = await _raw_upgrade(proxy.port)  # reads nothing, answers no ping
    await wait_until(lambda: backend.state.ws_closes == [(1001, "")], timeout=10, message="instance told 1001")
    await wait_until(lambda: proxy.settings.completed == 1)
    data = await asyncio.wait_for(reader.read(), 5)  # a PING or two, then the connection ends
    assert data and data[0] == 0x89
    writer.close()


async def test_an_oversize_message_spanning_many_reads_still_gets_1009(backend: Backend, start_proxy: ProxyFactory,
                                                                      http) -> None:
    proxy = await start_proxy(backend.url, max_message_bytes=1024)
    async with http.ws_connect(proxy.url + "/ws", max_msg_size=0) as ws:
        await ws.send_bytes(b"y" * (8 * 1024 * 1024))
        msg = await ws.receive(timeout=10)
        assert msg.type is WSMsgType.CLOSE and msg.data == 1009
    await wait_until(lambda: backend.state.ws_closes == [(1009, "")], message="instance told with 1009")


async def test_back_pressure_holds_and_releases_without_losing_a_byte(backend: Backend, start_proxy: ProxyFactory,
                                                                      http) -> None:
    proxy = await start_proxy(backend.url, max_message_bytes=0)
    messages = [bytes([i]) * (2 * 1024 * 1024) for i in range(4)]
    async with http.ws_connect(proxy.url + "/ws", max_msg_size=0) as ws:
        for m in messages:
            await ws.send_bytes(m)
        await asyncio.sleep(0.5)  # not reading: the echoes pile up until the proxy stops reading the instance
        for m in messages:
            assert await ws.receive_bytes(timeout=30) == m
        await ws.send_str("whoami")
        assert await ws.receive_str(timeout=5) == "b1"
    await wait_until(lambda: proxy.settings.completed == 1)
