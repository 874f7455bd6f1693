"""Forwarding semantics of the fast engine, end to end: what crosses the proxy both ways, framing
of bodies, keep-alive reuse, failures mid-stream and the limits. Mirrors ``tests/engines/aiohttp``
(which drives ``forward_http`` directly) against a real proxy on ``engine: fast``."""

from __future__ import annotations

import asyncio
import hashlib
import logging

import aiohttp
import pytest
from multidict import CIMultiDict
from yarl import URL

from affinity_proxy.config import LimitsConfig
from affinity_proxy.devtools.demo.backend import BACKEND_STATE, PATTERN_CHUNK
from tests.engines.fast.raw import exchange
from tests.functional.helpers import base, metric_value
from tests.support.backends import make_config
from tests.support.waiting import wait_until


async def one_instance(backends, start_proxy, **overrides):  # type: ignore[no-untyped-def]
    """A proxy over instance ``a`` only, so every request lands on it."""
    return await start_proxy(make_config(backends, instances=backends.instance_configs(["a"]), **overrides))


async def test_request_headers_filtered_and_forwarded(backends, start_proxy, http) -> None:
    server = await one_instance(backends, start_proxy)
    headers = CIMultiDict([
        ("Connection", "keep-alive, X-Secret"), ("X-Secret", "hop"), ("Keep-Alive", "timeout=5"),
        ("Proxy-Authorization", "Basic Zm9vOmJhcg=="), ("TE", "trailers"), ("X-Forwarded-For", "203.0.113.7"),
        ("X-Forwarded-For", "198.51.100.1"), ("X-Forwarded-Proto", "gopher"), ("X-Forwarded-Host", "evil.test"),
        ("X-Multi", "1"), ("X-Multi", "2"), ("Fly-Force-Instance-Id", "b9"), ("Cookie", "a=1"),
        ("X-Request-Id", "req-test-1"),
    ])
    async with http.get(base(server) + "/_control/headers", headers=headers,
                        skip_auto_headers=("Accept", "Accept-Encoding", "User-Agent")) as resp:
        assert resp.status == 200
        seen = [(k.lower(), v) for k, v in (await resp.json())["headers"]]
    names = {k for k, _ in seen}
    assert not names & {"x-secret", "keep-alive", "proxy-authorization", "te", "fly-force-instance-id", "connection"}
    assert [v for k, v in seen if k == "x-multi"] == ["1", "2"]
    got = dict(seen)
    assert got["x-forwarded-for"] == "203.0.113.7, 198.51.100.1, 127.0.0.1"
    assert got["x-forwarded-proto"] == "http"
    assert got["host"] == got["x-forwarded-host"] == f"127.0.0.1:{server.main_port}"
    assert got["x-request-id"] == "req-test-1" and got["cookie"] == "a=1"
    assert not names & {"accept", "accept-encoding", "user-agent", "content-type", "content-length"}


async def test_request_id_is_generated_once_per_request(backends, start_proxy, http) -> None:
    server = await one_instance(backends, start_proxy)
    ids = set()
    for _ in range(3):
        async with http.get(base(server) + "/") as resp:
            ids.add((await resp.json())["headers"]["x-request-id"])
    assert len(ids) == 3 and all(len(i) >= 16 for i in ids)
    async with http.get(base(server) + "/", headers={"Fly-Request-Id": "fly-abc"}) as resp:
        assert (await resp.json())["headers"]["x-request-id"] == "fly-abc"


async def test_response_hop_by_hop_dropped_and_set_cookies_kept(backends, start_proxy, http) -> None:
    server = await one_instance(backends, start_proxy)
    query = [("h", "Connection: X-Hop"), ("h", "X-Hop: secret"), ("h", "Proxy-Authenticate: Basic"),
             ("h", "Keep-Alive: timeout=1"), ("h", "X-Fly-Instance: spoofed"), ("h", "X-End: ok"), ("body", "hi")]
    async with http.get(base(server) + "/_control/respond", params=query) as resp:
        assert resp.status == 200 and await resp.text() == "hi"
        assert resp.headers["X-End"] == "ok"
        assert not {"X-Hop", "Proxy-Authenticate", "Keep-Alive"} & set(resp.headers)
        assert resp.headers.getall("X-Fly-Instance") == ["a"]
    async with http.get(base(server) + "/set-cookie") as resp:
        cookies = resp.headers.getall("Set-Cookie")
    assert cookies[:2] == ["app_session=s1; Path=/", "app_theme=dark; HttpOnly; Path=/"]
    assert len(cookies) == 3 and cookies[2].startswith("fly-instance-id=")


async def test_raw_path_and_query_pass_unchanged(backends, start_proxy, http) -> None:
    server = await one_instance(backends, start_proxy)
    target = "/a%2Fb/c%20d;p=1?x=%20y+z&x=2&empty=&%E2%9C%93=1"
    async with http.get(URL(base(server) + target, encoded=True)) as resp:
        assert (await resp.json())["raw_path"] == target


@pytest.mark.parametrize("chunked", [False, True])
async def test_request_bodies_stream_with_their_framing(backends, start_proxy, http, chunked: bool) -> None:
    server = await one_instance(backends, start_proxy)
    payload = bytes(range(256)) * 4096  # 1 MiB

    async def pieces():  # type: ignore[no-untyped-def]
        for i in range(0, len(payload), 100_000):
            yield payload[i:i + 100_000]

    async with http.post(base(server) + "/upload", data=pieces() if chunked else payload) as resp:
        doc = await resp.json()
    assert doc["bytes"] == len(payload) and doc["sha256"] == hashlib.sha256(payload).hexdigest()
    assert doc["chunked"] is chunked and doc["content_length"] == (None if chunked else str(len(payload)))


@pytest.mark.parametrize("with_length", [True, False])
async def test_responses_keep_their_length_or_are_chunked(backends, start_proxy, with_length: bool) -> None:
    server = await one_instance(backends, start_proxy)
    size = 300_000
    path = f"/stream?bytes={size}&length={1 if with_length else 0}".encode()
    data = b"GET " + path + b" HTTP/1.1\r\nHost: p\r\n\r\nGET " + path + b" HTTP/1.0\r\nHost: p\r\n\r\n"
    result = await exchange(server.main_port, data)
    first, second = result.responses
    expected = (PATTERN_CHUNK * 5)[:size]
    assert first.body == second.body == expected
    assert (first.get("Content-Length") is not None) is with_length
    assert (first.get("Transfer-Encoding") == "chunked") is not with_length
    assert second.get("Transfer-Encoding") is None, "HTTP/1.0 clients never get chunked"
    assert result.closed


async def test_head_and_bodiless_statuses(backends, start_proxy) -> None:
    server = await one_instance(backends, start_proxy)
    data = (b"HEAD /stream?bytes=5000&length=1 HTTP/1.1\r\nHost: p\r\n\r\n"
            b"GET /_control/respond?status=204 HTTP/1.1\r\nHost: p\r\n\r\n"
            b"GET /_control/respond?status=304 HTTP/1.1\r\nHost: p\r\n\r\n"
            b"HEAD / HTTP/1.1\r\nHost: p\r\n\r\n"
            b"GET /after HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n")
    result = await exchange(server.main_port, data, head_requests={0, 3})
    head, no_content, not_modified, head2, after = result.responses
    assert head.status == 200 and head.get("Content-Length") == "5000" and head.body == b""
    assert (no_content.status, not_modified.status) == (204, 304)
    assert head2.status == 200 and head2.body == b""
    assert after.json()["path"] == "/after", "the connection and the pool survived the body-less answers"


async def test_sequential_requests_reuse_one_upstream_connection(backends, start_proxy, http) -> None:
    server = await one_instance(backends, start_proxy)
    ports = set()
    for i in range(40):
        async with http.post(base(server) + "/echo", data=b"p" * i) if i % 2 else http.get(base(server) + "/") as resp:
            ports.add((await resp.json())["peer_port"])
    assert len(ports) <= 2, ports


async def test_instance_restart_between_requests_is_invisible_for_gets(backends, start_proxy, http) -> None:
    server = await one_instance(backends, start_proxy)
    async with http.get(base(server) + "/") as resp:
        assert resp.status == 200  # a pooled keep-alive connection now exists
    port = backends.ports["a"]
    await backends.stop("a")
    await backends.start("a", port=port)
    async with http.get(base(server) + "/again") as resp:
        assert resp.status == 200 and (await resp.json())["path"] == "/again"


@pytest.mark.parametrize("with_length", [True, False])
async def test_instance_dying_mid_body_breaks_the_client_response(
    backends, start_proxy, http, caplog: pytest.LogCaptureFixture, with_length: bool,
) -> None:
    server = await one_instance(backends, start_proxy)
    params = {"bytes": str(2_000_000), "die_after": str(256 * 1024), "length": "1" if with_length else "0"}
    async with http.get(base(server) + "/stream", params=params) as resp:
        assert resp.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()
    await wait_until(lambda: any("mid-response" in r.getMessage() for r in caplog.records), timeout=5)
    metrics = await (await http.get(f"http://127.0.0.1:{server.admin_port}/metrics")).text()
    assert metric_value(metrics, "affinity_upstream_errors_total", {"instance": "a", "kind": "protocol"}) == 1
    async with http.get(base(server) + "/") as resp:
        assert resp.status == 200


async def test_client_leaving_mid_stream_closes_the_upstream(backends, start_proxy, caplog) -> None:
    server = await one_instance(backends, start_proxy)
    state = backends.runners["a"].app[BACKEND_STATE]
    async with aiohttp.ClientSession() as client:
        resp = await client.get(base(server) + "/stream", params={"bytes": str(64 * 1024 * 1024)})
        assert resp.status == 200
        await resp.content.readexactly(256 * 1024)
        resp.close()
    await wait_until(lambda: state.stream_results == ["aborted"], timeout=10, message="instance saw the abort")
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_chunked_body_over_the_limit_is_413_and_closes(backends, start_proxy, http) -> None:
    server = await one_instance(backends, start_proxy, limits=LimitsConfig(max_body_bytes=1000))

    async def chunks():  # type: ignore[no-untyped-def]
        for _ in range(10):
            yield b"q" * 500
            await asyncio.sleep(0)

    async with http.post(base(server) + "/upload", data=chunks()) as resp:
        assert resp.status == 413 and (await resp.json())["error"] == "body_too_large"
    async with http.get(base(server) + "/") as resp:
        assert resp.status == 200


async def test_early_answer_before_the_body_ends(backends, start_proxy) -> None:
    """The instance answers a POST without reading its body: the client gets the answer, the
    rest of the body is read and dropped, and the next request on the connection works."""
    server = await one_instance(backends, start_proxy)
    head = b"POST /_control/respond?status=401 HTTP/1.1\r\nHost: p\r\nContent-Length: 200000\r\n\r\n"
    result = await exchange(server.main_port, [head, b"x" * 100_000, b"x" * 100_000,
                                               b"GET /next HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n"],
                            pause=0.05)
    assert [r.status for r in result.responses] == [401, 200], result
    assert result.responses[1].json()["path"] == "/next"


async def test_upstream_read_timeout_is_504(backends, start_proxy, http) -> None:
    limits = LimitsConfig(upstream_timeout=0.3, upstream_connect_timeout=1.0)
    server = await one_instance(backends, start_proxy, limits=limits)
    async with http.get(base(server) + "/slow?delay=3") as resp:
        assert resp.status == 504 and (await resp.json())["error"] == "upstream_timeout"
    async with http.get(base(server) + "/") as resp:
        assert resp.status == 200


async def test_shutdown_lets_a_request_in_flight_finish(backends, start_proxy, http) -> None:
    server = await one_instance(backends, start_proxy)
    request = asyncio.ensure_future(http.get(base(server) + "/slow?delay=0.5"))
    await wait_until(lambda: any(c.ex is not None for c in server._fast.connections), timeout=5)
    await server.stop()
    resp = await request
    assert resp.status == 200 and (await resp.json())["path"] == "/slow"
    resp.release()
