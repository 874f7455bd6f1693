"""``web.admin.browser_guard`` and its Host/Origin parsing: every bad input, and Fly's ``.internal``
names accepted only when asked (fly mode). A real aiohttp app on 127.0.0.1 for the middleware."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from affinity_proxy.admin.api import FLY_PRIVATE_SUFFIXES, _own_origin, browser_guard, host_allowed, split_host


@pytest.mark.parametrize(("value", "expected"), [
    ("127.0.0.1", ("127.0.0.1", None)), ("127.0.0.1:9091", ("127.0.0.1", 9091)), ("[::1]:9091", ("::1", 9091)),
    ("[::1]", ("::1", None)), ("LocalHost.:80", ("localhost", 80)), ("a.example:0", ("a.example", 0)),
    ("", None), (":80", None), ("[::1", None), ("[::1]x", None), ("[::1]:", None), ("h:", None), ("h:-1", None),
    ("h:65536", None), ("h:123456", None), ("h:8o", None), ("h: 80", None),
])  # fmt: skip
def test_split_host(value: str, expected: tuple[str, int | None] | None) -> None:
    assert split_host(value) == expected


@pytest.mark.parametrize(("name", "ok"), [
    ("127.0.0.1", True), ("10.0.0.1", True), ("::1", True), ("fdaa:0:1::3", True), ("localhost", True),
    ("listed.example", True), ("evil.example", False), ("localhost.evil.example", False), ("127.0.0.1.nip.io", False),
    ("2130706433", False), ("", False), (":", False), ("m1.vm.app.internal", False),
])  # fmt: skip
def test_host_allowed(name: str, ok: bool) -> None:
    assert host_allowed(name, frozenset({"listed.example"})) is ok


def test_fly_private_names_only_with_the_suffix() -> None:
    assert host_allowed("m1.vm.app.internal", frozenset(), FLY_PRIVATE_SUFFIXES)
    assert host_allowed("app.internal", frozenset(), FLY_PRIVATE_SUFFIXES)
    assert not host_allowed("internal", frozenset(), FLY_PRIVATE_SUFFIXES)
    assert not host_allowed("app.internal.evil.example", frozenset(), FLY_PRIVATE_SUFFIXES)


@pytest.mark.parametrize(("origin", "host", "own"), [
    ("http://127.0.0.1:9091", ("127.0.0.1", 9091), True), ("https://127.0.0.1:9091", ("127.0.0.1", 9091), True),
    ("http://localhost", ("localhost", None), True), ("https://localhost", ("localhost", None), True),
    ("http://localhost:80", ("localhost", None), True), ("http://[::1]:9091", ("::1", 9091), True),
    ("http://127.0.0.1", ("127.0.0.1", 9091), False), ("http://127.0.0.1:9092", ("127.0.0.1", 9091), False),
    ("http://localhost:8080", ("localhost", None), False), ("http://evil.example", ("evil.example", None), False),
    ("null", ("127.0.0.1", 9091), False), ("", ("127.0.0.1", 9091), False),
    ("ftp://127.0.0.1:9091", ("127.0.0.1", 9091), False),
    ("http://127.0.0.1:99999", ("127.0.0.1", 9091), False), ("http://127.0.0.1:9091", None, False),
    ("http://user@127.0.0.1:9091", ("127.0.0.1", 9091), True),
])  # fmt: skip
def test_own_origin(origin: str, host: tuple[str, int | None] | None, own: bool) -> None:
    assert _own_origin(origin, host, frozenset(), ()) is own


@pytest.fixture
async def guarded_app() -> AsyncIterator[tuple[int, int]]:
    """Two apps behind browser_guard: fly-mode suffixes, and none (proxy mode). Yields both ports."""
    ports = []
    runners = []
    for suffixes in (FLY_PRIVATE_SUFFIXES, ()):
        app = web.Application(middlewares=[browser_guard((), token_set=False, loopback=True,
                                                         allowed_suffixes=suffixes)])

        async def ok(request: web.Request) -> web.Response:
            return web.json_response({"ok": True})

        app.router.add_route("*", "/{tail:.*}", ok)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        ports.append(runner.addresses[0][1])
    yield ports[0], ports[1]
    for runner in runners:
        await runner.cleanup()


async def test_fly_mode_answers_to_private_network_names(guarded_app: tuple[int, int]) -> None:
    fly_port, proxy_port = guarded_app
    async with aiohttp.ClientSession() as http:
        name = "148e9e3c0e4d78.vm.my-app.internal:9091"
        async with http.get(f"http://127.0.0.1:{fly_port}/metrics", headers={"Host": name}) as resp:
            assert resp.status == 200
        async with http.get(f"http://127.0.0.1:{proxy_port}/metrics", headers={"Host": name}) as resp:
            assert resp.status == 421
        for port in (fly_port, proxy_port):
            async with http.get(f"http://127.0.0.1:{port}/pins", headers={"Host": "evil.example"}) as resp:
                assert resp.status == 421
            own = {"Host": "my-app.internal", "Origin": "http://my-app.internal"}
            async with http.post(f"http://127.0.0.1:{port}/reap", headers=own) as resp:
                assert resp.status == (200 if port == fly_port else 403)
