"""The fast engine on the wire: strict framing (no request smuggling), pipelining, keep-alive and
the hand-off to aiohttp, with raw sockets against a real proxy and real demo backends."""

from __future__ import annotations

import pytest

from affinity_proxy.config import LimitsConfig
from affinity_proxy.devtools.demo.backend import BACKEND_STATE
from tests.engines.fast.raw import RawResponse, exchange
from tests.support.backends import Backends, make_config

HOST = b"Host: proxy.test\r\n"


def served(backends: Backends) -> int:
    """Requests that reached any backend's handlers (health checks excluded)."""
    return sum(runner.app[BACKEND_STATE].count + runner.app[BACKEND_STATE].uploads_started
               for runner in backends.runners.values())


def assert_malformed(resp: RawResponse, status: int = 400) -> None:
    assert resp.status == status, (resp.status, resp.body)
    assert resp.get("Content-Type") == "application/json"
    doc = resp.json()
    assert doc["status"] == status and isinstance(doc["error"], str) and isinstance(doc["message"], str)


SMUGGLING = [
    ("CL and TE", b"POST / HTTP/1.1\r\n" + HOST + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"0\r\n\r\nGET /smuggled HTTP/1.1\r\n" + HOST + b"\r\n"),
    ("TE and CL", b"POST / HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n"
     b"0\r\n\r\n"),
    ("duplicate CL", b"POST / HTTP/1.1\r\n" + HOST + b"Content-Length: 3\r\nContent-Length: 3\r\n\r\nabc"),
    ("differing CL", b"POST / HTTP/1.1\r\n" + HOST + b"Content-Length: 3\r\nContent-Length: 30\r\n\r\nabc"),
    ("CL list", b"POST / HTTP/1.1\r\n" + HOST + b"Content-Length: 3, 3\r\n\r\nabc"),
    ("signed CL", b"POST / HTTP/1.1\r\n" + HOST + b"Content-Length: +3\r\n\r\nabc"),
    ("space before colon", b"GET / HTTP/1.1\r\n" + HOST + b"Content-Length : 0\r\n\r\n"),
    ("control char in name", b"GET / HTTP/1.1\r\n" + HOST + b"X-A\x01b: 1\r\n\r\n"),
    ("NUL in value", b"GET / HTTP/1.1\r\n" + HOST + b"X-A: a\x00b\r\n\r\n"),
    ("obs-fold", b"GET / HTTP/1.1\r\n" + HOST + b"X-A: a\r\n folded\r\n\r\n"),
    ("bare LF", b"GET / HTTP/1.1\nHost: proxy.test\n\n"),
    ("LF inside head", b"GET / HTTP/1.1\r\nHost: proxy.test\nX-A: 1\r\n\r\n"),
    ("no Host on 1.1", b"GET / HTTP/1.1\r\nX-A: 1\r\n\r\n"),
    ("two Hosts", b"GET / HTTP/1.1\r\n" + HOST + b"Host: other.test\r\n\r\n"),
    ("space in target", b"GET /a b HTTP/1.1\r\n" + HOST + b"\r\n"),
    ("invalid method", b"G@T / HTTP/1.1\r\n" + HOST + b"\r\n"),
]


@pytest.mark.parametrize(("case", "data"), SMUGGLING, ids=[c[0] for c in SMUGGLING])
async def test_ambiguous_or_malformed_heads_get_json_400_and_reach_no_instance(
    backends, start_proxy, case: str, data: bytes,
) -> None:
    server = await start_proxy(make_config(backends))
    result = await exchange(server.main_port, data)
    assert len(result.responses) == 1, result
    assert_malformed(result.responses[0])
    assert result.closed, "a malformed request ends the connection"
    assert served(backends) == 0


#: Bodies framed by a coding other than exactly ``chunked``: nginx's 501, connection closed (the
#: body's end cannot be found). ``chunked, chunked`` (or the header twice) is not ``chunked`` either.
UNSUPPORTED_CODINGS = [
    ("TE not chunked", b"POST / HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: gzip\r\n\r\nabc"),
    ("chunked not last", b"POST / HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n"),
    ("gzip then chunked", b"POST / HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n"),
    ("TE twice", b"POST / HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"0\r\n\r\n"),
]


@pytest.mark.parametrize(("case", "data"), UNSUPPORTED_CODINGS, ids=[c[0] for c in UNSUPPORTED_CODINGS])
async def test_codings_other_than_chunked_get_json_501_and_reach_no_instance(
    backends, start_proxy, case: str, data: bytes,
) -> None:
    server = await start_proxy(make_config(backends))
    result = await exchange(server.main_port, data)
    assert len(result.responses) == 1, result
    assert_malformed(result.responses[0], 501)
    assert result.closed, "the body cannot be framed: the connection ends"
    assert served(backends) == 0


BAD_CHUNKS = [
    ("non-hex size", b"zz\r\nab\r\n0\r\n\r\n"),
    ("negative size", b"-2\r\nab\r\n0\r\n\r\n"),
    ("space after size", b"2 \r\nab\r\n0\r\n\r\n"),
    ("size overflow", b"fffffffffffffffff\r\nab\r\n0\r\n\r\n"),
    ("data longer than size", b"2\r\nabc\r\n0\r\n\r\n"),
    ("missing CRLF after data", b"2\r\nabXY0\r\n\r\n"),
]


@pytest.mark.parametrize(("case", "body"), BAD_CHUNKS, ids=[c[0] for c in BAD_CHUNKS])
async def test_invalid_chunks_get_400_and_end_the_connection(backends, start_proxy, case: str, body: bytes) -> None:
    server = await start_proxy(make_config(backends))
    head = b"POST /upload HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n\r\n"
    result = await exchange(server.main_port, [head, body], pause=0.05)
    assert result.closed
    assert result.responses, "an answer before the close"
    assert_malformed(result.responses[0])


async def test_header_block_over_the_raw_limit_is_431(backends, start_proxy) -> None:
    server = await start_proxy(make_config(backends, limits=LimitsConfig(max_header_bytes=2048)))
    huge = b"GET / HTTP/1.1\r\n" + HOST + b"X-Big: " + b"a" * 20000 + b"\r\n\r\n"
    result = await exchange(server.main_port, huge)
    assert_malformed(result.responses[0], 431)
    assert result.closed and served(backends) == 0


async def test_header_block_over_max_header_bytes_is_431_from_the_preflight(backends, start_proxy) -> None:
    server = await start_proxy(make_config(backends, limits=LimitsConfig(max_header_bytes=2048)))
    data = b"GET / HTTP/1.1\r\n" + HOST + b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 100) for i in range(30)) + b"\r\n"
    result = await exchange(server.main_port, data, expect=1)
    assert_malformed(result.responses[0], 431)
    assert served(backends) == 0


async def test_pipelined_requests_are_answered_in_order_on_one_connection(backends, start_proxy) -> None:
    server = await start_proxy(make_config(backends))
    pipeline = (
        b"GET /one HTTP/1.1\r\n" + HOST + b"X-User-Id: pipe\r\n\r\n"
        b"POST /upload HTTP/1.1\r\n" + HOST + b"X-User-Id: pipe\r\nContent-Length: 5\r\n\r\nhello"
        b"\r\n"  # an empty line between requests is ignored (RFC 9112 2.2)
        b"POST /upload HTTP/1.1\r\n" + HOST + b"X-User-Id: pipe\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nX-Trailer: t\r\n\r\n"
        b"GET /two?x=1 HTTP/1.1\r\n" + HOST + b"X-User-Id: pipe\r\n\r\n"
        b"GET /_affinity/health HTTP/1.1\r\n" + HOST + b"\r\n"
        b"GET /three HTTP/1.1\r\n" + HOST + b"X-User-Id: pipe\r\nConnection: close\r\n\r\n"
    )
    result = await exchange(server.main_port, pipeline)
    one, up1, up2, two, health, three = result.responses
    assert one.json()["path"] == "/one"
    assert (up1.json()["bytes"], up1.json()["chunked"]) == (5, False)
    assert (up2.json()["bytes"], up2.json()["chunked"]) == (5, True)
    assert two.json()["raw_path"] == "/two?x=1"
    assert health.status == 200 and "status" in health.json(), "handed to aiohttp mid-pipeline"
    assert three.json()["path"] == "/three"
    assert {r.json()["instance"] for r in (one, up1, up2, two, three)} == {one.json()["instance"]}
    assert result.closed and result.rest == b""


async def test_pipelined_requests_split_at_every_byte_boundary(backends, start_proxy) -> None:
    server = await start_proxy(make_config(backends))
    pipeline = (
        b"POST /upload HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\n\r\n"
        b"GET /after HTTP/1.1\r\n" + HOST + b"Connection: close\r\n\r\n"
    )
    pieces = [pipeline[i:i + 1] for i in range(len(pipeline))]
    result = await exchange(server.main_port, pieces)
    upload, after = result.responses
    assert upload.json()["bytes"] == 1 and after.json()["path"] == "/after"


async def test_keep_alive_http10_and_close(backends, start_proxy) -> None:
    server = await start_proxy(make_config(backends))
    result = await exchange(server.main_port, b"GET /a HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", expect=1)
    (resp,) = result.responses
    assert resp.version == "HTTP/1.0" and resp.get("Connection") == "keep-alive"
    assert resp.json()["headers"]["host"] == f"127.0.0.1:{backends.ports[resp.json()['instance']]}"
    result = await exchange(server.main_port, b"GET /b HTTP/1.0\r\n\r\n")
    assert result.closed and result.responses[0].get("Connection") == "close"


async def test_expect_100_continue_is_answered_before_the_body(backends, start_proxy) -> None:
    server = await start_proxy(make_config(backends))
    head = b"POST /upload HTTP/1.1\r\n" + HOST + b"Expect: 100-continue\r\nContent-Length: 4\r\n\r\n"
    result = await exchange(server.main_port, [head, b"data"], expect=1, pause=0.1)
    (resp,) = result.responses
    assert resp.interim == [100]
    assert resp.json()["bytes"] == 4


async def test_other_expectations_are_refused_by_the_aiohttp_preflight(backends, start_proxy) -> None:
    server = await start_proxy(make_config(backends))
    data = b"POST /upload HTTP/1.1\r\n" + HOST + b"Expect: something\r\nContent-Length: 4\r\n\r\ndata"
    result = await exchange(server.main_port, data, expect=1)
    assert_malformed(result.responses[0], 417)
    assert served(backends) == 0


async def test_declared_body_over_the_limit_is_413_without_contacting_an_instance(backends, start_proxy) -> None:
    server = await start_proxy(make_config(backends, limits=LimitsConfig(max_body_bytes=10)))
    data = b"POST /upload HTTP/1.1\r\n" + HOST + b"Content-Length: 11\r\n\r\nhello world"
    result = await exchange(server.main_port, data, expect=1)
    assert_malformed(result.responses[0], 413)
    assert served(backends) == 0


async def test_unsupported_versions_and_targets_are_left_to_aiohttp(backends, start_proxy) -> None:
    server = await start_proxy(make_config(backends))
    for data in (b"GET / HTTP/0.9\r\n" + HOST + b"\r\n", b"CONNECT example.com:443 HTTP/1.1\r\n" + HOST + b"\r\n"):
        result = await exchange(server.main_port, data, expect=1)
        assert result.responses[0].status in (400, 405), result.responses[0]
    result = await exchange(server.main_port, b"GET http://elsewhere.test/x HTTP/1.1\r\n" + HOST + b"\r\n", expect=1)
    assert result.responses[0].status < 500
    assert served(backends) <= 1


async def test_answers_of_the_proxy_to_head_requests_carry_no_body(backends, start_proxy) -> None:
    """An error answered by the proxy itself (here 503 then 502) to a HEAD request announces its
    body's length but sends none: a pipelined request after it is still framed right."""
    server = await start_proxy(make_config(backends, instances=backends.instance_configs(["a"])))
    await backends.stop("a")
    head = b"HEAD / HTTP/1.1\r\n" + HOST + b"\r\n"
    get = b"GET / HTTP/1.1\r\n" + HOST + b"\r\n"
    result = await exchange(server.main_port, head + get, expect=2, head_requests={0})
    assert len(result.responses) == 2 and not result.rest
    first, second = result.responses
    assert first.status == second.status and first.status in (502, 503)
    assert first.body == b"" and first.get("Content-Length") == str(len(second.body))
    assert second.json()["status"] == second.status
