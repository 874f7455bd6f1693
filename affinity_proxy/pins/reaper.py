"""Reaper: deletes pins whose instance has been ``down`` or ``gone`` for longer than ``reaper.grace``.

A pin to a dead instance is harmless on the request path (the decision re-pins it), but it skews
``affinity_pins`` and the bounded-load counts, so it is collected in the background. Stopped
instances (fly autostop) are never reaped: a replay wakes them. ``store.drop_instance`` is atomic
per pin, so concurrent reapers on several nodes never delete (or count) one pin twice.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from affinity_proxy.pins.store import PinStore, PinStoreUnavailable
from affinity_proxy.routing.model import InstanceId, InstanceState, MembershipView

log = logging.getLogger("affinity_proxy.reaper")

_DEAD = frozenset({InstanceState.DOWN, InstanceState.GONE})


class Reaper:
    """Tracks since when each pinned instance is dead and reaps its pins after the grace period."""

    def __init__(
        self,
        store: PinStore,
        view: Callable[[], MembershipView],
        *,
        grace: float,
        interval: float,
        on_reaped: Callable[[int], None] = lambda n: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._view = view
        self.grace = grace
        self.interval = interval
        self._on_reaped = on_reaped
        self._clock = clock
        self._dead_since: dict[InstanceId, float] = {}
        self._failing = False

    def _expired(self, counts: dict[InstanceId, int], now: float) -> list[InstanceId]:
        view = self._view()
        candidates = set(counts) | {i.id for i in view.instances}
        due = []
        for instance in sorted(candidates):
            if view.state_of(instance) in _DEAD:
                since = self._dead_since.setdefault(instance, now)
                if now - since >= self.grace and counts.get(instance, 0) > 0:
                    due.append(instance)
            else:
                self._dead_since.pop(instance, None)
        return due

    async def reap(self, dry_run: bool = False) -> dict[str, list[str]]:
        """One pass. Returns ``{instance: [user keys]}`` reaped (or, with ``dry_run``, that would be)."""
        counts = await self._store.counts()
        due = self._expired(counts, self._clock())
        result: dict[str, list[str]] = {}
        for instance in due:
            if dry_run:
                pins = await self._store.list(instance, limit=100_000)
                result[instance] = [p.user_key for p in pins]
                continue
            keys = await self._store.drop_instance(instance)
            if keys:
                result[instance] = keys
                self._on_reaped(len(keys))
                log.info("reaped orphaned pins", extra={"fields": {"instance": instance, "pins": len(keys)}})
        return result

    async def run(self) -> None:
        """Background loop; one log line per failure streak, not per attempt."""
        while True:
            try:
                await self.reap()
                if self._failing:
                    log.info("reaper recovered")
                self._failing = False
            except PinStoreUnavailable as exc:
                if not self._failing:
                    log.warning("reaper cannot reach the pin store: %s", exc)
                self._failing = True
            await asyncio.sleep(self.interval)
