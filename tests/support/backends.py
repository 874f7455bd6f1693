"""Real demo backends on 127.0.0.1 and the proxy config the suites build over them.

Plain helpers (the fixtures using them are in ``tests/conftest.py``): ``Backends`` starts and stops
demo backends on the same port, ``make_config`` builds a proxy config over them with test-sized
timeouts. Tests that run on both engines pass ``engine=engine`` (see ``tests/support/engine.py``).
"""

from __future__ import annotations

from dataclasses import replace

from aiohttp import web

from affinity_proxy.config import Config, CookieConfig, HealthConfig, InstanceConfig, LimitsConfig, UserKeySourceConfig
from affinity_proxy.devtools.demo.backend import start_backend


class Backends:
    """A set of running demo backends that tests can stop and start again on the same port."""

    def __init__(self) -> None:
        self.runners: dict[str, web.AppRunner] = {}
        self.ports: dict[str, int] = {}

    async def start(self, instance_id: str, port: int = 0) -> int:
        runner, bound = await start_backend(instance_id, port=port)
        self.runners[instance_id] = runner
        self.ports[instance_id] = bound
        return bound

    async def stop(self, instance_id: str) -> None:
        runner = self.runners.pop(instance_id)
        await runner.cleanup()

    async def kill(self, instance_id: str) -> None:
        """Stop ``instance_id`` the way a crashed process stops: the port closes and every open
        connection (keep-alive, WebSocket) is cut at once.

        Why not ``stop``: aiohttp's graceful cleanup stops reading every connection, then waits
        ``shutdown_timeout`` for handlers and again after cancelling them, so a WebSocket open on
        the instance swallows messages for ~4 s before it closes; a killed process never does that.
        """
        runner = self.runners.pop(instance_id)
        for site in list(runner.sites):
            await site.stop()
        if runner.server is not None:
            for handler in runner.server.connections:
                if handler.transport is not None:
                    handler.transport.abort()
        await runner.cleanup()

    async def close(self) -> None:
        for runner in list(self.runners.values()):
            await runner.cleanup()
        self.runners.clear()

    def instance_configs(self, ids: list[str] | None = None) -> tuple[InstanceConfig, ...]:
        ids = ids or list(self.ports)
        return tuple(InstanceConfig(i, f"http://127.0.0.1:{self.ports[i]}") for i in ids)


def make_config(backends: Backends, **overrides: object) -> Config:
    """A proxy over ``backends`` with a test cookie secret, the X-User-Id header and ?userId= as
    user keys and short health/upstream timeouts; ``overrides`` replace any field (``engine`` too)."""
    base = Config(
        listen="127.0.0.1:0",
        admin_listen="127.0.0.1:0",
        instances=backends.instance_configs(),
        cookie=CookieConfig(secret="test-secret-" + "x" * 20),
        user_key=(UserKeySourceConfig("header", "X-User-Id"), UserKeySourceConfig("query", "userId")),
        # timeout 1 s: a loaded CI machine must not fail a probe of a healthy demo backend (a 0.3 s
        # timeout once marked every instance down under a parallel test run)
        health=HealthConfig(interval=0.3, timeout=1.0, unhealthy_after=1, healthy_after=1),
        # connect timeout 5 s (the product's default): the backends run in the test's loop, which a loaded
        # machine can stall past 1 s; a connect failure counts against the instance's health (passive),
        # so 1 s marked healthy instances down and re-pinned their users (seen in a parallel run)
        limits=LimitsConfig(upstream_timeout=5.0, upstream_connect_timeout=5.0),
    )
    return replace(base, **overrides)  # type: ignore[arg-type]
