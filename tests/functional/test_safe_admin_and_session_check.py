"""Safe by default, against a running proxy: the admin listener refuses what a web page could send
(cross-site requests: 403; DNS-rebinding Host names: 421; changes without a token off loopback:
401), and the public session-check explains only the caller's own request (``session_check.lookup``).

Real aiohttp clients that set ``Origin``, ``Sec-Fetch-Site`` and ``Host`` as a browser would.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from affinity_proxy.config import AdminConfig, SessionCheckConfig, UserKeySourceConfig
from tests.functional.helpers import admin, base
from tests.support.backends import make_config

HEADER_KEY = (UserKeySourceConfig("header", "X-User-Id"),)  # no query source: ?userId= is a lookup


def _state(server, instance: str) -> str:  # type: ignore[no-untyped-def]
    return str(server.ctx.membership.current().state_of(instance).value)


# --- admin listener: cross-site requests and DNS rebinding -------------------------------------------


async def test_the_csrf_request_from_the_issue_is_refused(engine: str, backends, start_proxy, http) -> None:
    """No token (the default): a page on evil.example posting a drain through the operator's browser."""
    server = await start_proxy(make_config(backends, engine=engine))
    port = server.admin_port
    attacks = [
        {"Origin": "http://evil.example", "Host": "evil.example"},  # the request from the issue
        {"Origin": "http://evil.example"},  # Host is 127.0.0.1:port, as a browser sends it
        {"Origin": "null"},  # sandboxed iframe, file://, data: URL
        {"Origin": f"http://127.0.0.2:{port}"},  # another loopback origin
        {"Origin": f"http://127.0.0.1:{port + 1}"},  # another port is another origin
        {"Origin": f"http://evil.example:{port}", "Host": f"evil.example:{port}"},  # rebinding page, same port
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site"},  # a sibling subdomain is not this origin either
        {"Origin": "not a url"},
    ]
    for headers in attacks:
        async with http.post(admin(server) + "/instances/b/drain", headers=headers) as resp:
            assert resp.status == 403, headers
            doc = await resp.json()
            assert doc["error"] == "cross_origin" and "evil" not in doc["message"]
        async with http.put(admin(server) + "/pins/victim", json={"instance": "a"}, headers=headers) as resp:
            assert resp.status == 403, headers
        async with http.get(admin(server) + "/pins", headers=headers) as resp:
            assert resp.status == 403, headers
    assert _state(server, "b") == "up", "no request drained b"
    assert await server.ctx.store.get("victim") is None


async def test_the_admin_listeners_own_origin_and_tools_are_served(engine: str, backends, start_proxy, http) -> None:
    server = await start_proxy(make_config(backends, engine=engine))
    port = server.admin_port
    fine = [
        {},  # curl, the CLI, Prometheus: no Origin, no Sec-Fetch-*
        {"Origin": f"http://127.0.0.1:{port}"},  # the dashboard's own POSTs
        {"Origin": f"http://localhost:{port}", "Host": f"localhost:{port}"},
        {"Origin": f"http://[::1]:{port}", "Host": f"[::1]:{port}"},
        {"Sec-Fetch-Site": "same-origin"},
        {"Sec-Fetch-Site": "none"},  # typed into the address bar
    ]
    for headers in fine:
        async with http.post(admin(server) + "/instances/b/drain", headers=headers) as resp:
            assert resp.status == 200, (headers, await resp.text())
        async with http.post(admin(server) + "/instances/b/undrain", headers=headers) as resp:
            assert resp.status == 200, headers


@pytest.mark.parametrize("host", [
    "evil.example", "evil.example:{port}", "EVIL.example", "localhost.evil.example", "127.0.0.1.nip.io:{port}",
    "admin.internal", "", "127.0.0.1:notaport", "::1", "[::1", "a b",
])  # fmt: skip
async def test_a_rebinding_host_gets_421(engine: str, backends, start_proxy, http, host: str) -> None:
    server = await start_proxy(make_config(backends, engine=engine))
    await server.ctx.store.set("victim-user", "a")  # type: ignore[arg-type]
    for method, path in (("GET", "/pins"), ("GET", "/metrics"), ("GET", "/dashboard"), ("POST", "/reap")):
        async with http.request(method, admin(server) + path,
                                headers={"Host": host.format(port=server.admin_port)}) as resp:
            body = await resp.read()
            assert resp.status == 421, (host, path, resp.status)
            assert b"victim" not in body
            assert (await resp.json())["error"] == "misdirected_host"


@pytest.mark.parametrize("host", [
    "127.0.0.1", "127.0.0.1:{port}", "10.1.2.3:9091", "[::1]:{port}", "[fdaa:0:1::3]:9091", "[::1]",
    "localhost", "LOCALHOST:{port}", "localhost.:{port}", "admin.internal:{port}", "Admin.Internal.",
])  # fmt: skip
async def test_ip_literals_localhost_and_allowed_hosts_are_served(engine: str, backends, start_proxy, http,
                                                                  host: str) -> None:
    server = await start_proxy(make_config(backends, engine=engine,
                                           admin=AdminConfig(allowed_hosts=("admin.internal",))))
    async with http.get(admin(server) + "/metrics", headers={"Host": host.format(port=server.admin_port)}) as resp:
        assert resp.status == 200, host
    async with http.get(admin(server) + "/pins", headers={"Host": "other.internal"}) as resp:
        assert resp.status == 421, "only the listed names"


async def test_changes_need_a_token_when_the_admin_listener_is_not_on_loopback(engine: str, backends, start_proxy,
                                                                               http) -> None:
    """``serve`` refuses such a config (exit 2); a server built in code still refuses every change."""
    server = await start_proxy(make_config(backends, engine=engine, admin_listen="0.0.0.0:0"))
    assert not server.config.admin_on_loopback
    for method, path in (("POST", "/instances/b/drain"), ("PUT", "/pins/u"), ("DELETE", "/pins/u"),
                         ("POST", "/reap"), ("POST", "/reload"), ("POST", "/session-check")):
        body = {"instance": "a", "userId": "u", "pin": True}
        async with http.request(method, admin(server) + path, json=body) as resp:
            assert resp.status == 401, (method, path)
            assert (await resp.json())["error"] == "token_required"
    assert _state(server, "b") == "up" and await server.ctx.store.get("u") is None
    async with http.get(admin(server) + "/instances") as resp:  # reads stay open (as the contract says)
        assert resp.status == 200
    guarded = await start_proxy(make_config(backends, engine=engine, admin_listen="0.0.0.0:0",
                                            admin=AdminConfig(token="tk-1")))
    async with http.post(admin(guarded) + "/instances/b/drain", headers={"Authorization": "Bearer tk-1"}) as resp:
        assert resp.status == 200


async def test_the_guard_runs_before_the_token(engine: str, backends, start_proxy, http) -> None:
    """A cross-site request is refused even when it carries a valid token (a browser would attach none,
    but an exfiltrated dashboard tab could)."""
    server = await start_proxy(make_config(backends, engine=engine, admin=AdminConfig(token="tk-2")))
    headers = {"Authorization": "Bearer tk-2", "Origin": "http://evil.example"}
    async with http.post(admin(server) + "/instances/b/drain", headers=headers) as resp:
        assert resp.status == 403
    rebinding = {"Authorization": "Bearer tk-2", "Host": "evil.example"}
    async with http.get(admin(server) + "/pins", headers=rebinding) as resp:
        assert resp.status == 421
    assert _state(server, "b") == "up"


# --- public session-check: the caller's own request only ---------------------------------------------


async def test_public_session_check_does_not_look_up_other_users(engine: str, backends, start_proxy, http) -> None:
    server = await start_proxy(make_config(backends, engine=engine, user_key=HEADER_KEY))
    await server.ctx.store.set("alice", "b")  # type: ignore[arg-type]
    url = base(server) + "/_affinity/session-check"
    for request in (http.get(url, params={"userId": "alice"}),
                    http.get(url, params={"userId": "alice"}, headers={"X-User-Id": "mallory"}),
                    http.post(url, json={"userId": "alice"}),
                    http.post(url, json={"userId": "alice", "testAffinity": True}, headers={"X-User-Id": "bob"})):
        async with request as resp:
            text = await resp.text()
            assert resp.status == 403, text
            assert (await resp.json())["error"] == "lookup_forbidden"
            assert '"b"' not in text and "expires" not in text and "alice" not in text


async def test_public_session_check_explains_the_callers_own_request_without_activity_data(
        engine: str, backends, start_proxy, http) -> None:  # fmt: skip
    server = await start_proxy(make_config(backends, engine=engine, user_key=HEADER_KEY))
    await server.ctx.store.set("alice", "b")  # type: ignore[arg-type]
    await server.ctx.store.set("carol", "a")  # type: ignore[arg-type]
    url = base(server) + "/_affinity/session-check"
    own = {"X-User-Id": "alice"}
    for request in (http.get(url, headers=own), http.get(url, params={"userId": "alice"}, headers=own),
                    http.post(url, json={"userId": "alice", "testAffinity": True}, headers=own),
                    http.post(url, json={}, headers=own)):
        async with request as resp:
            doc = await resp.json()
            assert resp.status == 200, doc
        assert doc["user_key"] == "alice" and doc["pin"] == {"instance": "b"}, "no expires_in"
        assert doc["decision"]["instance"] == "b"
        assert all(set(i) == {"id", "state", "weight", "region"} for i in doc["instances"]), "no pin counts"
    async with http.get(url) as resp:  # anonymous
        doc = await resp.json()
        assert resp.status == 200 and doc["user_key"] is None and "pins" not in doc["instances"][0]
    async with http.get(admin(server) + "/session-check", params={"userId": "alice"}) as resp:  # operators: all
        doc = await resp.json()
        assert resp.status == 200 and doc["pin"]["instance"] == "b" and doc["pin"]["expires_in"] > 0
        assert {i["id"]: i["pins"] for i in doc["instances"]} == {"a": 1, "b": 1, "c": 0}


async def test_lookup_public_restores_the_full_public_answer(engine: str, backends, start_proxy, http) -> None:
    server = await start_proxy(make_config(backends, engine=engine, user_key=HEADER_KEY,
                                           session_check=SessionCheckConfig(lookup="public")))
    await server.ctx.store.set("alice", "b")  # type: ignore[arg-type]
    async with http.get(base(server) + "/_affinity/session-check", params={"userId": "alice"}) as resp:
        doc = await resp.json()
        assert resp.status == 200 and doc["pin"]["instance"] == "b" and doc["pin"]["expires_in"] > 0
        assert {i["id"]: i["pins"] for i in doc["instances"]}["b"] == 1
    body = {"userId": "alice", "pin": True}  # looking up is public; pinning someone else never is
    async with http.post(base(server) + "/_affinity/session-check", json=body) as resp:
        assert resp.status == 403 and (await resp.json())["error"] == "pin_forbidden"


async def test_the_query_user_key_counts_as_the_callers_own(engine: str, backends, start_proxy, http) -> None:
    """With ``user_key: [{query: userId}]`` the request itself carries ?userId=: routing it reveals the
    same instance, so it is explained, still without expiry or counts."""
    server = await start_proxy(make_config(backends, engine=engine))  # header X-User-Id, then query userId
    await server.ctx.store.set("dora", "c")  # type: ignore[arg-type]
    async with http.get(base(server) + "/_affinity/session-check", params={"userId": "dora"}) as resp:
        doc = await resp.json()
        assert resp.status == 200 and doc["pin"] == {"instance": "c"}


async def test_session_check_lookup_is_hot_reloadable_config(engine: str, backends, start_proxy, http) -> None:
    server = await start_proxy(make_config(backends, engine=engine, user_key=HEADER_KEY))
    url = base(server) + "/_affinity/session-check"
    async with http.get(url, params={"userId": "zed"}) as resp:
        assert resp.status == 403
    server.ctx.config = replace(server.ctx.config, session_check=SessionCheckConfig(lookup="public"))
    async with http.get(url, params={"userId": "zed"}) as resp:
        assert resp.status == 200
