"""MemoryPinStore: the embedded pin store for a single process (``store.url: memory://``).

Pins live in a dict ``user_key -> (instance, expires_at)`` plus a per-instance index
``instance -> {user_key}`` so ``list(instance)`` and ``counts()`` never walk unrelated pins. TTLs slide:
``claim``/``repin``/``set``/``touch`` (re)start the clock, ``get`` does not. Expired pins are invisible
at once and are purged lazily (on access, and in bulk by ``list``/``counts``/``drop_instance``).

Atomicity: every method runs on one event loop and never awaits inside a mutation, so each call is
atomic with respect to the others, which is all the PinStore contract asks. Not thread-safe, and not
shared between worker processes (use the Redis store for that). Imports only ``routing.model`` and
``pins.store``.
"""

from __future__ import annotations

import builtins
import time
from collections.abc import Callable

from affinity_proxy.pins.store import ClaimResult, Pin
from affinity_proxy.routing.model import InstanceId


class MemoryPinStore:
    """In-process PinStore. Every method is O(1) except ``list``/``counts``/``drop_instance``, which
    purge expired pins first (O(number of pins)); they are admin and reaper calls, not hot-path ones.
    """

    kind = "memory"

    def __init__(self, pin_ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        if pin_ttl <= 0:
            raise ValueError(f"pin_ttl must be positive, got {pin_ttl!r}")
        self.pin_ttl = pin_ttl
        self._clock = clock
        self._pins: dict[str, tuple[InstanceId, float]] = {}
        self._by_instance: dict[InstanceId, set[str]] = {}
        self._closed = False

    # -- internal helpers (synchronous: no await may split a mutation) --

    def _live(self, user_key: str, now: float) -> tuple[InstanceId, float] | None:
        entry = self._pins.get(user_key)
        if entry is None:
            return None
        if entry[1] <= now:
            self._remove(user_key, entry[0])
            return None
        return entry

    def _remove(self, user_key: str, instance: InstanceId) -> None:
        del self._pins[user_key]
        members = self._by_instance.get(instance)
        if members is not None:
            members.discard(user_key)
            if not members:
                del self._by_instance[instance]

    def _write(self, user_key: str, instance: InstanceId, now: float) -> Pin:
        old = self._pins.get(user_key)
        if old is not None and old[0] != instance:
            self._remove(user_key, old[0])
        self._pins[user_key] = (instance, now + self.pin_ttl)
        self._by_instance.setdefault(instance, set()).add(user_key)
        return Pin(user_key, instance, self.pin_ttl)

    def _pin(self, user_key: str, entry: tuple[InstanceId, float], now: float) -> Pin:
        return Pin(user_key, entry[0], entry[1] - now)

    def _purge(self, now: float) -> None:
        expired = [(key, inst) for key, (inst, expires_at) in self._pins.items() if expires_at <= now]
        for key, inst in expired:
            self._remove(key, inst)

    # -- PinStore --

    async def get(self, user_key: str) -> Pin | None:
        now = self._clock()
        entry = self._live(user_key, now)
        return self._pin(user_key, entry, now) if entry is not None else None

    async def claim(self, user_key: str, instance: InstanceId) -> ClaimResult:
        now = self._clock()
        entry = self._live(user_key, now)
        if entry is not None:
            return ClaimResult(self._pin(user_key, entry, now), won=False)
        return ClaimResult(self._write(user_key, instance, now), won=True)

    async def repin(self, user_key: str, expected: InstanceId | None, instance: InstanceId) -> ClaimResult:
        """Compare-and-set. A pin that is already gone (expired, dropped, reaped) counts as matching
        any ``expected``: the caller wanted it replaced, and ``ClaimResult`` cannot carry "no pin"."""
        now = self._clock()
        entry = self._live(user_key, now)
        if entry is not None and entry[0] != expected:
            return ClaimResult(self._pin(user_key, entry, now), won=False)
        return ClaimResult(self._write(user_key, instance, now), won=True)

    async def set(self, user_key: str, instance: InstanceId) -> Pin:
        return self._write(user_key, instance, self._clock())

    async def drop(self, user_key: str, expected: InstanceId | None = None) -> bool:
        entry = self._live(user_key, self._clock())
        if entry is None or (expected is not None and entry[0] != expected):
            return False
        self._remove(user_key, entry[0])
        return True

    async def touch(self, user_key: str, instance: InstanceId) -> None:
        """Extend the pin in place when it still names ``instance``: a dict write, so no batching."""
        now = self._clock()
        entry = self._live(user_key, now)
        if entry is not None and entry[0] == instance:
            self._pins[user_key] = (instance, now + self.pin_ttl)

    async def list(self, instance: InstanceId | None = None, limit: int = 1000) -> builtins.list[Pin]:
        """Up to ``limit`` live pins (of ``instance`` when given), in no particular order."""
        now = self._clock()
        self._purge(now)
        if instance is None:
            keys: builtins.list[str] = builtins.list(self._pins)
        else:
            keys = builtins.list(self._by_instance.get(instance, ()))
        return [self._pin(key, self._pins[key], now) for key in keys[: max(0, limit)]]

    async def counts(self) -> dict[InstanceId, int]:
        self._purge(self._clock())
        return {inst: len(members) for inst, members in self._by_instance.items()}

    async def drop_instance(self, instance: InstanceId) -> builtins.list[str]:
        self._purge(self._clock())
        members = self._by_instance.pop(instance, set())
        for key in members:
            del self._pins[key]
        return builtins.list(members)

    async def ping(self) -> bool:
        return not self._closed

    async def flush(self) -> None:
        """Nothing is batched in memory."""

    async def close(self) -> None:
        """Marks the store closed (``ping`` turns False). There is nothing to release; idempotent."""
        self._closed = True
