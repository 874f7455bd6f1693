"""The fast engine's routing adapter: a parsed request head -> ``RouteInput`` -> decision.

Reads the facts off raw header bytes (cookie jar, user key, ``fly-force-instance-id``, fly
signals, body framing) and hands them to the engine-neutral code: ``proxy.resolve.make_route_input``
and ``resolve`` (store look-ups and operations), ``proxy.fly`` (signals, replay source, plan).
``quick`` answers without I/O whenever ``decide`` needs no store call (a fresh cookie, a forced
instance, a new anonymous session): the hot path then never creates a coroutine. No sockets here.

The hot-route cache (``HotRoutes``, below) lets a pinned client's repeat requests skip routing
altogether: for the decisions that need no store call and set no cookie (a fresh, valid affinity
cookie, or a forced instance), ``decide`` answers the same for every repeat of the same inputs
until the cookie goes stale (``cookie.revalidate_after``) or expires, or until the snapshot, codec,
policy or config object is replaced (membership change, health change, reload). It keeps such
decisions (and in fly mode the replay plan) keyed by the raw bytes of those inputs and returns
them only while all of that still holds, so a hit is exactly what ``decide`` would have answered.
Anything else (anonymous sessions, pins, re-pins, fly-replay headers) is never cached.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from affinity_proxy.proxy import fly
from affinity_proxy.proxy.act import CookieWriter
from affinity_proxy.proxy.context import ProxyContext
from affinity_proxy.proxy.resolve import make_route_input
from affinity_proxy.routing.cookie_header import parse_cookie_header
from affinity_proxy.routing.decide import (
    Decision,
    DecisionReason,
    NeedPin,
    RepinReason,
    Route,
    RouteInput,
    decide,
)
from affinity_proxy.routing.model import InstanceId
from affinity_proxy.routing.replay import (
    NO_SIGNALS,
    PREFERRED_UNAVAILABLE_HEADER,
    REPLAY_CACHE_STATUS_HEADER,
    REPLAY_FAILED_HEADER,
    REPLAY_SRC_HEADER,
    BodyInfo,
    Plan,
    ReplaySource,
    Triage,
)
from affinity_proxy.routing.userkey import extract_user_key

from .head import Query, RequestHead, text
from .mint import NewSessions
from .wire import FORCE_INSTANCE_B

log = logging.getLogger("affinity_proxy.proxy")

_CACHE_SIZE = 4096
_FORCE = FORCE_INSTANCE_B
_SRC = REPLAY_SRC_HEADER.encode()
_UNAVAILABLE = PREFERRED_UNAVAILABLE_HEADER.encode()
_FAILED = REPLAY_FAILED_HEADER.encode()
_CACHE_STATUS = REPLAY_CACHE_STATUS_HEADER.encode()


class Router:
    """Per-process routing state of the fast engine (caches, metric children). One event loop."""

    def __init__(self, ctx: ProxyContext) -> None:
        self.ctx = ctx
        self.fly = ctx.config.mode == "fly"
        self.local = InstanceId(ctx.config.fly.machine_id or "") if self.fly else None
        self._cookies: dict[bytes, dict[str, str]] = {}
        self._digests: dict[str, str] = {}
        self._digest_codec: object = None
        self.cookies_out = CookieWriter()  # the affinity Set-Cookie rule (``proxy.act``)
        self.new_sessions = NewSessions(ctx, fly=self.fly, cookies=self.cookies,  # first visits (``mint``)
                                        writer=self.cookies_out)

    # ------------------------------------------------------------------ request -> RouteInput

    def cookies(self, head: RequestHead) -> dict[str, str]:
        raw = head.first.get(b"cookie")
        if raw is None:
            return {}
        jar = self._cookies.get(raw)
        if jar is None:
            jar = parse_cookie_header(text(raw))
            if len(self._cookies) >= _CACHE_SIZE:
                self._cookies.clear()
            self._cookies[raw] = jar
        return jar

    def user_digest(self, user_key: str | None) -> str:
        codec = self.ctx.codec
        if user_key is None:
            return ""
        if codec is not self._digest_codec:
            self._digests.clear()
            self._digest_codec = codec
        digest = self._digests.get(user_key)
        if digest is None:
            digest = codec.user_digest(user_key)
            if len(self._digests) >= _CACHE_SIZE:
                self._digests.clear()
            self._digests[user_key] = digest
        return digest

    def route_input(self, head: RequestHead, avoid: dict[InstanceId, RepinReason]) -> RouteInput:
        """``resolve.make_route_input`` for a raw head. No I/O; HMACs are cached."""
        ctx = self.ctx
        jar = self.cookies(head)
        user_key = extract_user_key(ctx.user_key_sources, head, Query(head.target), jar)  # type: ignore[arg-type]
        force = head.first.get(_FORCE)
        return make_route_input(ctx, cookie_value=jar.get(ctx.config.cookie.name), user_key=user_key,
                                user_digest=self.user_digest(user_key),
                                force=text(force) if force is not None else None, avoid=avoid)

    def quick(self, inp: RouteInput) -> Decision | None:
        """The decision when it needs no store call (what ``proxy.resolve.resolve`` would return),
        else None: the caller then awaits ``resolve``."""
        decision = decide(inp, self.ctx.membership.current(), self.ctx.policy)
        if isinstance(decision, NeedPin):
            return None
        if isinstance(decision, Route) and (decision.store_op is not None or
                                            (decision.touch and inp.user_key is not None and inp.store_ok)):
            return None
        return decision

    # ------------------------------------------------------------------ fly mode

    def replay_source(self, head: RequestHead) -> ReplaySource | None:
        raw = head.first.get(_SRC)
        return None if raw is None else fly.source(text(raw))

    def repin_signals(self, head: RequestHead) -> Triage:
        """``fly.signals`` for a raw head."""
        first = head.first
        raw_unavailable, raw_failed = first.get(_UNAVAILABLE), first.get(_FAILED)
        if raw_unavailable is None and raw_failed is None:
            return NO_SIGNALS
        return fly.signals(self.ctx, text(raw_unavailable) if raw_unavailable is not None else None,
                           text(raw_failed) if raw_failed is not None else None)

    def cache_hit(self, head: RequestHead) -> bool:
        """``fly.is_cache_hit`` for a raw head: Fly's replay cache sent the request here."""
        raw = head.first.get(_CACHE_STATUS)
        return raw is not None and fly.is_cache_hit(text(raw))

    def adopted(self, inp: RouteInput, src: ReplaySource | None) -> Route | None:
        assert self.local is not None
        return fly.replayed_new_session(inp, src, self.local)

    def plan(self, head: RequestHead, route: Route, src: ReplaySource | None, signals: Triage = NO_SIGNALS) -> Plan:
        """``fly.plan_for`` for a raw head (upgrades never reach the fast engine)."""
        assert self.local is not None
        te = head.first.get(b"transfer-encoding", b"")
        body = BodyInfo(method=head.method, content_length=head.content_length, chunked=b"chunked" in te.lower())
        return fly.plan_for(self.ctx, route, self.local, src=src, body=body, is_websocket=False,
                            fallback_request=_FAILED in head.first, signals=signals, cache_hit=self.cache_hit(head))


# --------------------------------------------------------------------------- the hot-route cache

MAX_ENTRIES = 4096
#: Bytes of keys kept (the Cookie header is part of a key: 4096 distinct 16 KiB ones held 64 MB).
MAX_KEY_BYTES = 8 * 1024 * 1024
_FLY_SIGNALS = (REPLAY_SRC_HEADER.encode(), PREFERRED_UNAVAILABLE_HEADER.encode(), REPLAY_FAILED_HEADER.encode())
_CACHEABLE = (DecisionReason.COOKIE, DecisionReason.FORCE)


class HotRoute:
    """A cached decision, the input it was made from, and the conditions under which it holds.

    ``counted`` and ``forward`` memoize what the exchange derives from the decision (the request
    counter's child for an action; the instance, its pool origin and the proxy's response header
    lines); they depend only on the decision and the snapshot, so they live and die with the entry.
    """

    __slots__ = ("codec", "config", "counted", "decision", "forward", "inp", "plan", "policy", "until", "view")

    def __init__(self, decision: Route, inp: RouteInput, plan: Plan | None, until: float, ctx: ProxyContext) -> None:
        self.decision = decision
        self.inp = inp
        self.plan = plan
        self.until = until
        self.view = ctx.membership.current()
        self.codec = ctx.codec
        self.policy = ctx.policy
        self.config = ctx.config
        self.counted: tuple[str, Any] | None = None
        self.forward: tuple[Any, ...] | None = None


class HotRoutes:
    """One per process (event loop). ``key`` -> ``get``; ``put`` after a quick decision."""

    def __init__(self, ctx: ProxyContext, fly: bool) -> None:
        self.ctx = ctx
        self.fly = fly
        self._entries: dict[tuple[Any, ...], HotRoute] = {}
        self._key_bytes = 0
        self._sources: object = None
        self._plan: tuple[tuple[str, bytes], ...] = ()
        self.hits = 0

    def key(self, head: RequestHead) -> tuple[Any, ...] | None:
        """The routing inputs of ``head`` as raw bytes, or None when the request may not use the
        cache. Memoized on the (shared, immutable) head for the current user-key sources."""
        sources = self.ctx.user_key_sources
        if head.hot_sources is sources:
            return head.hot_key  # type: ignore[return-value]
        key = self._key(head, sources)
        head.hot_key, head.hot_sources = key, sources
        return key

    def _key(self, head: RequestHead, sources: object) -> tuple[Any, ...] | None:
        first = head.first
        if self.fly:
            for name in _FLY_SIGNALS:
                if name in first:
                    return None
        if sources is not self._sources:
            self._plan = tuple((s.kind, s.name.lower().encode("latin-1", "replace"))
                               for s in self.ctx.user_key_sources)
            self._sources = sources
        parts: list[Any] = [first.get(b"cookie"), first.get(FORCE_INSTANCE_B)]
        for kind, name in self._plan:
            if kind == "header":
                parts.append(first.get(name))
            elif kind == "query":
                parts.append(head.target.partition(b"?")[2])
        if self.fly:  # the plan also depends on the body framing and on a replay-cache hit (invalidate)
            parts += (head.method, head.content_length, head.chunked, first.get(_CACHE_STATUS))
        return tuple(parts)

    def get(self, key: tuple[Any, ...], now: float) -> HotRoute | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        ctx = self.ctx
        if (now >= entry.until or entry.view is not ctx.membership.current() or entry.codec is not ctx.codec
                or entry.policy is not ctx.policy or entry.config is not ctx.config):
            del self._entries[key]
            return None
        self.hits += 1
        return entry

    def put(self, key: tuple[Any, ...], decision: Decision, inp: RouteInput, plan: Plan | None) -> None:
        """Remember ``decision`` for ``key`` when it is one that repeats (see the module docstring)."""
        if not isinstance(decision, Route) or decision.reason not in _CACHEABLE or decision.set_cookie:
            return
        if decision.store_op is not None or decision.touch or decision.conflict or inp.avoid:
            return
        cookie = inp.cookie
        if cookie is not None and self.ctx.codec.needs_reissue(cookie):
            return
        if decision.reason is DecisionReason.COOKIE:
            assert cookie is not None
            until = min(cookie.issued_at + self.ctx.policy.revalidate_after, cookie.issued_at + self.ctx.codec.max_age)
        else:
            until = math.inf
        size = sum(len(part) for part in key if isinstance(part, bytes))
        if len(self._entries) >= MAX_ENTRIES or self._key_bytes + size > MAX_KEY_BYTES:
            self._entries.clear()
            self._key_bytes = 0
        self._entries[key] = HotRoute(decision, inp, plan, until, self.ctx)
        self._key_bytes += size
