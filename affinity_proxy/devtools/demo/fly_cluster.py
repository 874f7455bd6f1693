"""``affinity-proxy demo --fly``: three Machines (an affinity-proxy node in fly mode plus a demo app
each) behind the local stand-in for Fly's edge, all in one process.

The nodes share one in-process memory pin store (standing in for the Redis a real deployment uses)
and discover each other statically. As on Fly, the edge reaches each node over IPv4
(``127.0.0.1:<port>``) while the nodes reach each other over the stand-in private network
(``fly.network.FlyNetwork``): ``http://<id>.vm.<app>.internal:<port>``, a name that resolves to
``::1`` only, and only while that Machine is started. So each node listens on both families
(``listen: "[::]:<port>"``: the wildcard, as the shipped fly configs do; ``ipv4_only`` makes chosen
nodes listen on ``127.0.0.1`` only, which the private network cannot reach, as on Fly). A stopped
Machine (``stop_machine``: its node and app are shut down) is started again by the edge when a
request is routed to it, or by the stand-in Machines API start call a node makes before a private
forward; either way ``boot`` starts a fresh node and app on the same ports.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Collection
from dataclasses import dataclass, field

from aiohttp import web

from affinity_proxy.config import (
    Config,
    CookieConfig,
    FlyConfig,
    HealthConfig,
    InstanceConfig,
    UserKeySourceConfig,
)
from affinity_proxy.devtools.demo.backend import start_backend
from affinity_proxy.devtools.fly import FlyEdge
from affinity_proxy.devtools.fly.network import FlyNetwork
from affinity_proxy.devtools.ports import free_port
from affinity_proxy.membership.shared import MemorySharedState
from affinity_proxy.pins.memory import MemoryPinStore
from affinity_proxy.serve.app import ProxyServer

MACHINE_IDS = ("148e9e3c0e4d78", "2875d0e1a45e18", "3d8d9b7f1a2c08", "4e6f1c2b3a5d98", "5a7b8c9d0e1f28")


@dataclass
class FlyCluster:
    edge: FlyEdge
    network: FlyNetwork
    store: MemoryPinStore
    shared: MemorySharedState
    nodes: dict[str, ProxyServer] = field(default_factory=dict)
    apps: dict[str, web.AppRunner] = field(default_factory=dict)
    configs: dict[str, Config] = field(default_factory=dict)
    app_ports: dict[str, int] = field(default_factory=dict)
    boots: int = 0

    async def boot(self, machine_id: str) -> None:
        """Start a stopped Machine's app and node again, on the same ports (``FlyNetwork.on_start``)."""
        runner, _ = await start_backend(machine_id, port=self.app_ports[machine_id])
        self.apps[machine_id] = runner
        node = ProxyServer(self.configs[machine_id], store=self.store, shared=self.shared)
        await node.start()
        self.nodes[machine_id] = node
        self.edge.set_machine_state(machine_id, "started")
        self.boots += 1

    async def _halt(self, machine_id: str) -> None:
        node = self.nodes.pop(machine_id, None)
        if node is not None:
            await node.stop()
        runner = self.apps.pop(machine_id, None)
        if runner is not None:
            await runner.cleanup()

    async def stop_machine(self, machine_id: str) -> None:
        """Stop a Machine as Fly does: off the edge's rotation, its 6PN name gone, processes stopped."""
        self.edge.set_machine_state(machine_id, "stopped")
        await self.network.stop_machine(machine_id)

    async def stop(self) -> None:
        await self.edge.stop()
        for m in list(self.nodes):
            await self._halt(m)
        await self.network.stop()


async def start_fly_cluster(edge_port: int = 0, machines: int = 3, app: str = "demo",
                            ipv4_only: Collection[str] = (), engine: str = "fast") -> FlyCluster:
    """Start the private network, ``machines`` apps and nodes, then the edge on ``edge_port`` (0 = any
    free port). Nodes in ``ipv4_only`` listen on 127.0.0.1 only (unreachable over 6PN); every node
    runs on ``engine`` (the tests run the cluster on each)."""
    ids = MACHINE_IDS[:machines]
    secret = secrets.token_urlsafe(32)
    network = FlyNetwork(app, token=secrets.token_urlsafe(16))
    for m in ids:
        network.add_machine(m)
    await network.start()
    node_ports = {m: free_port() for m in ids}  # outside the ephemeral range: see ports
    cluster = FlyCluster(
        edge=FlyEdge({m: f"http://127.0.0.1:{node_ports[m]}" for m in ids}, app=app, on_wake=network.start_machine),
        network=network, store=MemoryPinStore(pin_ttl=24 * 3600), shared=MemorySharedState(),
    )
    network.on_start, network.on_stop = cluster.boot, cluster._halt
    try:
        for m in ids:
            runner, app_port = await start_backend(m)
            cluster.apps[m], cluster.app_ports[m] = runner, app_port
            host = "127.0.0.1" if m in ipv4_only else "[::]"
            cluster.configs[m] = Config(
                engine=engine,
                mode="fly",
                listen=f"{host}:{node_ports[m]}",
                admin_listen="127.0.0.1:0",
                instances=tuple(InstanceConfig(i, f"http://{network.machine_name(i)}:{port}")
                                for i, port in node_ports.items()),
                cookie=CookieConfig(secret=secret),
                user_key=(UserKeySourceConfig("header", "X-User-Id"), UserKeySourceConfig("query", "userId")),
                fly=FlyConfig(app=app, machine_id=m, region="lcl", upstream=f"http://127.0.0.1:{app_port}",
                              dns_server=network.dns_server, api_url=network.api_url, api_token=network.token),
                health=HealthConfig(interval=1.0, timeout=1.0),
            )
            node = ProxyServer(cluster.configs[m], store=cluster.store, shared=cluster.shared)
            await node.start()
            cluster.nodes[m] = node
        await cluster.edge.start(port=edge_port)
    except BaseException:
        await asyncio.shield(cluster.stop())
        raise
    return cluster


def banner(cluster: FlyCluster) -> str:
    base = cluster.edge.url
    nodes = "\n".join(
        f"  {m}: node http://127.0.0.1:{n.main_port} (6PN http://{cluster.network.machine_name(m)}:{n.main_port})"
        f"  admin http://127.0.0.1:{n.admin_port}"
        for m, n in cluster.nodes.items()
    )
    first_admin = next(iter(cluster.nodes.values())).admin_port
    return f"""
affinity-proxy demo --fly: {len(cluster.nodes)} Machines behind a local Fly edge at {base}
{nodes}
Dashboard (first node): http://127.0.0.1:{first_admin}/dashboard

Try:
  curl -s -H 'X-User-Id: alice' {base}/      # any Machine answers first; fly-replay sends alice to hers
  for i in 1 2 3 4; do curl -s -H 'X-User-Id: alice' {base}/ | head -c 40; echo; done   # always the same
  curl -s {base}/_edge/stats                   # replays the edge performed
  curl -s http://127.0.0.1:{first_admin}/metrics | grep -E '^affinity_(replays|requests)_total'
Press Ctrl-C to stop.
"""
