"""The replay lane: a repeat of a fly replay answered from pre-encoded bytes, without an exchange.

In fly mode most requests a node sees for users pinned elsewhere are byte-identical repeats (the
same client, the same cookie): the head comes from ``head.HeadCache``, its routing decision from
``route.HotRoutes``, and the answer is the same 409 every time but for its ``Date``. Once an
``exchange.Exchange`` has answered such a head with a replay taken from a hot-route entry,
``remember`` keeps on the head (``RequestHead.lane``) everything that answer depended on: the
hot-route entry (whose conditions are checked again on every use, exactly as ``HotRoutes.get``
does: before ``cookie.revalidate_after`` and the cookie's expiry, the same membership snapshot,
codec, policy, config and user-key sources), the encoded answer for the current second, and the
metric children the exchange incremented. ``ReplayLane.answer`` then writes the answer and counts
it as the exchange would have (``affinity_requests_total{action="replay"}``,
``affinity_replays_total``, ``affinity_responses_total``, the recent-events counters), in a few
dict operations. It declines (the caller takes the full path) when anything differs: a condition
no longer holds (the lane is dropped), the server is shutting down, or the access log is enabled
(the exchange logs each request). Requests carrying fly signals (``fly-replay-src``,
``fly-preferred-instance-unavailable``, ``fly-replay-failed``) never get a hot-route entry, so the
loop guard and re-pins always take the full path. Pure bookkeeping; the only I/O is the write.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from affinity_proxy.routing.decide import Route

from .route import HotRoute

if TYPE_CHECKING:
    from .head import RequestHead
    from .ports import ConnectionPort, ServerPort

access_log = logging.getLogger("affinity_proxy.access")
_INFO = logging.INFO


class ReplayLane:
    """One head's replay answer and what it depends on (see the module docstring)."""

    __slots__ = (
        "counters",
        "data",
        "entry",
        "head_only",
        "header",
        "instance",
        "second",
        "sources",
        "status",
        "version",
    )

    def __init__(self, entry: HotRoute, sources: object, instance: str, header: str, status: int, version: bytes,
                 head_only: bool, counters: tuple[Any, ...]) -> None:
        self.entry = entry
        self.sources = sources
        self.instance = instance
        self.header = header
        self.status = status
        self.version = version
        self.head_only = head_only
        self.counters = counters
        self.second = -1
        self.data = b""

    def answer(self, conn: ConnectionPort, head: RequestHead) -> bool:
        """Write the replay answer for ``head`` and count it; False (nothing done) when the full
        path must answer instead."""
        server = conn.server
        ctx = server.ctx
        entry = self.entry
        now = time.time()
        if (now >= entry.until or entry.view is not ctx.membership.current() or entry.codec is not ctx.codec
                or entry.policy is not ctx.policy or entry.config is not ctx.config
                or self.sources is not ctx.user_key_sources):
            head.lane = None
            return False
        if server.closing or access_log.isEnabledFor(_INFO):
            return False
        second = int(now)
        if second != self.second:
            self.data = server.replay_bytes(self.instance, self.header, self.status, self.version, True,
                                            self.head_only)
            self.second = second
        transport = conn.transport
        if transport is not None:
            transport.write(self.data)
        server.counts.inc_all(self.counters)
        ctx.events.replay_answered(now)  # what ``route("replay", ...)`` and ``response(True)`` count
        conn.idle_since = conn.last_rx
        return True


def remember(server: ServerPort, head: RequestHead, entry: HotRoute, route: Route, instance: str, header: str,
             status: int, counters: tuple[Any, ...]) -> None:
    """Keep a lane on ``head`` after an exchange answered it with the replay ``entry`` planned.
    Only for keep-alive heads answered with ``fly.replay_status`` while the cache holds."""
    ctx = server.ctx
    if (not head.keep_alive or entry.decision is not route or status != ctx.config.fly.replay_status
            or entry.config is not ctx.config or head.hot_sources is not ctx.user_key_sources):
        return
    head.lane = ReplayLane(entry, head.hot_sources, instance, header, status, head.version, head.method == "HEAD",
                           counters)
