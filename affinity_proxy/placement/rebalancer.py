"""The gradual rebalance loop (issue #14): moves idle pins off instances over their share, leader only.

Every ``interval`` seconds each node tries the shared ``rebalance`` lock (``SharedState``, the
mechanism the reaper uses). The lock is not released after the pass: it expires after ``interval``,
so at most one pass runs per ``interval`` across every node and worker, and each pass moves at most
``max_moves_per_minute x interval / 60`` pins: the budget holds cluster-wide.

A pass reads the pin counts (``PinStore.counts()``) plus the anonymous sessions of the live
snapshot, lists the pins of instances above the mean (least recently used first), and runs the pure
planner ``routing.rebalance.plan_rebalance``. Each move is a compare-and-set re-pin (re-pin reason
``rebalance``), so a user who was re-pinned meanwhile is left alone.

Never an active user: a pin's last use is known from its sliding expiry
(``last use = now - (pin_ttl - expires_in)``), but a keyed user with a fresh cookie reaches the store
only once per ``cookie.revalidate_after`` and the Redis store writes touches in batches every
``touch_interval``. A pin therefore counts as idle only when unused for
``idle_after + revalidate_after + touch_interval``: then the user sent no request for at least
``idle_after``. The moved user's cookie is older than ``revalidate_after``, so the next request asks
the store, finds the new pin and gets a fresh cookie for the new instance. After a store error
(``PinStore.errors`` of this process) no pin moves for one idle threshold: touches that could not
be written are retried later, so meanwhile a pin's last use may look older than it is.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from affinity_proxy.config import Config
from affinity_proxy.pins import redis as redis_store
from affinity_proxy.pins.reaper import ReaperLock
from affinity_proxy.pins.store import PinStore, PinStoreUnavailable
from affinity_proxy.routing.model import MembershipView
from affinity_proxy.routing.rebalance import Move, plan_rebalance

log = logging.getLogger("affinity_proxy.rebalance")

LOCK_NAME = "rebalance"
DEFAULT_INTERVAL = 5.0
LIST_LIMIT = 100_000


@dataclass(frozen=True, slots=True)
class RebalanceOutcome:
    """One pass: the planned moves, those applied (empty on a dry run), and whether another node held
    the lock (``skipped``: nothing was planned)."""

    planned: list[Move] = field(default_factory=list)
    applied: list[Move] = field(default_factory=list)
    skipped: bool = False
    loads: Mapping[str, int] = field(default_factory=dict)


class Rebalancer:
    """``anonymous()`` returns the live anonymous sessions per instance (they count in the loads but
    cannot be moved here). ``on_moved(move)`` is called for every applied move (metrics, events)."""

    def __init__(
        self,
        store: PinStore,
        view: Callable[[], MembershipView],
        *,
        idle_after: float,
        max_moves_per_minute: int,
        pin_ttl: float,
        slack: float,
        anonymous: Callable[[], Mapping[str, int]] = dict,
        lock: ReaperLock | None = None,
        on_moved: Callable[[Move], None] = lambda move: None,
        interval: float = DEFAULT_INTERVAL,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if interval <= 0 or idle_after <= 0 or max_moves_per_minute < 1:
            raise ValueError("interval, idle_after and max_moves_per_minute must be positive")
        self.store = store
        self._view = view
        self.idle_after = idle_after
        self.max_moves_per_minute = max_moves_per_minute
        self.pin_ttl = pin_ttl
        self.slack = slack
        self._anonymous = anonymous
        self._lock = lock
        self._on_moved = on_moved
        self.interval = interval
        self._clock = clock
        self.passes = 0  # passes run under the lock (or without one)
        self.skips = 0  # passes skipped because another process held the lock
        self.moved = 0
        self.failures = 0
        self.held_back = 0  # passes that moved nothing because the store failed lately
        self._store_errors = int(getattr(store, "errors", 0))
        self._store_error_at = float("-inf")

    @property
    def idle_threshold(self) -> float:
        """Seconds a pin must be unused before it may move (see the module docstring)."""
        return self.idle_after + self.slack

    @property
    def budget(self) -> int:
        """Moves per pass: ``max_moves_per_minute`` spread over the passes of a minute (at least 1)."""
        return max(1, int(self.max_moves_per_minute * self.interval / 60))

    async def plan(self, max_moves: int) -> tuple[list[Move], dict[str, int]]:
        """The moves a pass would make now, and the loads they were planned on. Raises PinStoreUnavailable."""
        view = self._view()
        loads: dict[str, int] = dict(await self.store.counts())
        for instance, n in self._anonymous().items():
            loads[instance] = loads.get(instance, 0) + n
        up = view.ring.weights
        mean = sum(loads.get(i, 0) for i in up) / max(1, len(up))
        now = self._clock()
        pins: dict[str, list[tuple[str, float]]] = {}
        for inst in view.instances:  # sources can only be instances above the mean, or draining ones
            if not inst.state.routable or loads.get(inst.id, 0) == 0 or (inst.id in up and loads[inst.id] <= mean):
                continue
            listed = await self.store.list(inst.id, limit=LIST_LIMIT)
            used = [(p.user_key, now - (self.pin_ttl - p.expires_in)) for p in listed if p.expires_in is not None]
            pins[inst.id] = sorted(used, key=lambda item: item[1])  # least recently used first
        # plan_rebalance compares now - last_active with idle_after: shift by the slack so that a pin
        # counts as idle only after idle_after + slack.
        moves = plan_rebalance(view, pins, loads, now - self.slack, self.idle_after, max_moves)
        return moves, loads

    async def run_once(self, dry_run: bool = False, max_moves: int | None = None) -> RebalanceOutcome:
        """One pass (``dry_run``: plan only, no lock). Raises PinStoreUnavailable."""
        budget = self.budget if max_moves is None else max_moves
        if dry_run:
            moves, loads = await self.plan(budget)
            return RebalanceOutcome(planned=moves, loads=loads)
        if self._store_failed_lately():
            self.held_back += 1
            return RebalanceOutcome()
        if self._lock is not None and await self._lock.acquire_lock(LOCK_NAME, self.interval) is None:
            self.skips += 1
            return RebalanceOutcome(skipped=True)
        moves, loads = await self.plan(budget)
        applied = []
        for move in moves:
            result = await self.store.repin(move.user_key, move.source, move.target)
            if result.won and result.pin.instance == move.target:
                applied.append(move)
                self._on_moved(move)
        self.passes += 1
        self.moved += len(applied)
        if applied:
            log.info("rebalanced idle pins", extra={"fields": {
                "moved": len(applied), "planned": len(moves),
                "to": {t: sum(1 for m in applied if m.target == t) for t in sorted({m.target for m in applied})}}})
        return RebalanceOutcome(planned=moves, applied=applied, loads=loads)

    def _store_failed_lately(self) -> bool:
        """True while a store error is more recent than the idle threshold: touches written in
        batches may have been held back, so a pin's last use may look older than it is."""
        errors = int(getattr(self.store, "errors", 0))
        if errors != self._store_errors:
            self._store_errors, self._store_error_at = errors, self._clock()
        return self._clock() - self._store_error_at < self.idle_threshold

    async def run(self) -> None:
        """Background loop; one log line per failure streak."""
        while True:
            try:
                await self.run_once()
            except PinStoreUnavailable as exc:
                if self.failures == 0:
                    log.warning("rebalancer cannot reach the pin store: %s", exc)
                self.failures += 1
                self._store_error_at = self._clock()
            else:
                if self.failures:
                    log.info("rebalancer recovered after %d failed passes", self.failures)
                self.failures = 0
            await asyncio.sleep(self.interval)


def idle_slack(config: Config, store: PinStore) -> float:
    """Seconds added to ``idle_after`` before a pin counts as idle (see the module docstring):
    ``cookie.revalidate_after``, the store's touch interval and, on a Redis store that keeps pin
    expiries on a grid of ``pin_ttl / WINDOWS``, that grid."""
    touch_interval = float(getattr(store, "touch_interval", 0.0))
    windows = getattr(redis_store, "WINDOWS", None) if isinstance(store, redis_store.RedisPinStore) else None
    grid = config.pin_ttl / windows if windows else 0.0
    return config.cookie.revalidate_after + touch_interval + grid


def outcome_doc(rebalancer: Rebalancer, outcome: RebalanceOutcome, *, dry_run: bool) -> dict[str, object]:
    """The JSON document of one pass, the same for admin ``POST /rebalance`` and the CLI's direct-to-Redis
    ``rebalance`` (one shape for both: the CLI prints what a node's admin API would answer).
    ``"skipped": true`` is present only when another process held the rebalance lock."""
    doc: dict[str, object] = {
        "dry_run": dry_run, "idle_after": rebalancer.idle_after, "idle_threshold": rebalancer.idle_threshold,
        "budget": rebalancer.budget, "loads": dict(sorted(outcome.loads.items())),
        "moves": [{"user": m.user_key, "from": m.source, "to": m.target} for m in outcome.planned],
        "moved": len(outcome.applied),
    }
    if outcome.skipped:
        doc["skipped"] = True
    return doc


def rebalancer_for(config: Config, store: PinStore, view: Callable[[], MembershipView], **kwargs: object) -> Rebalancer:
    """The ``Rebalancer`` ``placement.rebalance`` asks for (node and CLI alike); ``kwargs``: ``anonymous``,
    ``lock``, ``on_moved``, ``clock``."""
    settings = config.placement.rebalance
    return Rebalancer(store, view, idle_after=settings.idle_after, max_moves_per_minute=settings.max_moves_per_minute,
                      pin_ttl=config.pin_ttl, slack=idle_slack(config, store),
                      interval=min(DEFAULT_INTERVAL, settings.idle_after), **kwargs)  # type: ignore[arg-type]
