"""``affinity-proxy demo --fly``: three Machines (an affinity-proxy node in fly mode plus a demo app
each) behind the local stand-in for Fly's edge, all in one process.

The nodes share one in-process memory pin store (standing in for the Redis a real deployment uses)
and discover each other statically. Everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import secrets
import socket
from dataclasses import dataclass, field

from aiohttp import web

from affinity_proxy.app import ProxyServer
from affinity_proxy.config import (
    Config,
    CookieConfig,
    FlyConfig,
    HealthConfig,
    InstanceConfig,
    UserKeySourceConfig,
)
from affinity_proxy.demo.backend import start_backend
from affinity_proxy.fly import FlyEdge
from affinity_proxy.membership.shared import MemorySharedState
from affinity_proxy.pins.memory import MemoryPinStore

MACHINE_IDS = ("148e9e3c0e4d78", "2875d0e1a45e18", "3d8d9b7f1a2c08", "4e6f1c2b3a5d98", "5a7b8c9d0e1f28")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class FlyCluster:
    edge: FlyEdge
    nodes: dict[str, ProxyServer] = field(default_factory=dict)
    apps: dict[str, web.AppRunner] = field(default_factory=dict)

    async def stop(self) -> None:
        await self.edge.stop()
        for node in self.nodes.values():
            await node.stop()
        for runner in self.apps.values():
            await runner.cleanup()


async def start_fly_cluster(edge_port: int = 0, machines: int = 3, app: str = "demo") -> FlyCluster:
    """Start ``machines`` apps and nodes, then the edge on ``edge_port`` (0 = any free port)."""
    ids = MACHINE_IDS[:machines]
    store = MemoryPinStore(pin_ttl=24 * 3600)
    shared = MemorySharedState()
    secret = secrets.token_urlsafe(32)
    node_ports = {m: _free_port() for m in ids}
    cluster = FlyCluster(edge=FlyEdge({m: f"http://127.0.0.1:{node_ports[m]}" for m in ids}, app=app))
    for m in ids:
        runner, app_port = await start_backend(m)
        cluster.apps[m] = runner
        config = Config(
            mode="fly",
            listen=f"127.0.0.1:{node_ports[m]}",
            admin_listen="127.0.0.1:0",
            instances=tuple(InstanceConfig(i, f"http://127.0.0.1:{p}") for i, p in node_ports.items()),
            cookie=CookieConfig(secret=secret),
            user_key=(UserKeySourceConfig("header", "X-User-Id"), UserKeySourceConfig("query", "userId")),
            fly=FlyConfig(app=app, machine_id=m, region="lcl", upstream=f"http://127.0.0.1:{app_port}"),
            health=HealthConfig(interval=1.0, timeout=1.0),
        )
        node = ProxyServer(config, store=store, shared=shared)
        await node.start()
        cluster.nodes[m] = node
    await cluster.edge.start(port=edge_port)
    return cluster


def banner(cluster: FlyCluster) -> str:
    base = cluster.edge.url
    nodes = "\n".join(
        f"  {m}: node http://127.0.0.1:{n.main_port}  admin http://127.0.0.1:{n.admin_port}"
        for m, n in cluster.nodes.items()
    )
    first_admin = next(iter(cluster.nodes.values())).admin_port
    return f"""
affinity-proxy demo --fly: {len(cluster.nodes)} Machines behind a local Fly edge at {base}
{nodes}

Try:
  curl -s -H 'X-User-Id: alice' {base}/      # any Machine answers first; fly-replay sends alice to hers
  for i in 1 2 3 4; do curl -s -H 'X-User-Id: alice' {base}/ | head -c 40; echo; done   # always the same
  curl -s {base}/_edge/stats                   # replays the edge performed
  curl -s http://127.0.0.1:{first_admin}/metrics | grep -E '^affinity_(replays|requests)_total'
Press Ctrl-C to stop.
"""
