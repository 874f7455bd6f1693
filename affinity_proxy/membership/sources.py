"""MembershipSource: where a node learns which instances exist (static config, Fly DNS, the Machines
API, Redis heartbeats). ``fetch`` raises ``DiscoveryError`` on failure; the caller keeps the last
good list, so a discovery outage never re-pins anyone.

Also holds ``MachineAddressing``, the one rule the Fly sources share for turning a discovered Machine
into an ``Instance`` (local or remote, which URL). Imports only ``routing.model``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from affinity_proxy.routing.model import Instance, InstanceId, InstanceState


class DiscoveryError(Exception):
    """The source could not answer (DNS timeout, API error). The message never carries secrets."""


@runtime_checkable
class MembershipSource(Protocol):
    """Contract: ``fetch`` returns every instance that exists now, each with its state; an instance
    left out is gone (the ``Membership`` turns pins to it into ``gone``). It may do network I/O and
    must bound its own time. On any failure it raises ``DiscoveryError`` (never returns a partial
    or empty list in its place). Called from one task on the event loop; not reentrant."""

    async def fetch(self) -> list[Instance]:
        """The instances that exist now. May do network I/O; raises ``DiscoveryError``."""
        ...


class StaticSource:
    """A fixed list (``fly.discovery: static`` and proxy mode). No I/O; never fails."""

    def __init__(self, instances: Iterable[Instance]) -> None:
        self._instances = list(instances)

    async def fetch(self) -> list[Instance]:
        return list(self._instances)


@dataclass(frozen=True, slots=True)
class MachineAddressing:
    """How a Fly source turns a Machine (id, region, state) into an ``Instance``.

    This node's Machine (``local_machine_id``) is ``local`` and forwards to ``local_upstream`` (the
    app beside the proxy). Every other Machine is remote: requests for it are replayed, and its
    ``url`` is ``private_url`` filled with ``{id}``, ``{app}``, ``{port}`` (``private_port``) and
    ``{region}``, used only for bodies Fly cannot replay. Pure; raises ``ValueError`` at
    construction when ``private_url`` uses other placeholders.
    """

    app: str
    local_machine_id: str
    local_upstream: str
    private_url: str
    private_port: int

    def __post_init__(self) -> None:
        try:
            self.private_url.format(id="m", app=self.app, port=self.private_port, region="r")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(
                f"private_url may only use {{id}}, {{app}}, {{port}} and {{region}}: {self.private_url!r}"
            ) from exc

    def instance(self, machine_id: str, region: str, state: InstanceState) -> Instance:
        if machine_id == self.local_machine_id:
            return Instance(InstanceId(machine_id), self.local_upstream.rstrip("/"), 1, state, region, True)
        url = self.private_url.format(id=machine_id, app=self.app, port=self.private_port, region=region)
        return Instance(InstanceId(machine_id), url.rstrip("/"), 1, state, region, False)
