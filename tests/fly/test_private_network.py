"""Private-network forwards through the stand-in 6PN (``affinity_proxy.devtools.fly.network``): bodies Fly
cannot replay reach the pinned Machine over IPv6, also when that Machine was stopped.

The demo cluster runs 3 Machines behind the local edge; each node listens on ``[::]`` (as the
shipped fly configs do), the edge reaches it on 127.0.0.1, and peers only by the name
``<id>.vm.demo.internal``, which the stand-in DNS resolves to ``::1`` only and only while the Machine
is started. The real resolution path runs: the nodes query that DNS server (``fly.dns_server``) and
call the stand-in Machines API (``fly.api_url``, at ``_api.internal``) to start a stopped Machine.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
import pytest

from affinity_proxy.config import FlyConfig
from affinity_proxy.devtools.demo.fly_cluster import FlyCluster, start_fly_cluster
from affinity_proxy.devtools.fly.network import FlyNetwork
from affinity_proxy.membership.private_net import NotStarted, PrivateNameError, PrivateNet, PrivateNetResolver, probe
from affinity_proxy.routing.model import InstanceId

UPLOAD = b"".join(i.to_bytes(4, "big") for i in range(5 * 1024 * 1024 // 4))  # 5 MiB, not one repeated byte
UPLOAD_SHA = hashlib.sha256(UPLOAD).hexdigest()
CHUNKED = UPLOAD[: 2 * 1024 * 1024]
CHUNKED_SHA = hashlib.sha256(CHUNKED).hexdigest()
USERS = 30


@pytest.fixture
async def cluster(engine: str) -> AsyncIterator[FlyCluster]:
    c = await start_fly_cluster(engine=engine)
    yield c
    await c.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar(),
                                     timeout=aiohttp.ClientTimeout(total=120)) as session:
        yield session


async def _chunks(data: bytes, size: int = 64 * 1024) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i:i + size]


async def upload(http: aiohttp.ClientSession, cluster: FlyCluster, user: str, entry: str, *,
                 chunked: bool) -> tuple[int, dict[str, object] | str]:
    """POST /upload for ``user``, delivered by the edge to ``entry`` (``fly-prefer-instance-id``: the
    edge honours it, the proxy does not route by it)."""
    headers = {"X-User-Id": user, "fly-prefer-instance-id": entry}
    data = _chunks(CHUNKED) if chunked else io.BytesIO(UPLOAD)
    async with http.post(cluster.edge.url + "/upload", data=data, headers=headers) as resp:
        return resp.status, (await resp.json() if resp.status == 200 else await resp.text())


async def run_users(http: aiohttp.ClientSession, cluster: FlyCluster, owners: dict[str, str],
                    entry: str) -> list[str]:
    """Every user uploads 5 MiB (Content-Length) and sends a chunked body; the problems found."""
    problems: list[str] = []
    gate = asyncio.Semaphore(6)

    async def one(user: str) -> None:
        async with gate:
            for chunked, sha, size in ((False, UPLOAD_SHA, len(UPLOAD)), (True, CHUNKED_SHA, len(CHUNKED))):
                status, doc = await upload(http, cluster, user, entry, chunked=chunked)
                if status != 200 or not isinstance(doc, dict):
                    problems.append(f"{user} chunked={chunked}: {status} {doc}")
                elif (doc["instance"], doc["sha256"], doc["bytes"], doc["chunked"]) != (
                        owners[user], sha, size, chunked):
                    problems.append(f"{user} chunked={chunked}: {doc}")

    await asyncio.gather(*(one(u) for u in owners))
    return problems


async def test_30_users_reach_their_machine_over_ipv6_also_when_it_was_stopped(cluster, http) -> None:
    entry, *others = list(cluster.nodes)
    owners = {f"upl-{i}": others[i % len(others)] for i in range(USERS)}
    for user, owner in owners.items():
        await cluster.store.set(user, InstanceId(owner))

    started = time.perf_counter()
    assert await run_users(http, cluster, owners, entry) == []
    running = time.perf_counter() - started
    assert cluster.edge.replays == 0, "bodies over 1 MB and chunked bodies are never replayed"

    for machine in others:
        await cluster.stop_machine(machine)
    assert set(cluster.nodes) == {entry}, "a stopped Machine's node and app are down"
    started = time.perf_counter()
    assert await run_users(http, cluster, owners, entry) == []
    woken = time.perf_counter() - started

    assert all(cluster.network.machines[m] == "started" for m in others)
    assert cluster.boots == len(others), "one boot per stopped Machine, however many requests waited"
    assert 1 <= cluster.network.start_calls <= 3 * len(others)
    assert cluster.edge.errors == 0 and cluster.edge.replays == 0 and cluster.edge.wakes == 0
    # Peers were only ever found by AAAA look-ups of their .internal names: 6PN is IPv6 only.
    kinds = {kind for name, kind in cluster.network.queries if name.endswith(".vm.demo.internal")}
    assert kinds == {"AAAA"}
    print(f"\n{USERS} users x (5 MiB + 2 MiB chunked): running {running:.2f}s, "
          f"after stopping {len(others)} Machines {woken:.2f}s, start calls {cluster.network.start_calls}")


async def test_an_ipv4_only_listener_cannot_be_reached_over_the_private_network(engine: str, http) -> None:
    cluster = await start_fly_cluster(ipv4_only={"2875d0e1a45e18"}, engine=engine)
    try:
        entry, target, _ = list(cluster.nodes)
        await cluster.store.set("v4", InstanceId(target))
        status, doc = await upload(http, cluster, "v4", entry, chunked=False)
        assert status == 502, doc
        headers = {"X-User-Id": "v4", "fly-prefer-instance-id": entry}
        async with http.get(cluster.edge.url + "/", headers=headers) as resp:
            assert resp.status == 200  # small requests are replayed by the edge, which reaches it on IPv4
            assert (await resp.json())["instance"] == target
    finally:
        await cluster.stop()


# ---------------------------------------------------------------------- PrivateNet against the stand-in


@pytest.fixture
async def network() -> AsyncIterator[FlyNetwork]:
    net = FlyNetwork("app1", token="sekrit")
    net.add_machine("a1")
    net.add_machine("b2", state="stopped")
    await net.start()
    yield net
    await net.stop()


@asynccontextmanager
async def private_net(network: FlyNetwork, **fly: object) -> AsyncIterator[PrivateNet]:
    """A ``PrivateNet`` whose Machines API session resolves ``_api.internal`` through it (as a node's)."""
    values = {"dns_server": network.dns_server, "api_url": network.api_url, "api_token": network.token,
              "wake_timeout": 5.0, **fly}
    settings = FlyConfig(**values)  # type: ignore[arg-type]
    sessions: list[aiohttp.ClientSession] = []
    net = PrivateNet(lambda: settings, session=lambda: sessions[0])
    connector = aiohttp.TCPConnector(resolver=PrivateNetResolver(net), use_dns_cache=False)
    async with aiohttp.ClientSession(connector=connector) as session:
        sessions.append(session)
        try:
            yield net
        finally:
            await net.close()


async def test_names_resolve_aaaa_only_and_only_for_started_machines(network: FlyNetwork) -> None:
    async with private_net(network) as net:
        assert await net.addresses("a1.vm.app1.internal") == ["::1"]
        with pytest.raises(NotStarted):
            await net.addresses("b2.vm.app1.internal")
        with pytest.raises(NotStarted):
            await net.addresses("nope.vm.app1.internal")
    assert ("a1.vm.app1.internal", "AAAA") in network.queries


async def test_concurrent_forwards_to_a_stopped_machine_share_one_start(network: FlyNetwork) -> None:
    booted: list[str] = []
    server = await asyncio.start_server(lambda r, w: w.close(), "::1", 0)
    port = server.sockets[0].getsockname()[1]

    async def on_start(machine: str) -> None:
        booted.append(machine)

    network.on_start = on_start
    try:
        async with private_net(network) as net:
            await asyncio.gather(*(net.open("b2.vm.app1.internal", port, lambda a: probe(a, port), 2.0)
                                   for _ in range(10)))
            assert booted == ["b2"] and network.start_calls == 1 and net.wakes == 1
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize(("fly", "problem"), [
    ({"api_token": None}, "fly.api_token is not set"),
    ({"api_token": "wrong"}, "answered 401"),
    ({"wake_timeout": 0.3}, "did not start within 0.3s"),
])
async def test_a_stopped_machine_that_cannot_be_woken_is_a_connect_failure(
    network: FlyNetwork, fly: dict[str, object], problem: str,
) -> None:
    async def never(_machine: str) -> None:
        await asyncio.Event().wait()

    network.on_start = never
    async with private_net(network, **fly) as net:
        with pytest.raises(PrivateNameError, match=problem):
            await net.open("b2.vm.app1.internal", 1, lambda a: probe(a, 1), 1.0)
