"""The PinStore seam: what the proxy needs from a pin store, and the errors it may raise.

Implementations: ``pins.memory.MemoryPinStore`` (one process) and ``pins.redis.RedisPinStore``
(shared by every worker and node). Every method is a coroutine and may raise
``PinStoreUnavailable`` when the backing store cannot be reached in time; callers on the request
path catch it, count it and fall back to the ring. Every mutation is atomic in the store itself
(no check-then-act in the caller): ``claim`` is SET-if-absent, ``repin`` and ``drop(expected=...)``
are compare-and-set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from affinity_proxy.routing.model import InstanceId


class PinStoreUnavailable(Exception):
    """The store could not answer (connection refused, timeout). The request path degrades."""


@dataclass(frozen=True, slots=True)
class Pin:
    """One stored pin. ``expires_in`` is seconds left of its sliding TTL (None: no expiry)."""

    user_key: str
    instance: InstanceId
    expires_in: float | None = None


@dataclass(frozen=True, slots=True)
class ClaimResult:
    """Outcome of ``claim``/``repin``: the pin now stored, and whether this call wrote it."""

    pin: Pin
    won: bool


@runtime_checkable
class PinStore(Protocol):
    """Contract every pin store honours (tests/pins/test_contract.py runs it on each store)."""

    kind: str  # "memory" | "redis": shown by session-check and health

    async def get(self, user_key: str) -> Pin | None:
        """The live pin for ``user_key`` or None. One round trip; no write."""
        ...

    async def claim(self, user_key: str, instance: InstanceId) -> ClaimResult:
        """Pin ``user_key`` to ``instance`` only if it has no pin (SET NX). Returns the winner:
        when another writer got there first, ``won`` is False and ``pin`` is theirs."""
        ...

    async def repin(self, user_key: str, expected: InstanceId | None, instance: InstanceId) -> ClaimResult:
        """Compare-and-set: replace the pin only while it still names ``expected`` (None: absent).
        Otherwise nothing changes and the current pin is returned with ``won`` False."""
        ...

    async def set(self, user_key: str, instance: InstanceId) -> Pin:
        """Unconditional write (operator override, ``pins set``)."""
        ...

    async def drop(self, user_key: str, expected: InstanceId | None = None) -> bool:
        """Delete the pin (only while it names ``expected`` when given). True when one was deleted."""
        ...

    async def touch(self, user_key: str, instance: InstanceId) -> None:
        """Slide the TTL of a pin that was just used. Implementations batch or rate-limit this:
        it must never cost one store write per request."""
        ...

    async def list(self, instance: InstanceId | None = None, limit: int = 1000) -> list[Pin]:
        """Pins, optionally only those of one instance, at most ``limit``. An admin and reaper call:
        the Redis store walks the pin keys by incremental SCAN (stopping once ``limit`` are found), the
        memory store its per-instance index."""
        ...

    async def counts(self) -> dict[InstanceId, int]:
        """Number of live pins per instance, exact (expired pins not counted), from per-instance
        counters or indexes: no keyspace scan, a cost independent of the number of pins."""
        ...

    async def drop_instance(self, instance: InstanceId) -> list[str]:
        """Delete every pin that still names ``instance``; returns the user keys deleted, each exactly
        once even when several reapers race (a pin re-pinned meanwhile is left alone)."""
        ...

    async def ping(self) -> bool:
        """True when the store answers. Never raises."""
        ...

    async def flush(self) -> None:
        """Write out any batched TTL refreshes (called on shutdown)."""
        ...

    async def close(self) -> None:
        """Release connections. Idempotent."""
        ...
