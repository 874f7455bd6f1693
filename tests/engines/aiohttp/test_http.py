"""forward_http against real demo instances, through a real proxy app, with a real client."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
from multidict import CIMultiDict
from yarl import URL

from affinity_proxy.devtools.demo.backend import pattern_bytes
from affinity_proxy.engines.aiohttp.client import BodyTooLarge, UpstreamClient, UpstreamError
from tests.engines.aiohttp.conftest import Backend, ProxyFactory
from tests.support.waiting import wait_until

StartInstance = Callable[[str], Awaitable[Backend]]


def _no_errors_logged(caplog: pytest.LogCaptureFixture) -> None:
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [f"{r.name}: {r.getMessage()}" for r in errors]


async def _chunks(total: int, size: int = 10_000) -> AsyncIterator[bytes]:
    sent = 0
    while sent < total:
        n = min(size, total - sent)
        yield bytes([sent % 251]) * n
        sent += n


def _digest_of_chunks(total: int, size: int = 10_000) -> str:
    digest = hashlib.sha256()
    sent = 0
    while sent < total:
        n = min(size, total - sent)
        digest.update(bytes([sent % 251]) * n)
        sent += n
    return digest.hexdigest()


# --- headers, end to end ---------------------------------------------------------------------


async def test_request_headers_filtered_and_forwarded(backend: Backend, start_proxy: ProxyFactory, http) -> None:
    proxy = await start_proxy(backend.url)
    headers = [
        ("Connection", "keep-alive, X-Secret"),
        ("X-Secret", "hop"),
        ("Keep-Alive", "timeout=5"),
        ("Proxy-Authorization", "Basic Zm9vOmJhcg=="),
        ("TE", "trailers"),
        ("X-Forwarded-For", "203.0.113.7"),
        ("X-Forwarded-Proto", "gopher"),
        ("X-Multi", "1"),
        ("X-Multi", "2"),
        ("Fly-Force-Instance-Id", "b9"),
        ("Cookie", "a=1"),
    ]
    async with http.get(
        proxy.url + "/_control/headers",
        headers=CIMultiDict(headers),
        skip_auto_headers=("Accept", "Accept-Encoding", "User-Agent"),
    ) as resp:
        assert resp.status == 200
        got = await resp.json()
    seen = [(k.lower(), v) for k, v in got["headers"]]
    names = {k for k, _ in seen}
    assert not names & {"x-secret", "keep-alive", "proxy-authorization", "te", "fly-force-instance-id"}
    assert [v for k, v in seen if k == "x-multi"] == ["1", "2"]
    assert dict(seen)["x-forwarded-for"] == "203.0.113.7, 127.0.0.1"
    assert dict(seen)["x-forwarded-proto"] == "http"
    assert dict(seen)["host"] == f"127.0.0.1:{proxy.port}"  # the client's Host, not the instance's
    assert dict(seen)["x-forwarded-host"] == f"127.0.0.1:{proxy.port}"
    assert dict(seen)["x-request-id"] == "req-test-1"
    assert dict(seen)["cookie"] == "a=1"
    # nothing the proxy's client invented on the way (Accept-Encoding would get us gzip bodies)
    assert not names & {"accept", "accept-encoding", "user-agent", "content-type"}


async def test_response_hop_by_hop_dropped_and_set_cookies_kept(
    backend: Backend, start_proxy: ProxyFactory, http
) -> None:
    proxy = await start_proxy(backend.url)
    proxy.settings.extra = [("X-Fly-Instance", "b1"), ("Set-Cookie", "fly-instance-id=b1; Path=/")]
    query = [
        ("h", "Connection: X-Hop"),
        ("h", "X-Hop: secret"),
        ("h", "Proxy-Authenticate: Basic"),
        ("h", "X-Fly-Instance: spoofed"),
        ("h", "X-End: ok"),
        ("body", "hi"),
    ]
    async with http.get(proxy.url + "/_control/respond", params=query) as resp:
        assert resp.status == 200
        assert await resp.text() == "hi"
        assert resp.headers["X-End"] == "ok"
        assert "X-Hop" not in resp.headers and "Proxy-Authenticate" not in resp.headers
        assert resp.headers.getall("X-Fly-Instance") == ["b1"]
    async with http.get(proxy.url + "/set-cookie") as resp:
        cookies = resp.headers.getall("Set-Cookie")
        assert cookies == [
            "app_session=s1; Path=/",
            "app_theme=dark; HttpOnly; Path=/",
            "fly-instance-id=b1; Path=/",
        ]


async def test_unsafe_extra_header_is_never_emitted(
    backend: Backend, start_proxy: ProxyFactory, http, caplog: pytest.LogCaptureFixture
) -> None:
    proxy = await start_proxy(backend.url)
    proxy.settings.extra = [("X-Fly-Instance", "b1"), ("X-Bad", "x\r\nInjected: 1"), ("Bad\nName", "1")]
    async with http.get(proxy.url + "/") as resp:
        assert resp.status == 200
        assert "Injected" not in resp.headers and "X-Bad" not in resp.headers
        assert resp.headers["X-Fly-Instance"] == "b1"
    assert any("dropped unsafe" in r.getMessage() for r in caplog.records)


async def test_raw_path_and_query_pass_unchanged(backend: Backend, start_proxy: ProxyFactory, http) -> None:
    proxy = await start_proxy(backend.url)
    target = "/a%2Fb/c%20d;p=1?x=%20y+z&x=2&empty=&%E2%9C%93=1"
    async with http.get(URL(proxy.url + target, encoded=True)) as resp:
        doc = await resp.json()
    assert doc["raw_path"] == target


# --- bodies ----------------------------------------------------------------------------------


async def test_content_length_request_body_passes_with_its_length(
    backend: Backend, start_proxy: ProxyFactory, http
) -> None:
    proxy = await start_proxy(backend.url)
    body = bytes(range(256)) * 1000
    async with http.post(proxy.url + "/upload", data=body) as resp:
        doc = await resp.json()
    assert doc["bytes"] == len(body) and doc["sha256"] == hashlib.sha256(body).hexdigest()
    assert doc["content_length"] == str(len(body)) and doc["chunked"] is False


async def test_chunked_request_body_is_sent_chunked(backend: Backend, start_proxy: ProxyFactory, http) -> None:
    proxy = await start_proxy(backend.url)
    async with http.post(proxy.url + "/upload", data=_chunks(1_000_003)) as resp:
        doc = await resp.json()
    assert doc["bytes"] == 1_000_003 and doc["sha256"] == _digest_of_chunks(1_000_003)
    assert doc["content_length"] is None and doc["chunked"] is True


async def test_expect_100_continue_request(backend: Backend, start_proxy: ProxyFactory, http) -> None:
    proxy = await start_proxy(backend.url)
    async with http.post(proxy.url + "/upload", data=b"x" * 5000, expect100=True) as resp:
        assert (await resp.json())["bytes"] == 5000


async def test_request_without_body_sends_no_body(backend: Backend, start_proxy: ProxyFactory, http) -> None:
    proxy = await start_proxy(backend.url)
    async with http.get(proxy.url + "/_control/headers") as resp:
        names = {k.lower() for k, _ in (await resp.json())["headers"]}
    assert "content-length" not in names and "transfer-encoding" not in names


@pytest.mark.parametrize("with_length", [True, False])
async def test_streamed_response_keeps_content_length_or_is_chunked(
    backend: Backend, start_proxy: ProxyFactory, http, with_length: bool
) -> None:
    proxy = await start_proxy(backend.url)
    total = 300_001
    params = {"bytes": str(total), "length": "1" if with_length else "0"}
    async with http.get(proxy.url + "/stream", params=params) as resp:
        body = await resp.read()
        if with_length:
            assert resp.headers["Content-Length"] == str(total)
            assert "Transfer-Encoding" not in resp.headers
        else:
            assert "Content-Length" not in resp.headers
            assert resp.headers["Transfer-Encoding"] == "chunked"
    assert body == b"".join(pattern_bytes(total))


async def test_head_has_headers_but_no_body(backend: Backend, start_proxy: ProxyFactory, http) -> None:
    proxy = await start_proxy(backend.url)
    async with http.head(proxy.url + "/stream", params={"bytes": "1000", "length": "1"}) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Length"] == "1000"
        assert await resp.read() == b""
    async with http.get(proxy.url + "/") as resp:  # the connection is still usable
        assert resp.status == 200


@pytest.mark.parametrize("status", [204, 304])
async def test_no_body_statuses(backend: Backend, start_proxy: ProxyFactory, http, status: int) -> None:
    proxy = await start_proxy(backend.url)
    async with http.get(proxy.url + "/_control/respond", params={"status": str(status), "h": "ETag: x"}) as resp:
        assert resp.status == status
        assert resp.headers["ETag"] == "x"
        assert "Transfer-Encoding" not in resp.headers
        assert await resp.read() == b""
    async with http.get(proxy.url + "/") as resp:
        assert resp.status == 200


# --- limits ----------------------------------------------------------------------------------


async def test_declared_oversize_is_413_before_contacting_the_instance(
    dead_url: str, start_proxy: ProxyFactory, http
) -> None:
    proxy = await start_proxy(dead_url, max_body_bytes=1000)  # a connect attempt would fail loudly
    async with http.post(proxy.url + "/upload", data=b"z" * 2000) as resp:
        assert resp.status == 413
        assert (await resp.json())["error"] == "body_too_large"
    [error] = proxy.settings.errors
    assert isinstance(error, BodyTooLarge)
    assert (error.declared, error.limit, error.status) == (2000, 1000, 413)


async def test_chunked_oversize_is_413(backend: Backend, start_proxy: ProxyFactory, http) -> None:
    proxy = await start_proxy(backend.url, max_body_bytes=50_000)
    async with http.post(proxy.url + "/upload", data=_chunks(200_000)) as resp:
        assert resp.status == 413
    [error] = proxy.settings.errors
    assert isinstance(error, BodyTooLarge) and error.declared is None
    async with http.post(proxy.url + "/upload", data=_chunks(50_000)) as resp:  # at the limit is fine
        assert (await resp.json())["bytes"] == 50_000


# --- upstream failures -----------------------------------------------------------------------


async def test_connect_refused_is_retryable_and_consumes_nothing(
    dead_url: str, backend: Backend, start_proxy: ProxyFactory, http
) -> None:
    proxy = await start_proxy(dead_url)
    async with http.post(proxy.url + "/upload", data=b"y" * 100) as resp:
        assert resp.status == 502
        assert (await resp.json())["error"] == "upstream_connect"
    [error] = proxy.settings.errors
    assert isinstance(error, UpstreamError)
    assert (error.kind, error.retryable, error.status, error.response_started) == ("connect", True, 502, False)

    # retryable means the body is untouched: the same request succeeds on another instance
    proxy.settings.fallback = backend.url
    async with http.post(proxy.url + "/upload", data=_chunks(300_000)) as resp:
        doc = await resp.json()
    assert doc["bytes"] == 300_000 and doc["sha256"] == _digest_of_chunks(300_000)
    assert [e.kind for e in proxy.settings.errors if isinstance(e, UpstreamError)] == ["connect", "connect"]


async def test_unresolvable_host_is_connect_error(start_proxy: ProxyFactory, http) -> None:
    proxy = await start_proxy("http://no-such-instance.invalid:8080")
    async with http.get(proxy.url + "/") as resp:
        assert resp.status == 502
    [error] = proxy.settings.errors
    assert isinstance(error, UpstreamError) and error.kind == "connect" and error.retryable


async def test_read_timeout_before_headers_is_504(backend: Backend, start_proxy: ProxyFactory, http) -> None:
    proxy = await start_proxy(backend.url, read_timeout=0.2)
    async with http.get(proxy.url + "/slow", params={"delay": "1.0"}) as resp:
        assert resp.status == 504
        assert (await resp.json())["error"] == "upstream_timeout"
    [error] = proxy.settings.errors
    assert isinstance(error, UpstreamError)
    assert (error.kind, error.retryable, error.status) == ("timeout", False, 504)


@pytest.mark.parametrize("with_length", [True, False])
async def test_instance_dying_mid_body_breaks_the_client_response(
    backend: Backend, start_proxy: ProxyFactory, http, caplog: pytest.LogCaptureFixture, with_length: bool
) -> None:
    proxy = await start_proxy(backend.url)
    params = {"bytes": str(2_000_000), "die_after": str(256 * 1024), "length": "1" if with_length else "0"}
    async with http.get(proxy.url + "/stream", params=params) as resp:
        assert resp.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()
    await wait_until(lambda: proxy.settings.errors, message="the proxy saw the failure")
    [error] = proxy.settings.errors
    assert isinstance(error, UpstreamError)
    assert error.response_started and not error.retryable and error.kind == "protocol"
    assert any(r.levelno == logging.WARNING and "mid-response" in r.getMessage() for r in caplog.records)
    _no_errors_logged(caplog)
    async with http.get(proxy.url + "/") as resp:  # the proxy and its pool are fine afterwards
        assert resp.status == 200


async def test_client_leaving_mid_stream_closes_the_upstream_quietly(
    backend: Backend, start_proxy: ProxyFactory, caplog: pytest.LogCaptureFixture
) -> None:
    proxy = await start_proxy(backend.url)
    async with aiohttp.ClientSession() as client:
        resp = await client.get(proxy.url + "/stream", params={"bytes": str(64 * 1024 * 1024)})
        assert resp.status == 200
        await resp.content.readexactly(256 * 1024)
        resp.close()  # drop the connection with most of the body unread
    await wait_until(lambda: backend.state.stream_results == ["aborted"], message="instance saw the abort")
    await wait_until(lambda: proxy.settings.completed == 1)
    assert proxy.settings.errors == []
    _no_errors_logged(caplog)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("affinity_proxy")]


# --- connection reuse ------------------------------------------------------------------------


async def test_sequential_requests_reuse_one_upstream_connection(
    backend: Backend, start_proxy: ProxyFactory, http
) -> None:
    proxy = await start_proxy(backend.url)
    ports = set()
    for i in range(40):
        async with http.post(proxy.url + "/echo", data=b"p" * i) if i % 2 else http.get(proxy.url + "/") as resp:
            ports.add((await resp.json())["peer_port"])
    assert len(ports) <= 2, ports


async def test_concurrent_requests_stay_within_the_connector_limit(
    backend: Backend, start_proxy: ProxyFactory, http
) -> None:
    proxy = await start_proxy(backend.url, limit=4)

    async def one() -> int:
        async with http.get(proxy.url + "/slow", params={"delay": "0.02"}) as resp:
            return int((await resp.json())["peer_port"])

    ports: set[int] = set()
    for _ in range(6):
        ports.update(await asyncio.gather(*(one() for _ in range(10))))
    assert len(ports) <= 4, ports


# --- the client object -----------------------------------------------------------------------


async def test_upstream_client_lifecycle() -> None:
    client = UpstreamClient(connect_timeout=1.0, read_timeout=1.0)
    with pytest.raises(RuntimeError):
        _ = client.session
    async with client:
        session = client.session
        assert session.connector is not None and session.connector.limit == 1000
        assert isinstance(session.cookie_jar, aiohttp.DummyCookieJar)
        await client.start()  # idempotent
        assert client.session is session
    with pytest.raises(RuntimeError):
        _ = client.session
    assert session.closed
    await client.close()  # idempotent


async def test_client_aborting_mid_upload_is_quiet(
    backend: Backend, start_proxy: ProxyFactory, caplog: pytest.LogCaptureFixture
) -> None:
    proxy = await start_proxy(backend.url)
    _, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"POST /upload HTTP/1.1\r\nHost: proxy\r\nContent-Length: 1000000\r\n\r\n" + b"u" * 100_000)
    await writer.drain()
    await wait_until(lambda: backend.state.uploads_started == 1, message="body streaming to the instance")
    writer.transport.abort()  # the client vanishes with 900 kB still owed
    await wait_until(lambda: proxy.settings.completed == 1, message="forward_http returned")
    assert proxy.settings.errors == []
    _no_errors_logged(caplog)
