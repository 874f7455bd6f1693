"""The fast engine's routing adapter: a parsed request head -> ``RouteInput`` -> decision.

Reads the facts off raw header bytes (cookie jar, user key, ``fly-force-instance-id``, fly
signals, body framing) and hands them to the engine-neutral code: ``proxy.resolve.make_route_input``
and ``resolve`` (store look-ups and operations), ``proxy.fly`` (signals, replay source, plan).
``quick`` answers without I/O whenever ``decide`` needs no store call (a fresh cookie, a forced
instance, a new anonymous session): the hot path then never creates a coroutine. No sockets here.
"""

from __future__ import annotations

import logging

from affinity_proxy.proxy import fly
from affinity_proxy.proxy.act import CookieWriter
from affinity_proxy.proxy.context import ProxyContext
from affinity_proxy.proxy.resolve import make_route_input
from affinity_proxy.routing.cookie_header import parse_cookie_header
from affinity_proxy.routing.decide import (
    Decision,
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
