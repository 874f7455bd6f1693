"""The new-session lane (``engines/fast/mint.py``): first visits placed and given their cookie
without the general routing path, with the same placement, cookie, headers and counters.

The placement is checked against ``decide`` over random memberships, weights and live-session
snapshots; the rest through a real proxy (fast engine) over real demo backends.
"""

from __future__ import annotations

import random
import time
from dataclasses import replace

import aiohttp
import pytest

from affinity_proxy.config import CookieConfig, PlacementConfig
from affinity_proxy.engines.fast.mint import RoomWalk, lane_input, place_with_room, with_room
from affinity_proxy.proxy.act import cookie_attributes
from affinity_proxy.routing.cookie import AffinityCookie, CookieCodec, set_cookie_value
from affinity_proxy.routing.decide import DecidePolicy, DecisionReason, Route, RouteInput, decide
from affinity_proxy.routing.model import Instance, InstanceId, InstanceState, MembershipView
from affinity_proxy.routing.placement import PlacementHow
from affinity_proxy.serve.app import ProxyServer
from tests.functional.helpers import COOKIE, admin, base, metric_value
from tests.support.backends import Backends, make_config
from tests.support.waiting import wait_until


def view_of(n: int, rng: random.Random) -> MembershipView:
    states = (InstanceState.UP, InstanceState.UP, InstanceState.UP, InstanceState.DRAINING, InstanceState.DOWN)
    instances = tuple(Instance(InstanceId(f"i{k}"), f"http://127.0.0.1:{9000 + k}", rng.randint(1, 3),
                               rng.choice(states)) for k in range(n))
    return MembershipView.build(instances, 1)


@pytest.mark.parametrize("seed", range(20))
def test_placement_is_decides(seed: int) -> None:
    """For every key, the lane's instance and ``how`` are what ``decide`` answers for a request
    with no cookie and no user key, bounded load on."""
    rng = random.Random(seed)
    view = view_of(rng.randint(1, 7), rng)
    loads = {i.id: rng.choice((0, 1, 5, 40, 300)) for i in view.instances if rng.random() < 0.8}
    factor = rng.choice((1.0, 1.05, 1.25, 2.0))
    policy = DecidePolicy(load_factor=factor)
    placed = with_room(view, loads, factor)
    for k in range(300):
        key = f"{rng.getrandbits(64):x}"
        decided = decide(RouteInput(now=1000.0, anonymous_key=key, loads=loads), view, policy)
        if placed is None:
            assert not isinstance(decided, Route), decided
            continue
        chosen, how = place_with_room(key, *placed)
        assert isinstance(decided, Route), (k, decided)
        assert (decided.instance, decided.how, decided.reason) == (chosen, how, DecisionReason.NEW)
        assert decided.set_cookie


@pytest.mark.parametrize("seed", range(20))
def test_room_walk_is_place_with_room(seed: int) -> None:
    """The lane's table of placements per ring position answers what ``place_with_room`` answers,
    for keys met for the first time and again, and is kept while the instances with room stay."""
    rng = random.Random(seed)
    view = view_of(rng.randint(1, 7), rng)
    loads = {i.id: rng.choice((0, 1, 5, 40, 300)) for i in view.instances if rng.random() < 0.8}
    factor = rng.choice((1.0, 1.05, 1.25, 2.0))
    placed = with_room(view, loads, factor)
    if placed is None:
        return
    walk = RoomWalk(*placed)
    keys = [f"{rng.getrandbits(64):x}" for _ in range(2000)]
    for key in keys + keys[:500]:
        assert walk.place(key) == place_with_room(key, *placed), key
    assert walk.reuse(with_room(view, dict(loads), factor)) is walk
    other = walk.reuse((placed[0], frozenset()))
    assert other is not walk and other is not None
    assert other.place(keys[0]) == (None, PlacementHow.OVERFLOW)
    assert walk.reuse(None) is None


def test_lane_input_is_the_dataclass_s() -> None:
    """The lane's input equals ``RouteInput(now=, anonymous_key=, loads=)``, every other field at
    its default, with a fresh ``avoid`` each time."""
    loads = {"a": 3}
    one, two = lane_input(12.5, "k1", loads), lane_input(13.0, "k2", None)
    assert one == RouteInput(now=12.5, anonymous_key="k1", loads=loads)
    assert two == RouteInput(now=13.0, anonymous_key="k2")
    assert one.avoid == {} and one.avoid is not two.avoid


def served(resp: aiohttp.ClientResponse) -> tuple[str, str]:
    """(X-Fly-Instance, the whole Set-Cookie value)."""
    cookies = resp.headers.getall("Set-Cookie")
    assert len(cookies) == 1, cookies
    return resp.headers["X-Fly-Instance"], cookies[0]


async def metrics(http: aiohttp.ClientSession, server: ProxyServer) -> str:
    async with http.get(admin(server) + "/metrics") as resp:
        return await resp.text()


def minted(server: ProxyServer) -> int:
    fast = server._fast
    assert fast is not None
    return fast.router.new_sessions.minted


async def test_first_visits_take_the_lane(backends: Backends, start_proxy, http: aiohttp.ClientSession) -> None:
    """300 sessions pinned to ``a``, then 60 first visits: each is placed within the bound (counted
    ``how=overflow`` when it skipped ``a``), gets a Set-Cookie exactly as the general path writes it
    (every attribute) naming its X-Fly-Instance, and comes back to it with that cookie."""
    cookie = replace(CookieConfig(secret="test-secret-" + "x" * 20), path="/app", domain="example.test",
                     secure=True, same_site="strict", max_age=3600)
    config = make_config(backends, engine="fast", cookie=cookie, placement=PlacementConfig(load_factor=1.25))
    server = await start_proxy(config)
    for i in range(300):
        async with http.put(admin(server) + f"/pins/old-{i}", json={"instance": "a"}) as resp:
            assert resp.status == 200
    live = server.ctx.live
    assert live is not None
    await wait_until(lambda: live.loads.get("a") == 300, timeout=30)
    codec = CookieCodec(cookie.secret)
    by_instance: dict[str, int] = {}
    for _ in range(60):
        async with http.get(base(server) + "/app/x") as resp:
            assert resp.status == 200
            instance, set_cookie = served(resp)
        value = set_cookie.split(";", 1)[0].split("=", 1)[1]
        decoded = codec.decode(value, time.time())
        assert isinstance(decoded, AffinityCookie) and decoded.user_digest == ""
        assert decoded.instance == instance
        assert set_cookie == set_cookie_value(COOKIE, codec.encode(InstanceId(instance), decoded.issued_at, ""),
                                              **cookie_attributes(config))
        by_instance[instance] = by_instance.get(instance, 0) + 1
        async with http.get(base(server) + "/app/x", headers={"Cookie": f"{COOKIE}={value}"}) as resp:
            assert resp.status == 200
            assert resp.headers["X-Fly-Instance"] == instance
    assert minted(server) == 60
    assert by_instance.get("a", 0) == 0, by_instance  # a is far over its share
    text = await metrics(http, server)
    assert metric_value(text, "affinity_requests_total", {"reason": "new"}) == 60
    assert metric_value(text, "affinity_placements_total") == 60
    overflow = metric_value(text, "affinity_placements_total", {"how": "overflow"})
    assert overflow == metric_value(text, "affinity_placements_total", {"how": str(PlacementHow.OVERFLOW)}) > 0
    assert metric_value(text, "affinity_requests_total", {"reason": "cookie"}) == 60


async def test_plain_ring_when_bounded_load_is_off(backends: Backends, start_proxy,
                                                   http: aiohttp.ClientSession) -> None:
    server = await start_proxy(make_config(backends, engine="fast", placement=PlacementConfig(load_factor=None)))
    seen = set()
    for _ in range(30):
        async with http.get(base(server) + "/") as resp:
            assert resp.status == 200
            seen.add(served(resp)[0])
    assert minted(server) == 30
    assert seen <= {"a", "b", "c"}
    text = await metrics(http, server)
    assert metric_value(text, "affinity_placements_total", {"how": "ring"}) == 30


async def test_other_requests_take_the_general_path(backends: Backends, start_proxy,
                                                    http: aiohttp.ClientSession) -> None:
    """A user key (header or query), a forced instance, an invalid affinity cookie: not the lane;
    other cookies, other query parameters and empty user-key values do not matter."""
    server = await start_proxy(make_config(backends, engine="fast"))
    for headers, path in (({"X-User-Id": "u1"}, "/"), ({}, "/?userId=u2"), ({"fly-force-instance-id": "b"}, "/"),
                          ({"Cookie": f"{COOKIE}=garbage"}, "/")):
        async with http.get(base(server) + path, headers=headers) as resp:
            assert resp.status == 200
    assert minted(server) == 0
    for headers, path in (({"Cookie": "theme=dark; lang=en"}, "/"), ({"X-User-Id": ""}, "/?page=2&userId=")):
        async with http.get(base(server) + path, headers=headers) as resp:
            assert resp.status == 200
            assert served(resp)[0] in {"a", "b", "c"}
    assert minted(server) == 2
    text = await metrics(http, server)
    assert metric_value(text, "affinity_repins_total", {"repin_reason": "invalid_cookie"}) == 1


async def test_retry_after_a_dead_instance(backends: Backends, start_proxy, http: aiohttp.ClientSession) -> None:
    """First visits while an instance is dead: placed on it before health marks it down, the
    connect failure is retried elsewhere (the general path's retry, from the lane's input); after,
    never placed on it. Either way the cookie names where the request was served."""
    server = await start_proxy(make_config(backends, engine="fast", placement=PlacementConfig(load_factor=None)))
    await backends.kill("b")
    served_on = set()
    for _ in range(30):
        async with http.get(base(server) + "/") as resp:
            assert resp.status == 200
            instance, set_cookie = served(resp)
        assert instance != "b"
        assert f"1~{instance}~" in set_cookie
        served_on.add(instance)
    assert served_on <= {"a", "c"}
