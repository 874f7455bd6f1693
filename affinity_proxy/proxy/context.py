"""ProxyContext: the wired parts one process shares, stored on the app under ``CONTEXT``.

Built by ``app.build_app`` and read by handlers; holds no per-user state itself (pins live in the
store, membership in its snapshot), so several workers can each have their own.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from typing import Protocol

import aiohttp
from aiohttp import web

from affinity_proxy._tasks import TaskSet
from affinity_proxy.config import Config
from affinity_proxy.membership.health import HealthChecker
from affinity_proxy.membership.heartbeat import MembershipRefresher
from affinity_proxy.membership.private_net import PrivateNet
from affinity_proxy.membership.registry import Membership
from affinity_proxy.membership.shared import SharedState
from affinity_proxy.observability.events import RecentEvents
from affinity_proxy.observability.metrics import ProxyMetrics
from affinity_proxy.pins.near_cache import PinNearCache
from affinity_proxy.pins.store import PinStore
from affinity_proxy.placement.budget import MoveBudget
from affinity_proxy.placement.live import LiveSessions
from affinity_proxy.routing.cookie import CookieCodec
from affinity_proxy.routing.decide import DecidePolicy
from affinity_proxy.routing.model import InstanceId
from affinity_proxy.routing.userkey import UserKeySource


class OutboundClient(Protocol):
    """The process's outgoing HTTP client as the shared parts see it: its aiohttp session (Fly API,
    private-network look-ups) and its lifecycle. The aiohttp engine's ``UpstreamClient`` is one;
    a Protocol so that ``proxy/`` names no engine."""

    @property
    def session(self) -> aiohttp.ClientSession: ...
    async def start(self) -> None: ...
    async def close(self) -> None: ...


class OpenWebSocket(Protocol):
    """A relayed WebSocket session as graceful shutdown sees it (engines.aiohttp.websocket.RelaySession)."""

    async def close(self, *, code: int = 1000, message: bytes = b"") -> bool: ...


@dataclass(slots=True)
class ProxyContext:
    config: Config
    membership: Membership
    store: PinStore
    codec: CookieCodec
    metrics: ProxyMetrics
    tasks: TaskSet
    policy: DecidePolicy
    user_key_sources: tuple[UserKeySource, ...]
    shared: SharedState  # drain marks, heartbeats, locks: Redis with a Redis store, else in memory
    client: OutboundClient | None = None  # engines.aiohttp.client.UpstreamClient, made by serve.app
    private_net: PrivateNet | None = None  # fly mode: 6PN names and waking stopped Machines
    health: HealthChecker | None = None
    refresher: MembershipRefresher | None = None  # the drain/heartbeat refresh loop (its ``rounds``)
    node: str = field(default_factory=lambda: os.environ.get("FLY_MACHINE_ID") or socket.gethostname())
    started_at: float = 0.0
    pin_counts: dict[str, int] = field(default_factory=dict)  # refreshed in the background for metrics
    store_ok: bool = True
    shutting_down: bool = False
    pin_cache: PinNearCache = field(default_factory=PinNearCache)  # last pins seen; used only when the store is down
    websockets: set[OpenWebSocket] = field(default_factory=set)  # open client sessions (shutdown)
    config_path: str | None = None  # the file ``serve`` loaded; reload re-reads it (None: built in code)
    reloads: int = 0
    events: RecentEvents = field(default_factory=RecentEvents)  # recent counts and re-pins for the dashboard
    live: LiveSessions | None = None  # live sessions per instance (bounded-load placement, affinity_sessions)
    moves: MoveBudget | None = None  # placement.rebalance on: moves of idle anonymous sessions this process may make


def decide_policy(config: Config) -> DecidePolicy:
    """The routing policy ``config`` asks for: fly placement ``local`` names this node's Machine."""
    fly = config.fly
    local = fly.machine_id if config.mode == "fly" and fly.placement == "local" and fly.machine_id else None
    return DecidePolicy(revalidate_after=config.cookie.revalidate_after,
                        local_instance=InstanceId(local) if local else None,
                        load_factor=config.placement.load_factor,
                        rebalance_idle=(rebalance.idle_after + config.cookie.revalidate_after
                                        if (rebalance := config.placement.rebalance).enabled else None))


CONTEXT: web.AppKey[ProxyContext] = web.AppKey("affinity_context", ProxyContext)
