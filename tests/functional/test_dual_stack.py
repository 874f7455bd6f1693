"""Listeners and address families: ``":port"`` and ``"[::]:port"`` take IPv4 and IPv6 (one dual-stack
socket), ``"0.0.0.0:port"`` stays IPv4 only, loopback hosts are bound as given. Main and admin
listener, in process and with ``serve --workers 2`` (SO_REUSEPORT on the dual-stack socket).

On Fly.io the edge reaches a Machine over IPv4 while the private network is IPv6 only
(docs/fly-private-network.md), so a fly node must listen on both.
"""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import aiohttp
import pytest

from tests.functional.test_workers import Supervised, spawn_serve
from tests.support.backends import Backends, make_config
from tests.support.engine import engine_line
from tests.support.redis_server import free_port
from tests.support.waiting import wait_until

V4, V6 = "127.0.0.1", "[::1]"


async def status_of(http: aiohttp.ClientSession, url: str) -> int | str:
    """The status of a GET, or the name of the connection error (refused: nobody listens there)."""
    try:
        async with http.get(url, headers={"X-User-Id": "dual"}) as resp:
            await resp.read()
            return resp.status
    except aiohttp.ClientConnectorError as exc:
        return type(exc.os_error).__name__


@pytest.mark.parametrize("wildcard", [":0", "[::]:0"])
async def test_wildcard_listeners_take_ipv4_and_ipv6(engine: str, backends: Backends, start_proxy, http,  # type: ignore[no-untyped-def]
                                                     wildcard: str) -> None:
    proxy = await start_proxy(make_config(backends, engine=engine, listen=wildcard, admin_listen=wildcard))
    for host in (V4, V6):
        assert await status_of(http, f"http://{host}:{proxy.main_port}/") == 200, host
        assert await status_of(http, f"http://{host}:{proxy.admin_port}/health") == 200, host


async def test_ipv4_wildcard_stays_ipv4_only(engine: str, backends: Backends, start_proxy, http) -> None:  # type: ignore[no-untyped-def]
    proxy = await start_proxy(make_config(backends, engine=engine, listen="0.0.0.0:0", admin_listen="0.0.0.0:0"))
    for port in (proxy.main_port, proxy.admin_port):
        assert await status_of(http, f"http://{V4}:{port}/health") != "ConnectionRefusedError"
        assert await status_of(http, f"http://{V6}:{port}/health") == "ConnectionRefusedError"


async def test_loopback_hosts_are_bound_as_given(engine: str, backends: Backends, start_proxy, http) -> None:  # type: ignore[no-untyped-def]
    proxy = await start_proxy(make_config(backends, engine=engine, listen="[::1]:0", admin_listen="127.0.0.1:0"))
    assert await status_of(http, f"http://{V6}:{proxy.main_port}/") == 200
    assert await status_of(http, f"http://{V4}:{proxy.main_port}/") == "ConnectionRefusedError"
    assert await status_of(http, f"http://{V4}:{proxy.admin_port}/health") == 200
    assert await status_of(http, f"http://{V6}:{proxy.admin_port}/health") == "ConnectionRefusedError"


@pytest.mark.parametrize("port_given", [True, False], ids=["fixed-port", "port-0"])
async def test_workers_listen_on_both_families(  # type: ignore[no-untyped-def]
    engine: str, tmp_path: Path, backends: Backends, redis_url: str, port_given: bool,
) -> None:
    main, admin = (free_port(), free_port()) if port_given else (0, 0)
    config = tmp_path / "dual.yaml"
    config.write_text("\n".join([
        engine_line(engine),
        f'listen: ":{main}"',
        f'admin_listen: "[::]:{admin}"',
        "admin: {token: dual-stack-admin-token, public_metrics: true}",  # /health without the token
        "cookie: {secret: dual-stack-test-secret-xxxxxxxxxx}",
        "user_key: [{header: X-User-Id}]",
        f"store: {{url: '{redis_url}'}}",  # workers need a shared store
        "limits: {client_timeout: 5s}",
        "instances:",
        *(f"  - {{id: {i}, url: 'http://127.0.0.1:{p}'}}" for i, p in backends.ports.items()),
    ]) + "\n")
    log_path = tmp_path / "serve.log"
    sup = Supervised(spawn_serve(config, 2, log_path), log_path)
    try:
        await wait_until(lambda: "all workers ready" in sup.log() or sup.proc.poll() is not None, timeout=60,
                         interval=0.05, message="serve ready")
        assert sup.proc.poll() is None, sup.log()
        bound = set(re.findall(r"listening .*?listen=\[::\]:(\d+) admin=\[::\]:(\d+)", sup.log()))
        assert len(bound) == 1, sup.log()  # both workers on the same ports
        assert len(re.findall(rf"listening .*engine={engine}\b", sup.log())) == 2, sup.log()
        main_port, admin_port = (int(p) for p in bound.pop())
        if port_given:
            assert (main_port, admin_port) == (main, admin)
        for host in (V4, V6):
            for _ in range(6):  # new connections, so both workers answer some
                async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as fresh:
                    assert await status_of(fresh, f"http://{host}:{main_port}/") == 200, host
                    assert await status_of(fresh, f"http://{host}:{admin_port}/health") == 200, host
    finally:
        if sup.proc.poll() is None:
            os.killpg(sup.proc.pid, signal.SIGTERM)
            sup.proc.wait(timeout=30)


@pytest.mark.parametrize("taken", ["main", "admin"])
async def test_a_start_on_a_taken_port_fails_and_leaves_nothing_open(engine: str, backends: Backends,
                                                                     taken: str) -> None:
    """A listener's port in use: ``start()`` raises EADDRINUSE and stops what it had started (the
    client sessions and runners), so nothing is left for the garbage collector to warn about (a CI
    run once failed a later test on such leftovers)."""
    import errno
    import gc
    import socket

    from affinity_proxy.serve.app import ProxyServer

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        listens = {"listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0"}
        listens["listen" if taken == "main" else "admin_listen"] = f"127.0.0.1:{port}"
        server = ProxyServer(make_config(backends, engine=engine, **listens))
        with pytest.raises(OSError) as failed:
            await server.start()
        assert failed.value.errno == errno.EADDRINUSE
        assert server._runners == [] and server._fast is None
        gc.collect()  # an unclosed session or connector would warn here (warnings are errors)
