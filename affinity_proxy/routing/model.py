"""Value types of the routing core: instance ids, instances, states and the membership snapshot.

Pure: imports only the stdlib and ``routing.ring``. A ``MembershipView`` is immutable and built once
per membership change, together with its hash ring, so readers on the hot path never lock and
never rebuild anything.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import NewType

from affinity_proxy.routing.ring import HashRing

InstanceId = NewType("InstanceId", str)

INSTANCE_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def is_valid_instance_id(value: str) -> bool:
    """True when ``value`` has the shape docs/glossary.md gives for an instance id."""
    return bool(INSTANCE_ID_PATTERN.fullmatch(value))


class InstanceState(StrEnum):
    """Lifecycle of an instance; values double as the ``state`` metric label."""

    UP = "up"
    DRAINING = "draining"  # keeps its pinned users, gets no new ones
    DOWN = "down"  # failing health checks
    GONE = "gone"  # removed from membership / destroyed
    STOPPED = "stopped"  # fly mode: autostopped or suspended; a replay wakes it

    @property
    def routable(self) -> bool:
        """Pinned users may still be sent here (cookie or stored pin)."""
        return self in _ROUTABLE

    @property
    def accepts_new(self) -> bool:
        """New users (hash choices) may be sent here."""
        return self is InstanceState.UP


_ROUTABLE = frozenset({InstanceState.UP, InstanceState.DRAINING, InstanceState.STOPPED})


@dataclass(frozen=True, slots=True)
class Instance:
    """One app backend. ``url`` is where this node forwards to (empty for a remote fly instance)."""

    id: InstanceId
    url: str = ""
    weight: int = 1
    state: InstanceState = InstanceState.UP
    region: str = ""
    local: bool = True  # proxy mode: every instance is local; fly mode: only this node's machine


@dataclass(frozen=True, slots=True)
class MembershipView:
    """Immutable snapshot of all known instances plus the ring over the ``up`` ones.

    Build with ``MembershipView.build(instances)``; swap whole on change. ``get`` and ``ring.choose``
    are O(1)/O(log n) dict and bisect look-ups with no I/O and no locking.
    """

    instances: tuple[Instance, ...] = ()
    epoch: int = 0
    by_id: Mapping[InstanceId, Instance] = field(default_factory=dict)
    ring: HashRing = field(default_factory=lambda: HashRing({}))
    fallback_ring: HashRing = field(default_factory=lambda: HashRing({}))

    @classmethod
    def build(cls, instances: Iterable[Instance], epoch: int = 0) -> MembershipView:
        items = tuple(instances)
        by_id = {inst.id: inst for inst in items}
        ring = HashRing({inst.id: inst.weight for inst in items if inst.state.accepts_new})
        # When no instance is up, new users may still go to draining/stopped ones rather than get a 503.
        fallback = HashRing({} if len(ring) else {i.id: i.weight for i in items if i.state.routable})
        return cls(instances=items, epoch=epoch, by_id=by_id, ring=ring, fallback_ring=fallback)

    def choose_new(self, key: str, exclude: frozenset[str] | set[str] = frozenset()) -> InstanceId | None:
        """Instance for a new pin: the ring over ``up`` instances, else over any routable one."""
        found = self.ring.choose(key, exclude) or self.fallback_ring.choose(key, exclude)
        return InstanceId(found) if found is not None else None

    def get(self, instance_id: str) -> Instance | None:
        """The instance with that id, or None when unknown. No I/O."""
        return self.by_id.get(InstanceId(instance_id))

    def state_of(self, instance_id: str) -> InstanceState:
        """State of the instance; unknown ids are ``gone``."""
        inst = self.by_id.get(InstanceId(instance_id))
        return inst.state if inst is not None else InstanceState.GONE

    def is_routable(self, instance_id: str) -> bool:
        return self.state_of(instance_id).routable

    @property
    def routable_ids(self) -> tuple[InstanceId, ...]:
        return tuple(i.id for i in self.instances if i.state.routable)

    def with_states(self, states: Mapping[InstanceId, InstanceState], epoch: int) -> MembershipView:
        """A new view with some states replaced (ring rebuilt only if the up-set changed)."""
        changed = tuple(
            Instance(i.id, i.url, i.weight, states.get(i.id, i.state), i.region, i.local)
            for i in self.instances
        )
        return MembershipView.build(changed, epoch)
