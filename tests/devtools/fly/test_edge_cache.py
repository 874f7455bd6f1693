"""The Fly edge stand-in's replay cache (``devtools/fly/edge_cache`` + the edge): session rules keyed
on a cookie or header, path-based entries, cacheable form only, hits straight to the target with
``fly-replay-cache-status: hit`` and no ``fly-replay-src``, ``miss`` on replays, invalidation, TTL,
both readings for a cached target that is gone, cordon, hops per request."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict

from affinity_proxy.devtools.fly import FlyEdge
from affinity_proxy.devtools.fly.edge_cache import CacheRule, ReplayCache, cacheable
from affinity_proxy.routing.replay import parse_replay_instruction

Answer = Callable[[web.Request], dict[str, str] | None]  # response headers of a replay, None: serve


@dataclass
class Machine:
    """A Machine that serves (echoing its id) unless ``answer`` returns the headers of a replay."""

    id: str
    answer: Answer = lambda _request: None
    seen: list[CIMultiDict[str]] = field(default_factory=list)
    runner: web.AppRunner | None = None
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def handle(self, request: web.Request) -> web.Response:
        self.seen.append(CIMultiDict(request.headers))
        headers = self.answer(request)
        if headers is not None:
            return web.json_response({"replaying": self.id}, status=409, headers=headers)
        return web.json_response({"machine": self.id})


@pytest.fixture
async def machines() -> AsyncIterator[Callable[..., Awaitable[Machine]]]:
    started: list[Machine] = []

    async def factory(machine_id: str, answer: Answer | None = None) -> Machine:
        m = Machine(machine_id, answer or (lambda _r: None))
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", m.handle)
        m.runner = web.AppRunner(app, access_log=None)
        await m.runner.setup()
        site = web.TCPSite(m.runner, "127.0.0.1", 0)
        await site.start()
        m.port = int(m.runner.addresses[0][1])
        started.append(m)
        return m

    yield factory
    for m in started:
        assert m.runner is not None
        await m.runner.cleanup()


def sticky(owner: str, cookie: str = "sid", form: str = "prefer_instance={owner}") -> Answer:
    """Replay every request whose ``cookie`` is not this Machine's to ``owner`` (the cookie's value
    before ``:``), like an affinity proxy would (never twice, never after Fly could not deliver)."""

    def answer(request: web.Request) -> dict[str, str] | None:
        value = request.cookies.get(cookie, "")
        target = value.partition(":")[0]
        if not target or target == owner or {"fly-replay-src", "fly-preferred-instance-unavailable"} & {
                h.lower() for h in request.headers}:
            return None
        return {"fly-replay": form.format(owner=target)}

    return answer


async def get(http: aiohttp.ClientSession, edge: FlyEdge, path: str = "/", cookie: str | None = None,
              **headers: str) -> tuple[int, str]:
    if cookie is not None:
        headers["Cookie"] = f"sid={cookie}"
    async with http.get(edge.url + path, headers=headers) as resp:
        data = await resp.json()
        return resp.status, str(data.get("machine"))


# ----------------------------------------------------------------------------- the pure cache


def test_rules_refuse_what_fly_refuses() -> None:
    with pytest.raises(ValueError, match="at least 10"):
        CacheRule("sid", ttl_seconds=9)
    with pytest.raises(ValueError, match="cookie or header"):
        CacheRule("sid", type="query")  # type: ignore[arg-type]
    rule = CacheRule.from_toml({"path_prefix": "/", "ttl_seconds": 30, "type": "cookie", "name": "sid"})
    assert rule == CacheRule("sid", "cookie", "/", 30)


def test_only_the_cacheable_form_is_cacheable() -> None:
    assert cacheable(parse_replay_instruction("prefer_instance=m2"))
    assert cacheable(parse_replay_instruction("instance=m2"))
    for value in ("instance=m2;state=affinity", "instance=m2;timeout=5s", "prefer_instance=m2;fallback=prefer_self"):
        assert not cacheable(parse_replay_instruction(value))


def test_longest_prefix_wins_per_host_and_key() -> None:
    cache = ReplayCache((CacheRule("sid", path_prefix="/"), CacheRule("X-Api", type="header", path_prefix="/api/*")))
    cookie = {"Cookie": "sid=u1"}
    assert cache.key_for("a.example:8080", "/x", cookie, 0) == ("session", "a.example", "/", "cookie", "sid", "u1")
    assert cache.key_for("a.example", "/api/v1", cookie, 0) is None  # the /api/* rule wins; no X-Api header
    assert cache.key_for("a.example", "/api/v1", {"X-Api": "k"}, 0) == (
        "session", "a.example", "/api/*", "header", "X-Api", "k")
    instr = parse_replay_instruction("prefer_instance=m2")
    lookup = cache.lookup("a.example", "/x", cookie, 0)
    assert cache.store(lookup, "a.example", "/x", "prefer_instance=m2", instr, {}, now=0)
    assert cache.lookup("a.example", "/y", cookie, 1).value == "prefer_instance=m2"
    assert cache.lookup("b.example", "/y", cookie, 1).value is None  # per hostname
    assert cache.lookup("a.example", "/y", {"Cookie": "sid=u2"}, 1).value is None  # per cookie value
    assert cache.lookup("a.example", "/y", cookie, 60).value is None  # ttl 60 s from the store
    assert cache.counts["expired"] == 1


def test_path_pattern_needs_a_ttl_of_10_and_must_match() -> None:
    cache = ReplayCache()
    instr = parse_replay_instruction("instance=m2")
    lookup = cache.lookup("h", "/a/1", {}, 0)
    assert not cache.store(lookup, "h", "/a/1", "instance=m2", instr,
                           {"fly-replay-cache": "/a/*", "fly-replay-cache-ttl-secs": "5"}, now=0)
    assert not cache.store(lookup, "h", "/a/1", "instance=m2", instr,
                           {"fly-replay-cache": "/b/*", "fly-replay-cache-ttl-secs": "10"}, now=0)
    assert cache.store(lookup, "h", "/a/1", "instance=m2", instr,
                       {"fly-replay-cache": "h/a/*", "fly-replay-cache-ttl-secs": "10"}, now=0)
    assert cache.lookup("h", "/a/2", {}, 5).value == "instance=m2"
    assert cache.lookup("h", "/b", {}, 5).value is None
    assert cache.lookup("h", "/a/2", {}, 10).value is None


# ----------------------------------------------------------------------------- the edge


async def test_session_cache_hits_skip_the_origin(machines, http) -> None:
    m1 = await machines("m1", sticky("m1"))
    m2 = await machines("m2", sticky("m2"))
    edge = FlyEdge({"m1": m1.url, "m2": m2.url}, replay_cache=[CacheRule("sid")])
    async with edge:
        # round robin: the first request lands on m1, which replays it to m2 (stored: cacheable)
        assert await get(http, edge, cookie="m2:u") == (200, "m2")
        assert edge.cache.counts["stores"] == 1
        assert m2.seen[-1]["fly-replay-cache-status"] == "miss" and "fly-replay-src" in m2.seen[-1]
        for _ in range(6):
            assert await get(http, edge, cookie="m2:u") == (200, "m2")
            assert m2.seen[-1]["fly-replay-cache-status"] == "hit"
            assert "fly-replay-src" not in m2.seen[-1]
        assert len(m1.seen) == 1, "hits never reach the origin"
        assert edge.cache_outcomes == {"replayed": 1, "hit": 6}
        assert edge.hop_counts == {2: 1, 1: 6}
        # another cookie value is another key; a request without the cookie is never looked up
        assert await get(http, edge, cookie="m2:other") == (200, "m2")
        _, served = await get(http, edge)
        assert "fly-replay-cache-status" not in (m1 if served == "m1" else m2).seen[-1]


async def test_a_replay_with_state_timeout_or_fallback_is_not_cached(machines, http) -> None:
    m1 = await machines("m1", sticky("m1", form="instance={owner};state=affinity;timeout=5s;fallback=prefer_self"))
    m2 = await machines("m2", sticky("m2", form="instance={owner};state=affinity;timeout=5s;fallback=prefer_self"))
    edge = FlyEdge({"m1": m1.url, "m2": m2.url}, replay_cache=[CacheRule("sid")])
    async with edge:
        for _ in range(4):
            assert await get(http, edge, cookie="m2:u") == (200, "m2")
    assert edge.cache.counts["stores"] == 0 and edge.cache.counts["refused"] == 2
    assert edge.cache_outcomes == {"replayed": 2, "direct": 2}


async def test_invalidate_drops_the_entry_and_its_replay_is_followed(machines, http) -> None:
    moved: dict[str, str] = {}  # cookie value -> the Machine that owns it now

    def owner_of(me: str) -> Answer:
        def answer(request: web.Request) -> dict[str, str] | None:
            value = request.cookies.get("sid", "")
            target = moved.get(value, value.partition(":")[0])
            if target == me:
                return None
            headers = {"fly-replay": f"prefer_instance={target}"}
            if request.headers.get("fly-replay-cache-status") == "hit":
                headers["fly-replay-cache"] = "invalidate"
            return headers
        return answer

    m1, m2, m3 = [await machines(m, owner_of(m)) for m in ("m1", "m2", "m3")]
    edge = FlyEdge({m.id: m.url for m in (m1, m2, m3)}, replay_cache=[CacheRule("sid")])
    async with edge:
        assert await get(http, edge, cookie="m2:u") == (200, "m2")  # m1 -> m2, stored
        assert await get(http, edge, cookie="m2:u") == (200, "m2")  # hit
        moved["m2:u"] = "m3"  # the user now belongs to m3 (re-pinned, drained, ...)
        assert await get(http, edge, cookie="m2:u") == (200, "m3")  # hit on m2 -> invalidate + replay to m3
        assert edge.cache.counts["invalidations"] == 1 and len(edge.cache) == 0
        assert "fly-replay-src" in m3.seen[-1], "the invalidating replay is a normal replay"
        assert edge.cache_outcomes["hit_replayed"] == 1
        assert max(edge.hop_counts) == 2
        # the next request misses and is cached again (a replay from a cache-hit target is never stored)
        assert await get(http, edge, cookie="m2:u") == (200, "m3")
        assert await get(http, edge, cookie="m2:u") == (200, "m3")
        assert m3.seen[-1]["fly-replay-cache-status"] in ("hit", "miss")


@pytest.mark.parametrize("reading", ["replay", "evict"])
async def test_a_cached_target_that_is_gone(machines, http, reading: str) -> None:
    m1 = await machines("m1", sticky("m1"))
    m2 = await machines("m2", sticky("m2"))
    m3 = await machines("m3")
    edge = FlyEdge({"m1": m1.url, "m2": m2.url, "m3": m3.url}, replay_cache=[CacheRule("sid")],
                   cache_gone_target=reading)  # type: ignore[arg-type]
    async with edge:
        assert await get(http, edge, cookie="m3:u") == (200, "m3")  # m1 -> m3, stored
        edge.set_machine_state("m3", "destroyed")
        status, served = await get(http, edge, cookie="m3:u")
        assert status == 200 and served in ("m1", "m2")
        last = m1.seen[-1] if served == "m1" else m2.seen[-1]
        if reading == "replay":  # delivered elsewhere as prefer_instance would be
            assert last["fly-replay-cache-status"] == "hit"
            assert last["fly-preferred-instance-unavailable"] == "m3"
            assert len(edge.cache) == 1
        else:  # entry dropped, the uncached path (origin asked again)
            assert last.get("fly-replay-cache-status") != "hit"
            assert edge.cache.counts["evicted"] == 1
            assert edge.cache.counts["stores"] == 2  # the origin answered again (this fake still names m3)


async def test_path_based_cache_and_cordon(machines, http) -> None:
    def leader(request: web.Request) -> dict[str, str] | None:
        return {"fly-replay": "instance=m2", "fly-replay-cache": "/w/*", "fly-replay-cache-ttl-secs": "10"}

    m1 = await machines("m1", leader)
    m2 = await machines("m2")
    edge = FlyEdge({"m1": m1.url, "m2": m2.url})
    async with edge:
        assert await get(http, edge, "/w/1") == (200, "m2")  # m1 -> m2 and cached for /w/*
        for _ in range(3):
            assert await get(http, edge, "/w/2") == (200, "m2")
        assert len(m1.seen) == 1 and edge.cache_outcomes["hit"] == 3
        edge.cordon("m2")  # load balancing avoids it; replays and the cached replay still reach it
        assert await get(http, edge, "/other") == (200, "m2")
        assert len(m1.seen) == 2 and edge.cache.counts["refused"] == 1  # /w/* does not match /other
        assert await get(http, edge, "/w/3") == (200, "m2")
        assert len(m1.seen) == 2
