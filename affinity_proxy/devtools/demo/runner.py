"""``affinity-proxy demo``: demo backends plus the proxy on the embedded memory store, in one process.

Needs no Redis and no config file; generates a throwaway cookie secret. Prints what to try, as
commands that run as printed (the CLI by the path it was started from when the venv is not on PATH)
and the dashboard's URL.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import shutil
import signal
import sys
from pathlib import Path

from aiohttp import web

from affinity_proxy.config import Config, CookieConfig, HealthConfig, InstanceConfig, UserKeySourceConfig
from affinity_proxy.observability.logs import configure_logging

DEMO_IDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india")


def demo_config(ports: list[int], port: int, admin_port: int) -> Config:
    instances = tuple(
        InstanceConfig(DEMO_IDS[i] if i < len(DEMO_IDS) else f"app{i}", f"http://127.0.0.1:{p}")
        for i, p in enumerate(ports)
    )
    return Config(
        listen=f"127.0.0.1:{port}",
        admin_listen=f"127.0.0.1:{admin_port}",
        instances=instances,
        cookie=CookieConfig(secret=secrets.token_urlsafe(32)),
        user_key=(UserKeySourceConfig("header", "X-User-Id"), UserKeySourceConfig("query", "userId")),
        health=HealthConfig(interval=1.0, timeout=1.0),
    )


def cli_command() -> str:
    """The shell command that runs this install's CLI: ``affinity-proxy`` when that name on PATH is
    this install's script, else the script's absolute path (``make demo`` runs it from ``.venv/bin``,
    which is not on PATH), else ``<this python> -m affinity_proxy``."""
    script = Path(sys.executable).with_name("affinity-proxy")
    on_path = shutil.which("affinity-proxy")
    if on_path is not None and script.exists() and Path(on_path).resolve() == script.resolve():
        return "affinity-proxy"
    if script.exists():
        return str(script.absolute())
    return f"{Path(sys.executable).absolute()} -m affinity_proxy"


def _banner(port: int, admin_port: int, ids: list[str]) -> str:
    base = f"http://127.0.0.1:{port}"
    return f"""
affinity-proxy demo: {len(ids)} instances ({", ".join(ids)}) behind {base} (memory store, no Redis)
The cookie secret was generated for this run and is not saved (shipped configs take it from
COOKIE_SECRET); the admin listener is on 127.0.0.1 only, so it runs without a token.
Dashboard: http://127.0.0.1:{admin_port}/dashboard

Try:
  curl -i {base}/                                  # anonymous: a new session, Set-Cookie fly-instance-id
  curl -s -c /tmp/jar -b /tmp/jar {base}/ ; curl -s -c /tmp/jar -b /tmp/jar {base}/   # same instance twice
  curl -s -H 'X-User-Id: alice' {base}/              # user key: consistent hash + stored pin
  curl -s '{base}/_affinity/session-check?userId=alice'   # why alice lands where she does (her own request)
  curl -s 'http://127.0.0.1:{admin_port}/session-check?userId=alice'   # the same, with pin expiry and counts
  curl -s http://127.0.0.1:{admin_port}/instances           # instances, states, pin counts
  curl -s -X POST http://127.0.0.1:{admin_port}/instances/{ids[0]}/drain   # drain: pinned users stay
  curl -s http://127.0.0.1:{admin_port}/metrics | grep ^affinity_
  {cli_command()} pins list --admin http://127.0.0.1:{admin_port}
Press Ctrl-C to stop.
"""


async def _run_fly(instances: int, port: int) -> None:
    from affinity_proxy.devtools.demo.fly_cluster import banner, start_fly_cluster

    cluster = await start_fly_cluster(edge_port=port, machines=instances)
    print(banner(cluster), flush=True)
    try:
        await _wait_for_signal()
    finally:
        await cluster.stop()


async def _wait_for_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def _run(instances: int, port: int, fly: bool) -> None:
    if fly:
        await _run_fly(instances, port)
        return
    from affinity_proxy.devtools.demo.backend import start_backend
    from affinity_proxy.serve.app import ProxyServer

    runners: list[web.AppRunner] = []
    ports: list[int] = []
    for i in range(instances):
        runner, bport = await start_backend(DEMO_IDS[i] if i < len(DEMO_IDS) else f"app{i}")
        runners.append(runner)
        ports.append(bport)
    admin_port = port + 1 if port else 0
    config = demo_config(ports, port, admin_port)
    server = ProxyServer(config)
    await server.start()
    print(_banner(server.main_port, server.admin_port, [i.id for i in config.instances]), flush=True)
    try:
        await _wait_for_signal()
    finally:
        await server.stop()
        for runner in runners:
            await runner.cleanup()


def run_demo(instances: int, port: int, fly: bool) -> int:
    """Entry point of ``affinity-proxy demo``."""
    if fly and not 1 <= instances <= 5:
        print("error: --instances must be between 1 and 5 with --fly", file=sys.stderr)
        return 2
    if not 1 <= instances <= 9:
        print("error: --instances must be between 1 and 9", file=sys.stderr)
        return 2
    configure_logging("INFO", "text")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_run(instances, port, fly))
    return 0
