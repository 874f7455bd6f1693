"""MembershipSource: where a node learns which instances exist (static config, Fly DNS, the Machines
API, Redis heartbeats). ``fetch`` raises ``DiscoveryError`` on failure; the caller keeps the last
good list, so a discovery outage never re-pins anyone.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol, runtime_checkable

from affinity_proxy.routing.model import Instance


class DiscoveryError(Exception):
    """The source could not answer (DNS timeout, API error). The message never carries secrets."""


@runtime_checkable
class MembershipSource(Protocol):
    async def fetch(self) -> list[Instance]:
        """The instances that exist now. May do network I/O; raises ``DiscoveryError``."""
        ...


class StaticSource:
    """A fixed list (``fly.discovery: static`` and proxy mode)."""

    def __init__(self, instances: Iterable[Instance]) -> None:
        self._instances = list(instances)

    async def fetch(self) -> list[Instance]:
        return list(self._instances)
