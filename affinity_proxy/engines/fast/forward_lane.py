"""The forward lane: a repeat of a pinned request forwarded without routing or a full exchange.

Most requests of a pinned user repeat byte for byte (the same client, the same cookie, a GET):
the head comes from ``head.HeadCache`` and its decision from ``route.HotRoutes``, and once an
``exchange.Exchange`` has forwarded such a head from a hot-route entry whose forward is memoized
(``HotRoute.forward``: the instance, its pool origin, the proxy's response header lines), the
next repeat needs nothing the exchange derived again: the upstream head is the same bytes around
a fresh request id, the counters are the same children. ``remember`` keeps on the head
(``RequestHead.lane``) what that forward depended on; ``ForwardLane.answer`` checks it again on
every use, exactly as ``HotRoutes.get`` checks the entry (before ``cookie.revalidate_after`` and
the cookie's expiry, the same membership snapshot, codec, policy, config and user-key sources;
and the same peer address and scheme, which the upstream head's added lines depend on), takes a
pooled connection and writes the head. ``MintLane`` does the same for a repeated cookie-less head,
each repeat a new session placed by ``mint.NewSessions``.

The request is then carried by a ``LaneExchange``: when the instance's answer arrives whole in
one read with a head parsed before (``rewrite.ResponseCache``, the usual case for a repeat) it
writes the client's response and counts the request, its response and the duration as
``Exchange.begin``, ``Forwarding.upstream_whole`` and ``Exchange._finish`` do (the request is
counted when it is promoted or its client leaves instead). Anything else (a response that needs
llhttp, a failure, a stale pooled socket to resend, flow control) turns it into the full
``exchange.Exchange`` it stands for (``_promote``: the same state, so the same behaviour) and
hands the event on. The lane declines (the caller takes the full path) when no pooled connection
is idle, the access log is on, the server is closing, or any condition no longer holds (the lane
is then dropped). Heads with a body never get a lane (the head cache holds body-less heads only).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from affinity_proxy.proxy import act

from . import rewrite, wire
from .exchange import Exchange
from .mint import input_of

if TYPE_CHECKING:
    from affinity_proxy.routing.model import Instance

    from .counting import Tally
    from .head import RequestHead
    from .mint import Minted
    from .ports import ConnectionPort
    from .rewrite import ResponseHead
    from .route import HotRoute
    from .upstream import Origin, UpstreamConnection

access_log = logging.getLogger("affinity_proxy.access")
_INFO = logging.INFO


class ForwardLane:
    """One head's forward and what it depends on (see the module docstring)."""

    __slots__ = ("entry", "head_only", "origin", "peer", "prefix", "reply", "reply_to", "scheme", "sources", "suffix",
                 "tally", "target", "whole")

    def __init__(self, entry: HotRoute, sources: object, instance: Instance, origin: Origin, extra: tuple[bytes, ...],
                 counters: tuple[Any, ...], peer: str | None, scheme: str, whole: bytes | None, prefix: bytes,
                 suffix: bytes, head_only: bool) -> None:
        self.entry = entry
        self.sources = sources
        self.origin = origin
        self.peer = peer
        self.scheme = scheme
        self.whole = whole  # the whole upstream head when its request id is the client's (constant)
        self.prefix = prefix  # else the head before and after a fresh ``X-Request-Id`` line
        self.suffix = suffix
        self.head_only = head_only
        #: what a ``LaneExchange`` needs, shaped as ``mint.Minted``
        self.target: Minted = (entry.decision, entry.inp, instance, origin, extra, counters)
        #: the client's response head last sent for ``reply_to`` (a cached ``ResponseHead``), keep-alive
        self.reply_to: ResponseHead | None = None
        self.reply = b""
        self.tally: Tally | None = None  # ``counting.Tally`` of its requests with the last status seen

    def answer(self, conn: ConnectionPort, head: RequestHead) -> bool:
        """Forward ``head`` as its last forward went and count it; False (nothing done) when the
        full path must take it instead."""
        server = conn.server
        ctx = server.ctx
        entry = self.entry
        if (time.time() >= entry.until or entry.view is not ctx.membership.current() or entry.codec is not ctx.codec
                or entry.policy is not ctx.policy or entry.config is not ctx.config
                or self.sources is not ctx.user_key_sources):
            head.lane = None
            return False
        if server.closing or conn.peer != self.peer or conn.scheme != self.scheme or access_log.isEnabledFor(_INFO):
            return False
        upstream = server.pool.acquire(self.origin)
        if upstream is None:
            return False  # the full path opens a connection
        data = self.whole
        if data is None:
            data = b"".join((self.prefix, wire.REQUEST_ID_LINE, server.ids(), b"\r\n", self.suffix))
        ex = conn.ex = LaneExchange(conn, head, upstream, data, self.target, self)
        conn.msg_done = True
        upstream.send(ex, data, head_only=self.head_only, complete=True)
        return True


class MintLane:
    """A first visit's head (no cookie, no user key, no force header): each repeat is a new session
    that ``mint.NewSessions`` places and gives its cookie lines (the per-request work: a fresh
    anonymous key and its ring position), forwarded as a ``ForwardLane``'s request is, around the
    head's upstream memo for the chosen instance (``RequestHead.up_memo``). Once placed, a session
    whose instance has no idle pooled connection, or no memo for this peer yet, is handed to a full
    ``exchange.Exchange`` as ``Exchange.begin`` hands a minted one (so it is placed once)."""

    __slots__ = ("config", "head_only", "sources")

    def __init__(self, sources: object, config: object, head_only: bool) -> None:
        self.sources = sources
        self.config = config  # the head was parsed and checked under it (``HeadCache.lanes`` skips that check)
        self.head_only = head_only

    def answer(self, conn: ConnectionPort, head: RequestHead) -> bool:
        server = conn.server
        ctx = server.ctx
        if (self.sources is not ctx.user_key_sources or head.hot_sources is not self.sources
                or self.config is not ctx.config):
            head.lane = None
            return False
        if server.closing or access_log.isEnabledFor(_INFO):
            return False
        minted = server.router.new_sessions.mint(head, server.counts, server.pool, head.hot_key,  # type: ignore[arg-type]
                                                 lazy=True)
        if minted is None:
            return False
        route, inp, instance, origin, extra, counters = minted
        memos = head.up_memo
        memo = memos.get(origin) if memos is not None else None
        client = conn.real_client(head)
        upstream = None
        if memo is not None and memo[1] == conn.peer and memo[2] == client.scheme and memo[3] is client.trusted:
            upstream = server.pool.acquire(origin)
        if upstream is None:  # the session is placed: a full exchange builds the head or opens a connection
            server.counts.inc_all(counters)
            full = conn.ex = Exchange(conn, head, server, True)
            conn.msg_done = True
            full.routed = (act.FORWARD, route.instance, route.reason)
            full._resp_extra = extra
            full._forward_to(route, input_of(inp), instance, origin)
            return True
        rid = None if head.has_rid else head.client_request_id() or server.ids()
        data = memo[4] + memo[5] if rid is None else b"".join((memo[4], wire.REQUEST_ID_LINE, rid, b"\r\n", memo[5]))
        ex = conn.ex = LaneExchange(conn, head, upstream, data, minted, None)
        conn.msg_done = True
        upstream.send(ex, data, head_only=self.head_only, complete=True)
        return True


def remember(ex: Exchange) -> None:
    """Keep a lane on the exchange's head after ``Exchange.begin`` forwarded it from a hot-route
    entry's memoized forward (``Exchange.memoized``: a ``ForwardLane``) or as a new session
    (``Exchange.minted``: a ``MintLane``). Only for keep-alive body-less heads taking the usual
    upstream rewrite (its memo, ``RequestHead.up_memo``, holds the bytes around the request id)."""
    head = ex.head
    conn = ex.conn
    server = ex.server
    ctx = server.ctx
    if (not head.keep_alive or head.has_body or not ex.body_done or ex.instance is None or ex.finished
            or head.hot_sources is not ctx.user_key_sources or (server.router.fly and server.router.cache_hit(head))):
        return
    client = conn.real_client(head)
    if head.odd or (head.claims and not client.trusted):
        return
    if ex.minted:
        head.lane = MintLane(head.hot_sources, ctx.config, head.method == "HEAD")
        return
    entry = ex.hot
    if entry is None or entry.forward is None or entry.counted is None or entry.counted[0] != act.FORWARD:
        return
    counters = entry.counted[1]
    instance, origin, extra = entry.forward
    memo = head.up_memo.get(origin) if head.up_memo is not None else None
    if memo is None or memo[1] != conn.peer or memo[2] != client.scheme or memo[3] is not client.trusted:
        return
    whole = None
    if head.has_rid:
        whole = memo[4] + memo[5]
    else:
        rid = head.client_request_id()
        if rid is not None:
            whole = b"".join((memo[4], wire.REQUEST_ID_LINE, rid, b"\r\n", memo[5]))
    head.lane = ForwardLane(entry, head.hot_sources, instance, origin, extra, counters, conn.peer, conn.scheme,
                            whole, memo[4], memo[5], head.method == "HEAD")


class LaneExchange:
    """One request a lane forwarded (see the module docstring). Never raises out of a callback.
    Its request counters are added with its response (``counting.Tally``), or when it is promoted
    or its client leaves, so that each request is counted once whatever happens."""

    __slots__ = ("conn", "counted", "data", "finished", "full", "head", "lane", "started", "target", "upstream")

    def __init__(self, conn: ConnectionPort, head: RequestHead, upstream: UpstreamConnection, data: bytes,
                 target: Minted, lane: ForwardLane | None) -> None:
        self.conn = conn
        self.head = head
        self.upstream: UpstreamConnection | None = upstream
        self.data = data  # the upstream head as sent
        #: route, input (a new session's is built when needed: ``mint.input_of``), instance, origin,
        #: the proxy's response header lines, the request's counters
        self.target = target
        self.lane = lane  # None: a new session (``MintLane``)
        self.started = time.perf_counter()
        self.counted = False
        self.finished = False
        self.full: Exchange | None = None

    def upstream_whole(self, rh: ResponseHead, body: bytes) -> None:
        """``Forwarding.upstream_whole`` and ``Exchange._finish`` for the lane's request."""
        full = self.full
        if full is not None:
            full.upstream_whole(rh, body)
            return
        self.upstream = None
        if self.finished:
            return
        self.finished = True
        conn = self.conn
        server = conn.server
        keep_alive = self.head.keep_alive and not server.closing
        lane = self.lane
        _, _, instance, _, extra, counters = self.target
        if lane is not None and lane.reply_to is rh and keep_alive:
            data = lane.reply  # a forward lane's response head: the same instance lines and version
        else:
            data = rewrite.known_client_head(self.head, rh, extra, keep_alive)
            if lane is not None and keep_alive:
                lane.reply_to, lane.reply = rh, data
        transport = conn.transport
        if transport is not None:
            transport.write(data + body if body else data)
        status = rh.status
        tally = lane.tally if lane is not None else None
        if tally is None or tally.status != status:
            tally = server.counts.tally_of(counters, instance.id, status)
            if lane is not None:
                lane.tally = tally
        tally.add(time.perf_counter() - self.started)  # the request (never counted before here), response, duration
        self.counted = True
        if (keep_alive and conn.ex is self and not conn.buf and not conn.eof and not conn.read_pause
                and conn.transport is not None):  # ``exchange_done`` with nothing else to do
            conn.ex = None
            conn.idle_since = conn.last_rx
        else:
            conn.exchange_done(self, keep_alive=keep_alive)

    def _count_request(self) -> None:
        if not self.counted:
            self.counted = True
            self.conn.server.counts.inc_all(self.target[5])

    def client_lost(self) -> None:
        """``Forwarding.client_lost`` before any response: the instance's socket is not reusable."""
        full = self.full
        if full is not None:
            full.client_lost()
            return
        self._count_request()
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            upstream.close()
            self.conn.server.pool.discard(upstream)
        self.finished = True

    def _promote(self) -> Exchange:
        """The full exchange this request stands for, with the same state; it takes over."""
        full = self.full
        if full is not None:
            return full
        self._count_request()
        conn = self.conn
        route, inp, instance, _, extra, _ = self.target
        full = self.full = Exchange(conn, self.head, conn.server, True)
        full.hot = self.lane.entry if self.lane is not None else None
        full.routed = (act.FORWARD, route.instance, route.reason)
        full.route, full.inp, full.instance = route, input_of(inp), instance
        full._resp_extra = extra
        full.up_head = self.data
        full.started = full.up_started = self.started
        full.upstream = self.upstream
        full.finished = self.finished
        if conn.ex is self:
            conn.ex = full
        upstream = self.upstream
        if upstream is not None and upstream.relay is self:
            upstream.relay = full
        return full

    # Everything else is the full exchange's: a response through llhttp, failures, flow control.

    def upstream_head(self, rh: ResponseHead) -> None:
        self._promote().upstream_head(rh)

    def upstream_body(self, data: bytes) -> None:
        self._promote().upstream_body(data)

    def upstream_end(self, reusable: bool) -> None:
        self._promote().upstream_end(reusable)

    def flush(self) -> None:
        if self.full is not None:
            self.full.flush()

    def upstream_failed(self, kind: str, message: str, *, sent: bool) -> None:
        self._promote().upstream_failed(kind, message, sent=sent)

    def upstream_writable(self, writable: bool) -> None:
        self._promote().upstream_writable(writable)

    def client_writable(self, writable: bool) -> None:
        self._promote().client_writable(writable)

    def body_data(self, data: bytes) -> None:
        self._promote().body_data(data)

    def body_flush(self) -> None:
        if self.full is not None:
            self.full.body_flush()

    def body_end(self) -> None:
        self._promote().body_end()

    def body_too_large(self) -> None:
        self._promote().body_too_large()

    def malformed_body(self) -> None:
        self._promote().malformed_body()
