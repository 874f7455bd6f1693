"""Request bodies that never finish or arrive slowly: ``limits.request_buffer`` and abandoned bodies.

A body of at most ``limits.request_buffer`` bytes (declared, or chunked and ending within it) is
read whole before an instance connection is taken, so a slow sender holds none (the recording
instance never sees its head); a larger one streams as before. A client that closes (FIN) with
its body unfinished frees its connection slot and the instance's connection at once: 60 such
requests against ``max_connections: 50`` used to lock every client out until client_timeout.
"""

from __future__ import annotations

import asyncio

import pytest

from affinity_proxy.config import InstanceConfig, LimitsConfig
from affinity_proxy.serve.app import ProxyServer
from tests.robustness.conftest import RecordingBackend, assert_served, make_config
from tests.robustness.rawhttp import close, read_response, request, wait_closed
from tests.support.backends import Backends
from tests.support.waiting import wait_until

KiB = 1024
BUFFER = 1 * KiB  # a small request_buffer keeps the bodies of these tests small


async def _proxy(start_proxy, recording_backend, engine: str, **limits: object) -> tuple[ProxyServer, RecordingBackend]:  # type: ignore[no-untyped-def]
    backend: RecordingBackend = await recording_backend()
    config = make_config(Backends(), engine=engine, instances=(InstanceConfig("rec", backend.url),),
                         limits=LimitsConfig(**{"upstream_timeout": 30.0, **limits}))  # type: ignore[arg-type]
    return await start_proxy(config), backend


def _head(path: str, framing: str, length: int) -> bytes:
    if framing == "chunked":
        return request("POST", path, [("Transfer-Encoding", "chunked")])
    return request("POST", path, [("Content-Length", str(length))])


def _part(framing: str, data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data) if framing == "chunked" else data


# --------------------------------------------------------------------------- abandoned bodies


@pytest.mark.parametrize(("framing", "length"), [("content-length", 100_000), ("content-length", 1000),
                                                 ("chunked", 0)])
async def test_abandoned_bodies_leave_every_new_client_served(engine: str, start_proxy, recording_backend, http,  # type: ignore[no-untyped-def]
                                                              framing: str, length: int) -> None:
    """60 clients each send a head, 3 body bytes and a FIN (the issue's attack) against
    ``max_connections: 50``: each connection is dropped at once (not held half-closed until
    client_timeout), no instance connection stays half-written, and 50 new clients are then
    served at the same time. A body within request_buffer never reaches the instance at all."""
    server, backend = await _proxy(start_proxy, recording_backend, engine, max_connections=50, client_timeout=60.0,
                                   request_buffer=64 * KiB)
    conns = []
    for i in range(60):
        reader, writer = await asyncio.open_connection("127.0.0.1", server.main_port)
        writer.write(_head(f"/abandoned{i}", framing, length) + _part(framing, b"abc"))
        writer.write_eof()
        conns.append((reader, writer))
    await asyncio.gather(*(wait_closed(reader, within=30) for reader, _ in conns))  # not after client_timeout
    for _, writer in conns:
        await close(writer)
    limiter = server._runners[0].limiter
    await wait_until(lambda: limiter.total == 0, timeout=10, message="every abandoned connection's slot freed")
    await wait_until(lambda: backend.partial == 0, timeout=10, message="no half-written instance connection")
    if (length and length <= 64 * KiB) or framing == "chunked":
        assert not [h for h in backend.heads if h.startswith("/abandoned")], "a buffered body reached the instance"
    assert not [r for r in backend.requests if r.target.startswith("/abandoned")]
    served = await asyncio.gather(*(assert_served(http, server.main_port, f"new client {i}", user=f"new{i}")
                                    for i in range(50)))
    assert len(served) == 50


# --------------------------------------------------------------------------- request_buffer


@pytest.mark.parametrize(("framing", "sent"), [("content-length", 10), ("content-length", BUFFER - 1),
                                               ("chunked", 10), ("chunked", BUFFER)])
async def test_slow_body_within_the_buffer_holds_no_instance_connection(engine: str, start_proxy, recording_backend,  # type: ignore[no-untyped-def]
                                                                        http,
                                                                        framing: str, sent: int) -> None:
    """A body within request_buffer that stops arriving: the instance never sees its head (no
    connection is taken for it) and the proxy closes the client after client_timeout. The
    Content-Length case declares exactly the buffer size; the chunked one has sent up to it."""
    server, backend = await _proxy(start_proxy, recording_backend, engine, client_timeout=1.0, request_buffer=BUFFER)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.main_port)
    writer.write(_head("/slow", framing, BUFFER) + _part(framing, b"x" * sent))
    await writer.drain()
    await assert_served(http, server.main_port, "during a slow body")
    await wait_closed(reader, within=30)
    await close(writer)
    assert "/slow" not in backend.heads, "the instance was contacted before the body was whole"
    assert backend.partial == 0


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_slow_body_within_the_buffer_is_forwarded_whole(engine: str, start_proxy, recording_backend,  # type: ignore[no-untyped-def]
                                                              framing: str) -> None:
    """A buffered body sent in many small pieces arrives at the instance intact, as one request."""
    server, backend = await _proxy(start_proxy, recording_backend, engine, client_timeout=10.0, request_buffer=BUFFER)
    body = bytes(range(256)) * 3
    reader, writer = await asyncio.open_connection("127.0.0.1", server.main_port)
    writer.write(_head("/pieces", framing, len(body)))
    for i in range(0, len(body), 97):
        writer.write(_part(framing, body[i:i + 97]))
        await writer.drain()
    if framing == "chunked":
        writer.write(b"0\r\n\r\n")
    resp = await read_response(reader)
    await close(writer)
    assert resp.status == 200 and resp.json()["body_len"] == len(body)
    assert [(r.target, r.body) for r in backend.requests] == [("/pieces", body)]


@pytest.mark.parametrize(("framing", "buffer", "first"), [
    ("content-length", BUFFER, 10),  # declared BUFFER + 1: streams from the start
    ("chunked", BUFFER, BUFFER + 1),  # streams once more than BUFFER bytes came
    ("content-length", 0, 10),  # request_buffer: 0 streams every body
])
async def test_body_beyond_the_buffer_streams(engine: str, start_proxy, recording_backend, framing: str, buffer: int,  # type: ignore[no-untyped-def]
                                              first: int) -> None:
    """Bodies larger than request_buffer stream as before: the instance gets the head while the
    client is still sending, and the whole body in the end."""
    server, backend = await _proxy(start_proxy, recording_backend, engine, client_timeout=30.0, request_buffer=buffer)
    total = BUFFER + 1 + 500
    body = b"y" * total
    reader, writer = await asyncio.open_connection("127.0.0.1", server.main_port)
    writer.write(_head("/big", framing, total) + _part(framing, body[:first]))
    await writer.drain()
    await wait_until(lambda: "/big" in backend.heads, timeout=15, message="the head forwarded before the body ended")
    assert not backend.requests
    writer.write(_part(framing, body[first:]) + (b"0\r\n\r\n" if framing == "chunked" else b""))
    resp = await read_response(reader)
    await close(writer)
    assert resp.status == 200 and resp.json()["body_len"] == total
    assert [(r.target, r.body) for r in backend.requests] == [("/big", body)]
