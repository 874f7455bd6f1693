"""One request on the fast engine: route it, then answer it, forward it or replay it.

``Exchange`` carries out ``proxy.act``'s action for one parsed request, driven by callbacks
instead of a coroutine: the client connection feeds it the request body, the upstream connection
feeds it the response, and it writes to the client. What to do (refuse, replay, forward, the loop
guard's re-pin, counters, after a failure: report, retry once or which error) is ``act``'s; this
module only performs it, with pre-encoded bytes and cached counter children. Only store I/O (a pin
look-up or write, a loop-guard re-pin, a retry's re-decision) runs as a task; a cookie hit runs
start to end in callbacks.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from affinity_proxy.pins.store import PinStoreUnavailable
from affinity_proxy.proxy import act
from affinity_proxy.proxy.resolve import resolve
from affinity_proxy.routing.decide import Decision, Route, RouteInput
from affinity_proxy.routing.model import InstanceId
from affinity_proxy.routing.replay import (
    NO_SIGNALS,
    Plan,
    ReplaySource,
    Triage,
)

from . import lane, wire
from .forward import Forwarding
from .head import RequestHead

if TYPE_CHECKING:
    from .ports import ConnectionPort, ServerPort

log = logging.getLogger("affinity_proxy.proxy")
access_log = logging.getLogger("affinity_proxy.access")



class Exchange(Forwarding):
    """One request from routing to the end of its answer. Never raises out of a callback."""

    __slots__ = ("attempt", "request_id", "routed", "signals", "src", "started")

    def __init__(self, conn: ConnectionPort, head: RequestHead, server: ServerPort, body_done: bool) -> None:
        super().__init__(conn, head, server, body_done)
        self.started = time.perf_counter()
        self.request_id: bytes | None = None
        self.routed: tuple[str, str, str] = ("refuse", "", "")
        self.src: ReplaySource | None = None
        self.signals: Triage = NO_SIGNALS
        self.attempt = 0

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
