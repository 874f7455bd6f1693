"""The hot-route cache: a pinned client's repeat requests skip routing altogether.

``decide`` is a pure function of the request's routing inputs (affinity cookie, user-key sources,
``fly-force-instance-id``), the membership snapshot, the policy, the codec and the clock. For the
decisions that need no store call and set no cookie (a fresh, valid affinity cookie, or a forced
instance), the result is the same for every repeat of those inputs until the cookie goes stale
(``cookie.revalidate_after``) or expires, or until the snapshot, codec, policy or config object
is replaced (membership change, health change, reload). This cache keeps such decisions (and in
fly mode the replay plan) keyed by the raw bytes of those inputs and returns them only while all
of that still holds, so a hit is exactly what ``decide`` would have answered. Anything else
(anonymous sessions, pins, re-pins, fly-replay headers) is never cached. Pure, no I/O.
"""

from __future__ import annotations

import math
from typing import Any

from affinity_proxy.proxy.context import ProxyContext
from affinity_proxy.routing.decide import Decision, DecisionReason, Route, RouteInput
from affinity_proxy.routing.replay import (
    PREFERRED_UNAVAILABLE_HEADER,
    REPLAY_CACHE_STATUS_HEADER,
    REPLAY_FAILED_HEADER,
    REPLAY_SRC_HEADER,
    Plan,
)

from .head import RequestHead
from .wire import FORCE_INSTANCE_B

MAX_ENTRIES = 4096
#: Bytes of keys kept (the Cookie header is part of a key: 4096 distinct 16 KiB ones held 64 MB).
MAX_KEY_BYTES = 8 * 1024 * 1024
_FLY_SIGNALS = (REPLAY_SRC_HEADER.encode(), PREFERRED_UNAVAILABLE_HEADER.encode(), REPLAY_FAILED_HEADER.encode())
_CACHEABLE = (DecisionReason.COOKIE, DecisionReason.FORCE)
_CACHE_STATUS = REPLAY_CACHE_STATUS_HEADER.encode()


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
