"""Membership: merges the configured instances, drain marks and health into one ``MembershipView``.

The view is rebuilt (ring included) only when something changes and swapped whole, so ``current()``
is an attribute read: no lock, no I/O, safe on the hot path. Mutators run on the event loop thread.
Imports only ``routing.model``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from affinity_proxy.routing.model import Instance, InstanceId, InstanceState, MembershipView

log = logging.getLogger("affinity_proxy.membership")

Listener = Callable[[MembershipView, MembershipView], None]


class Membership:
    """Owner of the current snapshot. States: configured base state, overlaid by drain, then health."""

    def __init__(self, instances: Iterable[Instance] = ()) -> None:
        self._base: dict[InstanceId, Instance] = {i.id: i for i in instances}
        self._draining: set[InstanceId] = set()
        self._drain_epoch = 0  # bumped by every local drain()/undrain(); see set_drained(epoch=)
        self._unhealthy: set[InstanceId] = set()
        self._listeners: list[Listener] = []
        self._epoch = 0
        self._view = self._build()

    def current(self) -> MembershipView:
        """The latest snapshot. O(1), no I/O."""
        return self._view

    def subscribe(self, listener: Listener) -> None:
        """Call ``listener(old, new)`` after every swap (on the event loop; must not block)."""
        self._listeners.append(listener)

    def set_instances(self, instances: Iterable[Instance]) -> None:
        """Replace the instance list (reload, discovery). Drain and health marks of kept ids survive."""
        self._base = {i.id: i for i in instances}
        self._draining &= set(self._base)
        self._unhealthy &= set(self._base)
        self._swap()

    def drain(self, instance_id: InstanceId) -> bool:
        """Mark draining (keeps pinned users, no new ones). False when the id is unknown."""
        if instance_id not in self._base:
            return False
        self._drain_epoch += 1
        if instance_id not in self._draining:
            self._draining.add(instance_id)
            log.info("instance draining", extra={"fields": {"instance": instance_id}})
            self._swap()
        return True

    def undrain(self, instance_id: InstanceId) -> bool:
        if instance_id not in self._base:
            return False
        self._drain_epoch += 1
        if instance_id in self._draining:
            self._draining.discard(instance_id)
            log.info("instance undrained", extra={"fields": {"instance": instance_id}})
            self._swap()
        return True

    @property
    def drain_epoch(self) -> int:
        """Counter of local ``drain``/``undrain`` calls. A reader of the shared drain set notes it
        before its store round trip and passes it to ``set_drained`` (see there)."""
        return self._drain_epoch

    def set_drained(self, ids: Iterable[InstanceId], *, epoch: int | None = None) -> bool:
        """Replace the whole drain set (shared drain marks read from the store); unknown ids are
        ignored. With ``epoch``: applied only if no local ``drain``/``undrain`` happened since
        ``drain_epoch`` was ``epoch``, so a read that started before an admin drain cannot undo it.
        Returns False when skipped for that reason. No I/O."""
        if epoch is not None and epoch != self._drain_epoch:
            return False
        new = set(ids) & set(self._base)
        if new != self._draining:
            for added in sorted(new - self._draining):
                log.info("instance draining (shared mark)", extra={"fields": {"instance": added}})
            for removed in sorted(self._draining - new):
                log.info("instance undrained (shared mark)", extra={"fields": {"instance": removed}})
            self._draining = new
            self._swap()
        return True

    def set_health(self, instance_id: InstanceId, healthy: bool) -> None:
        """Health checker verdict; swaps only when the verdict changes."""
        if instance_id not in self._base:
            return
        if healthy and instance_id in self._unhealthy:
            self._unhealthy.discard(instance_id)
            log.warning("instance up", extra={"fields": {"instance": instance_id}})
            self._swap()
        elif not healthy and instance_id not in self._unhealthy:
            self._unhealthy.add(instance_id)
            log.warning("instance down", extra={"fields": {"instance": instance_id}})
            self._swap()

    @property
    def draining(self) -> frozenset[InstanceId]:
        return frozenset(self._draining)

    def _state(self, inst: Instance) -> InstanceState:
        if inst.id in self._unhealthy:
            return InstanceState.DOWN
        if inst.id in self._draining and inst.state is InstanceState.UP:
            return InstanceState.DRAINING
        return inst.state

    def _build(self) -> MembershipView:
        insts = (
            Instance(i.id, i.url, i.weight, self._state(i), i.region, i.local) for i in self._base.values()
        )
        return MembershipView.build(insts, self._epoch)

    def _swap(self) -> None:
        old = self._view
        self._epoch += 1
        self._view = self._build()
        for listener in self._listeners:
            try:
                listener(old, self._view)
            except Exception:
                log.exception("membership listener failed")
