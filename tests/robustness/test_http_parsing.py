"""HTTP/1.1 parsing robustness on raw sockets: malformed and hostile requests get a clean JSON 4xx
(or correct handling), never a 5xx or a hang, reach no instance, and the proxy keeps serving.

The instance behind the proxy is a ``RecordingBackend`` (its own strict parser), so every test
can say exactly which requests the instance saw: request smuggling shows up as a request the
instance parsed that the client never got an answer for.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import pytest

from affinity_proxy.config import Config, CookieConfig, HealthConfig, InstanceConfig, LimitsConfig, UserKeySourceConfig
from affinity_proxy.serve.app import ProxyServer
from tests.robustness.conftest import RecordingBackend, assert_served
from tests.robustness.rawhttp import (
    Hang,
    RawResponse,
    chunked,
    close,
    exchange,
    read_head,
    read_response,
    request,
    wait_closed,
)

MAX_BODY = 64 * 1024
MAX_HEADERS = 8 * 1024
CLIENT_TIMEOUT = 1.0


@dataclass
class Setup:
    server: ProxyServer
    backend: RecordingBackend
    trap: RecordingBackend  # in no config: nothing may ever connect to it

    @property
    def port(self) -> int:
        return self.server.main_port


@pytest.fixture
async def setup(engine: str, recording_backend, start_proxy) -> AsyncIterator[Setup]:  # type: ignore[no-untyped-def]
    backend = await recording_backend()
    trap = await recording_backend()
    config = Config(
        engine=engine,
        listen="127.0.0.1:0",
        admin_listen="127.0.0.1:0",
        instances=(InstanceConfig("rec", backend.url),),
        cookie=CookieConfig(secret="parsing-test-secret-" + "p" * 16),
        user_key=(UserKeySourceConfig("header", "X-User-Id"),),
        health=HealthConfig(interval=0.5, timeout=0.5, unhealthy_after=3, healthy_after=1),
        limits=LimitsConfig(max_body_bytes=MAX_BODY, max_header_bytes=MAX_HEADERS, client_timeout=CLIENT_TIMEOUT,
                            upstream_timeout=5.0, upstream_connect_timeout=1.0),
    )
    server = await start_proxy(config)
    yield Setup(server, backend, trap)
    assert trap.connections == 0, "the proxy connected to a host named by a client"
    assert not backend.errors, backend.errors


@pytest.fixture
def no_error_logs(caplog: pytest.LogCaptureFixture):  # type: ignore[no-untyped-def]
    """Hostile input must not produce ERROR log lines (log flooding, tracebacks)."""
    caplog.set_level(logging.DEBUG)
    yield
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [f"{r.name}: {r.getMessage()}" for r in errors]


async def served_5xx(server: ProxyServer) -> float:
    """Server errors answered so far; 501 (the deliberate answer to a Transfer-Encoding other than
    chunked) does not count."""
    async with aiohttp.ClientSession() as session, session.get(
            f"http://127.0.0.1:{server.admin_port}/metrics") as resp:
        text = await resp.text()
    server_errors = re.finditer(r'^affinity_responses_total\{code="5(?!01)\d\d"\} (\S+)$', text, re.M)
    return sum(float(m.group(1)) for m in server_errors)


def assert_json_error(resp: RawResponse, allowed: set[int]) -> None:
    assert resp.status in allowed, (resp.status, resp.body[:300])
    assert resp.headers.get("Content-Type", "").startswith("application/json"), resp.headers
    doc = resp.json()
    assert doc["status"] == resp.status and isinstance(doc["error"], str) and doc["message"]


H = b"Host: proxy.test\r\n"

#: (case, bytes, allowed statuses). None of these may reach the instance.
REJECTED: list[tuple[str, bytes, set[int]]] = [
    ("request line: extra token", b"GET / HTTP/1.1 extra\r\n" + H + b"\r\n", {400}),
    ("request line: no version", b"GET /\r\n" + H + b"\r\n", {400}),
    ("request line: no target", b"GET HTTP/1.1\r\n" + H + b"\r\n", {400}),
    ("request line: tab separated", b"GET\t/\tHTTP/1.1\r\n" + H + b"\r\n", {400}),
    ("request line: control character in target", b"GET /a\x01b HTTP/1.1\r\n" + H + b"\r\n", {400}),
    ("request line: space in target", b"GET /a b HTTP/1.1\r\n" + H + b"\r\n", {400}),
    ("request line: unknown version", b"GET / HTTP/9.9\r\n" + H + b"\r\n", {400}),
    ("request line: HTTP/0.9 style", b"GET /\r\n\r\n", {400}),
    ("request line: lower-case method", b"get / HTTP/1.1\r\n" + H + b"\r\n", {400, 405}),
    ("request line: unknown method", b"FOO / HTTP/1.1\r\n" + H + b"\r\n", {400, 405, 501}),
    ("not HTTP: TLS client hello", b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\r\n\r\n", {400}),
    ("not HTTP: HTTP/2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", {400}),
    ("header name: space inside", b"GET / HTTP/1.1\r\n" + H + b"Bad Header: y\r\n\r\n", {400}),
    ("header name: separator char", b"GET / HTTP/1.1\r\n" + H + b"Bad(: y\r\n\r\n", {400}),
    ("header name: empty", b"GET / HTTP/1.1\r\n" + H + b": y\r\n\r\n", {400}),
    ("header name: space before colon", b"GET / HTTP/1.1\r\n" + H + b"X-A : y\r\n\r\n", {400}),
    ("header name: non-ASCII", b"GET / HTTP/1.1\r\n" + H + b"X-\xe9: y\r\n\r\n", {400}),
    ("header line: no colon", b"GET / HTTP/1.1\r\n" + H + b"NoColonHere\r\n\r\n", {400}),
    ("obsolete line folding", b"GET / HTTP/1.1\r\n" + H + b"X-A: a\r\n b\r\n\r\n", {400}),
    ("folding of the first header", b"GET / HTTP/1.1\r\n X-A: a\r\n" + H + b"\r\n", {400}),
    ("NUL in header value", b"GET / HTTP/1.1\r\n" + H + b"X-A: a\x00b\r\n\r\n", {400}),
    ("bare CR in header value", b"GET / HTTP/1.1\r\n" + H + b"X-A: a\rb\r\n\r\n", {400}),
    ("bare LF line endings", b"GET / HTTP/1.1\nHost: proxy.test\nX-A: a\n\n", {400}),
    ("LF inside the header block", b"GET / HTTP/1.1\r\n" + H + b"X-A: a\nX-B: b\r\n\r\n", {400}),
    ("HTTP/1.1 without Host", b"GET / HTTP/1.1\r\nX-A: a\r\n\r\n", {400}),
    ("two Host headers", b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", {400}),
    ("Content-Length and Transfer-Encoding",
     b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", {400}),
    ("duplicate Content-Length, differing",
     b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 4\r\nContent-Length: 5\r\n\r\nabcde", {400}),
    ("Content-Length list", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 4, 5\r\n\r\nabcde", {400}),
    ("Content-Length with sign", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: +4\r\n\r\nabcd", {400}),
    ("Content-Length negative", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: -4\r\n\r\nabcd", {400}),
    ("Content-Length hex", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 0x4\r\n\r\nabcd", {400}),
    ("Content-Length overflow", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 99999999999999999999999\r\n\r\n",
     {400, 413}),
    ("chunk size not hex", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
     {400}),
    ("chunk size overflow",
     b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\nffffffffffffffffffff\r\nabc\r\n0\r\n\r\n", {400}),
    ("chunk size negative", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n-1\r\nabc\r\n0\r\n\r\n",
     {400}),
    ("chunk longer than its size",
     b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabcdef\r\n0\r\n\r\n", {400}),
    ("Transfer-Encoding: xchunked", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
     {400, 501}),
    ("Transfer-Encoding: chunked, identity",
     b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n", {400, 501}),
    ("Transfer-Encoding twice",
     b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\n",
     {400, 501}),
    ("too many headers", b"GET / HTTP/1.1\r\n" + H + b"".join(b"X-%d: y\r\n" % i for i in range(200)) + b"\r\n",
     {431}),
    ("one header over the limit", b"GET / HTTP/1.1\r\n" + H + b"X-Big: " + b"a" * (MAX_HEADERS + 10) + b"\r\n\r\n",
     {431}),
    ("header block over the limit",
     b"GET / HTTP/1.1\r\n" + H + b"".join(b"X-%d: %s\r\n" % (i, b"a" * 200) for i in range(60)) + b"\r\n", {431}),
    ("URL over the limit", b"GET /" + b"a" * (MAX_HEADERS + 10) + b" HTTP/1.1\r\n" + H + b"\r\n", {414, 431}),
    ("CONNECT", b"CONNECT 127.0.0.1:9 HTTP/1.1\r\nHost: 127.0.0.1:9\r\n\r\n", {405}),
    ("Expect other than 100-continue",
     b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 3\r\nExpect: 200-ok\r\n\r\nabc", {417}),
    ("declared body over the limit",
     b"POST / HTTP/1.1\r\n" + H + b"Content-Length: %d\r\n\r\nabc" % (MAX_BODY + 1), {413}),
]


@pytest.mark.parametrize(("case", "data", "allowed"), REJECTED, ids=[c[0] for c in REJECTED])
async def test_malformed_requests_get_a_json_4xx_and_reach_no_instance(
    setup: Setup, http: aiohttp.ClientSession, no_error_logs: None, case: str, data: bytes, allowed: set[int],
) -> None:
    resp = await exchange(setup.port, data)
    assert_json_error(resp, allowed)
    assert setup.backend.requests == [], case
    await assert_served(http, setup.port, case)
    assert await served_5xx(setup.server) == 0


async def test_malformed_request_after_a_good_one_on_the_same_connection(setup: Setup, no_error_logs: None) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", setup.port)
    writer.write(request("GET", "/first"))
    first = await read_response(reader)
    assert first.status == 200 and first.json()["path"] == "/first"
    writer.write(b"GET / HTTP/1.1\r\n" + H + b"X-A: a\x00\r\n\r\n")
    second = await read_response(reader)
    assert_json_error(second, {400})
    await wait_closed(reader)
    await close(writer)
    assert setup.backend.paths() == ["/first"]


async def test_malformed_request_pipelined_behind_a_good_one(setup: Setup, no_error_logs: None) -> None:
    """In one packet: aiohttp's parser drops the whole batch when a later message is malformed,
    so the good request may go unanswered; either way it is answered (and forwarded) at most once,
    the bad one gets a JSON 400 and the connection closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", setup.port)
    writer.write(request("GET", "/first") + b"GET / HTTP/1.1\r\n" + H + b"X-A: a\x00\r\n\r\n")
    first = await read_response(reader)
    if first.status == 200:
        assert first.json()["path"] == "/first"
        first = await read_response(reader)
    assert_json_error(first, {400})
    await wait_closed(reader)
    await close(writer)
    assert setup.backend.paths() in ([], ["/first"])


@pytest.mark.parametrize("tail", [b"zz\r\nabc\r\n0\r\n\r\n", b"3\r\nabcX\r\n0\r\n\r\n", b"5\r\nabc"])
async def test_bad_chunk_after_the_request_went_upstream(setup: Setup, http: aiohttp.ClientSession,
                                                         no_error_logs: None, tail: bytes) -> None:
    """The headers are forwarded before the body breaks: the client gets a 400 (or, for a body
    that merely stops, is closed after client_timeout) and the instance never sees a complete
    request, so nothing truncated is passed off as whole."""
    reader, writer = await asyncio.open_connection("127.0.0.1", setup.port)
    writer.write(b"POST /upload HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
    await writer.drain()
    await asyncio.sleep(0.2)  # let the request start upstream before the body breaks
    writer.write(tail)
    await writer.drain()
    try:
        resp = await read_response(reader)
    except asyncio.IncompleteReadError:
        resp = None  # closed without an answer: only when the body just stopped (stall deadline)
    if resp is None:
        assert tail == b"5\r\nabc"
    else:
        assert_json_error(resp, {400})
    await wait_closed(reader)
    await close(writer)
    assert setup.backend.requests == []
    await assert_served(http, setup.port, "after a broken chunked body")


async def test_duplicate_equal_content_length_is_rejected_or_forwarded_once(setup: Setup) -> None:
    data = b"POST /dup HTTP/1.1\r\n" + H + b"Content-Length: 4\r\nContent-Length: 4\r\n\r\nabcd"
    resp = await exchange(setup.port, data)
    if resp.status == 200:
        assert [(r.target, r.body) for r in setup.backend.requests] == [("/dup", b"abcd")]
    else:
        assert_json_error(resp, {400})
        assert setup.backend.requests == []


@pytest.mark.parametrize("target", [
    "http://{trap}/p?q=1",
    "https://{trap}/p?q=1",
    "http://user:pw@{trap}/p?q=1",
    "http://{trap}:80/p?q=1",
])
async def test_absolute_form_is_served_as_origin_form_never_proxied_to_that_host(
    setup: Setup, http: aiohttp.ClientSession, target: str,
) -> None:
    trap = f"127.0.0.1:{setup.trap.port}"
    resp = await exchange(setup.port, f"GET {target.format(trap=trap)} HTTP/1.1\r\nHost: proxy.test\r\n\r\n".encode())
    if resp.status == 200:
        assert resp.json()["path"] == "/p?q=1"
        assert setup.backend.paths() == ["/p?q=1"]
        sent = dict((n.lower(), v) for n, v in setup.backend.requests[0].headers)
        assert sent["host"] == "proxy.test"
    else:
        assert_json_error(resp, {400})
    assert setup.trap.connections == 0
    await assert_served(http, setup.port, "absolute-form")


@pytest.mark.parametrize("target", [
    "@{trap}/x", "{trap}", "{trap}/x", "//{trap}/x", "http:/{trap}/x", "http:{trap}/x", "\\\\{trap}/x",
    "/\\{trap}/x", "/..//{trap}/x", "/%2F%2F{trap}/x", "HTTP://{trap}/x", "ws://{trap}/x", "file:///etc/passwd",
    "/x?@{trap}", "/x#@{trap}",
])
async def test_odd_request_targets_never_reach_another_host(setup: Setup, target: str) -> None:
    """Authority-form, scheme-relative and backslash tricks: refused (400) or passed to the
    configured instance as a path; the proxy never connects where a target points."""
    line = target.format(trap=f"127.0.0.1:{setup.trap.port}")
    resp = await exchange(setup.port, f"GET {line} HTTP/1.1\r\nHost: proxy.test\r\n\r\n".encode())
    if resp.status == 200:
        assert setup.backend.paths() == [resp.json()["path"]]
        assert resp.json()["path"].startswith("/")
    else:
        assert_json_error(resp, {400})
    assert setup.trap.connections == 0


async def test_connect_is_refused_and_opens_no_tunnel(setup: Setup, http: aiohttp.ClientSession) -> None:
    trap = f"127.0.0.1:{setup.trap.port}"
    reader, writer = await asyncio.open_connection("127.0.0.1", setup.port)
    writer.write(f"CONNECT {trap} HTTP/1.1\r\nHost: {trap}\r\n\r\n".encode())
    resp = await read_response(reader)
    assert_json_error(resp, {405})
    assert "GET" in resp.headers.get("Allow", "")
    # Whatever follows is parsed as HTTP (never tunnelled) or the connection is closed.
    writer.write(b"\x16\x03\x01\x00\x05hello")
    await writer.drain()
    try:
        follow = await read_response(reader, within=5)
        assert follow.status == 400
    except (asyncio.IncompleteReadError, Hang, ConnectionError):
        pass
    await close(writer)
    assert setup.trap.connections == 0 and setup.backend.requests == []
    await assert_served(http, setup.port, "CONNECT")


async def test_pipelined_requests_are_answered_in_order(setup: Setup) -> None:
    data = (request("GET", "/1") + request("POST", "/2", body=b"two") + request("GET", "/3")
            + request("POST", "/4", [("Transfer-Encoding", "chunked")], chunked(b"fo", b"ur")) + request("GET", "/5"))
    reader, writer = await asyncio.open_connection("127.0.0.1", setup.port)
    writer.write(data)
    await writer.drain()
    paths = []
    for _ in range(5):
        resp = await read_response(reader)
        assert resp.status == 200
        paths.append(resp.json()["path"])
    await close(writer)
    assert paths == ["/1", "/2", "/3", "/4", "/5"]
    assert [(r.target, r.body) for r in setup.backend.requests] == [
        ("/1", b""), ("/2", b"two"), ("/3", b""), ("/4", b"four"), ("/5", b"")]


async def test_expect_100_continue_works(setup: Setup) -> None:
    body = b"x" * 1000
    reader, writer = await asyncio.open_connection("127.0.0.1", setup.port)
    writer.write(request("POST", "/upload", [("Content-Length", str(len(body))), ("Expect", "100-continue")]))
    await writer.drain()
    _, status, _, _ = await read_head(reader)
    assert status == 100
    writer.write(body)
    await writer.drain()
    resp = await read_response(reader)
    await close(writer)
    assert resp.status == 200 and resp.json()["body_len"] == len(body)
    assert [(r.target, len(r.body)) for r in setup.backend.requests] == [("/upload", 1000)]
    sent = {n.lower() for n, _ in setup.backend.requests[0].headers}
    assert "expect" not in sent  # the 100 was ours; the instance must not wait for a second one


async def test_expect_100_continue_over_the_limit_is_refused_before_the_body(setup: Setup,
                                                                           http: aiohttp.ClientSession) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", setup.port)
    writer.write(request("POST", "/upload", [("Content-Length", str(MAX_BODY * 100)), ("Expect", "100-continue")]))
    await writer.drain()
    resp = await read_response(reader)  # the client never sent a body byte
    assert resp.interim == []  # no "100 Continue": the client is not invited to send
    assert_json_error(resp, {413})
    assert resp.closes
    await wait_closed(reader)
    await close(writer)
    assert setup.backend.requests == []
    await assert_served(http, setup.port, "Expect over limit")


async def test_chunked_upload_over_the_limit_gets_413(setup: Setup, http: aiohttp.ClientSession) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", setup.port)
    writer.write(request("POST", "/upload", [("Transfer-Encoding", "chunked"), ("Expect", "100-continue")]))
    await writer.drain()
    _, status, _, _ = await read_head(reader)
    assert status == 100
    block = b"y" * 16384
    try:
        for _ in range(MAX_BODY // len(block) + 4):
            writer.write(b"%x\r\n%s\r\n" % (len(block), block))
            await writer.drain()
    except ConnectionError:
        pass
    resp = await read_response(reader)
    await close(writer)
    assert_json_error(resp, {413})
    assert setup.backend.requests == []  # the instance saw a truncated request, never a complete one
    await assert_served(http, setup.port, "chunked over limit")


@pytest.mark.parametrize("data", [
    b"GET /old HTTP/1.0\r\n\r\n",
    b"GET /old HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    b"POST /old HTTP/1.0\r\nContent-Length: 3\r\n\r\nabc",
])
async def test_http10_without_host_is_answered(setup: Setup, data: bytes) -> None:
    resp = await exchange(setup.port, data)
    assert resp.status == 200 and resp.json()["path"] == "/old"
    assert [r.target for r in setup.backend.requests] == ["/old"]


async def test_options_asterisk_and_reserved_paths_answer_json(setup: Setup) -> None:
    resp = await exchange(setup.port, b"OPTIONS * HTTP/1.1\r\n" + H + b"\r\n")
    assert resp.status < 500
    if resp.status >= 400:
        assert_json_error(resp, {400, 404, 405})
    resp = await exchange(setup.port, request("POST", "/_affinity/health"))
    assert_json_error(resp, {404, 405})
    resp = await exchange(setup.port, request("GET", "/_affinity/pins"))
    assert_json_error(resp, {404})


# --------------------------------------------------------------------------- request smuggling

SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: proxy.test\r\n\r\n"

def _post(head: bytes, body: bytes, version: bytes = b"HTTP/1.1") -> bytes:
    host = H if version == b"HTTP/1.1" else b""
    return b"POST /outer " + version + b"\r\n" + host + head + b"\r\n" + body


_TERMINATED = b"0\r\n\r\n" + SMUGGLED  # an empty chunked body followed by the hidden request
_CL_COVERS = b"Content-Length: %d\r\n" % len(_TERMINATED)  # ...which a Content-Length parser reads as body
_HIDDEN_CHUNK = b"%x\r\n%s\r\n0\r\n\r\n" % (len(SMUGGLED), SMUGGLED)  # the request as one chunk

SMUGGLING: list[tuple[str, bytes]] = [
    ("CL.TE", _post(_CL_COVERS + b"Transfer-Encoding: chunked\r\n", _TERMINATED)),
    ("TE.CL", _post(b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n", _HIDDEN_CHUNK)),
    ("TE with tab", _post(b"Content-Length: 4\r\nTransfer-Encoding:\tchunked\r\n", _HIDDEN_CHUNK)),
    ("TE space before colon", _post(_CL_COVERS + b"Transfer-Encoding : chunked\r\n", _TERMINATED)),
    ("TE xchunked with CL", _post(_CL_COVERS + b"Transfer-Encoding: xchunked\r\n", _TERMINATED)),
    ("TE folded", _post(_CL_COVERS + b"Transfer-Encoding: \r\n chunked\r\n", _TERMINATED)),
    ("TE after bare LF", _post(_CL_COVERS + b"X: y\nTransfer-Encoding: chunked\r\n", _TERMINATED)),
    ("TE in HTTP/1.0 with CL", _post(_CL_COVERS + b"Transfer-Encoding: chunked\r\n", _TERMINATED, b"HTTP/1.0")),
    ("duplicate TE", _post(b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n", _TERMINATED)),
    ("two Content-Lengths", _post(b"Content-Length: 0\r\nContent-Length: %d\r\n" % len(SMUGGLED), SMUGGLED)),
    ("chunk extension with CR", _post(b"Transfer-Encoding: chunked\r\n", b"5;a\rb\r\nhello\r\n" + _TERMINATED)),
    ("LF-only chunk terminator", _post(b"Transfer-Encoding: chunked\r\n", b"5\nhello\n0\n\n" + SMUGGLED)),
    ("chunk size with leading space", _post(b"Transfer-Encoding: chunked\r\n", b" 5\r\nhello\r\n" + _TERMINATED)),
    ("chunked body, then a pipelined request", _post(b"Transfer-Encoding: chunked\r\n", _TERMINATED)),
    ("Content-Length with spaces inside", _post(b"Content-Length: 1 0\r\n", b"0123456789" + SMUGGLED)),
]


async def _all_responses(port: int, data: bytes) -> list[RawResponse]:
    """Send ``data`` and collect every response until the proxy closes (keep-alive ends after
    client_timeout)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    responses = []
    try:
        for _ in range(5):
            responses.append(await read_response(reader, within=CLIENT_TIMEOUT * 10))
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        await close(writer)
    return responses


@pytest.mark.parametrize(("case", "data"), SMUGGLING, ids=[c[0] for c in SMUGGLING])
async def test_smuggled_requests_never_reach_the_instance(setup: Setup, http: aiohttp.ClientSession,
                                                          no_error_logs: None, case: str, data: bytes) -> None:
    """Either the proxy refuses the ambiguous message (400) or it frames it one way and answers
    every request it saw: the instance never parses a request the client got no answer for."""
    responses = await _all_responses(setup.port, data)
    assert responses, f"{case}: no answer at all"
    for resp in responses:
        assert resp.status < 500 or resp.status == 501, (case, resp.status, resp.body[:200])
        if resp.status >= 400:
            assert_json_error(resp, {400, 413, 501})
    answered = [r.json()["path"] for r in responses if r.status == 200]
    seen = setup.backend.paths()
    assert sorted(seen) == sorted(answered), (case, seen, answered)
    await assert_served(http, setup.port, case)


async def test_request_inside_a_chunked_body_stays_body(setup: Setup) -> None:
    """A complete request carried as chunk data reaches the instance as exactly one request whose
    body is those bytes: the proxy re-frames bodies, it never forwards the client's framing."""
    body = chunked(SMUGGLED[:10], SMUGGLED[10:]) + b""
    resp = await exchange(setup.port, request("POST", "/outer", [("Transfer-Encoding", "chunked")], body))
    assert resp.status == 200
    assert [(r.method, r.target, r.body) for r in setup.backend.requests] == [("POST", "/outer", SMUGGLED)]


async def test_request_inside_a_content_length_body_stays_body(setup: Setup) -> None:
    resp = await exchange(setup.port, request("POST", "/outer", body=SMUGGLED))
    assert resp.status == 200
    assert [(r.target, r.body) for r in setup.backend.requests] == [("/outer", SMUGGLED)]


async def test_get_with_a_body_that_looks_like_a_request(setup: Setup) -> None:
    """``Content-Length`` on a GET frames a body like on any method (never a second request)."""
    resp = await exchange(setup.port, request("GET", "/outer", [("Content-Length", str(len(SMUGGLED)))], SMUGGLED))
    assert resp.status == 200
    assert setup.backend.paths() == ["/outer"]
