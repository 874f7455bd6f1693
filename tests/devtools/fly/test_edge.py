"""FlyEdge against real machines on port 0: spreading, Fly's request headers, fly-replay of the
original request with fly-replay-src, the 10-replay limit, the 1 MB body limit, force/prefer
headers, prefer_instance and fallbacks, stopped/destroyed machines, WebSocket replays, stats."""

from __future__ import annotations

import asyncio
import hashlib
import io
import re
import time

import aiohttp
import pytest

from affinity_proxy.devtools.fly import FlyEdge
from affinity_proxy.devtools.ports import free_port
from affinity_proxy.routing.replay import parse_replay_failed, parse_replay_src
from tests.support.fly_machines import StartEdge, StartMachine
from tests.support.waiting import wait_until

REQUEST_ID = re.compile(r"^[0-9A-HJKMNP-TV-Z]{26}-lcl$")


def _dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}"  # outside the ephemeral range: no client takes it meanwhile


async def test_spreads_round_robin_and_sets_fly_headers(
    start_machine: StartMachine, start_edge: StartEdge, http
) -> None:
    a, b = await start_machine("m1"), await start_machine("m2")
    edge = await start_edge(a, b)
    served = []
    for _ in range(4):
        async with http.get(edge.url + "/x?q=1", headers={"X-Forwarded-For": "10.0.0.9"}) as resp:
            assert resp.status == 200
            assert REQUEST_ID.match(resp.headers["Fly-Request-Id"])
            served.append((await resp.json())["machine"])
    assert sorted(served) == ["m1", "m1", "m2", "m2"]
    assert served[0] != served[1]
    seen = a.seen[0].headers
    assert seen["Fly-Client-IP"] == "127.0.0.1"
    assert seen["X-Forwarded-For"] == "10.0.0.9, 127.0.0.1"
    assert seen["X-Forwarded-Proto"] == "http"
    assert seen["Fly-Region"] == "lcl"
    assert REQUEST_ID.match(seen["Fly-Request-Id"])
    assert seen["Fly-Forwarded-Port"] == str(edge.port)
    assert a.seen[0].raw_path == "/x?q=1"
    assert "fly-replay-src" not in seen
    assert edge.requests == 4 and edge.replays == 0 and edge.hits == {"m1": 2, "m2": 2}
    assert edge.replay_counts == {0: 4}


async def test_replays_the_original_request_with_replay_src(
    start_machine: StartMachine, start_edge: StartEdge, http
) -> None:
    a = await start_machine("m1", replay="instance=m2;state=affinity")
    b = await start_machine("m2")
    edge = await start_edge(a, b)
    body = b"payload " * 1000
    before = time.time_ns() // 1000
    async with http.post(
        edge.url + "/api/items?x=%20y&z=1",
        data=body,
        headers={"fly-force-instance-id": "m1", "X-Custom": "kept", "Cookie": "sid=1"},
    ) as resp:
        assert resp.status == 200
        got = await resp.json()
    assert got == {"machine": "m2", "method": "POST", "path": "/api/items?x=%20y&z=1", "body_len": len(body)}
    replayed = b.seen[0]
    assert replayed.body == body and replayed.method == "POST"
    assert replayed.headers["X-Custom"] == "kept" and replayed.headers["Cookie"] == "sid=1"
    src = parse_replay_src(replayed.headers["fly-replay-src"])
    assert src is not None
    assert src.instance == "m1"  # the replayer, not the target
    assert src.region == "lcl" and src.state == "affinity" and src.ours
    assert src.t is not None and before <= src.t <= time.time_ns() // 1000
    assert replayed.headers["Fly-Request-Id"] == a.seen[0].headers["Fly-Request-Id"]
    assert edge.replays == 1 and edge.hits == {"m1": 1, "m2": 1} and edge.served == {"m2": 1}
    assert edge.replay_counts == {1: 1}


async def test_any_status_and_replay_without_state(start_machine: StartMachine, start_edge: StartEdge, http) -> None:
    a = await start_machine("m1", replay="instance=m2", replay_status=200)
    b = await start_machine("m2")
    edge = await start_edge(a, b)
    async with http.get(edge.url + "/", headers={"fly-force-instance-id": "m1"}) as resp:
        assert (await resp.json())["machine"] == "m2"
    src = parse_replay_src(b.seen[0].headers["fly-replay-src"])
    assert src is not None and src.state == "" and not src.ours


async def test_self_replay_loop_ends_with_pa02(start_machine: StartMachine, start_edge: StartEdge, http) -> None:
    a = await start_machine("m1", replay="instance=m1")
    edge = await start_edge(a)
    async with http.get(edge.url + "/") as resp:
        assert resp.status == 502
        assert "PA02 Excess fly-replay headers" in await resp.text()
    assert len(a.seen) == 11  # the original plus 10 replays
    assert edge.replays == 11 and edge.errors == 1 and edge.error_codes == {"PA02": 1}
    replay_srcs = [s.headers.get("fly-replay-src") for s in a.seen]
    assert replay_srcs[0] is None and all(replay_srcs[1:])


async def test_max_replays_is_a_parameter(start_machine: StartMachine, start_edge: StartEdge, http) -> None:
    a = await start_machine("m1", replay="instance=m1")
    edge = await start_edge(a, max_replays=2)
    async with http.get(edge.url + "/") as resp:
        assert resp.status == 502
    assert len(a.seen) == 3


@pytest.mark.parametrize("read_body", [True, False])
async def test_body_over_the_limit_cannot_be_replayed(
    start_machine: StartMachine, start_edge: StartEdge, http, read_body: bool
) -> None:
    a = await start_machine("m1", replay="instance=m2", read_body=read_body)
    b = await start_machine("m2")
    edge = await start_edge(a, b)
    async with http.post(edge.url + "/upload", data=b"x" * 1_000_001, headers={"fly-force-instance-id": "m1"}) as resp:
        assert resp.status == 502
        assert "PA01" in await resp.text()
    assert b.seen == [] and edge.error_codes == {"PA01": 1}


async def test_body_at_the_limit_is_replayed(start_machine: StartMachine, start_edge: StartEdge, http) -> None:
    a = await start_machine("m1", replay="instance=m2")
    b = await start_machine("m2")
    edge = await start_edge(a, b)
    body = (bytes(range(256)) * 3907)[:1_000_000]
    assert len(body) == 1_000_000
    async with http.put(edge.url + "/upload", data=body, headers={"fly-force-instance-id": "m1"}) as resp:
        assert resp.status == 200
    assert b.seen[0].body == body


async def test_large_body_without_replay_streams_through(
    start_machine: StartMachine, start_edge: StartEdge, http
) -> None:
    b = await start_machine("m2")
    edge = await start_edge(b)
    body = bytes(range(256)) * (5 * 4096)  # 5 MiB

    async def chunks():
        for i in range(0, len(body), 65536):
            yield body[i : i + 65536]

    async with http.post(edge.url + "/upload", data=chunks()) as resp:  # chunked, no Content-Length
        assert resp.status == 200
        assert (await resp.json())["body_len"] == len(body)
    assert hashlib.sha256(b.seen[0].body).digest() == hashlib.sha256(body).digest()
    async with http.post(edge.url + "/upload", data=io.BytesIO(body)) as resp:  # with Content-Length
        assert (await resp.json())["body_len"] == len(body)
    assert b.seen[1].headers["Content-Length"] == str(len(body))


async def test_force_header(start_machine: StartMachine, start_edge: StartEdge, http) -> None:
    a, b = await start_machine("m1"), await start_machine("m2")
    edge = await start_edge(a, b)
    for _ in range(3):
        async with http.get(edge.url + "/", headers={"fly-force-instance-id": "m2"}) as resp:
            assert (await resp.json())["machine"] == "m2"
    async with http.get(edge.url + "/", headers={"fly-force-instance-id": "ghost"}) as resp:
        assert resp.status == 503
        assert "PR02" in await resp.text()
    edge.set_machine_state("m2", "destroyed")
    async with http.get(edge.url + "/", headers={"fly-force-instance-id": "m2"}) as resp:
        assert resp.status == 503
    assert a.seen == []


async def test_prefer_header_falls_back_with_unavailable(
    start_machine: StartMachine, start_edge: StartEdge, http
) -> None:
    a, b = await start_machine("m1"), await start_machine("m2")
    edge = await start_edge(a, b)
    async with http.get(edge.url + "/", headers={"fly-prefer-instance-id": "m2"}) as resp:
        assert (await resp.json())["machine"] == "m2"
    assert "fly-preferred-instance-unavailable" not in b.seen[0].headers
    async with http.get(edge.url + "/", headers={"fly-prefer-instance-id": "ghost"}) as resp:
        assert resp.status == 200
    seen = (a.seen + b.seen[1:])[0]
    assert seen.headers["fly-preferred-instance-unavailable"] == "ghost"


async def test_client_cannot_spoof_replay_headers(start_machine: StartMachine, start_edge: StartEdge, http) -> None:
    a = await start_machine("m1")
    edge = await start_edge(a)
    spoofed = {
        "fly-replay-src": "instance=m9;state=affinity",
        "fly-replay-failed": "instance=m1;reason=timeout",
        "fly-preferred-instance-unavailable": "m1",
        "Fly-Region": "evil",
    }
    async with http.get(edge.url + "/", headers=spoofed) as resp:
        assert resp.status == 200
    headers = a.seen[0].headers
    assert "fly-replay-src" not in headers and "fly-replay-failed" not in headers
    assert "fly-preferred-instance-unavailable" not in headers and headers["Fly-Region"] == "lcl"
    trusting = await start_edge(a, strip_client_fly_headers=False)
    async with http.get(trusting.url + "/", headers=spoofed) as resp:
        assert resp.status == 200
    assert a.seen[1].headers["fly-replay-src"] == "instance=m9;state=affinity"


async def test_prefer_instance_replay_to_unknown_goes_elsewhere(
    start_machine: StartMachine, start_edge: StartEdge, http
) -> None:
    a = await start_machine("m1", replay="prefer_instance=ghost;timeout=5s;fallback=prefer_self;state=affinity")
    b = await start_machine("m2")
    edge = await start_edge(a, b)
    async with http.get(edge.url + "/", headers={"fly-force-instance-id": "m1"}) as resp:
        assert (await resp.json())["machine"] == "m2"
    assert b.seen[0].headers["fly-preferred-instance-unavailable"] == "ghost"
    assert parse_replay_src(b.seen[0].headers["fly-replay-src"]).instance == "m1"  # type: ignore[union-attr]


async def test_instance_replay_to_unknown_is_a_502(start_machine: StartMachine, start_edge: StartEdge, http) -> None:
    a = await start_machine("m1", replay="instance=ghost")
    edge = await start_edge(a)
    async with http.get(edge.url + "/") as resp:
        assert resp.status == 502
        assert "PR02" in await resp.text()


@pytest.mark.parametrize("with_src", [False, True])
@pytest.mark.parametrize("fallback", ["prefer_self", "force_self"])
async def test_fallback_sends_it_back_with_replay_failed(
    start_machine: StartMachine, start_edge: StartEdge, http, fallback: str, with_src: bool
) -> None:
    a = await start_machine("m1", replay=f"instance=ghost;timeout=2s;fallback={fallback}", replay_unless_failed=True)
    b = await start_machine("m2")
    edge = await start_edge(a, b, fallback_replay_src=with_src)
    async with http.get(edge.url + "/", headers={"fly-force-instance-id": "m1"}) as resp:
        assert (await resp.json())["machine"] == "m1"
    back = a.seen[1].headers
    failed = parse_replay_failed(back["fly-replay-failed"])
    assert failed is not None
    assert (failed.instance, failed.app, failed.region, failed.replay_source, failed.reason) == (
        "ghost", "demo", "lcl", "m1", "no_candidate"
    )  # fmt: skip
    assert failed.elapsed_ms is not None
    if with_src:  # one reading of Fly's docs (docs/fly-protocol.md section 1-2: fly-replay-src is not promised here)
        assert parse_replay_src(back["fly-replay-src"]).instance == "m1"  # type: ignore[union-attr]
    else:
        assert "fly-replay-src" not in back
    assert b.seen == []


async def test_a_fallback_may_not_replay_again(start_machine: StartMachine, start_edge: StartEdge, http) -> None:
    a = await start_machine("m1", replay="instance=ghost;fallback=force_self")
    edge = await start_edge(a)
    async with http.get(edge.url + "/") as resp:
        assert resp.status == 502
        assert "PA03" in await resp.text()
    assert len(a.seen) == 2


async def test_fallback_when_the_target_is_unreachable(
    start_machine: StartMachine, start_edge: StartEdge, http
) -> None:
    a = await start_machine("m1", replay="instance=m3;fallback=prefer_self", replay_unless_failed=True)
    edge = await start_edge(a, urls={"m3": _dead_url()})
    async with http.get(edge.url + "/", headers={"fly-force-instance-id": "m1"}) as resp:
        assert (await resp.json())["machine"] == "m1"
    failed = parse_replay_failed(a.seen[1].headers["fly-replay-failed"])
    assert failed is not None and failed.instance == "m3" and failed.reason == "retries_exhausted"


async def test_unreachable_machine_is_skipped_when_load_balancing(
    start_machine: StartMachine, start_edge: StartEdge, http
) -> None:
    b = await start_machine("m2")
    edge = await start_edge(b, urls={"m1": _dead_url()})
    for _ in range(4):
        async with http.get(edge.url + "/") as resp:
            assert (await resp.json())["machine"] == "m2"
    async with http.get(edge.url + "/", headers={"fly-force-instance-id": "m1"}) as resp:
        assert resp.status == 502


async def test_stopped_machine_is_woken_by_a_replay_or_force(
    start_machine: StartMachine, start_edge: StartEdge, http
) -> None:
    a = await start_machine("m1", replay="instance=m2")
    b = await start_machine("m2")
    woken: list[str] = []

    async def on_wake(machine_id: str) -> None:
        woken.append(machine_id)

    edge = await start_edge(a, b, on_wake=on_wake)
    edge.set_machine_state("m2", "stopped")
    for _ in range(3):  # not load-balanced onto while stopped
        async with http.get(edge.url + "/x", headers={"fly-force-instance-id": "m1"}) as resp:
            assert (await resp.json())["machine"] == "m2"
        assert woken == ["m2"]
    assert edge.machine_state("m2") == "started" and edge.wakes == 1
    edge.set_machine_state("m1", "stopped")
    async with http.get(edge.url + "/", headers={"fly-force-instance-id": "m1"}) as resp:
        assert resp.status == 200
    assert woken == ["m2", "m1"]


async def test_concurrent_requests_wake_a_machine_once(
    start_machine: StartMachine, start_edge: StartEdge, http
) -> None:
    a = await start_machine("m1")
    woken: list[str] = []
    gate = asyncio.Event()

    async def on_wake(machine_id: str) -> None:
        woken.append(machine_id)
        await gate.wait()

    edge = await start_edge(a, on_wake=on_wake)
    edge.set_machine_state("m1", "stopped")

    async def get() -> int:
        async with http.get(edge.url + "/", headers={"fly-force-instance-id": "m1"}) as resp:
            return resp.status

    requests = asyncio.gather(*(get() for _ in range(3)))
    await wait_until(lambda: woken)
    gate.set()
    assert await requests == [200, 200, 200]
    assert woken == ["m1"] and edge.wakes == 1


async def test_failed_wake_is_an_error(start_machine: StartMachine, start_edge: StartEdge, http) -> None:
    a = await start_machine("m1")

    async def on_wake(machine_id: str) -> None:
        raise RuntimeError("no capacity")

    edge = await start_edge(a, on_wake=on_wake)
    edge.set_machine_state("m1", "stopped")
    async with http.get(edge.url + "/", headers={"fly-force-instance-id": "m1"}) as resp:
        assert resp.status == 502
    assert edge.machine_state("m1") == "stopped"


async def test_no_machine_is_a_503(start_machine: StartMachine, start_edge: StartEdge, http) -> None:
    a = await start_machine("m1")
    edge = await start_edge(a)
    edge.set_machine_state("m1", "destroyed")
    async with http.get(edge.url + "/") as resp:
        assert resp.status == 503
    with pytest.raises(ValueError):
        edge.set_machine_state("m1", "gone")  # type: ignore[arg-type]


async def test_invalid_replay_header_is_pa03(start_machine: StartMachine, start_edge: StartEdge, http) -> None:
    a = await start_machine("m1", replay="app=x,state=y")
    edge = await start_edge(a)
    async with http.get(edge.url + "/") as resp:
        assert resp.status == 502 and "PA03" in await resp.text()


async def test_websocket_is_replayed_and_relayed(start_machine: StartMachine, start_edge: StartEdge, http) -> None:
    a = await start_machine("m1", replay="instance=m2;state=affinity")
    b = await start_machine("m2")
    edge = await start_edge(a, b)
    async with http.ws_connect(
        edge.url + "/ws?room=1", headers={"fly-force-instance-id": "m1"}, protocols=("chat",)
    ) as ws:
        assert ws.protocol == "chat"
        await ws.send_str("hello")
        assert await ws.receive_str(timeout=5) == "m2:hello"
        await ws.send_str("close:4001")
        msg = await ws.receive(timeout=5)
        assert msg.type is aiohttp.WSMsgType.CLOSE and msg.data == 4001
    assert a.seen[0].websocket and b.seen[0].websocket
    src = parse_replay_src(b.seen[0].headers["fly-replay-src"])
    assert src is not None and src.instance == "m1" and src.ours
    assert b.seen[0].raw_path == "/ws?room=1"
    assert edge.replays == 1 and edge.served == {"m2": 1}
    await wait_until(lambda: not edge.sockets)


async def test_websocket_client_close_reaches_the_machine(
    start_machine: StartMachine, start_edge: StartEdge, http
) -> None:
    b = await start_machine("m2")
    edge = await start_edge(b)
    async with http.ws_connect(edge.url + "/ws") as ws:
        await ws.send_str("x")
        assert await ws.receive_str(timeout=5) == "m2:x"
        await ws.close(code=4002)
    await wait_until(lambda: b.ws_closes == [4002])


async def test_websocket_refused_without_replay_passes_the_status(
    start_machine: StartMachine, start_edge: StartEdge, http
) -> None:
    a = await start_machine("m1", replay="instance=m1")
    edge = await start_edge(a, max_replays=1)
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await http.ws_connect(edge.url + "/ws")
    assert info.value.status == 502


async def test_websocket_refusal_of_the_machine_reaches_the_client(
    start_machine: StartMachine, start_edge: StartEdge, http
) -> None:
    a = await start_machine("m1", refuse_ws=403)
    edge = await start_edge(a)
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await http.ws_connect(edge.url + "/ws")
    assert info.value.status == 403
    assert info.value.headers is not None and info.value.headers["X-Machine"] == "m1"
    assert edge.errors == 0 and edge.served == {"m1": 1}


async def test_stop_closes_open_websockets(start_machine: StartMachine, http) -> None:
    b = await start_machine("m2")
    edge = FlyEdge({"m2": b.url})
    await edge.start()
    try:
        async with http.ws_connect(edge.url + "/ws") as ws:
            await ws.send_str("x")
            assert await ws.receive_str(timeout=5) == "m2:x"
            await asyncio.wait_for(edge.stop(), 10)
            msg = await ws.receive(timeout=5)
            assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    finally:
        await edge.stop()


async def test_stats_endpoint_and_machine_state_endpoint(
    start_machine: StartMachine, start_edge: StartEdge, http
) -> None:
    a = await start_machine("m1", replay="instance=m2")
    b = await start_machine("m2")
    edge = await start_edge(a, b)
    async with http.get(edge.url + "/", headers={"fly-force-instance-id": "m1"}) as resp:
        assert resp.status == 200
    async with http.get(edge.url + "/_edge/stats") as resp:
        stats = await resp.json()
    assert stats["requests"] == 1 and stats["replays"] == 1 and stats["errors"] == 0
    assert stats["hits"] == {"m1": 1, "m2": 1} and stats["served"] == {"m2": 1}
    assert stats["replay_counts"] == {"1": 1}
    assert stats["machines"]["m1"] == {"url": a.url, "state": "started", "app": "demo", "group": "app",
                                       "hard_limit": None, "load": 0}
    async with http.post(edge.url + "/_edge/machines/m1/state", json={"state": "stopped"}) as resp:
        assert resp.status == 200
    assert edge.machine_state("m1") == "stopped"
    async with http.post(edge.url + "/_edge/machines/nope/state", json={"state": "stopped"}) as resp:
        assert resp.status == 404
    async with http.post(edge.url + "/_edge/machines/m1/state", json={"state": "bad"}) as resp:
        assert resp.status == 400
    assert a.seen[0].raw_path == "/"  # /_edge/ never reaches a machine


async def test_add_machine_for_bluegreen(start_machine: StartMachine, start_edge: StartEdge, http) -> None:
    a = await start_machine("m1")
    edge = await start_edge(a)
    new = await start_machine("n1")
    edge.add_machine("n1", new.url)
    edge.set_machine_state("m1", "destroyed")
    async with http.get(edge.url + "/") as resp:
        assert (await resp.json())["machine"] == "n1"


async def test_elsewhere_and_region_replays(start_machine: StartMachine, start_edge: StartEdge, http) -> None:
    a = await start_machine("m1", replay="elsewhere=true")
    b = await start_machine("m2")
    edge = await start_edge(a, b)
    for _ in range(3):
        async with http.get(edge.url + "/", headers={"fly-force-instance-id": "m1"}) as resp:
            assert (await resp.json())["machine"] == "m2"
    a.replay = 'region="ams,lcl"'
    async with http.get(edge.url + "/", headers={"fly-force-instance-id": "m1"}) as resp:
        assert resp.status == 200
    a.replay = "region=ams"
    async with http.get(edge.url + "/", headers={"fly-force-instance-id": "m1"}) as resp:
        assert resp.status == 503
    a.replay = "app=other;instance=m2"
    async with http.get(edge.url + "/", headers={"fly-force-instance-id": "m1"}) as resp:
        assert resp.status == 502 and "PA04" in await resp.text()
