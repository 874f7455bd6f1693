"""HTTP edges a scanner found (issue 12), on raw sockets against a ``RecordingBackend``:

- a ``Transfer-Encoding`` other than exactly ``chunked`` gets a JSON 501 and the connection ends
  (``gzip, chunked`` was accepted and the gzip coding silently dropped);
- an HTTP/1.0 request whose body is framed by ``Transfer-Encoding`` closes the connection after
  its response, even with ``Connection: keep-alive`` (RFC 9112 6.1);
- ``TRACE`` is never forwarded (it echoed cookies back): 405 with ``Allow``.
"""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from tests.robustness import test_http_parsing
from tests.robustness.rawhttp import chunked, close, exchange, read_response, request, wait_closed
from tests.robustness.test_http_parsing import H, Setup, assert_json_error

setup = test_http_parsing.setup  # its fixture: a proxy in front of a RecordingBackend, and a trap

UNSUPPORTED = ["gzip, chunked", "identity", "gzip", "chunked, gzip", "deflate, chunked", "GZIP, Chunked",
               "chunked;q=1", "compress"]


@pytest.mark.parametrize("coding", UNSUPPORTED)
async def test_a_coding_other_than_chunked_gets_501_and_the_connection_ends(setup: Setup, coding: str) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", setup.port)
    try:
        body = chunked(b"abc") if "chunked" in coding.lower() else b"abc"
        writer.write(b"POST /upload HTTP/1.1\r\n" + H + b"Transfer-Encoding: " + coding.encode() + b"\r\n\r\n" + body
                     + request("GET", "/after"))
        await writer.drain()
        resp = await read_response(reader)
        assert_json_error(resp, {501})
        assert resp.json()["error"] == "transfer_encoding_not_implemented"
        assert resp.closes, resp.headers
        assert await wait_closed(reader) == b"", "nothing may follow: the pipelined request is not served"
    finally:
        await close(writer)
    assert setup.backend.requests == [], coding


@pytest.mark.parametrize("coding", ["chunked", "Chunked", "CHUNKED"])
async def test_chunked_alone_in_any_case_is_forwarded(setup: Setup, coding: str) -> None:
    resp = await exchange(setup.port, b"POST /upload HTTP/1.1\r\n" + H + b"Transfer-Encoding: " + coding.encode()
                          + b"\r\n\r\n" + chunked(b"ab", b"c"))
    assert resp.status == 200, resp.body
    assert [(r.target, r.body) for r in setup.backend.requests] == [("/upload", b"abc")]


async def test_http10_with_transfer_encoding_closes_after_the_response(setup: Setup) -> None:
    """RFC 9112 6.1: a server that receives Transfer-Encoding in an HTTP/1.0 request must treat
    the framing as faulty and close after responding, whatever ``Connection`` says."""
    reader, writer = await asyncio.open_connection("127.0.0.1", setup.port)
    try:
        writer.write(b"POST /old HTTP/1.0\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n"
                     + chunked(b"hello") + b"GET /next HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        await writer.drain()
        resp = await read_response(reader)
        assert resp.status == 200, resp.body
        assert resp.headers.get("Connection", "").lower() != "keep-alive", resp.headers
        assert await wait_closed(reader) == b"", "the connection ends: the next request is not served"
    finally:
        await close(writer)
    assert [(r.target, r.body) for r in setup.backend.requests] == [("/old", b"hello")]


async def test_http10_keep_alive_with_content_length_stays_open(setup: Setup) -> None:
    """The control case: the same request framed by Content-Length keeps the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", setup.port)
    try:
        for path in ("/one", "/two"):
            writer.write(f"POST {path} HTTP/1.0\r\nConnection: keep-alive\r\nContent-Length: 5\r\n\r\nhello".encode())
            await writer.drain()
            resp = await read_response(reader)
            assert resp.status == 200 and resp.headers.get("Connection", "").lower() == "keep-alive", resp.headers
    finally:
        await close(writer)
    assert setup.backend.paths() == ["/one", "/two"]


@pytest.mark.parametrize("version", ["HTTP/1.1", "HTTP/1.0"])
async def test_trace_is_refused_with_405_and_allow(setup: Setup, http: aiohttp.ClientSession, version: str) -> None:
    resp = await exchange(setup.port, request("TRACE", "/echo", [("Cookie", "session=s3cret"), ("X-User-Id", "u1")],
                                              version=version))
    assert_json_error(resp, {405})
    allow = {m.strip() for m in resp.headers["Allow"].split(",")}
    assert "GET" in allow and "TRACE" not in allow and "CONNECT" not in allow
    assert b"s3cret" not in resp.body
    assert setup.backend.requests == []
    async with http.request("TRACE", f"http://127.0.0.1:{setup.port}/x", headers={"Cookie": "a=b"}) as answer:
        assert answer.status == 405 and "TRACE" not in answer.headers["Allow"]
    assert setup.backend.requests == []
