"""Health, session-check (GET and POST) and the admin API against a running proxy."""

from __future__ import annotations

from dataclasses import replace

from tests.functional.helpers import COOKIE, admin, affinity_cookie, base, metric_value
from tests.support.backends import make_config
from tests.support.waiting import wait_until


async def test_health_reports_ok_with_checks(engine: str, backends, start_proxy, http) -> None:
    server = await start_proxy(make_config(backends, engine=engine))
    async with http.get(base(server) + "/_affinity/health") as resp:
        doc = await resp.json()
        assert resp.status == 200
        assert doc["status"] == "ok"
        assert doc["checks"]["instances"]["routable"] == 3
        assert isinstance(doc["uptime_seconds"], int)
    async with http.get(admin(server) + "/health") as resp:
        assert resp.status == 200


async def test_session_check_explains_and_changes_nothing(engine: str, backends, start_proxy, http) -> None:
    server = await start_proxy(make_config(backends, engine=engine))
    async with http.get(base(server) + "/_affinity/session-check", params={"userId": "carol"}) as resp:
        doc = await resp.json()
    assert doc["user_key"] == "carol"
    assert doc["pin"] is None
    assert doc["decision"]["action"] == "forward"
    assert doc["decision"]["reason"] == "hash"
    assert doc["decision"]["instance"] == doc["hash_instance"]
    assert {i["id"] for i in doc["instances"]} == {"a", "b", "c"}
    assert doc["store"] == {"kind": "memory", "ok": True}
    assert doc["cookie"]["present"] is False
    assert await server.ctx.store.get("carol") is None, "GET session-check must not pin"

    async with http.get(base(server) + "/", headers={"X-User-Id": "carol"}) as resp:
        cookie = affinity_cookie(resp)
    headers = {"Cookie": f"{COOKIE}={cookie}"}
    async with http.get(base(server) + "/_affinity/session-check", params={"userId": "carol"},
                        headers=headers) as resp:
        doc = await resp.json()
    assert doc["pin"]["instance"] == doc["decision"]["instance"]
    assert doc["cookie"]["valid"] is True and doc["cookie"]["for_this_user"] is True
    assert doc["decision"]["reason"] == "cookie"


async def test_session_check_post_tests_affinity_and_pins(engine: str, backends, start_proxy, http) -> None:
    server = await start_proxy(make_config(backends, engine=engine))
    body = {"userId": "dave", "testAffinity": True, "pin": True}
    async with http.post(base(server) + "/_affinity/session-check", json=body, headers={"X-User-Id": "dave"}) as resp:
        doc = await resp.json()
        assert resp.status == 200
        assert affinity_cookie(resp)
    assert doc["stable"] is True
    pin = await server.ctx.store.get("dave")
    assert pin is not None and pin.instance == doc["pinned"]["instance"]
    for bad in (b"not json", b"[1,2]", b'{"userId": 5}'):
        async with http.post(base(server) + "/_affinity/session-check", data=bad,
                             headers={"Content-Type": "application/json"}) as resp:
            assert resp.status == 400


async def test_admin_pins_and_instances_api(engine: str, backends, start_proxy, http) -> None:
    server = await start_proxy(make_config(backends, engine=engine))
    a = admin(server)
    async with http.put(a + "/pins/erin", json={"instance": "b"}) as resp:
        assert resp.status == 200
    async with http.get(base(server) + "/", headers={"X-User-Id": "erin"}) as resp:
        assert (await resp.json())["instance"] == "b"
    async with http.get(a + "/pins/erin") as resp:
        assert (await resp.json())["instance"] == "b"
    async with http.get(a + "/pins", params={"instance": "b"}) as resp:
        assert [p["user"] for p in (await resp.json())["pins"]] == ["erin"]
    async with http.put(a + "/pins/erin", json={"instance": "nope"}) as resp:
        assert resp.status == 400
    async with http.get(a + "/instances") as resp:
        rows = {r["id"]: r for r in (await resp.json())["instances"]}
        assert rows["b"]["pins"] == 1 and rows["b"]["state"] == "up"
    async with http.delete(a + "/pins/erin") as resp:
        assert resp.status == 200
    async with http.delete(a + "/pins/erin") as resp:
        assert resp.status == 404
    metrics = await (await http.get(a + "/metrics")).text()
    assert metric_value(metrics, "affinity_repins_total", {"repin_reason": "operator"}) == 1


async def test_drain_keeps_pinned_users_and_sends_new_ones_elsewhere(engine: str, backends, start_proxy, http) -> None:
    server = await start_proxy(make_config(backends, engine=engine))
    a = admin(server)
    pinned = {}
    for i in range(60):
        async with http.get(base(server) + "/", headers={"X-User-Id": f"d{i}"}) as resp:
            pinned[f"d{i}"] = (await resp.json())["instance"]
    async with http.post(a + "/instances/a/drain") as resp:
        assert (await resp.json())["state"] == "draining"
    for user, instance in pinned.items():
        async with http.get(base(server) + "/", headers={"X-User-Id": user}) as resp:
            assert (await resp.json())["instance"] == instance
    for i in range(60):
        async with http.get(base(server) + "/", headers={"X-User-Id": f"new{i}"}) as resp:
            assert (await resp.json())["instance"] != "a"
    async with http.post(a + "/instances/a/undrain") as resp:
        assert (await resp.json())["state"] == "up"
    async with http.post(a + "/instances/zzz/drain") as resp:
        assert resp.status == 404


async def test_reaper_removes_pins_of_dead_instance(engine: str, backends, start_proxy, http) -> None:

    from affinity_proxy.config import ReaperConfig

    server = await start_proxy(make_config(backends, engine=engine, reaper=ReaperConfig(interval=0.2, grace=0.3)))
    for i in range(30):
        async with http.get(base(server) + "/", headers={"X-User-Id": f"r{i}"}):
            pass
    counts = await server.ctx.store.counts()
    on_c = counts.get("c", 0)
    assert on_c > 0
    async with http.post(admin(server) + "/reap", params={"dry_run": "1"}) as resp:
        assert (await resp.json())["total"] == 0
    await backends.stop("c")
    await wait_until(lambda: server.ctx.membership.current().state_of("c").value == "down", timeout=5)

    async def reaped() -> bool:
        return (await server.ctx.store.counts()).get("c", 0) == 0

    await wait_until(reaped, timeout=5)
    metrics = await (await http.get(admin(server) + "/metrics")).text()
    assert metric_value(metrics, "affinity_orphaned_pins_reaped_total") == on_c


async def test_admin_token_is_required_when_set(engine: str, backends, start_proxy, http) -> None:
    from affinity_proxy.config import AdminConfig

    server = await start_proxy(make_config(backends, engine=engine, admin=AdminConfig(token="s3cret-token")))
    async with http.get(admin(server) + "/instances") as resp:
        assert resp.status == 401
    async with http.get(admin(server) + "/instances", headers={"Authorization": "Bearer wrong"}) as resp:
        assert resp.status == 401
    async with http.get(admin(server) + "/instances", headers={"Authorization": "Bearer s3cret-token"}) as resp:
        assert resp.status == 200


async def test_public_session_check_cannot_pin_someone_else(engine: str, backends, start_proxy, http) -> None:
    from affinity_proxy.config import SessionCheckConfig

    server = await start_proxy(make_config(backends, engine=engine))
    body = {"userId": "victim", "pin": True}
    async with http.post(base(server) + "/_affinity/session-check", json=body) as resp:
        assert resp.status == 403
        assert (await resp.json())["error"] == "lookup_forbidden"  # session_check.lookup: admin (default)
    server.ctx.config = replace(server.ctx.config, session_check=SessionCheckConfig(lookup="public"))
    async with http.post(base(server) + "/_affinity/session-check", json=body) as resp:
        assert resp.status == 403
        assert (await resp.json())["error"] == "pin_forbidden"  # looking up is public, pinning is not
    assert await server.ctx.store.get("victim") is None
    async with http.post(base(server) + "/_affinity/session-check", json=body,
                         headers={"X-User-Id": "victim"}) as resp:
        assert resp.status == 200, "a user may pin itself"
    async with http.post(admin(server) + "/session-check", json={"userId": "other", "pin": True}) as resp:
        assert resp.status == 200, "the admin listener may pin anyone"
    assert await server.ctx.store.get("other") is not None


async def test_public_metrics_opens_only_metrics_and_health(engine: str, backends, start_proxy, http) -> None:
    from affinity_proxy.config import AdminConfig

    server = await start_proxy(make_config(backends, engine=engine,
                                           admin=AdminConfig(token="tok-123", public_metrics=True)))
    for path in ("/metrics", "/health"):
        async with http.get(admin(server) + path) as resp:
            assert resp.status == 200, path
    for method, path in (("GET", "/instances"), ("GET", "/pins"), ("POST", "/reap"), ("POST", "/reload"),
                         ("POST", "/metrics")):
        async with http.request(method, admin(server) + path) as resp:
            assert resp.status == 401, (method, path)
