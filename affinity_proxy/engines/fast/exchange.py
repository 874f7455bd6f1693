"""One request on the fast engine: route it, then answer it, forward it or replay it.

``Exchange`` carries out ``proxy.act``'s action for one parsed request, driven by callbacks
instead of a coroutine: the client connection feeds it the request body, the upstream connection
feeds it the response, and it writes to the client. What to do (refuse, replay, forward, the loop
guard's re-pin, counters, after a failure: report, retry once or which error) is ``act``'s; this
module only performs it, with pre-encoded bytes and cached counter children. Only store I/O (a pin
look-up or write, a loop-guard re-pin, a retry's re-decision) runs as a task; a cookie hit runs
start to end in callbacks.

The forwarding half (``Forwarding``, below, the base class of ``Exchange``) forwards one request,
driven by callbacks: it builds the upstream head (``rewrite``), reads a body of up to
``limits.request_buffer`` whole first (a slow sender must not hold an instance connection), takes
a pooled connection or opens one, streams the request body as the client sends it (Content-Length
as is, chunked re-framed, at most ``PENDING_LIMIT`` buffered while connecting, the client's socket
paused beyond that or while the instance's is full), relays the response in one write per upstream
read (the client's socket pausing the instance's) with ``act.response_headers``, and maps
failures: a failure before the response is the exchange's to answer (``_failed``:
``act.after_failure``), one after it cuts the client's response short.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from affinity_proxy.pins.store import PinStoreUnavailable
from affinity_proxy.proxy import act
from affinity_proxy.proxy.resolve import resolve
from affinity_proxy.routing.decide import Decision, Route, RouteInput
from affinity_proxy.routing.model import Instance, InstanceId
from affinity_proxy.routing.replay import (
    NO_SIGNALS,
    Plan,
    ReplaySource,
    Triage,
)

from . import lane, rewrite, wire
from .head import RequestHead
from .mint import input_of
from .rewrite import ResponseHead
from .route import HotRoute
from .upstream import UpstreamConnection

if TYPE_CHECKING:
    from .ports import ConnectionPort, ServerPort
    from .upstream import Origin

log = logging.getLogger("affinity_proxy.proxy")
access_log = logging.getLogger("affinity_proxy.access")

forward_log = logging.getLogger("affinity_proxy.forwarding.http")

#: Request body bytes buffered while the upstream connection is being set up, before the client
#: socket stops being read (or ``limits.request_buffer`` when larger).
PENDING_LIMIT = 256 * 1024


class Forwarding:
    """Per-request forwarding state. Subclasses supply routing, answers and the end of the
    exchange (``_answer``, ``_finish``, ``_failed``, ``rid_bytes``). Never raises out of
    a callback."""

    __slots__ = ("_resp_extra", "body_done", "body_out", "buffering", "chunked_out", "close_after", "conn", "finished",
                 "head", "hot", "inp", "instance", "out", "pending", "pending_size", "responded", "route", "server",
                 "status", "up_head", "up_started", "upstream")

    def __init__(self, conn: ConnectionPort, head: RequestHead, server: ServerPort, body_done: bool) -> None:
        self.conn = conn
        self.head = head
        self.server = server
        self.body_done = body_done
        self.hot: HotRoute | None = None
        self.route: Route | None = None
        self.inp: RouteInput | None = None
        self.instance: Instance | None = None
        self.upstream: UpstreamConnection | None = None
        self.buffering: Origin | None = None  # where to connect once the buffered body is whole
        self.up_head = b""
        self.up_started = 0.0
        self._resp_extra: tuple[bytes, ...] = ()
        self.pending: list[bytes] = []
        self.pending_size = 0
        self.body_out: list[bytes] = []  # request body bytes of the current client read, for body_flush()
        self.out: list[bytes] = []  # response bytes of the current upstream read, written by flush()
        self.responded = False
        self.chunked_out = False
        self.close_after = False
        self.finished = False
        self.status = 0

    # ------------------------------------------------------------------ provided by the exchange

    def _answer(self, answer: act.Answer, *, close: bool = False) -> None:
        raise NotImplementedError

    def _finish(self, status: int, *, close: bool = False) -> None:
        raise NotImplementedError

    def _failed(self, kind: str, status: int) -> None:
        raise NotImplementedError

    def _keep_alive(self) -> bool:
        raise NotImplementedError

    def rid_bytes(self) -> bytes:
        raise NotImplementedError

    # ------------------------------------------------------------------ to the instance

    def _forward(self, route: Route, inp: RouteInput, upstream_headers: tuple[act.Header, ...] = ()) -> None:
        """Forward plain HTTP (upgrades never reach the fast engine) to ``route.instance`` with
        ``act``'s response headers and ``upstream_headers`` (at most one: fly-replay-src)."""
        server = self.server
        hot = self.hot
        if hot is not None and hot.forward is not None and hot.decision is route:
            instance, origin, self._resp_extra = hot.forward
        else:
            instance = server.ctx.membership.current().get(route.instance)
            if instance is None or not instance.url:
                self._answer(act.NO_UPSTREAM)
                return
            cookie = server.router.cookies_out.value(server.ctx.codec, server.ctx.config, instance.id, route, inp)
            resp = tuple(b"%s: %s\r\n" % (name.encode(), value.encode())
                         for name, value in act.response_headers(instance.id, cookie))
            self._resp_extra = resp
            origin = server.pool.origin(instance.url)
            if hot is not None and hot.decision is route and cookie is None:
                hot.forward = (instance, origin, resp)
        self._forward_to(route, inp, instance, origin, upstream_headers)

    def _forward_to(self, route: Route, inp: RouteInput, instance: Instance, origin: Origin,
                    upstream_headers: tuple[act.Header, ...] = ()) -> None:
        """``_forward`` once the instance, its origin and the response header lines are known."""
        server = self.server
        self.route, self.inp, self.instance = route, inp, instance
        extra = (upstream_headers[0][0].encode(), upstream_headers[0][1].encode()) if upstream_headers else None
        self.up_head = rewrite.upstream_head(self.head, origin, self.conn.peer, self.rid_bytes, server.fqdn, extra,
                                             self.conn.real_client(self.head))
        if not self.body_done and self._buffers(server.ctx.config.limits.request_buffer):
            self.buffering = origin  # ``body_data``/``body_end`` connect when the body is whole or too big
            return
        self._connect(origin)

    def _buffers(self, limit: int) -> bool:
        """Whether the body may be read whole before an instance connection is taken
        (``limits.request_buffer``): a Content-Length within it, or a chunked body not past it yet."""
        head = self.head
        if head.chunked:
            return self.pending_size <= limit
        return head.content_length is not None and head.content_length <= limit

    def _connect(self, origin: Origin) -> None:
        self.buffering = None
        self.up_started = time.perf_counter()  # the instance's time, not the client's upload
        server = self.server
        conn = server.pool.acquire(origin)
        if conn is not None:
            self._attach(conn)
        else:
            server.pool.connect(origin, self, server.ctx.config.limits.upstream_connect_timeout, self._attach)

    def _attach(self, conn: UpstreamConnection) -> None:
        if self.finished:
            self.server.pool.release(conn)
            return
        self.upstream = conn
        chunked = self.head.chunked
        data = [self.up_head]
        if self.pending:
            body = b"".join(self.pending)
            data.append(wire.chunk(body) if chunked else body)
        if self.body_done and chunked:
            data.append(wire.LAST_CHUNK)
        self.pending = []
        self.pending_size = 0
        conn.send(self, b"".join(data), head_only=self.head.method == "HEAD", complete=self.body_done)
        client = self.conn
        if client.read_pause:
            client.resume_reading(client.PENDING)
        if client.write_paused:
            conn.pause()

    # ------------------------------------------------------------------ request body (from the client)

    def body_data(self, data: bytes) -> None:
        if self.finished:
            return
        if self.upstream is not None:
            self.body_out.append(data)  # one write per client read, not per chunk (a write is a send())
            return
        self.pending.append(data)
        self.pending_size += len(data)
        limit = self.server.ctx.config.limits.request_buffer
        if self.buffering is not None and self.pending_size > limit:  # a chunked body past the buffer
            self._connect(self.buffering)
        elif self.pending_size > max(PENDING_LIMIT, limit):  # connecting (or routing): the client waits
            self.conn.pause_reading(self.conn.PENDING)

    def body_flush(self) -> None:
        """Write the body bytes of the client's last read to the instance, in one go."""
        out = self.body_out
        if out:
            data = out[0] if len(out) == 1 else b"".join(out)
            out.clear()
            upstream = self.upstream
            if upstream is not None and not self.finished:
                upstream.write(wire.chunk(data) if self.head.chunked else data)

    def body_end(self) -> None:
        self.body_done = True
        self.body_flush()
        upstream = self.upstream
        if upstream is not None and not self.finished:
            upstream.write(wire.LAST_CHUNK if self.head.chunked else b"", complete=True)
        elif self.buffering is not None and not self.finished:
            self._connect(self.buffering)  # the whole body is here: now take an instance connection

    def body_too_large(self) -> None:
        """The body passed ``limits.max_body_bytes`` while streaming: 413 if nothing was answered
        yet, else the response is cut. The connection is closed either way."""
        self._drop_upstream()
        limit = self.server.ctx.config.limits.max_body_bytes
        self._answer(act.body_too_large(limit), close=True)

    def malformed_body(self) -> None:
        """llhttp rejected the request body (a bad chunk): 400 if nothing was answered yet, else
        the response is cut. The connection is closed either way."""
        self._drop_upstream()
        self._answer(act.error(*wire.MALFORMED), close=True)

    def client_lost(self) -> None:
        """The client connection went away: drop the instance's connection (not reusable). A
        response already under way is counted and logged as the aiohttp engine does."""
        self._drop_upstream()
        if self.responded:
            self._finish(self.status, close=True)
        self.finished = True

    def client_writable(self, writable: bool) -> None:
        upstream = self.upstream
        if upstream is not None:
            if writable:
                upstream.resume()
            else:
                upstream.pause()

    def _drop_upstream(self) -> None:
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            upstream.close()
            self.server.pool.discard(upstream)

    # ------------------------------------------------------------------ response (from the instance)

    def upstream_head(self, rh: ResponseHead) -> None:
        """Queue the client's response head (``rewrite.client_head``) for the next flush."""
        if self.finished:
            return
        head = self.head
        status = rh.status
        if rewrite.needs_framing(head, rh):
            if head.version == b"1.1":
                self.chunked_out = True
            else:
                self.close_after = True  # an HTTP/1.0 client reads this body until we close
        self.status = status
        self.responded = True
        self.out.append(rewrite.client_head(head, rh, self._resp_extra, self.chunked_out, self._keep_alive()))

    def upstream_body(self, data: bytes) -> None:
        if not self.finished and data:
            self.out.append(wire.chunk(data) if self.chunked_out else data)

    def flush(self) -> None:
        """Write what the instance's last read produced in one go (one send per read)."""
        out = self.out
        if out:
            self.conn.write(out[0] if len(out) == 1 else b"".join(out))
            out.clear()

    def upstream_end(self, reusable: bool) -> None:
        self.upstream = None
        if self.finished:
            return
        if self.chunked_out:
            self.out.append(wire.LAST_CHUNK)
        self.flush()
        assert self.instance is not None
        self.server.counts.observe_duration(self.instance.id, time.perf_counter() - self.up_started)
        self._finish(self.status)

    def upstream_whole(self, rh: ResponseHead, body: bytes) -> None:
        """A whole response in one read, its head known (``rewrite.ResponseCache``): what
        ``upstream_head`` + ``upstream_body`` + ``upstream_end`` do, in one write. Such a head
        always carries its Content-Length, so the body needs no framing of ours."""
        self.upstream = None
        if self.finished:
            return
        self.status = rh.status
        self.responded = True
        data = rewrite.known_client_head(self.head, rh, self._resp_extra, self._keep_alive())
        self.conn.write(data + body if body else data)
        assert self.instance is not None
        self.server.counts.observe_duration(self.instance.id, time.perf_counter() - self.up_started)
        self._finish(rh.status)

    def upstream_writable(self, writable: bool) -> None:
        if writable:
            self.conn.resume_reading(self.conn.UPSTREAM)
        else:
            self.conn.pause_reading(self.conn.UPSTREAM)

    def upstream_failed(self, kind: str, message: str, *, sent: bool) -> None:
        """The instance failed: a stale pooled socket is resent on another; otherwise counted, and
        a failure before the response is the exchange's (``_failed``: ``act.after_failure``), one
        after it cuts the client's response short."""
        self.upstream = None
        if self.finished:
            return
        self.conn.resume_reading(self.conn.UPSTREAM)
        head = self.head
        if not sent and kind == "protocol" and self._retryable_request():
            # A pooled socket the instance had closed: resend on another, as if never tried.
            assert self.instance is not None
            pool = self.server.pool
            origin = pool.origin(self.instance.url)
            conn = pool.acquire(origin)
            if conn is not None:
                self._attach(conn)
            else:
                pool.connect(origin, self, self.server.ctx.config.limits.upstream_connect_timeout, self._attach)
            return
        server = self.server
        assert self.instance is not None and self.route is not None and self.inp is not None
        instance = self.instance
        server.counts.tally(act.failure_counts(instance.id, kind))
        status = act.UPSTREAM_STATUS[kind]
        self.flush()
        if self.responded:
            forward_log.warning("instance failed mid-response for %s %s (%s); client connection closed",
                                head.method, head.path, f"{kind}: {message}")
            self._finish(status, close=True)
            return
        self._failed(kind, status)

    def _retryable_request(self) -> bool:
        return act.may_retry(self.head.method, self.head.has_body)


# --------------------------------------------------------------------------- the exchange


class Exchange(Forwarding):
    """One request from routing to the end of its answer. Never raises out of a callback."""

    __slots__ = ("attempt", "memoized", "minted", "request_id", "routed", "signals", "src", "started")

    def __init__(self, conn: ConnectionPort, head: RequestHead, server: ServerPort, body_done: bool) -> None:
        super().__init__(conn, head, server, body_done)
        self.started = time.perf_counter()
        self.request_id: bytes | None = None
        self.routed: tuple[str, str, str] = ("refuse", "", "")
        self.src: ReplaySource | None = None
        self.signals: Triage = NO_SIGNALS
        self.attempt = 0
        self.memoized = False  # forwarded from a hot-route entry's memo: ``forward_lane.remember`` may follow
        self.minted = False  # forwarded as a new session (``mint``): ``forward_lane.remember`` may follow

    # ------------------------------------------------------------------ routing

    def begin(self) -> None:
        server = self.server
        router = server.router
        head = self.head
        hot = server.hot
        if router.fly and router.cache_hit(head):
            server.counts.tally(act.CACHE_HIT_COUNTS)
        key = head.hot_key if head.hot_sources is server.ctx.user_key_sources else hot.key(head)
        if key is not None:
            entry = hot.get(key, time.time())
            if entry is not None:
                self.hot = entry
                counted = entry.counted
                if counted is not None and counted[0] == act.FORWARD and entry.forward is not None:
                    # seen before: dispatch() would count it and forward it, as below
                    route = entry.decision
                    self.routed = (act.FORWARD, route.instance, route.reason)
                    server.counts.inc_all(counted[1])
                    self.memoized = True
                    self._forward(route, entry.inp)
                    return
                self.dispatch(entry.decision, entry.inp, entry.plan)
                return
        if router.fly:
            self.src = router.replay_source(head)
            self.signals = router.repin_signals(head)
            inp = router.route_input(head, dict(self.signals.avoid))
            adopted = router.adopted(inp, self.src)
            if adopted is not None:
                self.dispatch(adopted, inp)
                return
        else:
            minted = router.new_sessions.mint(head, server.counts, server.pool, key)
            if minted is not None:  # a first visit: the new-session lane (``mint``) placed it
                route, minted_input, instance, origin, self._resp_extra, counters = minted
                self.routed = (act.FORWARD, route.instance, route.reason)
                server.counts.inc_all(counters)
                self.minted = True
                self._forward_to(route, input_of(minted_input), instance, origin)
                return
            inp = router.route_input(head, {})
        decision = router.quick(inp)
        if decision is None:
            server.spawn(self._resolve(inp), "fastpath-resolve")
            return
        step = None
        if router.fly and isinstance(decision, Route):
            step = router.plan(head, decision, self.src, self.signals)
        if key is not None:
            hot.put(key, decision, inp, step)
        self.dispatch(decision, inp, step)

    async def _resolve(self, inp: RouteInput) -> None:
        try:
            decision, inp = await resolve(self.server.ctx, inp)
        except Exception:
            log.exception("routing failed")
            self._answer(act.error(500, "internal error", "internal_error"), close=True)
            return
        if not self.finished:
            self.dispatch(decision, inp)

    def dispatch(self, decision: Decision, inp: RouteInput, step: Plan | None = None) -> None:
        """Carry out ``act.act`` for the decision (``step``: the fly plan when already known)."""
        server = self.server
        router = server.router
        if router.fly and step is None and isinstance(decision, Route):
            step = router.plan(self.head, decision, self.src, self.signals)
        action = act.act(decision, step, inp, router.local)
        if isinstance(action, act.Refused):
            server.counts.tally(act.refuse_counts(action.decision))
            self._answer(action.answer)
            return
        if isinstance(action, act.ReplayTo):
            counted = self._count(action.route, act.REPLAY)
            if action.invalidate:
                server.counts.tally(act.CACHE_INVALIDATION_COUNTS)
            status = self._replay(action.instance, action.header, action.invalidate)
            hot = self.hot
            if (hot is not None and hot.plan is step and counted is not None  # repeats take the lane
                    and not router.cache_hit(self.head)):  # (a cache hit is counted in begin)
                lane.remember(server, self.head, hot, action.route, action.instance, action.header, status,
                              (*counted, server.counts.response_child(status)))
            return
        if action.loop_prevented:
            server.counts.inc(server.ctx.metrics.replay_loops_prevented)
            assert action.decided is not None
            log.warning("replay loop prevented; serving locally", extra={"fields": {
                "decided": action.decided.instance, "local": action.route.instance,
                "reason": action.decided.reason.value}})
        if action.repin is not None:
            server.spawn(self._repin(action, inp), "fastpath-loop-guard")
            return
        self._count(action.route, act.FORWARD)
        self._forward(action.route, inp, action.upstream_headers)

    async def _repin(self, action: act.Forward, inp: RouteInput) -> None:
        """The loop guard's re-pin (``act.Repin``), then the forward."""
        repin = action.repin
        assert repin is not None
        try:
            await self.server.ctx.store.repin(repin.user_key, repin.expected, repin.to)
        except PinStoreUnavailable:
            counts = self.server.counts
            counts.inc(counts.child(self.server.ctx.metrics.store_errors, "repin"))
        if self.finished:
            return
        self._count(action.route, act.FORWARD)
        self._forward(action.route, inp, action.upstream_headers)

    def _count(self, route: Route, action: str) -> tuple[Any, ...] | None:
        """Count one routed request (``act.counts``); a hot-route entry keeps the counters it
        derived. Returns them when cached (the replay lane reuses them), else None."""
        self.routed = (action, route.instance, route.reason)
        counts = self.server.counts
        hot = self.hot
        if hot is None or hot.decision is not route:
            counts.count(route, action)
            return None
        counted = hot.counted
        if counted is None or counted[0] != action:
            counted = hot.counted = (action, counts.children(act.counts(action, route)))
        counts.inc_all(counted[1])
        if action == act.REPLAY:  # RecentEvents.route records nothing else for a cookie or forced route
            self.server.ctx.events.route(action, route)
        return counted[1]

    # ------------------------------------------------------------------ local answers

    def _replay(self, instance: InstanceId, header: str, invalidate: bool = False) -> int:
        status = self.server.ctx.config.fly.replay_status
        head = self.head
        self._write_answer(self.server.replay_bytes(instance, header, status, head.version, self._keep_alive(),
                                                    head.method == "HEAD", invalidate), status)
        return status

    def _answer(self, answer: act.Answer, *, close: bool = False) -> None:
        """Write the proxy's own answer (``act.Answer``); cut the response short if one started."""
        if self.finished:
            return
        if self.responded:  # too late for an answer: cut the response short
            self._finish(answer.status, close=True)
            return
        if close:
            self.close_after = True
        self._write_answer(wire.answer_bytes(answer, version=self.head.version, keep_alive=self._keep_alive(),
                                             head_only=self.head.method == "HEAD"), answer.status)

    def _write_answer(self, data: bytes, status: int) -> None:
        self.responded = True
        self.conn.write(data)
        self._finish(status)

    def _keep_alive(self) -> bool:
        return self.head.keep_alive and not self.close_after and not self.server.closing

    def rid_bytes(self) -> bytes:
        """``request_id_of``: Fly's or the client's sane id, else a cheap process-unique one."""
        rid = self.request_id
        if rid is None:
            rid = self.request_id = self.head.client_request_id() or self.server.ids()
        return rid

    def rid(self) -> str:
        return self.rid_bytes().decode("ascii", "replace")

    def _failed(self, kind: str, status: int) -> None:
        """The instance failed before the response started: ``act.after_failure`` says whether to
        report it to health, retry once elsewhere or answer."""
        server = self.server
        ctx = server.ctx
        head = self.head
        assert self.instance is not None and self.inp is not None
        instance = self.instance
        log.warning("upstream failed", extra={"fields": {
            "instance": instance.id, "kind": kind, "attempt": self.attempt, "path": head.path}})
        then = act.after_failure(kind, status, retryable=kind == "connect", attempt=self.attempt,
                                 method=head.method, has_body=head.has_body, local=instance.local,
                                 health=ctx.health is not None)
        if then.report_health:
            assert ctx.health is not None
            ctx.health.report_failure(instance.id, kind)
        if then.retry:
            self.attempt = 1
            retry = act.retry_input(self.inp, instance.id, now=time.time())
            self.route = self.instance = None
            self.up_head = b""
            server.spawn(self._resolve(retry), "fastpath-retry")
            return
        assert then.answer is not None
        self._answer(then.answer)

    # ------------------------------------------------------------------ the end

    def _finish(self, status: int, *, close: bool = False) -> None:
        if self.finished:
            return
        self.finished = True
        ctx = self.server.ctx
        self.server.counts.count_response(status)
        ctx.events.response(status == ctx.config.fly.replay_status)
        if access_log.isEnabledFor(logging.INFO):
            self._log_access(status)
        if close:
            self.close_after = True
            self._drop_upstream()
        self.conn.exchange_done(self, keep_alive=not close and self._keep_alive())

    def _log_access(self, status: int) -> None:
        head = self.head
        access_log.info("request", extra={"fields": act.access_fields(
            head.method, head.path, status, time.perf_counter() - self.started, self.routed, self.rid(),
            self.conn.real_client(head).ip)})
