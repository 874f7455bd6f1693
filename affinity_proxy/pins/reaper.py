"""Reaper: deletes pins whose instance has been ``down`` or ``gone`` for longer than ``reaper.grace``.

A pin to a dead instance is harmless on the request path (the decision re-pins it), but it skews
``affinity_pins`` and the bounded-load counts, so it is collected in the background. Stopped
instances (fly autostop) are never reaped: a replay wakes them.

Several nodes: every node watches (one ``counts()`` per tick, so each knows since when an instance
is dead, whoever reaped last), but only the holder of the shared ``reaper`` lock reaps, and a node
takes the lock only when something is due. The lock ttl is ``max(2 x interval, 10 s)``; it is
released with a compare-and-delete after the pass. Even if a pass outlives its lock,
``store.drop_instance`` is atomic per pin, so no pin is deleted (or counted) twice: each orphan is
counted once, in ``affinity_orphaned_pins_reaped_total`` of the node that deleted it.

Counts left after a sweep: ``drop_instance`` deletes every pin of the instance that existed when it
started, but ``counts()`` can still show some afterwards: pins written to the dead instance during
the sweep, or, on Redis, counts of pins deleted behind the store's back (evicted, DEL by hand, an old
node of a rolling deploy), which expire with those pins' expiry. The reaper remembers that residue
per instance and sweeps again only when the count grows past it, so stale counts never cost a
keyspace walk per pass.

Store errors: exponential backoff with jitter (``interval`` doubling to ``10 x interval``, each
delay drawn from the upper half of its window), one log line per failure streak and one on recovery.
Imports ``routing.model`` and ``pins.store`` only; the lock is the small ``ReaperLock`` seam below
(``membership.shared.SharedState`` satisfies it).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from affinity_proxy.pins.store import PinStore, PinStoreUnavailable
from affinity_proxy.routing.model import InstanceId, InstanceState, MembershipView

log = logging.getLogger("affinity_proxy.reaper")

_DEAD = frozenset({InstanceState.DOWN, InstanceState.GONE})
LOCK_NAME = "reaper"
MIN_LOCK_TTL = 10.0
BACKOFF_CAP_FACTOR = 10


class ReaperLock(Protocol):
    """A lock shared by every node (``SharedState``). Both calls may raise ``PinStoreUnavailable``."""

    async def acquire_lock(self, name: str, ttl: float) -> str | None: ...

    async def release_lock(self, name: str, token: str) -> bool: ...


@dataclass(frozen=True, slots=True)
class ReapOutcome:
    """One pass: ``reaped`` maps instance -> user keys deleted (or, dry run, that would be);
    ``skipped`` is True when pins were due but another node held the lock."""

    reaped: dict[str, list[str]] = field(default_factory=dict)
    skipped: bool = False


class Reaper:
    """Tracks since when each pinned instance is dead and reaps its pins after the grace period.

    ``lock`` None means this process is the only reaper (tests, one-off admin apps).
    """

    def __init__(
        self,
        store: PinStore,
        view: Callable[[], MembershipView],
        *,
        grace: float,
        interval: float,
        on_reaped: Callable[[int], None] = lambda n: None,
        clock: Callable[[], float] = time.monotonic,
        lock: ReaperLock | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._store = store
        self._view = view
        self.grace = grace
        self.interval = interval
        self._on_reaped = on_reaped
        self._clock = clock
        self._lock = lock
        self._rng = rng if rng is not None else random.Random()
        self._dead_since: dict[InstanceId, float] = {}
        self._residue: dict[InstanceId, int] = {}  # counts left after the last sweep (see the module doc)
        self._failing = False
        self.failures = 0  # consecutive failed passes (the backoff level)
        self.passes = 0  # passes that reaped under the lock (or without one)
        self.skips = 0  # passes skipped because another node held the lock
        self.runs = 0  # completed iterations of run() (watching, reaping or skipping)

    @property
    def lock_ttl(self) -> float:
        return max(2 * self.interval, MIN_LOCK_TTL)

    def _observe(self, counts: dict[InstanceId, int], now: float) -> list[InstanceId]:
        """Update dead-since times; return instances dead past the grace that still have pins."""
        view = self._view()
        candidates = set(counts) | {i.id for i in view.instances}
        due = []
        for instance in sorted(candidates):
            if view.state_of(instance) in _DEAD:
                since = self._dead_since.setdefault(instance, now)
                n = counts.get(instance, 0)
                residue = min(self._residue.pop(instance, 0), n)
                if residue:
                    self._residue[instance] = residue
                if now - since >= self.grace and n > residue:
                    due.append(instance)
            else:
                self._dead_since.pop(instance, None)
                self._residue.pop(instance, None)
        for instance in set(self._dead_since) - candidates:
            del self._dead_since[instance]  # no pins and no longer listed: nothing left to time
            self._residue.pop(instance, None)
        return due

    async def reap(self, dry_run: bool = False) -> dict[str, list[str]]:
        """One pass; ``{instance: [user keys]}`` reaped (or, with ``dry_run``, that would be)."""
        return (await self.reap_pass(dry_run)).reaped

    async def reap_pass(self, dry_run: bool = False) -> ReapOutcome:
        """One pass. ``dry_run`` lists and changes nothing (no lock). Raises PinStoreUnavailable."""
        due = self._observe(await self._store.counts(), self._clock())
        if not due:
            return ReapOutcome()
        if dry_run:
            listed = {instance: sorted(p.user_key for p in await self._store.list(instance, limit=100_000))
                      for instance in due}
            return ReapOutcome({k: v for k, v in listed.items() if v})
        if self._lock is None:
            return ReapOutcome(await self._drop(due))
        token = await self._lock.acquire_lock(LOCK_NAME, self.lock_ttl)
        if token is None:
            self.skips += 1
            return ReapOutcome(skipped=True)
        try:
            return ReapOutcome(await self._drop(due))
        finally:
            if not await self._lock.release_lock(LOCK_NAME, token):
                log.warning("reaper lock expired before the pass ended (ttl %.1fs)", self.lock_ttl)

    async def _drop(self, due: list[InstanceId]) -> dict[str, list[str]]:
        result: dict[str, list[str]] = {}
        view = self._view()
        for instance in due:
            if view.state_of(instance) not in _DEAD:
                continue  # came back while we waited for the lock
            keys = await self._store.drop_instance(instance)
            if keys:
                result[instance] = sorted(keys)
                self._on_reaped(len(keys))
                log.info("reaped orphaned pins", extra={"fields": {"instance": instance, "pins": len(keys)}})
        left = await self._store.counts()
        for instance in due:
            if left.get(instance, 0) > 0:
                self._residue[instance] = left[instance]
        self.passes += 1
        return result

    def next_delay(self) -> float:
        """Seconds until the next pass: ``interval`` normally; after k failures in a row a jittered
        delay in the upper half of ``min(10 x interval, interval x 2**k)``."""
        if self.failures == 0:
            return self.interval
        window = min(BACKOFF_CAP_FACTOR * self.interval, self.interval * 2 ** min(self.failures, 32))
        return window * self._rng.uniform(0.5, 1.0)

    async def run(self) -> None:
        """Background loop; one log line per failure streak, not per attempt, and one on recovery."""
        while True:
            try:
                await self.reap_pass()
            except PinStoreUnavailable as exc:
                if not self._failing:
                    log.warning("reaper cannot reach the pin store, backing off: %s", exc)
                self._failing = True
                self.failures += 1
            else:
                if self._failing:
                    log.info("reaper recovered after %d failed passes", self.failures)
                self._failing = False
                self.failures = 0
                self.runs += 1
            await asyncio.sleep(self.next_delay())
