"""SharedState: the state every node must agree on besides pins (drain marks, heartbeats, locks).

Why a seam: session state kept in one process's memory breaks as soon as a second worker or node
serves the same user. Drain marks, the health verdicts each node publishes (heartbeats), locks (the
reaper's, the Machines API poller's) and small shared values with a ttl (the Machines API poller's
last answer) therefore live behind this Protocol. ``MemorySharedState`` serves one process
(``store.url: memory://``); ``membership.redis_shared.RedisSharedState`` shares them through the Redis
of the pin store. Every mutation is atomic in the backing store itself (no check-then-act in callers).

Errors: every method may raise ``PinStoreUnavailable`` (the same outage as the pin store's, since
both use one Redis); the memory implementation never does. Imports only ``routing.model`` and
``pins.store``.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Literal, Protocol, runtime_checkable

from affinity_proxy.routing.model import InstanceId

HeartbeatState = Literal["up", "down", "draining", "stopped"]
HEARTBEAT_STATES: frozenset[str] = frozenset({"up", "down", "draining", "stopped"})


@dataclass(frozen=True, slots=True)
class HeartbeatInfo:
    """One node's verdict on one instance. ``seen_at`` is the publisher's wall clock (unix seconds)
    when it formed the verdict; it is for display (report age), never for expiry. ``group``: the
    Fly process group of the instance ("" when unknown: proxy mode, or no ``fly.process_group``),
    so ``fly.discovery: redis`` can keep only its own group's Machines."""

    state: HeartbeatState
    url: str
    region: str
    node: str
    seen_at: float
    group: str = ""

    def to_json(self) -> str:
        data = asdict(self)
        if not self.group:
            del data["group"]  # the report as nodes without groups write it
        return json.dumps(data, separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str) -> HeartbeatInfo:
        """Parse a stored report; ValueError when it is not one (a foreign or corrupt value)."""
        data = json.loads(raw)
        if not isinstance(data, dict) or data.get("state") not in HEARTBEAT_STATES:
            raise ValueError(f"not a heartbeat report: {raw[:100]!r}")
        group = data.get("group", "")
        return cls(str(data["state"]), str(data.get("url", "")), str(data.get("region", "")),  # type: ignore[arg-type]
                   str(data.get("node", "")), float(data.get("seen_at", 0.0)), group if isinstance(group, str) else "")


@runtime_checkable
class SharedState(Protocol):
    """Contract (tests/membership/test_shared_contract.py runs it on every implementation).

    Each call is one store round trip (memory: none) and may raise ``PinStoreUnavailable``.
    """

    kind: str  # "memory" | "redis"

    async def drain(self, instance: InstanceId) -> None:
        """Mark ``instance`` draining for every node. Idempotent."""
        ...

    async def undrain(self, instance: InstanceId) -> None:
        """Remove the drain mark. Idempotent."""
        ...

    async def drained(self) -> set[InstanceId]:
        """Every instance currently marked draining."""
        ...

    async def publish_heartbeat(self, node: str, instances: Mapping[InstanceId, HeartbeatInfo], ttl: float) -> None:
        """Store ``node``'s report on each instance, each expiring ``ttl`` seconds from now (store
        clock). Reports of other nodes, and this node's reports on other instances, are untouched."""
        ...

    async def heartbeats(self) -> dict[InstanceId, list[HeartbeatInfo]]:
        """Every unexpired report by any node, per instance (instances without one are absent)."""
        ...

    async def acquire_lock(self, name: str, ttl: float) -> str | None:
        """Take the lock ``name`` for ``ttl`` seconds if nobody holds it. Returns the holder's token,
        or None when it is held. The lock frees itself after ``ttl`` (a crashed holder)."""
        ...

    async def release_lock(self, name: str, token: str) -> bool:
        """Release the lock only if ``token`` still holds it (compare-and-delete). True if released."""
        ...

    async def put_value(self, name: str, value: str, ttl: float) -> None:
        """Store ``value`` under ``name`` for every node, for ``ttl`` seconds (replacing any)."""
        ...

    async def get_value(self, name: str) -> str | None:
        """The unexpired value stored under ``name``, else None."""
        ...


def new_token() -> str:
    """An unguessable lock token: a holder whose lock expired cannot release its successor's."""
    return secrets.token_hex(16)


class MemorySharedState:
    """SharedState for one process. Never raises, never awaits inside a mutation (so each call is
    atomic on the event loop). Expiry uses ``clock`` (monotonic by default), purged lazily."""

    kind = "memory"

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._drained: set[InstanceId] = set()
        self._reports: dict[InstanceId, dict[str, tuple[HeartbeatInfo, float]]] = {}
        self._locks: dict[str, tuple[str, float]] = {}
        self._values: dict[str, tuple[str, float]] = {}

    async def drain(self, instance: InstanceId) -> None:
        self._drained.add(instance)

    async def undrain(self, instance: InstanceId) -> None:
        self._drained.discard(instance)

    async def drained(self) -> set[InstanceId]:
        return set(self._drained)

    async def publish_heartbeat(self, node: str, instances: Mapping[InstanceId, HeartbeatInfo], ttl: float) -> None:
        expires_at = self._clock() + ttl
        for instance, info in instances.items():
            self._reports.setdefault(instance, {})[node] = (info, expires_at)

    async def heartbeats(self) -> dict[InstanceId, list[HeartbeatInfo]]:
        now = self._clock()
        result: dict[InstanceId, list[HeartbeatInfo]] = {}
        for instance in list(self._reports):
            by_node = self._reports[instance]
            for node in [n for n, (_, exp) in by_node.items() if exp <= now]:
                del by_node[node]
            if not by_node:
                del self._reports[instance]
                continue
            result[instance] = [info for _, (info, _) in sorted(by_node.items())]
        return result

    async def acquire_lock(self, name: str, ttl: float) -> str | None:
        now = self._clock()
        held = self._locks.get(name)
        if held is not None and held[1] > now:
            return None
        token = new_token()
        self._locks[name] = (token, now + ttl)
        return token

    async def release_lock(self, name: str, token: str) -> bool:
        held = self._locks.get(name)
        if held is None or held[0] != token or held[1] <= self._clock():
            return False
        del self._locks[name]
        return True

    async def put_value(self, name: str, value: str, ttl: float) -> None:
        self._values[name] = (value, self._clock() + ttl)

    async def get_value(self, name: str) -> str | None:
        held = self._values.get(name)
        if held is None:
            return None
        if held[1] <= self._clock():
            del self._values[name]
            return None
        return held[0]
