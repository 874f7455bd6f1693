"""Active and passive health checks feeding ``Membership.set_health``.

Active: every ``health.interval`` each local instance gets ``GET {url}{health.path}`` with
``health.timeout``; ``unhealthy_after`` consecutive failures mark it down, ``healthy_after``
consecutive 2xx mark it up again (HAProxy's rise/fall). Passive: a connect error on a real request
marks the instance down at once (a refused connection is decisive); only active probes bring it back.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, replace

import aiohttp

from affinity_proxy.membership.registry import Membership
from affinity_proxy.routing.model import Instance, InstanceId

log = logging.getLogger("affinity_proxy.health")


@dataclass(frozen=True, slots=True)
class HealthSettings:
    path: str = "/healthz"
    interval: float = 5.0
    timeout: float = 2.0
    unhealthy_after: int = 2
    healthy_after: int = 2


class HealthChecker:
    """Probes local instances; ``run()`` is the background loop, ``probe_all()`` one round."""

    def __init__(self, membership: Membership, session: aiohttp.ClientSession, settings: HealthSettings) -> None:
        self._membership = membership
        self._session = session
        self.settings = settings
        self._ok_streak: dict[InstanceId, int] = {}
        self._fail_streak: dict[InstanceId, int] = {}
        self.probes = 0

    def reconfigure(self, **settings: float | int | str) -> None:
        """New probe settings (hot reload); the next round uses them."""
        self.settings = replace(self.settings, **settings)  # type: ignore[arg-type]

    async def run(self) -> None:
        while True:
            await self.probe_all()
            await asyncio.sleep(self.settings.interval)

    async def probe_all(self) -> None:
        view = self._membership.current()
        targets = [i for i in view.instances if i.local and i.url]
        if targets:
            await asyncio.gather(*(self._probe(i) for i in targets))

    def report_failure(self, instance_id: InstanceId, kind: str) -> None:
        """Passive check: a request could not connect. Marks down now; probes decide recovery."""
        self._ok_streak[instance_id] = 0
        self._fail_streak[instance_id] = max(self._fail_streak.get(instance_id, 0), self.settings.unhealthy_after)
        log.warning("passive health failure", extra={"fields": {"instance": instance_id, "kind": kind}})
        self._membership.set_health(instance_id, False)

    async def _probe(self, inst: Instance) -> None:
        ok = await self._check(inst)
        self.probes += 1
        if ok:
            self._fail_streak[inst.id] = 0
            streak = self._ok_streak[inst.id] = self._ok_streak.get(inst.id, 0) + 1
            if streak >= self.settings.healthy_after:
                self._membership.set_health(inst.id, True)
        else:
            self._ok_streak[inst.id] = 0
            streak = self._fail_streak[inst.id] = self._fail_streak.get(inst.id, 0) + 1
            if streak >= self.settings.unhealthy_after:
                self._membership.set_health(inst.id, False)

    async def _check(self, inst: Instance) -> bool:
        url = inst.url.rstrip("/") + self.settings.path
        try:
            async with self._session.get(
                url, timeout=aiohttp.ClientTimeout(total=self.settings.timeout), allow_redirects=False
            ) as resp:
                await resp.read()
                return 200 <= resp.status < 300
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            log.debug("probe failed", extra={"fields": {"instance": inst.id, "error": repr(exc)}})
            return False
