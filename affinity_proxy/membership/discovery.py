"""Fly-mode membership: the instance list of a node that runs on one Machine, and the loop that
keeps it fresh from a discovery source (Fly DNS, the Machines API, or Redis heartbeats).

The local Machine is always a member (its URL is ``fly.upstream``, where the app listens); every
other Machine is remote (``local=False``; its URL is the private-network address used only for
bodies Fly cannot replay). A failing source keeps the last good list: discovery outages must not
re-pin anyone. Imports ``routing.model``, ``membership.registry`` and ``membership.sources``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable

from affinity_proxy.config import Config
from affinity_proxy.membership.registry import Membership
from affinity_proxy.membership.sources import DiscoveryError, MembershipSource
from affinity_proxy.routing.model import Instance, InstanceId, InstanceState

log = logging.getLogger("affinity_proxy.discovery")


def local_instance(config: Config) -> Instance:
    fly = config.fly
    assert fly.machine_id is not None, "fly mode requires fly.machine_id"
    return Instance(InstanceId(fly.machine_id), fly.upstream.rstrip("/"), 1, InstanceState.UP, fly.region or "", True)


def private_url(config: Config, instance_id: str) -> str:
    fly = config.fly
    return fly.private_url.format(id=instance_id, app=fly.app or "", port=fly.private_port, region="").rstrip("/")


def instances_from_config(config: Config) -> list[Instance]:
    """The starting membership: every configured instance (proxy mode), or in fly mode this node's
    Machine (local, forwarding to ``fly.upstream``) plus the configured ones as remote Machines."""
    if config.mode == "fly":
        return fly_static_instances(config)
    return [Instance(InstanceId(i.id), i.url.rstrip("/"), i.weight) for i in config.instances]


def fly_static_instances(config: Config) -> list[Instance]:
    """``fly.discovery: static``: the configured instances are the Machines; the local one forwards
    to ``fly.upstream``, the others are reached by replay (their ``url`` is for private forwards)."""
    local = local_instance(config)
    members = [local]
    for item in config.instances:
        if item.id == local.id:
            members[0] = Instance(local.id, local.url, item.weight, InstanceState.UP, local.region, True)
            continue
        members.append(Instance(InstanceId(item.id), item.url.rstrip("/"), item.weight, InstanceState.UP, "", False))
    return members


def with_local(instances: Iterable[Instance], local: Instance) -> list[Instance]:
    """The discovered list with this node's Machine forced local (and present even when DNS has not
    caught up yet: this node is running, so its Machine is started)."""
    out: list[Instance] = []
    seen = False
    for inst in instances:
        if inst.id == local.id:
            out.append(Instance(local.id, local.url, inst.weight, InstanceState.UP, inst.region or local.region, True))
            seen = True
        else:
            out.append(Instance(inst.id, inst.url, inst.weight, inst.state, inst.region, False))
    if not seen:
        out.append(local)
    return out


async def run_discovery(
    source: MembershipSource,
    membership: Membership,
    *,
    local: Instance,
    interval: float,
    on_error: Callable[[], None] = lambda: None,
) -> None:
    """Refresh membership every ``interval`` seconds; one log line per failure streak."""
    failing = False
    while True:
        try:
            found = await source.fetch()
        except DiscoveryError as exc:
            on_error()
            if not failing:
                log.warning("discovery failed; keeping the last membership: %s", exc)
            failing = True
        else:
            if failing:
                log.info("discovery recovered")
            failing = False
            membership.set_instances(with_local(found, local))
        await asyncio.sleep(interval)
