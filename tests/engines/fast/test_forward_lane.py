"""The forward lane (``fast.forward_lane``): repeats of a pinned request forwarded without routing.

A proxy over the three demo backends; a user whose fresh affinity cookie names ``b`` sends
byte-identical request heads on keep-alive connections (one at a time, and pipelined), so the lane
is warm, and the tests check what must still hold: every request reaches ``b`` with the head the
full path sends (a fresh request id each, the peer's X-Forwarded-For), every request and response
is counted once, and the lane gives way to the full path (or to the full exchange it stands for)
when the membership changes, the cookie needs revalidation, the access log is on, the response
needs llhttp, the instance is gone or the client leaves.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from affinity_proxy.config import load_config
from affinity_proxy.engines.fast import FastServer
from affinity_proxy.engines.fast.forward_lane import ForwardLane, MintLane
from affinity_proxy.routing.cookie import AffinityCookie, CookieCodec
from affinity_proxy.routing.model import InstanceId
from affinity_proxy.serve.app import ProxyServer
from tests.engines.fast.raw import Client, RawResponse, exchange
from tests.functional.helpers import COOKIE, metric_value
from tests.functional.test_reload import write_config
from tests.support.backends import Backends, make_config
from tests.support.waiting import wait_until

USER = "lane-user"
SECRET = "test-secret-" + "x" * 20  # ``make_config``'s


def fast(server: ProxyServer) -> FastServer:
    found = server._fast
    assert found is not None
    return found


def request(instance: str = "b", *, path: str = "/page", issued_at: int | None = None, method: str = "GET",
            extra: bytes = b"") -> bytes:
    codec = CookieCodec(SECRET)
    value = codec.encode(InstanceId(instance), int(time.time()) if issued_at is None else issued_at,
                         codec.user_digest(USER))
    return (f"{method} {path} HTTP/1.1\r\nHost: app.example\r\nCookie: {COOKIE}={value}\r\n"
            f"X-User-Id: {USER}\r\n").encode() + extra + b"\r\n"


def lanes(server: ProxyServer, kind: type = ForwardLane) -> int:
    """How many cached request heads carry a lane of ``kind`` (white-box: proves the lane was taken)."""
    return sum(isinstance(head.lane, kind) for head in fast(server).heads._heads.values())


async def metrics(server: ProxyServer) -> str:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{server.admin_port}/metrics") as resp:
            return await resp.text()


def echoed(resp: RawResponse) -> dict[str, Any]:
    assert resp.status == 200, (resp.status, resp.body[:200])
    body: dict[str, Any] = resp.json()
    return body


async def warm(server: ProxyServer, data: bytes) -> Client:
    """A keep-alive connection that sent ``data`` three times, each answered by ``b``: the first
    makes the hot route, the second memoizes its forward, the third forwards from the memo and
    leaves the lane on the head."""
    client = await Client.open(server.main_port)
    for _ in range(3):
        assert echoed(await client.send(data))["instance"] == "b"
    assert lanes(server) == 1
    return client


@pytest.fixture
async def proxy(backends: Backends, start_proxy: Any) -> ProxyServer:
    server: ProxyServer = await start_proxy(make_config(backends, engine="fast"))
    return server


async def test_repeats_are_forwarded_and_counted_exactly(proxy: ProxyServer) -> None:
    data = request()
    client = await Client.open(proxy.main_port)
    answers = [await client.send(data) for _ in range(30)]
    await client.close()
    assert lanes(proxy) == 1
    pipelined = await exchange(proxy.main_port, data * 30, expect=30)
    answers += pipelined.responses
    assert len(answers) == 60 and not pipelined.rest
    ids = set()
    for resp in answers:
        body = echoed(resp)
        assert body["instance"] == "b" and body["path"] == "/page"
        assert resp.get("X-Fly-Instance") == "b" and resp.get("Set-Cookie") is None
        assert body["headers"]["x-forwarded-for"] == "127.0.0.1"
        ids.add(body["headers"]["x-request-id"])
    assert len(ids) == 60  # a fresh request id for every request, lane or not
    text = await metrics(proxy)
    assert metric_value(text, "affinity_requests_total", {"action": "forward", "reason": "cookie"}) == 60
    assert metric_value(text, "affinity_responses_total", {"code": "200"}) == 60
    assert metric_value(text, "affinity_upstream_request_duration_seconds_count", {"instance": "b"}) == 60
    assert proxy.ctx.events.snapshot()["totals"]["requests"] == 60
    assert not fast(proxy).pool.active  # every connection went back to the pool


async def test_the_lane_sends_what_the_full_path_sends(proxy: ProxyServer) -> None:
    """The instance sees the same header block from the lane as from the full path (request id aside)."""
    data = request(path="/_control/headers")
    client = await Client.open(proxy.main_port)
    seen = [echoed(await client.send(data))["headers"] for _ in range(5)]
    await client.close()
    assert lanes(proxy) == 1
    without_id = [[(k, v) for k, v in headers if k.lower() != "x-request-id"] for headers in seen]
    assert all(block == without_id[0] for block in without_id)
    # the client's own sane X-Request-Id is kept, by the lane too
    data = request(path="/_control/headers", extra=b"X-Request-Id: client-id-1\r\n")
    client = await Client.open(proxy.main_port)
    seen = [echoed(await client.send(data))["headers"] for _ in range(4)]
    await client.close()
    assert lanes(proxy) == 2
    assert [[v for k, v in h if k.lower() == "x-request-id"] for h in seen] == [["client-id-1"]] * 4, seen


async def test_another_peer_gets_its_own_forwarded_for(proxy: ProxyServer) -> None:
    """The upstream head's added lines depend on the peer: a lane built for 127.0.0.1 is not used
    for 127.0.0.2 (the full path answers, with that peer's X-Forwarded-For)."""
    data = request()
    one = await Client.open(proxy.main_port)
    for _ in range(3):
        assert echoed(await one.send(data))["headers"]["x-forwarded-for"] == "127.0.0.1"
    other = await Client.open(proxy.main_port, local="127.0.0.2")
    for _ in range(3):
        assert echoed(await other.send(data))["headers"]["x-forwarded-for"] == "127.0.0.2"
    assert echoed(await one.send(data))["headers"]["x-forwarded-for"] == "127.0.0.1"
    await one.close()
    await other.close()


async def test_a_membership_change_ends_the_lane(proxy: ProxyServer, backends: Backends) -> None:
    data = request()
    client = await warm(proxy, data)
    await backends.kill("b")
    await wait_until(lambda: not proxy.ctx.membership.current().state_of("b").accepts_new, timeout=10)
    resp = await client.send(data)  # re-pinned elsewhere without an error, by the full path
    body = echoed(resp)
    assert body["instance"] in ("a", "c") and resp.get("Set-Cookie") is not None
    assert lanes(proxy) == 0
    await client.close()


async def test_a_dead_instance_behind_a_warm_lane_is_retried_elsewhere(proxy: ProxyServer,
                                                                      backends: Backends) -> None:
    """The instance dies before health notices: the lane's pooled socket is stale, its resend cannot
    connect, and the full exchange the lane stands for retries the user elsewhere with a new cookie."""
    data = request()
    client = await warm(proxy, data)
    await backends.kill("b")
    resp = await client.send(data)
    assert resp.status == 200 and echoed(resp)["instance"] in ("a", "c")
    assert resp.get("Set-Cookie") is not None
    await client.close()
    assert not fast(proxy).pool.active


async def test_revalidation_due_ends_the_lane(backends: Backends, start_proxy: Any) -> None:
    """A cookie past ``revalidate_after`` is never routed from the hot-route cache, so never by a lane."""
    config = make_config(backends, engine="fast")
    server: ProxyServer = await start_proxy(replace(config, cookie=replace(config.cookie, revalidate_after=2)))
    data = request(issued_at=int(time.time()) - 1)
    client = await warm(server, data)
    await asyncio.sleep(1.2)
    resp = await client.send(data)  # the full path now: a revalidated cookie is set again
    assert echoed(resp)["instance"] == "b"
    assert lanes(server) == 0
    await client.close()


async def test_a_response_that_needs_llhttp_promotes_to_the_full_exchange(proxy: ProxyServer) -> None:
    """A chunked response in several reads is never whole in one read: the lane's request becomes a
    full exchange and the body arrives intact, re-framed as the full path frames it."""
    data = request(path="/stream?bytes=300000")
    client = await Client.open(proxy.main_port)
    bodies = [await client.send(data) for _ in range(4)]
    await client.close()
    assert lanes(proxy) == 1
    assert all(r.status == 200 and len(r.body) == 300000 for r in bodies)
    assert len({r.body for r in bodies}) == 1
    text = await metrics(proxy)
    assert metric_value(text, "affinity_responses_total", {"code": "200"}) == 4


async def test_head_requests_get_no_body(proxy: ProxyServer) -> None:
    data = request(method="HEAD")
    client = await Client.open(proxy.main_port)
    answers = [await client.send(data, head=True) for _ in range(5)]
    assert lanes(proxy) == 1
    assert all(r.status == 200 and r.body == b"" and int(r.get("Content-Length") or 0) > 0 for r in answers)
    assert echoed(await client.send(request()))["method"] == "GET"  # the connection is still in step
    await client.close()


async def test_a_client_that_leaves_mid_request_drops_the_instance_socket(proxy: ProxyServer) -> None:
    data = request(path="/slow?delay=0.5")
    client = await warm(proxy, data)
    answered = metric_value(await metrics(proxy), "affinity_responses_total", {"code": "200"})
    client.writer.write(data)
    pool = fast(proxy).pool
    await wait_until(lambda: len(pool.active) == 1, timeout=5)
    client.writer.transport.abort()  # gone at once (a half-close would still get its answer)
    await wait_until(lambda: not pool.active, timeout=5)
    idle = [c for conns in pool._idle.values() for c in conns]
    assert all(c.transport is not None and c.relay is None for c in idle)
    # the only 200 since is the /metrics answer that read ``answered``: the lost request is not counted
    assert metric_value(await metrics(proxy), "affinity_responses_total", {"code": "200"}) == answered + 1


async def test_the_access_log_still_gets_every_request(proxy: ProxyServer, caplog: pytest.LogCaptureFixture) -> None:
    data = request()
    client = await Client.open(proxy.main_port)
    for _ in range(3):
        await client.send(data)
    assert lanes(proxy) == 1
    with caplog.at_level(logging.INFO, logger="affinity_proxy.access"):
        for _ in range(5):
            assert echoed(await client.send(data))["instance"] == "b"
    await client.close()
    assert sum(r.name == "affinity_proxy.access" for r in caplog.records) == 5


FIRST_VISIT = b"GET /page HTTP/1.1\r\nHost: app.example\r\nAccept: */*\r\n\r\n"


async def test_first_visits_repeat_through_the_mint_lane(proxy: ProxyServer) -> None:
    """A cookie-less head repeated: every request is a new session placed once, counted once, with
    a cookie naming the instance that served it, one at a time and pipelined."""
    client = await Client.open(proxy.main_port)
    answers = [await client.send(FIRST_VISIT) for _ in range(40)]
    await client.close()
    assert lanes(proxy, MintLane) == 1
    pipelined = await exchange(proxy.main_port, FIRST_VISIT * 20, expect=20)
    answers += pipelined.responses
    assert len(answers) == 60 and not pipelined.rest
    codec = CookieCodec(SECRET)
    served = []
    ids = set()
    for resp in answers:
        body = echoed(resp)
        served.append(body["instance"])
        assert resp.get("X-Fly-Instance") == body["instance"]
        value = (resp.get("Set-Cookie") or "").split(";")[0].removeprefix(f"{COOKIE}=")
        decoded = codec.decode(value, time.time())
        assert isinstance(decoded, AffinityCookie) and decoded.instance == body["instance"]
        ids.add(body["headers"]["x-request-id"])
    assert len(ids) == 60 and set(served) == {"a", "b", "c"}  # placed per request, not per head
    assert fast(proxy).router.new_sessions.minted == 60
    text = await metrics(proxy)
    assert metric_value(text, "affinity_requests_total", {"action": "forward", "reason": "new"}) == 60
    assert sum(metric_value(text, "affinity_placements_total", {"instance": i, "how": "ring"})
               for i in ("a", "b", "c")) == 60
    assert metric_value(text, "affinity_responses_total", {"code": "200"}) == 60
    assert not fast(proxy).pool.active


async def test_first_visits_placed_on_a_dead_instance_are_retried_elsewhere(proxy: ProxyServer,
                                                                          backends: Backends) -> None:
    """``b`` dies before health notices: sessions the mint lane places on it fail on a stale pooled
    socket or a refused connect, and the full exchange (its route input built only then) places
    them again elsewhere, each with a cookie naming the instance that served it."""
    client = await Client.open(proxy.main_port)
    for _ in range(30):
        echoed(await client.send(FIRST_VISIT))
    assert lanes(proxy, MintLane) == 1
    await backends.kill("b")
    codec = CookieCodec(SECRET)
    for _ in range(30):
        resp = await client.send(FIRST_VISIT)
        body = echoed(resp)
        assert body["instance"] in ("a", "c")
        value = (resp.get("Set-Cookie") or "").split(";")[0].removeprefix(f"{COOKIE}=")
        decoded = codec.decode(value, time.time())
        assert isinstance(decoded, AffinityCookie) and decoded.instance == body["instance"]
    await client.close()
    assert not fast(proxy).pool.active
    text = await metrics(proxy)  # some of them did fail on b first (or this test proves nothing)
    assert sum(metric_value(text, "affinity_upstream_errors_total", {"instance": "b", "kind": kind})
               for kind in ("connect", "protocol")) > 0


@pytest.mark.parametrize("cookie", [False, True], ids=["mint", "forward"])
async def test_a_reload_ends_both_lanes(backends: Backends, start_proxy: Any, tmp_path: Path, cookie: bool) -> None:
    """A reload replaces the config a warm lane's head was parsed and checked under (the lanes look
    heads up without ``HeadCache.get``'s config check): the lane is dropped on its next use and the
    full path answers, parsing the head again under the new config."""
    cfg = tmp_path / "proxy.yaml"
    write_config(cfg, backends, ["a", "b", "c"], engine="fast", secret=SECRET)
    server: ProxyServer = await start_proxy(load_config(cfg), config_path=str(cfg))
    data = request() if cookie else FIRST_VISIT
    client = await Client.open(server.main_port)
    for _ in range(4):
        assert echoed(await client.send(data))["path"] == "/page"
    kind = ForwardLane if cookie else MintLane
    assert lanes(server, kind) == 1
    warm = fast(server).heads._heads[data]
    write_config(cfg, backends, ["a", "b", "c"], engine="fast", secret=SECRET,
                 extra="limits: {max_header_bytes: 4096}\n")
    async with aiohttp.ClientSession() as http:
        async with http.post(f"http://127.0.0.1:{server.admin_port}/reload") as resp:
            assert resp.status == 200, await resp.text()
    assert isinstance(warm.lane, kind)
    assert echoed(await client.send(data))["path"] == "/page"
    assert warm.lane is None  # dropped, not taken
    assert fast(server).heads._heads.get(data) is not warm  # parsed again under the new config
    await client.close()
