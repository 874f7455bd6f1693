"""Hostile affinity cookies: never a 5xx, never an injected header, always a fresh valid cookie."""

from __future__ import annotations

import base64
import time

import pytest

from affinity_proxy.routing.cookie import AffinityCookie, CookieCodec
from tests.functional.helpers import COOKIE, admin, affinity_cookie, base, metric_value
from tests.support.backends import make_config

HOSTILE = [
    "",
    "a",
    "garbage",
    "b",  # a bare instance id is not accepted when cookies are signed
    "1.YQ.0.x.forged",
    "1." + "A" * 3000,
    "%0d%0aSet-Cookie:%20evil=1",
    "abc\\r\\nX-Injected: yes",
    base64.urlsafe_b64encode(b"\r\nX-Injected: 1").decode(),
    '"quoted"',
    "\u00e9\u00e8",
]


@pytest.mark.parametrize("value", HOSTILE)
async def test_hostile_cookie_values(engine: str, backends, start_proxy, http, value: str) -> None:
    server = await start_proxy(make_config(backends, engine=engine))
    codec = CookieCodec(server.config.cookie.secret)
    async with http.get(base(server) + "/", headers={"Cookie": f"{COOKIE}={value}"}) as resp:
        assert resp.status == 200
        assert "X-Injected" not in resp.headers
        assert all("evil" not in h for h in resp.headers.getall("Set-Cookie", []))
        fresh = affinity_cookie(resp)
        assert fresh, "an invalid cookie earns a fresh one"
        parsed = codec.decode(fresh, now=time.time())
        assert isinstance(parsed, AffinityCookie)
        assert parsed.instance == (await resp.json())["instance"]


async def test_forged_cookie_with_other_secret_is_replaced(engine: str, backends, start_proxy, http) -> None:
    server = await start_proxy(make_config(backends, engine=engine))
    forged = CookieCodec("attacker-secret").encode("c", int(time.time()), "")
    async with http.get(base(server) + "/", headers={"Cookie": f"{COOKIE}={forged}"}) as resp:
        assert resp.status == 200
        assert affinity_cookie(resp) not in (None, forged)
    metrics = await (await http.get(admin(server) + "/metrics")).text()
    assert metric_value(metrics, "affinity_repins_total", {"repin_reason": "invalid_cookie"}) == 1


async def test_cookie_naming_unknown_instance_is_repinned(engine: str, backends, start_proxy, http) -> None:
    server = await start_proxy(make_config(backends, engine=engine))
    codec = CookieCodec(server.config.cookie.secret)
    ghost = codec.encode("ghost", int(time.time()), "")
    async with http.get(base(server) + "/", headers={"Cookie": f"{COOKIE}={ghost}"}) as resp:
        assert resp.status == 200
        fresh = affinity_cookie(resp)
        assert fresh and fresh != ghost
    metrics = await (await http.get(admin(server) + "/metrics")).text()
    assert metric_value(metrics, "affinity_repins_total", {"repin_reason": "gone"}) == 1


async def test_oversized_cookie_header_is_431_not_5xx(engine: str, backends, start_proxy, http) -> None:
    server = await start_proxy(make_config(backends, engine=engine))
    async with http.get(base(server) + "/", headers={"Cookie": f"{COOKIE}=" + "x" * 40000}) as resp:
        assert resp.status in (400, 431)


async def test_cookie_of_another_user_is_ignored(engine: str, backends, start_proxy, http) -> None:
    server = await start_proxy(make_config(backends, engine=engine))
    async with http.get(base(server) + "/", headers={"X-User-Id": "alice"}) as resp:
        alice_cookie = affinity_cookie(resp)
        alice_instance = (await resp.json())["instance"]
    # find a user whose hash lands elsewhere
    for i in range(100):
        async with http.get(base(server) + "/_affinity/session-check", params={"userId": f"bob{i}"}) as resp:
            if (await resp.json())["hash_instance"] != alice_instance:
                bob = f"bob{i}"
                break
    headers = {"X-User-Id": bob, "Cookie": f"{COOKIE}={alice_cookie}"}
    async with http.get(base(server) + "/", headers=headers) as resp:
        assert (await resp.json())["instance"] != alice_instance
        assert affinity_cookie(resp), "bob gets his own cookie"
