"""Membership refresh: shared drain marks in, this node's health verdicts (heartbeats) out.

Why: a drain issued on one node must be honoured by every node, and a node must be able to learn
what its peers think of instances it cannot probe itself. Every ``refresh_interval(health.interval)``
(= ``min(health.interval, 1 s)``: a drain takes effect everywhere within about a second even with
slow health checks) ``MembershipRefresher`` reads the shared drain set into ``Membership`` and
publishes the verdict on each local instance with ttl = ``HEARTBEAT_TTL_FACTOR`` x the refresh
interval, so one or two missed refreshes do not expire it.

How the reports are used: in proxy mode only for display (``GET /instances`` shows each node's
report): a node never changes an instance's state because of a peer's report, since it probes every
instance itself. ``fly.discovery: redis`` (fly mode) builds membership from them with
``instances_from_heartbeats``. When the shared state is unreachable the last known drain set stays
in force; one log line per failure streak and one on recovery. Imports ``routing.model``,
``pins.store`` and ``membership.*``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import cast

from affinity_proxy.membership.registry import Membership
from affinity_proxy.membership.shared import HeartbeatInfo, HeartbeatState, SharedState
from affinity_proxy.pins.store import PinStoreUnavailable
from affinity_proxy.routing.model import Instance, InstanceId, InstanceState, MembershipView

log = logging.getLogger("affinity_proxy.membership.heartbeat")

MAX_REFRESH_INTERVAL = 1.0
HEARTBEAT_TTL_FACTOR = 3
DEFAULT_STALE_AFTER = 2 * MAX_REFRESH_INTERVAL  # a report older than this missed at least one refresh

_PUBLISHED = {
    InstanceState.UP: "up", InstanceState.DRAINING: "draining",
    InstanceState.DOWN: "down", InstanceState.STOPPED: "stopped",
}  # fmt: skip
# When fresh reports disagree, the most favourable verdict wins: one node that reaches an instance
# proves it is alive (the others may have a network problem of their own).
_PREFERENCE: tuple[tuple[str, InstanceState], ...] = (
    ("up", InstanceState.UP), ("draining", InstanceState.DRAINING),
    ("stopped", InstanceState.STOPPED), ("down", InstanceState.DOWN),
)  # fmt: skip

Reports = Mapping[InstanceId, list[HeartbeatInfo]]


def refresh_interval(health_interval: float) -> float:
    """Seconds between membership refreshes: the health interval, at most ``MAX_REFRESH_INTERVAL``."""
    return min(health_interval, MAX_REFRESH_INTERVAL)


def local_reports(view: MembershipView, node: str, now: float, group: str = "") -> dict[InstanceId, HeartbeatInfo]:
    """This node's verdict on every instance it probes (local, with a URL), tagged with ``group``
    (the Fly process group of this node's Machine, "" when unknown). Pure."""
    return {
        i.id: HeartbeatInfo(cast(HeartbeatState, _PUBLISHED[i.state]), i.url, i.region, node, now, group)
        for i in view.instances
        if i.local and i.url and i.state in _PUBLISHED
    }


def instances_from_heartbeats(
    reports: Reports, now: float, *, stale_after: float = DEFAULT_STALE_AFTER, local_node: str | None = None,
    group: str | None = None,
) -> list[Instance]:
    """Membership built from heartbeats (``fly.discovery: redis``). Pure; ``now`` is unix seconds.

    Per instance: a fresh (``now - seen_at <= stale_after``) ``up`` report from any node -> ``up``;
    otherwise the best fresh verdict (draining, then stopped, then down); only stale reports ->
    ``down``; no report -> not listed (``gone``). URL and region come from the report that decided.
    ``local`` is True when ``local_node`` (this node) reported on it, i.e. probes it itself.
    With ``group`` (``fly.process_group``) only reports tagged with that group count: a Machine of
    another group, or of no known group, is not listed.
    """
    result: list[Instance] = []
    for instance in sorted(reports):
        items = reports[instance]
        if group is not None:
            items = [r for r in items if r.group == group]
        if not items:
            continue
        fresh = [r for r in items if now - r.seen_at <= stale_after]
        state, chosen = InstanceState.DOWN, max(items, key=lambda r: r.seen_at)
        for name, candidate in _PREFERENCE:
            matching = [r for r in fresh if r.state == name]
            if matching:
                state, chosen = candidate, max(matching, key=lambda r: r.seen_at)
                break
        local = local_node is not None and any(r.node == local_node for r in items)
        result.append(Instance(instance, chosen.url, 1, state, chosen.region, local))
    return result


class MembershipRefresher:
    """The refresh loop of one process. ``refresh_once()`` is one round (two round trips, three
    with ``on_reports``); ``run()`` repeats it every ``interval`` after a first sleep. Runs on the event loop only.

    ``on_reports(reports)``, when given, receives every node's reports after each publish (fly
    discovery uses it); without it peers' reports are not read here (admin reads them on demand).
    """

    def __init__(
        self,
        membership: Membership,
        shared: SharedState,
        *,
        node: str,
        interval: float,
        on_reports: Callable[[dict[InstanceId, list[HeartbeatInfo]]], None] | None = None,
        clock: Callable[[], float] = time.time,
        group: str = "",
    ) -> None:
        self._membership = membership
        self.group = group
        self._shared = shared
        self.node = node
        self.interval = interval
        self.ttl = HEARTBEAT_TTL_FACTOR * interval
        self._on_reports = on_reports
        self._clock = clock
        self.failing = False
        self.rounds = 0  # completed rounds, for tests and health

    async def run(self) -> None:
        """Sleep, refresh, repeat (the caller does the first ``refresh_once`` before serving)."""
        while True:
            await asyncio.sleep(self.interval)
            await self.refresh_once()

    async def refresh_once(self) -> None:
        """Sync drain marks, publish heartbeats, optionally read reports. Never raises
        ``PinStoreUnavailable``: an outage keeps the last known drain set and is logged once."""
        try:
            epoch = self._membership.drain_epoch
            drained = await self._shared.drained()
            self._membership.set_drained(drained, epoch=epoch)
            reports = local_reports(self._membership.current(), self.node, self._clock(), self.group)
            await self._shared.publish_heartbeat(self.node, reports, self.ttl)
            if self._on_reports is not None:
                self._on_reports(await self._shared.heartbeats())
        except PinStoreUnavailable as exc:
            if not self.failing:
                log.warning(
                    "shared membership state unreachable, keeping the last known drain set %s: %s",
                    sorted(self._membership.draining), exc,
                )
            self.failing = True
            return
        if self.failing:
            log.info("shared membership state reachable again")
        self.failing = False
        self.rounds += 1


class HeartbeatSource:
    """``fly.discovery: redis``: the Machines are whatever nodes report in the shared store.

    Remote URLs are replaced by ``private_url(id)`` (a report carries the publishing node's own,
    loopback, upstream URL, which is useless to others). With ``group`` (``fly.process_group``) only
    Machines whose node published that group are listed. Store errors become ``DiscoveryError`` so
    the discovery loop keeps the last good membership.
    """

    def __init__(self, shared: SharedState, private_url: Callable[[str], str],
                 clock: Callable[[], float] = time.time, group: str | None = None) -> None:
        self._shared = shared
        self._private_url = private_url
        self._clock = clock
        self.group = group

    async def fetch(self) -> list[Instance]:
        from affinity_proxy.membership.sources import DiscoveryError

        try:
            reports = await self._shared.heartbeats()
        except PinStoreUnavailable as exc:
            raise DiscoveryError(f"shared store unavailable: {exc}") from exc
        found = instances_from_heartbeats(reports, self._clock(), group=self.group)
        return [replace(i, url=self._private_url(i.id), local=False) for i in found]
