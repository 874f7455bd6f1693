"""The replay lane (``fastpath.lane``): repeats of a fly replay answered from pre-encoded bytes.

A fly node m1 (fast engine) over three demo apps; a user whose fresh affinity cookie names m2 is
answered with replays. Every test sends byte-identical request heads on one keep-alive connection
(one at a time, and pipelined), so the lane is warm, and checks what must still hold: every answer
is a replay to the right Machine, every replay is counted once, and the lane gives way to the full
path when the membership changes, the cookie needs revalidation, a replay loop is signalled or the
access log is on. HEAD requests get the replay's head without its body.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import replace

import aiohttp
import pytest
from aiohttp import web

from affinity_proxy.config import Config, CookieConfig, FlyConfig, InstanceConfig, LimitsConfig, UserKeySourceConfig
from affinity_proxy.devtools.demo.backend import start_backend
from affinity_proxy.routing.cookie import CookieCodec
from affinity_proxy.routing.model import InstanceId
from affinity_proxy.serve.app import ProxyServer
from tests.engines.fast.raw import Client, RawResponse, exchange
from tests.functional.helpers import COOKIE, metric_value

SECRET = "lane-test-secret-" + "z" * 20
USER = "lane-user"


@pytest.fixture
async def apps() -> AsyncIterator[dict[str, int]]:
    runners: list[web.AppRunner] = []
    ports: dict[str, int] = {}
    for machine in ("m1", "m2", "m3"):
        runner, ports[machine] = await start_backend(machine)
        runners.append(runner)
    yield ports
    for runner in runners:
        await runner.cleanup()


def node_config(ports: dict[str, int], **cookie: object) -> Config:
    return Config(
        mode="fly",
        engine="fast",
        listen="127.0.0.1:0",
        admin_listen="127.0.0.1:0",
        instances=tuple(InstanceConfig(m, f"http://127.0.0.1:{p}") for m, p in ports.items()),
        cookie=replace(CookieConfig(secret=SECRET), **cookie),  # type: ignore[arg-type]
        user_key=(UserKeySourceConfig("header", "X-User-Id"),),
        fly=FlyConfig(app="demo", machine_id="m1", region="lcl", upstream=f"http://127.0.0.1:{ports['m1']}",
                      discovery="static"),
        limits=LimitsConfig(upstream_connect_timeout=1.0),
    )


@pytest.fixture
async def node(apps: dict[str, int]) -> AsyncIterator[ProxyServer]:
    server = ProxyServer(node_config(apps))
    await server.start()
    yield server
    await server.stop()


def request(server: ProxyServer, instance: str, *, issued_at: int | None = None, method: str = "GET",
            extra: bytes = b"") -> bytes:
    codec = CookieCodec(SECRET)
    value = codec.encode(InstanceId(instance), int(time.time()) if issued_at is None else issued_at,
                         codec.user_digest(USER))
    return (f"{method} /page HTTP/1.1\r\nHost: app.example\r\nCookie: {COOKIE}={value}\r\n"
            f"X-User-Id: {USER}\r\n").encode() + extra + b"\r\n"


async def metrics(server: ProxyServer) -> str:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{server.admin_port}/metrics") as resp:
            return await resp.text()


def replayed_to(resp: RawResponse) -> str | None:
    if resp.status != 409:
        return None
    value = resp.get("fly-replay") or ""
    assert value.startswith("instance="), value
    return value.split(";")[0].removeprefix("instance=")


def lanes(server: ProxyServer) -> int:
    """How many cached request heads carry a replay lane (white-box: proves the lane was taken)."""
    fast = server._fast
    assert fast is not None
    return sum(head.lane is not None for head in fast.heads._heads.values())


async def test_repeats_are_replayed_and_counted_exactly(node: ProxyServer) -> None:
    data = request(node, "m2")
    client = await Client.open(node.main_port)
    answers = [await client.send(data) for _ in range(30)]
    await client.close()
    assert lanes(node) == 1
    pipelined = await exchange(node.main_port, data * 30, expect=30)
    answers += pipelined.responses
    assert len(answers) == 60 and not pipelined.rest
    first = answers[0]
    for resp in answers:
        assert replayed_to(resp) == "m2"
        assert resp.json() == first.json() == {"message": "replaying to instance m2", "instance": "m2"}
        assert [(k, v) for k, v in resp.headers if k != "Date"] == [(k, v) for k, v in first.headers if k != "Date"]
        assert resp.get("Set-Cookie") is None
    text = await metrics(node)
    assert metric_value(text, "affinity_replays_total", {"reason": "cookie"}) == 60
    assert metric_value(text, "affinity_requests_total", {"action": "replay", "reason": "cookie"}) == 60
    assert metric_value(text, "affinity_responses_total", {"code": "409"}) == 60
    assert node.ctx.events.snapshot()["totals"]["replays"] == 60


async def test_a_membership_change_ends_the_lane(node: ProxyServer) -> None:
    data = request(node, "m2")
    client = await Client.open(node.main_port)
    for _ in range(5):
        assert replayed_to(await client.send(data)) == "m2"
    assert lanes(node) == 1
    view = node.ctx.membership.current()
    node.ctx.membership.set_instances([i for i in view.instances if i.id != "m2"])  # what discovery does
    resp = await client.send(data)
    assert replayed_to(resp) != "m2"
    if resp.status == 409:
        assert replayed_to(resp) == "m3"
    else:
        assert resp.status == 200 and resp.json()["instance"] == "m1"
    await client.close()
    text = await metrics(node)
    assert metric_value(text, "affinity_replays_total", {"reason": "cookie"}) == 5
    assert metric_value(text, "affinity_repins_total", {"repin_reason": "gone"}) == 1


async def test_revalidation_ends_the_lane(apps: dict[str, int]) -> None:
    """Past ``cookie.revalidate_after`` the cookie is checked against the stored pin (m3 here),
    which wins: the same request bytes are then replayed to m3."""
    server = ProxyServer(node_config(apps, revalidate_after=2.0))
    await server.start()
    try:
        await server.ctx.store.claim(USER, InstanceId("m3"))
        data = request(server, "m2", issued_at=int(time.time()))
        client = await Client.open(server.main_port)
        seen: list[str | None] = []
        async with asyncio.timeout(15):
            while not seen or seen[-1] == "m2":
                seen.append(replayed_to(await client.send(data)))
                if len(seen) > 3:
                    await asyncio.sleep(0.02)
        await client.close()
        assert seen[-1] == "m3" and set(seen[:-1]) == {"m2"}
        text = await metrics(server)
        assert metric_value(text, "affinity_replays_total", {"reason": "cookie"}) == len(seen) - 1
        total = sum(metric_value(text, "affinity_replays_total", {"reason": r}) for r in ("cookie", "pin"))
        assert total == len(seen)
    finally:
        await server.stop()


async def test_a_replayed_request_is_never_replayed_again(node: ProxyServer) -> None:
    data = request(node, "m2")
    client = await Client.open(node.main_port)
    for _ in range(5):
        assert replayed_to(await client.send(data)) == "m2"
    looped = request(node, "m2", extra=b"fly-replay-src: instance=m2;region=lcl;t=1;state=affinity\r\n")
    for _ in range(3):
        resp = await client.send(looped)
        assert resp.status == 200 and resp.json()["instance"] == "m1"
    await client.close()
    text = await metrics(node)
    assert metric_value(text, "affinity_replay_loops_prevented_total") == 3
    assert metric_value(text, "affinity_replays_total", {"reason": "cookie"}) == 5


async def test_the_access_log_still_gets_every_replay(node: ProxyServer, caplog: pytest.LogCaptureFixture) -> None:
    data = request(node, "m2")
    client = await Client.open(node.main_port)
    for _ in range(5):
        await client.send(data)
    caplog.set_level(logging.INFO, logger="affinity_proxy.access")
    for _ in range(7):
        assert replayed_to(await client.send(data)) == "m2"
    await client.close()
    records = [r for r in caplog.records if r.name == "affinity_proxy.access"]
    assert len(records) == 7
    assert all(r.fields["action"] == "replay" and r.fields["status"] == 409  # type: ignore[attr-defined]
               and r.fields["replay_target"] == "m2" for r in records)  # type: ignore[attr-defined]
    text = await metrics(node)
    assert metric_value(text, "affinity_replays_total", {"reason": "cookie"}) == 12


async def test_head_replays_carry_no_body(node: ProxyServer) -> None:
    head = request(node, "m2", method="HEAD")
    get = request(node, "m2")
    result = await exchange(node.main_port, head * 5 + get, expect=6, head_requests={0, 1, 2, 3, 4})
    assert len(result.responses) == 6 and not result.rest
    full = result.responses[5]
    assert replayed_to(full) == "m2" and full.json()["instance"] == "m2"
    for resp in result.responses[:5]:
        assert replayed_to(resp) == "m2" and resp.body == b""
        assert resp.get("Content-Length") == str(len(full.body))
    client = await Client.open(node.main_port)  # one at a time too (the lane's own path)
    for _ in range(5):
        resp = await client.send(head, head=True)
        assert replayed_to(resp) == "m2" and resp.body == b""
    assert (await client.send(get)).json()["instance"] == "m2"  # nothing stray before this answer
    await client.close()


@pytest.mark.parametrize("path", ["/page", "/%zz-bad-escape"], ids=["replay-lane", "error-answer"])
async def test_a_client_that_never_reads_cannot_pile_up_answers(apps: dict[str, int], path: str) -> None:
    """Pipelined requests whose answers need no exchange (replays from the lane, the proxy's own
    errors) from a client that never reads: the proxy stops taking requests once its write buffer
    is full, so its memory stays bounded (it once buffered 235 MB in 2 s), and the deadline closes
    the connection. What the client did receive is whole answers, in order."""
    config = node_config(apps)
    server = ProxyServer(replace(config, limits=replace(config.limits, client_timeout=1.0)))
    await server.start()
    try:
        data = request(server, "m2").replace(b"GET /page ", f"GET {path} ".encode(), 1)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_connect(sock, ("127.0.0.1", server.main_port))
        fast = server._fast
        assert fast is not None
        blob, sent, peak, closed = data * 500, 0, 0, False
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not closed:
            try:
                sent += sock.send(blob)
            except BlockingIOError:
                await asyncio.sleep(0.01)
            except OSError:  # reset by the deadline
                closed = True
            await asyncio.sleep(0)
            for conn in fast.connections:
                if conn.transport is not None:
                    peak = max(peak, conn.transport.get_write_buffer_size())
        sock.close()
        assert closed, "the client timeout closes a connection that never reads"
        assert sent > 10 * len(blob), "the proxy read requests before it stopped"
        assert peak < 1024 * 1024, f"{peak} bytes of answers were buffered for a client that never reads"
    finally:
        await server.stop()
