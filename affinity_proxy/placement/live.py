"""Live sessions per instance, read without a store call on the request path.

Live sessions = stored pins + anonymous cookie sessions seen within ``placement.rebalance.idle_after``.

- Pins: ``PinStore.counts()`` (the per-instance index, kept exact under claims, re-pins, expiry and
  reaping by the store's own scripts), read by a background refresh every ``interval`` seconds.
  Between refreshes, pins this process placed (``placed``) are added on top, so a burst of new
  users on one process never sees a stale zero.
- Anonymous sessions: a sighting (``seen``) of an anonymous cookie records its identity (instance
  and issue time) in the current time bucket of a per-process sketch, with no I/O. Memory store:
  the sketch is a set per instance and bucket, exact. Redis: the refresh writes the pending
  sightings in one pipeline (``PFADD`` into per-instance, per-bucket HyperLogLogs shared by every
  process) and reads ``PFCOUNT`` over the buckets of the window, which merges every node's
  sightings (standard error 0.81 %).

Bounds (README "Placement"): the snapshot is at most ``interval`` (+ one store round trip) old; the
window is ``idle_after`` rounded up to a whole bucket (``idle_after / 10``, at least 1 s); a
session's cookie is re-issued every ``cookie.revalidate_after`` while it is active, and every
re-issued cookie is a new identity, so a session active throughout the window counts up to
``1 + idle_after / revalidate_after`` times, and anonymous sessions started on one instance in the
same second share a cookie and count once.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

from affinity_proxy.pins.redis import RedisPinStore
from affinity_proxy.pins.store import PinStore, PinStoreUnavailable

log = logging.getLogger("affinity_proxy.placement")

DEFAULT_INTERVAL = 1.0
BUCKETS_PER_WINDOW = 10
MAX_PENDING_SIGHTINGS = 100_000


def bucket_width(window: float) -> float:
    """Seconds per sketch bucket: a tenth of the window, at least one second."""
    return max(1.0, window / BUCKETS_PER_WINDOW)


def window_buckets(now: float, window: float) -> range:
    """The bucket numbers that cover ``[now - window, now]``."""
    width = bucket_width(window)
    last = math.floor(now / width)
    return range(math.floor((now - window) / width), last + 1)


class SessionSketch(Protocol):
    """Distinct anonymous sessions per instance over a sliding window of time buckets."""

    def add(self, instance: str, token: str, now: float) -> None:
        """Record a sighting; no I/O."""
        ...

    async def counts(self, instances: Iterable[str], now: float) -> dict[str, int]:
        """Write pending sightings and count each instance's distinct sessions in the window.
        May raise ``PinStoreUnavailable``."""
        ...


class MemorySketch:
    """Exact: a set of session identities per (instance, bucket), one process."""

    def __init__(self, window: float) -> None:
        self.window = window
        self._sets: dict[tuple[str, int], set[str]] = {}

    def add(self, instance: str, token: str, now: float) -> None:
        key = (instance, math.floor(now / bucket_width(self.window)))
        found = self._sets.get(key)
        if found is None:
            found = self._sets[key] = set()
        found.add(token)

    async def counts(self, instances: Iterable[str], now: float) -> dict[str, int]:
        buckets = window_buckets(now, self.window)
        for key in [k for k in self._sets if k[1] < buckets.start]:
            del self._sets[key]
        merged: dict[str, set[str]] = {}
        for (instance, _), tokens in self._sets.items():
            merged.setdefault(instance, set()).update(tokens)
        return {instance: len(tokens) for instance, tokens in merged.items() if tokens}


class RedisSketch:
    """HyperLogLogs in the store's Redis, one per instance and bucket, shared by every process:
    ``P sess:{s:<instance>}<bucket>`` (one hash tag per instance, so ``PFCOUNT`` over the window's
    buckets touches one cluster slot). Keys expire two windows after their bucket."""

    def __init__(self, store: RedisPinStore, window: float, max_pending: int = MAX_PENDING_SIGHTINGS) -> None:
        self.store = store
        self.window = window
        self.max_pending = max_pending
        self._pending: dict[tuple[str, int], set[str]] = {}
        self._size = 0
        self.dropped = 0  # sightings not recorded because the pending batch was full (store down)

    def key(self, instance: str, bucket: int) -> str:
        return f"{self.store.prefix}sess:{{s:{instance}}}{bucket}"

    def add(self, instance: str, token: str, now: float) -> None:
        if self._size >= self.max_pending:
            self.dropped += 1
            return
        key = (instance, math.floor(now / bucket_width(self.window)))
        found = self._pending.get(key)
        if found is None:
            found = self._pending[key] = set()
        if token not in found:
            found.add(token)
            self._size += 1

    async def counts(self, instances: Iterable[str], now: float) -> dict[str, int]:
        pending, self._pending, self._size = self._pending, {}, 0
        buckets = window_buckets(now, self.window)
        ttl_ms = max(1000, round(2 * (self.window + bucket_width(self.window)) * 1000))
        names = sorted(set(instances) | {instance for instance, _ in pending})

        async def run() -> list[Any]:
            async with self.store.client.pipeline(transaction=False) as pipe:
                for (instance, bucket), tokens in pending.items():
                    key = self.key(instance, bucket)
                    pipe.pfadd(key, *tokens)
                    pipe.pexpire(key, ttl_ms)
                if self.store.cluster:
                    # redis-py's cluster pipeline refuses PFCOUNT (a multi-key command), although the
                    # window's keys share one hash tag: ask each instance's slot directly.
                    written = list(await pipe.execute()) if pending else []
                    client = self.store.client
                    counted = await asyncio.gather(
                        *(client.pfcount(*(self.key(instance, b) for b in buckets)) for instance in names),
                        return_exceptions=True)
                    for reply in counted:  # every call has finished: raise the first failure, if any
                        if isinstance(reply, BaseException):
                            raise reply
                    return written + list(counted)
                for instance in names:
                    pipe.pfcount(*(self.key(instance, b) for b in buckets))
                return list(await pipe.execute())

        try:
            replies = await self.store.call("sessions", run)
        except PinStoreUnavailable:
            self._restore(pending)
            raise
        found = replies[2 * len(pending):]
        return {instance: int(n) for instance, n in zip(names, found, strict=True) if int(n) > 0}

    def _restore(self, pending: dict[tuple[str, int], set[str]]) -> None:
        for key, tokens in pending.items():
            for token in tokens:
                self.add(key[0], token, key[1] * bucket_width(self.window))


def open_sketch(store: PinStore, window: float) -> SessionSketch:
    """HyperLogLogs on a Redis store (shared by every process), exact sets in memory otherwise."""
    if isinstance(store, RedisPinStore):
        return RedisSketch(store, window)
    return MemorySketch(window)


class LiveSessions:
    """The snapshot ``place`` reads: ``loads`` (live sessions per instance) and its parts ``pins`` and
    ``anonymous``. Readers never wait: every field is replaced whole by ``refresh``.

    ``instances()`` names the instances whose sketches to read (the membership's ids)."""

    def __init__(self, store: PinStore, *, window: float, instances: Callable[[], Iterable[str]],
                 interval: float = DEFAULT_INTERVAL, sketch: SessionSketch | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        if window <= 0 or interval <= 0:
            raise ValueError("window and interval must be positive")
        self.store = store
        self.window = window
        self.interval = interval
        self.sketch = sketch if sketch is not None else open_sketch(store, window)
        self._instances = instances
        self._clock = clock
        self.pins: Mapping[str, int] = {}
        self.anonymous: Mapping[str, int] = {}
        self.loads: Mapping[str, int] = {}
        self._placed: dict[str, int] = {}
        #: (until, instance): anonymous sessions moved away from ``instance``; their old cookie stays
        #: in the sketch for the window, so they are taken off its count until then.
        self._moved_away: list[tuple[float, str]] = []
        self.refreshed_at = 0.0  # clock() of the last successful refresh (0: never)
        self.failures = 0

    def placed(self, instance: str) -> None:
        """A pin this process just claimed: count it until the next refresh reads it from the store."""
        self._placed[instance] = self._placed.get(instance, 0) + 1
        self._rebuild()

    def moved(self, source: str, target: str) -> None:
        """An idle anonymous session is moving from ``source`` to ``target`` (no I/O): off the
        source for as long as its old cookie stays in the sketch, on the target until the next refresh."""
        self._moved_away.append((self._clock() + self.window + bucket_width(self.window), source))
        self._placed[target] = self._placed.get(target, 0) + 1
        self._rebuild()

    def seen(self, instance: str, token: str) -> None:
        """An anonymous cookie session was seen on ``instance`` (no I/O)."""
        self.sketch.add(instance, token, self._clock())

    def _rebuild(self) -> None:
        loads = dict(self.pins)
        for part in (self.anonymous, self._placed):
            for instance, n in part.items():
                loads[instance] = loads.get(instance, 0) + n
        for _, instance in self._moved_away:
            if loads.get(instance, 0) > 0:
                loads[instance] -= 1
        self.loads = loads

    async def refresh(self) -> None:
        """Read the pin counts and the sketches (raises ``PinStoreUnavailable``; the old snapshot stays)."""
        placed_before = dict(self._placed)
        now = self._clock()
        pins = dict(await self.store.counts())
        anonymous = await self.sketch.counts(self._instances(), now)
        self.pins, self.anonymous = pins, anonymous
        self._placed = {k: n - placed_before.get(k, 0) for k, n in self._placed.items() if n > placed_before.get(k, 0)}
        self._moved_away = [(until, instance) for until, instance in self._moved_away if until > now]
        self._rebuild()
        self.refreshed_at = now

    async def run(self, on_refresh: Callable[[bool], None] = lambda ok: None) -> None:
        """Refresh every ``interval``; one log line per failure streak. ``on_refresh(ok)`` after each."""
        while True:
            try:
                await self.refresh()
            except PinStoreUnavailable as exc:
                if self.failures == 0:
                    log.warning("live-session counts unavailable, keeping the last snapshot: %s", exc)
                self.failures += 1
                on_refresh(False)
            else:
                if self.failures:
                    log.info("live-session counts back after %d failed refreshes", self.failures)
                self.failures = 0
                on_refresh(True)
            await asyncio.sleep(self.interval)
