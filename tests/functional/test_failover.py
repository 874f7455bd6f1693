"""Dead instances, upstream errors and limits: users are re-pinned without errors; bad input gets 4xx."""

from __future__ import annotations

from affinity_proxy.config import HealthConfig, LimitsConfig
from tests.functional.helpers import COOKIE, admin, affinity_cookie, base, metric_value
from tests.support.backends import make_config
from tests.support.waiting import wait_until


async def test_users_of_a_dead_instance_are_repinned_without_errors(engine: str, backends, start_proxy, http) -> None:
    server = await start_proxy(make_config(backends, engine=engine))
    clients: dict[str, str] = {}
    owners: dict[str, str] = {}
    while len(set(owners.values())) < 3 or len(owners) < 30:
        async with http.get(base(server) + "/") as resp:
            cookie = affinity_cookie(resp)
            assert cookie
            key = f"c{len(clients)}"
            clients[key] = cookie
            owners[key] = (await resp.json())["instance"]

    await backends.stop("b")
    errors = 0
    moved: dict[str, str] = {}
    for key, cookie in clients.items():
        async with http.get(base(server) + "/", headers={"Cookie": f"{COOKIE}={cookie}"}) as resp:
            if resp.status != 200:
                errors += 1
                continue
            got = (await resp.json())["instance"]
            if owners[key] == "b":
                assert got in ("a", "c")
                new_cookie = affinity_cookie(resp)
                assert new_cookie, "a re-pinned user gets a fresh cookie"
                clients[key] = new_cookie
                moved[key] = got
            else:
                assert got == owners[key], "users of live instances never move"
    assert errors == 0
    assert moved, "some clients were on b"
    # the re-pinned users stay on their new instance
    for key, cookie in clients.items():
        async with http.get(base(server) + "/", headers={"Cookie": f"{COOKIE}={cookie}"}) as resp:
            assert (await resp.json())["instance"] == moved.get(key, owners[key])
    await wait_until(lambda: server.ctx.membership.current().state_of("b").value == "down", timeout=5)
    metrics = await (await http.get(admin(server) + "/metrics")).text()
    assert metric_value(metrics, "affinity_repins_total", {"repin_reason": "dead"}) == len(moved)
    assert metric_value(metrics, "affinity_upstream_errors_total", {"instance": "b", "kind": "connect"}) >= 1


async def test_instance_recovers_after_health_checks(engine: str, backends, start_proxy, http) -> None:
    server = await start_proxy(make_config(backends, engine=engine))
    port = backends.ports["c"]
    await backends.stop("c")
    await wait_until(lambda: server.ctx.membership.current().state_of("c").value == "down", timeout=5)
    await backends.start("c", port=port)
    await wait_until(lambda: server.ctx.membership.current().state_of("c").value == "up", timeout=5)


async def test_post_to_dead_instance_is_502_not_retried(engine: str, backends, start_proxy, http) -> None:
    # No active probe after the first round: a probe between the stop and the POST would mark the
    # owner down and the POST would (rightly) be re-pinned and answered 200. Here the POST itself
    # must find the instance dead, and its connect failure (a passive health report) re-pins the GET.
    config = make_config(backends, engine=engine,
                         health=HealthConfig(interval=3600, timeout=1.0, unhealthy_after=1, healthy_after=1))
    server = await start_proxy(config)
    async with http.get(base(server) + "/", headers={"X-User-Id": "bob"}) as resp:
        owner = (await resp.json())["instance"]
    await backends.stop(owner)
    async with http.post(base(server) + "/upload", data=b"x" * 100, headers={"X-User-Id": "bob"}) as resp:
        assert resp.status == 502
        body = await resp.json()
        assert body["error"] == "upstream_connect"
    async with http.get(base(server) + "/", headers={"X-User-Id": "bob"}) as resp:
        assert resp.status == 200
        assert (await resp.json())["instance"] != owner


async def test_upstream_timeout_is_504(engine: str, backends, start_proxy, http) -> None:
    config = make_config(backends, engine=engine,
                         limits=LimitsConfig(upstream_timeout=0.3, upstream_connect_timeout=1.0))
    server = await start_proxy(config)
    async with http.get(base(server) + "/slow?delay=2") as resp:
        assert resp.status == 504
        assert (await resp.json())["error"] == "upstream_timeout"


async def test_no_routable_instance_is_503_with_retry_after(engine: str, backends, start_proxy, http) -> None:
    server = await start_proxy(make_config(backends, engine=engine))
    for name in ("a", "b", "c"):
        await backends.stop(name)
    await wait_until(lambda: not server.ctx.membership.current().routable_ids, timeout=5)
    async with http.get(base(server) + "/") as resp:
        assert resp.status == 503
        assert resp.headers["Retry-After"]
        assert (await resp.json())["error"] == "no_routable_instance"
    async with http.get(base(server) + "/_affinity/health") as resp:
        assert resp.status == 503


async def test_oversized_headers_get_431_and_body_413(engine: str, backends, start_proxy, http) -> None:
    limits = LimitsConfig(max_header_bytes=4096, max_body_bytes=1000, upstream_connect_timeout=1.0)
    server = await start_proxy(make_config(backends, engine=engine, limits=limits))
    async with http.get(base(server) + "/", headers={"X-Big": "y" * 5000}) as resp:
        assert resp.status == 431
    async with http.get(base(server) + "/", headers={f"X-H{i}": "v" * 60 for i in range(80)}) as resp:
        assert resp.status == 431
    async with http.post(base(server) + "/upload", data=b"z" * 2000) as resp:
        assert resp.status == 413
        assert (await resp.json())["error"] == "body_too_large"

    async def chunks():  # type: ignore[no-untyped-def]
        for _ in range(10):
            yield b"q" * 500

    async with http.post(base(server) + "/upload", data=chunks()) as resp:
        assert resp.status == 413
    async with http.get(base(server) + "/") as resp:
        assert resp.status == 200, "the proxy keeps serving"


async def test_unknown_reserved_path_is_json_404(engine: str, backends, start_proxy, http) -> None:
    server = await start_proxy(make_config(backends, engine=engine))
    async with http.get(base(server) + "/_affinity/nope") as resp:
        assert resp.status == 404
        assert (await resp.json())["error"] == "not_found"


async def test_force_header_names_a_live_instance_only(engine: str, backends, start_proxy, http) -> None:
    server = await start_proxy(make_config(backends, engine=engine))
    for _ in range(5):
        async with http.get(base(server) + "/", headers={"fly-force-instance-id": "c"}) as resp:
            assert (await resp.json())["instance"] == "c"
    for bogus in ("zzz", "../etc", "a\tb", "x" * 100):
        async with http.get(base(server) + "/", headers={"fly-force-instance-id": bogus}) as resp:
            assert resp.status == 200
            assert (await resp.json())["instance"] in ("a", "b", "c")
